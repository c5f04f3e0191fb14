-- 0006: only messages posted through the cloud API carry a client_message_id. A unique index
-- entry holding a NULL guards nothing (NULLs are distinct), and every message mirrored from
-- the legacy network had one: leave those out. The mirror path then writes one index entry
-- fewer per message; post_message's duplicate lookup (client_message_id = $3, which implies
-- NOT NULL) still uses the index. The new index is built before the constraint goes, inside
-- this migration's transaction: writes to messages wait while it builds, unless an operator
-- built it first with CREATE UNIQUE INDEX CONCURRENTLY (docs/operations.md).
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_message_id ON messages
    (conversation_id, sender_account_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
ALTER TABLE messages
    DROP CONSTRAINT messages_conversation_id_sender_account_id_client_message_i_key;
