"""The bridge's operations endpoint fuzzed over HTTP bytes: ``/metrics``, ``/healthz``,
``/readyz``, ``/status`` and ``/status.json`` with any method, path, query and headers.

The site is the one ``bridgectl bridge run`` serves (``operations_site``) with a status page
over a sampler that has history, on a ``Clock``; the worker is ready, so a 5xx can only be a
failure to cope with the request. Every example: no 5xx, nothing logged as a failure; a 404
or 405 is JSON; Twisted's bare 400 (unparseable HTTP) closes the connection.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from bridge.ops.health import operations_site
from tests import strategies
from tests.bridge.ops.test_statuspage import sampled_page, snapshot, worker
from tests.cloud.test_fuzz_api import responses

SERVED = ["/metrics", "/healthz", "/readyz", "/status", "/status.json"]
NEAR = ["/", "/status/", "/status.json/", "/../status", "/%73tatus", "//status", "/STATUS",
        "/status.json%00", "/favicon.ico", "/status.html", "/metrics/", "/./healthz"]


@pytest.fixture(scope="module")
def site():
    clock, sampler, page = sampled_page(
        snapshot(10**12, [worker(heartbeat=10**12 - 500, now=10**12, to_cloud=7)], pending=2,
                 findings={"gap": 1}))
    return operations_site(lambda: [], clock, page)


@st.composite
def requests(draw) -> bytes:
    usual = draw(st.integers(0, 9)) < 6
    method = draw(st.sampled_from([b"GET", b"GET", b"GET", b"HEAD", b"POST"]) if usual
                  else strategies.http_methods())
    kind = draw(st.integers(0, 9))
    path = draw(st.sampled_from(SERVED) if kind < 4 else st.sampled_from(NEAR) if kind < 7
                else st.one_of(
        st.lists(strategies.path_segments(), max_size=4).map(lambda s: "/" + "/".join(s)),
        st.integers(1_000, 20_000).map(lambda n: "/" + "s" * n),
        st.text(max_size=20).map(lambda s: "/" + s.replace("\r", "").replace("\n", ""))))
    query = draw(st.one_of(st.just(""), st.text(max_size=60).map(
        lambda s: "?" + quote(s, safe="=&")), st.sampled_from(["?", "?a=1&a=2", "?%ff",
                                                               "?" + "x" * 5000])))
    lines = [method + b" " + (path + query).encode("utf-8", "surrogatepass") + b" HTTP/1.1",
             b"Host: test"]
    lines += [name + b": " + value for name, value in draw(strategies.extra_headers())]
    body = draw(st.binary(max_size=200))
    if body or draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests(), sizes=st.lists(st.integers(1, 4096), max_size=4))
def test_operations_endpoint_never_fails_on_hostile_requests(site, failures, request, sizes):
    """Any method, path, query and headers, in any pieces: no 5xx; errors are JSON."""
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = site.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    for piece in strategies.pieces(request, sizes):
        if transport.disconnecting:
            break  # a real transport stops reading once the server closes
        protocol.dataReceived(piece)
    head_request = request.startswith(b"HEAD ")
    got = [] if head_request else responses(transport.value())
    if head_request:  # a HEAD answer has headers only: check the status line
        status_line = transport.value().split(b"\r\n", 1)[0]
        if status_line:
            assert int(status_line.split()[1]) < 500, status_line
    for status, fields, body in got:
        event(str(status))
        assert status < 500, (status, body[:300], request[:300])
        if "content-type" not in fields:
            assert status == 400 and body == b"" and transport.disconnecting
        elif status in (404, 405):
            assert fields["content-type"] == "application/json"
            assert isinstance(json.loads(body)["error"]["code"], str)
    assert failures == []
