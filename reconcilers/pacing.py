"""``--max-rate N``: the reconcilers' requests to the legacy network, at most N a second.

``PacedLinks`` wraps the supernode links a reconciler is given (``bridge.discovery.
SupernodeLinks``, or any object with ``ring``, ``directory``, ``peer`` and ``for_chat``) and
hands out peers whose every request waits for its slot on one ``servicekit.pacing.Pacer``
first: digests above all, and the GUID lists, fetches, chat listings and injections the
pass also sends. One pacer serves every supernode, so the cap is on what the run sends to
the legacy network as a whole; requests start ``1 / N`` seconds apart on the injected
clock, never in a burst. Connecting to a supernode (its handshake) is not paced.

A wait for a slot is cut off by the run's deadline like any other wait
(``reconcilers.runner``): the run still ends on time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from servicekit.pacing import Pacer

#: The peer requests a reconciler sends (``legacy.peer.PeerConnection``): each is paced.
PACED_REQUESTS = frozenset({"digests", "list_guids", "fetch", "chats", "accounts",
                            "inject_message", "inject_membership", "inject_presence"})


class PacedPeer:
    """A supernode peer whose requests wait for the pacer; the rest passes through."""

    def __init__(self, peer: Any, pacer: Pacer) -> None:
        self._peer, self._pacer = peer, pacer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._peer, name)
        if name not in PACED_REQUESTS:
            return attr

        async def paced(*args: Any, **kwargs: Any) -> Any:
            # Bounded: the slot is at most (requests queued ahead) / rate away, and the
            # run's deadline cancels this wait like any other (runner.run_one; tested by
            # a very low rate ending at the deadline with the lock released).
            await self._pacer.wait()
            return await attr(*args, **kwargs)

        return paced


class PacedLinks:
    """Supernode links whose peers are paced to at most *rate* requests a second."""

    def __init__(self, links: Any, clock: IReactorTime, rate: float) -> None:
        self._links = links
        self.pacer = Pacer(clock, rate)

    @property
    def ring(self) -> Any:
        return self._links.ring

    @property
    def directory(self) -> dict:
        return self._links.directory

    async def peer(self, sn_id: str) -> PacedPeer:
        return PacedPeer(await self._links.peer(sn_id), self.pacer)

    async def for_chat(self, chat_id: str) -> PacedPeer:
        return PacedPeer(await self._links.for_chat(chat_id), self.pacer)

    def close(self) -> Any:
        return self._links.close()
