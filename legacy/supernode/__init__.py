"""A supernode: the legacy network's server, for clients, other supernodes and privileged peers.

One port, three roles (``protocol.py``); one node, one object per role::

    node.py      Supernode: the Service, its config and memory, crash and restart, send_to
    state.py     what a node forgets when it crashes (Memory, ChatState, PresenceEntry)
    routing.py   home role (legacy_seq, history, holds) and index-owner role, delivery
    presence.py  PresenceHub: publish, merge at the hub, fan out, sweep what expired
    clients.py   ClientSessions: devices attached here, Send / SetPresence / Subscribe
    peer_api.py  PeerApi: the privileged peers' requests, one handler per frame type
    protocol.py  SupernodeProtocol (inbound, by role) and a peer's FeedSubscription
    link.py      Link: the outbound supernode-to-supernode link, a state machine

Routing's module docstring draws a message's path; presence's draws presence's.
"""

from legacy.auth import Secrets
from legacy.supernode.node import Supernode, SupernodeConfig
from legacy.supernode.peer_api import FETCH_BUDGET, LIST_LIMIT
from legacy.supernode.protocol import SupernodeProtocol
from legacy.supernode.state import PRESENCE_STATUSES, ChatState, PresenceEntry

__all__ = ["FETCH_BUDGET", "LIST_LIMIT", "PRESENCE_STATUSES", "ChatState", "PresenceEntry",
           "Secrets", "Supernode", "SupernodeConfig", "SupernodeProtocol"]
