"""Reconcile output: the textfile and Pushgateway metrics, the summary, the progress line."""

from __future__ import annotations

import io
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from drills.ports import free_port
from reconcilers import report as out
from reconcilers.runner import EXIT_DIFFERENCES, EXIT_ERROR, EXIT_IN_SYNC, Report


def finished(kind: str, **fields) -> Report:
    return Report(kind=kind, completed=True, **{"compared": 10, "duration_s": 1.5, **fields})


def samples(path) -> dict[tuple[str, str], float]:
    with open(path, encoding="utf-8") as f:
        return {(s.name, s.labels["kind"]): s.value
                for family in text_string_to_metric_families(f.read())
                for s in family.samples}


def test_textfile_holds_every_metric_per_kind(tmp_path):
    """A clean and a repaired run: all seven series per kind, success time = now."""
    path = tmp_path / "reconcile.prom"
    reports = [finished("gaps", bytes_from_legacy=5),
               finished("notifications", suspects=3, confirmed=2, repaired=2)]
    out.write_textfile(path, reports, now=1000.0)
    got = samples(path)
    assert got[("bridge_reconcile_last_success_timestamp_seconds", "gaps")] == 1000.0
    assert got[("bridge_reconcile_last_success_timestamp_seconds", "notifications")] == 1000.0
    assert got[("bridge_reconcile_found", "notifications")] == 2
    assert got[("bridge_reconcile_repaired", "notifications")] == 2
    assert got[("bridge_reconcile_compared", "gaps")] == 10
    assert got[("bridge_reconcile_duration_seconds", "gaps")] == 1.5
    assert got[("bridge_reconcile_exit_code", "gaps")] == EXIT_IN_SYNC
    assert {name for name, _ in got} == set(out.METRIC_NAMES)
    # no temporary file left behind; the lock file serialises writers sharing the file
    assert sorted(os.listdir(tmp_path)) == ["reconcile.prom", "reconcile.prom.lock"]


def test_textfile_is_replaced_atomically_not_rewritten_in_place(tmp_path):
    """A reader of the old file keeps a complete old file: the new one is renamed over it."""
    path = tmp_path / "reconcile.prom"
    out.write_textfile(path, [finished("gaps")], now=1000.0)
    with open(path, encoding="utf-8") as old:
        inode = os.stat(path).st_ino
        out.write_textfile(path, [finished("gaps", compared=99)], now=2000.0)
        assert "bridge_reconcile_compared{kind=\"gaps\"} 10.0" in old.read()
    assert os.stat(path).st_ino != inode
    assert samples(path)[("bridge_reconcile_compared", "gaps")] == 99


def test_a_failed_run_keeps_the_last_success_time_and_other_kinds_keep_their_series(tmp_path):
    """An error or unrepaired run updates its numbers but not its last success time."""
    path = tmp_path / "reconcile.prom"
    out.write_textfile(path, [finished("gaps"), finished("presence")], now=1000.0)
    out.write_textfile(path, [Report(kind="gaps", error="boom")], now=2000.0)
    out.write_textfile(path, [finished("presence", confirmed=2, repaired=1)], now=3000.0)
    got = samples(path)
    assert got[("bridge_reconcile_last_success_timestamp_seconds", "gaps")] == 1000.0
    assert got[("bridge_reconcile_exit_code", "gaps")] == EXIT_ERROR
    assert got[("bridge_reconcile_last_success_timestamp_seconds", "presence")] == 1000.0
    assert got[("bridge_reconcile_exit_code", "presence")] == EXIT_DIFFERENCES
    # a run that found the lock taken did nothing: the kind's series stay as they were
    before = samples(path)
    out.write_textfile(path, [Report(kind="gaps", locked=True)], now=3500.0)
    assert samples(path) == before
    # a kind that never succeeded has no success time at all (an alert sees it missing)
    out.write_textfile(path, [Report(kind="notifications", completed=True)], now=4000.0)
    assert ("bridge_reconcile_last_success_timestamp_seconds", "notifications") \
        not in samples(path)


def test_an_unwritable_textfile_is_a_clear_error(tmp_path):
    """A missing directory gives MetricsError naming the path, not an OSError traceback."""
    with pytest.raises(out.MetricsError, match="cannot write the metrics file .*nowhere"):
        out.write_textfile(tmp_path / "nowhere" / "x.prom", [finished("gaps")])


class Recorder(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.requests.append((self.command, self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_push_posts_one_group_per_kind_without_a_success_time_for_a_failed_run():
    """pushadd per kind: a failed run leaves the gateway's previous success time alone."""
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    Recorder.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out.push(url, [finished("gaps"), Report(kind="presence", error="boom")], now=1000.0)
    finally:
        server.shutdown()
        server.server_close()
    (m1, path1, body1), (m2, path2, body2) = Recorder.requests
    assert (m1, path1, m2, path2) == ("POST", "/metrics/job/bridge_reconcile/kind/gaps",
                                      "POST", "/metrics/job/bridge_reconcile/kind/presence")
    assert 'bridge_reconcile_last_success_timestamp_seconds{kind="gaps"} 1000.0' in body1
    assert "last_success" not in body2 and 'bridge_reconcile_exit_code{kind="presence"} 1.0' \
        in body2


def test_an_unreachable_pushgateway_is_a_clear_error():
    """Connection refused becomes MetricsError naming the gateway."""
    port = free_port()
    with pytest.raises(out.MetricsError, match=f"Pushgateway at http://127.0.0.1:{port}"):
        out.push(f"http://127.0.0.1:{port}", [finished("gaps")], timeout_s=2)


def test_render_text_says_what_happened():
    """The summary names the outcome, the counts, and dry or resumed runs."""
    assert out.render_text(finished("gaps")).startswith("gaps: in sync; compared 10,")
    assert "repaired" in out.render_text(finished("gaps", confirmed=1, repaired=1)).split(";")[0]
    assert "differences remain" in out.render_text(finished("gaps", confirmed=2, dry_run=True))
    assert out.render_text(finished("gaps", dry_run=True)).endswith("(dry run)")
    assert "compared nothing" in out.render_text(finished("gaps", compared=0))
    assert "interrupted" in out.render_text(Report(kind="gaps", compared=3, resumed=True))
    assert "lock" in out.render_text(Report(kind="gaps", locked=True))
    assert "error: boom" in out.render_text(Report(kind="gaps", error="boom"))


def test_progress_line_redraws_on_a_terminal_and_is_sparse_in_cron():
    """A TTY gets one \\r-redrawn line with a bar; a pipe at most a line per interval."""
    tty = io.StringIO()
    line = out.ProgressLine(tty, tty=True, width=10)
    line("gaps: 5/10 conversations")
    line("gaps: 10/10 conversations")
    line.done()
    assert tty.getvalue() == ("\r[#####.....]  50% gaps: 5/10 conversations"
                              "\r[##########] 100% gaps: 10/10 conversations\n")
    now = [0.0]
    pipe = io.StringIO()
    quiet = out.ProgressLine(pipe, tty=False, interval_s=10.0, clock=lambda: now[0])
    for t in (0.0, 3.0, 9.9, 10.0, 15.0, 21.0):
        now[0] = t
        quiet(f"at {t}")
    quiet.done()
    assert pipe.getvalue() == "at 0.0\nat 10.0\nat 21.0\n"
