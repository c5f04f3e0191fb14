"""The operator's status page, served by the bridge: ``/status`` (HTML) and ``/status.json``.

::

    StatusSampler (a PollingLoop, every interval_s)
        db.run(status.gather, now_ms) --ok--> latest snapshot + StatusHistory.add(snapshot)
                                      --fails--> logged and counted; the last snapshot stays
                                                 (the page shows its age and why)

    GET /status       one HTML page: inline CSS and JS, the payload embedded as JSON, so the
                      first render needs no fetch; the JS draws the figures and the charts
                      (inline SVG) and fetches /status.json every refresh_ms
    GET /status.json  {"status": snapshot as status.gather returns it, "history": [...],
                       "sampled_age_ms": ..., ...}

The snapshot is what ``bridgectl status --json`` shows (less the database name and its
redacted DSN): ``status.gather`` never reads secrets, and this module adds none.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web import server

from bridge.ops import status
from cloud.db import DatabaseUnavailable, TransactionRunner
from servicekit.loop import PollingLoop, failure_counter

#: What the page covers by default: 15 minutes of samples taken every 5 s.
DEFAULT_INTERVAL_S = 5.0
DEFAULT_WINDOW_S = 15 * 60.0
#: However short the interval, the ring holds at most this many samples.
MAX_SAMPLES = 2_000

SAMPLE_FAILURES = failure_counter(
    "bridge_status_sample_failures_total",
    "Status page samples that failed (the page keeps showing the last good one).")


# ---------------------------------------------------------------- history

@attrs.frozen
class Sample:
    """What the charts plot at one moment, taken from one ``status.gather`` snapshot."""

    t_ms: int
    lag_to_cloud_ms: int | None
    lag_to_legacy_ms: int | None
    #: messages mirrored, summed over every worker row (each worker counts since its start)
    mirrored_to_cloud: int
    mirrored_to_legacy: int
    #: messages per second over the live workers; None while no live worker's rate is known
    rate_to_cloud: float | None
    rate_to_legacy: float | None
    outbox_pending: int
    open_findings: int
    notifications: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class _WorkerCounts:
    """A worker's counters as of its last heartbeat, and its rates up to then."""

    started_ms: int
    heartbeat_ms: int
    to_cloud: int
    to_legacy: int
    rate_to_cloud: float | None
    rate_to_legacy: float | None


def _rate(count: int, since_count: int, dt_ms: int) -> float | None:
    return None if dt_ms <= 0 else round((count - since_count) * 1000 / dt_ms, 3)


def _worker_counts(w: dict[str, Any], now_ms: int,
                   before: _WorkerCounts | None) -> _WorkerCounts:
    """*w*'s rates from the change of its counters between two of its own heartbeats.

    Rates use the worker's heartbeat times, not the sample times, so a sampler and a
    heartbeat ticking at the same period do not alias into 0, 2x, 0, 2x. A worker seen for
    the first time, restarted (a new ``started_ms``) or whose counters went down is measured
    from its start with counters at zero: never a negative rate.
    """
    heartbeat_ms = now_ms - w["heartbeat_age_ms"]
    to_cloud, to_legacy = w["mirrored_to_cloud"], w["mirrored_to_legacy"]
    if (before is not None and before.started_ms == w["started_ms"]
            and to_cloud >= before.to_cloud and to_legacy >= before.to_legacy):
        if heartbeat_ms <= before.heartbeat_ms:  # no new heartbeat since: nothing new to say
            return before
        base_ms, base_cloud, base_legacy = before.heartbeat_ms, before.to_cloud, before.to_legacy
    else:
        base_ms, base_cloud, base_legacy = w["started_ms"], 0, 0
    dt_ms = heartbeat_ms - base_ms
    return _WorkerCounts(w["started_ms"], heartbeat_ms, to_cloud, to_legacy,
                         _rate(to_cloud, base_cloud, dt_ms),
                         _rate(to_legacy, base_legacy, dt_ms))


def _sum_rates(rates: list[float | None], any_live: bool) -> float | None:
    known = [r for r in rates if r is not None]
    if not any_live:
        return 0.0  # no live worker: nothing is being mirrored
    return round(sum(known), 3) if known else None


class StatusHistory:
    """A bounded ring of ``Sample``: the oldest drops out once *capacity* is reached."""

    def __init__(self, capacity: int = round(DEFAULT_WINDOW_S / DEFAULT_INTERVAL_S)) -> None:
        if capacity < 2:
            raise ValueError("a history needs room for at least two samples")
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._workers: dict[str, _WorkerCounts] = {}

    @classmethod
    def for_window(cls, window_s: float, interval_s: float) -> StatusHistory:
        """Room for *window_s* of samples taken every *interval_s* (at most MAX_SAMPLES)."""
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("window and interval must be positive")
        return cls(min(MAX_SAMPLES, max(2, math.ceil(window_s / interval_s))))

    @property
    def capacity(self) -> int:
        return self._samples.maxlen or 0

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def add(self, snapshot: dict[str, Any]) -> Sample:
        """Append the sample of one ``status.gather`` snapshot and return it."""
        now_ms = snapshot["now_ms"]
        counts = {w["worker_id"]: _worker_counts(w, now_ms, self._workers.get(w["worker_id"]))
                  for w in snapshot["workers"]}
        self._workers = counts  # a worker row that is gone is forgotten
        live = [counts[w["worker_id"]] for w in snapshot["workers"] if w["live"]]
        lag = snapshot["mirror_lag_ms"]
        sample = Sample(
            t_ms=now_ms, lag_to_cloud_ms=lag["to_cloud"], lag_to_legacy_ms=lag["to_legacy"],
            mirrored_to_cloud=sum(w["mirrored_to_cloud"] for w in snapshot["workers"]),
            mirrored_to_legacy=sum(w["mirrored_to_legacy"] for w in snapshot["workers"]),
            rate_to_cloud=_sum_rates([c.rate_to_cloud for c in live], bool(live)),
            rate_to_legacy=_sum_rates([c.rate_to_legacy for c in live], bool(live)),
            outbox_pending=snapshot["outbox_to_legacy"]["pending"],
            open_findings=sum(snapshot["open_findings"].values()),
            notifications=dict(snapshot["notifications"]))
        self._samples.append(sample)
        return sample


# ---------------------------------------------------------------- sampler

class StatusSampler(PollingLoop):
    """Takes a ``status.gather`` snapshot every *interval_s* into *history*; keeps the latest.

    A failed sample is logged (an unreachable store once per outage), counted in
    ``bridge_status_sample_failures_total`` and remembered as ``last_error`` (the exception's
    type only: its text may name hosts); the latest good snapshot stays on the page.
    """

    description = "status sampler"
    failure_counter = SAMPLE_FAILURES

    def __init__(self, clock: IReactorTime, db: TransactionRunner,
                 history: StatusHistory | None = None, *,
                 interval_s: float = DEFAULT_INTERVAL_S,
                 gather: Callable[..., dict[str, Any]] = status.gather) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        super().__init__(clock, interval_s, "status-sampler")
        self._db = db
        self._gather = gather
        self.interval_s = interval_s
        self.history = history if history is not None else StatusHistory.for_window(
            DEFAULT_WINDOW_S, interval_s)
        #: the newest good snapshot (None before the first), and when it was taken
        self.latest: dict[str, Any] | None = None
        self.latest_ms: int | None = None
        #: why the newest sample failed (None once one succeeds again), and when
        self.last_error: str | None = None
        self.last_error_ms: int | None = None

    def now_ms(self) -> int:
        return self._now_ms()

    async def _tick(self) -> bool:
        now_ms = self._now_ms()
        try:
            snapshot = await self._db.run("status_page_gather", self._gather, now_ms)
        except DatabaseUnavailable as e:
            self._failed(e, now_ms)
            self._database_down(e)
            return False
        except Exception as e:
            self._failed(e, now_ms)
            raise  # the loop logs it with its traceback and counts it
        self._database_up()
        self.history.add(snapshot)
        self.latest, self.latest_ms = snapshot, now_ms
        self.last_error = self.last_error_ms = None
        return False

    def _failed(self, error: Exception, now_ms: int) -> None:
        self.last_error, self.last_error_ms = type(error).__name__, now_ms


# ---------------------------------------------------------------- the page

class StatusPage:
    """Renders ``/status`` and ``/status.json`` from a sampler's latest snapshot and history."""

    def __init__(self, sampler: StatusSampler, *, refresh_s: float = DEFAULT_INTERVAL_S) -> None:
        self._sampler = sampler
        self._refresh_ms = max(1000, round(refresh_s * 1000))

    def payload(self) -> dict[str, Any]:
        """What ``/status.json`` answers and the page embeds."""
        s = self._sampler
        now_ms = s.now_ms()
        return {
            "status": s.latest,
            "history": [sample.to_json() for sample in s.history.samples()],
            "sampled_age_ms": None if s.latest_ms is None else now_ms - s.latest_ms,
            "sample_error": None if s.last_error is None else {
                "type": s.last_error, "age_ms": now_ms - (s.last_error_ms or now_ms)},
            "interval_ms": round(s.interval_s * 1000),
            "refresh_ms": self._refresh_ms,
        }

    def render_html(self, request: server.Request) -> bytes:
        data = json.dumps(self.payload(), sort_keys=True)
        # JSON inside <script>: no "</script>" or "<!--" can end it early
        data = data.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
        body = _PAGE.replace("@DATA@", data).encode()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", _CSP.encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return body


def _asset(name: str) -> str:
    """A file shipped beside this module (package data), inlined into the page."""
    return resources.files("bridge.ops").joinpath(name).read_text(encoding="utf-8")


# The page's style and script live beside this module as plain .css and .js files, so they
# can be read and linted as what they are; the page inlines them (no request fetches them).
_STYLE = _asset("statuspage.css")
_SCRIPT = _asset("statuspage.js")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own inline script and style run (by hash); it fetches only its own origin.
_CSP = (f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")

_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bridge status</title>
<style>{_STYLE}</style>
</head>
<body>
<header><h1>Bridge status</h1><span class="meta" id="age"></span>
<span class="meta" id="taken"></span><span class="meta" id="refresh"></span></header>
<main id="app"><noscript><p class="banner">This page draws its figures with JavaScript;
/status.json has the same data.</p></noscript></main>
<footer>Same figures as <code>bridgectl status --json</code>; raw data at
<a href="/status.json">/status.json</a>, metrics at <a href="/metrics">/metrics</a>.</footer>
<script type="application/json" id="status-data">@DATA@</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
