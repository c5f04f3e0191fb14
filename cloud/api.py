"""The cloud API: JSON over HTTP for cloud clients, on twisted.web alone.

    bytes -> _BoundedRequest (buffers at most max_body_bytes) -> CloudAPIResource.render
      -> route (404) -> method (405) -> body size (413) -> bearer token (401)
      -> the token's account (401 gone, 403 not_migrated)
      -> path ids (404) -> query (400) -> JSON body (400) -> handler -> JSON response
      (login: failed-login budget of the address, then of the account (429) -> password)
      (posting a message: the token's account is checked in the post's own statement, so
       after the body: one query per post instead of two; posts that arrive while the
       writers are busy share a transaction, ``cloud.posting.PostBatcher``)
    ApiError -> its 4xx;  DatabaseUnavailable -> 503;  anything else -> 500, logged

Routes, all under ``/v1``::

    POST /v1/login                                    200; 400 401 403(not_migrated) 429
    POST /v1/recover                                  200 {handle, code, new_password};
                                                      400 (weak_password) 401 429
    POST /v1/token                                    200 (a fresh token for the bearer's
                                                      account); 401 (expired, or the password
                                                      changed since) 403
    GET  /v1/healthz                                  200 (no token needed)
    GET  /v1/conversations                            200 (members, their handles, last_seq)
    POST /v1/conversations                            201 {members: [handle...], title?}; 404
    POST /v1/conversations/{conversation_id}/members  200 {handle} (added: false if one
                                                      already); 403 404
    DELETE /v1/conversations/{conversation_id}/members/{handle}   200; 403 404
    POST /v1/conversations/{conversation_id}/messages 201 new, 200 replay; 403 404
    GET  /v1/conversations/{conversation_id}/messages 200 (?after=&before=&limit=); 403 404
    PUT  /v1/presence                                 200
    GET  /v1/presence?accounts=id1,id2                200
    GET  /v1/notifications?timeout=S                  200 (long poll)
    POST /v1/notifications/{notification_id}/ack      200 (idempotent); 404

Beside them, ``GET /`` (with ``/app.js`` and ``/app.css``) serves the web client for cloud
users (``cloud.webclient``), a page that uses these routes.

Every route but login, recover and healthz needs ``Authorization: Bearer <token>``; without a
valid token for an existing account the answer is 401 ``unauthorized``. Every error is
``{"error": {"code": ..., "message": ...}}`` and every check runs before any write, so a
refused request changes nothing. A path id that is not a UUID answers 404 ``not_found``, as
an unknown id does: both name a resource that does not exist; so does a handle in a path
that is not valid UTF-8 text without control characters. Requests are read strictly:
unknown or repeated query parameters, unknown or missing body fields, wrong JSON types and
a body on a route that takes none are all 400.

Failed logins are limited per account and per client address (``cloud.ratelimit``; by
default 10 per account and 30 per address per minute, successful logins cost nothing), the
budgets kept in the store so they hold for the whole deployment, not per process: past the
budget a login is 429 ``rate_limited`` with ``Retry-After``, before any password work.
Account recovery (``cloud.recovery``) has budgets of its own, per account and per address.
Limits: the body (``max_body_bytes``, 413), a message body (``MAX_MESSAGE_CHARS``
characters, the legacy network's limit too), handles, passwords, ids and query sizes (400).

The module is long (about 1030 lines) because it is the whole HTTP surface: the request
pipeline above and every route's input checks sit together, so the 4xx contract can be read
(and fuzzed, ``tests/cloud/test_fuzz_api.py``) in one place. The conversation and member
routes (issue 16) came without the split by resource that this size now asks for; it is
still owed.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import resource, server

from cloud import tokens
from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.http_channel import ResponseChannel
from cloud.model import (
    MAX_MEMBERS,
    MAX_MESSAGE_CHARS,
    PHASES,
    PRESENCE_STATUSES,
    Account,
    Presence,
)
from cloud.passwords import hash_password, verify_password
from cloud.posting import PostBatcher
from cloud.push import NotificationChannel
from cloud.ratelimit import LoginLimiter, LoginLimits, retry_after_header
from cloud.recovery import MAX_CODE_CHARS, Recovery, RecoveryRefused
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from cloud.store import notifications as notifications_store
from cloud.store import presence as presence_store
from cloud.store import recovery as recovery_store
from cloud.store.errors import Conflict, NotFound, NotMember, PhaseRefused, UnknownAccount
from cloud.store.messages import Post
from cloud.webclient import WebClient

log = Logger()

REQUESTS = Counter("cloud_api_requests_total",
                   "Cloud API requests answered, by route template and HTTP status.",
                   ["route", "status"])
REQUEST_SECONDS = Histogram(
    "cloud_api_request_seconds", "Time from request to response, by route template.",
    ["route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
LOGINS = Counter("cloud_api_logins_total", "Login attempts, by result.", ["result"])

#: The route label of requests that matched no route (so the label set stays fixed).
UNMATCHED = "unmatched"
#: nginx's "client closed request": the client left before the answer (a parked long poll).
CLIENT_GONE = 499

PRESENCE_SOURCE = "cloud"
#: The phases whose accounts may use the API (phase legacy: 403 not_migrated).
CLOUD_API_PHASES = tuple(p for p in PHASES if p != "legacy")
MAX_PRESENCE_ACCOUNTS = 100
MAX_SYNC_LIMIT = 500
DEFAULT_SYNC_LIMIT = 100
DEFAULT_LONGPOLL_S = 25
MAX_HANDLE_CHARS = 256
MAX_PASSWORD_CHARS = 1024
MAX_CLIENT_MESSAGE_ID_CHARS = 128
MAX_TITLE_CHARS = 200
#: Verified tokens remembered (see CloudAPI._verified), a few hundred bytes each.
VERIFIED_TOKENS_KEPT = 10_000
_BIGINT_MAX = (1 << 63) - 1
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_UINT_RE = re.compile(r"[0-9]{1,19}")
_SECONDS_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?")
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([^ ]+) *")
_MESSAGE_WHITESPACE = frozenset("\t\n\r")


class ApiError(Exception):
    """A refused request: the HTTP status and the ``error`` object of the response."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


# ---------------------------------------------------------------- validation of values

def _name(key: object) -> str:
    """A client-supplied name, quoted and cut short, safe to echo in an error message."""
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_text(field: str, value: object, min_chars: int, max_chars: int, *,
                allowed_controls: frozenset[str] = frozenset()) -> str:
    """A JSON string of bounded length that PostgreSQL can store, without control characters.

    Controls are refused because clients show these strings, and NUL and lone surrogates
    in particular can not be stored in PostgreSQL text at all.
    """
    if not isinstance(value, str):
        raise _bad("invalid_field", f"{field} must be a string")
    if not min_chars <= len(value) <= max_chars:
        raise _bad("invalid_field", f"{field} must be {min_chars} to {max_chars} characters")
    if _refused_characters(allowed_controls).search(value):
        raise _bad("invalid_field", f"{field} must not contain control characters")
    return value


@functools.cache
def _refused_characters(allowed_controls: frozenset[str]) -> re.Pattern[str]:
    """Unicode's categories Cc (U+0000-U+001F, U+007F-U+009F) and Cs (surrogates, U+D800-
    U+DFFF) less *allowed_controls*, as one character class: a scan in C, where a loop over
    ``unicodedata.category`` cost a few percent of the API's time per post."""
    refused = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))
               if chr(c) not in allowed_controls]
    return re.compile("[" + "".join(re.escape(c) for c in refused) + "\ud800-\udfff]")


def _check_password(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_PASSWORD_CHARS:
        raise _bad("invalid_field",
                   f"password must be a string of 1 to {MAX_PASSWORD_CHARS} characters")
    return value


def _parse_uuid(field: str, value: object) -> uuid.UUID:
    """A UUID in its canonical 36-character spelling (uuid.UUID alone accepts far more)."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise _bad("invalid_field", f"{field} must be a UUID")
    return uuid.UUID(value)


def _parse_uint(field: str, text: str, low: int, high: int) -> int:
    if not _UINT_RE.fullmatch(text) or not low <= int(text) <= high:
        raise _bad("invalid_parameter", f"{field} must be an integer within {low}..{high}")
    return int(text)


def _fields(obj: Mapping[str, Any], what: str, required: tuple[str, ...],
            optional: tuple[str, ...] = ()) -> None:
    """Refuse unknown and missing fields, naming the first one (sorted, so stable)."""
    unknown = sorted(set(obj) - set(required) - set(optional), key=str)
    if unknown:
        raise _bad("unknown_field", f"unknown field {_name(unknown[0])} in {what}")
    for field in required:
        if field not in obj:
            raise _bad("missing_field", f"missing field {field!r} in {what}")


# ---------------------------------------------------------------- validated requests

@attrs.frozen
class LoginRequest:
    """Who logs in (a handle or an account id, exactly one) and the password."""

    password: str
    handle: str | None = None
    account_id: uuid.UUID | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LoginRequest:
        _fields(obj, "the login", ("password",), ("handle", "account_id"))
        if ("handle" in obj) == ("account_id" in obj):
            raise _bad("invalid_field", "give exactly one of handle and account_id")
        password = _check_password(obj["password"])
        if "handle" in obj:
            return cls(password, handle=_check_text("handle", obj["handle"], 1,
                                                    MAX_HANDLE_CHARS))
        return cls(password, account_id=_parse_uuid("account_id", obj["account_id"]))

    @property
    def login_name(self) -> str:
        return self.handle if self.handle is not None else str(self.account_id)


@attrs.frozen
class RecoverRequest:
    """Who recovers (a handle), the code the operator gave them, the new password."""

    handle: str
    code: str
    new_password: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RecoverRequest:
        _fields(obj, "the recovery", ("handle", "code", "new_password"))
        return cls(_check_text("handle", obj["handle"], 1, MAX_HANDLE_CHARS),
                   _check_text("code", obj["code"], 1, MAX_CODE_CHARS),
                   _check_text("new_password", obj["new_password"], 1, MAX_PASSWORD_CHARS))


@attrs.frozen
class PostMessageRequest:
    client_message_id: str
    body: str

    @classmethod
    def parser(cls, max_message_chars: int) -> Callable[[Mapping[str, Any]],
                                                          PostMessageRequest]:
        def parse(obj: Mapping[str, Any]) -> PostMessageRequest:
            _fields(obj, "the message", ("client_message_id", "body"))
            return cls(
                _check_text("client_message_id", obj["client_message_id"], 1,
                            MAX_CLIENT_MESSAGE_ID_CHARS),
                _check_text("body", obj["body"], 1, max_message_chars,
                            allowed_controls=_MESSAGE_WHITESPACE))
        return parse


@attrs.frozen
class NewConversation:
    """Who a new conversation is with (handles; its creator is a member anyway)."""

    members: tuple[str, ...]
    title: str = ""

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NewConversation:
        _fields(obj, "the conversation", ("members",), ("title",))
        members = obj["members"]
        if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
            raise _bad("invalid_field",
                       f"members must be a list of 1 to {MAX_MEMBERS} handles")
        handles = tuple(_check_text("every member", h, 1, MAX_HANDLE_CHARS) for h in members)
        if len(set(handles)) != len(handles):
            raise _bad("invalid_field", "members must be distinct")
        title = _check_text("title", obj.get("title", ""), 0, MAX_TITLE_CHARS)
        return cls(handles, title)


@attrs.frozen
class MemberChange:
    """The member to add, by handle."""

    handle: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MemberChange:
        _fields(obj, "the member", ("handle",))
        return cls(_check_text("handle", obj["handle"], 1, MAX_HANDLE_CHARS))


@attrs.frozen
class PresenceUpdate:
    status: str
    ttl_s: int = 90

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PresenceUpdate:
        _fields(obj, "the presence", ("status",), ("ttl_s",))
        status = obj["status"]
        if not isinstance(status, str) or status not in PRESENCE_STATUSES:
            raise _bad("invalid_field", f"status must be one of {', '.join(PRESENCE_STATUSES)}")
        ttl = obj.get("ttl_s", 90)
        if type(ttl) is not int or not 1 <= ttl <= 3600:  # bool is not a ttl
            raise _bad("invalid_field", "ttl_s must be an integer within 1..3600")
        return cls(status, ttl)


@attrs.frozen
class SyncQuery:
    """Messages with ``after < seq``, at most *limit*: the oldest of them, or with *before*
    (``seq < before``) the newest of them, for paging back through older history."""

    after: int = 0
    limit: int = DEFAULT_SYNC_LIMIT
    before: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> SyncQuery:
        _fields(query, "the query", (), ("after", "before", "limit"))
        after = _parse_uint("after", query.get("after", "0"), 0, _BIGINT_MAX)
        before = None
        if "before" in query:
            before = _parse_uint("before", query["before"], 1, _BIGINT_MAX)
            if before <= after:
                raise _bad("invalid_parameter", "before must be greater than after")
        return cls(after, _parse_uint("limit", query.get("limit", str(DEFAULT_SYNC_LIMIT)),
                                      1, MAX_SYNC_LIMIT), before)


@attrs.frozen
class PresenceQuery:
    accounts: tuple[uuid.UUID, ...]

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> PresenceQuery:
        _fields(query, "the query", ("accounts",))
        names = query["accounts"].split(",")
        if len(names) > MAX_PRESENCE_ACCOUNTS:
            raise _bad("invalid_parameter",
                       f"accounts lists at most {MAX_PRESENCE_ACCOUNTS} account ids")
        ids = [_parse_uuid("every account", n) for n in names]
        return cls(tuple(dict.fromkeys(ids)))


def _longpoll_query(max_s: int) -> Callable[[Mapping[str, str]], float]:
    def parse(query: Mapping[str, str]) -> float:
        _fields(query, "the query", (), ("timeout",))
        if "timeout" not in query:
            return float(min(DEFAULT_LONGPOLL_S, max_s))
        text = query["timeout"]
        if not _SECONDS_RE.fullmatch(text) or float(text) > max_s:
            raise _bad("invalid_parameter", f"timeout must be a number of seconds, 0..{max_s}")
        return float(text)
    return parse


# ---------------------------------------------------------------- routing

@attrs.frozen
class Call:
    """One validated request, as a handler sees it."""

    account: Account | None
    ids: Mapping[str, uuid.UUID]
    query: Any
    body: Any
    now_ms: int
    exchange: _Exchange
    #: the client's address (its host), for per-address limits
    client: str = ""
    #: path parameters that are names, not ids (a member's handle)
    names: Mapping[str, str] = attrs.Factory(dict)
    #: the token's account id (also when ``account`` was not read, see Endpoint)
    account_id: uuid.UUID | None = None
    #: when the bearer token expires (ms), for a renewal
    token_expires_ms: int | None = None


Handler = Callable[[Call], Awaitable[tuple[int, dict]]]


@attrs.frozen
class Endpoint:
    """One method of a route: its handler and how its input is read.

    ``query`` and ``body`` parse the decoded query parameters and the JSON object; None
    means the endpoint takes none (an empty body and ``{}`` are both "none").
    """

    handler: Handler
    authenticated: bool = True
    query: Callable[[Mapping[str, str]], Any] | None = None
    body: Callable[[Mapping[str, Any]], Any] | None = None
    #: the handler's own store transaction checks the token's account (that it exists and
    #: may use the cloud), so the pipeline reads no account first: one query less per
    #: request on the busiest route. The handler sees ``Call.account_id`` only.
    account_checked_by_handler: bool = False


@attrs.frozen
class Route:
    template: str
    endpoints: Mapping[bytes, Endpoint]
    #: the template's segments, parsed once: (parameter name, None) or (None, literal)
    _pattern: tuple[tuple[str | None, bytes | None], ...] = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(
            lambda self: tuple((part[1:-1], None) if part.startswith("{")
                               else (None, part.encode())
                               for part in self.template.split("/")[1:]),
            takes_self=True))

    def match(self, segments: list[bytes]) -> dict[str, bytes] | None:
        """The raw path parameters if *segments* has this route's shape, else None."""
        pattern = self._pattern
        if len(segments) != len(pattern):
            return None
        params = {}
        for (name, literal), segment in zip(pattern, segments, strict=True):
            if name is not None:
                params[name] = segment
            elif segment != literal:
                return None
        return params


@attrs.define
class _Exchange:
    """Whether the client is still there, and what to undo when it leaves."""

    disconnected: bool = False
    _on_lost: list[Callable[[], object]] = attrs.Factory(list)

    def lost(self, _reason: Failure) -> None:
        self.disconnected = True
        for undo in self._on_lost:
            undo()

    def on_lost(self, undo: Callable[[], object]) -> None:
        self._on_lost.append(undo)


class _BoundedRequest(server.Request):
    """A request that buffers at most the site's ``max_body_bytes`` of body.

    Past the limit (declared by Content-Length or reached while reading) the rest is read
    and dropped, and ``body_too_large`` tells the resource to answer 413.
    """

    body_too_large = False
    _body_bytes = 0

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body_bytes", 64 * 1024)

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        self.content = io.BytesIO()
        self._body_bytes = 0
        self.body_too_large = length is not None and length > self._limit()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._body_bytes += len(data)
        if not self.body_too_large and self._body_bytes > self._limit():
            self.body_too_large = True
            self.content = io.BytesIO()
        if not self.body_too_large:
            self.content.write(data)


class _Site(server.Site):
    requestFactory = _BoundedRequest
    protocol = ResponseChannel  # HTTP/1.1 only: no HTTP/2 negotiation without TLS anyway
    noisy = False  # no "Starting factory" log lines

    def log(self, request: server.Request) -> None:
        """No access log line: requests are counted and timed in ``cloud_api_request*``.
        (twisted.web formats one per request into the global log, where our observers
        drop it at info level anyway, at a cost on every request.)"""

    def __init__(self, root: resource.Resource, clock: IReactorTime,
                 max_body_bytes: int) -> None:
        super().__init__(root, reactor=clock, parsePOSTFormSubmission=False)
        self.max_body_bytes = max_body_bytes


@functools.cache
def _dummy_password_hash() -> str:
    """Checked when a login names no account (see ``_login``); its password is random."""
    return hash_password(uuid.uuid4().hex)


# ---------------------------------------------------------------- the API

class CloudAPI:
    """The cloud API's routes and handlers; ``site()`` serves them.

    Everything it uses is passed in: the transaction runner, the clock (current time and
    long-poll timeouts), the notification channel and the token secret.
    """

    def __init__(self, db: TransactionRunner, clock: IReactorTime,
                 channel: NotificationChannel, secret: bytes, *, token_ttl_s: int = 3600,
                 max_body_bytes: int = 64 * 1024, max_message_chars: int = MAX_MESSAGE_CHARS,
                 longpoll_max_s: int = 30,
                 password_check: Callable[[str, str], defer.Deferred] | None = None,
                 login_limits: LoginLimits | None = None,
                 password_hash: Callable[[str], defer.Deferred] | None = None,
                 recovery_limits: LoginLimits | None = None,
                 metrics: CollectorRegistry = REGISTRY,
                 worker: int | None = None) -> None:
        if token_ttl_s <= 0 or max_body_bytes <= 0 or max_message_chars <= 0:
            raise ValueError("token_ttl_s, max_body_bytes and max_message_chars must be > 0")
        if longpoll_max_s < 0:
            raise ValueError("longpoll_max_s must not be negative")
        self._db = db
        self._clock = clock
        # Slow hashing must not block the reactor: the composition root passes a check that
        # runs in a thread pool. The default (tests) runs it inline.
        self._password_check = password_check or (
            lambda password, encoded: defer.succeed(verify_password(password, encoded)))
        self._channel = channel
        #: what /metrics exposes (with several API processes: all of theirs, aggregated)
        self.metrics = metrics
        #: with several API processes: this one's index, in /v1/healthz
        self._health = {"ok": True} if worker is None else {
            "ok": True, "worker": worker, "pid": os.getpid()}
        self._secret = tokens.check_secret(secret)
        self._posts = PostBatcher(db, sender_phases=CLOUD_API_PHASES)
        #: token -> (account id, expiry ms) of tokens whose signature was checked: a client
        #: sends the same token with every request, and the HMAC and decoding cost more than
        #: the rest of the bearer check (the expiry is still checked every time).
        self._verified: dict[str, tuple[uuid.UUID, int]] = {}
        self._token_ttl_ms = token_ttl_s * 1000
        self.max_body_bytes = max_body_bytes
        # in the store: every API process of the deployment spends the same budgets
        self.login_limiter = LoginLimiter(db, clock, login_limits)
        self.recovery = Recovery(db, clock, self._password_check, password_hash,
                                 recovery_limits)
        self._routes = (
            Route("/v1/login", {b"POST": Endpoint(self._login, authenticated=False,
                                                  body=LoginRequest.from_json)}),
            Route("/v1/recover", {b"POST": Endpoint(self._recover, authenticated=False,
                                                    body=RecoverRequest.from_json)}),
            Route("/v1/healthz", {b"GET": Endpoint(self._healthz, authenticated=False)}),
            Route("/v1/token", {b"POST": Endpoint(self._renew_token)}),
            Route("/v1/conversations", {
                b"GET": Endpoint(self._list_conversations),
                b"POST": Endpoint(self._create_conversation, body=NewConversation.from_json)}),
            Route("/v1/conversations/{conversation_id}/members", {
                b"POST": Endpoint(self._add_member, body=MemberChange.from_json)}),
            Route("/v1/conversations/{conversation_id}/members/{handle}", {
                b"DELETE": Endpoint(self._remove_member)}),
            Route("/v1/conversations/{conversation_id}/messages", {
                b"GET": Endpoint(self._read_messages, query=SyncQuery.from_query),
                b"POST": Endpoint(self._post_message,
                                  body=PostMessageRequest.parser(max_message_chars),
                                  account_checked_by_handler=True)}),
            Route("/v1/presence", {
                b"GET": Endpoint(self._read_presence, query=PresenceQuery.from_query),
                b"PUT": Endpoint(self._set_presence, body=PresenceUpdate.from_json)}),
            Route("/v1/notifications", {
                b"GET": Endpoint(self._poll_notifications,
                                 query=_longpoll_query(longpoll_max_s))}),
            Route("/v1/notifications/{notification_id}/ack",
                  {b"POST": Endpoint(self._ack_notification)}),
        )

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def resource(self) -> resource.Resource:
        """The root resource (it handles every path itself)."""
        return CloudAPIResource(self)

    def site(self) -> server.Site:
        """An HTTP site serving the API; its timeouts run on the injected clock."""
        return _Site(self.resource(), self._clock, self.max_body_bytes)

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # ------------------------------------------------------------ request pipeline

    async def serve(self, request: server.Request) -> None:
        """Answer one request; never raises (every outcome becomes a JSON response)."""
        started = self._clock.seconds()
        exchange = _Exchange()
        request.notifyFinish().addErrback(exchange.lost)
        route_label = UNMATCHED
        headers: Mapping[str, str] = {}
        try:
            route, endpoint, raw_ids = self._match(request)
            route_label = route.template
            status, payload = await self._call(request, endpoint, raw_ids, exchange)
        except ApiError as e:
            status, headers = e.status, e.headers
            payload = {"error": {"code": e.code, "message": e.message}}
        except DatabaseUnavailable as e:
            log.warn("{route}: database unavailable: {why}", route=route_label, why=str(e))
            status, headers = 503, {"Retry-After": "1"}
            payload = {"error": {"code": "unavailable",
                                 "message": "the service is unavailable; try again shortly"}}
        except Exception as e:
            if isinstance(e, defer.CancelledError) and exchange.disconnected:
                self._count(route_label, CLIENT_GONE, started)  # we cancelled its wait
                return
            log.failure("{route}: unexpected error", route=route_label, level=LogLevel.error)
            status = 500
            payload = {"error": {"code": "internal",
                                 "message": "internal error; it has been logged"}}
        if exchange.disconnected:
            status = CLIENT_GONE
        else:
            _respond(request, status, payload, headers)
        self._count(route_label, status, started)

    def _count(self, route_label: str, status: int, started: float) -> None:
        REQUESTS.labels(route_label, str(status)).inc()
        REQUEST_SECONDS.labels(route_label).observe(max(0.0, self._clock.seconds() - started))

    def _match(self, request: server.Request) -> tuple[Route, Endpoint, dict[str, bytes]]:
        raw = request.path.split(b"/")
        if raw[0] != b"":
            raise ApiError(404, "not_found", "no such route")
        segments = [urllib.parse.unquote_to_bytes(s) for s in raw[1:]]
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            endpoint = route.endpoints.get(request.method)
            if endpoint is None:
                allowed = ", ".join(m.decode() for m in sorted(route.endpoints))
                raise ApiError(405, "method_not_allowed",
                               f"this route allows {allowed}", {"Allow": allowed})
            return route, endpoint, params
        raise ApiError(404, "not_found", "no such route")

    async def _call(self, request: server.Request, endpoint: Endpoint,
                    raw_ids: dict[str, bytes], exchange: _Exchange) -> tuple[int, dict]:
        body = self._read_body(request)
        account_id, expires_ms = (self._token_account_id(request) if endpoint.authenticated
                                  else (None, None))
        account = None
        if account_id is not None and not endpoint.account_checked_by_handler:
            account = await self._load_account(account_id)
        ids = {name: _path_uuid(value) for name, value in raw_ids.items()
               if name not in _NAME_PARAMS}
        names = {name: _path_name(value) for name, value in raw_ids.items()
                 if name in _NAME_PARAMS}
        query = _parse_query(request.uri)
        if endpoint.query is not None:
            query = endpoint.query(query)
        elif query:
            raise _bad("unknown_parameter", "this route takes no query parameters")
        obj = _parse_json(body)
        if endpoint.body is not None:
            if obj is None:
                raise _bad("missing_body", "this route needs a JSON object body")
            obj = endpoint.body(obj)
        elif obj:
            raise _bad("unknown_field", "this route takes no body")
        return await endpoint.handler(Call(account, ids, query, obj, self.now_ms(), exchange,
                                           _client_host(request), names, account_id,
                                           expires_ms))

    def _read_body(self, request: server.Request) -> bytes:
        """The body, or 413 when the declared or actual length is over the limit."""
        too_large = ApiError(413, "payload_too_large",
                             f"the body must be at most {self.max_body_bytes} bytes")
        if getattr(request, "body_too_large", False):
            raise too_large
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        body = request.content.read(self.max_body_bytes + 1) if request.content else b""
        if len(body) > self.max_body_bytes:
            raise too_large
        return body

    def _token_account_id(self, request: server.Request) -> tuple[uuid.UUID, int]:
        """The account id a valid bearer token names, and its expiry (ms); 401 for anything
        else."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            raise _unauthorized("a bearer token is required")
        try:
            header = values[0].decode("ascii")
        except UnicodeDecodeError:
            raise _unauthorized("malformed Authorization header") from None
        match = _BEARER_RE.fullmatch(header)
        if match is None:
            raise _unauthorized("a bearer token is required")
        token, now_ms = match.group(1), self.now_ms()
        known = self._verified.get(token)
        if known is not None and now_ms < known[1]:
            return known
        try:
            account_id, expires_ms = tokens.verify_with_expiry(self._secret, token, now_ms)
        except tokens.TokenError as e:
            raise _unauthorized(f"the token is not valid: {e.reason}") from None
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            self._verified.clear()  # crude, but bounded; a client re-verifies once
        self._verified[token] = (account_id, expires_ms)
        return account_id, expires_ms

    async def _load_account(self, account_id: uuid.UUID) -> Account:
        """The token's account: 401 if it is gone, 403 if it is back in phase legacy."""
        account = await self._store("get_account", accounts_store.get_account, account_id)
        if account is None:
            raise _unauthorized("the token's account no longer exists")
        if account.phase == "legacy":
            raise _not_migrated()
        return account

    async def _store(self, desc: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one store transaction named *desc*, turning the store's refusals into API
        errors."""
        return await _refusals_as_api_errors(self._db.run(desc, fn, *args))

    # ------------------------------------------------------------ handlers

    async def _healthz(self, call: Call) -> tuple[int, dict]:
        return 200, self._health

    async def _login(self, call: Call) -> tuple[int, dict]:
        login: LoginRequest = call.body
        limiter = self.login_limiter
        # An address that spent its budget is refused before it costs even a query.
        _refuse_if_limited(await limiter.address_wait_s(call.client))
        found = await self._store("account_for_login", accounts_store.account_for_login,
                                  login.login_name)
        account, password_hash = found if found is not None else (None, None)
        # account_for_login reads a UUID-shaped handle as an id: insist on what was asked.
        if account is not None and (
                (login.handle is not None and account.handle != login.handle)
                or (login.account_id is not None and account.account_id != login.account_id)):
            account = None
        # One budget per account, whether it is named by handle or by id.
        key = f"account:{account.account_id}" if account is not None \
            else f"name:{login.login_name}"
        _refuse_if_limited(await limiter.attempt(key, call.client))
        # The password is checked before the phase, so a refusal as not_migrated is no
        # hint to someone without the password that the account exists.
        # An unknown account is checked against a dummy hash of the same cost, so the
        # answer takes as long as for a wrong password: timing does not reveal accounts.
        ok = await self._password_check(
            login.password, password_hash if account is not None and password_hash
            else _dummy_password_hash())
        if account is None or not password_hash or not ok:
            LOGINS.labels("bad_credentials").inc()
            raise ApiError(401, "bad_credentials", "unknown account or wrong password")
        await limiter.succeeded(key, call.client)  # only failures spend the budget
        if account.phase == "legacy":
            LOGINS.labels("not_migrated").inc()
            raise _not_migrated()
        LOGINS.labels("ok").inc()
        return 200, self._token_for(account, call.now_ms)

    def _token_for(self, account: Account, now_ms: int) -> dict:
        token = tokens.issue(self._secret, account.account_id, now_ms, self._token_ttl_ms)
        # expires_in_ms as well: a client times its renewal by its own clock, which need
        # not agree with ours
        return {"token": token, "account_id": str(account.account_id),
                "expires_ms": now_ms + self._token_ttl_ms,
                "expires_in_ms": self._token_ttl_ms, "phase": account.phase}

    async def _renew_token(self, call: Call) -> tuple[int, dict]:
        """A fresh token for the bearer's account, so a client that stays in use is not
        logged out when its token expires. Only a valid token is renewed (an expired one
        means a new login), and none issued before the account's password last changed (a
        recovery): a session of whoever had the old password ends at its expiry."""
        account = call.account
        assert account is not None and call.token_expires_ms is not None
        # tokens carry their expiry only: issued a lifetime before it (a lifetime changed by
        # a restart with another --token-ttl shifts this by the difference, for one lifetime)
        issued_ms = call.token_expires_ms - self._token_ttl_ms
        changed_ms = await self._store("password_changed_ms",
                                       recovery_store.password_changed_ms, account.account_id)
        if changed_ms is not None and changed_ms >= issued_ms:
            raise _unauthorized("the password changed after this session began; "
                                "log in again with the new password")
        return 200, self._token_for(account, call.now_ms)

    async def _recover(self, call: Call) -> tuple[int, dict]:
        req: RecoverRequest = call.body
        try:
            return 200, await self.recovery.recover(req.handle, req.code, req.new_password,
                                                    call.client, call.now_ms)
        except RecoveryRefused as e:
            raise ApiError(e.status, e.code, e.message, e.headers) from None

    async def _list_conversations(self, call: Call) -> tuple[int, dict]:
        rows = await self._store("list_conversations", conversations_store.list_conversations,
                                 call.account.account_id)
        return 200, {"conversations": rows}

    async def _create_conversation(self, call: Call) -> tuple[int, dict]:
        new: NewConversation = call.body
        conversation_id = uuid.uuid4()
        members = await self._store(
            "create_conversation", conversations_store.create_conversation_with,
            conversation_id, call.account.account_id, list(new.members), new.title)
        return 201, {"conversation_id": str(conversation_id), "title": new.title,
                     "members": [str(m) for m in members]}

    async def _add_member(self, call: Call) -> tuple[int, dict]:
        change: MemberChange = call.body
        added = await self._store("add_member", conversations_store.add_member,
                                  call.ids["conversation_id"], call.account.account_id,
                                  change.handle, call.now_ms)
        return 200, {"handle": change.handle, "added": added}

    async def _remove_member(self, call: Call) -> tuple[int, dict]:
        handle = call.names["handle"]
        await self._store("remove_member", conversations_store.remove_member,
                          call.ids["conversation_id"], call.account.account_id, handle,
                          call.now_ms)
        return 200, {"handle": handle, "removed": True}

    async def _post_message(self, call: Call) -> tuple[int, dict]:
        post: PostMessageRequest = call.body
        message, created = await _refusals_as_api_errors(self._posts.post(Post(
            call.ids["conversation_id"], call.account_id, post.client_message_id, post.body,
            call.now_ms)))
        return (201 if created else 200), message.to_json()

    async def _read_messages(self, call: Call) -> tuple[int, dict]:
        q: SyncQuery = call.query
        messages = await self._store("sync_for_member", messages_store.sync_for_member,
                                     call.ids["conversation_id"],
                                     call.account.account_id, q.after, q.limit, q.before)
        reply = {"messages": [m.to_json() for m in messages],
                 "next_after": messages[-1].seq if messages else q.after}
        if q.before is not None:  # the cursor of the next older page
            reply["next_before"] = messages[0].seq if messages else q.before
        return 200, reply

    async def _set_presence(self, call: Call) -> tuple[int, dict]:
        update: PresenceUpdate = call.body
        presence = Presence(call.account.account_id, PRESENCE_SOURCE, update.status,
                            call.now_ms, call.now_ms + update.ttl_s * 1000)
        applied = await self._store("set_presence", presence_store.set_presence, presence)
        return 200, {"presence": _presence_json(presence), "applied": applied}

    async def _read_presence(self, call: Call) -> tuple[int, dict]:
        q: PresenceQuery = call.query
        live = await self._store("read_presence", presence_store.read_presence, list(q.accounts),
                                 call.now_ms)
        return 200, {"presence": {str(a): [_presence_json(p) for p in live.get(a, [])]
                                  for a in q.accounts}}

    async def _poll_notifications(self, call: Call) -> tuple[int, dict]:
        waiting = self._channel.wait(call.account.account_id, call.query)
        # A client that hangs up while parked must not leave its waiter (and timer) behind.
        call.exchange.on_lost(waiting.cancel)
        if call.exchange.disconnected:
            waiting.cancel()
        messages = await waiting
        return 200, {"notifications": [m.to_json() for m in messages]}

    async def _ack_notification(self, call: Call) -> tuple[int, dict]:
        account_id, notification_id = call.account.account_id, call.ids["notification_id"]
        if not await self._store("ack_notification", notifications_store.ack_notification,
                                 account_id, notification_id, call.now_ms):
            raise ApiError(404, "not_found", "no such notification for this account")
        self._channel.ack(account_id, notification_id)
        return 200, {"notification_id": str(notification_id), "acked": True}


class CloudAPIResource(resource.Resource):
    """The root resource: every path is routed by ``CloudAPI``, not by child resources."""

    isLeaf = True

    def __init__(self, api: CloudAPI) -> None:
        super().__init__()
        self._api = api
        self._web = WebClient()

    def render(self, request: server.Request) -> int | bytes:
        page = self._web.render(request)  # the web client's files: /, /app.js, /app.css
        if page is not None:
            return page
        if request.path == b"/metrics" and request.method in (b"GET", b"HEAD"):
            # Prometheus scrapes its text exposition format, not JSON. Rendered inline:
            # prometheus_client's MetricsResource needs the global reactor's thread pool.
            body = generate_latest(self._api.metrics)
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
            return body
        d = defer.Deferred.fromCoroutine(self._api.serve(request))
        d.addErrback(lambda f: log.failure("answering a request failed", f, LogLevel.error))
        return server.NOT_DONE_YET


# ---------------------------------------------------------------- helpers of the pipeline

async def _refusals_as_api_errors(result: Awaitable[Any]) -> Any:
    """Await a store call, turning the store's refusals into API errors."""
    try:
        return await result
    except NotFound as e:
        raise ApiError(404, "not_found", str(e)) from None
    except NotMember as e:
        raise ApiError(403, "not_member", str(e)) from None
    except UnknownAccount:
        raise _unauthorized("the token's account no longer exists") from None
    except PhaseRefused:
        raise _not_migrated() from None
    except Conflict as e:
        raise ApiError(409, "conflict", str(e)) from None
    except ValueError as e:
        raise _bad("invalid_request", str(e)) from None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def _refuse_if_limited(wait_s: float) -> None:
    """429 ``rate_limited`` with Retry-After when a failed-login budget is spent."""
    if wait_s > 0:
        LOGINS.labels("rate_limited").inc()
        retry = retry_after_header(wait_s)
        raise ApiError(429, "rate_limited",
                       f"too many failed logins for this account or address; retry in {retry} s",
                       {"Retry-After": retry})


def _client_host(request: server.Request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


def _not_migrated() -> ApiError:
    return ApiError(403, "not_migrated",
                    "this account is not migrated to the cloud yet; "
                    "keep using the legacy client for now")


def _path_uuid(segment: bytes) -> uuid.UUID:
    try:
        return _parse_uuid("id", segment.decode("ascii"))
    except (UnicodeDecodeError, ApiError):
        raise ApiError(404, "not_found", "no such resource (ids are UUIDs)") from None


#: Path parameters that are names (text), not UUIDs.
_NAME_PARAMS = frozenset({"handle"})


def _path_name(segment: bytes) -> str:
    """A name in a path (already percent-decoded); 404 unless it is text a handle can be."""
    try:
        return _check_text("handle", segment.decode("utf-8"), 1, MAX_HANDLE_CHARS)
    except (UnicodeDecodeError, ApiError):
        raise ApiError(404, "not_found", "no such member (not a valid handle)") from None


def _parse_query(uri: bytes) -> dict[str, str]:
    """Query parameters, strictly: UTF-8, well formed, each name at most once."""
    _, sep, raw = uri.partition(b"?")
    if not sep or not raw:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                       strict_parsing=True, errors="strict",
                                       max_num_fields=16)
    except ValueError:  # includes UnicodeDecodeError and too many fields
        raise _bad("invalid_query", "the query string is malformed") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise _bad("invalid_query", f"parameter {_name(name)} is repeated")
        query[name] = value
    return query


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _parse_json(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, None when it is empty; 400 for anything else."""
    if not body.strip():
        return None
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_object,
                         parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # bad UTF-8, bad JSON, huge numbers, deep nesting
        raise _bad("malformed_json", "the body is not valid JSON (UTF-8, unique keys)") from None
    if not isinstance(obj, dict):
        raise _bad("malformed_json", "the body must be a JSON object")
    return obj


def _presence_json(p: Presence) -> dict:
    return {"source": p.source, "status": p.status, "version": p.version,
            "expires_ms": p.expires_ms}


def _respond(request: server.Request, status: int, payload: dict,
             headers: Mapping[str, str]) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode("ascii")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    request.write(body)
    request.finish()
