"""The end of a whole-migration simulation: did the stacks converge, and what did the run
leave behind (``drills.simulation``).

``verdict`` checks the invariants from both stacks' own records through
``drills.convergence`` (written without the reconcilers' code): the supernodes' histories,
the store's messages, what each stack acknowledged to its senders. Past the legacy
retention (30 days, less a margin) the legacy network has dropped its history by design,
so messages older than that are checked on the cloud side only; so are the chats whose
members have all left legacy (cloud-only): legacy owes them nothing any more.

``outcome_hash`` is what makes a run replayable: the same seed gives the same hash of the
final stores' contents and the legacy event trace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import psycopg

from bridge import ids
from cloud.model import LEGACY_CLIENT_PHASES
from drills import convergence
from legacy.sim import LegacyDeployment

#: Messages sent longer ago than the legacy retention less this margin are compared on the
#: cloud side only.
RETENTION_MARGIN_MS = 86_400_000

#: The store's contents an outcome hash covers, each in a total order, without the moments
#: PostgreSQL stamps by itself.
_HASHED = (
    "SELECT conversation_id, seq, message_id, origin, legacy_guid, sender_handle, body, "
    "sent_ms FROM messages ORDER BY conversation_id, seq",
    "SELECT conversation_id, account_id FROM members ORDER BY 1, 2",
    "SELECT handle, phase FROM accounts ORDER BY handle",
    "SELECT account_id, notification_id, state, attempts FROM notifications ORDER BY 1, 2",
    "SELECT kind, state, conversation_id::text, account_id::text, created_ms "
    "FROM reconcile_findings ORDER BY 1, 2, 3, 4, 5",
    "SELECT conversation_id, seq, state FROM outbox_to_legacy ORDER BY 1, 2, 3",
)


def legacy_inventory(legacy: LegacyDeployment) -> dict[str, list[str]]:
    """chat id -> the GUIDs its home supernode holds (read in process: the simulation owns
    the network)."""
    out: dict[str, list[str]] = {}
    for chat in legacy.chats:
        home = legacy.supernodes[legacy.ring.home_of(chat.chat_id)]
        out[chat.chat_id] = [m.guid for m in home.history(chat.chat_id)]
    return out


def verdict(conn: psycopg.Connection, legacy: LegacyDeployment,
            posted: Mapping[str, tuple[str, int]], now_ms: int,
            retention_ms: int, inventory: Mapping[str, list[str]] | None = None
            ) -> convergence.Verdict:
    """The convergence check at *now_ms*; *posted* is every cloud post the store accepted
    (client message id -> (conversation, seq)); *inventory*: ``legacy_inventory`` read
    already (else it is read here)."""
    chat_ids = [c.chat_id for c in legacy.chats]
    not_owed = convergence.cloud_not_owed_to_legacy(conn)
    cloud = convergence.cloud_inventory(conn, chat_ids, not_owed)
    held = {chat: list(guids) for chat, guids in
            (legacy_inventory(legacy) if inventory is None else inventory).items()}
    floor_ms = now_ms - retention_ms + RETENTION_MARGIN_MS
    for chat, guid in conn.execute(
            "SELECT l.legacy_chat_id, coalesce(m.legacy_guid, %s || m.message_id::text) "
            "FROM messages m JOIN conversation_legacy_ids l USING (conversation_id) "
            "WHERE m.sent_ms < %s", (ids.CLOUD_PREFIX, floor_ms)):
        guids = held.setdefault(chat, [])
        if guid not in guids:  # aged out of the legacy retention: not legacy's to hold
            guids.append(guid)
    # A chat none of whose members has legacy clients any more is owed nothing by legacy
    # (invariant 1: "wherever a participant still uses legacy clients"): what its home
    # forgot in a crash after they all left stays forgotten, and nobody reads it there.
    for chat in _left_legacy(conn):
        guids = held.setdefault(chat, [])
        have = set(guids)
        guids.extend(g for g in cloud.get(chat, ()) if g not in have)
    return convergence.judge(
        held, cloud, legacy_record=legacy.record(),
        cloud_posts_missing=convergence.cloud_posts_missing(conn, posted),
        acked_cloud=len(posted), cloud_duplicates=convergence.cloud_duplicates(conn))


def _left_legacy(conn: psycopg.Connection) -> list[str]:
    """Legacy chat ids whose members are all in phases without legacy clients."""
    return [chat for (chat,) in conn.execute(
        "SELECT l.legacy_chat_id FROM conversation_legacy_ids l "
        "WHERE NOT EXISTS (SELECT 1 FROM members mb JOIN accounts a USING (account_id) "
        "                  WHERE mb.conversation_id = l.conversation_id "
        "                  AND a.phase = ANY(%s))", (list(LEGACY_CLIENT_PHASES),))]


def store_summary(conn: psycopg.Connection) -> dict[str, Any]:
    """Notifications by outcome and findings by kind and state."""
    states = dict(conn.execute(
        "SELECT state, count(*) FROM notifications GROUP BY state").fetchall())
    findings: dict[str, dict[str, int]] = {}
    for kind, state, n in conn.execute(
            "SELECT kind, state, count(*) FROM reconcile_findings GROUP BY kind, state "
            "ORDER BY kind, state"):
        findings.setdefault(kind, {})[state] = int(n)
    return {
        "notifications_owed": int(sum(states.values())),
        "notifications_acked": int(states.get("acked", 0)),
        "notifications_failed": int(states.get("failed", 0)),
        "notifications_pending": int(states.get("pending", 0) + states.get("sent", 0)),
        "findings": findings,
    }


def outcome_hash(conn: psycopg.Connection, legacy: LegacyDeployment) -> str:
    """sha256 of the final stores' contents and of the legacy network's event trace."""
    h = hashlib.sha256(legacy.trace.hexdigest().encode())
    for query in _HASHED:
        h.update(query.encode())
        for row in conn.execute(query):
            h.update(repr(row).encode())
    for chat in legacy.chats:
        home = legacy.supernodes[legacy.ring.home_of(chat.chat_id)]
        for m in home.history(chat.chat_id):
            h.update(f"{chat.chat_id}|{m.guid}|{m.legacy_seq}|{m.sender}\n".encode())
    return h.hexdigest()
