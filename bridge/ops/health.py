"""The bridge's operations endpoint: ``/metrics``, ``/healthz``, ``/readyz`` (127.0.0.1),
and, when given a status page, ``/status`` and ``/status.json`` (``bridge.ops.statuspage``).

``/healthz`` says the process is alive and serving. ``/readyz`` says it is doing its job:
200 when the store answered the last heartbeat and at least one supernode feed streams,
503 with the reasons otherwise (a load balancer or an operator's probe acts on it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from twisted.web import resource, server

if TYPE_CHECKING:
    from bridge.ops.statuspage import StatusPage


def _json(request: server.Request, status: int, payload: dict) -> bytes:
    body = json.dumps(payload, sort_keys=True).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    return body


class OperationsResource(resource.Resource):
    """Serves its paths itself; anything else is a JSON 404, any other method 405."""

    isLeaf = True

    def __init__(self, readiness: Callable[[], list[str]],
                 status_page: StatusPage | None = None) -> None:
        """*readiness* returns the reasons the process is not ready (empty: ready);
        *status_page*, when given, serves ``/status`` and ``/status.json``."""
        super().__init__()
        self._readiness = readiness
        self._status_page = status_page
        self._paths = (b"/metrics", b"/healthz", b"/readyz") + (
            (b"/status", b"/status.json") if status_page is not None else ())

    def render(self, request: server.Request) -> bytes:
        path = request.path
        if path not in self._paths:
            paths = ", ".join(p.decode() for p in self._paths)
            return _json(request, 404, {"error": {"code": "not_found",
                                                  "message": f"try {paths}"}})
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _json(request, 405, {"error": {"code": "method_not_allowed",
                                                  "message": "only GET and HEAD"}})
        if path == b"/metrics":
            body = generate_latest(REGISTRY)
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
            request.setHeader(b"Content-Length", str(len(body)).encode())
            return body
        if path == b"/healthz":
            return _json(request, 200, {"ok": True})
        if self._status_page is not None and path == b"/status":
            return self._status_page.render_html(request)
        if self._status_page is not None and path == b"/status.json":
            return _json(request, 200, self._status_page.payload())
        reasons = self._readiness()
        return _json(request, 503 if reasons else 200, {"ready": not reasons,
                                                        "reasons": reasons})


def operations_site(readiness: Callable[[], list[str]], clock: object,
                    status_page: StatusPage | None = None) -> server.Site:
    """The operations endpoint as a Site on *clock* (the status page only when given)."""
    # No POST form parsing: nothing here reads a body, and Twisted's parser raises on some
    # Content-Type values (found by tests/bridge/test_fuzz_operations.py).
    site = server.Site(OperationsResource(readiness, status_page), reactor=clock,
                       parsePOSTFormSubmission=False)
    site.noisy = False
    return site
