"""The outbox to legacy: cloud messages and membership changes the bridge must inject into
the legacy network, claimed per conversation in order. A message's row is written with the
message (``cloud.store.messages``), a membership change's with the change
(``cloud.store.conversations``); ``cloud.store.outbox_backfill`` queues what legacy missed
when an account leaves cloud-only.

A conversation's rows are ordered by ``(seq, sub)``: a message's row has its message's seq
and sub 0; a membership change made after message N has seq N and sub 1, 2, ... (migration
0010), so it is injected after message N and before message N + 1.

A queued message has its legacy GUID (``cloud.model``) from then on, so a completion writes
only its own row (the gaps reconciler leaves pending rows to the injector); a row that ends
without reaching legacy (skipped, refused, given up) takes it back (``_UNGUIDED``).

This module is long because the claim, the completions, the releases and the skips all turn
on the same claim token and row states: split, each half would hold half of that argument.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence

import attrs
import psycopg

from cloud.db import one_statement, pipeline
from cloud.model import LEGACY_CLIENT_PHASES, LEGACY_GUID_SQL
from cloud.store import findings as findings_store

#: LISTEN/NOTIFY channel the bridge waits on for new outbox_to_legacy rows.
OUTBOX_CHANNEL = "outbox_to_legacy"
#: Finding kind for a message the legacy network will never accept.
INJECT_REFUSED = "inject_refused"
#: Finding kind for a message given up after the injector's ``max_attempts`` or ``max_age_s``.
INJECT_FAILED = "inject_failed"

#: Why a row was skipped (``outbox_to_legacy.skip_reason``): nobody in the conversation had
#: legacy clients when it was drained (a move out of cloud-only queues it again) ...
NO_LEGACY_CLIENTS = "no_legacy_clients"
#: ... or the legacy network will never accept it (an ``inject_refused`` finding says why).
REFUSED = "refused"
SKIP_REASONS = (NO_LEGACY_CLIENTS, REFUSED)

#: A CTE that takes the legacy GUID back from the messages of the outbox rows in ``ended``
#: (conversation_id, seq, kind) that will not reach legacy; only the GUID the store gave.
_UNGUIDED = (
    "unguided AS ("
    "  UPDATE messages m SET legacy_guid = NULL FROM ended e WHERE e.kind = 'message' "
    "    AND m.conversation_id = e.conversation_id AND m.seq = e.seq "
    f"    AND m.legacy_guid = {LEGACY_GUID_SQL.format('m.message_id')})")


#: The condition of the index of pending rows by age (migration 0024): every query by age
#: states it (here and ``cloud.admin``), and no other query does, so the lookups by
#: conversation or by key can not read that index (taken for empty after an ANALYZE of a
#: drained outbox, a whole scan of it, filtered by conversation, looked cheaper than a probe
#: of the index keyed by conversation). Without it a query by age can not read it either.
PENDING_BY_AGE = "state = 'pending' AND created_ms >= 0"

#: ``o.state = 'pending'`` for a join by the primary key with the rows of a claim or a batch,
#: in a form the planner can not match to the partial indexes of pending rows (it does not
#: know a subquery's value when it plans). Sized from the last VACUUM or ANALYZE, which may
#: have found none pending, those indexes look empty, and a whole scan of one, read again
#: for every row joined, looked cheaper than a probe of the primary key per row: 586 ms for
#: a 1,000-row completion with 5,000 rows pending, against 10.
_PENDING_BY_KEY = "o.state = (SELECT 'pending')"


#: The kinds of outbox row.
MESSAGE = "message"
MEMBERS = "members"


@attrs.frozen
class OutboxItem:
    """One cloud message, or membership change, the bridge must inject into the legacy
    network."""

    conversation_id: uuid.UUID
    seq: int
    #: None for a membership change
    message_id: uuid.UUID | None
    legacy_chat_id: str | None
    sender_handle: str
    #: when the message was sent (or the membership change made)
    sent_ms: int
    body: str
    #: the members' legacy-side handles (legacy_handle, else the cloud handle), sorted: as
    #: they were when the message was posted (for rows queued before migration 0009, and
    #: for membership changes, as they are now)
    member_handles: tuple[str, ...]
    #: how many members are in a phase with legacy clients (legacy, dual, cloud); for a
    #: membership change, counting the members it removes
    legacy_client_members: int
    attempts: int
    #: the claim this row is held under; complete and release take effect only under it
    claim_token: uuid.UUID | None = None
    #: when the row was queued (``created_ms``): when the message was posted, or when a
    #: move out of cloud-only back-filled it (None: not known, take ``sent_ms``)
    queued_ms: int | None = None

    @property
    def waiting_since_ms(self) -> int:
        """Since when legacy has been owed this message: the row's age and the lag to legacy
        count from here, so a back-filled message, sent long before anyone on legacy was
        owed it, is neither given up at once for its age nor reported as hours of lag."""
        return self.sent_ms if self.queued_ms is None else self.queued_ms
    #: 0 for a message; 1, 2, ... for membership changes made after message *seq*
    sub: int = 0
    kind: str = MESSAGE
    #: a membership change: the legacy-side handles it adds and removes
    add_handles: tuple[str, ...] = ()
    remove_handles: tuple[str, ...] = ()
    #: the row went back before (a failed injection, or handed back behind one): its wait
    #: met a fault, whichever worker saw it
    retried: bool = False
    #: a message's legacy GUID, as the claim read it: None when it was queued without one (by
    #: a version before migration 0022), which its completion then gives it
    legacy_guid: str | None = None


@attrs.frozen
class Injected:
    """An outbox row the home supernode acknowledged, with the legacy ids it got."""

    item: OutboxItem
    legacy_chat_id: str
    #: None only through ``complete_outbox(..., None)``, which records no GUID
    legacy_guid: str | None


#: At most this many rows of one conversation per claim by default: a claim then locks little
#: and spreads over conversations (which are injected concurrently, each in seq order).
OUTBOX_CLAIM_PER_CONVERSATION = 50

# The claim, in steps whose locks follow the rows it claims (nothing is read per row that
# is not claimed, beyond the window):
#   recent  the oldest *window* pending rows (through the pending index by age; all of
#           them when *window* is NULL): the conversations that come first;
#   heads   those conversations, with how many of their rows the window holds;
#   ready   the ones whose head (their lowest pending seq, lowest sub: a claim always
#           starts there; found through the index, wherever it lies) is not claimed,
#           oldest head first, with how many rows the ones before each would take
#           (*per_conversation* at most each);
#   owned   their heads, locked in that order without waiting, skipping heads another
#           claimer holds, until as many conversations as *limit* rows need are held;
#   wanted  the owned conversations' first pending rows in seq order, cut to *limit* rows,
#           each with its rank from the head (1 = the head);
#   due     the rows locked (skipping any another claimer holds), per conversation only the
#           unbroken run from the head: one conversation's rows are never split between
#           claims and each claim starts at the head.
_CLAIM = (
    "WITH recent AS ("
    f"  SELECT conversation_id FROM outbox_to_legacy WHERE {PENDING_BY_AGE} "
    "  ORDER BY created_ms LIMIT %(window)s), "
    "heads AS ("
    "  SELECT conversation_id, count(*) AS pending FROM recent GROUP BY conversation_id), "
    "ready AS ("
    "  SELECT h.conversation_id, o.seq AS head, o.sub AS head_sub, o.created_ms, "
    "         sum(least(h.pending, %(per_conversation)s)) OVER ("
    "           ORDER BY o.created_ms, h.conversation_id ROWS UNBOUNDED PRECEDING) "
    "         - least(h.pending, %(per_conversation)s) AS before "
    "  FROM heads h CROSS JOIN LATERAL ("
    "    SELECT o.seq, o.sub, o.created_ms, o.claimed_until_ms FROM outbox_to_legacy o "
    "    WHERE o.conversation_id = h.conversation_id AND o.state = 'pending' "
    "    ORDER BY o.seq, o.sub LIMIT 1) o "
    "  WHERE o.claimed_until_ms <= %(now)s), "
    "owned AS ("
    "  SELECT o.conversation_id, r.created_ms FROM ready r JOIN outbox_to_legacy o "
    "    ON o.conversation_id = r.conversation_id AND o.seq = r.head "
    "    AND o.sub = r.head_sub "
    f"  WHERE {_PENDING_BY_KEY} AND o.claimed_until_ms <= %(now)s "
    "  ORDER BY r.created_ms, r.conversation_id "
    "  LIMIT (SELECT count(*) FROM ready WHERE before < %(limit)s) "
    "  FOR UPDATE OF o SKIP LOCKED), "
    "wanted AS ("
    "  SELECT r.conversation_id, w.seq, w.sub, w.rank FROM owned r, LATERAL ("
    "    SELECT o.seq, o.sub, row_number() OVER (ORDER BY o.seq, o.sub) AS rank "
    "    FROM outbox_to_legacy o "
    "    WHERE o.conversation_id = r.conversation_id AND o.state = 'pending' "
    "    ORDER BY o.seq, o.sub LIMIT %(per_conversation)s) w "
    "  ORDER BY r.created_ms, r.conversation_id, w.seq, w.sub LIMIT %(limit)s), "
    "locked AS ("
    "  SELECT o.conversation_id, o.seq, o.sub, w.rank FROM outbox_to_legacy o "
    "  JOIN wanted w ON o.conversation_id = w.conversation_id AND o.seq = w.seq "
    "    AND o.sub = w.sub "
    f"  WHERE {_PENDING_BY_KEY} FOR UPDATE OF o SKIP LOCKED), "
    "due AS ("
    "  SELECT conversation_id, seq, sub FROM ("
    "    SELECT conversation_id, seq, sub, rank, "
    "           row_number() OVER (PARTITION BY conversation_id ORDER BY seq, sub) AS got "
    "    FROM locked) l WHERE rank = got), "
    "claimed AS ("
    "  UPDATE outbox_to_legacy o SET claimed_until_ms = %(until)s, "
    "    attempts = o.attempts + 1, claim_token = %(token)s FROM due "
    "  WHERE o.conversation_id = due.conversation_id AND o.seq = due.seq "
    "    AND o.sub = due.sub "
    "  RETURNING o.conversation_id, o.seq, o.sub, o.kind, o.message_id, o.attempts, "
    "    o.created_ms, o.member_handles, o.add_handles, o.remove_handles, "
    "    o.last_error IS NOT NULL AS retried) "
    "SELECT c.conversation_id, c.seq, c.message_id, cv.legacy_chat_id, "
    "       coalesce((SELECT coalesce(s.legacy_handle, s.handle) FROM accounts s "
    "                 WHERE s.account_id = m.sender_account_id), ''), "
    "       coalesce(m.sent_ms, c.created_ms), coalesce(m.body, ''), "
    "       coalesce(c.member_handles, array(SELECT (SELECT coalesce(a.legacy_handle, "
    "             a.handle) FROM accounts a WHERE a.account_id = mb.account_id) AS h "
    "             FROM members mb WHERE mb.conversation_id = c.conversation_id ORDER BY 1)), "
    # members with legacy clients, counted on each conversation's first row only (the rows
    # come grouped; claim_outbox carries the count on), each account probed by key (OFFSET
    # 0: as a semi join, the members were hashed against a scan of every account). A CTE
    # counting once per conversation, joined back, was a nested loop of rows x conversations
    # (the planner expects one row of each): 120,000 comparisons for 600 rows of 200.
    "       CASE WHEN c.conversation_id IS DISTINCT FROM lag(c.conversation_id) OVER ("
    "         ORDER BY c.conversation_id, c.seq, c.sub) THEN (SELECT count(*) FROM members mb "
    "         WHERE mb.conversation_id = c.conversation_id AND EXISTS (SELECT 1 FROM accounts "
    "         a WHERE a.account_id = mb.account_id AND a.phase = ANY(%(phases)s) OFFSET 0)) "
    "       END, "
    "       c.attempts, c.created_ms, c.sub, c.kind, coalesce(c.add_handles, '{}'), "
    "       coalesce(c.remove_handles, '{}'), c.retried, "
    "       m.legacy_guid, "
    # a membership change counts the members it removes too
    "       CASE WHEN cardinality(c.remove_handles) > 0 THEN (SELECT count(*) "
    "         FROM account_handles h WHERE h.handle = ANY(c.remove_handles) AND EXISTS ("
    "           SELECT 1 FROM accounts a WHERE a.account_id = h.account_id "
    "           AND a.phase = ANY(%(phases)s) OFFSET 0)) ELSE 0 END "
    "FROM claimed c LEFT JOIN messages m ON c.kind = 'message' "
    "  AND m.conversation_id = c.conversation_id AND m.seq = c.seq "
    "JOIN conversations cv ON cv.conversation_id = c.conversation_id "
    "ORDER BY c.conversation_id, c.seq, c.sub")


def claim_window(limit: int) -> int:
    """How many of the oldest pending rows a claim of *limit* rows looks at first: enough
    for every conversation among them to give its share, so a claim reads about what it
    claims and not the whole backlog."""
    return max(4 * limit, 1000)


def claim_outbox(conn: psycopg.Connection, now_ms: int, limit: int, claim_ms: int,
                 per_conversation: int = OUTBOX_CLAIM_PER_CONVERSATION,
                 token: uuid.UUID | None = None, *,
                 window: int | None = None) -> list[OutboxItem]:
    """Claim up to *limit* due rows for *claim_ms*, oldest first, in seq order per conversation.

    A claimed row is invisible to other workers until its claim runs out; a worker that
    dies mid-injection therefore leaves it to come due again. Claims start at each
    conversation's lowest pending row and rows come back in seq order, so injection order
    per conversation is kept across workers. The rows are held under *token* (a new random
    one when None), which the returned items carry.

    It looks at the oldest *window* pending rows first (``claim_window`` when None), and at
    every pending row only when those did not fill the claim and more are pending.

    The claim and the probe for more pending rows go in one pipeline: one round trip.
    """
    token = token if token is not None else uuid.uuid4()
    params = {"now": now_ms, "limit": limit, "until": now_ms + claim_ms,
              "per_conversation": max(1, per_conversation), "token": token,
              "phases": list(LEGACY_CLIENT_PHASES),
              "window": claim_window(limit) if window is None else window}
    claim = conn.cursor(binary=True)  # no parsing of uuids, arrays (an enum would be bytes)
    with pipeline(conn):
        claim.execute(_CLAIM, params)
        # (sent whether it is needed or not, so that it costs no round trip of its own: it
        # reads at most window + 1 entries of the index by age; asked only for pending rows,
        # after an ANALYZE that found most rows pending the planner read the whole table)
        beyond = conn.execute(
            "SELECT count(*) > %(window)s FROM (SELECT 1 FROM outbox_to_legacy "
            f"  WHERE {PENDING_BY_AGE} LIMIT %(window)s + 1) w", params)
    rows = claim.fetchall()
    if len(rows) < limit and beyond.fetchone()[0]:
        # The window held only conversations already claimed (one long backlog in front,
        # say) while others wait behind it: look at every pending row, as a claim without
        # a window would, for the rest (this claim's own heads are claimed now).
        rows += claim.execute(_CLAIM, {**params, "limit": limit - len(rows),
                                       "window": None}).fetchall()
    items = []
    members = 0  # the conversation's count, from its first row (each result is grouped)
    for r in rows:
        members = members if r[8] is None else r[8]
        items.append(OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(r[7]),
                                members + r[17], r[9], token, r[10], r[11], r[12],
                                tuple(r[13]), tuple(r[14]), r[15], r[16]))
    return items


def complete_outbox(conn: psycopg.Connection, item: OutboxItem, legacy_chat_id: str,
                    legacy_guid: str | None, now_ms: int, *, skipped: bool = False,
                    skip_reason: str | None = None) -> bool:
    """Mark an outbox row done (injected: ``complete_outbox_batch``) or skipped
    (*skip_reason*, one of ``SKIP_REASONS``: the message takes its GUID back). False, and
    nothing written, when the row is no longer pending under *item*'s claim (a late call
    from a claim that ran out and was taken again).

    A skip for ``NO_LEGACY_CLIENTS`` checks again, under the conversation's lock, that
    nobody has legacy clients now: an account may have left cloud-only since the claim
    counted them, and its back-fill (``outbox_backfill.backfill_outbox``, which takes the
    same lock) could not see a row that was still pending. Then the row is handed back,
    due at once and untried, for the next claim to inject, and False comes back.
    """
    if not skipped:
        return bool(complete_outbox_batch(
            conn, [Injected(item, legacy_chat_id, legacy_guid)], now_ms))
    if skip_reason not in SKIP_REASONS:
        raise ValueError(f"a skipped outbox row needs a reason, one of {SKIP_REASONS}; "
                         f"got {skip_reason!r}")
    if skip_reason == NO_LEGACY_CLIENTS:
        # FOR SHARE: it waits for (and makes wait) a back-fill's FOR NO KEY UPDATE
        conn.execute("SELECT 1 FROM conversations WHERE conversation_id = %s FOR SHARE",
                     (item.conversation_id,))
        if _has_legacy_clients(conn, item.conversation_id):
            conn.execute(
                "UPDATE outbox_to_legacy SET claimed_until_ms = %s, claim_token = NULL, "
                "  attempts = greatest(attempts - 1, 0) "
                "WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending' "
                "  AND claim_token = %s",
                (now_ms, item.conversation_id, item.seq, item.sub, item.claim_token))
            return False
    return conn.execute(
        "WITH ended AS ("
        "  UPDATE outbox_to_legacy SET state = 'skipped', skip_reason = %s, done_ms = %s, "
        "    last_error = NULL "
        "  WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending' "
        f"  AND claim_token = %s RETURNING conversation_id, seq, kind), {_UNGUIDED} "
        "SELECT count(*) FROM ended",
        (skip_reason, now_ms, item.conversation_id, item.seq, item.sub,
         item.claim_token)).fetchone()[0] == 1


def _has_legacy_clients(conn: psycopg.Connection, conversation_id: uuid.UUID) -> bool:
    return conn.execute(
        "SELECT 1 FROM members mb JOIN accounts a USING (account_id) "
        "WHERE mb.conversation_id = %s AND a.phase = ANY(%s) LIMIT 1",
        (conversation_id, list(LEGACY_CLIENT_PHASES))).fetchone() is not None


def complete_outbox_batch(conn: psycopg.Connection, rows: Sequence[Injected],
                          now_ms: int) -> list[OutboxItem]:
    """Mark injected rows done (``send_completion``, whose docstring says more)."""
    return send_completion(conn, rows, now_ms)()


def send_completion(conn: psycopg.Connection, rows: Sequence[Injected],
                    now_ms: int) -> Callable[[], list[OutboxItem]]:
    """Mark injected rows done in one transaction (and record a cloud-born conversation's
    legacy chat id, where its rows carry none: the injector records it before it sends);
    the rows it completed (those still pending under their item's claim), in the order
    given. A message has its GUID since it was queued; one the claim found without (queued
    by a version before migration 0022: ``OutboxItem.legacy_guid``) gets it here, and its
    place in the maintained digests (a trigger on ``messages``, migration 0019).

    For a pipeline: the statements are sent, and the rows come from the function returned,
    once the results are in (what the caller sends meanwhile goes in the same round trip).
    """
    if not rows:
        return lambda: []
    # Cloud-born conversations keep the chat id the bridge made up for them. The injector
    # records it before it sends (map_cloud_chats); this is for callers that did not. It
    # goes first, so that the conversations are locked before the digest triggers take
    # dirty rows (the order migration 0019 sets), and only for rows still held under their
    # claim (a late completion records nothing).
    unmapped = [r for r in rows if r.item.legacy_chat_id is None]
    if unmapped:
        held = {row[0] for row in conn.execute(
            "SELECT o.conversation_id FROM outbox_to_legacy o JOIN unnest(%b::uuid[], "
            "%b::bigint[], %b::int[], %b::uuid[]) AS b(conversation_id, seq, sub, token) "
            "ON o.conversation_id = b.conversation_id AND o.seq = b.seq AND o.sub = b.sub "
            f"WHERE {_PENDING_BY_KEY} AND o.claim_token = b.token "
            "ORDER BY o.conversation_id, o.seq, o.sub FOR UPDATE OF o",
            ([r.item.conversation_id for r in unmapped], [r.item.seq for r in unmapped],
             [r.item.sub for r in unmapped], [r.item.claim_token for r in unmapped]))}
        map_cloud_chats(conn, {r.item.conversation_id: r.legacy_chat_id for r in unmapped
                               if r.item.conversation_id in held})
    # Each row is found through the primary key: the planner, misled by unnest's estimate
    # and the cost of random reads, would hash the whole pending set instead (12 of 17 ms
    # for 500 rows at 50,000 pending; it grows with the backlog, not with the batch).
    conn.execute("SELECT set_config('enable_hashjoin', 'off', true)")
    cur = conn.execute(
        completion_sql(any(r.item.kind == MESSAGE and r.item.legacy_guid is None
                           for r in rows)),
        ([r.item.conversation_id for r in rows], [r.item.seq for r in rows],
         [r.item.sub for r in rows], [r.item.claim_token for r in rows],
         [r.legacy_guid for r in rows], now_ms))

    def completed() -> list[OutboxItem]:
        done = set(cur.fetchall())
        return [r.item for r in rows
                if (r.item.conversation_id, r.item.seq, r.item.sub) in done]

    return completed


def completion_sql(fill_guids: bool) -> str:
    """The completion's statement (``send_completion``): the batch's (conversation, seq, sub,
    claim token, GUID) arrays, then the time; with *fill_guids*, it also gives the messages
    that lack one their GUID (``_FILL_GUIDS``)."""
    return (
        "WITH batch AS ("
        "  SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::int[], %b::uuid[], %b::text[]) "
        "  AS b(conversation_id, seq, sub, token, guid)), "
        "done AS ("
        "  UPDATE outbox_to_legacy o SET state = 'done', done_ms = %s, last_error = NULL "
        "  FROM batch b WHERE o.conversation_id = b.conversation_id AND o.seq = b.seq "
        f"    AND o.sub = b.sub AND {_PENDING_BY_KEY} AND o.claim_token = b.token "
        "  RETURNING o.conversation_id, o.seq, o.sub, o.kind, b.guid) "
        + (_FILL_GUIDS if fill_guids else "")
        + "SELECT conversation_id, seq, sub FROM done")


#: The completion's part for messages the claim found without their GUID
_FILL_GUIDS = (
    ", guids AS ("
    "  UPDATE messages m SET legacy_guid = d.guid FROM done d "
    "  WHERE d.kind = 'message' AND m.conversation_id = d.conversation_id "
    "    AND m.seq = d.seq AND m.legacy_guid IS NULL) ")


def map_cloud_chats(conn: psycopg.Connection, chats: Mapping[uuid.UUID, str]) -> None:
    """Record the legacy chat id the bridge made up for each cloud-born conversation
    (conversation id -> chat id): the mapping, and ``conversations.legacy_chat_id`` where
    it is not set yet (one that has a chat id keeps it, and gets no second mapping).
    Idempotent; keys are locked and written in order.

    The injector does it in a transaction of its own before a pass sends the first rows of
    the conversations it holds, so the mapping is committed before legacy can echo the chat
    back. Done at completion instead, it raced the follower, which records the echoed
    chat's mapping too: each inserted a mapping the other then waited for, while holding a
    dirty-set row (migration 0019) the other needed, and one of the two was killed as a
    deadlock after deadlock_timeout (4 deadlocks in a 30,000-message drain, about 1 s
    each)."""
    if not chats:
        return
    # the conversations without one, locked in id order as every writer of several does
    order = [r[0] for r in conn.execute(
        "SELECT conversation_id FROM conversations WHERE conversation_id = ANY(%s) "
        "AND legacy_chat_id IS NULL ORDER BY conversation_id FOR NO KEY UPDATE",
        (sorted(chats),)).fetchall()]
    if not order:
        return
    conn.execute(
        "WITH new AS (SELECT * FROM unnest(%s::text[], %s::uuid[]) "
        "  AS n(legacy_chat_id, conversation_id)), "
        "ids AS (INSERT INTO conversation_legacy_ids (legacy_chat_id, conversation_id) "
        "  SELECT legacy_chat_id, conversation_id FROM new ORDER BY legacy_chat_id "
        "  ON CONFLICT DO NOTHING) "
        "UPDATE conversations c SET legacy_chat_id = new.legacy_chat_id FROM new "
        "WHERE c.conversation_id = new.conversation_id AND c.legacy_chat_id IS NULL",
        ([chats[c] for c in order], order))


def release_outbox(conn: psycopg.Connection, item: OutboxItem, error: str,
                   retry_at_ms: int, *, tried: bool = True) -> bool:
    """Injection failed: keep the row pending, due again at *retry_at_ms*. False, and nothing
    written, when the row is no longer pending under *item*'s claim.

    The claim counted an attempt; a row handed back without being *tried* (it waited behind
    its conversation's failed row, or the claim ended first) gets it back, so ``attempts``
    counts injections actually tried and a give-up after N attempts means N failures."""
    return conn.execute(
        "UPDATE outbox_to_legacy SET claimed_until_ms = %s, last_error = %s, "
        "  attempts = greatest(attempts - %s, 0) "
        "WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending' "
        "AND claim_token = %s",
        (retry_at_ms, error[:500], 0 if tried else 1, item.conversation_id, item.seq,
         item.sub, item.claim_token)).rowcount == 1


def any_due(conn: psycopg.Connection, conversation_ids: Sequence[uuid.UUID],
            now_ms: int) -> bool:
    """Whether one of the conversations has a pending row no claim holds and no retry delay
    keeps back: a probe per conversation through the pending rows' index."""
    return send_any_due(conn, conversation_ids, now_ms)()


def send_any_due(conn: psycopg.Connection, conversation_ids: Sequence[uuid.UUID],
                 now_ms: int) -> Callable[[], bool]:
    """``any_due`` for a pipeline: the probe is sent, its answer read from the function
    returned."""
    if not conversation_ids:
        return lambda: False
    cur = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM unnest(%s::uuid[]) AS c(id) WHERE EXISTS ("
        "  SELECT 1 FROM outbox_to_legacy o WHERE o.conversation_id = c.id "
        "  AND o.state = 'pending' AND o.claimed_until_ms <= %s OFFSET 0))",
        (list(conversation_ids), now_ms))
    return lambda: cur.fetchone()[0]


@one_statement
def outbox_backlog(conn: psycopg.Connection, now_ms: int) -> tuple[int, int | None]:
    """Pending outbox rows and the age in ms of the oldest (None when empty)."""
    count, oldest = conn.execute(
        f"SELECT count(*), min(created_ms) FROM outbox_to_legacy WHERE {PENDING_BY_AGE}").fetchone()
    return count, (None if oldest is None else now_ms - oldest)


# ---------------------------------------------------------------- refusals, give-ups, releases

def membership_detail(item: OutboxItem) -> dict:
    """What a finding about a row says besides a message's fields: for a membership change,
    its kind, place and delta; nothing for a message."""
    if item.kind != MEMBERS:
        return {}
    return {"kind": item.kind, "sub": item.sub, "add": list(item.add_handles),
            "remove": list(item.remove_handles)}


def _lock_if_held(conn: psycopg.Connection, item: OutboxItem) -> bool:
    """Lock *item*'s row if it is still pending under *item*'s claim; False otherwise."""
    return conn.execute(
        "SELECT 1 FROM outbox_to_legacy WHERE conversation_id = %s AND seq = %s AND sub = %s "
        "AND state = 'pending' AND claim_token = %s FOR UPDATE",
        (item.conversation_id, item.seq, item.sub, item.claim_token)).fetchone() is not None


def refuse_outbox_item(conn: psycopg.Connection, item: OutboxItem, legacy_chat_id: str,
                       reason: str, now_ms: int) -> bool:
    """Skip a row the legacy network will never accept, with an open ``inject_refused``
    finding; False (and nothing written) if the row is no longer pending under its claim."""
    if not _lock_if_held(conn, item):
        return False
    findings_store.record_finding(
        conn, INJECT_REFUSED,
        {"reason": reason, "message_id": str(item.message_id), "seq": item.seq,
         "legacy_chat_id": legacy_chat_id, "sender": item.sender_handle,
         **membership_detail(item)},
        now_ms, conversation_id=item.conversation_id)
    complete_outbox(conn, item, legacy_chat_id, None, now_ms, skipped=True,
                    skip_reason=REFUSED)
    return True


def fail_outbox_item(conn: psycopg.Connection, item: OutboxItem, reason: str,
                     now_ms: int) -> bool:
    """Give up on a row: state ``failed`` with an open ``inject_failed`` finding; False (and
    nothing written) if the row is no longer pending under its claim."""
    if not _lock_if_held(conn, item):
        return False
    findings_store.record_finding(
        conn, INJECT_FAILED,
        {"reason": reason, "message_id": str(item.message_id), "seq": item.seq,
         "attempts": item.attempts, "sent_ms": item.sent_ms, "sender": item.sender_handle,
         **membership_detail(item)},
        now_ms, conversation_id=item.conversation_id)
    conn.execute(
        "WITH ended AS ("
        "  UPDATE outbox_to_legacy SET state = 'failed', done_ms = %s, last_error = %s "
        "  WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending' "
        f"  RETURNING conversation_id, seq, kind), {_UNGUIDED} SELECT count(*) FROM ended",
        (now_ms, reason[:500], item.conversation_id, item.seq, item.sub))
    return True


def release_outbox_items(conn: psycopg.Connection, items: Sequence[OutboxItem], error: str,
                         retry_at_ms: int, tried: int = 0) -> int:
    """Hand claimed rows of one conversation back together, all due at *retry_at_ms*; how
    many were still held under their claim (the others belong to a newer claim now). Only
    the first *tried* of them were injected; the rest get their claim's attempt back."""
    return sum(release_outbox(conn, item, error, retry_at_ms, tried=i < tried)
               for i, item in enumerate(items))

