"""Shared hypothesis strategies for the legacy wire format.

Every strategy is derived from the ``WIRE_FIELDS`` table of a wire class, so a new frame type
or field is covered without touching this module: ``frames()`` draws from every class in
``legacy.wire.FRAME_TYPES``. Lists are kept short so that a frame stays under
``MAX_FRAME_BYTES``; the rare frame that is still too large is filtered out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

from legacy import wire
from legacy.wire import codec

#: Lists drawn for a frame never hold more than this many items (the wire allows more).
MAX_DRAWN_ITEMS = 4

_INT_MAX = {wire.U8: 2**8 - 1, wire.U16: 2**16 - 1, wire.U32: 2**32 - 1, wire.U64: 2**64 - 1}


def utf8_text(limit: int) -> st.SearchStrategy[str]:
    """Text of at most *limit* UTF-8 bytes, often right at the limit for ASCII draws."""

    def clip(s: str) -> str:
        return s.encode("utf-8")[:limit].decode("utf-8", errors="ignore")

    return st.text(max_size=limit).map(clip)


def for_kind(kind: wire.Kind) -> st.SearchStrategy[Any]:
    """Values that the wire kind *kind* can encode."""
    if kind in _INT_MAX:
        return st.integers(min_value=0, max_value=_INT_MAX[kind])
    if kind is wire.BOOL:
        return st.booleans()
    if kind is wire.VERSION:  # validated on decode: dotted numbers (legacy.versions)
        return st.lists(st.integers(0, 65535), min_size=1, max_size=4).map(
            lambda ns: ".".join(map(str, ns)))
    if isinstance(kind, codec._Str):
        return utf8_text(kind.limit)
    if isinstance(kind, codec._Bytes):
        return st.binary(max_size=kind.limit)
    if isinstance(kind, codec._List):
        return st.lists(for_kind(kind.item), max_size=min(kind.limit, MAX_DRAWN_ITEMS)).map(tuple)
    if isinstance(kind, codec._Record):
        return values_of(kind.cls)
    raise TypeError(f"no strategy for wire kind {kind!r}")


def values_of(cls: type) -> st.SearchStrategy[Any]:
    """Instances of a wire class (nested value or frame), every field drawn from its kind."""
    return st.builds(cls, **{name: for_kind(kind) for name, kind in cls.WIRE_FIELDS})


def _encodable(f: Any) -> bool:
    try:
        wire.encode(f)
    except wire.WireError as e:
        if e.code == "too_large":
            return False
        raise
    return True


def frames_of(cls: type) -> st.SearchStrategy[Any]:
    """Frames of one type that fit in ``MAX_FRAME_BYTES``."""
    return values_of(cls).filter(_encodable)


def frames() -> st.SearchStrategy[Any]:
    """A frame of any type registered in ``legacy.wire.FRAME_TYPES``."""
    return st.one_of([frames_of(cls) for _, cls in sorted(wire.FRAME_TYPES.items())])


# -- nested values ------------------------------------------------------------------------------

def chat_messages() -> st.SearchStrategy[wire.ChatMessage]:
    return values_of(wire.ChatMessage)


def ranges() -> st.SearchStrategy[wire.Range]:
    return values_of(wire.Range)


def digests() -> st.SearchStrategy[wire.Digest]:
    return values_of(wire.Digest)


def supernode_addresses() -> st.SearchStrategy[wire.SupernodeAddress]:
    return values_of(wire.SupernodeAddress)


def account_records() -> st.SearchStrategy[wire.AccountRecord]:
    return values_of(wire.AccountRecord)


def chat_infos() -> st.SearchStrategy[wire.ChatInfo]:
    return values_of(wire.ChatInfo)


# -- HTTP requests (hostile input for the cloud API) -------------------------------------------
# (appended to this shared module, so the few imports these need are local to each function)

#: Headers a fuzzer leaves alone: they change HTTP framing, not what the application sees.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "expect",
                             "upgrade", "te", "host", "authorization"})

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def http_methods() -> st.SearchStrategy[bytes]:
    """Request methods: the usual ones (HEAD excepted: its answer has no body) and junk."""
    usual = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS",
                             b"TRACE", b"get", b"Post"])
    junk = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
    return st.one_of(usual, junk.filter(lambda m: m.upper() != b"HEAD"))


def path_segments() -> st.SearchStrategy[str]:
    """One path segment, percent-encoded so the request line stays valid HTTP."""
    from urllib.parse import quote

    return st.one_of(st.text(max_size=40).map(lambda s: quote(s, safe="")),
                     st.sampled_from(["", ".", "..", "%", "%zz", "%00", "%2F", "v1", "V1",
                                      "login", "messages", "ack", "null", "-1", "0" * 40]))


def not_uuid_text() -> st.SearchStrategy[str]:
    """Ids that are not a UUID in its canonical spelling, but often close (raw text:
    percent-encode it before it goes into a path)."""
    import re

    canonical = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
    near = st.uuids().flatmap(lambda u: st.sampled_from([
        u.hex, "{" + str(u) + "}", "urn:uuid:" + str(u), str(u)[:-1], str(u) + "0",
        str(u).replace("-", "_"), " " + str(u)]))
    arabic = st.just("\u0660" * 32)  # int() reads these as digits; a UUID they are not
    odd = st.sampled_from(["", ".", "..", "%", "/", "null", "-1", "0" * 32, "0" * 40])
    return st.one_of(near, arabic, odd, st.text(max_size=40)).filter(
        lambda s: not canonical.fullmatch(s))


def header_values() -> st.SearchStrategy[bytes]:
    """Header values without CR, LF or NUL (which would break the request's framing)."""
    return st.binary(max_size=60).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip())


def extra_headers() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """A few application-level headers with odd names and values (no framing headers)."""
    names = st.one_of(
        st.sampled_from([b"Content-Type", b"Accept", b"X-Request-Id", b"Cookie", b"Origin"]),
        st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=20).map(
            lambda s: b"X-" + s.encode()))
    pair = st.tuples(names, header_values()).filter(
        lambda p: p[0].decode().lower() not in FRAMING_HEADERS)
    return st.lists(pair, max_size=4)


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value: nested lists and objects of scalars, huge numbers, odd strings."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30),
                                                             max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
    return st.recursive(
        scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                         st.dictionaries(st.text(max_size=10), inner,
                                                         max_size=4)),
        max_leaves=max_leaves)


def malformed_json() -> st.SearchStrategy[bytes]:
    """Bodies a strict JSON reader refuses: not one JSON text in UTF-8, NaN, repeated keys,
    nesting or numbers too large to read. Never empty or just whitespace."""
    import json

    def broken(b: bytes) -> bool:
        try:
            json.loads(b.decode("utf-8"))
        except (ValueError, RecursionError):
            return bool(b.strip())
        return False

    crafted = st.sampled_from([
        b"{", b"}", b"[1,", b"{'a': 1}", b'{"a": NaN}', b'{"a": Infinity}', b"\xff\xfe{}",
        b'{"a":1,"a":2}', b"[" * 5000, b"1" * 5000, b'"\\ud800', b"{}{}", b"nul"])
    return st.one_of(crafted, st.binary(min_size=1, max_size=200).filter(broken))


def pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """*data* cut into pieces of the drawn *sizes* (the rest in one last piece): how bytes
    arrive over TCP, for the tests that feed servers hostile input."""
    pos = 0
    for n in sizes:
        if pos >= len(data):
            return
        yield data[pos:pos + n]
        pos += n
    if pos < len(data):
        yield data[pos:]
