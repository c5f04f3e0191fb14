"""Cloud -> legacy membership changes: how the outbox injector applies a ``members`` row.

A member added or removed on the cloud is queued in ``outbox_to_legacy`` as a row of kind
``members`` (``cloud.store.conversations.add_member`` / ``remove_member``), in order with the
conversation's messages. The injector (``bridge.outbox``) claims it like a message and, where
it would inject a message, sends the chat's home an InjectMembership of the row's delta
(``inject_membership_change``); the home applies it and announces the new list on its feed
with the bridge's origin mark, which the follower remembers as the chat's list without
mirroring it back (``cloud.store.conversations.ECHO``).
"""

from __future__ import annotations

from twisted.internet import defer

from cloud.store.outbox import OutboxItem
from legacy.peer import PeerConnection

#: The origin mark of what the injector puts into the legacy network.
ORIGIN = "cloud"
#: The Ack statuses of an applied membership change: each means done.
MEMBERSHIP_APPLIED = ("changed", "unchanged", "no_chat")


def inject_membership_change(peer: PeerConnection, item: OutboxItem,
                             chat_id: str) -> defer.Deferred:
    """A ``members`` outbox row as the legacy request that applies it: InjectMembership of
    its delta to the chat's home (an Ack with a status of ``MEMBERSHIP_APPLIED``). Applying
    it twice changes nothing the second time."""
    return peer.inject_membership(chat_id, item.add_handles, item.remove_handles, ORIGIN)
