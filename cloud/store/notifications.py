"""The notification outbox: claiming due notifications, recording pushes and their errors,
acknowledgements. The rows are written with their message (``cloud.store.messages``).
"""

from __future__ import annotations

import uuid

import attrs
import psycopg
from psycopg.rows import tuple_row

from cloud.model import Notification

_NOTIFICATION_COLS = ("account_id, notification_id, conversation_id, message_id, seq, state, "
                      "attempts")


def claim_due_notifications(conn: psycopg.Connection, now_ms: int, limit: int,
                            resend_after_ms: int, max_attempts: int
                            ) -> tuple[list[Notification], list[Notification]]:
    """Take up to *limit* notifications that are due: ``(to_push, now_failed)``.

    A due notification is pending, or sent but not acknowledged by its resend time. Each one
    taken counts an attempt and is rescheduled *resend_after_ms* ahead before it is pushed,
    so a dispatcher that dies mid-push loses nothing: the row comes due again. One that has
    used *max_attempts* becomes ``failed`` with an open finding instead.
    """
    rows = conn.execute(
        f"SELECT {_NOTIFICATION_COLS} FROM notifications "
        "WHERE state IN ('pending', 'sent') AND next_attempt_ms <= %s "
        "ORDER BY next_attempt_ms LIMIT %s FOR UPDATE SKIP LOCKED",
        (now_ms, limit)).fetchall()
    to_push, failed = [], []
    for r in rows:
        n = Notification(*r)
        if n.attempts >= max_attempts:
            conn.execute(
                "UPDATE notifications SET state = 'failed', "
                "last_error = coalesce(last_error, 'never acknowledged') "
                "WHERE account_id = %s AND notification_id = %s",
                (n.account_id, n.notification_id))
            conn.execute(
                "INSERT INTO reconcile_findings (kind, state, conversation_id, account_id, "
                "detail, created_ms) VALUES ('notification_failed', 'open', %s, %s, "
                "jsonb_build_object('notification_id', %s::text, 'attempts', %s::int), %s)",
                (n.conversation_id, n.account_id, str(n.notification_id), n.attempts, now_ms))
            failed.append(n)
        else:
            conn.execute(
                "UPDATE notifications SET attempts = attempts + 1, next_attempt_ms = %s "
                "WHERE account_id = %s AND notification_id = %s",
                (now_ms + resend_after_ms, n.account_id, n.notification_id))
            to_push.append(attrs.evolve(n, attempts=n.attempts + 1))
    return to_push, failed


def mark_notification_sent(conn: psycopg.Connection, account_id: uuid.UUID,
                           notification_id: uuid.UUID, now_ms: int,
                           resend_at_ms: int | None = None) -> None:
    """The gateway accepted the push (which is not proof of delivery: wait for the ack).

    *resend_at_ms* restarts the acknowledgement window from now (the claim set one from the
    claim time, which a slow gateway would otherwise eat into).
    """
    conn.execute(
        "UPDATE notifications SET state = 'sent', sent_ms = %s, last_error = NULL, "
        "next_attempt_ms = coalesce(%s, next_attempt_ms) "
        "WHERE account_id = %s AND notification_id = %s AND state IN ('pending', 'sent')",
        (now_ms, resend_at_ms, account_id, notification_id))


def mark_notification_error(conn: psycopg.Connection, account_id: uuid.UUID,
                            notification_id: uuid.UUID, error: str, retry_at_ms: int) -> None:
    """The gateway refused the push; try again at *retry_at_ms*."""
    conn.execute(
        "UPDATE notifications SET last_error = %s, next_attempt_ms = %s "
        "WHERE account_id = %s AND notification_id = %s AND state IN ('pending', 'sent')",
        (error[:500], retry_at_ms, account_id, notification_id))


def ack_notification(conn: psycopg.Connection, account_id: uuid.UUID,
                     notification_id: uuid.UUID, now_ms: int) -> bool:
    """A device acknowledged; idempotent. False if the account has no such notification.

    A late ack of a notification already marked failed still counts: it was delivered.
    """
    row = conn.execute(
        "SELECT state FROM notifications WHERE account_id = %s AND notification_id = %s "
        "FOR UPDATE", (account_id, notification_id)).fetchone()
    if row is None:
        return False
    if row[0] != "acked":
        conn.execute(
            "UPDATE notifications SET state = 'acked', acked_ms = %s "
            "WHERE account_id = %s AND notification_id = %s",
            (now_ms, account_id, notification_id))
    if row[0] == "failed":
        # the finding that recorded the failure is answered: the device did get it
        conn.execute(
            "UPDATE reconcile_findings SET state = 'repaired', resolved_ms = %s "
            "WHERE kind = 'notification_failed' AND state = 'open' AND account_id = %s "
            "AND detail->>'notification_id' = %s", (now_ms, account_id, str(notification_id)))
    return True


def notification_counts(conn: psycopg.Connection) -> dict[str, int]:
    """How many notifications are in each state (all states present, zero if none)."""
    counts = dict.fromkeys(("pending", "sent", "acked", "failed"), 0)
    cur = conn.cursor(row_factory=tuple_row)
    for state, n in cur.execute("SELECT state, count(*) FROM notifications GROUP BY 1"):
        counts[state] = n
    return counts
