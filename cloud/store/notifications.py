"""The notification outbox: claiming due notifications, recording pushes and their errors,
acknowledgements. The rows are written with their message (``cloud.store.messages``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
import psycopg
from psycopg.rows import tuple_row

from cloud.db import one_statement
from cloud.model import Notification

#: A notification's id, from its account and message (SQL; format with ``account`` and
#: ``message`` expressions): the same notification always gets the same id, whichever path
#: writes it (the post, the mirror or the reconciler), so a run replays exactly from its seed.
NOTIFICATION_ID_SQL = "md5({account}::text || ':' || {message}::text)::uuid"

_NOTIFICATION_COLS = ("account_id, notification_id, conversation_id, message_id, seq, state, "
                      "attempts")


# The claim as one statement: the due rows, locked (skipping rows another dispatcher holds);
# those out of attempts become failed with a finding each, the others count an attempt and
# are rescheduled.
_CLAIM = (
    "WITH due AS ("
    "  SELECT account_id, notification_id FROM notifications "
    "  WHERE state IN ('pending', 'sent') AND next_attempt_ms <= %(now)s "
    "  ORDER BY next_attempt_ms, account_id, notification_id LIMIT %(limit)s "
    "  FOR UPDATE SKIP LOCKED), "
    "failed AS ("
    "  UPDATE notifications n SET state = 'failed', "
    "    last_error = coalesce(n.last_error, 'never acknowledged') FROM due "
    "  WHERE n.account_id = due.account_id AND n.notification_id = due.notification_id "
    "  AND n.attempts >= %(max_attempts)s "
    f"  RETURNING {', '.join('n.' + c for c in _NOTIFICATION_COLS.split(', '))}), "
    "found AS ("
    "  INSERT INTO reconcile_findings (kind, state, conversation_id, account_id, detail, "
    "    created_ms) "
    "  SELECT 'notification_failed', 'open', conversation_id, account_id, "
    "    jsonb_build_object('notification_id', notification_id::text, 'attempts', attempts), "
    "    %(now)s FROM failed), "
    "pushed AS ("
    "  UPDATE notifications n SET attempts = n.attempts + 1, next_attempt_ms = %(resend)s "
    "  FROM due WHERE n.account_id = due.account_id "
    "  AND n.notification_id = due.notification_id AND n.attempts < %(max_attempts)s "
    f"  RETURNING {', '.join('n.' + c for c in _NOTIFICATION_COLS.split(', '))}) "
    "SELECT true, * FROM pushed UNION ALL SELECT false, * FROM failed")


@one_statement
def claim_due_notifications(conn: psycopg.Connection, now_ms: int, limit: int,
                            resend_after_ms: int, max_attempts: int
                            ) -> tuple[list[Notification], list[Notification]]:
    """Take up to *limit* notifications that are due: ``(to_push, now_failed)``.

    A due notification is pending, or sent but not acknowledged by its resend time. Each one
    taken counts an attempt and is rescheduled *resend_after_ms* ahead before it is pushed,
    so a dispatcher that dies mid-push loses nothing: the row comes due again. One that has
    used *max_attempts* becomes ``failed`` with an open finding instead. One statement.
    """
    rows = conn.execute(_CLAIM, {"now": now_ms, "limit": limit, "max_attempts": max_attempts,
                                 "resend": now_ms + resend_after_ms}).fetchall()
    # in key order, whatever order the join returned them in: a seeded run pushes (and draws
    # the gateway's fates) in the same order every time
    rows.sort(key=lambda r: (r[1], r[2]))
    to_push = [Notification(*r[1:]) for r in rows if r[0]]
    failed = [Notification(*r[1:]) for r in rows if not r[0]]
    return to_push, failed


@attrs.frozen
class PushOutcome:
    """What the gateway said to one push: accepted (``error`` None) or refused."""

    account_id: uuid.UUID
    notification_id: uuid.UUID
    #: accepted: when; refused: also when (not stored)
    at_ms: int
    #: accepted: the acknowledgement window's end; refused: when to try again
    next_attempt_ms: int
    error: str | None = None


@one_statement
def record_push_outcomes(conn: psycopg.Connection, outcomes: Sequence[PushOutcome]) -> int:
    """Record a tick's pushes in one statement; returns how many rows changed.

    Accepted (which is not proof of delivery: wait for the ack): state ``sent``, and the
    acknowledgement window restarts from acceptance (the claim set one from the claim time,
    which a slow gateway would otherwise eat into). Refused: the error, and the retry time.
    A row acknowledged (or failed) meanwhile is left as it is.
    """
    if not outcomes:
        return 0
    cur = conn.execute(
        "UPDATE notifications n SET "
        "  state = CASE WHEN o.error IS NULL THEN 'sent' ELSE n.state END, "
        "  sent_ms = CASE WHEN o.error IS NULL THEN o.at_ms ELSE n.sent_ms END, "
        "  last_error = left(o.error, 500), next_attempt_ms = o.next_attempt_ms "
        "FROM unnest(%s::uuid[], %s::uuid[], %s::bigint[], %s::bigint[], %s::text[]) "
        "  AS o(account_id, notification_id, at_ms, next_attempt_ms, error) "
        "WHERE n.account_id = o.account_id AND n.notification_id = o.notification_id "
        "AND n.state IN ('pending', 'sent')",
        ([o.account_id for o in outcomes], [o.notification_id for o in outcomes],
         [o.at_ms for o in outcomes], [o.next_attempt_ms for o in outcomes],
         [o.error for o in outcomes]))
    return cur.rowcount


#: The usual ack in one statement (no BEGIN or COMMIT around it: a device's ack is the
#: commonest write of a quiet day, tens of thousands a simulated day): lock the row, read
#: its state as it is now (a dispatcher failing it meanwhile is waited for), and mark it
#: acked unless it is acked or failed. Its state comes back (no row: no such notification
#: of the account).
_ACK = (
    "WITH target AS ("
    "  SELECT account_id, notification_id, state FROM notifications "
    "  WHERE account_id = %(account)s AND notification_id = %(id)s FOR UPDATE), "
    "acked AS ("
    "  UPDATE notifications n SET state = 'acked', acked_ms = %(now)s FROM target t "
    "  WHERE n.account_id = t.account_id AND n.notification_id = t.notification_id "
    "    AND t.state NOT IN ('acked', 'failed')) "
    "SELECT t.state FROM target t")


@one_statement
def ack_notification(conn: psycopg.Connection, account_id: uuid.UUID,
                     notification_id: uuid.UUID, now_ms: int) -> bool:
    """A device acknowledged; idempotent. False if the account has no such notification.

    A late ack of a notification already marked failed still counts: it was delivered, and
    the finding that recorded the failure is answered. That rare case writes two rows, so
    it takes a transaction of its own after the first statement changed nothing (a
    statement's snapshot could miss a finding committed while it waited for the row).
    """
    row = conn.execute(_ACK, {"account": account_id, "id": notification_id,
                              "now": now_ms}).fetchone()
    if row is None:
        return False
    if row[0] == "failed":
        with conn.transaction():
            conn.execute(
                "UPDATE notifications SET state = 'acked', acked_ms = %s "
                "WHERE account_id = %s AND notification_id = %s AND state = 'failed'",
                (now_ms, account_id, notification_id))
            conn.execute(
                "UPDATE reconcile_findings SET state = 'repaired', resolved_ms = %s "
                "WHERE kind = 'notification_failed' AND state = 'open' AND account_id = %s "
                "AND detail->>'notification_id' = %s",
                (now_ms, account_id, str(notification_id)))
    return True


def notification_counts(conn: psycopg.Connection) -> dict[str, int]:
    """How many notifications are in each state (all states present, zero if none)."""
    counts = dict.fromkeys(("pending", "sent", "acked", "failed"), 0)
    cur = conn.cursor(row_factory=tuple_row)
    for state, n in cur.execute("SELECT state, count(*) FROM notifications GROUP BY 1"):
        counts[state] = n
    return counts
