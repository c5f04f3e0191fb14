"""The legacy wire protocol: versioned, length-prefixed binary frames.

On the wire a frame is::

    u32 length | u8 version | u8 type | payload

The length prefix is handled by ``Int32StringReceiver`` (see ``legacy.framing``); this module
encodes and strictly decodes what follows it. Every frame type is a frozen attrs class whose
fields carry a wire kind in their metadata, so the schema is declared once and both directions
follow it. Decoding never trusts the input: wrong version, unknown type, a length that runs
past the end, invalid UTF-8, trailing bytes or a value out of range all raise ``WireError``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs

PROTOCOL_VERSION = 1
#: Hard maximum for one frame (version + type + payload). Larger frames close the connection.
MAX_FRAME_BYTES = 64 * 1024
# The message and member limits are the cloud store's too (cloud.model has the same numbers):
# the bridge mirrors every message and chat both ways, so a limit larger here than there
# would let this network accept what the cloud can never store (tests/bridge/test_limits.py).
#: Characters (code points) in a message body; supernodes refuse longer ones ("too_long").
MAX_MESSAGE_CHARS = 4000
#: Bytes of a text field on the wire: any body of MAX_MESSAGE_CHARS characters fits in UTF-8.
MAX_BODY_BYTES = 4 * MAX_MESSAGE_CHARS
#: Members of one chat (a longer list does not decode: "too_long").
MAX_MEMBERS = 100
MAX_NAME_BYTES = 128


class WireError(ValueError):
    """A frame that cannot be decoded or encoded; the connection that sent it is closed."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


# -- field kinds -------------------------------------------------------------------------------
#
# Each kind writes its strict encoding and decoding as lines of Python source
# (``encode_lines``, ``decode_lines``), and both are compiled from them: one function per
# kind, and one per record class that holds its fields' lines in a row (a nested record's
# too), so a frame is written or read without a call per field. On one machine a feed
# message decoded field by field in 4.1 us and encoded (checked, then written) in 3.5 us;
# compiled, 2.9 and 1.6-2.0 us. The bridge decodes every message of the legacy network once,
# a supernode encodes each for every subscriber. The checks exist once, as source: encoding
# checks every value as it writes it.

class Kind:
    """One wire field kind: appends a checked value, reads one back strictly."""

    def encode(self, value: Any, out: list[bytes]) -> None:
        """Append *value* to *out*; ``WireError`` if it can not be encoded with this kind."""
        _compiled(self, "encode")(value, out)

    def decode(self, buf: bytes, pos: int) -> tuple[Any, int]:
        """Read one value of this kind from *buf* at *pos*: ``(value, next pos)``."""
        return _compiled(self, "decode")(buf, pos)

    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        """Source lines that check the variable *value* and append its encoding with
        ``append``, raising ``WireError`` for a value this kind can not encode. Objects the
        lines use are put in *env*; *names* gives fresh variable names."""
        raise NotImplementedError

    def decode_lines(self, out: str, env: dict[str, Any], names: _Names) -> list[str]:
        """Source lines that read a value from ``buf`` at ``pos`` (``n`` is ``len(buf)``)
        into the variable *out* and advance ``pos``, raising ``WireError`` on bad input."""
        raise NotImplementedError


class _Names:
    """Fresh variable names for one compiled function (nested records need their own)."""

    def __init__(self) -> None:
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"_{stem}{self.count}"


_HEADS = {"encode": ("def encode(value, out):", "    append = out.append"),
          "decode": ("def decode(buf, pos):", "    n = len(buf)")}
_TAILS = {"encode": (), "decode": ("    return value, pos",)}


def _compiled(kind: Kind, which: str) -> Callable[..., Any]:
    """*kind*'s compiled ``encode`` or ``decode``, compiled on first use and kept on it."""
    fn = kind.__dict__.get(which)
    if fn is None:
        fn = _compile(kind, which)
        setattr(kind, which, fn)
    return fn


def _compile(kind: Kind, which: str) -> Callable[..., Any]:
    """A function from *kind*'s ``encode_lines`` or ``decode_lines``."""
    env: dict[str, Any] = {"WireError": WireError}
    body = getattr(kind, f"{which}_lines")("value", env, _Names())
    source = "\n".join([*_HEADS[which], *("    " + line for line in body), *_TAILS[which]])
    name = getattr(kind, "cls", type(kind)).__name__
    exec(compile(source, f"<wire {which} {name}>", "exec"), env)  # noqa: S102 - our own source
    return env[which]


class _Int(Kind):
    def __init__(self, fmt: str) -> None:
        self._struct = struct.Struct(">" + fmt)
        self._size = self._struct.size
        self._max = (1 << (8 * self._size)) - 1

    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        pack = names.fresh("pack")
        env[pack] = self._struct.pack
        return [f"if type({value}) is not int or not 0 <= {value} <= {self._max}:",
                f"    raise WireError('range', f'{{{value}!r}} is not an unsigned "
                f"{8 * self._size}-bit int')",
                f"append({pack}({value}))"]

    def decode_lines(self, out: str, env: dict[str, Any], names: _Names) -> list[str]:
        unpack = names.fresh("unpack")
        env[unpack] = self._struct.unpack_from
        return [f"if pos + {self._size} > n:",
                "    raise WireError('truncated', 'integer runs past the end of the frame')",
                f"{out} = {unpack}(buf, pos)[0]",
                f"pos += {self._size}"]


class _Bool(Kind):
    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        return [f"if type({value}) is not bool:",
                f"    raise WireError('range', f'{{{value}!r}} is not a bool')",
                f"append(b'\\x01' if {value} else b'\\x00')"]

    def decode_lines(self, out: str, env: dict[str, Any], names: _Names) -> list[str]:
        return ["if pos >= n:",
                "    raise WireError('truncated', 'bool runs past the end of the frame')",
                f"{out} = buf[pos]",
                f"if {out} > 1:",
                f"    raise WireError('range', f'bool byte {{{out}}} is neither 0 nor 1')",
                f"{out} = {out} == 1",
                "pos += 1"]


_U16 = struct.Struct(">H")


class _Bytes(Kind):
    """u16 length + raw bytes, at most *limit* bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        env["_u16"] = _U16.pack
        return [f"if type({value}) is not bytes or len({value}) > {self.limit}:",
                f"    raise WireError('range', 'bytes field must be at most {self.limit} "
                "bytes')",
                f"append(_u16(len({value})))",
                f"append({value})"]

    def decode_lines(self, out: str, env: dict[str, Any], names: _Names) -> list[str]:
        # the length is checked, then the field is read; ``end`` is where it stops
        return ["end = pos + 2",
                "if end > n:",
                "    raise WireError('truncated', 'length runs past the end of the frame')",
                "end += (buf[pos] << 8) | buf[pos + 1]",
                f"if end - pos - 2 > {self.limit}:",
                f"    raise WireError('too_long', f'field of {{end - pos - 2}} bytes exceeds "
                f"{self.limit}')",
                "if end > n:",
                "    raise WireError('truncated', 'field runs past the end of the frame')",
                *self._value_lines(out),
                "pos = end"]

    def _value_lines(self, out: str) -> list[str]:
        return [f"{out} = bytes(buf[pos + 2:end])"]


class _Str(_Bytes):
    """u16 length + UTF-8, strictly decoded, at most *limit* encoded bytes."""

    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        env["_u16"] = _U16.pack
        data = names.fresh("data")
        return [f"if type({value}) is not str:",
                f"    raise WireError('range', f'{{{value}!r}} is not a string')",
                "try:",
                f"    {data} = {value}.encode()",
                "except UnicodeEncodeError as e:",
                "    raise WireError('utf8', 'string is not encodable as UTF-8') from e",
                f"if len({data}) > {self.limit}:",
                f"    raise WireError('too_long', f'string of {{len({data})}} bytes exceeds "
                f"{self.limit}')",
                f"append(_u16(len({data})))",
                f"append({data})"]

    def _value_lines(self, out: str) -> list[str]:
        # bytes.decode is UTF-8 and strict by default, and quicker to call than str()
        return ["try:",
                f"    {out} = buf[pos + 2:end].decode()",
                "except UnicodeDecodeError as e:",
                "    raise WireError('utf8', 'string field is not valid UTF-8') from e"]


class _List(Kind):
    """u16 count + items of one kind, at most *limit* items."""

    def __init__(self, item: Kind, limit: int) -> None:
        self.item = item
        self.limit = limit

    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        # the items are written by the item kind's compiled encoder, one call each
        env["_u16"] = _U16.pack
        item, enc = names.fresh("item"), names.fresh("enc")
        env[enc] = _compiled(self.item, "encode")
        return [f"if type({value}) is not tuple or len({value}) > {self.limit}:",
                f"    raise WireError('range', 'list must be a tuple of at most {self.limit} "
                "items')",
                f"append(_u16(len({value})))",
                f"for {item} in {value}:",
                f"    {enc}({item}, out)"]

    def decode_lines(self, out: str, env: dict[str, Any], names: _Names) -> list[str]:
        # the items are read by the item kind's compiled decoder, one call each
        items, count, dec = names.fresh("items"), names.fresh("count"), names.fresh("item")
        env[dec] = _compiled(self.item, "decode")
        return ["if pos + 2 > n:",
                "    raise WireError('truncated', 'list count runs past the end of the frame')",
                f"{count} = (buf[pos] << 8) | buf[pos + 1]",
                "pos += 2",
                f"if {count} > {self.limit}:",
                f"    raise WireError('too_long', f'list of {{{count}}} items exceeds "
                f"{self.limit}')",
                f"{items} = []",
                f"for _ in range({count}):",
                f"    {out}, pos = {dec}(buf, pos)",
                f"    {items}.append({out})",
                f"{out} = tuple({items})"]


class _Record(Kind):
    """A nested attrs value encoded field by field."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def encode_lines(self, value: str, env: dict[str, Any], names: _Names) -> list[str]:
        # every field's lines in a row, nested records' too
        cls = names.fresh("cls")
        env[cls] = self.cls
        lines = [f"if not isinstance({value}, {cls}):",
                 f"    raise WireError('range', f'{{{value}!r}} is not a "
                 f"{self.cls.__name__}')"]
        for name, kind in self.cls.WIRE_FIELDS:
            var = names.fresh("v")
            lines += [f"{var} = {value}.{name}", *kind.encode_lines(var, env, names)]
        return lines

    def decode_lines(self, out: str, env: dict[str, Any], names: _Names) -> list[str]:
        # every field's lines in a row, nested records' too; then one call of the class
        cls = names.fresh("cls")
        env[cls] = self.cls
        fields = [names.fresh("f") for _ in self.cls.WIRE_FIELDS]
        lines = []
        for var, (_name, kind) in zip(fields, self.cls.WIRE_FIELDS, strict=True):
            lines += kind.decode_lines(var, env, names)
        return [*lines,
                "try:",
                f"    {out} = {cls}({', '.join(fields)})",
                "except (ValueError, TypeError) as e:",
                f"    raise WireError('invalid', f'{self.cls.__name__}: {{e}}') from e"]


U8 = _Int("B")
U16 = _Int("H")
U32 = _Int("I")
U64 = _Int("Q")
BOOL = _Bool()
NAME = _Str(MAX_NAME_BYTES)
TEXT = _Str(MAX_BODY_BYTES)
SHORT_BYTES = _Bytes(256)
MEMBERS = _List(NAME, MAX_MEMBERS)


def list_of(kind: Kind, limit: int = 4096) -> _List:
    """A list field of *kind* with at most *limit* items (the frame size still bounds it)."""
    return _List(kind, limit)


def record(cls: type) -> _Record:
    """A field holding a nested value class (one declared with ``@value``)."""
    return _Record(cls)


def w(kind: Kind, **kw: Any) -> Any:
    """Declare an attrs field with its wire kind (list fields accept any iterable)."""
    if isinstance(kind, _List):
        kw.setdefault("converter", tuple)
    return attrs.field(metadata={"wire": kind}, **kw)


def _collect(cls: type) -> type:
    cls.WIRE_FIELDS = tuple((f.name, f.metadata["wire"]) for f in attrs.fields(cls))
    return cls


def value(cls: type) -> type:
    """Class decorator for nested wire values: frozen attrs plus the field table."""
    return _collect(attrs.frozen(cls))


FRAME_TYPES: dict[int, type] = {}


def frame(type_id: int) -> Callable[[type], type]:
    """Class decorator registering a frame type under its one-byte type id."""

    def register(cls: type) -> type:
        if type_id in FRAME_TYPES:
            raise RuntimeError(f"frame type {type_id:#x} registered twice")
        cls = _collect(attrs.frozen(cls))
        cls.TYPE_ID = type_id
        cls._record = _Record(cls)
        FRAME_TYPES[type_id] = cls
        return cls

    return register


def encode(f: Any) -> bytes:
    """Encode a frame (without the u32 length prefix). Raises ``WireError`` for bad values."""
    out = [bytes((PROTOCOL_VERSION, type(f).TYPE_ID))]
    type(f)._record.encode(f, out)
    data = b"".join(out)
    if len(data) > MAX_FRAME_BYTES:
        raise WireError("too_large", f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def decode(data: bytes) -> Any:
    """Strictly decode one frame body (what follows the length prefix)."""
    if type(data) is not bytes:
        data = bytes(data)  # a bytearray or memoryview (the compiled readers slice bytes)
    if len(data) > MAX_FRAME_BYTES:
        raise WireError("too_large", f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    if len(data) < 2:
        raise WireError("truncated", "frame shorter than its header")
    version, type_id = data[0], data[1]
    if version != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {version} is not {PROTOCOL_VERSION}")
    cls = FRAME_TYPES.get(type_id)
    if cls is None:
        raise WireError("unknown_type", f"unknown frame type {type_id:#04x}")
    f, pos = cls._record.decode(data, 2)
    if pos != len(data):
        raise WireError("trailing", f"{len(data) - pos} bytes after the end of {cls.__name__}")
    return f


# -- nested values -------------------------------------------------------------------------------

@value
class SupernodeAddress:
    sn_id: str = w(NAME)
    host: str = w(NAME)
    port: int = w(U16)


@value
class ChatMessage:
    """One message as the legacy network stores and forwards it."""

    chat_id: str = w(NAME)
    guid: str = w(NAME)
    legacy_seq: int = w(U64)
    sender: str = w(NAME)
    ts_ms: int = w(U64)
    body: str = w(TEXT)
    origin: str = w(NAME)


@value
class Range:
    """A digest range: one conversation, a time window [start_ms, end_ms), a GUID-hash prefix."""

    chat_id: str = w(NAME)
    start_ms: int = w(U64)
    end_ms: int = w(U64)
    prefix_bits: int = w(U8)
    prefix: int = w(U32)


@value
class Digest:
    count: int = w(U64)
    total: int = w(U64)


@value
class AccountRecord:
    handle: str = w(NAME)
    password_hash: str = w(NAME)
    moved: bool = w(BOOL)


@value
class ChatInfo:
    chat_id: str = w(NAME)
    members: tuple = w(MEMBERS)
    last_seq: int = w(U64)


# -- handshake ---------------------------------------------------------------------------------

@frame(0x01)
class Challenge:
    """Server -> any: first frame on every connection; the nonce is what peers sign."""

    nonce: bytes = w(SHORT_BYTES)
    server_id: str = w(NAME)


@frame(0x02)
class ClientLogin:
    """Client -> SN: present the login server's credential."""

    handle: str = w(NAME)
    device: str = w(NAME)
    expires_ms: int = w(U64)
    signature: bytes = w(SHORT_BYTES)


@frame(0x03)
class PeerAuth:
    """SN or privileged peer -> server: HMAC(secret, nonce | role | name)."""

    role: str = w(NAME)
    name: str = w(NAME)
    proof: bytes = w(SHORT_BYTES)


@frame(0x04)
class Welcome:
    server_id: str = w(NAME)
    epoch: int = w(U64)


@frame(0x05)
class Error:
    """Fatal: the sender closes the connection after this frame."""

    code: str = w(NAME)
    reason: str = w(TEXT)


# -- login server ------------------------------------------------------------------------------

@frame(0x10)
class LoginRequest:
    handle: str = w(NAME)
    password: str = w(NAME)


@frame(0x11)
class Credential:
    handle: str = w(NAME)
    expires_ms: int = w(U64)
    signature: bytes = w(SHORT_BYTES)
    supernodes: tuple = w(list_of(record(SupernodeAddress)))


@frame(0x12)
class HostCacheRequest:
    pass


@frame(0x13)
class HostCache:
    supernodes: tuple = w(list_of(record(SupernodeAddress)))


@frame(0x14)
class AccountsRequest:
    req_id: int = w(U32)
    after: str = w(NAME)
    limit: int = w(U16)


@frame(0x15)
class AccountsPage:
    req_id: int = w(U32)
    accounts: tuple = w(list_of(record(AccountRecord)))
    done: bool = w(BOOL)


@frame(0x16)
class SetMoved:
    req_id: int = w(U32)
    handle: str = w(NAME)
    moved: bool = w(BOOL)


@frame(0x17)
class Ack:
    req_id: int = w(U32)
    status: str = w(NAME)
    value: int = w(U64)


@frame(0x18)
class RequestFailed:
    """Non-fatal answer to one request; the connection stays open."""

    req_id: int = w(U32)
    code: str = w(NAME)
    reason: str = w(TEXT)


# -- client <-> supernode -----------------------------------------------------------------------

@frame(0x20)
class Send:
    guid: str = w(NAME)
    chat_id: str = w(NAME)
    members: tuple = w(MEMBERS)
    body: str = w(TEXT)


@frame(0x21)
class SendAck:
    guid: str = w(NAME)
    chat_id: str = w(NAME)
    legacy_seq: int = w(U64)
    ts_ms: int = w(U64)


@frame(0x22)
class Deliver:
    message: ChatMessage = w(record(ChatMessage))


@frame(0x23)
class SetPresence:
    status: str = w(NAME)


@frame(0x24)
class Subscribe:
    handles: tuple = w(list_of(NAME, 1000))


@frame(0x25)
class PresenceNotice:
    handle: str = w(NAME)
    status: str = w(NAME)
    version: int = w(U64)
    expires_ms: int = w(U64)


# -- supernode <-> supernode ---------------------------------------------------------------------

@frame(0x30)
class RouteSend:
    """Sender's SN -> home SN of the chat."""

    from_sn: str = w(NAME)
    sender: str = w(NAME)
    device: str = w(NAME)
    guid: str = w(NAME)
    chat_id: str = w(NAME)
    members: tuple = w(MEMBERS)
    body: str = w(TEXT)


@frame(0x31)
class RouteAck:
    """Home SN -> sender's SN: the message has its legacy_seq."""

    sender: str = w(NAME)
    device: str = w(NAME)
    guid: str = w(NAME)
    chat_id: str = w(NAME)
    legacy_seq: int = w(U64)
    ts_ms: int = w(U64)


@frame(0x32)
class RouteToIndex:
    """Home SN -> index owner of the recipients: deliver where they are online."""

    from_sn: str = w(NAME)
    recipients: tuple = w(MEMBERS)
    message: ChatMessage = w(record(ChatMessage))


@frame(0x33)
class DeliverLocal:
    """Index owner or home SN -> the SN the recipients are attached to."""

    home_sn: str = w(NAME)
    recipients: tuple = w(MEMBERS)
    message: ChatMessage = w(record(ChatMessage))


@frame(0x34)
class HoldBack:
    """-> home SN: these recipients are offline; hold the message for them."""

    recipients: tuple = w(MEMBERS)
    chat_id: str = w(NAME)
    guid: str = w(NAME)


@frame(0x35)
class HoldNote:
    """Home SN -> index owner: messages are held for *recipient* at *home_sn*."""

    recipient: str = w(NAME)
    home_sn: str = w(NAME)


@frame(0x36)
class IndexPut:
    """User's SN -> index owner: the handle is online (or not) at *sn_id*."""

    handle: str = w(NAME)
    sn_id: str = w(NAME)
    online: bool = w(BOOL)
    expires_ms: int = w(U64)
    version: int = w(U64)  # per (handle, sn): a delayed older put never overrides a newer one


@frame(0x37)
class FlushHeld:
    """Index owner -> home SN: deliver what you hold for *recipient* at *sn_id*."""

    recipient: str = w(NAME)
    sn_id: str = w(NAME)


@frame(0x38)
class PresencePublish:
    """User's SN -> index owner (the presence hub of the handle).

    ``source`` is the publishing SN's id (or ``peer:<origin>`` for injected presence): the
    hub keeps one entry per source and merges them, so a device logging off on one SN does
    not hide the user's device online on another."""

    handle: str = w(NAME)
    status: str = w(NAME)
    version: int = w(U64)
    expires_ms: int = w(U64)
    origin: str = w(NAME)
    source: str = w(NAME)


@frame(0x39)
class PresenceSubscribe:
    """Subscriber's SN -> index owner of *handle*."""

    handle: str = w(NAME)
    subscriber_sn: str = w(NAME)


@frame(0x3A)
class PresenceFanout:
    """Index owner -> subscriber SNs."""

    handle: str = w(NAME)
    status: str = w(NAME)
    version: int = w(U64)
    expires_ms: int = w(U64)


# -- privileged peer <-> supernode ---------------------------------------------------------------

@frame(0x40)
class FeedSubscribe:
    epoch: int = w(U64)
    offset: int = w(U64)
    window: int = w(U32)


@frame(0x41)
class FeedStatus:
    """Answer to FeedSubscribe. ``gap`` is ``none``, ``epoch`` or ``expired``; a gap covers
    offsets [gap_from, gap_to) of the old epoch (``gap_to`` is 0 when unknown)."""

    epoch: int = w(U64)
    first_offset: int = w(U64)
    next_offset: int = w(U64)
    gap: str = w(NAME)
    gap_epoch: int = w(U64)
    gap_from: int = w(U64)
    gap_to: int = w(U64)


@frame(0x42)
class FeedCredit:
    count: int = w(U32)


@frame(0x43)
class FeedMessage:
    offset: int = w(U64)
    message: ChatMessage = w(record(ChatMessage))


@frame(0x44)
class FeedPresence:
    offset: int = w(U64)
    handle: str = w(NAME)
    status: str = w(NAME)
    version: int = w(U64)
    expires_ms: int = w(U64)
    origin: str = w(NAME)


@frame(0x45)
class FeedChat:
    offset: int = w(U64)
    chat_id: str = w(NAME)
    members: tuple = w(MEMBERS)


@frame(0x50)
class DigestRequest:
    """Digests of *range* split into 2**split_bits sub-ranges by the next GUID-hash bits."""

    req_id: int = w(U32)
    range: Range = w(record(Range))
    split_bits: int = w(U8)


@frame(0x51)
class DigestReply:
    req_id: int = w(U32)
    digests: tuple = w(list_of(record(Digest), 256))


@frame(0x52)
class ListRequest:
    req_id: int = w(U32)
    range: Range = w(record(Range))
    limit: int = w(U16)


@frame(0x53)
class ListReply:
    req_id: int = w(U32)
    guids: tuple = w(list_of(NAME))
    truncated: bool = w(BOOL)


@frame(0x54)
class FetchRequest:
    req_id: int = w(U32)
    chat_id: str = w(NAME)
    guids: tuple = w(list_of(NAME, 256))


@frame(0x55)
class FetchReply:
    req_id: int = w(U32)
    messages: tuple = w(list_of(record(ChatMessage), 256))
    missing: tuple = w(list_of(NAME, 256))


@frame(0x56)
class InjectMessage:
    """Peer -> home SN: append *message* (GUID and origin chosen by the injector)."""

    req_id: int = w(U32)
    message: ChatMessage = w(record(ChatMessage))
    members: tuple = w(MEMBERS)


@frame(0x57)
class InjectPresence:
    req_id: int = w(U32)
    handle: str = w(NAME)
    status: str = w(NAME)
    ttl_ms: int = w(U32)
    origin: str = w(NAME)


@frame(0x58)
class ChatsRequest:
    req_id: int = w(U32)
    after: str = w(NAME)
    limit: int = w(U16)


@frame(0x59)
class ChatsReply:
    req_id: int = w(U32)
    chats: tuple = w(list_of(record(ChatInfo), 512))
    done: bool = w(BOOL)


#: Frames an authenticated ordinary client may send to a supernode.
CLIENT_FRAMES = (Send, SetPresence, Subscribe)
#: Frames only an authenticated supernode may send.
SUPERNODE_FRAMES = (RouteSend, RouteAck, RouteToIndex, DeliverLocal, HoldBack, HoldNote,
                    IndexPut, FlushHeld, PresencePublish, PresenceSubscribe, PresenceFanout)
#: Frames only an authenticated privileged peer (bridge, reconciler) may send.
PEER_FRAMES = (FeedSubscribe, FeedCredit, DigestRequest, ListRequest, FetchRequest,
               InjectMessage, InjectPresence, ChatsRequest, HostCacheRequest)
