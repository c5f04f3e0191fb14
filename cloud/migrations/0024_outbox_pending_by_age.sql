-- 0024: the index of pending outbox rows by age answers only the queries that ask for rows
-- by age. The planner takes the size of a partial index from the last VACUUM or ANALYZE,
-- and an outbox is often drained empty then: from that moment until the next one it takes
-- both indexes of pending rows for empty, whatever they hold. To find a conversation's
-- lowest pending row, or a row by its key, it then chose a whole scan of this one (the
-- smaller of the two), filtered by conversation, over a probe of the other: once per
-- conversation of a claim and once per row of a completion. With 5,000 rows pending, a
-- 1,000-row claim took 548 ms and its completion 586 ms instead of about 25 and 10 ms,
-- and under load the cloud -> legacy leg stalled (p99 30 s at a quarter of its speed) until
-- the next ANALYZE. Its predicate now names created_ms as well, which only the queries by
-- age state (cloud/store/outbox.py), so the lookups by conversation can use only the index
-- keyed by conversation; the check keeps every row inside it.
--
-- The new index is created only IF NOT EXISTS: on a large store, build it first with
-- CREATE INDEX CONCURRENTLY and this definition (docs/operations.md). The check reads the
-- whole table once, under a lock that makes posts and claims wait.
ALTER TABLE outbox_to_legacy ADD CONSTRAINT outbox_to_legacy_created_ms_check
  CHECK (created_ms >= 0);
CREATE INDEX IF NOT EXISTS outbox_to_legacy_pending_age ON outbox_to_legacy (created_ms)
  WHERE state = 'pending' AND created_ms >= 0;
DROP INDEX IF EXISTS outbox_to_legacy_pending;
