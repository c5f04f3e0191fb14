-- 0005: tell the planner what a conversation's share of messages looks like, whatever the
-- sample of its first ANALYZE said. A new store's first ANALYZE often sees about one message
-- per conversation and records conversation_id as unique in messages (n_distinct -1). The
-- planner then finds every index that starts with conversation_id equally good for the
-- mirror path's duplicate probes, and may pick one that matches on conversation_id alone
-- and filters: a probe that reads the conversation's whole history, so each batch costs more
-- as the history grows. With this setting (taken at every ANALYZE, autovacuum's included)
-- it assumes 100 messages per conversation: the unique indexes win, and lookups by
-- conversation_id alone still use an index.
ALTER TABLE messages ALTER COLUMN conversation_id SET (n_distinct = -0.01);
-- The setting is read by ANALYZE only: take it now (a fixed-size sample, seconds even on a
-- large table), not at autovacuum's next ANALYZE, which could be days away.
ANALYZE messages;
