"""The notifications reconciler: every notification owed to a cloud device ends acknowledged,
or visibly failed.

The dispatcher (``cloud.dispatcher``) moves notification rows along and re-sends the ones
not acknowledged in time; this cron job catches what it cannot see or did not do::

    1 stale             open rows the dispatcher is not moving (found through the open
                        rows' index, every run):
                          pending, created > stuck_pending_s ago (and not backing off)
                          sent, last push accepted > ack_sla_s ago, never acknowledged
                        -> due now, SAME notification id: the dispatcher pushes it again
                        -> attempts >= max_attempts, or older than give_up_s: failed, with
                           an open notification_failed finding (as the dispatcher's claim)
    2 owed but missing  conversations page by page (resumable through ctx.progress):
                        messages sent in the window whose cloud-capable members (not the
                        sender) have no notification row -> create the row (pending, due now)
    second look         a moment later, in the repair's own transaction, the suspects are
                        read again (row locks, SKIP LOCKED: a row the dispatcher holds is
                        moving); only what is still wrong is confirmed and repaired, so an
                        acknowledgement that raced in is not a problem
    each repair         a reconcile_findings row and an audit_log row (aggregated beyond
                        max_findings per run, so a disaster does not write millions)

"Owed" is what the store owes when it writes a message
(``cloud.store.messages._owe_notifications``): members, other than the sender, whose phase has
cloud devices. A member who joined after the message, or whose account moved from ``legacy``
to a cloud phase after it (the phase change in the audit log), was not owed one, and is not
sent one now.

A re-send does not count an attempt itself: the dispatcher's claim does, so ``attempts``
stays the number of pushes. ``give_up_s`` bounds the case where nothing claims the row at
all (a dispatcher that is down): the row is failed, visibly, and a late acknowledgement
still counts (``cloud.store.notifications.ack_notification``).

Report: ``compared`` is open notifications plus conversations examined (``detail`` also has
the messages), so a resumed run over a tail of idle conversations has still compared
something; ``suspects`` the first look, ``confirmed`` the second, ``repaired`` rows created
or re-sent, ``failed`` rows this run marked failed.

The module is long (just over 500 lines) because its SQL transactions (each a function,
safe to run twice) sit beside the reconciler that runs them, as the gaps and presence
reconcilers' do.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from twisted.internet import task

from cloud.model import CLOUD_CLIENT_PHASES
from cloud.store import audit as audit_store
from cloud.store.notifications import NOTIFICATION_ID_SQL
from reconcilers.runner import RunContext
from servicekit.validators import finite_number

ACTOR = "reconciler"
#: How many notification ids an aggregated finding lists.
SAMPLE = 50


_finite_positive = finite_number(0, inclusive=False)
_not_negative = finite_number(0, inclusive=True)


@attrs.frozen
class NotificationsConfig:
    """How far back and how strictly to look. Times in seconds unless named ``_ms``."""

    #: Owed-but-missing looks at messages sent within this window (bounds a run).
    since_ms: int = attrs.field(default=24 * 3600 * 1000, validator=_finite_positive)
    #: A pushed notification not acknowledged within this is re-sent.
    ack_sla_s: float = attrs.field(default=60.0, validator=_finite_positive)
    #: A pending notification older than this is stuck (the dispatcher is not moving it).
    stuck_pending_s: float = attrs.field(default=60.0, validator=_finite_positive)
    #: Pushes of one notification before it is failed (the dispatcher's max_attempts).
    max_attempts: int = attrs.field(default=5, validator=_finite_positive)
    #: Not acknowledged this long after it was owed: failed, whatever its attempts.
    give_up_s: float = attrs.field(default=3600.0, validator=_finite_positive)
    #: Conversations or stale notifications per page; rows per repair transaction.
    batch: int = attrs.field(default=500, validator=_finite_positive)
    #: Delay before the second look.
    confirm_after_s: float = attrs.field(default=1.0, validator=_not_negative)
    #: Findings (and audit rows) written one per repair; beyond, one per repair batch.
    max_findings: int = attrs.field(default=1000, validator=_not_negative)
    #: Suspects one run collects at most; a run that reaches it stops there and the next
    #: run resumes (so a lost table does not become one giant transaction).
    max_suspects: int = attrs.field(default=50_000, validator=_finite_positive)


@attrs.frozen
class Owed:
    """One (recipient, message) pair that has no notification row."""

    account_id: uuid.UUID
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    seq: int


@attrs.frozen
class OpenRow:
    """A notification row as the stale check sees it."""

    account_id: uuid.UUID
    notification_id: uuid.UUID
    conversation_id: uuid.UUID
    state: str
    attempts: int
    created_ms: int
    sent_ms: int | None

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self.account_id, self.notification_id


@attrs.frozen
class StaleRules:
    """The stale check's thresholds at one moment, as SQL parameters."""

    now_ms: int
    stuck_before_ms: int
    ack_before_ms: int
    give_up_before_ms: int
    max_attempts: int

    @classmethod
    def at(cls, now_ms: int, cfg: NotificationsConfig) -> StaleRules:
        return cls(now_ms, now_ms - round(cfg.stuck_pending_s * 1000),
                   now_ms - round(cfg.ack_sla_s * 1000), now_ms - round(cfg.give_up_s * 1000),
                   cfg.max_attempts)

    def reason(self, row: OpenRow) -> str:
        return "stuck_pending" if row.state == "pending" else "unacknowledged"

    def gives_up(self, row: OpenRow) -> str | None:
        if row.attempts >= self.max_attempts:
            return f"not acknowledged after {row.attempts} attempts"
        if row.created_ms <= self.give_up_before_ms:
            return "not acknowledged within the give-up time"
        return None


@attrs.define
class Outcome:
    """What one repair transaction confirmed and did."""

    confirmed: dict[str, int] = attrs.Factory(dict)
    repaired: int = 0
    failed: int = 0
    findings: int = 0
    would_fail: int = 0
    would_resend: int = 0


# ---------------------------------------------------------------- transactions

def record_repair(conn: psycopg.Connection, run_id: int | None, kind: str, state: str,
                  detail: dict, now_ms: int, *, subject: str,
                  account_id: uuid.UUID | None = None,
                  conversation_id: uuid.UUID | None = None) -> None:
    """One finding (repaired, or open/failed) and its audit row, in the caller's transaction."""
    conn.execute(
        "INSERT INTO reconcile_findings (run_id, kind, state, conversation_id, account_id, "
        "detail, created_ms, resolved_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (run_id, kind, state, conversation_id, account_id, Jsonb(detail), now_ms,
         now_ms if state == "repaired" else None))
    audit_store.record(conn, kind, subject, actor=ACTOR, now_ms=now_ms, detail=detail)


def count_conversations(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM conversations").fetchone()[0]


def count_open(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM notifications "
                        "WHERE state IN ('pending', 'sent')").fetchone()[0]


def conversation_page(conn: psycopg.Connection, after: uuid.UUID | None,
                      limit: int) -> list[uuid.UUID]:
    return [r[0] for r in conn.execute(
        "SELECT conversation_id FROM conversations WHERE %(after)s::uuid IS NULL "
        "OR conversation_id > %(after)s ORDER BY conversation_id LIMIT %(limit)s",
        {"after": after, "limit": limit})]


def promoted_since(conn: psycopg.Connection, since_ms: int) -> dict[uuid.UUID, int]:
    """Accounts whose latest move out of ``legacy`` (into a cloud phase) happened after
    *since_ms*: account -> when (ms). Messages before that were not owed to them."""
    rows = conn.execute(
        "SELECT subject, (extract(epoch FROM max(at)) * 1000)::bigint FROM audit_log "
        "WHERE action = 'phase_change' AND detail->>'from' = 'legacy' "
        "  AND detail->>'to' = ANY(%s) GROUP BY subject "
        "HAVING max(at) >= to_timestamp(%s / 1000.0)",
        (list(CLOUD_CLIENT_PHASES), since_ms)).fetchall()
    out = {}
    for subject, at_ms in rows:
        try:
            out[uuid.UUID(subject)] = at_ms
        except ValueError:
            continue  # not an account id: someone else's audit row
    return out


#: Who is owed a notification for a message (as ``cloud.store.messages._owe_notifications``
#: decides when the message is written): a member other than the sender, in a phase with
#: cloud devices, who was a member when the message was written and had left ``legacy``
#: before it was sent.
_OWED = ("JOIN accounts a ON a.account_id = mb.account_id "
         "LEFT JOIN unnest(%(promoted)s::uuid[], %(promoted_ms)s::bigint[]) "
         "  AS p(account_id, at_ms) ON p.account_id = mb.account_id "
         "WHERE mb.account_id <> m.sender_account_id AND a.phase = ANY(%(phases)s) "
         "  AND mb.joined_at <= m.created_at AND (p.at_ms IS NULL OR m.sent_ms >= p.at_ms) "
         "  AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.account_id = mb.account_id "
         "    AND n.conversation_id = m.conversation_id AND n.message_id = m.message_id) ")


def _owed_params(promoted: dict[uuid.UUID, int]) -> dict[str, Any]:
    return {"phases": list(CLOUD_CLIENT_PHASES), "promoted": list(promoted),
            "promoted_ms": list(promoted.values())}


def owed_but_missing(conn: psycopg.Connection, conversations: Sequence[uuid.UUID],
                     since_ms: int, promoted: dict[uuid.UUID, int],
                     limit: int) -> tuple[int, list[Owed]]:
    """First look: (messages examined, owed notifications with no row) in *conversations*."""
    messages = conn.execute(
        "SELECT count(*) FROM messages WHERE conversation_id = ANY(%s) AND sent_ms >= %s",
        (list(conversations), since_ms)).fetchone()[0]
    if messages == 0:
        return 0, []
    rows = conn.execute(
        "SELECT mb.account_id, m.conversation_id, m.message_id, m.seq FROM messages m "
        "JOIN members mb ON mb.conversation_id = m.conversation_id " + _OWED
        + "AND m.conversation_id = ANY(%(cids)s) AND m.sent_ms >= %(since)s "
        "ORDER BY m.conversation_id, m.seq, mb.account_id LIMIT %(limit)s",
        {**_owed_params(promoted), "cids": list(conversations), "since": since_ms,
         "limit": limit}).fetchall()
    return messages, [Owed(*r) for r in rows]


def create_missing(conn: psycopg.Connection, owed: Sequence[Owed],
                   promoted: dict[uuid.UUID, int], now_ms: int, run_id: int | None, *,
                   dry_run: bool, individual_findings: int) -> Outcome:
    """Second look and repair: the pairs still owed and still without a row get one (due
    now); each is a ``notification_missing`` finding (one aggregate past the budget)."""
    params = {**_owed_params(promoted), "acc": [o.account_id for o in owed],
              "cid": [o.conversation_id for o in owed], "mid": [o.message_id for o in owed],
              "now": now_ms}
    # the suspects themselves, checked again against the same rule
    owed = ("FROM unnest(%(acc)s::uuid[], %(cid)s::uuid[], %(mid)s::uuid[]) "
            "  AS s(account_id, conversation_id, message_id) "
            "JOIN messages m ON m.conversation_id = s.conversation_id "
            "  AND m.message_id = s.message_id "
            "JOIN members mb ON mb.conversation_id = s.conversation_id "
            "  AND mb.account_id = s.account_id " + _OWED)
    if dry_run:
        still = conn.execute("SELECT count(*) " + owed, params).fetchone()[0]
        return Outcome(confirmed={"missing": still})
    created = conn.execute(
        "INSERT INTO notifications (account_id, notification_id, conversation_id, message_id, "
        "  seq, next_attempt_ms, created_ms) "
        "SELECT mb.account_id, "
        + NOTIFICATION_ID_SQL.format(account="mb.account_id", message="m.message_id")
        + ", m.conversation_id, m.message_id, m.seq, "
        "  %(now)s, %(now)s " + owed + "ON CONFLICT DO NOTHING "
        "RETURNING account_id, notification_id, conversation_id, message_id, seq",
        params).fetchall()
    out = Outcome(confirmed={"missing": len(created)}, repaired=len(created))
    for account_id, nid, cid, mid, seq in created[:individual_findings]:
        record_repair(conn, run_id, "notification_missing", "repaired",
                      {"notification_id": str(nid), "message_id": str(mid), "seq": seq},
                      now_ms, subject=str(nid), account_id=account_id, conversation_id=cid)
        out.findings += 1
    rest = created[individual_findings:]
    if rest:
        record_repair(conn, run_id, "notification_missing", "repaired",
                      {"aggregated": True, "count": len(rest),
                       "notification_ids": [str(r[1]) for r in rest[:SAMPLE]]},
                      now_ms, subject=f"{len(rest)} notifications")
        out.findings += 1
    return out


_OPEN_COLS = ("account_id, notification_id, conversation_id, state, attempts, created_ms, "
              "sent_ms")
#: A row the dispatcher is not moving. A pending row it is backing off after a gateway error
#: (last_error set, next attempt still ahead) is being moved, so it is left alone.
_STALE = ("state IN ('pending', 'sent') AND ("
          "  (state = 'pending' AND created_ms <= %(stuck_before)s "
          "   AND (last_error IS NULL OR next_attempt_ms <= %(now)s)) "
          "  OR (state = 'sent' AND sent_ms <= %(ack_before)s))")


def _stale_params(rules: StaleRules) -> dict[str, int]:
    return {"now": rules.now_ms, "stuck_before": rules.stuck_before_ms,
            "ack_before": rules.ack_before_ms}


def stale_page(conn: psycopg.Connection, rules: StaleRules,
               after: tuple[uuid.UUID, uuid.UUID] | None, limit: int) -> list[OpenRow]:
    """First look: open notifications the dispatcher is not moving, in key order."""
    start = after or (uuid.UUID(int=0), uuid.UUID(int=0))
    rows = conn.execute(
        f"SELECT {_OPEN_COLS} FROM notifications WHERE {_STALE} "
        "AND (account_id, notification_id) > (%(a)s, %(n)s) "
        "ORDER BY account_id, notification_id LIMIT %(limit)s",
        {**_stale_params(rules), "a": start[0], "n": start[1], "limit": limit}).fetchall()
    return [OpenRow(*r) for r in rows]


def resend_or_fail(conn: psycopg.Connection, keys: Sequence[tuple[uuid.UUID, uuid.UUID]],
                   rules: StaleRules, run_id: int | None, *, dry_run: bool,
                   individual_findings: int) -> Outcome:
    """Second look and repair of stale rows: each still stale is made due now (same id), or
    failed with an open ``notification_failed`` finding when it has had its chances."""
    rows = [OpenRow(*r) for r in conn.execute(
        f"SELECT {_OPEN_COLS} FROM notifications "
        "WHERE (account_id, notification_id) IN "
        "  (SELECT * FROM unnest(%(acc)s::uuid[], %(nid)s::uuid[])) "
        f"AND {_STALE} ORDER BY account_id, notification_id"
        + ("" if dry_run else " FOR UPDATE SKIP LOCKED"),
        {**_stale_params(rules), "acc": [k[0] for k in keys], "nid": [k[1] for k in keys]})]
    out = Outcome()
    resent: list[OpenRow] = []
    now = rules.now_ms
    for row in rows:
        reason = rules.reason(row)
        out.confirmed[reason] = out.confirmed.get(reason, 0) + 1
        give_up = rules.gives_up(row)
        if give_up is not None:
            if dry_run:
                out.would_fail += 1
                continue
            out.failed += 1
            conn.execute(
                "UPDATE notifications SET state = 'failed', "
                "last_error = coalesce(last_error, 'never acknowledged') "
                "WHERE account_id = %s AND notification_id = %s", row.key)
            # the same finding the dispatcher's claim writes (ack_notification resolves it)
            record_repair(conn, run_id, "notification_failed", "open",
                          {"notification_id": str(row.notification_id),
                           "attempts": row.attempts, "reason": give_up, "was": reason},
                          now, subject=str(row.notification_id), account_id=row.account_id,
                          conversation_id=row.conversation_id)
            out.findings += 1
        else:
            resent.append(row)
    if dry_run:
        out.would_resend = len(resent)
        return out
    out.repaired = len(resent)
    if not resent:
        return out
    conn.execute(
        "UPDATE notifications SET next_attempt_ms = %s "
        "WHERE (account_id, notification_id) IN "
        "  (SELECT * FROM unnest(%s::uuid[], %s::uuid[]))",
        (now, [r.account_id for r in resent], [r.notification_id for r in resent]))
    for row in resent[:individual_findings]:
        record_repair(conn, run_id, "notification_resent", "repaired",
                      {"notification_id": str(row.notification_id),
                       "reason": rules.reason(row), "attempts": row.attempts},
                      now, subject=str(row.notification_id), account_id=row.account_id,
                      conversation_id=row.conversation_id)
        out.findings += 1
    rest = resent[individual_findings:]
    if rest:
        record_repair(conn, run_id, "notification_resent", "repaired",
                      {"aggregated": True, "count": len(rest),
                       "notification_ids": [str(r.notification_id) for r in rest[:SAMPLE]]},
                      now, subject=f"{len(rest)} notifications")
        out.findings += 1
    return out


# ---------------------------------------------------------------- the run

class NotificationsReconciler:
    kind = "notifications"

    def __init__(self, config: NotificationsConfig | None = None) -> None:
        self.config = config if config is not None else NotificationsConfig()

    @classmethod
    def for_cli(cls, *, since_ms: int | None = None,
                now: float | None = None) -> NotificationsReconciler:
        """As ``bridgectl reconcile`` builds it. *now* is not used (time comes from the
        run's clock); it is accepted so the CLI's current call keeps working."""
        if since_ms is None:
            return cls()
        return cls(NotificationsConfig(since_ms=since_ms))

    async def run(self, ctx: RunContext) -> None:
        cfg, report = self.config, ctx.report
        since = ctx.now_ms() - cfg.since_ms
        detail = report.detail
        detail.update({"since_ms": since, "conversations": 0, "messages": 0,
                       "open_notifications": 0})
        # stale rows first: few, cheap to find (the open rows' index), and the most urgent
        stale = await self._scan_stale(ctx)
        missing: list[Owed] = []
        promoted = await ctx.db.run("promoted_since", promoted_since, since)
        if not ctx.interrupted:
            await self._scan_missing(ctx, since, promoted, missing,
                                     budget=cfg.max_suspects - len(stale))
        report.suspects += len(missing) + len(stale)
        detail["suspects"] = {"missing": len(missing),
                              "stuck_pending": sum(r.state == "pending" for r in stale),
                              "unacknowledged": sum(r.state == "sent" for r in stale)}
        if missing or stale:
            await task.deferLater(ctx.clock, cfg.confirm_after_s, lambda: None)
            await self._second_look_and_repair(ctx, missing, stale, promoted)

    # -- first look ------------------------------------------------------------------------

    async def _scan_stale(self, ctx: RunContext) -> list[OpenRow]:
        """Every open row the dispatcher is not moving (up to the run's budget). Not resumed
        across runs: a repaired row is no longer stale, so the next run finds the rest."""
        cfg, report = self.config, ctx.report
        rules = StaleRules.at(ctx.now_ms(), cfg)
        open_now = await ctx.db.run("count_open", count_open)
        report.compared += open_now
        report.detail["open_notifications"] = open_now
        stale: list[OpenRow] = []
        cursor = None
        while len(stale) < cfg.max_suspects:
            if stale and ctx.out_of_time():
                return stale
            page = await ctx.db.run("stale_page", stale_page, rules, cursor,
                                    min(cfg.batch, cfg.max_suspects - len(stale)))
            if not page:
                return stale
            stale += page
            cursor = page[-1].key
            ctx.on_progress(f"notifications: {len(stale)} stale of {open_now} open")
        ctx.interrupted = True  # the budget is full: the next run carries on
        return stale

    async def _scan_missing(self, ctx: RunContext, since: int,
                            promoted: dict[uuid.UUID, int], missing: list[Owed], *,
                            budget: int) -> None:
        """Conversation pages from where the last (interrupted) run stopped."""
        cfg, report, progress = self.config, ctx.report, ctx.progress
        total = await ctx.db.run("count_conversations", count_conversations)
        after = progress.get("after")
        after_id = uuid.UUID(after) if after else None
        done = progress.get("done", 0)
        ctx.count(done, total)  # the pass's conversations: its progress and ETA
        first = True
        while True:
            if not first and ctx.out_of_time():
                return  # progress is saved: the next run resumes after the last page
            first = False
            page = await ctx.db.run("conversation_page", conversation_page, after_id, cfg.batch)
            if not page:
                return
            left = budget - len(missing)
            examined, owed = await ctx.db.run("owed_but_missing", owed_but_missing, page, since,
                                              promoted, left)
            missing += owed
            report.compared += len(page)
            report.detail["conversations"] += len(page)
            report.detail["messages"] += examined
            if len(owed) >= left:
                # the run's budget is full: repair what is collected, and the next run
                # resumes at this page (progress still points before it)
                ctx.interrupted = True
                return
            after_id, done = page[-1], done + len(page)
            progress["after"] = str(after_id)
            ctx.count(done, total)
            await ctx.save()
            ctx.on_progress(f"notifications: {min(done, total)}/{total} conversations, "
                            f"{len(missing)} missing")

    # -- second look and repair ------------------------------------------------------------

    async def _second_look_and_repair(self, ctx: RunContext, missing: list[Owed],
                                      stale: list[OpenRow],
                                      promoted: dict[uuid.UUID, int]) -> None:
        cfg, report = self.config, ctx.report
        findings_left = cfg.max_findings
        confirmed: dict[str, int] = {}
        actions = {"created": 0, "resent": 0, "failed": 0}
        dry = ctx.dry_run
        for i in range(0, len(missing), cfg.batch):
            out = await ctx.db.run("create_missing", create_missing, missing[i:i + cfg.batch],
                                   promoted, ctx.now_ms(), report.run_id, dry_run=dry,
                                   individual_findings=findings_left)
            findings_left = max(0, findings_left - out.findings)
            self._count(report, out, confirmed)
            actions["created"] += out.confirmed["missing"] if dry else out.repaired
        for i in range(0, len(stale), cfg.batch):
            rules = StaleRules.at(ctx.now_ms(), cfg)
            out = await ctx.db.run("resend_or_fail", resend_or_fail,
                                   [r.key for r in stale[i:i + cfg.batch]],
                                   rules, report.run_id, dry_run=dry,
                                   individual_findings=findings_left)
            findings_left = max(0, findings_left - out.findings)
            self._count(report, out, confirmed)
            actions["resent"] += out.would_resend if dry else out.repaired
            actions["failed"] += out.would_fail if dry else out.failed
        report.detail["confirmed"] = confirmed
        report.detail["would" if dry else "did"] = actions

    @staticmethod
    def _count(report: Any, out: Outcome, confirmed: dict[str, int]) -> None:
        report.confirmed += sum(out.confirmed.values())
        report.repaired += out.repaired
        report.failed += out.failed
        for reason, n in out.confirmed.items():
            confirmed[reason] = confirmed.get(reason, 0) + n
