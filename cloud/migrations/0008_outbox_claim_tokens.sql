-- 0008: each outbox claim carries a claimant token, so that completing or releasing a row
-- takes effect only while the row is still held under that claim (a late call from an
-- expired claim, which another worker has since claimed again, changes nothing).
-- outbox_to_legacy_pending_seq: the claim reads each conversation's pending rows from its
-- head in seq order, without walking the conversation's done rows (the primary key holds
-- them all). 'failed': a row the bridge gave up on (InjectorConfig.max_attempts failed
-- injections, or a failure past max_age_s), with an inject_failed finding; nothing retries it.
ALTER TABLE outbox_to_legacy ADD COLUMN claim_token uuid;
CREATE INDEX IF NOT EXISTS outbox_to_legacy_pending_seq ON outbox_to_legacy (conversation_id, seq)
    WHERE state = 'pending';
ALTER TABLE outbox_to_legacy DROP CONSTRAINT outbox_to_legacy_state_check;
ALTER TABLE outbox_to_legacy ADD CONSTRAINT outbox_to_legacy_state_check
    CHECK (state IN ('pending', 'done', 'skipped', 'failed'));
