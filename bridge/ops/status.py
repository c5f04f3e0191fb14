"""What ``bridgectl status`` shows: one read transaction into one JSON-able dict, and its text.

Everything comes from the store (the bridge workers report themselves in ``bridge_workers``),
so status works from any machine that reaches the database and needs no running bridge. It
never shows secrets: of a worker's ``detail`` only its lags and how it applied the runtime
controls, no connection strings (the CLI adds the DSN with its password redacted).
"""

from __future__ import annotations

from typing import Any

import psycopg

from cloud import admin
from cloud.store import controls as controls_store
from cloud.store import notifications as notifications_store
from cloud.store import outbox as outbox_store


def _run(run: admin.ReconcileRun, now_ms: int) -> dict[str, Any]:
    ratio, eta = run.progress_ratio(), run.eta_seconds(now_ms)
    return {"run_id": run.run_id, "kind": run.kind, "state": run.state,
            "started_ms": run.started_ms, "finished_ms": run.finished_ms,
            "age_ms": now_ms - (run.finished_ms if run.finished_ms is not None
                                else run.started_ms),
            "clean": run.clean, "scope": run.scope,
            "done": run.done, "total": run.total,
            "progress_ratio": None if ratio is None else round(ratio, 4),
            "eta_s": None if eta is None else round(eta, 1),
            "progress_age_ms": None if run.updated_ms is None else now_ms - run.updated_ms}


def _max(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def lag_outside_faults(live: list[Any], direction: str) -> dict[str, Any]:
    """How much of the live workers' lag in *direction* is the faults': the worst p99 of
    the messages that met no fault, and how many of their recent messages met one."""
    parts = [w.detail.get(f"lag_{direction}") or {} for w in live]
    samples = sum(p.get("samples") or 0 for p in parts)
    met = sum(p.get("met_faults") or 0 for p in parts)
    return {"p99_ms": _max([p.get("p99_steady_ms") for p in parts]), "samples": samples,
            "met_faults": met,
            "met_faults_share": round(met / samples, 3) if samples else None}


def gather(conn: psycopg.Connection, now_ms: int, *,
           live_within_ms: int = admin.LIVE_WORKER_MS) -> dict[str, Any]:
    """Everything status shows, read in one transaction (``fn(conn, ...)``).

    ``mirror_lag_ms`` is the worst lag over the live workers per direction (None: no live
    worker measured one); each worker's own lags are in ``workers``. ``findings`` counts
    every finding by kind and state (open, repaired, failed, unrecoverable, dismissed);
    ``unrecoverable_findings`` the legacy network's own losses by kind, reported apart.
    ``freeze`` is the migration freeze (who, when, why, its age) or None: while it is set,
    every promotion is held by the gate ``frozen``. ``controls`` are the operator's runtime
    controls (``bridgectl control``): each pause that is on (who, when, why, its age) and
    the injector's concurrency when one was set; each worker's ``injection`` says how its
    last heartbeat applied them (paused, window).
    ``reconcile`` is the latest full run of each kind, ``reconcile_targeted`` the latest
    targeted runs (``--account``/``--conversation``); each with its pass's progress
    (``done`` of ``total``, ``progress_ratio``) and, while running, ``eta_s``: the run's own
    estimate at its last save less the time since (``progress_age_ms`` ago).
    ``lag_outside_faults`` says how much of that lag is the faults' (``bridge.faults``): per
    direction, the worst p99 of the messages that met no fault (a lost feed, a failed
    injection, a database outage, a worker's restart) and how many recent ones met one.
    """
    workers = admin.workers(conn)
    live = [w for w in workers if w.live(now_ms, live_within_ms)]
    pending, oldest = outbox_store.outbox_backlog(conn, now_ms)
    per_phase = admin.accounts_per_phase(conn)
    last_clean = admin.last_clean_reconcile(conn)
    findings = admin.findings_by_state(conn)
    freeze = controls_store.read_freeze(conn)
    return {
        "now_ms": now_ms,
        "freeze": None if freeze is None else freeze.to_json(now_ms),
        "controls": controls_store.read_runtime_controls(conn).to_json(now_ms),
        "accounts": {"total": sum(per_phase.values()), "per_phase": per_phase},
        "mirror_lag_ms": {"to_cloud": _max([w.lag_to_cloud_ms for w in live]),
                          "to_legacy": _max([w.lag_to_legacy_ms for w in live])},
        "lag_outside_faults": {d: lag_outside_faults(live, d) for d in ("to_cloud", "to_legacy")},
        "workers": [{
            "worker_id": w.worker_id, "state": w.state, "live": w.live(now_ms, live_within_ms),
            "heartbeat_age_ms": now_ms - w.heartbeat_ms, "started_ms": w.started_ms,
            "lag_to_cloud_ms": w.lag_to_cloud_ms, "lag_to_legacy_ms": w.lag_to_legacy_ms,
            "mirrored_to_cloud": w.mirrored_to_cloud, "mirrored_to_legacy": w.mirrored_to_legacy,
            "feeds": w.feeds, "injection": w.detail.get("injection"),
            "lag_outside_faults": {d: w.detail.get(f"lag_{d}") for d in ("to_cloud", "to_legacy")},
        } for w in workers],
        "live_workers": len(live),
        "outbox_to_legacy": {"pending": pending, "oldest_age_ms": oldest},
        "open_findings": {kind: n["open"] for kind, n in findings.items() if n["open"]},
        "unrecoverable_findings": {kind: n["unrecoverable"] for kind, n in findings.items()
                                   if n["unrecoverable"]},
        "findings": findings,
        "reconcile": {kind: _run(run, now_ms)
                      for kind, run in sorted(admin.last_reconcile_runs(conn).items())},
        "reconcile_targeted": [_run(run, now_ms)
                               for run in admin.targeted_reconcile_runs(conn)],
        "last_clean_reconcile": None if last_clean is None else _run(last_clean, now_ms),
        "leases": [{"name": lease.name, "holder": lease.holder, "fence": lease.fence,
                    "expires_ms": lease.expires_ms,
                    "expires_in_ms": lease.expires_ms - now_ms,
                    "expired": lease.expires_ms <= now_ms} for lease in admin.leases(conn)],
        "notifications": notifications_store.notification_counts(conn),
    }


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 10_000:
        return f"{value} ms"
    s = value / 1000
    if abs(s) < 120:
        return f"{s:.0f} s"
    if abs(s) < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def render_controls(controls: dict[str, Any]) -> str:
    """The runtime controls (``RuntimeControls.to_json``) on one line."""
    parts = []
    for what, pause in controls["paused"].items():
        if pause is None:
            parts.append(f"{what} running")
            continue
        why = f": {pause['reason']}" if pause["reason"] else ""
        age = f" {_ms(pause['age_ms'])} ago" if "age_ms" in pause else ""
        parts.append(f"{what.upper()} PAUSED by {pause['set_by']}{age}{why}")
    setting = controls["injector_concurrency"]
    parts.append("injector concurrency " + ("as configured" if setting is None else
                                            f"{setting['value']} (set by {setting['set_by']})"))
    return "; ".join(parts)


def _run_line(run: dict[str, Any]) -> str:
    """One reconcile run for a terminal: state, cleanliness, progress and ETA, age."""
    clean = {True: "clean", False: "not clean", None: ""}[run["clean"]]
    text = f"run {run['run_id']} {run['state']} {clean}".rstrip()
    if run.get("progress_ratio") is not None and run["state"] != "finished":
        text += f", {run['progress_ratio']:.0%} of its pass"
        if run.get("total") is not None:
            text += f" ({run['done']}/{run['total']})"
        if run["state"] == "running":
            text += (", ETA " + ("unknown yet" if run.get("eta_s") is None
                                 else _ms(int(run["eta_s"] * 1000))))
    return text + f", {_ms(run['age_ms'])} ago"


def render(status: dict[str, Any]) -> str:
    """The status dict as text for a terminal."""
    out = []
    if "database" in status:
        out.append(f"database:      {status['database']}")
    freeze = status.get("freeze")
    out.append("freeze:        " + ("off" if freeze is None else
                                    f"ON, promotions held (gate frozen), set by "
                                    f"{freeze['set_by']} {_ms(freeze['age_ms'])} ago: "
                                    f"{freeze['reason']}"))
    out.append("controls:      " + render_controls(status["controls"]))
    acc = status["accounts"]
    phases = "  ".join(f"{p} {n}" for p, n in acc["per_phase"].items())
    out.append(f"accounts:      {acc['total']}  ({phases})")
    lag = status["mirror_lag_ms"]
    out.append(f"mirror lag:    to cloud {_ms(lag['to_cloud'])}, "
               f"to legacy {_ms(lag['to_legacy'])}  (worst live worker, p99)")
    steady = status["lag_outside_faults"]
    out.append("  outside faults: " + ", ".join(
        f"{d.replace('_', ' ')} {_ms(steady[d]['p99_ms'])}"
        + (f" ({steady[d]['met_faults']} of {steady[d]['samples']} recent messages met a "
           f"fault)" if steady[d]["samples"] else "")
        for d in ("to_cloud", "to_legacy")))
    box = status["outbox_to_legacy"]
    out.append(f"outbox:        {box['pending']} pending to legacy"
               + (f", oldest {_ms(box['oldest_age_ms'])}" if box["pending"] else ""))
    n = status["notifications"]
    out.append("notifications: " + "  ".join(f"{k} {v}" for k, v in n.items()))
    findings = status["open_findings"]
    out.append("open findings: " + ("  ".join(f"{k} {v}" for k, v in findings.items())
                                    if findings else "none"))
    lost = status["unrecoverable_findings"]
    if lost:  # the legacy network's own losses: no repair can undo them
        out.append("unrecoverable: " + "  ".join(f"{k} {v}" for k, v in lost.items())
                   + "  (lost by the legacy network itself)")
    out.append(f"workers:       {status['live_workers']} live of {len(status['workers'])}")
    for w in status["workers"]:
        out.append(f"  {w['worker_id']:<20} {w['state']:<9} "
                   f"{'live' if w['live'] else 'down':<5} heartbeat {_ms(w['heartbeat_age_ms'])}"
                   f" ago, lag to cloud {_ms(w['lag_to_cloud_ms'])}, to legacy "
                   f"{_ms(w['lag_to_legacy_ms'])}, feeds {w['feeds']}"
                   + ("" if not w.get("injection") else
                      f", injection {'PAUSED' if w['injection']['paused'] else 'on'} "
                      f"(window {w['injection']['window']})"))
    out.append(f"leases:        {len(status['leases'])}")
    for lease in status["leases"]:
        if lease["expires_ms"] <= 0:
            when = "released"
        elif lease["expired"]:
            when = f"expired {_ms(-lease['expires_in_ms'])} ago"
        else:
            when = f"expires in {_ms(lease['expires_in_ms'])}"
        out.append(f"  {lease['name']:<20} {lease['holder']:<20} fence {lease['fence']}, {when}")
    out.append("reconcile:     " + ("" if status["reconcile"] else "no runs yet"))
    for kind, run in status["reconcile"].items():
        out.append(f"  {kind:<20} {_run_line(run)}")
    for run in status.get("reconcile_targeted", []):
        out.append(f"  {run['kind'] + ' ' + run['scope']:<20} {_run_line(run)}")
    clean = status["last_clean_reconcile"]
    out.append("last clean:    " + ("none" if clean is None else
                                    f"{clean['kind']} run {clean['run_id']}, "
                                    f"{_ms(clean['age_ms'])} ago"))
    return "\n".join(out)
