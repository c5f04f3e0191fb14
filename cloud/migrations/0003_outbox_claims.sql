-- 0003: the bridge claims outbox_to_legacy rows for a while before injecting them, so a
-- worker that dies mid-injection leaves rows that come due again (re-injection is a no-op on
-- the legacy side: the GUID is derived from the message id). 'skipped': no member still
-- uses legacy clients by the time the row was drained.
ALTER TABLE outbox_to_legacy ADD COLUMN claimed_until_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE outbox_to_legacy ADD COLUMN last_error text;
ALTER TABLE outbox_to_legacy DROP CONSTRAINT outbox_to_legacy_state_check;
ALTER TABLE outbox_to_legacy ADD CONSTRAINT outbox_to_legacy_state_check
    CHECK (state IN ('pending', 'done', 'skipped'));
