"""The legacy wire protocol's frames: every message kind, its type id and its fields.

Each frame is a frozen attrs class registered with ``@frame(type_id)``; each field names its
wire kind (``legacy.wire.codec``), so this table is the whole schema. The groups below follow
who may send what: the handshake, the login server, client <-> supernode, supernode <->
supernode, privileged peer <-> supernode; ``CLIENT_FRAMES``, ``SUPERNODE_FRAMES`` and
``PEER_FRAMES`` at the end are what each authenticated role may send.

The module is long (about 630 lines) because it is the whole schema: every frame of every
role sits in one table, so a reader checks the protocol, and a fuzzer covers it, in one place.
"""

from __future__ import annotations

from typing import Any

from legacy import versions
from legacy.wire.codec import BOOL, U8, U16, U32, U64, blob, frame, list_of, record, text, value, w

# The message and member limits are the cloud store's too (cloud.model has the same numbers):
# the bridge mirrors every message and chat both ways, so a limit larger here than there
# would let this network accept what the cloud can never store (tests/bridge/test_limits.py).
#: Characters (code points) in a message body; supernodes refuse longer ones ("too_long").
MAX_MESSAGE_CHARS = 4000
#: Bytes of a text field on the wire: any body of MAX_MESSAGE_CHARS characters fits in UTF-8.
MAX_BODY_BYTES = 4 * MAX_MESSAGE_CHARS
#: Members of one chat (a longer list does not decode: "too_long").
MAX_MEMBERS = 100
#: The longest presence a privileged peer may inject (InjectPresence.ttl_ms).
MAX_PRESENCE_TTL_MS = 3_600_000
MAX_NAME_BYTES = 128
#: Entries of one PresenceFanout frame: even with the longest names it stays under 64 KiB.
MAX_FANOUT_ENTRIES = 200
#: Messages in one InjectBatch (and results in its reply); the frame size bounds it too.
MAX_INJECT_BATCH = 64
#: Bytes of a refusal's reason in an InjectBatchReply: 64 results stay far under a frame.
MAX_REASON_BYTES = 256
#: The field kinds of this protocol: names and ids, message bodies, nonces and proofs, members.
NAME = text(MAX_NAME_BYTES)
#: A client version on the wire (``legacy.versions``: ``7.4``, ``8.0.1``).
VERSION = text(32)
#: Handles in one SetMinVersion frame (a larger cohort's rule is sent in several).
MAX_RULE_HANDLES = 400
TEXT = text(MAX_BODY_BYTES)
SHORT_BYTES = blob(256)
MEMBERS = list_of(NAME, MAX_MEMBERS)


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
class PresenceState:
    """One handle's merged presence at its hub, as a subscriber's supernode sees it."""

    handle: str = w(NAME)
    status: str = w(NAME)
    version: int = w(U64)
    expires_ms: int = w(U64)


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
class InjectResult:
    """What the home did with one message of an InjectBatch: ``new`` or ``duplicate``, with
    its ``legacy_seq``; or ``failed``, with a ``code`` (``bad_message``: refused for good)
    and a ``reason``."""

    status: str = w(NAME)
    legacy_seq: int = w(U64)
    code: str = w(NAME, default="")
    reason: str = w(text(MAX_REASON_BYTES), default="")


@value
class AccountRecord:
    handle: str = w(NAME)
    password_hash: str = w(NAME)
    moved: bool = w(BOOL)


def _version(_inst: Any, _attr: Any, v: str) -> None:
    versions.parse_version(v)


def _version_or_none(_inst: Any, _attr: Any, v: str) -> None:
    if v:
        versions.parse_version(v)


@value
class VersionCount:
    """Logins at the login server that reported *version* (``0``: none reported)."""

    version: str = w(VERSION, validator=_version)
    logins: int = w(U64)
    handles: int = w(U32)


@value
class MinVersionRule:
    """A minimum client version, for everyone (*cohort* empty) or one cohort's handles."""

    cohort: str = w(NAME)
    version: str = w(VERSION, validator=_version)
    handles: int = w(U32)


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


@frame(0x1D)
class SetPasswordHash:
    """Peer -> login server: the account's password is now the one *password_hash* (the
    ``pbkdf2_sha256$...`` form) was made from; the old one stops working. Answered with
    ``Ack`` (status ``ok``) or ``RequestFailed`` (``unknown_handle``, ``bad_hash``)."""

    req_id: int = w(U32)
    handle: str = w(NAME)
    password_hash: str = w(NAME)


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


@frame(0x19)
class VersionedLoginRequest:
    """A ``LoginRequest`` that reports the client's version (a client that sends the plain
    ``LoginRequest`` has version ``0``); refused with ``Error(code="upgrade_required")``
    when the version is below the minimum that applies to the handle."""

    handle: str = w(NAME)
    password: str = w(NAME)
    client_version: str = w(VERSION, validator=_version)


@frame(0x1A)
class SetMinVersion:
    """Peer -> login server: set the minimum version of *cohort* ("": everyone) to
    *version*, or clear it (*version* ""). A cohort's *handles* replace its members, or with
    *append* add to those of the rule in place (a cohort larger than one frame)."""

    req_id: int = w(U32)
    cohort: str = w(NAME)
    version: str = w(VERSION, validator=_version_or_none)
    handles: tuple = w(list_of(NAME, MAX_RULE_HANDLES))
    append: bool = w(BOOL)


@frame(0x1B)
class VersionsRequest:
    req_id: int = w(U32)


@frame(0x1C)
class VersionsReply:
    """The versions reported since the login server started, and the rules it holds."""

    req_id: int = w(U32)
    versions: tuple = w(list_of(record(VersionCount), 256))
    rules: tuple = w(list_of(record(MinVersionRule), 256))


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


@frame(0x26)
class OfflineReply:
    """Supernode -> client: the answer to the offline-message request its login made
    (``legacy.supernode.offline``), *waited_ms* after the request (its time in the queue)."""

    waited_ms: int = w(U32)


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
    """Index owner -> one subscriber SN: the merged presence of some handles it watches.

    A hub sends each subscriber one frame for everything that changed in one moment (a
    refresh round changes hundreds of handles at once), in frames of at most
    ``MAX_FANOUT_ENTRIES`` entries. Protocol version 2; in version 1 it carried one handle."""

    entries: tuple = w(list_of(record(PresenceState), MAX_FANOUT_ENTRIES))


# -- privileged peer <-> supernode ---------------------------------------------------------------

@frame(0x40)
class FeedSubscribe:
    epoch: int = w(U64)
    offset: int = w(U64)
    window: int = w(U32)


@frame(0x41)
class FeedStatus:
    """Answer to FeedSubscribe. ``gap`` is ``none``, ``epoch``, ``expired`` or ``ahead`` (the
    asked offset is beyond this feed's end in its own epoch: another incarnation's, read
    from ``first_offset`` again); a gap covers offsets [gap_from, gap_to) of ``gap_epoch``
    (``gap_to`` is 0 when unknown). The stream goes on from ``first_offset`` after a gap."""

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
    """A chat's member list changed (or the chat was created) at its home.

    ``origin`` says who changed it: ``legacy`` for a legacy client's send (its list replaces
    the chat's), else the origin mark of the privileged peer whose injection did (the bridge
    mirrors only ``legacy`` changes, so its own never come back as changes)."""

    offset: int = w(U64)
    chat_id: str = w(NAME)
    members: tuple = w(MEMBERS)
    origin: str = w(NAME, default="legacy")


@frame(0x46)
class FeedSubscribeOnly:
    """Peer -> SN: ``FeedSubscribe``, but the messages and presence changes of any origin
    other than *origin* are left out (member lists are always sent). Each run of left-out
    entries comes as one ``FeedSkipped``, so offsets stay continuous and a gap is still a
    ``FeedStatus``. The bridge asks for ``legacy`` alone: its own injections would only come
    back to be decoded and dropped."""

    epoch: int = w(U64)
    offset: int = w(U64)
    window: int = w(U32)
    origin: str = w(NAME)


@frame(0x47)
class FeedSkipped:
    """SN -> peer: the entries [offset, next_offset) were left out by ``FeedSubscribeOnly``.
    It takes one credit, as any feed frame does."""

    offset: int = w(U64)
    next_offset: int = w(U64)


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


@frame(0x5B)
class InjectBatch:
    """Peer -> home SN: append *messages* to *chat_id* in order, as InjectMessage would each
    (every message's ``chat_id`` is the batch's; one member list for all of them). Answered
    by one ``InjectBatchReply``, or ``RequestFailed`` (``not_home``) for the whole batch.
    The items are applied one by one: a refused one (``bad_message``) does not stop the
    rest."""

    req_id: int = w(U32)
    chat_id: str = w(NAME)
    members: tuple = w(MEMBERS)
    messages: tuple = w(list_of(record(ChatMessage), MAX_INJECT_BATCH))


@frame(0x5C)
class InjectBatchReply:
    """Home SN -> peer: one result per message of the InjectBatch, in its order."""

    req_id: int = w(U32)
    results: tuple = w(list_of(record(InjectResult), MAX_INJECT_BATCH))


@frame(0x5A)
class InjectMembership:
    """Peer -> home SN: change a chat's member list by a delta (add, then remove), on behalf
    of the other stack. Answered ``Ack`` (status ``changed``, ``unchanged`` or ``no_chat``,
    value: the members the chat has after it) or ``RequestFailed`` (``bad_members``,
    ``not_home``)."""

    req_id: int = w(U32)
    chat_id: str = w(NAME)
    add: tuple = w(MEMBERS)
    remove: tuple = w(MEMBERS)
    origin: str = w(NAME)


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
PEER_FRAMES = (FeedSubscribe, FeedSubscribeOnly, FeedCredit, DigestRequest, ListRequest,
               FetchRequest, InjectMessage, InjectBatch, InjectPresence, InjectMembership,
               ChatsRequest, HostCacheRequest)
