"""What a supernode holds in memory, and the checks its roles share on what arrives.

Everything here is lost when the node crashes: ``Memory`` is made anew on every start, with
a new epoch, and every role (routing, presence hub, client sessions, peer API) reads and
writes its own part of it.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

import attrs

from legacy import wire
from legacy.digest_tree import ChatDigestTree
from legacy.feed import Feed

if TYPE_CHECKING:
    from legacy.supernode.link import Link
    from legacy.supernode.protocol import FeedSubscription, SupernodeProtocol

PRESENCE_STATUSES = ("online", "away", "busy", "offline")


@attrs.define
class ChatState:
    members: tuple
    next_seq: int = 1
    history: dict = attrs.Factory(dict)  # guid -> ChatMessage, in legacy_seq order
    #: handles a privileged peer removed (and has not added back): a legacy client's list
    #: does not bring them back (it may predate the removal)
    removed: set = attrs.Factory(set)
    #: the history's range digests, kept with it (``add``, ``drop``): a DigestRequest reads
    #: this instead of hashing the whole history
    digests: ChatDigestTree = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.digests = ChatDigestTree.of(self.history)

    def add(self, msg: wire.ChatMessage) -> None:
        """Append a message whose GUID the chat does not hold."""
        self.history[msg.guid] = msg
        self.digests.add(msg)

    def drop(self, guid: str) -> None:
        """Forget a message (retention), from the history and its digests."""
        self.digests.remove(self.history[guid])  # while the tree can still look it up
        del self.history[guid]


@attrs.define
class PresenceEntry:
    status: str
    version: int
    expires_ms: int


class Memory:
    """Everything a supernode forgets when it crashes."""

    def __init__(self, epoch: int, feed_capacity: int) -> None:
        self.epoch = epoch
        self.feed = Feed(epoch, feed_capacity)
        self.chats: dict[str, ChatState] = {}
        self.held: dict[str, dict[str, wire.ChatMessage]] = {}
        # index owner role
        self.index: dict[str, dict[str, tuple[int, int]]] = {}  # handle -> sn -> (exp, ver)
        self.held_notes: dict[str, dict[str, None]] = {}
        self.hub: dict[str, PresenceEntry] = {}  # merged presence, what subscribers see
        #: (expires_ms, handle) of every live entry put in ``hub``, a heap: the sweep pops
        #: what expired instead of reading every entry (a stale pair is skipped)
        self.hub_expiry: list[tuple[int, str]] = []
        #: the expiry last fanned out per handle (a refresh is fanned out only near it)
        self.hub_fanned: dict[str, int] = {}
        self.hub_sources: dict[str, dict[str, PresenceEntry]] = {}
        self.hub_subscribers: dict[str, dict[str, None]] = {}
        #: subscriber SN -> handles whose state it is owed at the end of this moment
        self.fanout_owed: dict[str, dict[str, None]] = {}
        # local users
        self.sessions: dict[str, dict[str, SupernodeProtocol]] = {}
        self.local_status: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        # presence seen by local subscribers
        self.watchers: dict[str, dict[str, None]] = defaultdict(dict)
        self.seen: dict[str, PresenceEntry] = {}
        #: (expires_ms, handle) of every live entry put in ``seen``, a heap (as ``hub_expiry``)
        self.seen_expiry: list[tuple[int, str]] = []
        self.feed_subs: list[FeedSubscription] = []
        self.links: dict[str, Link] = {}
        # the offline-message service (offline.py): requests waiting (device, when asked),
        # when the next answer may go, and the call that sends it
        self.offline_queue: deque[tuple[SupernodeProtocol, float]] = deque()
        self.offline_free_at = 0.0
        self.offline_timer: Any = None


#: C0 controls, DEL and C1 controls
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def has_control(*ids: str) -> bool:
    """Ids are hashed joined by U+001F (docs/digest.md), so no control characters in them.
    (One regular-expression search per id: a character-by-character test in Python cost
    about 5 µs for every injected message.)"""
    search = _CONTROL.search
    return any(search(s) for s in ids)
