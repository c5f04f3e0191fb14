"""The bridge's operations endpoint: ``/metrics``, ``/healthz``, ``/readyz`` (127.0.0.1).

``/healthz`` says the process is alive and serving. ``/readyz`` says it is doing its job:
200 when the store answered the last heartbeat and at least one supernode feed streams,
503 with the reasons otherwise (a load balancer or an operator's probe acts on it).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from twisted.web import resource, server


def _json(request: server.Request, status: int, payload: dict) -> bytes:
    body = json.dumps(payload, sort_keys=True).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    return body


class OperationsResource(resource.Resource):
    """Serves the three paths itself; anything else is a JSON 404, any other method 405."""

    isLeaf = True

    def __init__(self, readiness: Callable[[], list[str]]) -> None:
        """*readiness* returns the reasons the process is not ready (empty: ready)."""
        super().__init__()
        self._readiness = readiness

    def render(self, request: server.Request) -> bytes:
        path = request.path
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            return _json(request, 404, {"error": {"code": "not_found",
                                                  "message": "try /metrics, /healthz, /readyz"}})
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
        reasons = self._readiness()
        return _json(request, 503 if reasons else 200, {"ready": not reasons,
                                                        "reasons": reasons})


def operations_site(readiness: Callable[[], list[str]], clock: object) -> server.Site:
    site = server.Site(OperationsResource(readiness), reactor=clock)
    site.noisy = False
    return site
