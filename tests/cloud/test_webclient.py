"""The web client's files as the cloud API serves them (no browser: see
``test_webclient_browser.py`` for the page at work).

Served at ``/``, ``/app.js`` and ``/app.css`` with their content types and a policy that keeps
the page on its own origin; nothing in them names another host, every form field has a
label, and every API path the script calls is a route of the API.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources

import pytest

from cloud.webclient import CONTENT_SECURITY_POLICY
from tests.cloud.test_api import Connection, make_harness, parse_response, raw_request

FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/app.css": ("app.css", "text/css; charset=utf-8")}


def source(name: str) -> str:
    return resources.files("cloud.webclient").joinpath(name).read_text(encoding="utf-8")


def fetch(site, method: str, path: str):
    c = Connection(site)
    c.send(raw_request(method.encode(), path.encode()))
    return c.transport.value()


@pytest.fixture
def site(conn):
    return make_harness(conn).site


def test_files_are_served_with_their_content_types_and_policy(site):
    """GET /, /app.js and /app.css answer the package's files, typed, not sniffable, kept
    on their own origin by the Content-Security-Policy."""
    for path, (name, content_type) in FILES.items():
        r = parse_response(fetch(site, "GET", path))
        assert r is not None and r.status == 200, path
        assert r.headers["content-type"] == content_type
        assert r.body == source(name).encode()
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-cache"
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY


def test_head_gets_the_headers_without_the_body(site):
    """HEAD / answers like GET / but sends no body."""
    head, _, body = fetch(site, "HEAD", "/").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/html" in head and body == b""


def test_other_methods_and_paths_are_the_apis_json_errors(site):
    """POST / and unknown files are the API's JSON 404, as before the client existed."""
    for method, path in (("POST", "/"), ("DELETE", "/app.js"), ("GET", "/app.json"),
                         ("GET", "/index.html"), ("GET", "/v1")):
        r = parse_response(fetch(site, method, path))
        assert r.status == 404 and r.headers["content-type"] == "application/json", path
        assert r.json()["error"]["code"] == "not_found"


def test_no_file_names_another_host():
    """Nothing is fetched from elsewhere: no http(s):// URL, no protocol-relative URL, and
    every src and href in the page is on the page's own origin (or an inline data: URL)."""
    for name, _ in FILES.values():
        text = source(name)
        assert not re.search(r"https?://", text, re.IGNORECASE), name
        assert not re.search(r"""["'(]\s*//[^/\s]""", text), name
        assert "@import" not in text, name
    links = re.findall(r'\b(?:src|href)="([^"]*)"', source("index.html"))
    assert links and all(link.startswith(("/", "#", "data:")) and not link.startswith("//")
                         for link in links), links
    fetched = re.findall(r'api\("[A-Z]+", "([^"]*)"', source("app.js"))
    assert fetched and all(p.startswith("/v1/") for p in fetched), fetched


class _Fields(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, str | None]] = []
        self.labelled: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "select", "textarea"):
            self.fields.append(a)
        if tag == "label" and a.get("for"):
            self.labelled.add(a["for"])


def test_every_form_field_has_a_label_and_new_messages_are_announced():
    """Each input, select and textarea has a <label for>; the message list is an aria-live
    log; errors are role=alert."""
    parser = _Fields()
    html = source("index.html")
    parser.feed(html)
    assert len(parser.fields) >= 7
    for field in parser.fields:
        assert field.get("id") in parser.labelled, field
    assert re.search(r'<ol id="messages"[^>]*role="log"[^>]*aria-live="polite"', html)
    assert 'id="error" class="banner error" role="alert"' in html
    assert '<html lang="en">' in html and 'name="viewport"' in html


def test_every_api_path_the_script_calls_is_a_route(conn):
    """The script's API paths (their fixed part) are routes the API serves."""
    api = make_harness(conn).api
    templates = [r.template for r in api.routes]
    paths = set(re.findall(r'"(/v1/[a-z/]*)', source("app.js")))
    assert {"/v1/login", "/v1/token", "/v1/conversations", "/v1/notifications", "/v1/presence",
            "/v1/conversations/", "/v1/notifications/"} <= paths
    for path in paths:
        assert any(t == path or t.startswith(path) and path.endswith("/")
                   for t in templates), path
