-- 0019: digests kept current as messages are written (issue 19), and the dirty set.
--
-- message_digest_slots: per conversation and one-hour time slot (sent_ms floor-divided by
-- 3,600,000 ms, the legacy tree's SLOT_MS), the count and the exact sum of the
-- docs/digest.md message hashes (signed 64-bit, as digest_hash holds them) of the messages
-- that have a legacy GUID. The digest of a slot is (count, total mod 2**64); a time window's
-- root digest is the sum of the slots inside it plus the messages of the (at most two) slots
-- its ends cut. The sum is kept exact (numeric), not reduced, so a delete subtracts exactly
-- and an emptied slot is (0, 0), which is then deleted.
--
-- digest_dirty: the conversations whose digested messages changed since the gaps reconciler
-- last compared them equal (version: bumped by every writing statement; top_ms: the newest
-- sent_ms written, so a clean compare below it does not clear it). A row goes when a compare
-- finds the conversation equal, with the version it read, below its top_ms. A new legacy
-- chat mapping puts its conversation here (never compared yet).
--
-- Both are kept by statement-level triggers with transition tables, so every path that
-- writes messages (the bridge's COPY/staging insert, posts, repairs through the mirror path,
-- the outbox setting legacy_guid, deletes and pruning, a bulk load, a TRUNCATE) updates
-- them in its own transaction, one grouped statement per writing statement: a crash between a message and
-- its digest can not happen, and no write path can forget them.
--
-- gaps_clean_through: the watermark of the newest gaps pass that went through everything it
-- had to compare clean (one row), and each supernode's epoch when that pass began. A
-- conversation that is not dirty and was compared clean once is clean up to that watermark
-- (admin.conversation_coverage reads it); a supernode whose epoch is not the one recorded
-- has restarted and lost its memory since, so the next pass compares all its chats.
--
-- Lock order (no deadlock between writers): a writer that locks its conversations does so
-- first (FOR NO KEY UPDATE, in id order), then the trigger's one statement takes the
-- dirty rows and the slot rows, each in key order; the gaps reconciler's clear_dirty
-- updates its conversations first too, then locks the dirty rows in order. The outbox
-- completion locks no conversation: it waits, if at all, on a dirty row a writer of the
-- same conversation holds until its commit.
--
-- The back-fill reads every stored message once, in this migration's transaction.
--
-- Distribution key: conversation_id leads both tables' primary keys.

CREATE FUNCTION message_digest_slot(sent_ms bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
  SELECT CASE WHEN sent_ms >= 0 THEN sent_ms / 3600000
              ELSE -((-sent_ms - 1) / 3600000) - 1 END
$$;

CREATE TABLE message_digest_slots (
    conversation_id uuid NOT NULL,
    slot            bigint NOT NULL,
    count           bigint NOT NULL,
    total           numeric NOT NULL,
    PRIMARY KEY (conversation_id, slot)
);

CREATE TABLE digest_dirty (
    conversation_id uuid PRIMARY KEY,
    version         bigint NOT NULL,
    top_ms          bigint NOT NULL
);

CREATE TABLE gaps_clean_through (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    watermark_ms bigint NOT NULL,
    run_id       bigint,
    recorded_ms  bigint NOT NULL,
    supernodes   jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- One statement per writing statement: the delta (+ the new rows, - the old ones) grouped
-- by (conversation, slot), net-zero groups dropped, added to the slots in key order (two
-- writers take the slot rows' locks in the same order), and the conversations marked dirty.
-- sum(bigint) accumulates in 128 bits: no numeric arithmetic per row.
CREATE FUNCTION message_digests_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE digest_hash IS NOT NULL) THEN
      RETURN NULL;  -- cloud posts: no legacy GUID yet, nothing digested
    END IF;
    WITH g AS (SELECT conversation_id, message_digest_slot(sent_ms) AS slot, count(*) AS n,
                      sum(digest_hash) AS t, max(sent_ms) AS top
               FROM new_rows WHERE digest_hash IS NOT NULL GROUP BY 1, 2),
    upd AS (INSERT INTO message_digest_slots AS s (conversation_id, slot, count, total)
            SELECT conversation_id, slot, n, t FROM g ORDER BY 1, 2
            ON CONFLICT (conversation_id, slot) DO UPDATE
            SET count = s.count + excluded.count, total = s.total + excluded.total)
    INSERT INTO digest_dirty AS x (conversation_id, version, top_ms)
    SELECT conversation_id, 1, max(top) FROM g GROUP BY 1 ORDER BY 1
    ON CONFLICT (conversation_id) DO UPDATE
    SET version = x.version + 1, top_ms = greatest(x.top_ms, excluded.top_ms);
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    WITH d AS (SELECT conversation_id, message_digest_slot(sent_ms) AS slot, count(*) AS n,
                      sum(digest_hash) AS t, max(sent_ms) AS top
               FROM new_rows WHERE digest_hash IS NOT NULL GROUP BY 1, 2
               UNION ALL
               SELECT conversation_id, message_digest_slot(sent_ms), -count(*),
                      -sum(digest_hash), max(sent_ms)
               FROM old_rows WHERE digest_hash IS NOT NULL GROUP BY 1, 2),
    g AS (SELECT conversation_id, slot, sum(n) AS n, sum(t) AS t, max(top) AS top
          FROM d GROUP BY 1, 2 HAVING sum(n) <> 0 OR sum(t) <> 0),
    upd AS (INSERT INTO message_digest_slots AS s (conversation_id, slot, count, total)
            SELECT conversation_id, slot, n, t FROM g ORDER BY 1, 2
            ON CONFLICT (conversation_id, slot) DO UPDATE
            SET count = s.count + excluded.count, total = s.total + excluded.total)
    INSERT INTO digest_dirty AS x (conversation_id, version, top_ms)
    SELECT conversation_id, 1, max(top) FROM g GROUP BY 1 ORDER BY 1
    ON CONFLICT (conversation_id) DO UPDATE
    SET version = x.version + 1, top_ms = greatest(x.top_ms, excluded.top_ms);
  ELSE  -- DELETE
    WITH g AS (SELECT conversation_id, message_digest_slot(sent_ms) AS slot, -count(*) AS n,
                      -sum(digest_hash) AS t, max(sent_ms) AS top
               FROM old_rows WHERE digest_hash IS NOT NULL GROUP BY 1, 2),
    upd AS (INSERT INTO message_digest_slots AS s (conversation_id, slot, count, total)
            SELECT conversation_id, slot, n, t FROM g ORDER BY 1, 2
            ON CONFLICT (conversation_id, slot) DO UPDATE
            SET count = s.count + excluded.count, total = s.total + excluded.total)
    INSERT INTO digest_dirty AS x (conversation_id, version, top_ms)
    SELECT conversation_id, 1, max(top) FROM g GROUP BY 1 ORDER BY 1
    ON CONFLICT (conversation_id) DO UPDATE
    SET version = x.version + 1, top_ms = greatest(x.top_ms, excluded.top_ms);
  END IF;
  -- a slot that lost rows and is now empty goes (an old row's slot is the only candidate)
  DELETE FROM message_digest_slots s
   USING (SELECT DISTINCT conversation_id, message_digest_slot(sent_ms) AS slot
          FROM old_rows WHERE digest_hash IS NOT NULL) o
   WHERE s.conversation_id = o.conversation_id AND s.slot = o.slot AND s.count = 0;
  RETURN NULL;
END
$$;

CREATE TRIGGER message_digests_insert AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION message_digests_apply();
CREATE TRIGGER message_digests_update AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION message_digests_apply();
CREATE TRIGGER message_digests_delete AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION message_digests_apply();

-- A TRUNCATE of messages deletes no row one by one: the slots go with it, and every
-- conversation with a legacy chat is dirty (its cloud side changed wholesale).
CREATE FUNCTION message_digests_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM message_digest_slots;
  INSERT INTO digest_dirty AS x (conversation_id, version, top_ms)
  SELECT DISTINCT conversation_id, 1, 0 FROM conversation_legacy_ids ORDER BY 1
  ON CONFLICT (conversation_id) DO UPDATE SET version = x.version + 1;
  RETURN NULL;
END
$$;

CREATE TRIGGER message_digests_truncate AFTER TRUNCATE ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION message_digests_truncate();

-- A conversation newly mapped to a legacy chat has never been compared: it is dirty.
CREATE FUNCTION digest_dirty_new_chat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO digest_dirty (conversation_id, version, top_ms)
  SELECT DISTINCT conversation_id, 1, 0 FROM new_chats ORDER BY 1
  ON CONFLICT (conversation_id) DO UPDATE SET version = digest_dirty.version + 1;
  RETURN NULL;
END
$$;

CREATE TRIGGER digest_dirty_new_chat AFTER INSERT ON conversation_legacy_ids
    REFERENCING NEW TABLE AS new_chats FOR EACH STATEMENT
    EXECUTE FUNCTION digest_dirty_new_chat();

-- Back-fill: the slots of every message already stored, and every conversation with a
-- legacy chat dirty (the first pass after the upgrade compares them all, as before).
INSERT INTO message_digest_slots (conversation_id, slot, count, total)
SELECT conversation_id, message_digest_slot(sent_ms), count(*), sum(digest_hash)
  FROM messages WHERE digest_hash IS NOT NULL GROUP BY 1, 2;
INSERT INTO digest_dirty (conversation_id, version, top_ms)
SELECT l.conversation_id, 1,
       coalesce((SELECT max(m.sent_ms) FROM messages m
                  WHERE m.conversation_id = l.conversation_id), 0)
  FROM (SELECT DISTINCT conversation_id FROM conversation_legacy_ids) l
ON CONFLICT (conversation_id) DO NOTHING;
