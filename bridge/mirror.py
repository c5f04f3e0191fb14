"""legacy -> cloud, the one write path: translate legacy changes into cloud values, then write
them in one transaction. The feed followers and the gaps reconciler's repairs both use it.

    LegacyChanges --new_handles(known)--> ensure_accounts (a short transaction of its own)
         |                                      |  handle -> account id, into KnownIds
         +------------- translate(changes, known) --> MirrorPlan   (pure: no I/O)
                                                          |
                        commit_plan(conn, plan) ----------+--> CommitOutcome
                        lease check, conversations and their member changes, messages
                        with their notifications and the feed checkpoint, presence, gap
                        findings: one transaction

Accounts come first, apart: the batch's transaction is long (hundreds of messages), and
while it runs every other feed's batch that names one of the same new handles would wait on
its uncommitted account rows (at start-up, with every handle new, one feed's first commit
waited 626 ms). Committed apart, they are held for milliseconds; an account whose messages
then fail to commit is harmless, the replay finds it. Everything else the plan needs is
derived from the changes and the ids the store is known to have, so ``translate`` is pure
and ``commit_plan`` only writes, but for one read: membership is mirrored as changes
(issue 16), so a chat's new member list is compared, in the commit's transaction, with the
list committed before it (``conversations.legacy_members``, see
``cloud.store.conversations.apply_legacy_member_lists``).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import psycopg

from bridge import ids
from cloud.model import FeedCheckpoint, MirrorBatch, MirroredMessage, MirrorResult, Presence
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import coordination as coordination_store
from cloud.store import findings as findings_store
from cloud.store import mirror as mirror_store
from cloud.store import presence as presence_store
from legacy import wire

#: One member list a chat announced, and how it applies: ``CHANGE``, ``ECHO`` or
#: ``SNAPSHOT`` of ``cloud.store.conversations``.
MemberList = tuple[tuple[str, ...], str]

#: The fault points of the write path, in order; a fault hook may fail at any of them (the
#: crash tests kill the bridge there).
COMMIT_STEPS = ("accounts", "lease", "conversations", "messages", "presence", "gaps")

Step = Callable[[str], None]


def _no_step(_name: str) -> None:
    return None


@attrs.define
class KnownIds:
    """What the store is known to have, so steady-state batches skip re-creating it.

    Filled only after a commit succeeded (a rolled-back transaction teaches nothing), shared
    by all followers of a worker, read by transactions in the pool threads (lookups only).
    """

    accounts: dict[str, Any] = attrs.Factory(dict)   # handle -> account id
    #: chat id -> its last member list committed (its conversation exists)
    chats: dict[str, tuple[str, ...]] = attrs.Factory(dict)

    def learn(self, accounts: Mapping[str, Any], chats: Mapping[str, tuple[str, ...]]) -> None:
        self.accounts.update(accounts)
        self.chats.update(chats)


@attrs.frozen
class LegacyChanges:
    """What the legacy side changed, to be mirrored: one feed batch, or what a repair
    fetched. *checkpoint* (a feed's) commits with the data it covers."""

    #: chat id -> the member lists it announced, in order, each with how it applies: a
    #: feed's FeedChat is a ``CHANGE`` (a legacy client's) or an ``ECHO`` (the bridge's own
    #: injection); a repair's list read from the chat's home is a ``SNAPSHOT``
    chats: Mapping[str, tuple[MemberList, ...]] = attrs.field(factory=dict)
    messages: tuple[wire.ChatMessage, ...] = attrs.field(default=(), converter=tuple)
    presence: tuple[wire.FeedPresence, ...] = attrs.field(default=(), converter=tuple)
    presence_source: str = ""
    gaps: tuple[dict, ...] = attrs.field(default=(), converter=tuple)  # feed_gap details
    checkpoint: FeedCheckpoint | None = None

    def handles(self) -> set[str]:
        """Every legacy handle the changes name: chat members, senders, presence."""
        found: set[str] = set()
        for lists in self.chats.values():
            for members, _how in lists:
                found.update(members)
        found.update(msg.sender for msg in self.messages)
        found.update(p.handle for p in self.presence)
        return found


@attrs.frozen
class ConversationPlan:
    """A legacy chat as the cloud store gets it: its conversation, and the member lists it
    announced (applied as changes), or for a chat first seen through a message its sender."""

    chat_id: str
    conversation_id: uuid.UUID
    #: the member lists to apply, in feed order (``apply_legacy_member_lists``)
    lists: tuple[MemberList, ...]
    #: members added as they are: a chat first seen through a message gets its sender
    member_ids: tuple[uuid.UUID, ...] = ()

    @property
    def complete(self) -> bool:
        """False for a chat first seen through a message: its member list is not known yet
        (so ``KnownIds`` does not learn it)."""
        return bool(self.lists)

    @property
    def member_handles(self) -> tuple[str, ...]:
        """The last member list it announced."""
        return self.lists[-1][0] if self.lists else ()


@attrs.frozen
class Refusal:
    """Something the store can not hold, recorded as a ``mirror_refused`` finding instead
    of failing the batch forever."""

    detail: Mapping[str, Any]
    conversation_id: uuid.UUID


@attrs.frozen
class MirrorPlan:
    """Everything one commit writes, in cloud terms."""

    conversations: tuple[ConversationPlan, ...]
    refusals: tuple[Refusal, ...]
    batch: MirrorBatch
    presence: tuple[Presence, ...]
    gaps: tuple[dict, ...]


@attrs.frozen
class CommitOutcome:
    """What a commit wrote: the store's result for the messages, and the chats whose member
    lists it ensured (for ``KnownIds.learn`` once it has committed; a refused chat is tried
    again next time)."""

    result: MirrorResult
    chats: Mapping[str, tuple[str, ...]]
    #: memberships the chats' member lists added and removed
    members_added: int = 0
    members_removed: int = 0
    #: messages set aside as findings instead of written (a body the store can not hold)
    refused: tuple[Refusal, ...] = ()


def new_handles(changes: LegacyChanges, known: KnownIds) -> list[str]:
    """The handles of *changes* whose accounts the store is not known to have, sorted."""
    return sorted(h for h in changes.handles() if h not in known.accounts)


def ensure_accounts(conn: psycopg.Connection, handles: Iterable[str],
                    step: Step = _no_step) -> tuple[dict[str, uuid.UUID], int]:
    """Find or create the linked accounts of legacy *handles*, in a transaction of their
    own; ``(handle -> account id, how many were created)``."""
    step("accounts")
    return accounts_store.ensure_linked_accounts(conn, {h: ids.account_id(h) for h in handles})


def translate(changes: LegacyChanges, known: KnownIds) -> MirrorPlan:
    """The cloud values of *changes*; every handle they name must be in ``known.accounts``
    (``ensure_accounts`` first). Chats whose members *known* already has are left out."""
    accounts = known.accounts
    missing = [h for h in changes.handles() if h not in accounts]  # not a copy of all known
    if missing:
        raise ValueError(f"accounts not ensured for {sorted(missing)[:5]}")
    # Every list goes to the commit: whether it changes anything depends on the list
    # committed before it, which only the store knows for sure (another worker may have
    # followed this feed meanwhile).
    listed = tuple(ConversationPlan(chat_id, ids.conversation_id(chat_id),
                                    tuple((tuple(m), how) for m, how in lists))
                   for chat_id, lists in changes.chats.items() if lists)
    # A chat first seen through a message (its FeedChat fell into a gap): create it with the
    # sender; its other members arrive with the chat's next FeedChat.
    first_seen = {msg.chat_id: msg.sender for msg in changes.messages
                  if msg.chat_id not in changes.chats and msg.chat_id not in known.chats}
    conversations = listed + tuple(
        ConversationPlan(chat_id, ids.conversation_id(chat_id), (), (accounts[sender],))
        for chat_id, sender in first_seen.items())
    refusals: list[Refusal] = []
    mirrored: list[MirroredMessage] = []
    for msg in changes.messages:
        conversation_id = ids.conversation_id(msg.chat_id)
        if "\x00" in msg.body:
            # A body PostgreSQL can not hold (current supernodes refuse these): set aside.
            refusals.append(Refusal({"chat_id": msg.chat_id, "guid": msg.guid,
                                     "reason": "NUL character in the body"}, conversation_id))
        else:
            mirrored.append(MirroredMessage(
                conversation_id, ids.message_id(msg.guid), msg.guid, accounts[msg.sender],
                msg.sender, msg.ts_ms, msg.body, "legacy"))
    checkpoints = (changes.checkpoint,) if changes.checkpoint is not None else ()
    presence = tuple(Presence(accounts[p.handle], changes.presence_source, p.status,
                              p.version, p.expires_ms) for p in changes.presence)
    return MirrorPlan(conversations, tuple(refusals), MirrorBatch(tuple(mirrored), checkpoints),
                      presence, changes.gaps)


def commit_plan(conn: psycopg.Connection, plan: MirrorPlan, now_ms: int, *,
                lease: tuple[str, str] | None = None, fence: int = 0,
                step: Step = _no_step) -> CommitOutcome:
    """Write *plan* in the caller's one transaction; safe to run twice.

    With a *lease* ``(name, holder)`` it checks that the holder still has it under *fence*
    (``StaleFence`` otherwise: a worker whose lease was taken over commits nothing). A plan
    of messages only sends that check in one pipeline with its writes and judges it once
    the results are in, before anything else is decided; others check it first.
    """
    step("lease")
    first: Callable[[psycopg.Connection], coordination_store.Verdict] | None = None
    if lease is not None and not (plan.conversations or plan.refusals):
        # The usual commit, messages only: the check goes in one round trip with them
        # (``write_mirrored_batch``) and is judged before anything is decided; a stale
        # holder's writes roll back with the transaction.
        first = functools.partial(coordination_store.send_lease_check, name=lease[0],
                                  holder=lease[1], fence=fence)
    elif lease is not None:
        coordination_store.check_lease(conn, lease[0], lease[1], fence)
    step("conversations")
    refused = conversations_store.ensure_legacy_conversations(conn, {
        c.chat_id: (c.conversation_id, list(c.member_ids)) for c in plan.conversations})
    by_conversation = {c.conversation_id: c.chat_id for c in plan.conversations}
    applied = conversations_store.apply_legacy_member_lists(conn, {
        c.conversation_id: c.lists for c in plan.conversations if c.lists}, now_ms,
        lock_also={m.conversation_id for m in plan.batch.messages})
    refused.update({by_conversation[cid]: reason for cid, reason in applied.refused.items()})
    for chat_id, reason in sorted(refused.items()):
        # A legacy chat holds at most as many members as a conversation, but members added
        # on the cloud meanwhile may leave no room for the ones legacy adds: record it for
        # the operator instead of failing the batch forever.
        findings_store.record_finding(conn, "mirror_refused",
                                      {"chat_id": chat_id, "reason": reason}, now_ms,
                                      conversation_id=ids.conversation_id(chat_id))
    step("messages")
    for refusal in plan.refusals:
        findings_store.record_finding(conn, "mirror_refused", dict(refusal.detail), now_ms,
                                      conversation_id=refusal.conversation_id)

    def presence(c: psycopg.Connection) -> None:
        step("presence")
        presence_store.set_presences(c, plan.presence)

    result = mirror_store.write_mirrored_batch(conn, plan.batch, now_ms, first=first,
                                               then=presence)
    step("gaps")
    for gap in plan.gaps:
        # no conversation can be named (the lost entries are unknown): the finding concerns
        # everything homed at its supernode, which the gates find through detail["ring"]
        findings_store.record_finding(conn, "feed_gap", gap, now_ms, source=gap.get("source"))
    ensured = {c.chat_id: c.member_handles for c in plan.conversations
               if c.complete and c.chat_id not in refused}
    return CommitOutcome(result, ensured, applied.added, applied.removed, plan.refusals)


def mirror_changes(conn: psycopg.Connection, changes: LegacyChanges, now_ms: int, *,
                   known: KnownIds | None = None, step: Step = _no_step) -> CommitOutcome:
    """Accounts, translation and commit in the caller's one transaction: for a repair (and
    tests), where one short transaction is simplest. *known* is read, never taught (the
    transaction may still roll back)."""
    known = known if known is not None else KnownIds()
    handles = new_handles(changes, known)
    found, _created = ensure_accounts(conn, handles, step) if handles else ({}, 0)
    accounts = {**{h: known.accounts[h] for h in changes.handles() if h in known.accounts},
                **found}
    plan = translate(changes, KnownIds(accounts, known.chats))
    return commit_plan(conn, plan, now_ms, step=step)
