"""The legacy wire format: every frame round-trips, and decoding trusts nothing."""

from __future__ import annotations

import struct
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from legacy import wire
from legacy.wire import codec
from tests.strategies import frames, frames_of

FRAME_CLASSES = [cls for _, cls in sorted(wire.FRAME_TYPES.items())]
UNKNOWN_TYPE_IDS = [t for t in range(256) if t not in wire.FRAME_TYPES]


def _code(data: bytes) -> str:
    with pytest.raises(wire.WireError) as info:
        wire.decode(data)
    return info.value.code


def _encode_code(f: Any) -> str:
    with pytest.raises(wire.WireError) as info:
        wire.encode(f)
    return info.value.code


def _str_field(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


# -- round trips --------------------------------------------------------------------------------

@given(frames())
def test_any_frame_round_trips(f):
    """decode(encode(f)) == f for a frame of any registered type."""
    data = wire.encode(f)
    assert data[:2] == bytes((wire.PROTOCOL_VERSION, type(f).TYPE_ID))
    assert len(data) <= wire.MAX_FRAME_BYTES
    assert wire.decode(data) == f
    assert wire.decode(memoryview(data)) == wire.decode(bytearray(data)) == f


@pytest.mark.parametrize("cls", FRAME_CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_each_frame_type_round_trips(cls, data):
    """Every type id in FRAME_TYPES encodes and decodes back to an equal frame of that type."""
    f = data.draw(frames_of(cls))
    decoded = wire.decode(wire.encode(f))
    assert type(decoded) is cls
    assert decoded == f


def test_frame_of_exactly_max_bytes_round_trips():
    """A frame of exactly MAX_FRAME_BYTES is legal; one byte more is refused by encode."""
    # 2 header + 4 req_id + 2 count + 1 bool = 9; 504 names of 2+128 bytes + one of 2+5 = 65527.
    guids = ("g" * 128,) * 504 + ("x" * 5,)
    f = wire.ListReply(req_id=7, guids=guids, truncated=True)
    data = wire.encode(f)
    assert len(data) == wire.MAX_FRAME_BYTES
    assert wire.decode(data) == f
    assert _encode_code(attrs.evolve(f, guids=guids[:-1] + ("x" * 6,))) == "too_large"


def test_list_at_its_limit_round_trips():
    """A member list of exactly MAX_MEMBERS names is accepted both ways."""
    members = tuple(f"m{i}" for i in range(wire.MAX_MEMBERS))
    f = wire.Send(guid="g", chat_id="c", members=members, body="")
    assert wire.decode(wire.encode(f)) == f


def test_inject_batch_of_max_items_round_trips_and_its_reply_always_fits():
    """An InjectBatch of MAX_INJECT_BATCH messages round-trips; a reply with that many
    results, each with the longest reason, stays under MAX_FRAME_BYTES; one item more is
    refused both ways."""
    msg = wire.ChatMessage(chat_id="c", guid="g", legacy_seq=0, sender="a", ts_ms=1,
                           body="b" * 100, origin="cloud")
    batch = wire.InjectBatch(req_id=1, chat_id="c", members=("a", "b"),
                             messages=(msg,) * wire.MAX_INJECT_BATCH)
    assert wire.decode(wire.encode(batch)) == batch
    result = wire.InjectResult(status="failed", legacy_seq=2**64 - 1, code="c" * 128,
                               reason="r" * wire.MAX_REASON_BYTES)
    reply = wire.InjectBatchReply(req_id=1, results=(result,) * wire.MAX_INJECT_BATCH)
    assert len(wire.encode(reply)) < wire.MAX_FRAME_BYTES
    assert wire.decode(wire.encode(reply)) == reply
    assert _encode_code(attrs.evolve(batch, messages=batch.messages + (msg,))) == "range"
    too_long = attrs.evolve(result, reason="r" * (wire.MAX_REASON_BYTES + 1))
    assert _encode_code(wire.InjectBatchReply(req_id=1, results=(too_long,))) == "too_long"


# -- strict decoding ----------------------------------------------------------------------------

@given(frames(), st.integers(0, 255).filter(lambda v: v != wire.PROTOCOL_VERSION))
def test_wrong_version_is_refused(f, version):
    """A frame with any other protocol version byte is refused with code 'version'."""
    data = wire.encode(f)
    assert _code(bytes((version,)) + data[1:]) == "version"


@given(st.sampled_from(UNKNOWN_TYPE_IDS), st.binary(max_size=64))
def test_unknown_type_is_refused(type_id, payload):
    """A type id that no frame class is registered under is refused with 'unknown_type'."""
    assert _code(bytes((wire.PROTOCOL_VERSION, type_id)) + payload) == "unknown_type"


@given(frames().filter(lambda f: len(wire.encode(f)) <= 4096))
def test_truncated_at_every_position_is_refused(f):
    """Every proper prefix of a valid frame is refused with 'truncated'."""
    data = wire.encode(f)
    for i in range(len(data)):
        assert _code(data[:i]) == "truncated", i


@given(frames(), st.binary(min_size=1, max_size=32))
def test_trailing_bytes_are_refused(f, extra):
    """Bytes after the last field of a valid frame are refused with 'trailing'."""
    assert _code(wire.encode(f) + extra) == "trailing"


@pytest.mark.parametrize("bad", [b"\xff", b"a\x80b", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82",
                                 b"\xf4\x90\x80\x80"],
                         ids=["ff", "lone-continuation", "overlong", "surrogate", "cut-short",
                              "above-u10ffff"])
def test_invalid_utf8_in_a_string_field_is_refused(bad):
    """A string field holding invalid UTF-8 is refused with 'utf8', at top level and nested."""
    header = bytes((wire.PROTOCOL_VERSION, wire.LoginRequest.TYPE_ID))
    login = header + _str_field(bad) + _str_field(b"pw")
    assert _code(login) == "utf8"
    msg = wire.ChatMessage(chat_id="c", guid="g", legacy_seq=1, sender="s", ts_ms=2,
                           body="PLACEHOLDER", origin="legacy")
    good = wire.encode(wire.Deliver(message=msg))
    nested = good.replace(_str_field(b"PLACEHOLDER"), _str_field(bad))
    assert _code(nested) == "utf8"


@given(st.integers(2, 255), st.booleans())
def test_bool_byte_other_than_0_or_1_is_refused(byte, moved):
    """A bool byte of 2 or more is refused with 'range'."""
    data = wire.encode(wire.SetMoved(req_id=1, handle="h", moved=moved))
    assert data[-1] in (0, 1)
    assert _code(data[:-1] + bytes((byte,))) == "range"


LIST_FIELDS = [(cls, name, kind) for cls in FRAME_CLASSES for name, kind in cls.WIRE_FIELDS
               if isinstance(kind, codec._List)]


@pytest.mark.parametrize("cls,name,kind", LIST_FIELDS,
                         ids=[f"{c.__name__}.{n}" for c, n, _ in LIST_FIELDS])
@given(data=st.data(), extra=st.integers(1, 100))
def test_list_count_above_its_limit_is_refused(cls, name, kind, data, extra):
    """A list count above the field's limit is refused with 'too_long' before reading items."""
    f = data.draw(frames_of(cls))
    out = [bytes((wire.PROTOCOL_VERSION, cls.TYPE_ID))]
    for field, k in cls.WIRE_FIELDS:
        if field == name:
            out.append(struct.pack(">H", min(kind.limit + extra, 0xFFFF)))
            break
        k.encode(getattr(f, field), out)
    assert _code(b"".join(out)) == "too_long"


def test_string_longer_than_its_limit_is_refused():
    """A NAME field whose length prefix exceeds 128 bytes is refused with 'too_long'."""
    header = bytes((wire.PROTOCOL_VERSION, wire.LoginRequest.TYPE_ID))
    data = header + _str_field(b"a" * 129) + _str_field(b"")
    assert _code(data) == "too_long"


@pytest.mark.parametrize("size", [wire.MAX_FRAME_BYTES + 1, 2 * wire.MAX_FRAME_BYTES])
def test_frame_above_max_bytes_is_refused(size):
    """Input longer than MAX_FRAME_BYTES is refused with 'too_large' before anything else."""
    data = bytes((wire.PROTOCOL_VERSION, wire.ListReply.TYPE_ID)) + b"\x00" * (size - 2)
    assert _code(data) == "too_large"


@pytest.mark.parametrize("data", [b"", b"\x01"])
def test_frame_shorter_than_its_header_is_refused(data):
    """Fewer than two bytes is refused with 'truncated'."""
    assert _code(data) == "truncated"


# -- encode refuses what it cannot represent ----------------------------------------------------

def _ack(**kw: Any) -> wire.Ack:
    fields = {"req_id": 1, "status": "ok", "value": 0}
    fields.update(kw)
    return wire.Ack(**fields)


@pytest.mark.parametrize("f,code", [
    (_ack(value=-1), "range"),
    (_ack(value=2**64), "range"),
    (_ack(req_id=-1), "range"),
    (_ack(req_id=2**32), "range"),
    (_ack(value=True), "range"),
    (_ack(value=1.0), "range"),
    (wire.ListRequest(req_id=1, range=wire.Range(chat_id="c", start_ms=0, end_ms=1,
                                                 prefix_bits=256, prefix=0), limit=0), "range"),
    (_ack(status="s" * 129), "too_long"),
    (_ack(status="é" * 65), "too_long"),
    (_ack(status="\ud800"), "utf8"),
    (_ack(status=b"ok"), "range"),
    (wire.Error(code="c", reason="x" * (wire.MAX_BODY_BYTES + 1)), "too_long"),
    (wire.Challenge(nonce=b"n" * 257, server_id="s"), "range"),
    (wire.Challenge(nonce="nonce", server_id="s"), "range"),
    (wire.SetMoved(req_id=1, handle="h", moved=1), "range"),
    (wire.Send(guid="g", chat_id="c", members=[f"m{i}" for i in range(101)], body=""), "range"),
    (wire.Deliver(message="not a message"), "range"),
    (wire.FetchReply(req_id=1, messages=[wire.ChatMessage(
        chat_id="c", guid=f"g{i}", legacy_seq=i, sender="s", ts_ms=0,
        body="b" * wire.MAX_BODY_BYTES, origin="legacy") for i in range(8)], missing=()),
     "too_large"),
], ids=["u64-negative", "u64-2**64", "u32-negative", "u32-2**32", "int-bool", "int-float",
        "u8-256-nested", "name-129", "name-130-utf8", "surrogate", "name-bytes", "text-max+1",
        "bytes-257", "bytes-str", "bool-int", "members-101", "record-wrong-type", "frame-72k"])
def test_encode_refuses_values_out_of_range(f, code):
    """encode raises WireError for negative or too-large ints, over-long strings and lists."""
    assert _encode_code(f) == code



def test_coders_are_compiled_once(monkeypatch):
    """Each kind's encoder and decoder are compiled on first use and kept: encoding and
    decoding the same frames again (a list of records, a nested record, a list of names)
    compiles nothing more."""
    compiled = []
    real = codec._compile

    def counting(kind, which):
        compiled.append((kind, which))
        return real(kind, which)

    monkeypatch.setattr(codec, "_compile", counting)
    msg = wire.ChatMessage(chat_id="c", guid="g", legacy_seq=1, sender="s", ts_ms=2, body="b",
                           origin="legacy")
    frames_ = [wire.FetchReply(req_id=1, messages=(msg, msg), missing=("g2",)),
               wire.FeedMessage(offset=1, message=msg),
               wire.FeedChat(offset=2, chat_id="c", members=("a", "b", "c"))]
    data = [wire.encode(f) for f in frames_]
    assert [wire.decode(d) for d in data] == frames_
    first = len(compiled)
    assert [wire.encode(f) for f in frames_ * 3] == data * 3
    assert [wire.decode(d) for d in data * 3] == frames_ * 3
    assert len(compiled) == first
