-- 0011: a finding may end 'unrecoverable': the legacy network's own loss, which no repair
-- can undo (a feed gap whose entries died with a supernode's memory). Reported apart from
-- 'repaired', and never counted as open. Open feed gaps are looked up by their supernode
-- (detail->>'source') by the gaps reconciler; index that.
ALTER TABLE reconcile_findings DROP CONSTRAINT reconcile_findings_state_check;
ALTER TABLE reconcile_findings ADD CONSTRAINT reconcile_findings_state_check
    CHECK (state IN ('open', 'repaired', 'failed', 'unrecoverable', 'dismissed'));
CREATE INDEX reconcile_findings_open_feed_gaps ON reconcile_findings ((detail->>'source'))
    WHERE kind = 'feed_gap' AND state = 'open';
