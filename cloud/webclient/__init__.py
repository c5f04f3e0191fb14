"""The web client for cloud users: three plain files served by the cloud API at ``/``.

    GET /          index.html   the page (login form, conversations, messages, members)
    GET /app.js    app.js       everything it does, through the JSON API under /v1
    GET /app.css   app.css      its looks, a single column on a narrow screen

No build step and nothing fetched from elsewhere: the files ship in this package and the
page's Content-Security-Policy lets it load and call only its own origin. Live updates use
the notification long poll (``GET /v1/notifications``), the same channel simulated devices
use: a notification names a conversation and a seq, the page syncs that conversation from
its cursor and then acknowledges the notification. The page renews its token before it
expires (``POST /v1/token``) and pages back through older history (``?before=``).
"""

from __future__ import annotations

from importlib import resources

import attrs
from twisted.web import server

#: Only the page's own files run and it talks only to its own origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@attrs.frozen
class StaticFile:
    """One file of the client, read once at start-up."""

    body: bytes
    content_type: bytes


def _file(name: str, content_type: str) -> StaticFile:
    body = resources.files("cloud.webclient").joinpath(name).read_bytes()
    return StaticFile(body, content_type.encode("ascii"))


class WebClient:
    """The client's files by path; ``render`` answers GET and HEAD for them."""

    def __init__(self) -> None:
        self.files: dict[bytes, StaticFile] = {
            b"/": _file("index.html", "text/html; charset=utf-8"),
            b"/app.js": _file("app.js", "text/javascript; charset=utf-8"),
            b"/app.css": _file("app.css", "text/css; charset=utf-8"),
        }

    def render(self, request: server.Request) -> bytes | None:
        """The file's body with its headers set, or None when *request* is not for one
        (another path, or a method other than GET and HEAD: the API answers those)."""
        found = self.files.get(request.path)
        if found is None or request.method not in (b"GET", b"HEAD"):
            return None
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", found.content_type)
        request.setHeader(b"Content-Length", str(len(found.body)).encode("ascii"))
        # revalidated on every load, so an upgraded server never runs with a stale script
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return found.body
