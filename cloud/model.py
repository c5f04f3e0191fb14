"""Values of the cloud store: what goes in and comes out of its transactions."""

from __future__ import annotations

import uuid

import attrs

PHASES = ("legacy", "dual", "cloud", "cloud-only")
#: Phases whose users still have legacy clients (the bridge injects for them).
LEGACY_CLIENT_PHASES = ("legacy", "dual", "cloud")
#: Phases whose users have cloud devices (they are owed push notifications).
CLOUD_CLIENT_PHASES = ("dual", "cloud", "cloud-only")
PRESENCE_STATUSES = ("online", "away", "busy", "offline")
ORIGINS = ("cloud", "legacy")

# Limits shared with the legacy network (legacy.wire has the same numbers): the bridge
# mirrors every message and conversation both ways, so a limit larger on one side would let
# one stack accept what the other can never store (tests/bridge/test_limits.py checks them).
#: Characters (code points) in a message body.
MAX_MESSAGE_CHARS = 4000
#: Members of one conversation.
MAX_MEMBERS = 100


@attrs.frozen
class Account:
    account_id: uuid.UUID
    handle: str
    phase: str
    legacy_handle: str | None = None
    display_name: str = ""


#: A cloud message's GUID on the legacy network: this prefix and its message id (so the
#: bridge knows an echo of its own injection). The store writes it when it queues the
#: message for legacy, and clears it if legacy will never have the message.
CLOUD_GUID_PREFIX = "cloud:"
#: The same as SQL, around an expression of a message id (``str.format``'s ``{}``).
LEGACY_GUID_SQL = f"('{CLOUD_GUID_PREFIX}' || ({{}})::text)"


def cloud_message_guid(message_id: uuid.UUID) -> str:
    """The GUID a cloud message has on the legacy network (``CLOUD_GUID_PREFIX``)."""
    return f"{CLOUD_GUID_PREFIX}{message_id}"


@attrs.frozen
class Message:
    conversation_id: uuid.UUID
    seq: int
    message_id: uuid.UUID
    sender_account_id: uuid.UUID
    sender_handle: str
    sent_ms: int
    body: str
    origin: str
    legacy_guid: str | None = None
    client_message_id: str | None = None

    def to_json(self) -> dict:
        return {
            "conversation_id": str(self.conversation_id), "seq": self.seq,
            "message_id": str(self.message_id), "sender": str(self.sender_account_id),
            "sender_handle": self.sender_handle, "sent_ms": self.sent_ms, "body": self.body,
            "origin": self.origin, "client_message_id": self.client_message_id,
        }


@attrs.frozen
class MirroredMessage:
    """One message arriving from the legacy stack, already translated to cloud ids."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    legacy_guid: str
    sender_account_id: uuid.UUID
    sender_handle: str
    sent_ms: int
    body: str
    origin: str = "legacy"


@attrs.frozen
class FeedCheckpoint:
    """How far the bridge has read one legacy feed; committed with the data it covers.

    ``fence`` is the fencing token of the lease under which the writer works: a checkpoint
    row already written under a higher fence refuses a lower one (a stale worker).
    """

    source: str
    epoch: str
    offset: int
    fence: int = 0


@attrs.frozen
class MirrorBatch:
    messages: tuple[MirroredMessage, ...] = ()
    checkpoints: tuple[FeedCheckpoint, ...] = ()


@attrs.frozen
class MirrorResult:
    inserted: tuple[Message, ...]
    duplicates: int
    notifications: int


@attrs.frozen
class Digest:
    """(count, sum of message hashes mod 2**64), as in docs/digest.md."""

    count: int
    total: int


@attrs.frozen
class Presence:
    account_id: uuid.UUID
    source: str
    status: str
    version: int
    expires_ms: int


@attrs.frozen
class Notification:
    account_id: uuid.UUID
    notification_id: uuid.UUID
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    seq: int
    state: str
    attempts: int

    def to_json(self) -> dict:
        return {
            "notification_id": str(self.notification_id),
            "conversation_id": str(self.conversation_id),
            "message_id": str(self.message_id), "seq": self.seq,
        }
