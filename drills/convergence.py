"""Did the stacks converge? An outside check of the design's invariants, from each stack's
own records, written without the reconcilers' code so that it can catch their mistakes.

    legacy inventory   every supernode lists the GUIDs of the chats it homes (peer API)
    cloud inventory    the store's messages of the conversations that have a legacy chat
    clients' records   what each stack acknowledged to its senders

Invariants checked (ARCHITECTURE.md, "the invariants the tests defend"):

- *nothing lost*: every message a stack acknowledged is in both stacks where it belongs, and
  the two inventories hold the same GUIDs per chat;
- *no duplicates*: one row per message per stack, and nothing mirrored back to where it
  came from (a GUID the bridge made up for a cloud message never comes back as a legacy one).

One loss is the legacy network's own, and nobody can undo it: a home supernode that crashes
forgets its memory, so a message it acknowledged and crashed before the bridge read is in
neither stack. Such a message (acknowledged, in neither stack, home crashed after the
acknowledgement) is counted as ``lost_by_legacy_network``, apart from ``lost``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Set
from typing import Any

import attrs
import psycopg

from bridge import ids
from legacy import wire
from legacy.digest import MAX_PREFIX_BITS

#: The end of time for a listing range (a U64 on the wire; any ms timestamp is below it).
_END_MS = 1 << 62
_SPLIT = 4


async def legacy_inventory(links: Any) -> dict[str, list[str]]:
    """chat id -> GUIDs, from every supernode of *links* (a ``SupernodeLinks``).

    A supernode answers for the chats it homes; a listing too long for one reply is split by
    GUID-hash bits until each part fits. A GUID listed twice stays twice (a duplicate).
    """
    out: dict[str, list[str]] = {}
    for sn in sorted(links.directory):
        peer = await links.peer(sn)
        after = ""
        while True:
            page = await peer.chats(after, 200)
            for info in page.chats:
                out[info.chat_id] = await _list_all(peer, info.chat_id)
            if page.done or not page.chats:
                break
            after = page.chats[-1].chat_id
    return out


async def _list_all(peer: Any, chat_id: str) -> list[str]:
    guids: list[str] = []
    todo = [(0, 0)]
    while todo:
        bits, prefix = todo.pop()
        rng = wire.Range(chat_id=chat_id, start_ms=0, end_ms=_END_MS, prefix_bits=bits,
                         prefix=prefix)
        reply = await peer.list_guids(rng, 0)
        if reply.truncated and bits < MAX_PREFIX_BITS:
            split = min(_SPLIT, MAX_PREFIX_BITS - bits)
            todo += [(bits + split, (prefix << split) | i) for i in range(1 << split)]
        else:
            guids += reply.guids
    return guids


def cloud_inventory(conn: psycopg.Connection, chat_ids: Iterable[str],
                    not_owed: Set[tuple[uuid.UUID, uuid.UUID]]) -> dict[str, list[str]]:
    """chat id -> GUIDs of the store's messages in the conversations of *chat_ids* and of
    every conversation that has a legacy chat id. A cloud message not yet injected counts
    under the GUID the bridge will give it (``cloud:<message id>``), unless the legacy
    network was never owed it (*not_owed*: ``cloud_not_owed_to_legacy``)."""
    chats = {chat: ids.conversation_id(chat) for chat in chat_ids}
    for chat, cid in conn.execute(
            "SELECT legacy_chat_id, conversation_id FROM conversation_legacy_ids"):
        chats[chat] = cid
    by_conversation = {cid: chat for chat, cid in chats.items()}
    out: dict[str, list[str]] = {chat: [] for chat in chats}
    rows = conn.execute(
        "SELECT conversation_id, message_id, coalesce(legacy_guid, %s || message_id::text) "
        "FROM messages WHERE conversation_id = ANY(%s)",
        (ids.CLOUD_PREFIX, list(by_conversation)))
    for cid, mid, guid in rows:
        if (cid, mid) not in not_owed:
            out[by_conversation[cid]].append(guid)
    return out


#: Slack for the clocks of two processes: a cloud post and a phase change this close together
#: may have seen each other either way.
PHASE_SLACK_MS = 1000

_NOT_OWED_SQL = """
WITH candidates AS (
  SELECT m.conversation_id, m.message_id, m.sent_ms + %(slack)s AS t
  FROM messages m JOIN conversation_legacy_ids USING (conversation_id)
  WHERE m.origin = 'cloud' AND m.legacy_guid IS NULL
    AND NOT EXISTS (SELECT 1 FROM outbox_to_legacy o
                    WHERE o.conversation_id = m.conversation_id AND o.seq = m.seq))
SELECT c.conversation_id, c.message_id FROM candidates c
WHERE NOT EXISTS (
  SELECT 1 FROM members mb JOIN accounts a USING (account_id)
  WHERE mb.conversation_id = c.conversation_id
    AND coalesce(
      (SELECT l.detail->>'to' FROM audit_log l
       WHERE l.action = 'phase_change' AND l.subject = a.account_id::text
         AND l.at <= to_timestamp(c.t / 1000.0) ORDER BY l.at DESC LIMIT 1),
      (SELECT l.detail->>'from' FROM audit_log l
       WHERE l.action = 'phase_change' AND l.subject = a.account_id::text
         AND l.at > to_timestamp(c.t / 1000.0) ORDER BY l.at LIMIT 1),
      a.phase) <> 'cloud-only')
"""


def cloud_not_owed_to_legacy(conn: psycopg.Connection) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """(conversation, message) of cloud messages the legacy network was never owed: posted
    when every member of the conversation was ``cloud-only`` (no legacy clients left to read
    them), by the audit log's phase history, and never queued or injected.

    The phase at the post's time comes from the audit log, not from the store's own rule
    (``post_message`` queues for legacy only while a member has legacy clients), so a
    message wrongly left unqueued is still counted lost. Within ``PHASE_SLACK_MS`` of a
    member's move to ``cloud-only`` either answer is accepted."""
    return {(cid, mid) for cid, mid in conn.execute(_NOT_OWED_SQL,
                                                    {"slack": PHASE_SLACK_MS})}


def cloud_duplicates(conn: psycopg.Connection) -> int:
    """Rows that repeat a message already stored, plus cloud messages mirrored back as
    legacy ones (a loop)."""
    (repeats,) = conn.execute(
        "SELECT count(*) - count(DISTINCT (conversation_id, "
        "       coalesce(legacy_guid, %s || message_id::text))) FROM messages",
        (ids.CLOUD_PREFIX,)).fetchone()
    (loops,) = conn.execute(
        "SELECT count(*) FROM messages WHERE origin = 'legacy' AND legacy_guid LIKE %s",
        (ids.CLOUD_PREFIX + "%",)).fetchone()
    return int(repeats) + int(loops)


def cloud_posts_missing(conn: psycopg.Connection,
                        posted: Mapping[str, tuple[str, int]]) -> list[str]:
    """Client message ids the API acknowledged (client id -> (conversation, seq)) that the
    store does not hold at that place."""
    if not posted:
        return []
    keys = list(posted)
    found = {r[0] for r in conn.execute(
        "SELECT m.client_message_id FROM messages m "
        "JOIN unnest(%s::text[], %s::uuid[], %s::bigint[]) AS p(cmid, cid, seq) "
        "  ON m.conversation_id = p.cid AND m.seq = p.seq AND m.client_message_id = p.cmid",
        (keys, [uuid.UUID(str(posted[k][0])) for k in keys],
         [posted[k][1] for k in keys]))}
    return sorted(set(keys) - found)


@attrs.frozen
class Verdict:
    """What the check found; ``converged`` only when nothing is lost or duplicated."""

    messages_legacy: int
    messages_cloud: int
    missing_in_cloud: tuple[str, ...]
    missing_in_legacy: tuple[str, ...]
    acked_legacy: int
    acked_cloud: int
    cloud_posts_missing: tuple[str, ...]
    lost_by_legacy_network: tuple[str, ...]
    duplicates: int

    @property
    def lost(self) -> int:
        return (len(self.missing_in_cloud) + len(self.missing_in_legacy)
                + len(self.cloud_posts_missing))

    @property
    def converged(self) -> bool:
        return self.lost == 0 and self.duplicates == 0

    def to_json(self, sample: int = 10) -> dict[str, Any]:
        return {
            "messages_legacy": self.messages_legacy, "messages_cloud": self.messages_cloud,
            "acked_legacy": self.acked_legacy, "acked_cloud": self.acked_cloud,
            "lost": self.lost, "duplicates": self.duplicates,
            "missing_in_cloud": list(self.missing_in_cloud[:sample]),
            "missing_in_legacy": list(self.missing_in_legacy[:sample]),
            "cloud_posts_missing": list(self.cloud_posts_missing[:sample]),
            "lost_by_legacy_network": len(self.lost_by_legacy_network),
        }


def judge(legacy: Mapping[str, list[str]], cloud: Mapping[str, list[str]], *,
          legacy_record: Mapping[str, Any] | None, cloud_posts_missing: Iterable[str] = (),
          acked_cloud: int = 0, cloud_duplicates: int = 0) -> Verdict:
    """Compare the two inventories and the clients' records.

    *legacy_record* is ``legacy run --record``'s JSON: ``acked`` rows ``[guid, chat, home
    supernode, t]`` and ``crashes`` rows ``[t, supernode]`` (seconds since the run began).
    """
    legacy_all = {(c, g) for c, gs in legacy.items() for g in gs}
    cloud_all = {(c, g) for c, gs in cloud.items() for g in gs}
    dup = sum(len(gs) - len(set(gs)) for gs in legacy.values()) + cloud_duplicates
    # a cloud message that came back from legacy as a legacy one would carry a cloud: GUID
    # in a chat where the cloud holds it under another: the store's loop count covers it.
    missing_in_cloud = set(legacy_all - cloud_all)
    missing_in_legacy = {(c, g) for c, g in cloud_all - legacy_all}
    by_legacy: set[tuple[str, str]] = set()
    acked_legacy = 0
    if legacy_record is not None:
        crashes: dict[str, list[float]] = {}
        for t, sn in legacy_record.get("crashes", ()):
            crashes.setdefault(sn, []).append(float(t))
        for guid, chat, home, t in legacy_record.get("acked", ()):
            acked_legacy += 1
            key = (chat, guid)
            if key in legacy_all or key in cloud_all:
                continue
            if any(c >= float(t) for c in crashes.get(home, ())):
                by_legacy.add(key)  # its home forgot it before the bridge read it
            else:
                missing_in_cloud.add(key)
    return Verdict(
        messages_legacy=len(legacy_all), messages_cloud=len(cloud_all),
        missing_in_cloud=tuple(sorted(f"{c}/{g}" for c, g in missing_in_cloud)),
        missing_in_legacy=tuple(sorted(f"{c}/{g}" for c, g in missing_in_legacy)),
        acked_legacy=acked_legacy, acked_cloud=acked_cloud,
        cloud_posts_missing=tuple(sorted(cloud_posts_missing)),
        lost_by_legacy_network=tuple(sorted(f"{c}/{g}" for c, g in by_legacy)),
        duplicates=dup)
