-- 0008: an outbox row the bridge gave up on (after InjectorConfig.max_attempts failed
-- injections, or a failure past max_age_s) is 'failed', with an inject_failed finding;
-- nothing retries it.
ALTER TABLE outbox_to_legacy DROP CONSTRAINT outbox_to_legacy_state_check;
ALTER TABLE outbox_to_legacy ADD CONSTRAINT outbox_to_legacy_state_check
    CHECK (state IN ('pending', 'done', 'skipped', 'failed'));
