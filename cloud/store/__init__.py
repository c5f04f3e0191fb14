"""The cloud store's transactions, one module per domain: one function per transaction,
each safe to run twice.

Every function takes a psycopg connection that is already inside a transaction (see
``cloud.db``) and the current time in milliseconds from the caller's injected clock. SQL is
always parameterised. A reader finds the SQL for a concept by its module's name:

    errors         what the store refuses (StoreError and its codes)
    accounts       accounts, handles, logins, migration phases
    conversations  conversations, members, the legacy chat id map
    messages       post and sync; who is owed a notification for a new message
    mirror         the bridge's bulk write of mirrored messages (COPY, staging)
    coordination   leases and fencing, workers' heartbeats, feed checkpoints
    findings       divergences opened for the reconcilers
    digests        range digests, their GUIDs and messages (docs/digest.md)
    presence       presence per account and source
    notifications  the notification outbox and acknowledgements
    outbox         the outbox to legacy
    audit          the audit log: one row per operator action and per repair
    controls       operator switches for the whole deployment (the migration freeze, the
                   runtime controls: pauses, the injector's concurrency)

Callers import the domain they need as ``<domain>_store`` (``from cloud.store import
outbox as outbox_store``), and the exceptions from ``cloud.store.errors``.
"""
