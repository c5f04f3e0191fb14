"""Shared hypothesis strategies for the legacy wire format.

Every strategy is derived from the ``WIRE_FIELDS`` table of a wire class, so a new frame type
or field is covered without touching this module: ``frames()`` draws from every class in
``legacy.wire.FRAME_TYPES``. Lists are kept short so that a frame stays under
``MAX_FRAME_BYTES``; the rare frame that is still too large is filtered out.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from legacy import wire

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
    if isinstance(kind, wire._Str):
        return utf8_text(kind.limit)
    if isinstance(kind, wire._Bytes):
        return st.binary(max_size=kind.limit)
    if isinstance(kind, wire._List):
        return st.lists(for_kind(kind.item), max_size=min(kind.limit, MAX_DRAWN_ITEMS)).map(tuple)
    if isinstance(kind, wire._Record):
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
