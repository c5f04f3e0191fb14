-- 0022: a cloud message owed to legacy has its legacy GUID ('cloud:' and its message id)
-- from the moment it is queued in outbox_to_legacy, not from its injection (issue 16):
-- the completion then writes only its outbox row, where it used to update every message
-- again (a new row version and an entry in each of messages' five indexes). A row that
-- ends without reaching legacy (skipped, refused, given up) takes the GUID back, so what
-- the digests cover is still "on legacy, or on its way there" (cloud/store/outbox.py).
--
-- The messages queued before this migration get theirs now: their rows are pending (the
-- digest triggers of 0019 count them in this transaction). A completion still writes a
-- GUID a message lacks, for rows a process older than this migration queues meanwhile.
UPDATE messages m SET legacy_guid = 'cloud:' || m.message_id::text
FROM outbox_to_legacy o
WHERE o.state = 'pending' AND o.kind = 'message'
  AND m.conversation_id = o.conversation_id AND m.seq = o.seq AND m.legacy_guid IS NULL;
