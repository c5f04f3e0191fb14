"""What ``bridgectl accounts show`` reads about one account (one transaction) and prints:
its phase history, what holds it (open findings, the gates' verdict now, evaluated as
``migrate --dry-run`` would for its next phase), its cohorts, and the latest messages
mirrored for it either way. Message bodies are never shown: ids, handles and times are
what an operator needs to follow a message across the stacks."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from bridge import gates, phases
from bridge.cohort_report import utc
from cloud import admin
from cloud.model import PHASES, Account
from cloud.store import cohorts as cohorts_store
from cloud.store import messages as messages_store


def verdict(conn: psycopg.Connection, account: Account, config: gates.GateConfig,
            now_ms: int) -> dict[str, Any]:
    """The gates for the account's next phase, as ``migrate --to NEXT --dry-run`` plans
    it: ``would_move`` or ``held`` (with why), and whether ``--force`` would get it
    through. In cloud-only there is no next phase: the gates are shown all the same."""
    i = PHASES.index(account.phase)
    target = PHASES[i + 1] if i + 1 < len(PHASES) else None
    inputs = gates.read_gate_inputs(conn, [account.account_id], config, now_ms)
    results = gates.evaluate_gates(account.account_id, inputs, config, now_ms)
    out: dict[str, Any] = {"next_phase": target, "gates": [g.to_json() for g in results],
                           "result": "none", "reason": "", "force_would_move": None}
    if target is not None:
        plan = phases.plan_moves([account], target, inputs, config, now_ms)
        move = plan.moves[0]
        out.update(result="would_move" if move.would_move else move.outcome,
                   reason=move.reason,
                   force_would_move=move.would_move or gates.overridable(move.gates))
    return out


def describe(conn: psycopg.Connection, account: Account, config: gates.GateConfig,
             now_ms: int, limit: int) -> dict[str, Any]:
    """Everything ``accounts show`` prints, read in the caller's transaction; *limit*
    bounds each list but the phase history."""
    findings = gates.finding_rows(conn, account_id=account.account_id, limit=limit)
    cohorts = cohorts_store.account_memberships(conn, account.account_id)
    return {
        "account": {"account_id": str(account.account_id), "handle": account.handle,
                    "legacy_handle": account.legacy_handle, "phase": account.phase},
        "phase_history": admin.phase_history(conn, account.account_id),
        "findings": findings,
        "gates": verdict(conn, account, config, now_ms),
        "cohorts": cohorts,
        "mirrored": {
            "to_cloud": messages_store.latest_from_legacy(conn, account.account_id, limit),
            "to_legacy": messages_store.latest_to_legacy(conn, account.account_id, limit)},
        "limit": limit, "now_ms": now_ms,
        "next": next_steps(account, findings, cohorts),
    }


def next_steps(account: Account, findings: list[dict[str, Any]],
               cohorts: list[dict[str, Any]]) -> list[str]:
    """What to run next: the findings that hold it, then how it would move on."""
    steps = []
    if findings:
        steps.append(f"`bridgectl findings list --account {account.handle}`, then `findings "
                     "show ID`; once dealt with, `findings resolve ID --note TEXT` or "
                     "`findings dismiss ID --reason TEXT`")
    i = PHASES.index(account.phase)
    active = next((c["name"] for c in cohorts if c["active"]), None)
    if active is not None:
        steps.append(f"its cohort: `bridgectl cohort show {active}`")
    if i + 1 < len(PHASES):
        steps.append(f"`bridgectl migrate --to {PHASES[i + 1]} --accounts {account.handle} "
                     "--dry-run` evaluates the same gates")
    return steps


def _age(now_ms: int, ms: int | None) -> str:
    return "-" if ms is None else f"{max(0, now_ms - ms) // 1000} s ago"


def render(d: dict[str, Any]) -> str:
    """``describe``'s object as text."""
    a, now = d["account"], d["now_ms"]
    lines = [f"account {a['handle']} ({a['account_id']}): phase {a['phase']}, "
             + (f"legacy handle {a['legacy_handle']}" if a["legacy_handle"]
                else "cloud-native (no legacy handle)")]
    lines.append(f"phase history ({len(d['phase_history'])}):" if d["phase_history"]
                 else "phase history: never moved")
    for h in d["phase_history"]:
        extra = [f"cohort {h['cohort']}"] if h["cohort"] else []
        if h["forced"]:
            extra.append("forced past " + ", ".join(h["failed_gates"]))
        if h["queued_for_legacy"]:
            extra.append(f"{h['queued_for_legacy']} queued for legacy")
        lines.append(f"  {utc(h['at_ms'])}  {h['actor']}  {h['from']} -> {h['to']}"
                     + (f"  ({'; '.join(extra)})" if extra else ""))
    v = d["gates"]
    if v["next_phase"] is None:
        lines.append("gates now (no next phase: cloud-only is the last):")
    else:
        force = ("" if v["result"] == "would_move" else
                 "; --force would move it" if v["force_would_move"] else
                 "; --force would not (the freeze)")
        lines.append(f"gates now, for {v['next_phase']}: "
                     f"{'WOULD MOVE' if v['result'] == 'would_move' else 'HELD'}{force}")
    for g in v["gates"]:
        lines.append(f"  {'ok  ' if g['passed'] else 'FAIL'}  {g['name']}: {g['reason']}")
    lines.append(f"open or failed findings ({len(d['findings'])}"
                 f"{', first ' + str(d['limit']) if len(d['findings']) >= d['limit'] else ''}):"
                 if d["findings"] else "open or failed findings: none")
    for f in d["findings"]:
        about = f["conversation_id"] or f["account_id"] or f"supernode {f['source']}"
        lines.append(f"  {f['finding_id']:>8}  {f['state']:<7} {f['kind']:<22} "
                     f"{_age(now, f['created_ms']):>12}  {about}  "
                     f"{json.dumps(f['detail'], sort_keys=True)[:120]}")
    lines.append(f"cohorts ({len(d['cohorts'])}):" if d["cohorts"] else "cohorts: none")
    for c in d["cohorts"]:
        last = c["last_advance"]
        step = ("no advance yet" if last is None else
                f"advance {last['advance']} to {last['to']} from {last['before']}"
                + (", reversed" if last["reversed_ms"] else "")
                + (f", held by {', '.join(last['held_by'])}" if last["held_by"] else ""))
        lines.append(f"  {c['name']}  ({c['state']}, "
                     f"{'member' if c['active'] else 'member while it was active'}): {step}")
    rows = d["mirrored"]["to_cloud"]
    lines.append(f"mirrored legacy -> cloud, latest {len(rows)}:" if rows
                 else "mirrored legacy -> cloud: none in its conversations")
    for m in rows:
        lines.append(f"  {utc(m['mirrored_ms'])}  {m['legacy_chat_id'] or m['conversation_id']}"
                     f" seq {m['seq']}  from {m['sender']}  guid {m['legacy_guid']}  "
                     f"sent {utc(m['sent_ms'])}")
    rows = d["mirrored"]["to_legacy"]
    lines.append(f"mirrored cloud -> legacy, latest {len(rows)}:" if rows
                 else "mirrored cloud -> legacy: no outbox row in its conversations")
    for m in rows:
        state = m["state"] + (f" ({m['skip_reason']})" if m["skip_reason"] else "")
        if m["state"] == "pending" and m["last_error"]:
            state += f", last error: {m['last_error']}"
        lines.append(f"  {utc(m['queued_ms'])}  {m['legacy_chat_id'] or m['conversation_id']}"
                     f" seq {m['seq']}  from {m['sender'] or '-'}  {state}, attempts "
                     f"{m['attempts']}"
                     + (f", done {utc(m['done_ms'])}" if m["done_ms"] else ""))
    return "\n".join(lines)
