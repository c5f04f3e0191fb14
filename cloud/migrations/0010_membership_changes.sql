-- 0010: membership is mirrored as changes, both ways (issue 16).
-- conversations.legacy_members: the legacy chat's member list (handles) as the bridge last
-- saw it, committed with the feed checkpoint; a FeedChat's change is its difference from
-- this list. NULL: no list seen yet (the first one only adds).
-- conversations.cloud_removed: legacy-side handles removed on the cloud and not added back
-- there since. A legacy client's list that still names one (a stale list, sent to a home
-- supernode that forgot the removal in a crash) does not add it back: the bridge queues
-- the removal for legacy again instead.
-- outbox_to_legacy.kind 'members': a membership change made on the cloud (add_handles,
-- remove_handles), queued for legacy in the conversation's order. Its place is after the
-- conversation's last message: seq = that message's seq, sub = 1, 2, ... (messages have
-- sub 0), so (seq, sub) orders a conversation's rows.
-- outbox_to_legacy.member_handles: the members (legacy-side handles) when the message was
-- posted; it is delivered to them only (NULL for rows queued before this migration).
ALTER TABLE conversations ADD COLUMN legacy_members text[];
ALTER TABLE conversations ADD COLUMN cloud_removed text[] NOT NULL DEFAULT '{}';
ALTER TABLE outbox_to_legacy ADD COLUMN kind text NOT NULL DEFAULT 'message'
    CHECK (kind IN ('message', 'members'));
ALTER TABLE outbox_to_legacy ADD COLUMN sub integer NOT NULL DEFAULT 0 CHECK (sub >= 0);
ALTER TABLE outbox_to_legacy ADD COLUMN member_handles text[];
ALTER TABLE outbox_to_legacy ADD COLUMN add_handles text[];
ALTER TABLE outbox_to_legacy ADD COLUMN remove_handles text[];
ALTER TABLE outbox_to_legacy ALTER COLUMN message_id DROP NOT NULL;
ALTER TABLE outbox_to_legacy ADD CONSTRAINT outbox_to_legacy_kind_shape CHECK (
    (kind = 'message' AND sub = 0 AND message_id IS NOT NULL)
    OR (kind = 'members' AND sub > 0 AND message_id IS NULL));
ALTER TABLE outbox_to_legacy DROP CONSTRAINT outbox_to_legacy_pkey;
ALTER TABLE outbox_to_legacy ADD PRIMARY KEY (conversation_id, seq, sub);
DROP INDEX IF EXISTS outbox_to_legacy_pending_seq;
CREATE INDEX outbox_to_legacy_pending_seq ON outbox_to_legacy (conversation_id, seq, sub)
    WHERE state = 'pending';
