"""What ``bridgectl migrate`` shows: a migration plan, and what applying it did, as one JSON
object (``plan_to_json``) and as text (``render_plan``), with what each move out of
cloud-only queued for legacy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.phases import HELD, MOVE, UNCHANGED, MigrationOutcome, MigrationPlan


def plan_to_json(plan: MigrationPlan, outcome: MigrationOutcome | None = None,
                 *, dry_run: bool = False) -> dict[str, Any]:
    """The plan (and what applying it did) as one JSON-able object."""
    failed = {c.account_id: why for c, why in (outcome.failed if outcome else ())}
    # what was queued for legacy; before applying (a dry run), what would be
    backfills = outcome.backfills if outcome else plan.backfill_preview
    held_at_apply = {c.account_id: gates for c, gates in (outcome.held if outcome else ())}
    moved = {c.account_id for c in (outcome.moved if outcome else ())}
    already = {c.account_id for c in (outcome.already if outcome else ())}
    accounts = []
    for m in plan.moves:
        c = m.change
        result = m.outcome
        reason = m.reason
        gates = m.gates
        if m.outcome == MOVE:
            if dry_run or outcome is None:
                result = "would_move"
            elif c.account_id in held_at_apply:
                # planned to move, held by the gates evaluated again in its transaction
                gates = held_at_apply[c.account_id]
                result = HELD
                reason = "; ".join(f"{g.name}: {g.reason} (when applied)" for g in gates
                                   if not g.passed)
            elif c.account_id in moved:
                result = "moved"
            elif c.account_id in already:
                result, reason = UNCHANGED, f"already {c.to_phase} (moved concurrently)"
            else:
                result, reason = "failed", failed.get(c.account_id, "not attempted")
        accounts.append({
            "account_id": str(c.account_id), "handle": c.handle, "from": c.from_phase,
            "to": c.to_phase, "direction": c.direction, "result": result, "reason": reason,
            "forced": m.forced, "gates": [g.to_json() for g in gates],
            "backfill": (backfills[c.account_id].to_json() if c.account_id in backfills
                         else None)})
    counts: dict[str, int] = {}
    for a in accounts:
        counts[a["result"]] = counts.get(a["result"], 0) + 1
    return {"to": plan.target, "dry_run": dry_run, "force": plan.force,
            "allow_rollback": plan.allow_rollback,
            "accounts": accounts, "counts": counts,
            "queued_for_legacy": sum(b.total for b in backfills.values()),
            "older_than_legacy_retention": sum(b.too_old for b in backfills.values())}


def render_plan(report: dict[str, Any], total: int | None = None) -> str:
    """``plan_to_json``'s object as text: one line per account, held reasons and what was
    (or would be) queued for legacy indented. *total*: how many accounts were selected,
    when the report lists only some of them (the counts are of all)."""
    lines = []
    rows = report["accounts"]
    total = len(rows) if total is None else total
    width = max((len(a["handle"]) for a in rows), default=0)
    for a in rows:
        label = a["result"].replace("_", " ")
        if a["forced"]:
            label += " (forced)"
        lines.append(f"{a['handle']:<{width}}  {a['from']:>10} -> {a['to']:<10}  {label}")
        failed_gates = [g for g in a["gates"] if not g["passed"]]
        if a["result"] == "held" and failed_gates:  # one line per gate that held it, and why
            when = " (when applied)" if a["reason"].endswith("(when applied)") else ""
            for g in failed_gates:
                lines.append(f"{'':<{width}}    held by {g['name']}{when}: {g['reason']}")
        elif a["reason"] and a["result"] in ("held", "failed"):
            for part in a["reason"].split("; "):
                lines.append(f"{'':<{width}}    {part}")
        elif a["forced"]:
            for g in a["gates"]:
                if not g["passed"]:
                    lines.append(f"{'':<{width}}    overrode {g['name']}: {g['reason']}")
        if a.get("backfill") is not None:
            lines.append(f"{'':<{width}}    "
                         f"{_describe_backfill(a['backfill'], report['dry_run'])}")
    counts = report["counts"]
    summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items()))
    verb = "dry run, nothing changed" if report["dry_run"] else "done"
    queued = report.get("queued_for_legacy", 0)
    backfilled = any(a.get("backfill") is not None for a in rows)
    lines.append(f"{total} account{'s' * (total != 1)} selected for {report['to']}: "
                 f"{summary or 'none'}"
                 + (f"; {_messages(queued)} {'would be ' * report['dry_run']}queued for "
                    "legacy" if backfilled else "")
                 + f" ({verb})")
    by_gate: dict[str, int] = {}
    for a in rows:
        if a["result"] == "held":
            for g in a["gates"]:
                if not g["passed"]:
                    by_gate[g["name"]] = by_gate.get(g["name"], 0) + 1
    if by_gate:
        lines.append("held by " + ", ".join(
            f"{name}: {n} account{'s' * (n != 1)}" for name, n in sorted(by_gate.items())))
    return "\n".join(lines)


def _messages(n: int) -> str:
    return f"{n} message{'s' * (n != 1)}"


def _describe_backfill(b: Mapping[str, int], dry_run: bool) -> str:
    text = (f"{'would queue' if dry_run else 'queued'} "
            f"{_messages(b['queued_for_legacy'])} for legacy from "
            f"{b['conversations']} conversation{'s' * (b['conversations'] != 1)} "
            f"({b['queued']} never queued, {b['requeued']} skipped while nobody was on legacy)")
    if b["older_than_window"]:
        text += (f"; {_messages(b['older_than_window'])} older than legacy's retention "
                 "not queued")
    return text
