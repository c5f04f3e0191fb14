"""Links from a command to the legacy network as a privileged peer."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from bridgectl.errors import RuntimeFailure


def connect_login_server(reactor: Any, address: tuple[str, int], secret: bytes, *,
                         name: str = "bridgectl") -> defer.Deferred:
    """A privileged peer link to the legacy login server (a Deferred); a refusal or an
    unreachable server fails it with one ``RuntimeFailure`` line."""
    from legacy.network import TCPNetwork
    from legacy.peer import PeerRefused, connect_peer

    host, port = address

    def failed(f: Any) -> None:
        why = (f"it refused bridgectl ({f.value.reason})" if f.check(PeerRefused)
               else str(f.value).strip() or type(f.value).__name__)
        raise RuntimeFailure(f"cannot connect to the legacy login server at {host}:{port}: "
                             f"{why}")

    return connect_peer(TCPNetwork(reactor), host, port, name=name,
                        secret=secret).addErrback(failed)
