"""The status page in a real headless Chromium, served by a real ``bridgectl bridge run``.

A real legacy network and a real bridge worker (subprocesses, loopback TCP, this run's
PostgreSQL) with some accounts, findings, reconcile runs and notifications seeded; Chromium
loads ``/status``, runs its script (which draws everything: the served HTML has no figures
and no chart lines) and dumps the DOM, whose figures must equal ``bridgectl status --json``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from drills.ports import free_port_range
from tests.bridge.test_bridge_tcp import BRIDGECTL, wait_for
from tests.bridge.test_phases import add_finding, add_run, add_worker, make_account

CHROMIUM = next(filter(None, (shutil.which(name) for name in
                              ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (chromium, chromium-browser or "
                             "google-chrome); .ci/run installs Debian's chromium when it can")

SUPERNODES = 3
USERS = 12
SEEDED_PHASES = {"ops-dual-1": "dual", "ops-dual-2": "dual", "ops-cloud-1": "cloud",
                 "ops-only-1": "cloud-only"}


# ---------------------------------------------------------------- a small DOM

class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs = tag, attrs
        self.children: list[Element | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Any:
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()


class DomParser(HTMLParser):
    """Chromium's ``--dump-dom`` output as a tree of ``Element`` (html.parser, stdlib)."""

    VOID = {"meta", "link", "br", "hr", "img", "input", "source", "wbr", "col", "area"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_dom(html: str) -> Element:
    parser = DomParser()
    parser.feed(html)
    parser.close()
    return parser.root


# ---------------------------------------------------------------- the setup

class Process:
    """A subprocess whose stderr is drained by a thread (so it never blocks on a full pipe)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def find(self, pattern: str) -> re.Match | None:
        return next(filter(None, (re.search(pattern, line) for line in list(self.lines))), None)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


def now_ms() -> int:
    return int(time.time() * 1000)


def seed(conn) -> None:
    """Accounts in three cloud phases, open and repaired findings, two reconcile runs (one
    clean), notifications in every state but sent, a worker that stopped long ago, a
    migration freeze and a pause of the reconcilers."""
    now = now_ms()
    conn.execute("INSERT INTO operator_controls (name, value, set_by, set_ms) "
                 "VALUES ('migration_freeze', '{\"reason\": \"incident 42\"}', 'ops-dana', %s)",
                 (now - 60_000,))
    conn.execute("INSERT INTO operator_controls (name, value, set_by, set_ms) "
                 "VALUES ('reconcilers_paused', '{\"reason\": \"db upgrade\"}', 'ops-eve', %s)",
                 (now - 30_000,))
    for handle, phase in SEEDED_PHASES.items():
        make_account(conn, handle, phase)
    add_finding(conn, "gap")
    add_finding(conn, "gap")
    add_finding(conn, "notification_failed")
    add_finding(conn, "presence", state="repaired")
    add_finding(conn, "gap", state="repaired")
    add_run(conn, "gaps", age_ms=120_000, now=now)
    add_run(conn, "notifications", clean=False, age_ms=30_000, now=now)
    add_worker(conn, "old-worker", state="stopped", age_ms=3_600_000, now=now)
    cid = uuid.uuid4()
    for state in ("pending", "acked", "acked", "failed"):
        conn.execute("INSERT INTO notifications (account_id, notification_id, conversation_id, "
                     "message_id, seq, state, next_attempt_ms, created_ms) "
                     "VALUES (%s, %s, %s, %s, 1, %s, 0, 0)",
                     (uuid.uuid4(), uuid.uuid4(), cid, uuid.uuid4(), state))


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, dict(response.headers), response.read()


def ready_to_look(base: str) -> dict[str, Any] | None:
    """The /status.json payload once the picture is complete: every account synced, all
    feeds followed, and at least two samples with a lag and a throughput to draw."""
    payload = json.loads(get(base + "/status.json")[2])
    st, history = payload["status"], payload["history"]
    if st is None:
        return None
    me = [w for w in st["workers"] if w["worker_id"] == "page-test"]
    lags = [s for s in history if s["lag_to_cloud_ms"] is not None]
    rates = [s for s in history if s["rate_to_cloud"]]
    if (st["accounts"]["total"] == USERS + len(SEEDED_PHASES) and me and me[0]["feeds"] ==
            SUPERNODES and len(lags) >= 2 and len(rates) >= 2):
        return payload
    return None


def chromium(url: str, profile: Path, *extra: str) -> str:
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", f"--user-data-dir={profile}",
         "--virtual-time-budget=8000", *extra, url],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def points(polyline: Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.attrs["points"].split()]


# ---------------------------------------------------------------- the test

def test_status_page_renders_in_chromium_and_matches_bridgectl_status(conn, db_dsn, tmp_path):
    """Chromium runs the page's script: three SVG charts with real lines, figures equal to
    `bridgectl status --json`, a refresh of /status.json, and no secret anywhere."""
    seed(conn)
    env = {"BRIDGE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    port = free_port_range(SUPERNODES + 1)
    legacy = Process([*BRIDGECTL, "legacy", "run", "--supernodes", str(SUPERNODES),
                      "--users", str(USERS), "--rate", "20", "--port", str(port),
                      "--seed", "5", "--duration", "120"], env)
    bridge = None
    try:
        wait_for(lambda: legacy.find("legacy network up"), timeout=20)
        bridge = Process([*BRIDGECTL, "bridge", "run", "--dsn", db_dsn, "--metrics-port", "0",
                          "--legacy", f"127.0.0.1:{port + SUPERNODES}",
                          "--worker-id", "page-test", "--status-interval", "0.5"], env)
        m = wait_for(lambda: bridge.find(r"status page on (http://127\.0\.0\.1:\d+)/status\b"),
                     timeout=20)
        base = m.group(1)
        wait_for(lambda: ready_to_look(base), timeout=20, every=0.25)

        # what the server sends has no figures and no chart lines: the script draws them
        code, headers, raw = get(base + "/status")
        assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        served = list(parse_dom(raw.decode()).iter())
        assert not [n for n in served if n.tag in ("svg", "polyline") or "data-field" in n.attrs]

        dom = parse_dom(chromium(base + "/status", tmp_path / "profile", "--dump-dom"))
        expected = json.loads(subprocess.run(
            [*BRIDGECTL, "status", "--json", "--dsn", db_dsn], capture_output=True, text=True,
            env=env, timeout=30, check=True).stdout)
    finally:
        rc = bridge.stop() if bridge is not None else None
        legacy.stop()
    assert rc == 0, "".join(bridge.lines[-20:])

    nodes = list(dom.iter())
    app = next(n for n in nodes if n.attrs.get("id") == "app")
    assert app.attrs.get("data-rendered") == "js"
    assert int(app.attrs["data-refreshes"]) >= 1  # it fetched /status.json by itself

    # the charts: inline SVG drawn by the script, each with a line of two points or more
    charts = {n.attrs["data-chart"]: n for n in nodes if n.tag == "svg" and "data-chart" in
              n.attrs}
    assert set(charts) == {"lag", "throughput", "backlog"}
    for name, svg in charts.items():
        assert svg.attrs["data-rendered"] == "js"
        lines = [n for n in svg.iter() if n.tag == "polyline"]
        assert lines, f"chart {name} has no line"
        for line in lines:
            xs = [x for x, _ in points(line)]
            assert len(xs) >= 2 and xs == sorted(xs) and len(set(xs)) == len(xs), name
    for name in ("lag", "throughput"):
        assert any(n.tag == "polyline" and n.attrs["data-series"] in
                   ("lag_to_cloud_ms", "rate_to_cloud") for n in charts[name].iter()), name

    # the figures: what the operator reads equals what `bridgectl status --json` says
    fields: dict[str, tuple[Any, str]] = {}
    for n in nodes:
        if "data-field" in n.attrs:
            fields[n.attrs["data-field"]] = (json.loads(n.attrs["data-value"]), n.text().strip())

    def shows(name: str, value: Any) -> None:
        assert name in fields, f"no {name} on the page"
        raw, text = fields[name]
        assert raw == value, (name, raw, value)
        if isinstance(value, int) and not isinstance(value, bool):
            assert text == str(value), (name, text, value)

    assert expected["accounts"]["per_phase"] == {"legacy": USERS, "dual": 2, "cloud": 1,
                                                 "cloud-only": 1}
    shows("accounts.total", expected["accounts"]["total"])
    for phase, n in expected["accounts"]["per_phase"].items():
        shows(f"accounts.per_phase.{phase}", n)
    assert expected["open_findings"] == {"gap": 2, "notification_failed": 1}
    for kind, n in expected["open_findings"].items():
        shows(f"open_findings.{kind}", n)
    shows("open_findings.total", sum(expected["open_findings"].values()))
    assert expected["findings"]["gap"]["repaired"] == 1
    for kind, states in expected["findings"].items():
        for state, n in states.items():
            shows(f"findings.{kind}.{state}", n)
    shows("findings.repaired.total", 2)
    assert expected["notifications"] == {"pending": 1, "sent": 0, "acked": 2, "failed": 1}
    for state, n in expected["notifications"].items():
        shows(f"notifications.{state}", n)
    shows("workers.count", len(expected["workers"]))
    shows("live_workers", expected["live_workers"])
    assert expected["live_workers"] == 1 and len(expected["workers"]) == 2
    shows("leases.count", len(expected["leases"]))
    assert len(expected["leases"]) >= SUPERNODES
    assert set(expected["reconcile"]) == {"gaps", "notifications"}
    for kind, run in expected["reconcile"].items():
        for key in ("run_id", "state", "clean"):
            shows(f"reconcile.{kind}.{key}", run[key])
    shows("last_clean_reconcile.run_id", expected["last_clean_reconcile"]["run_id"])
    for w in expected["workers"]:
        shows(f"workers.{w['worker_id']}.state", w["state"])
    raw_freeze, freeze_text = fields["freeze"]  # its age differs: the page sampled earlier
    assert {k: raw_freeze[k] for k in ("reason", "set_by", "set_ms")} == \
        {k: expected["freeze"][k] for k in ("reason", "set_by", "set_ms")}
    assert "frozen" in freeze_text and "ops-dana" in freeze_text and "incident 42" in freeze_text
    raw_pause, pause_text = fields["paused_reconcilers"]
    assert {k: raw_pause[k] for k in ("what", "reason", "set_by", "set_ms")} == {
        k: expected["controls"]["paused"]["reconcilers"][k]
        for k in ("what", "reason", "set_by", "set_ms")}
    assert "paused_injection" not in fields and expected["controls"]["paused"]["injection"] is None
    assert "Reconcile runs paused" in pause_text and "ops-eve" in pause_text
    assert "db upgrade" in pause_text

    page_text = dom.text()
    assert expected["dsn"] not in page_text and "password" not in page_text
