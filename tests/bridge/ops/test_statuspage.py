"""The status page: history ring and throughput, the sampler on a Clock, the two routes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from bridge.ops import status
from bridge.ops.health import OperationsResource
from bridge.ops.statuspage import (
    MAX_SAMPLES,
    SAMPLE_FAILURES,
    StatusHistory,
    StatusPage,
    StatusSampler,
)
from bridgectl import main as cli
from cloud.db import DatabaseUnavailable, InlineDatabase, run_transaction
from tests.bridge.ops.test_status import SECRET, populate
from tests.bridge.test_phases import NOW
from tests.dbfixture import ScriptedDatabase


def worker(worker_id: str = "w1", *, started: int = 0, heartbeat: int, now: int,
           to_cloud: int = 0, to_legacy: int = 0, live: bool = True) -> dict[str, Any]:
    """One entry of a snapshot's ``workers``, as status.gather writes it."""
    return {"worker_id": worker_id, "state": "ready", "live": live,
            "heartbeat_age_ms": now - heartbeat, "started_ms": started,
            "lag_to_cloud_ms": 100, "lag_to_legacy_ms": None,
            "mirrored_to_cloud": to_cloud, "mirrored_to_legacy": to_legacy, "feeds": 3}


def snapshot(now: int, workers: list[dict[str, Any]] = (), *, pending: int = 0,
             findings: dict[str, int] | None = None) -> dict[str, Any]:
    """A status.gather-shaped snapshot with just what the history reads filled in."""
    return {
        "now_ms": now, "accounts": {"total": 0, "per_phase": {}},
        "mirror_lag_ms": {"to_cloud": 120 if workers else None, "to_legacy": None},
        "workers": list(workers), "live_workers": sum(w["live"] for w in workers),
        "outbox_to_legacy": {"pending": pending, "oldest_age_ms": None},
        "open_findings": findings or {}, "findings": {}, "reconcile": {},
        "last_clean_reconcile": None, "leases": [],
        "notifications": {"pending": 1, "sent": 0, "acked": 2, "failed": 0}}


# ---------------------------------------------------------------- history

def test_history_keeps_only_the_newest_samples():
    """The ring drops the oldest sample once it holds *capacity*."""
    history = StatusHistory(capacity=3)
    for t in range(5):
        history.add(snapshot(t * 5_000, pending=t, findings={"gap": t}))
    assert len(history) == 3 and history.capacity == 3
    assert [s.t_ms for s in history.samples()] == [10_000, 15_000, 20_000]
    assert [(s.outbox_pending, s.open_findings) for s in history.samples()] == \
        [(2, 2), (3, 3), (4, 4)]


def test_history_size_follows_window_and_interval_within_bounds():
    """15 minutes at 5 s is 180 samples; a tiny interval is capped; nonsense is refused."""
    assert StatusHistory().capacity == 180
    assert StatusHistory.for_window(900, 5).capacity == 180
    assert StatusHistory.for_window(900, 0.01).capacity == MAX_SAMPLES
    with pytest.raises(ValueError):
        StatusHistory(capacity=1)
    with pytest.raises(ValueError):
        StatusHistory.for_window(900, 0)


def test_throughput_comes_from_counter_deltas_between_heartbeats():
    """Rates are counter deltas over the worker's own heartbeat times, summed over live
    workers; no new heartbeat keeps the last rate instead of aliasing to zero."""
    history = StatusHistory()
    # first sight: measured from the worker's start (50 messages in 10 s)
    s = history.add(snapshot(11_000, [worker(heartbeat=10_000, now=11_000, to_cloud=50,
                                             to_legacy=10)]))
    assert (s.rate_to_cloud, s.rate_to_legacy) == (5.0, 1.0)
    assert (s.mirrored_to_cloud, s.mirrored_to_legacy) == (50, 10)
    # next heartbeat 5 s later with 30 more to cloud
    s = history.add(snapshot(16_000, [worker(heartbeat=15_000, now=16_000, to_cloud=80,
                                             to_legacy=10)]))
    assert (s.rate_to_cloud, s.rate_to_legacy) == (6.0, 0.0)
    # sampled again before the worker's next heartbeat: the same rate, not zero
    s = history.add(snapshot(18_000, [worker(heartbeat=15_000, now=18_000, to_cloud=80,
                                             to_legacy=10)]))
    assert s.rate_to_cloud == 6.0
    # a second live worker adds its own rate; a dead one does not count
    s = history.add(snapshot(21_000, [
        worker(heartbeat=20_000, now=21_000, to_cloud=100, to_legacy=10),
        worker("w2", started=10_000, heartbeat=20_000, now=21_000, to_cloud=20),
        worker("w3", heartbeat=1_000, now=21_000, to_cloud=999_999, live=False)]))
    assert s.rate_to_cloud == 4.0 + 2.0
    assert s.mirrored_to_cloud == 100 + 20 + 999_999


def test_a_restarted_worker_never_makes_a_negative_rate():
    """Counters that restart from zero (new started_ms, or simply lower) are measured from
    the worker's start, not subtracted from the old counters."""
    history = StatusHistory()
    history.add(snapshot(10_000, [worker(heartbeat=10_000, now=10_000, to_cloud=800)]))
    s = history.add(snapshot(25_000, [worker(started=20_000, heartbeat=24_000, now=25_000,
                                             to_cloud=8)]))
    assert s.rate_to_cloud == 2.0  # 8 messages in the 4 s since the restart
    s = history.add(snapshot(30_000, [worker(started=20_000, heartbeat=29_000, now=30_000,
                                             to_cloud=3)]))  # lower, same start: from start
    assert s.rate_to_cloud == pytest.approx(3 / 9, abs=0.001)
    assert all(x.rate_to_cloud >= 0 for x in history.samples())


def test_rates_without_live_workers_are_zero_and_unknown_is_none():
    """No live worker: nothing is mirrored (0); a live worker whose heartbeat equals its
    start has no rate yet (None), which the chart leaves as a gap."""
    history = StatusHistory()
    assert history.add(snapshot(1_000)).rate_to_cloud == 0.0
    s = history.add(snapshot(2_000, [worker(started=2_000, heartbeat=2_000, now=2_000)]))
    assert s.rate_to_cloud is None and s.rate_to_legacy is None


# ---------------------------------------------------------------- sampler

class RecordingGather:
    """A fake ``status.gather``: records the times it was asked for, answers a snapshot."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, conn: object, now_ms: int) -> dict[str, Any]:
        self.calls.append(now_ms)
        return snapshot(now_ms, pending=len(self.calls))


class ImmediateDatabase:
    """A TransactionRunner without a database: runs fn(None, ...) at once."""

    def run(self, desc, fn, *args, **kwargs) -> defer.Deferred:
        return defer.maybeDeferred(fn, None, *args, **kwargs)


class HeldDatabase:
    """A TransactionRunner whose transactions finish only when the test fires them."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def run(self, desc, fn, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def test_sampler_samples_at_start_and_every_interval_on_the_clock():
    """The first sample is taken at once, then one per interval at the clock's time."""
    clock = Clock()
    clock.advance(100)
    gather = RecordingGather()
    sampler = StatusSampler(clock, ImmediateDatabase(), interval_s=5, gather=gather)
    sampler.startService()
    clock.advance(0)
    assert gather.calls == [100_000] and sampler.latest_ms == 100_000
    clock.advance(4.9)
    assert len(gather.calls) == 1
    clock.advance(0.1)
    clock.advance(5)
    assert gather.calls == [100_000, 105_000, 110_000]
    assert len(sampler.history) == 3 and sampler.latest["outbox_to_legacy"]["pending"] == 3
    sampler.stopService()
    clock.advance(60)
    assert len(gather.calls) == 3


def test_a_failed_sample_keeps_the_last_snapshot_and_the_loop_goes_on(log_events):
    """An unreachable store and an unexpected error are logged and counted, the latest good
    snapshot stays, and the next interval samples again."""
    events = log_events("bridge.ops.statuspage")
    clock = Clock()
    gather = RecordingGather()
    db = ScriptedDatabase(ImmediateDatabase(), None,
                          [None, DatabaseUnavailable("server closed the connection"),
                           RuntimeError("a bug")])
    unavailable = SAMPLE_FAILURES.labels(reason="database_unavailable")._value.get()
    errors = SAMPLE_FAILURES.labels(reason="error")._value.get()
    sampler = StatusSampler(clock, db, interval_s=5, gather=gather)
    sampler.startService()
    clock.advance(0)
    first = sampler.latest
    clock.advance(5)  # the store is down
    assert sampler.latest is first and sampler.last_error == "DatabaseUnavailable"
    assert sampler.last_error_ms == 5_000 and len(sampler.history) == 1
    assert StatusPage(sampler).payload()["sample_error"] == {
        "type": "DatabaseUnavailable", "age_ms": 0}  # what the page shows: no message text
    clock.advance(5)  # a bug raises
    assert sampler.latest is first and sampler.last_error == "RuntimeError"
    assert any(e.get("log_failure") is not None for e in events)  # with its traceback
    clock.advance(5)  # back to normal
    assert sampler.latest is not first and sampler.last_error is None
    assert len(sampler.history) == 2 and gather.calls == [0, 15_000]
    assert SAMPLE_FAILURES.labels(reason="database_unavailable")._value.get() == unavailable + 1
    assert SAMPLE_FAILURES.labels(reason="error")._value.get() == errors + 1
    sampler.stopService()


def test_stopping_waits_for_the_sample_in_flight():
    """stopService fires only once the transaction in flight has finished."""
    clock = Clock()
    db = HeldDatabase()
    sampler = StatusSampler(clock, db, interval_s=5)
    sampler.startService()
    clock.advance(0)
    stopped = sampler.stopService()
    assert not stopped.called
    db.pending[0].callback(snapshot(0))
    assert stopped.called and sampler.latest is not None
    clock.advance(30)
    assert len(db.pending) == 1


# ---------------------------------------------------------------- the routes

def request(resource: OperationsResource, path: bytes,
            method: bytes = b"GET") -> tuple[int, DummyRequest, bytes]:
    req = DummyRequest([])
    req.path, req.method = path, method
    body = resource.render(req)
    return req.responseCode or 200, req, body


def header(req: DummyRequest, name: bytes) -> str:
    return req.responseHeaders.getRawHeaders(name)[0].decode()


def sampled_page(snap: dict[str, Any] | None = None) -> tuple[Clock, StatusSampler, StatusPage]:
    clock = Clock()
    clock.advance(NOW / 1000)
    sampler = StatusSampler(clock, ImmediateDatabase(), interval_s=5,
                            gather=lambda _conn, now: snap or snapshot(now))
    sampler.startService()
    clock.advance(0)
    clock.advance(2.5)  # the page is asked for between two samples
    return clock, sampler, StatusPage(sampler)


def embedded_json(html: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="status-data">(.*?)</script>', html,
                  re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_status_json_has_the_snapshot_the_history_and_its_age():
    """/status.json is {status, history, sampled_age_ms, ...}, status exactly the snapshot."""
    _, sampler, page = sampled_page()
    ops = OperationsResource(lambda: [], page)
    code, req, body = request(ops, b"/status.json")
    assert code == 200 and header(req, b"Content-Type") == "application/json"
    assert header(req, b"Cache-Control") == "no-store"
    got = json.loads(body)
    assert got["status"] == json.loads(json.dumps(sampler.latest, sort_keys=True))
    assert got["sampled_age_ms"] == 2_500 and got["sample_error"] is None
    assert got["interval_ms"] == 5_000 and got["refresh_ms"] == 5_000
    assert [s["t_ms"] for s in got["history"]] == [NOW]
    assert set(got["history"][0]) >= {"lag_to_cloud_ms", "lag_to_legacy_ms", "rate_to_cloud",
                                      "rate_to_legacy", "outbox_pending", "open_findings",
                                      "notifications", "mirrored_to_cloud"}


def test_status_json_before_the_first_sample():
    """Before any sample: no status, empty history, no age; still 200."""
    clock = Clock()
    page = StatusPage(StatusSampler(clock, HeldDatabase()))
    code, _, body = request(OperationsResource(lambda: [], page), b"/status.json")
    assert code == 200 and json.loads(body)["status"] is None
    assert json.loads(body)["history"] == [] and json.loads(body)["sampled_age_ms"] is None


def test_status_html_embeds_the_payload_under_a_strict_csp():
    """/status is one HTML page: no external asset, the payload embedded, no-store, and a CSP
    that allows exactly the inline script and style by their hashes."""
    _, _, page = sampled_page()
    ops = OperationsResource(lambda: [], page)
    code, req, body = request(ops, b"/status")
    html = body.decode()
    assert code == 200 and header(req, b"Content-Type") == "text/html; charset=utf-8"
    assert header(req, b"Cache-Control") == "no-store"
    assert int(header(req, b"Content-Length")) == len(body)
    assert embedded_json(html) == json.loads(request(ops, b"/status.json")[2])
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing fetched from elsewhere
    csp = header(req, b"Content-Security-Policy")
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    for text in (script, style):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "fetch(\"/status.json\"" in script  # it refreshes itself


def test_embedded_json_can_not_close_its_script_element():
    """A worker id with markup in it stays data: the embedded JSON has no '<' at all."""
    evil = "</script><script>alert(1)</script><!--"
    snap = snapshot(NOW, [worker(evil, heartbeat=NOW, now=NOW)])
    _, _, page = sampled_page(snap)
    html = request(OperationsResource(lambda: [], page), b"/status")[2].decode()
    assert "alert(1)</script>" not in html
    assert embedded_json(html)["status"]["workers"][0]["worker_id"] == evil


def test_status_routes_refuse_other_methods_and_paths_and_keep_the_old_ones():
    """POST is 405 with Allow, HEAD is fine, unknown paths are JSON 404 naming /status;
    /metrics, /healthz, /readyz answer as before."""
    _, _, page = sampled_page()
    ops = OperationsResource(lambda: ["no supernode feed is streaming"], page)
    for path in (b"/status", b"/status.json"):
        code, req, _ = request(ops, path, b"POST")
        assert code == 405 and header(req, b"Allow") == "GET, HEAD"
        assert request(ops, path, b"HEAD")[0] == 200
    for path in (b"/status/", b"/status.html", b"/statusjson"):
        code, _, body = request(ops, path)
        assert code == 404 and "/status.json" in json.loads(body)["error"]["message"]
    assert request(ops, b"/healthz")[0] == 200 and request(ops, b"/readyz")[0] == 503
    assert b"bridge_status_sample_failures_total" in request(ops, b"/metrics")[2]
    # without a status page the operations endpoint is what it was
    bare = OperationsResource(lambda: [])
    assert request(bare, b"/status")[0] == 404 and request(bare, b"/status.json")[0] == 404


def test_a_bad_status_interval_exits_2(capsys, tmp_path, monkeypatch):
    """--status-interval outside 0.1..3600 s is a usage error before anything starts."""
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    for value in ("0", "0.01", "7200"):
        assert cli.main(["bridge", "run", "--legacy", "127.0.0.1:1",
                         "--status-interval", value]) == cli.EXIT_USAGE
        assert "--status-interval" in capsys.readouterr().err


def test_the_page_shows_the_store_and_no_secret(conn, db_dsn):
    """Against a real store: the page's status is status.gather's, and neither the worker's
    secret detail nor the DSN appears in the HTML or the JSON."""
    populate(conn)
    clock = Clock()
    clock.advance(NOW / 1000)
    sampler = StatusSampler(clock, InlineDatabase(conn), interval_s=5)
    sampler.startService()
    clock.advance(0)
    ops = OperationsResource(lambda: [], StatusPage(sampler))
    got = json.loads(request(ops, b"/status.json")[2])
    expected = json.loads(json.dumps(run_transaction(conn, "status_gather", status.gather,
                                                     NOW), sort_keys=True))
    assert got["status"] == expected
    assert got["status"]["findings"]["presence"]["repaired"] == 1
    assert got["history"][0]["open_findings"] == 3 and got["history"][0]["outbox_pending"] == 2
    html = request(ops, b"/status")[2].decode()
    for text in (html, json.dumps(got)):
        assert SECRET not in text and db_dsn not in text and "password" not in text
    sampler.stopService()
