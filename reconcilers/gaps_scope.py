"""Targeted gaps runs: the conversations ``reconcile gaps --account`` / ``--conversation``
compare.

A scope is resolved by the command before anything runs, in one read transaction: an
unknown account or conversation is refused there (exit 2) and nothing changes. The run then
picks its conversations from it::

    --account REF        the conversations with a legacy chat the account is a member of on
                         the cloud, and the chats every supernode lists it as a member of
                         (one listing of each supernode's chats, as a full pass starts
                         with), so a chat the cloud has never seen is compared too
    --conversation ID    that one conversation (by its id or its legacy chat id); it must be
                         known to the cloud store, and no supernode is listed

The label (``account:HANDLE``, ``conversation:UUID``) is the run's ``reconcile_runs.scope``:
a targeted run resumes only an interrupted run with the same label, never the full pass's
cursor (``reconcilers.runner.start_run``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
import psycopg

from cloud import admin
from cloud.store import conversations as conversations_store


class UnknownScope(ValueError):
    """The account or conversation a targeted run names does not exist (nothing ran)."""


@attrs.frozen
class GapsScope:
    """What a targeted gaps run compares (see the module docstring)."""

    #: ``reconcile_runs.scope``: 'account:HANDLE' or 'conversation:UUID'
    label: str
    account_id: uuid.UUID | None = None
    #: the account's handle on the legacy network (the chats legacy lists it in)
    legacy_handle: str | None = None
    chat_id: str | None = None
    conversation_id: uuid.UUID | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"label": self.label,
                "account_id": None if self.account_id is None else str(self.account_id),
                "conversation_id": (None if self.conversation_id is None
                                    else str(self.conversation_id)),
                "chat_id": self.chat_id}

    def keeps_listed(self, chat_id: str, members: Sequence[str]) -> bool:
        """Is this chat, as a supernode lists it, in the scope?"""
        if self.chat_id is not None:
            return chat_id == self.chat_id
        return self.legacy_handle in members


def resolve_account(conn: psycopg.Connection, ref: str) -> GapsScope:
    """The scope of ``--account REF`` (a handle or an account id)."""
    found, unknown = admin.find_accounts(conn, [ref])
    if unknown:
        raise UnknownScope(f"unknown account: {ref!r}")
    account = found[0]
    return GapsScope(label=f"account:{account.handle}", account_id=account.account_id,
                     legacy_handle=account.legacy_handle or account.handle)


def resolve_conversation(conn: psycopg.Connection, ref: str) -> GapsScope:
    """The scope of ``--conversation ID`` (a conversation id, or its legacy chat id)."""
    found = conversations_store.find_legacy_chat(conn, ref)
    if found is None:
        raise UnknownScope(f"unknown conversation: {ref!r} (give a conversation id or a "
                           f"legacy chat id the cloud store knows; the gaps reconciler "
                           f"compares conversations that have a legacy chat)")
    chat_id, conversation_id = found
    return GapsScope(label=f"conversation:{conversation_id}", chat_id=chat_id,
                     conversation_id=conversation_id)


def cloud_chats(conn: psycopg.Connection, scope: GapsScope) -> dict[str, uuid.UUID]:
    """The scope's chats the cloud store knows: chat id -> conversation id."""
    if scope.chat_id is not None:
        return {scope.chat_id: scope.conversation_id}
    return conversations_store.account_legacy_chats(conn, scope.account_id)
