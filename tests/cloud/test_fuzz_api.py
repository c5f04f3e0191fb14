"""The cloud API fuzzed at the HTTP byte level: never a 5xx, always a JSON error, no writes.

``test_api``'s hostile-request test spoils one valid request at a time; this one throws
whole requests together from hostile parts: any method, paths with traversal, %-encoding,
raw UTF-8 or thousands of characters, lying or malformed Content-Length and chunked
framing, odd Content-Type and Authorization headers (sometimes a valid token, so the
checks behind authentication are reached too), and bodies of invalid JSON, deep nesting,
huge numbers, NUL and lone surrogates, delivered in arbitrary pieces. For every example:

* no response is a 5xx, and nothing is logged as a failure;
* every application response >= 400 is ``application/json`` with an ``error.code``;
  the only other refusal is Twisted's bare ``400 Bad Request`` for a request it can not
  even parse (HTTP framing), after which it closes the connection;
* unless a request succeeded (2xx: then it was not bad input), no table changed;
* no long poll is left parked after the client hangs up.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import strategies
from tests.cloud.test_api import (
    Connection,
    Harness,
    World,
    fuzz_world,  # noqa: F401 - the fixture
    split_response,
)

ROUTE_WORDS = ["v1", "login", "recover", "healthz", "conversations", "messages", "presence",
               "notifications", "ack", "members", "bob", "metrics", "..", ".", "%2e%2e",
               "%2E%2e%2f", "%2F",
               "..%2F..", "%00", "~", "v1;x", "login?"]


# ---------------------------------------------------------------- request parts

def targets(w: World) -> st.SearchStrategy[bytes]:
    """Request targets: route-like paths with junk, traversal, long, raw UTF-8, queries."""
    ids = st.sampled_from([str(w.cid), str(w.nid), str(w.alice)])
    segment = st.one_of(st.sampled_from(ROUTE_WORDS), strategies.path_segments(), ids)
    routed = st.lists(segment, min_size=0, max_size=6).map(lambda s: "/" + "/".join(s))
    known = st.sampled_from([
        "/v1/login", "/v1/recover", "/v1/healthz", "/v1/conversations",
        f"/v1/conversations/{w.cid}/messages",
        "/v1/presence", "/v1/notifications", f"/v1/notifications/{w.nid}/ack", "/metrics",
        f"/v1/conversations/{w.cid}/members", f"/v1/conversations/{w.cid}/members/bob",
        f"/v1/conversations/{w.cid}/members/%00", f"/v1/conversations/{w.cid}/members/%ff",
        "/v1/../v1/login", "/v1/./login", "//v1/login", "/v1/login/..", "/v1/%6cogin",
        f"/v1/conversations/{w.cid}/../{w.cid}/messages"])
    long = st.integers(1_000, 20_000).map(lambda n: "/v1/" + "a" * n)
    raw_utf8 = st.text(max_size=30).map(
        lambda s: "/v1/" + s.replace("\r", "").replace("\n", "").replace(" ", ""))
    # Half the paths name a route, so the checks behind routing are reached too.
    kinds = {"known": known, "routed": routed, "long": long, "raw UTF-8": raw_utf8}
    path = st.sampled_from(["known", "known", "known", "routed", "long", "raw UTF-8"]).flatmap(
        lambda kind: kinds[kind])
    query = st.one_of(
        st.just(""), st.text(max_size=40).map(lambda s: "?" + quote(s, safe="=&")),
        st.sampled_from(["?", "?&", "?timeout=0", "?timeout=1e9", "?after=-1&limit=99999",
                         f"?accounts={w.alice}", "?accounts=" + ",".join(["x"] * 200),
                         "?a=1&a=2", "?%ff=1", "?" + "a=1&" * 40]))
    return st.tuples(path, query).map(
        lambda t: (t[0] + t[1]).encode("utf-8", "surrogatepass"))


def bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are seldom valid: bad JSON, deep nesting, huge numbers, NUL, surrogates."""
    return st.one_of(
        st.just(b""), strategies.malformed_json(),
        strategies.json_values().map(lambda v: json.dumps(v).encode()),
        st.sampled_from([
            b"[" * 60_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000, b"1" * 50_000,
            b'{"handle": "alice", "password": "' + b"p" * 2000 + b'"}',
            b'{"handle": "al\\u0000ice", "password": "x"}',
            b'{"handle": "alice", "code": "ABCD-EFGH-JKMN", "new_password": "\\ud800xxxxxxxx"}',
            b'{"handle": "alice", "code": "WRONG", "new_password": "long enough 1"}',
            b'{"handle": "alice", "code": 1234, "new_password": "long enough 1"}',
            b'{"handle": "\\ud800", "password": "\\udfff"}',
            b'{"client_message_id": "c", "body": "\\ud83d"}',
            b'{"client_message_id": "c", "body": "nul\\u0000"}',
            b'{"status": "online", "ttl_s": 1e400}',
            b'{"members": ["bob", "\\u0000"]}', b'{"members": "bob"}', b'{"handle": ["bob"]}',
            b'{"members": [], "title": "t"}', b'{"handle": "\\ud800"}',
            b'{"status": "online", "ttl_s": 123456789012345678901234567890}',
            b"\x00" * 100, b"\xef\xbb\xbf{}", b"\xff\xfe\x00{\x00}"]),
        st.binary(max_size=300))


def headers(w: World) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Content-Type, Authorization (junk, foreign schemes, repeated, or the valid token)
    and application headers with odd values."""
    content_type = st.tuples(st.just(b"Content-Type"), st.one_of(
        st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data; boundary=x",
                         b"application/x-www-form-urlencoded", b"application/json; charset=latin-1",
                         b"", b"*/*"]), strategies.header_values()))
    token = w.token.encode()
    authorization = st.tuples(st.just(b"Authorization"), st.one_of(
        st.sampled_from([b"Bearer " + token, b"bearer " + token, b"Bearer  " + token + b" ",
                         b"Bearer", b"Bearer ", b"Basic YWxpY2U6cHc=", b"Bearer " + token[:-1],
                         b"Bearer " + token + b"x", b"Bearer \xff\xfe", b"Token " + token]),
        strategies.header_values()))
    return st.lists(st.one_of(content_type, authorization, strategies.extra_headers().map(
        lambda pairs: pairs[0] if pairs else (b"X-Empty", b""))), max_size=5)


@st.composite
def hostile_requests(draw, w: World) -> tuple[str, bytes]:
    """(how the body is framed, the raw bytes of one request, perhaps more after it)."""
    # Mostly the methods routes take, so the checks behind the method are reached too.
    usual = draw(st.integers(0, 9)) < 7
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]) if usual
                  else strategies.http_methods())
    target = draw(targets(w))
    body = draw(bodies())
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: test"]
    lines += [name + b": " + value for name, value in draw(headers(w))]
    framing = draw(st.sampled_from(["honest", "chunked", "bad chunk", "longer", "shorter",
                                    "huge", "not a number", "negative", "twice", "none"]))
    payload = body
    if framing == "honest":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "bad chunk":
        lines.append(b"Transfer-Encoding: chunked")
        payload = draw(st.sampled_from([b"zz\r\n", b"-1\r\n", b"ffffffffffffffffff\r\n",
                                        b"5\r\nab\r\n0\r\n\r\n", b"1;x=\xff\r\na\r\n"]))
    elif framing == "longer":  # the server waits for bytes that never come
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 10_000))))
    elif framing == "shorter":  # the rest of the body reads as the next request
        lines.append(b"Content-Length: %d" % draw(st.integers(0, max(0, len(body) - 1))))
    elif framing == "huge":
        lines.append(b"Content-Length: %d" % draw(st.sampled_from([1 << 20, 10**12, 2**64])))
    elif framing == "not a number":
        lines.append(b"Content-Length: " + draw(st.sampled_from([b"abc", b"1e3", b"0x10",
                                                                 b"", b"\xd9\xa5", b"1 2"])))
    elif framing == "negative":
        lines.append(b"Content-Length: -%d" % len(body))
    elif framing == "twice":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    else:
        payload = b""  # no body at all
    return framing, b"\r\n".join(lines) + b"\r\n\r\n" + payload


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every complete response in *data* (1xx interim responses skipped)."""
    out = []
    while (split := split_response(data)) is not None:
        response, data = split
        if response.status >= 200:
            out.append((response.status, response.headers, response.body))
    return out


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(data=st.data())
def test_hostile_http_never_gets_a_5xx_and_changes_nothing(fuzz_world, failures, data):  # noqa: F811
    """Any method, path, headers, framing and body, in any pieces: no 5xx, JSON errors
    (or Twisted's bare 400 for unparseable HTTP, closing the connection), no writes."""
    h, world = fuzz_world
    framing, request = data.draw(hostile_requests(world), label="request")
    sizes = data.draw(st.lists(st.integers(1, 4096), max_size=6), label="pieces")
    before = h.snapshot()
    c = Connection(h.site)
    for piece in strategies.pieces(request, sizes):
        if c.transport.disconnecting:
            break  # a real transport stops reading once the server closes
        c.send(piece)
    got = responses(c.transport.value())
    event(f"{framing}: " + ",".join(str(status) for status, _, _ in got))
    for status, fields, body in got:
        assert status < 500, (status, body[:300], request[:300])
        if "content-type" not in fields:
            assert status == 400 and body == b"" and c.transport.disconnecting, \
                (status, fields, request[:300])
        elif status >= 400:
            assert fields["content-type"] == "application/json", fields
            assert isinstance(json.loads(body)["error"]["code"], str)
    if all(status >= 300 for status, _, _ in got):
        assert h.snapshot() == before
    c.hang_up()
    assert h.channel.waiting() == 0
    assert failures == []


def test_a_body_over_the_default_limit_is_413_before_it_is_parsed(conn):
    """With the default 64 KiB limit, a 1 MiB body (declared or chunked) is 413 JSON."""
    from tests.cloud.test_api import make_harness

    h: Harness = make_harness(conn)
    h.account("alice")
    big = b'{"handle": "alice", "password": "' + b"p" * (1 << 20) + b'"}'
    for chunked in (False, True):
        r = h.request("POST", "/v1/login", body=big, chunked=chunked)
        assert (r.status, r.code) == (413, "payload_too_large")
        assert str(h.api.max_body_bytes) in r.json()["error"]["message"]
