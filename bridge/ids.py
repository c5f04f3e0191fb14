"""How legacy identifiers translate to cloud ones, and back: one deterministic rule each.

Deterministic (UUIDv5 under fixed namespaces) so that every bridge worker, every restart and
every reconciler computes the same cloud id for the same legacy id without a lookup, and a
replayed feed entry maps onto the row it already wrote.

    legacy handle   <->  cloud account id      (accounts.legacy_handle keeps the handle)
    legacy chat id  <->  cloud conversation id (conversations.legacy_chat_id keeps the chat id)
    legacy GUID     <->  cloud message id      (messages.legacy_guid keeps the GUID)

Things born on the cloud get made-up legacy ids that carry the cloud id, so both directions
round-trip: GUID ``cloud:<message id>``, chat id ``cloud:<conversation id>``.
"""

from __future__ import annotations

import functools
import hashlib
import uuid

from cloud.model import CLOUD_GUID_PREFIX, cloud_message_guid

_ROOT = uuid.UUID("6f1d2c3e-5b7a-4e0f-9a1b-2c3d4e5f6a7b")
ACCOUNTS = uuid.uuid5(_ROOT, "legacy-handle")
CONVERSATIONS = uuid.uuid5(_ROOT, "legacy-chat")
MESSAGES = uuid.uuid5(_ROOT, "legacy-guid")

#: Prefix of GUIDs and chat ids the bridge makes up for things born on the cloud (the store
#: writes a cloud message's GUID when it queues the message for legacy: ``cloud.model``).
CLOUD_PREFIX = CLOUD_GUID_PREFIX

#: Presence rows the bridge writes for legacy sources are named after the supernode:
#: ``legacy:<supernode id>``.
LEGACY_PRESENCE_PREFIX = "legacy:"


@functools.lru_cache(maxsize=65536)  # the same handles and chats recur in every batch
def account_id(handle: str) -> uuid.UUID:
    """The id the bridge gives the cloud account it creates for a legacy handle.

    Accounts that already exist (cloud-native ones, or linked earlier) are found by handle in
    the store; this is only the id of a new linked account.
    """
    return uuid.uuid5(ACCOUNTS, handle)


def _cloud_born(text: str) -> uuid.UUID | None:
    if text.startswith(CLOUD_PREFIX):
        try:
            return uuid.UUID(text[len(CLOUD_PREFIX):])
        except ValueError:
            return None
    return None


@functools.lru_cache(maxsize=65536)
def conversation_id(chat_id: str) -> uuid.UUID:
    """Conversation of a legacy chat: the original id for chats the bridge made up."""
    return _cloud_born(chat_id) or uuid.uuid5(CONVERSATIONS, chat_id)


def message_id(guid: str) -> uuid.UUID:
    """Message of a legacy GUID: the original id for GUIDs the bridge made up."""
    return _cloud_born(guid) or _uuid5(_MESSAGES_BYTES, guid)


_MESSAGES_BYTES = MESSAGES.bytes
#: RFC 4122 variant and version 5 bits, as ``uuid.UUID(bytes=..., version=5)`` sets them
_VERSION_CLEAR = ~((0xc000 << 48) | (0xf000 << 64))
_VERSION_5 = (0x8000 << 48) | (5 << 76)


def _uuid5(namespace: bytes, name: str) -> uuid.UUID:
    """``uuid.uuid5`` in 0.9 µs instead of 2.1: the same SHA-1 and bits, without
    ``UUID.__init__``'s argument parsing (every feed message needs one; equality with
    ``uuid.uuid5`` is tested)."""
    digest = _sha1(namespace + name.encode("utf-8")).digest()
    value = int.from_bytes(digest[:16], "big") & _VERSION_CLEAR | _VERSION_5
    made = _new(uuid.UUID)
    _set(made, "int", value)
    _set(made, "is_safe", _UNKNOWN_SAFETY)
    return made


# looked up once (an enum member read through its class costs a descriptor call)
_sha1, _new, _set, _UNKNOWN_SAFETY = (hashlib.sha1, object.__new__, object.__setattr__,
                                      uuid.SafeUUID.unknown)


def guid_for_cloud_message(message_id_: uuid.UUID) -> str:
    """The GUID a cloud message has on legacy: the one the store gave it."""
    return cloud_message_guid(message_id_)


def chat_for_cloud_conversation(conversation_id_: uuid.UUID) -> str:
    return f"{CLOUD_PREFIX}{conversation_id_}"
