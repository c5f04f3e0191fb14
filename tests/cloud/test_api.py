"""The cloud API over real HTTP/1.1 bytes, against a real PostgreSQL store.

Each request goes through Twisted's HTTP server (``Site`` -> ``HTTPChannel``) on a
``StringTransport``. ``InlineDatabase`` completes every store call at once, so a response is
complete right after ``dataReceived``; long polls finish when the ``Clock`` advances or the
channel delivers. No real sleeps and no global reactor.
"""

from __future__ import annotations

import json
import unicodedata
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from cloud import api as api_module
from cloud import tokens
from cloud.api import CloudAPI
from cloud.db import DatabaseUnavailable, InlineDatabase
from cloud.model import Account
from cloud.passwords import hash_password
from cloud.push import NotificationChannel, PushMessage
from cloud.recovery import hash_code
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import recovery as recovery_store
from tests import strategies

SECRET = b"cloud-api-test-secret-0123456789"
NOW_S = 1_700_000_000
NOW_MS = NOW_S * 1000
PASSWORD = "pa55 word"
TABLES = ("messages", "notifications", "outbox_to_legacy", "presence", "accounts",
          "conversations", "members", "recovery_codes", "credential_changes")
#: alice's recovery code in the fuzzers' world (``fuzz_world``)
RECOVERY_CODE = "ABCD-EFGH-JKMN"


# ---------------------------------------------------------------- an HTTP client on bytes

@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return self.json()["error"]["code"]


def raw_request(method: bytes, target: bytes, *, body: bytes = b"",
                headers: list[tuple[bytes, bytes]] = (), chunked: bool = False) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: test"]
    lines += [name + b": " + value for name, value in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def split_response(data: bytes) -> tuple[Response, bytes] | None:
    """The first complete response in *data* and the bytes after it, or None while it is
    still incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.decode("latin-1").strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return Response(int(status_line.split()[1]), headers, rest[:length]), rest[length:]


def parse_response(data: bytes) -> Response | None:
    """The first complete response in *data*, or None while it is still incomplete."""
    split = split_response(data)
    return None if split is None else split[0]


class Connection:
    """One client connection to the site, driven by hand."""

    def __init__(self, site, address: str = "127.0.0.1") -> None:
        peer = IPv4Address("TCP", address, 40000)
        self.protocol = site.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def response(self) -> Response | None:
        return parse_response(self.transport.value())

    def hang_up(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone("client left")))


@attrs.define
class Harness:
    conn: object
    clock: task.Clock
    channel: NotificationChannel
    api: CloudAPI
    site: object

    def start(self, method: str, path: str, *, json_body: object = None, body: bytes = b"",
              token: str | None = None, headers: list[tuple[bytes, bytes]] = (),
              chunked: bool = False) -> Connection:
        """Send a request and return the connection (for responses that come later)."""
        if json_body is not None:
            body = json.dumps(json_body).encode()
        headers = list(headers)
        if token is not None:
            headers.append((b"Authorization", b"Bearer " + token.encode()))
        c = Connection(self.site)
        c.send(raw_request(method.encode(), path.encode(), body=body, headers=headers,
                           chunked=chunked))
        return c

    def request(self, method: str, path: str, **kwargs) -> Response:
        """Send a request whose response must be complete at once."""
        response = self.start(method, path, **kwargs).response()
        assert response is not None, "no complete response"
        assert response.headers["content-type"] == "application/json"
        return response

    def account(self, handle: str, phase: str = "dual", password: str = PASSWORD) -> uuid.UUID:
        account_id = uuid.uuid4()
        with self.conn.transaction():
            accounts_store.create_account(self.conn, Account(account_id, handle, phase, handle),
                                          hash_password(password, iterations=10))
        return account_id

    def conversation(self, *members: uuid.UUID) -> uuid.UUID:
        cid = uuid.uuid4()
        with self.conn.transaction():
            conversations_store.create_conversation(self.conn, cid, members)
        return cid

    def token(self, account_id: uuid.UUID) -> str:
        return tokens.issue(SECRET, account_id, int(self.clock.seconds() * 1000), 3_600_000)

    def rows(self, table: str) -> int:
        return self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def snapshot(self) -> dict[str, tuple]:
        """Row count and a digest of every row, per table: any write shows up here."""
        return {t: self.conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) "
            f"FROM {t} x").fetchone() for t in TABLES}


def make_harness(conn, **options) -> Harness:
    clock = task.Clock()
    clock.advance(NOW_S)
    channel = NotificationChannel(clock)
    api = CloudAPI(InlineDatabase(conn), clock, channel, SECRET, **options)
    return Harness(conn, clock, channel, api, api.site())


@pytest.fixture
def h(conn) -> Harness:
    return make_harness(conn)


def post(h: Harness, token: str, cid: uuid.UUID, client_id: str, text: str = "hi") -> Response:
    return h.request("POST", f"/v1/conversations/{cid}/messages", token=token,
                     json_body={"client_message_id": client_id, "body": text})


# ---------------------------------------------------------------- login

def test_login_by_handle_gives_a_token_that_authenticates(h):
    """A right password by handle returns a working token with its expiry and phase."""
    alice = h.account("alice")
    r = h.request("POST", "/v1/login", json_body={"handle": "alice", "password": PASSWORD})
    assert r.status == 200
    got = r.json()
    assert got["account_id"] == str(alice) and got["phase"] == "dual"
    assert got["expires_ms"] == NOW_MS + 3600 * 1000
    assert h.request("GET", "/v1/conversations", token=got["token"]).status == 200


def test_login_by_account_id(h):
    """Logging in by account id works the same as by handle."""
    bob = h.account("bob", "cloud-only")
    r = h.request("POST", "/v1/login", json_body={"account_id": str(bob), "password": PASSWORD})
    assert r.status == 200 and r.json()["account_id"] == str(bob)
    assert tokens.verify(SECRET, r.json()["token"], NOW_MS) == bob


def test_login_of_a_legacy_phase_account_is_refused_as_not_migrated(h):
    """An account still in phase legacy gets 403 not_migrated saying so, and no token."""
    h.account("old", "legacy")
    r = h.request("POST", "/v1/login", json_body={"handle": "old", "password": PASSWORD})
    assert r.status == 403 and r.code == "not_migrated"
    assert "not migrated to the cloud yet" in r.json()["error"]["message"]
    assert "token" not in r.json()


def test_wrong_password_and_unknown_account_get_the_same_answer(h):
    """Bad password, unknown handle and unknown id all get one 401 bad_credentials message."""
    h.account("alice")
    h.account("old", "legacy")
    answers = [h.request("POST", "/v1/login", json_body=body) for body in (
        {"handle": "alice", "password": "wrong"},
        {"handle": "nobody", "password": PASSWORD},
        {"account_id": str(uuid.uuid4()), "password": PASSWORD},
        {"handle": "old", "password": "wrong"},  # no hint that the legacy account exists
    )]
    assert {(r.status, r.body) for r in answers} == {(401, answers[0].body)}
    assert answers[0].code == "bad_credentials"


def test_a_uuid_shaped_handle_does_not_log_in_by_id(h):
    """A handle field is only ever a handle, even if it looks like another account's id."""
    alice = h.account("alice")
    r = h.request("POST", "/v1/login", json_body={"handle": str(alice), "password": PASSWORD})
    assert r.status == 401 and r.code == "bad_credentials"


def test_an_account_without_a_password_can_not_log_in(h):
    """No stored hash means no password matches."""
    account_id = uuid.uuid4()
    with h.conn.transaction():
        accounts_store.create_account(h.conn, Account(account_id, "nopw", "cloud"), None)
    r = h.request("POST", "/v1/login", json_body={"handle": "nopw", "password": PASSWORD})
    assert r.status == 401


@pytest.mark.parametrize("body", [
    {"password": PASSWORD},
    {"handle": "alice"},
    {"handle": "alice", "account_id": str(uuid.uuid4()), "password": PASSWORD},
    {"handle": "alice", "password": PASSWORD, "remember": True},
    {"handle": 7, "password": PASSWORD},
    {"handle": "alice", "password": ""},
    {"handle": "al\x00ice", "password": PASSWORD},
    {"handle": "a" * 257, "password": PASSWORD},
    {"account_id": "not-a-uuid", "password": PASSWORD},
    [],
])
def test_malformed_logins_are_400(h, body):
    """Missing, extra, mistyped or out-of-range login fields are 400, not 401 or 500."""
    h.account("alice")
    r = h.request("POST", "/v1/login", json_body=body)
    assert r.status == 400, r.body


# ---------------------------------------------------------------- messages

def test_posting_is_idempotent_per_client_message_id(h):
    """The same client message id: 201 then 200 with the same message, one row."""
    alice, bob = h.account("alice"), h.account("bob")
    cid = h.conversation(alice, bob)
    first = post(h, h.token(alice), cid, "c-1", "hello")
    again = post(h, h.token(alice), cid, "c-1", "hello")
    assert (first.status, again.status) == (201, 200)
    assert first.json() == again.json()
    assert first.json()["seq"] == 1 and first.json()["body"] == "hello"
    assert h.rows("messages") == 1 and h.rows("notifications") == 1


def test_sync_pages_through_a_conversation(h):
    """after/limit page by seq; next_after is the last seq, or the cursor when nothing new."""
    alice = h.account("alice")
    cid = h.conversation(alice)
    token = h.token(alice)
    for i in range(5):
        assert post(h, token, cid, f"c{i}", f"m{i}").status == 201
    pages, after = page_through(h, token, cid, "after", 0, 2)
    seen = [m["body"] for page in pages for m in page]
    assert seen == [f"m{i}" for i in range(5)] and after == 5


def page_through(h: Harness, token: str, cid: uuid.UUID, cursor: str, start: int, limit: int
                 ) -> tuple[list[list[dict]], int]:
    """Page a conversation's messages by ``?{cursor}=`` (``after`` or ``before``), each
    page's ``next_{cursor}`` giving the next, until an empty page (whose cursor must stay
    put): the pages' messages, and the last cursor."""
    path = f"/v1/conversations/{cid}/messages"
    pages, at = [], start
    while True:
        page = h.request("GET", f"{path}?{cursor}={at}&limit={limit}", token=token).json()
        if not page["messages"]:
            assert page[f"next_{cursor}"] == at
            return pages, at
        pages.append(page["messages"])
        at = page[f"next_{cursor}"]
    everything = h.request("GET", path, token=token).json()
    assert [m["seq"] for m in everything["messages"]] == [1, 2, 3, 4, 5]


def test_list_conversations_shows_only_the_accounts_own(h):
    """GET /v1/conversations lists the caller's conversations with members, their handles
    and last seq."""
    alice, bob, carol = h.account("alice"), h.account("bob"), h.account("carol")
    mine = h.conversation(alice, bob)
    h.conversation(bob, carol)
    post(h, h.token(bob), mine, "x")
    got = h.request("GET", "/v1/conversations", token=h.token(alice)).json()
    assert got == {"conversations": [{
        "conversation_id": str(mine), "title": "", "last_seq": 1,
        "members": sorted([str(alice), str(bob)]),
        "handles": {str(alice): "alice", str(bob): "bob"}}]}


def test_non_members_get_403_and_unknown_conversations_404(h):
    """Reading or posting where one is not a member is 403; an unknown or garbage id 404."""
    alice, bob = h.account("alice"), h.account("bob")
    cid = h.conversation(alice)
    token = h.token(bob)
    assert post(h, token, cid, "c").code == "not_member"
    r = h.request("GET", f"/v1/conversations/{cid}/messages", token=token)
    assert (r.status, r.code) == (403, "not_member")
    for bad in (str(uuid.uuid4()), "nope", cid.hex):
        assert post(h, token, bad, "c").status == 404
        assert h.request("GET", f"/v1/conversations/{bad}/messages", token=token).status == 404
    assert h.rows("messages") == 0


@pytest.mark.parametrize("body", [
    {"client_message_id": "c"},
    {"body": "x"},
    {"client_message_id": "", "body": "x"},
    {"client_message_id": "c" * 129, "body": "x"},
    {"client_message_id": "c\n", "body": "x"},
    {"client_message_id": "c", "body": ""},
    {"client_message_id": "c", "body": "x" * 4001},
    {"client_message_id": "c", "body": "nul \x00"},
    {"client_message_id": "c", "body": "\ud800"},
    {"client_message_id": "c", "body": 5},
    {"client_message_id": "c", "body": "x", "seq": 9},
])
def test_malformed_posts_are_400_and_write_nothing(h, body):
    """Bad client ids and bodies (length, controls, types, extra fields) are refused."""
    alice = h.account("alice")
    cid = h.conversation(alice)
    r = h.request("POST", f"/v1/conversations/{cid}/messages", token=h.token(alice),
                  json_body=body)
    assert r.status == 400, r.body
    assert h.rows("messages") == 0


def test_message_bodies_may_hold_newlines_and_any_script(h):
    """Multi-line text and non-Latin scripts are ordinary message bodies."""
    alice = h.account("alice")
    cid = h.conversation(alice)
    r = post(h, h.token(alice), cid, "ключ", "line one\n\tline two — 你好 😀")
    assert r.status == 201 and r.json()["body"] == "line one\n\tline two — 你好 😀"


@pytest.mark.parametrize("query", ["after=-1", "after=x", "limit=0", "limit=501", "after=1&after=2",
                                   "since=3", "after=%FF", "after=9223372036854775808",
                                   "after=%D9%A5", "before=0", "before=-1", "before=x",
                                   "before=", "before=1&before=2", "after=5&before=5",
                                   "after=6&before=5", "before=9223372036854775808"])
def test_bad_sync_parameters_are_400(h, query):
    """Negative, non-numeric, out-of-range, repeated or unknown sync parameters are 400."""
    alice = h.account("alice")
    cid = h.conversation(alice)
    r = h.request("GET", f"/v1/conversations/{cid}/messages?{query}", token=h.token(alice))
    assert r.status == 400, r.body


# ---------------------------------------------------------------- presence

def test_presence_is_set_read_and_expires_on_the_clock(h):
    """PUT stores the cloud source with version now and expiry now+ttl; it vanishes after."""
    alice, bob = h.account("alice"), h.account("bob")
    r = h.request("PUT", "/v1/presence", token=h.token(alice),
                  json_body={"status": "busy", "ttl_s": 60})
    assert r.status == 200 and r.json()["applied"] is True
    read = h.request("GET", f"/v1/presence?accounts={alice},{bob}", token=h.token(bob))
    assert read.json() == {"presence": {
        str(alice): [{"source": "cloud", "status": "busy", "version": NOW_MS,
                      "expires_ms": NOW_MS + 60_000}],
        str(bob): []}}
    h.clock.advance(60)
    read = h.request("GET", f"/v1/presence?accounts={alice}", token=h.token(bob))
    assert read.json() == {"presence": {str(alice): []}}


def test_presence_defaults_to_a_90_second_ttl_and_newer_replaces_older(h):
    """Without ttl_s the expiry is 90 s; a later PUT replaces the earlier status."""
    alice = h.account("alice")
    h.request("PUT", "/v1/presence", token=h.token(alice), json_body={"status": "online"})
    h.clock.advance(1)
    h.request("PUT", "/v1/presence", token=h.token(alice), json_body={"status": "away"})
    got = h.request("GET", f"/v1/presence?accounts={alice}", token=h.token(alice)).json()
    assert got["presence"][str(alice)] == [{"source": "cloud", "status": "away",
                                            "version": NOW_MS + 1000,
                                            "expires_ms": NOW_MS + 91_000}]


@pytest.mark.parametrize("body", [{"status": "invisible"}, {"status": "online", "ttl_s": 0},
                                  {"status": "online", "ttl_s": 3601},
                                  {"status": "online", "ttl_s": True},
                                  {"status": "online", "ttl_s": 1.5}, {"ttl_s": 5},
                                  {"status": "online", "source": "legacy"}])
def test_bad_presence_updates_are_400(h, body):
    """Unknown statuses, out-of-range or mistyped ttls and extra fields are refused."""
    alice = h.account("alice")
    r = h.request("PUT", "/v1/presence", token=h.token(alice), json_body=body)
    assert r.status == 400 and h.rows("presence") == 0


def test_presence_reads_are_bounded_and_need_uuids(h):
    """More than 100 ids, a non-UUID or no accounts parameter is 400."""
    alice = h.account("alice")
    many = ",".join(str(uuid.uuid4()) for _ in range(101))
    for query in (f"accounts={many}", "accounts=alice", "", "accounts=", f"accounts={alice},"):
        r = h.request("GET", f"/v1/presence?{query}", token=h.token(alice))
        assert r.status == 400, query


# ---------------------------------------------------------------- notifications

def push(h: Harness, account_id: uuid.UUID, seq: int = 1) -> PushMessage:
    message = PushMessage(account_id, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), seq)
    h.channel.deliver(message)
    return message


def test_long_poll_answers_at_once_when_something_is_pending(h):
    """A pending notification is returned without parking."""
    alice = h.account("alice")
    message = push(h, alice)
    r = h.request("GET", "/v1/notifications", token=h.token(alice))
    assert r.json() == {"notifications": [message.to_json()]}


def test_long_poll_parks_then_wakes_on_delivery(h):
    """With nothing pending the request waits, and answers when a notification arrives."""
    alice = h.account("alice")
    c = h.start("GET", "/v1/notifications?timeout=30", token=h.token(alice))
    assert c.response() is None and h.channel.waiting() == 1
    h.clock.advance(10)
    assert c.response() is None
    message = push(h, alice)
    assert c.response().json() == {"notifications": [message.to_json()]}
    assert h.channel.waiting() == 0


def test_long_poll_times_out_empty_on_the_clock(h):
    """After timeout seconds of the injected clock the answer is an empty list."""
    alice = h.account("alice")
    c = h.start("GET", "/v1/notifications?timeout=5", token=h.token(alice))
    h.clock.advance(4.9)
    assert c.response() is None
    h.clock.advance(0.1)
    assert c.response().json() == {"notifications": []}
    h.clock.advance(25)
    assert h.channel.waiting() == 0


def test_a_client_that_hangs_up_while_parked_cancels_its_wait(h):
    """Disconnecting removes the waiter and its timer; a later delivery stays pending."""
    alice = h.account("alice")
    c = h.start("GET", "/v1/notifications", token=h.token(alice))
    assert h.channel.waiting() == 1
    c.hang_up()
    assert h.channel.waiting() == 0
    assert all(call.getTime() > NOW_S + 3600 for call in h.clock.getDelayedCalls())
    message = push(h, alice)
    assert h.channel.pending(alice) == [message]


def test_ack_removes_from_the_channel_and_marks_the_store(h):
    """Acking a delivered notification: 200, gone from the channel, acked in the store."""
    alice, bob = h.account("alice"), h.account("bob")
    cid = h.conversation(alice, bob)
    post(h, h.token(alice), cid, "c-1")
    nid, seq = h.conn.execute("SELECT notification_id, seq FROM notifications").fetchone()
    h.channel.deliver(PushMessage(bob, nid, cid, uuid.uuid4(), seq))
    token = h.token(bob)
    assert len(h.request("GET", "/v1/notifications", token=token).json()["notifications"]) == 1
    h.clock.advance(2)
    r = h.request("POST", f"/v1/notifications/{nid}/ack", token=token)
    assert r.status == 200 and r.json() == {"notification_id": str(nid), "acked": True}
    assert h.channel.pending(bob) == []
    assert h.conn.execute("SELECT state, acked_ms FROM notifications").fetchone() == (
        "acked", NOW_MS + 2000)
    h.clock.advance(1)
    assert h.request("POST", f"/v1/notifications/{nid}/ack", token=token).status == 200
    assert h.conn.execute("SELECT acked_ms FROM notifications").fetchone()[0] == NOW_MS + 2000


def test_acking_someone_elses_or_an_unknown_notification_is_404(h):
    """Only the owner can ack; others, unknown ids and garbage ids get 404 and change nothing."""
    alice, bob = h.account("alice"), h.account("bob")
    cid = h.conversation(alice, bob)
    post(h, h.token(alice), cid, "c-1")
    nid = h.conn.execute("SELECT notification_id FROM notifications").fetchone()[0]
    before = h.snapshot()
    for target, who in ((nid, alice), (uuid.uuid4(), bob), ("garbage", bob)):
        r = h.request("POST", f"/v1/notifications/{target}/ack", token=h.token(who))
        assert (r.status, r.code) == (404, "not_found")
    assert h.snapshot() == before


@pytest.mark.parametrize("query", ["timeout=31", "timeout=-1", "timeout=abc", "wait=5",
                                   "timeout=1e3"])
def test_bad_long_poll_timeouts_are_400(h, query):
    """The timeout is a number of seconds within 0..longpoll_max_s."""
    alice = h.account("alice")
    r = h.request("GET", f"/v1/notifications?{query}", token=h.token(alice))
    assert r.status == 400 and h.channel.waiting() == 0


# ---------------------------------------------------------------- authentication

#: Every authenticated endpoint, with a request that succeeds when the token is good.
AUTHENTICATED = [
    ("GET", "/v1/conversations", "", None),
    ("POST", "/v1/conversations/{conversation_id}/messages", "",
     {"client_message_id": "c", "body": "x"}),
    ("GET", "/v1/conversations/{conversation_id}/messages", "", None),
    ("PUT", "/v1/presence", "", {"status": "online"}),
    ("GET", "/v1/presence", "accounts={account_id}", None),
    ("GET", "/v1/notifications", "timeout=0", None),
    ("POST", "/v1/notifications/{notification_id}/ack", "", None),
    ("POST", "/v1/conversations", "", {"members": ["bob"]}),
    ("POST", "/v1/conversations/{conversation_id}/members", "", {"handle": "ghost"}),
    ("DELETE", "/v1/conversations/{conversation_id}/members/{handle}", "", None),
    ("POST", "/v1/token", "", None),
]


@pytest.mark.parametrize(("method", "template", "query", "body"), AUTHENTICATED,
                         ids=[f"{m} {t}" for m, t, _, _ in AUTHENTICATED])
@pytest.mark.parametrize("credential", ["none", "garbage", "not bearer", "expired",
                                        "other secret", "deleted account"])
def test_every_authenticated_route_refuses_a_bad_token(h, method, template, query, body,
                                                       credential):
    """Missing, malformed, expired, foreign-signed or orphaned tokens: 401, nothing changes."""
    alice, bob = h.account("alice"), h.account("bob")
    ghost = h.account("ghost")
    cid = h.conversation(alice, bob)
    post(h, h.token(bob), cid, "c-0")
    nid = h.conn.execute("SELECT notification_id FROM notifications").fetchone()[0]
    token = {
        "none": None, "garbage": "x" * 76, "not bearer": None,
        "expired": tokens.issue(SECRET, alice, NOW_MS - 10_000, 5_000),
        "other secret": tokens.issue(b"another-secret-of-32-bytes......", alice, NOW_MS, 60_000),
        "deleted account": h.token(ghost),
    }[credential]
    h.conn.execute("DELETE FROM accounts WHERE account_id = %s", (ghost,))
    headers = []
    if credential == "not bearer":
        headers = [(b"Authorization", b"Basic " + h.token(alice).encode())]
    ids = {"conversation_id": cid, "notification_id": nid, "account_id": alice,
           "handle": "bob"}
    path = template.format(**ids) + ("?" + query.format(**ids) if query else "")
    before = h.snapshot()
    r = h.request(method, path, json_body=body, token=token, headers=headers)
    assert (r.status, r.code) == (401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert h.snapshot() == before and h.channel.waiting() == 0


def test_the_bad_token_matrix_covers_every_authenticated_endpoint(h):
    """A new authenticated route can not slip past the test above unnoticed."""
    served = {(m.decode(), route.template) for route in h.api.routes
              for m, endpoint in route.endpoints.items() if endpoint.authenticated}
    assert served == {(m, t) for m, t, _, _ in AUTHENTICATED}


def test_a_token_of_an_account_moved_back_to_legacy_is_refused(h):
    """After a reverse migration to phase legacy, old tokens get 403 not_migrated."""
    alice = h.account("alice")
    token = h.token(alice)
    with h.conn.transaction():
        accounts_store.set_phase(h.conn, alice, "legacy")
    r = h.request("GET", "/v1/conversations", token=token)
    assert (r.status, r.code) == (403, "not_migrated")


def test_a_post_checks_the_tokens_account_in_its_own_statement(h):
    """Posting reads no account before the post (one query per post): a token whose account
    is gone still gets 401, one moved back to legacy 403 not_migrated, nothing written."""
    alice, bob = h.account("alice"), h.account("bob")
    cid = h.conversation(alice, bob)
    alice_token, bob_token = h.token(alice), h.token(bob)
    with h.conn.transaction():
        accounts_store.set_phase(h.conn, alice, "legacy")
    h.conn.execute("DELETE FROM members WHERE account_id = %s", (bob,))
    h.conn.execute("DELETE FROM accounts WHERE account_id = %s", (bob,))
    before = h.snapshot()
    r = post(h, alice_token, cid, "c-1")
    assert (r.status, r.code) == (403, "not_migrated")
    r = post(h, bob_token, cid, "c-2")
    assert (r.status, r.code) == (401, "unauthorized")
    assert h.snapshot() == before
    served = {route.template: route.endpoints[b"POST"] for route in h.api.routes
              if b"POST" in route.endpoints}
    assert served["/v1/conversations/{conversation_id}/messages"].account_checked_by_handler


def test_a_token_that_authenticated_before_still_expires_on_the_clock(h):
    """Verified tokens are remembered, their expiry is not: past it, 401 expired."""
    alice = h.account("alice")
    token = h.token(alice)  # valid for an hour
    assert h.request("GET", "/v1/conversations", token=token).status == 200
    h.clock.advance(3600)
    r = h.request("GET", "/v1/conversations", token=token)
    assert (r.status, r.code) == (401, "unauthorized") and "expired" in r.json()["error"][
        "message"]


def test_text_fields_refuse_exactly_unicodes_control_and_surrogate_characters():
    """The refused-character class is Unicode's categories Cc and Cs, less the controls a
    field allows (a message body: tab, newline, carriage return), over every code point."""
    for allowed in (frozenset(), frozenset("\t\n\r")):
        refused = api_module._refused_characters(allowed)
        for code in range(0x110000):
            ch = chr(code)
            category = unicodedata.category(ch)
            expected = category == "Cs" or (category == "Cc" and ch not in allowed)
            assert bool(refused.search(ch)) == expected, hex(code)


def test_healthz_needs_no_token(h):
    """The health check answers without authentication."""
    assert h.request("GET", "/v1/healthz").json() == {"ok": True}


# ---------------------------------------------------------------- transport-level validation

def test_oversized_bodies_are_413_by_header_or_by_actual_length(conn):
    """A declared or a chunked body over max_body_bytes is refused before it is parsed."""
    h = make_harness(conn, max_body_bytes=1024)
    alice = h.account("alice")
    cid = h.conversation(alice)
    big = json.dumps({"client_message_id": "c", "body": "x" * 2000}).encode()
    path = f"/v1/conversations/{cid}/messages"
    for chunked in (False, True):
        r = h.request("POST", path, body=big, token=h.token(alice), chunked=chunked)
        assert (r.status, r.code) == (413, "payload_too_large")
    r = h.request("POST", "/v1/login", body=b"x" * 1025)
    assert r.status == 413
    assert h.rows("messages") == 0


def test_unknown_routes_are_404_and_wrong_methods_405_with_allow(h):
    """Route errors are JSON too, and 405 names the allowed methods. (GET / is the web
    client's page, tests/cloud/test_webclient.py.)"""
    for path in ("/v1", "/v1/", "/v2/login", "/v1/login/", "/v1/conversations/x",
                 "/v1//conversations", "/V1/login"):
        assert h.request("GET", path).status == 404, path
    r = h.request("DELETE", "/v1/presence")
    assert (r.status, r.code) == (405, "method_not_allowed")
    assert r.headers["allow"] == "GET, PUT"


def test_a_head_request_gets_405_without_a_body(h):
    """HEAD is not a route's method; Twisted sends the headers only."""
    data = h.start("HEAD", "/v1/healthz").transport.value()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in head and body == b""


def test_bodies_must_be_utf8_json_objects(h):
    """Malformed JSON, non-objects, duplicate keys and bodies on body-less routes are 400."""
    alice = h.account("alice")
    token = h.token(alice)
    for body in (b"{", b"[]", b'"x"', b'{"status": "online", "status": "away"}',
                 b'{"status": NaN}', b"\xff{}", b"[" * 10_000):
        r = h.request("PUT", "/v1/presence", body=body, token=token)
        assert (r.status, r.code) == (400, "malformed_json"), body
    assert h.request("PUT", "/v1/presence", token=token).code == "missing_body"
    assert h.request("GET", "/v1/conversations", body=b'{"a": 1}', token=token).status == 400
    assert h.request("GET", "/v1/conversations", body=b"{}", token=token).status == 200
    assert h.rows("presence") == 0


# ---------------------------------------------------------------- failures of the store

class FailingDatabase:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, desc, fn, *args, **kwargs) -> defer.Deferred:
        return defer.fail(self.error)


@pytest.fixture
def logged() -> Iterator[list[dict]]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failing_harness(error: Exception) -> Harness:
    clock = task.Clock()
    clock.advance(NOW_S)
    channel = NotificationChannel(clock)
    api = CloudAPI(FailingDatabase(error), clock, channel, SECRET)
    return Harness(None, clock, channel, api, api.site())


def test_an_unreachable_database_is_503(logged):
    """DatabaseUnavailable becomes 503 unavailable with Retry-After."""
    h = failing_harness(DatabaseUnavailable("connection refused"))
    r = h.request("POST", "/v1/login", json_body={"handle": "a", "password": "p"})
    assert (r.status, r.code) == (503, "unavailable") and r.headers["retry-after"] == "1"
    assert "connection refused" not in r.body.decode()


def test_an_unexpected_error_is_a_logged_generic_500(logged):
    """Anything unforeseen is 500 with a generic message; the traceback goes to the log."""
    h = failing_harness(RuntimeError("secret internals at /srv/db"))
    r = h.request("POST", "/v1/login", json_body={"handle": "a", "password": PASSWORD})
    assert (r.status, r.code) == (500, "internal")
    assert "internals" not in r.body.decode()
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 1
    assert "secret internals" in str(failures[0]["log_failure"].value)
    assert not any(PASSWORD in repr(e) for e in logged)


def test_request_metrics_are_labelled_by_route_template(h):
    """cloud_api_requests_total uses the route template, not the raw path with its ids."""
    def count(route: str, status: str) -> float:
        return REGISTRY.get_sample_value(
            "cloud_api_requests_total", {"route": route, "status": status}) or 0.0

    template = "/v1/conversations/{conversation_id}/messages"
    alice = h.account("alice")
    before = count(template, "404"), count("unmatched", "404")
    h.request("GET", f"/v1/conversations/{uuid.uuid4()}/messages", token=h.token(alice))
    h.request("GET", "/nowhere")
    assert (count(template, "404"), count("unmatched", "404")) == (before[0] + 1, before[1] + 1)


# ---------------------------------------------------------------- hostile input

@attrs.frozen
class World:
    """What the fuzzer may aim at: real ids and a valid token, plus a legacy account."""

    alice: uuid.UUID
    cid: uuid.UUID
    nid: uuid.UUID
    token: str


def _valid_requests(w: World) -> list[tuple[str, bytes, str, object, bool]]:
    """(name, method, path, body, needs a token): one valid request per endpoint."""
    return [
        ("login", b"POST", "/v1/login", {"handle": "alice", "password": PASSWORD}, False),
        # before the recovery, which ends the renewal of tokens issued before it
        ("renew", b"POST", "/v1/token", None, True),
        ("recover", b"POST", "/v1/recover", {"handle": "alice", "code": RECOVERY_CODE,
                                             "new_password": "a new pass phrase"}, False),
        ("healthz", b"GET", "/v1/healthz", None, False),
        ("conversations", b"GET", "/v1/conversations", None, True),
        ("post", b"POST", f"/v1/conversations/{w.cid}/messages",
         {"client_message_id": "fuzz", "body": "hi"}, True),
        ("sync", b"GET", f"/v1/conversations/{w.cid}/messages?after=0&limit=5", None, True),
        ("sync-older", b"GET", f"/v1/conversations/{w.cid}/messages?before=2&limit=5", None,
         True),
        ("presence-put", b"PUT", "/v1/presence", {"status": "online"}, True),
        ("presence-get", b"GET", f"/v1/presence?accounts={w.alice}", None, True),
        ("poll", b"GET", "/v1/notifications?timeout=0", None, True),
        ("ack", b"POST", f"/v1/notifications/{w.nid}/ack", None, True),
        ("create", b"POST", "/v1/conversations", {"members": ["bob"]}, True),
        ("add-member", b"POST", f"/v1/conversations/{w.cid}/members", {"handle": "carol"},
         True),
        ("remove-member", b"DELETE", f"/v1/conversations/{w.cid}/members/bob", None, True),
    ]


ALLOWED = {"/v1/login": {b"POST"}, "/v1/recover": {b"POST"}, "/v1/healthz": {b"GET"},
           "/v1/conversations": {b"GET", b"POST"}, "messages": {b"GET", b"POST"},
           "/v1/presence": {b"GET", b"PUT"}, "/v1/notifications": {b"GET"}, "ack": {b"POST"},
           "members": {b"POST"}, "member": {b"DELETE"}, "/v1/token": {b"POST"}}

#: Per JSON field: values that field refuses.
BAD_FIELD_VALUES = {
    "handle": st.one_of(st.just(""), st.just("x" * 300), st.text(alphabet="\x00\x01\x1f\x7f",
                                                                 min_size=1)),
    "password": st.one_of(st.just(""), st.just("p" * 1025), st.just(PASSWORD + "!")),
    "code": st.one_of(st.just(""), st.just("c" * 65), st.just("WRONG-CODE-HERE"),
                      st.just("AB\x00CD")),
    "new_password": st.one_of(st.just(""), st.just("short"), st.just("alice"),
                              st.just("p" * 1025), st.just("x" * 12), st.just("\ud800" * 9)),
    "client_message_id": st.one_of(st.just(""), st.just("c" * 129),
                                   st.text(min_size=1).map(lambda s: s + "\n")),
    "body": st.one_of(st.just(""), st.just("b" * 4001), st.just("\x00"), st.just("\ud800")),
    "status": st.text(max_size=10).filter(lambda s: s not in ("online", "away", "busy",
                                                              "offline")),
    "members": st.sampled_from([[], ["bob", "bob"], [""], ["x" * 300], ["nobody"], ["bo\x00b"],
                                ["alice"], [f"u{i}" for i in range(101)], [7]]),
}


def _mistyped(value: object) -> st.SearchStrategy:
    return strategies.json_values(4).filter(lambda v: type(v) is not type(value))


@st.composite
def bad_json_bodies(draw, valid: dict) -> bytes:
    """The valid object with one field dropped, one added, or one value made invalid."""
    obj = dict(valid)
    how = draw(st.sampled_from(["drop", "add", "mistype", "bad value", "not an object"]))
    field = draw(st.sampled_from(sorted(obj)))
    if how == "drop":
        del obj[field]
    elif how == "add":
        # ttl_s is optional and could come out valid; every other new name is unknown
        # ttl_s and title are optional and could come out valid; every other new name is
        # unknown
        name = draw(st.text(max_size=12).filter(
            lambda k: k not in valid and k not in ("ttl_s", "title")))
        obj[name] = draw(strategies.json_values(4))
    elif how == "mistype":
        obj[field] = draw(_mistyped(obj[field]))
    elif how == "bad value" and field in BAD_FIELD_VALUES:
        obj[field] = draw(BAD_FIELD_VALUES[field])
    else:
        return json.dumps(draw(strategies.json_values().filter(
            lambda v: not isinstance(v, dict)))).encode()
    return json.dumps(obj).encode()


#: Per query parameter: values it refuses.
BAD_PARAMETER_VALUES = {
    "after": ["", "-1", "x", "1.5", "+1", "99999999999999999999", "%FF", "0x10", "%D9%A5"],
    "limit": ["", "0", "501", "-1", "1e3", "ten", "%00"],
    "before": ["", "0", "-1", "x", "99999999999999999999", "%FF", "1.5"],
    "timeout": ["", "31", "-1", "1e3", "0x10", "nan", "inf", "1.23456"],
    "accounts": ["", "nope", "nope,nope", ",", "%FF",
                 ",".join([str(uuid.UUID(int=i)) for i in range(101)])],
}


@st.composite
def bad_queries(draw, valid_query: str) -> str:
    """The valid query string with one flaw: an unknown, repeated or refused parameter,
    or a malformed query string."""
    pairs = [p for p in valid_query.split("&") if p]
    how = draw(st.sampled_from(["unknown", "repeat", "value", "junk"] if pairs else
                               ["unknown", "junk"]))
    if how == "unknown":  # no route takes any of these names
        pairs.append(draw(st.sampled_from(["x=1", "since=3", "Limit=5", "after_=0", "a="])))
    elif how == "repeat":
        pairs.append(draw(st.sampled_from(pairs)))
    elif how == "value":
        i = draw(st.integers(0, len(pairs) - 1))
        name = pairs[i].split("=")[0]
        pairs[i] = name + "=" + draw(st.sampled_from(BAD_PARAMETER_VALUES[name]))
    else:
        pairs.append(draw(st.sampled_from(["%zz", "&&", "=", "a=1=2", "=1"])))
    return "&".join(pairs)


@st.composite
def hostile_requests(draw, w: World) -> tuple[bytes, bytes, bytes, list, bool]:
    """(method, target, body, headers, chunked): a request with at least one real flaw."""
    name, method, path, body, needs_token = draw(st.sampled_from(_valid_requests(w)))
    route, _, query = path.partition("?")
    raw_body = b"" if body is None else json.dumps(body).encode()
    token = w.token if needs_token else None
    key = ("messages" if route.endswith("/messages") else "ack" if route.endswith("/ack")
           else "members" if route.endswith("/members")
           else "member" if "/members/" in route else route)
    flaws = ["method", "path", "query", "json", "size", "login"]
    flaws += ["id"] * (key in ("messages", "ack", "members", "member"))
    flaws += ["token"] * needs_token + ["handle"] * (key == "member")
    flaws += ["body"] * (body is not None)
    flaw = draw(st.sampled_from(flaws))
    if flaw == "method":
        method = draw(strategies.http_methods().filter(lambda m: m not in ALLOWED[key]))
    elif flaw == "path":
        segments = draw(st.lists(strategies.path_segments(), min_size=1, max_size=5))
        # never under /v1 nor the web client's files (/, /app.js, /app.css): no route matches
        first = segments[0]
        route = "/" + "/".join(["x" + first if first in ("v1", "", "app.js", "app.css")
                                else first, *segments[1:]])
    elif flaw == "id":
        parts = route.split("/")
        parts[3] = quote(draw(st.one_of(strategies.not_uuid_text(), st.uuids().map(str))),
                         safe="")
        route = "/".join(parts)
    elif flaw == "handle":  # not a member: unknown, not one, or not a handle at all
        parts = route.split("/")
        parts[-1] = draw(st.sampled_from(["nobody", "old", "%00", "%FF", "x" * 300, "a%1Fb"]))
        route = "/".join(parts)
    elif flaw == "token":
        token = draw(st.one_of(st.none(), st.text(alphabet="abcXYZ-_=.", max_size=80),
                               st.just(tokens.issue(SECRET, w.alice, NOW_MS - 2000, 1000)),
                               st.just(tokens.issue(b"x" * 16, w.alice, NOW_MS, 9000))))
    elif flaw == "query":
        query = draw(bad_queries(query))
    elif flaw == "body":
        raw_body = draw(bad_json_bodies(body))
    elif flaw == "json":
        raw_body = draw(strategies.malformed_json())
    elif flaw == "size":
        raw_body = draw(st.sampled_from([b"x", b" ", b"{}"])) * 2049
    else:  # a login that fails: wrong password, unknown handle, or a legacy-phase account
        assert flaw == "login"
        method, route, query, token = b"POST", "/v1/login", "", None
        raw_body = json.dumps(draw(st.sampled_from([
            {"handle": "alice", "password": "wrong"}, {"handle": "mallory", "password": "x"},
            {"handle": "old", "password": PASSWORD},
            {"account_id": str(uuid.uuid4()), "password": PASSWORD}]))).encode()
    target = route + ("?" + query if query else "")
    headers = draw(strategies.extra_headers())
    if token is not None:
        headers.append((b"Authorization", b"Bearer " + token.encode("utf-8")))
    return method, target.encode("utf-8"), raw_body, headers, draw(st.booleans())


@pytest.fixture
def fuzz_world(conn) -> tuple[Harness, World]:
    h = make_harness(conn, max_body_bytes=2048, max_message_chars=4000)
    alice, bob = h.account("alice"), h.account("bob")
    h.account("old", "legacy")
    h.account("carol")
    cid = h.conversation(alice, bob)
    post(h, h.token(bob), cid, "c-0")
    nid = h.conn.execute("SELECT notification_id FROM notifications").fetchone()[0]
    h.request("PUT", "/v1/presence", token=h.token(alice), json_body={"status": "away"})
    with h.conn.transaction():
        recovery_store.issue_code(h.conn, "alice", hash_code(RECOVERY_CODE, iterations=10),
                                  now_ms=NOW_MS, expires_ms=NOW_MS + 3_600_000, actor="test")
    return h, World(alice, cid, nid, h.token(alice))


def test_the_fuzzers_starting_requests_are_valid(fuzz_world):
    """Each request the fuzzer spoils succeeds unspoiled, so its 4xx comes from the flaw."""
    h, world = fuzz_world
    for name, method, path, body, needs_token in _valid_requests(world):
        r = h.request(method.decode(), path, json_body=body,
                      token=world.token if needs_token else None)
        assert r.status in (200, 201), (name, r.body)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(data=st.data())
def test_hostile_requests_get_a_json_4xx_and_change_nothing(fuzz_world, data):
    """Random bad methods, paths, ids, tokens, queries and bodies: 4xx JSON, no row changes."""
    h, world = fuzz_world
    method, target, body, headers, chunked = data.draw(hostile_requests(world))
    before = h.snapshot()
    c = Connection(h.site)
    c.send(raw_request(method, target, body=body, headers=headers, chunked=chunked))
    r = c.response()
    assert r is not None, (method, target, body[:200])
    assert 400 <= r.status < 500, (r.status, r.body, method, target, body[:200])
    assert r.headers["content-type"] == "application/json"
    assert isinstance(r.json()["error"]["code"], str)
    event(f"{r.status} {r.json()['error']['code']}")
    assert h.snapshot() == before
    assert h.channel.waiting() == 0


def test_metrics_are_served_as_prometheus_text(h):
    """GET /metrics answers in the Prometheus text format with the API's own counters."""
    h.request("GET", "/v1/healthz")
    raw = h.start("GET", "/metrics").transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Type: text/plain" in head
    assert b'cloud_api_requests_total{route="/v1/healthz",status="200"}' in body
