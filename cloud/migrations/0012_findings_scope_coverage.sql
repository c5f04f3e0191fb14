-- 0012: findings that hold the gates, and what a clean reconcile has covered.
--
-- * A finding may end 'unrecoverable': the legacy network's own loss (messages that died with
--   a supernode's memory), reported apart and never called repaired. Gates count 'open' and
--   'failed' findings; an 'unrecoverable' one still has to be covered by a clean compare.
-- * reconcile_findings.source: the legacy supernode a finding concerns as a whole (a feed
--   gap), when no conversation can be named. It holds every conversation homed there; the
--   ring the homes were computed on is in detail->'ring' (the bridge's directory then).
-- * conversations.last_clean_reconcile_ms: the watermark of the newest gaps pass that
--   compared this conversation and found both stacks equal below it. The migration gate
--   asks it to be recent and newer than the conversation's last finding, so a resumed run
--   that compared only the tail of the conversations vouches for those alone.
ALTER TABLE reconcile_findings DROP CONSTRAINT reconcile_findings_state_check;
ALTER TABLE reconcile_findings ADD CONSTRAINT reconcile_findings_state_check
    CHECK (state IN ('open', 'repaired', 'failed', 'unrecoverable', 'dismissed'));
ALTER TABLE reconcile_findings ADD COLUMN source text;
UPDATE reconcile_findings SET source = detail->>'source'
 WHERE kind = 'feed_gap' AND conversation_id IS NULL AND detail ? 'source';
CREATE INDEX reconcile_findings_holding ON reconcile_findings (account_id)
    WHERE state IN ('open', 'failed');
CREATE INDEX reconcile_findings_by_source ON reconcile_findings (source, created_ms)
    WHERE source IS NOT NULL;
ALTER TABLE conversations ADD COLUMN last_clean_reconcile_ms bigint;
