"""Finding the supernodes, and privileged links to them on demand.

The login server's host cache is a sample; any supernode's is the full directory. So:
login server -> sample -> the first supernode that answers -> everything.
"""

from __future__ import annotations

from typing import Any

from legacy import wire
from legacy.network import Network
from legacy.peer import PeerConnection, connect_peer
from legacy.ring import HashRing


async def ask_host_cache(network: Network, host: str, port: int, *, name: str, secret: bytes,
                         timeout: float) -> list[wire.SupernodeAddress]:
    peer = await connect_peer(network, host, port, name=name, secret=secret, timeout=timeout)
    try:
        return list(await peer.host_cache())
    finally:
        peer.disconnect()


async def discover(network: Network, host: str, port: int, *, name: str, secret: bytes,
                   timeout: float = 5.0) -> list[wire.SupernodeAddress]:
    """Every supernode, starting from the login server at *host*:*port*."""
    sample = await ask_host_cache(network, host, port, name=name, secret=secret,
                                  timeout=timeout)
    for addr in sample:
        try:
            return await ask_host_cache(network, addr.host, addr.port, name=name,
                                        secret=secret, timeout=timeout)
        except Exception:
            continue
    raise ConnectionError("no supernode of the host cache answered")


class SupernodeLinks:
    """One privileged connection per supernode, opened on first use and reopened when lost
    (for tools such as the reconcilers; the bridge worker keeps its own, one per feed)."""

    def __init__(self, network: Network, directory: list[wire.SupernodeAddress], *,
                 name: str, secret: bytes, timeout: float = 5.0) -> None:
        self.network, self.name, self._secret, self.timeout = network, name, secret, timeout
        self.directory = {a.sn_id: a for a in directory}
        self.ring = HashRing(sorted(self.directory))
        self._peers: dict[str, PeerConnection] = {}

    async def peer(self, sn_id: str) -> PeerConnection:
        current = self._peers.get(sn_id)
        if current is not None and current.transport is not None and not current.closed.called:
            return current
        addr = self.directory[sn_id]
        peer = await connect_peer(self.network, addr.host, addr.port, name=self.name,
                                  secret=self._secret, timeout=self.timeout)
        self._peers[sn_id] = peer
        return peer

    async def for_chat(self, chat_id: str) -> PeerConnection:
        return await self.peer(self.ring.home_of(chat_id))

    def close(self) -> Any:
        for peer in self._peers.values():
            peer.disconnect()
        self._peers.clear()
