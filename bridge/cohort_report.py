"""What ``bridgectl cohort show`` and ``cohort list`` read (one transaction each), how the
cohort commands print (one JSON object, or text), and the next steps every one of them
prints: an operator with a pager should never have to guess the next command."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import psycopg

from bridge import migration_report
from bridge.cohorts import CohortMove
from cloud.model import PHASES
from cloud.store import cohorts as cohorts_store
from cloud.store.cohorts import ACTIVE, Advance, Cohort

CLOUD_ONLY = PHASES[-1]


def utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"


def selection_text(selection: dict[str, Any]) -> str:
    if "percent" in selection:
        return f"--percent {selection['percent']}"
    if "file" in selection:
        return f"--file {selection['file']}"
    handles = selection.get("handles", [])
    return "--handles " + " ".join(handles[:5]) + (" ..." if len(handles) > 5 else "")


def reversible(advances: Sequence[Advance]) -> Advance | None:
    """The advance a reverse would undo (as ``cohorts_store.advance_to_reverse`` picks it)."""
    return next((a for a in reversed(advances)
                 if a.reversed_ms is None and a.may_have_moved), None)


def next_phase(advances: Sequence[Advance]) -> str | None:
    """Where the next advance would go: one past the last one not reversed (dual at first);
    None after cloud-only."""
    last = next((a for a in reversed(advances) if a.reversed_ms is None), None)
    if last is None:
        return PHASES[1]
    i = PHASES.index(last.to_phase)
    return PHASES[i + 1] if i + 1 < len(PHASES) else None


def next_steps(cohort: Cohort, advances: Sequence[Advance], *, held: int = 0,
               failed: int = 0, per_phase: dict[str, int] | None = None) -> list[str]:
    """What to run next, given where the cohort stands."""
    name = cohort.name
    if cohort.state != ACTIVE:
        return [f"cohort {name} is {cohort.state}: its members may join a new cohort "
                "(`bridgectl cohort create NAME --percent P | --file F | --handles H ...`)"]
    steps = []
    undo = reversible(advances)
    legacy = " --legacy HOST:PORT" if (undo is not None and undo.to_phase == CLOUD_ONLY) or (
        per_phase or {}).get(CLOUD_ONLY) else ""
    if failed:
        steps.append("some members failed (the reasons are above): fix that and run the "
                     "same command again; it picks up where it stopped")
    last = next((a for a in reversed(advances) if a.reversed_ms is None), None)
    if held and last is not None:
        steps.append(f"`bridgectl cohort show {name}` lists the held members and why; clear "
                     f"the gates (`bridgectl findings list --account HANDLE`), then run "
                     f"`bridgectl cohort advance {name} --to {last.to_phase}` again")
    ahead = next_phase(advances)
    if undo is None:
        steps.append(f"`bridgectl cohort advance {name} --to {ahead} --dry-run`, then "
                     "without --dry-run")
        if not advances or all(a.reversed_ms is not None for a in advances):
            steps.append(f"or end it: `bridgectl cohort cancel {name}`")
        return steps
    if ahead is not None:
        steps.append(f"watch `bridgectl status` and `bridgectl cohort show {name}`; then "
                     f"`bridgectl cohort advance {name} --to {ahead}"
                     + (" --legacy HOST:PORT" if ahead == CLOUD_ONLY else "") + "`")
    else:
        steps.append(f"watch `bridgectl status`; once it is final: "
                     f"`bridgectl cohort complete {name}`")
    steps.append(f"to undo advance {undo.advance_no} (to {undo.to_phase}): "
                 f"`bridgectl cohort reverse {name}{legacy}`")
    return steps


# ---------------------------------------------------------------- reading

def describe(conn: psycopg.Connection, cohort: Cohort, limit: int) -> dict[str, Any]:
    """Everything ``cohort show`` prints, read in the caller's transaction."""
    advances = cohorts_store.advances(conn, cohort.cohort_id)
    per_phase = cohorts_store.members_per_phase(conn, [cohort.cohort_id])[cohort.cohort_id]
    last = next((a for a in reversed(advances) if a.reversed_ms is None), None)
    held, held_total = ([], 0) if last is None else cohorts_store.held_members(
        conn, cohort.cohort_id, last.advance_no, limit)
    return {"cohort": cohort.to_json(), "members": sum(per_phase.values()),
            "per_phase": per_phase, "advances": [a.to_json() for a in advances],
            "last_advance": None if last is None else last.advance_no,
            "held": [h.to_json() for h in held], "held_total": held_total,
            "history": cohorts_store.history(conn, cohort.name),
            "next": next_steps(cohort, advances, held=held_total, per_phase=per_phase)}


def summaries(conn: psycopg.Connection) -> dict[str, Any]:
    """Everything ``cohort list`` prints, read in the caller's transaction."""
    cohorts = cohorts_store.list_cohorts(conn)
    per_phase = cohorts_store.members_per_phase(conn, [c.cohort_id for c in cohorts])
    out = []
    for c in cohorts:
        advances = cohorts_store.advances(conn, c.cohort_id)
        last = next((a for a in reversed(advances) if a.reversed_ms is None), None)
        out.append({**c.to_json(), "members": sum(per_phase[c.cohort_id].values()),
                    "per_phase": per_phase[c.cohort_id], "advances": len(advances),
                    "last_advance": None if last is None else {
                        "advance": last.advance_no, "to": last.to_phase,
                        "moved": last.moved, "held": last.held}})
    steps = (["`bridgectl cohort show NAME` for one cohort's members, held members and "
              "history"] if out else
             ["`bridgectl cohort create NAME --percent P` (or --file F, --handles H ...)"])
    return {"cohorts": out, "next": steps}


# ---------------------------------------------------------------- printing

def emit(obj: dict[str, Any], text: str, as_json: bool) -> None:
    """One JSON object (with its ``next`` steps), or the text followed by them."""
    if as_json:
        print(json.dumps(obj, sort_keys=True, default=str))
        return
    print(text)
    for step in obj.get("next", ()):
        print(f"next: {step}")


def render_show(d: dict[str, Any]) -> str:
    c = d["cohort"]
    lines = [f"cohort {c['name']}: {c['state']}, {d['members']} member"
             f"{'s' * (d['members'] != 1)} ({selection_text(c['selection'])}; created by "
             f"{c['created_by']} at {utc(c['created_ms'])}"
             + (f"; {c['state']} by {c['ended_by']} at {utc(c['ended_ms'])}"
                if c["ended_ms"] is not None else "") + ")",
             "members per phase: " + ", ".join(f"{p} {n}" for p, n in d["per_phase"].items())]
    if d["advances"]:
        lines.append("advances:")
    for a in d["advances"]:
        done = ("not finished (the command stopped before it recorded its outcome)"
                if not a["finished"] else
                f"{a['moved']} moved, {a['held']} held, {a['failed']} failed")
        lines.append(f"  {a['advance']:>3}  to {a['to']:<10}  by {a['actor']} at "
                     f"{utc(a['at_ms'])}{' (forced)' if a['forced'] else ''}: {done}"
                     + (f"; reversed at {utc(a['reversed_ms'])}" if a["reversed_ms"] else ""))
    if d["held_total"]:
        lines.append(f"held on advance {d['last_advance']}: {d['held_total']} member"
                     f"{'s' * (d['held_total'] != 1)}"
                     + (f" (first {len(d['held'])} shown)"
                        if len(d["held"]) < d["held_total"] else ""))
        width = max(len(h["handle"]) for h in d["held"]) if d["held"] else 0
        for h in d["held"]:
            for g in h["gates"]:
                when = " (when applied)" if h["when"] == "apply" else ""
                lines.append(f"  {h['handle']:<{width}}  {h['phase']:<10}  held by "
                             f"{g['name']}{when}: {g['reason']}")
    if d["history"]:
        lines.append("history:")
    for h in d["history"]:
        lines.append(f"  {utc(h['at_ms'])}  {h['actor']}  {h['action']}  "
                     f"{json.dumps(h['detail'], sort_keys=True)}")
    return "\n".join(lines)


def render_list(d: dict[str, Any]) -> str:
    rows = d["cohorts"]
    if not rows:
        return "no cohorts"
    width = max(4, *(len(r["name"]) for r in rows))
    head = (f"{'NAME':<{width}}  {'STATE':<9}  {'MEMBERS':>7}  "
            + "  ".join(f"{p.upper():>10}" for p in PHASES) + "  LAST ADVANCE")
    lines = [head]
    for r in rows:
        last = r["last_advance"]
        lines.append(f"{r['name']:<{width}}  {r['state']:<9}  {r['members']:>7}  "
                     + "  ".join(f"{r['per_phase'][p]:>10}" for p in PHASES) + "  "
                     + ("-" if last is None else f"{last['advance']} to {last['to']}"))
    return "\n".join(lines)


def move_report(move: CohortMove, outcome: Any | None, *, dry_run: bool,
                next_: list[str]) -> tuple[dict[str, Any], str]:
    """An advance, reverse or cancel: the migration report of its plan (``migrate``'s
    shape, with the cohort, the action and the advance), and its text, which leaves out
    the members that did not change (the counts include them)."""
    report = migration_report.plan_to_json(move.plan, outcome, dry_run=dry_run)
    report.update({"cohort": move.cohort.name, "action": move.action,
                   "advance": move.advance_no, "next": next_})
    shown = {**report, "accounts": [a for a in report["accounts"]
                                    if a["result"] != "unchanged"]}
    text = migration_report.render_plan(shown, total=len(report["accounts"]))
    if move.action == "advance":
        head = (f"advance{'' if move.advance_no is None else f' {move.advance_no}'} "
                f"to {move.plan.target}")
    elif move.action == "reverse":
        head = f"reverse of advance {move.advance_no}"
    else:
        head = "cancel: every advance not reversed yet is undone, then the cohort ends"
    head = f"cohort {move.cohort.name}: {head}"
    return report, f"{head}\n{text}"
