"""The cloud API's HTTP/1.1 connection: twisted.web's ``HTTPChannel``, writing each response
in one ``send`` as soon as it is complete.

twisted.web writes a response's head and body as two buffered writes; the transport then
registers for writability (an ``epoll_ctl``), sends on the next reactor pass and
unregisters (another). For the API's small JSON answers that bookkeeping cost about as
much as the ``send`` itself. Here the head is held until the body (or the end of the
request) arrives, and the whole answer goes to the socket at once when nothing is queued
before it; whatever the socket does not take is queued by the transport as usual, so
ordering and back-pressure stay the transport's. Anything but a plain TCP connection (a
test's ``StringTransport``, TLS) takes twisted.web's own path.

It also remembers the connection's local address: twisted.web asks for it (a
``getsockname`` call) for every request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.web import http
from twisted.web.http_headers import Headers


class ResponseChannel(http.HTTPChannel):
    """``HTTPChannel`` that sends a response's head and body together, at once."""

    _head: bytes | None = None
    _host: Any = None

    def getHost(self) -> Any:  # noqa: N802 - Twisted's name
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes,  # noqa: N802
                     headers: Any) -> None:
        if not isinstance(headers, Headers) or not isinstance(self.transport, tcp.Connection):
            self._flush_head()
            super().writeHeaders(version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts.extend((name, b": ", value, b"\r\n"))
        parts.append(b"\r\n")
        self._head = b"".join(parts)

    def write(self, data: bytes) -> None:
        head, self._head = self._head, None
        self._send(head + data if head is not None else data)

    def writeSequence(self, iovec: list[bytes]) -> None:  # noqa: N802 - Twisted's name
        self.write(b"".join(iovec))

    def requestDone(self, request: Any) -> None:  # noqa: N802 - Twisted's name
        self._flush_head()  # a response without a body (HEAD, or empty)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self._head = None
        super().connectionLost(reason)

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._send(head)

    def _send(self, data: bytes) -> None:
        if not data:
            return
        t = self.transport
        # Send now only if nothing is queued before it (the transport's buffers are empty)
        # and the connection is open; otherwise, and for what the socket does not take,
        # queue it in the transport.
        if (isinstance(t, tcp.Connection) and t.connected and not t.disconnecting
                and not t.dataBuffer and not t._tempDataBuffer):
            sent = t.writeSomeData(data)
            if isinstance(sent, int):
                data = data[sent:]
        if data:
            t.write(data)
