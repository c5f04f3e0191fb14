-- 0016: targeted reconcile runs (bridgectl reconcile gaps --account / --conversation).
--
-- reconcile_runs.scope: NULL for a full pass (what cron runs), else what a targeted run was
-- limited to, 'account:HANDLE' or 'conversation:UUID'. A run resumes only the interrupted
-- run of its own kind, mode and scope, so a targeted run never takes over (nor supersedes)
-- the resume cursor of the full pass, and the reverse. A targeted run never counts as the
-- clean run the migration gate recent_clean_reconcile looks for; the conversations it
-- compared clean vouch for themselves (conversations.last_clean_reconcile_ms) as a full
-- pass's do. The runs table grows with the cron runs, not with the users: no distribution
-- key.
ALTER TABLE reconcile_runs ADD COLUMN scope text
    CHECK (scope IS NULL OR scope ~ '^(account|conversation):.+$');
CREATE INDEX reconcile_runs_resume ON reconcile_runs (kind, coalesce(scope, ''), run_id)
    WHERE state = 'interrupted';
-- The newest full run of each kind (status, and the bridge worker's progress metrics on
-- every heartbeat) is read through this index, never by reading the runs' history.
CREATE INDEX reconcile_runs_latest ON reconcile_runs (kind, started_ms DESC, run_id DESC)
    WHERE scope IS NULL;
-- The latest targeted runs (status): an index of those rows only.
CREATE INDEX reconcile_runs_targeted ON reconcile_runs (started_ms DESC, run_id DESC)
    WHERE scope IS NOT NULL;
