"""The two stacks' input limits agree: the bridge mirrors every message and chat both ways, so
a limit larger on one side would let that stack accept what the other can never carry."""

from __future__ import annotations

import pytest

from cloud import model
from legacy import wire


def test_message_and_member_limits_are_the_same_on_both_stacks():
    assert wire.MAX_MESSAGE_CHARS == model.MAX_MESSAGE_CHARS
    assert wire.MAX_MEMBERS == model.MAX_MEMBERS


def test_the_longest_allowed_message_fits_every_legacy_frame_in_any_script():
    """The worst case in UTF-8 is four bytes a character (emoji): a body at the limit, in a
    chat at the member limit with names at their limit, still encodes into one frame under
    MAX_FRAME_BYTES and decodes to the same text, as a client's Send and as a delivery."""
    body = "\U0001F600" * wire.MAX_MESSAGE_CHARS
    name = "n" * wire.MAX_NAME_BYTES
    members = tuple(f"{i:03d}".ljust(wire.MAX_NAME_BYTES, "u") for i in range(wire.MAX_MEMBERS))
    msg = wire.ChatMessage(chat_id=name, guid=name, legacy_seq=2**63, sender=name,
                           ts_ms=2**62, body=body, origin=name)
    for frame in (wire.Send(guid=name, chat_id=name, members=members, body=body),
                  wire.DeliverLocal(home_sn=name, recipients=members, message=msg)):
        data = wire.encode(frame)
        assert len(data) <= wire.MAX_FRAME_BYTES
        assert wire.decode(data) == frame


def test_a_chat_at_the_member_limit_encodes_and_one_more_is_refused():
    members = tuple(f"user{i:03d}" for i in range(wire.MAX_MEMBERS))
    frame = wire.Send(guid="g", chat_id="c", members=members, body="hi")
    assert wire.decode(wire.encode(frame)).members == members
    too_many = wire.Send(guid="g", chat_id="c", members=(*members, "one-more"), body="hi")
    with pytest.raises(wire.WireError, match=f"at most {wire.MAX_MEMBERS} items"):
        wire.encode(too_many)
