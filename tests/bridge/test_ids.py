"""bridge.ids: the translation rules are deterministic and round-trip for cloud-born ids."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from bridge import ids


@given(st.text(min_size=1, max_size=40))
def test_legacy_ids_map_deterministically_and_distinctly_per_kind(text):
    """The same legacy id always gives the same cloud id; kinds never collide."""
    assert ids.account_id(text) == ids.account_id(text)
    if not text.startswith(ids.CLOUD_PREFIX):
        assert len({ids.account_id(text), ids.conversation_id(text), ids.message_id(text)}) == 3


@given(st.uuids())
def test_cloud_born_ids_round_trip(u):
    """A cloud message or conversation keeps its id through its made-up legacy id."""
    assert ids.message_id(ids.guid_for_cloud_message(u)) == u
    assert ids.conversation_id(ids.chat_for_cloud_conversation(u)) == u


def test_a_malformed_cloud_prefix_is_just_a_legacy_id():
    """'cloud:' followed by something that is not a UUID is hashed like any legacy id."""
    assert ids.message_id("cloud:nope") == uuid.uuid5(ids.MESSAGES, "cloud:nope")


@given(st.text(max_size=300))
def test_message_ids_are_exactly_uuid5_of_the_guid(guid):
    """The fast UUIDv5 is the standard one: same value, version, variant, text, hash and
    ordering, so ids written before it and after it are the same ids."""
    made, standard = ids.message_id(guid), uuid.uuid5(ids.MESSAGES, guid)
    if guid.startswith(ids.CLOUD_PREFIX) and made != standard:
        return  # a cloud-born GUID carries its own id (tested above)
    assert made == standard and str(made) == str(standard) and hash(made) == hash(standard)
    assert (made.version, made.variant, made.bytes) == (5, uuid.RFC_4122, standard.bytes)
    assert not made < standard and not made > standard
