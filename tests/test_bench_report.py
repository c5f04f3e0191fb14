"""``make bench``'s report logic (bench/run_all.py): targets judged from results.json, and the
table. No benchmark runs here; speed is measured by ``make bench``, never by a test."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import run_all  # noqa: E402


def s(median: float) -> dict:
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "runs": 3}


def results(ratio: float, p99: float, rss: float, seconds: float, moved: float) -> dict:
    """*ratio*: the drain once streaming over raw COPY; the whole run's is 0.1 lower."""
    point = {"workers": 1, "msgs_per_s": s(40_000 * (ratio - 0.1)),
             "copy_rows_per_s": s(40_000), "ratio_to_copy": ratio - 0.1,
             "first_rows_s": s(0.3), "steady_msgs_per_s": s(40_000 * ratio),
             "steady_ratio_to_copy": ratio, "half_load_rate": 10_000, "p99_lag_ms": s(p99),
             "peak_rss_mb": s(rss)}
    return {
        "bridge": {"workers": 1, "ratio_to_copy": ratio - 0.1, "steady_ratio_to_copy": ratio,
                   "p99_lag_ms": s(p99),
                   "peak_rss_mb": s(rss), "to_legacy_msgs_per_s": s(400),
                   "scaling": [point]},
        "reconcile": {"seconds_1m_100diff": s(seconds), "fraction_moved": s(moved),
                      "by_size": {"1000000": {"seconds": s(seconds),
                                              "fraction_moved": s(moved),
                                              "peak_rss_mb": 480}}},
    }


def test_targets_are_judged_against_the_issue_figures():
    verdicts = {t["path"]: t["met"] for t in run_all.judge(
        results(ratio=0.45, p99=80, rss=70, seconds=5.5, moved=0.007))}
    assert verdicts["bridge.steady_ratio_to_copy"] is False   # below 0.6
    assert verdicts["bridge.p99_lag_ms.median"] is True       # at most 100 ms
    assert verdicts["bridge.peak_rss_mb.max"] is True         # the worst run, 77 MB
    assert verdicts["reconcile.seconds_1m_100diff.median"] is True
    assert verdicts["reconcile.fraction_moved.median"] is True
    assert verdicts["cloud.write_path.mirror_ratio_to_copy"] is None  # section not run
    worse = {t["path"]: t["met"] for t in run_all.judge(
        results(ratio=0.7, p99=150, rss=250, seconds=12, moved=0.02))}
    assert worse["bridge.steady_ratio_to_copy"] is True
    assert worse["bridge.p99_lag_ms.median"] is False
    assert worse["bridge.peak_rss_mb.max"] is False           # max 275 MB > 256
    assert worse["reconcile.seconds_1m_100diff.median"] is False
    assert worse["reconcile.fraction_moved.median"] is False


def test_the_markdown_table_shows_figures_ceilings_and_verdicts():
    r = results(ratio=0.45, p99=80, rss=70, seconds=5.5, moved=0.007)
    r["targets"] = run_all.judge(r)
    table = run_all.render(r, markdown=True).splitlines()
    assert table[0].startswith("| figure | median | min–max | ceiling (same run)")
    drain = next(i for i, line in enumerate(table) if "bridge legacy -> cloud, 1 worker" in line)
    # the whole run, its start included, is shown; the target judges it once streaming
    assert "raw COPY 40,000" in table[drain] and "0.35" in table[drain]
    assert "NOT met" not in table[drain]
    steady = table[drain + 1]
    assert "once streaming" in steady and "0.30 s after the start" in steady
    assert "18,000" in steady and "0.45" in steady and ">= 0.6: NOT met" in steady
    moved = next(line for line in table if "fraction of the history moved" in line)
    assert "0.70%" in moved and "<= 0.01: met" in moved


def test_the_lag_quantile_is_read_from_the_histogram_between_two_scrapes():
    """What was observed before the first scrape does not count; inside a bucket the
    quantile is linear, as in Prometheus' histogram_quantile; past the last finite bound it
    is that bound."""
    import bench_bridge

    inf = float("inf")
    before = {0.05: 100.0, 0.1: 100.0, 0.25: 100.0, inf: 100.0}
    # 200 observations between the scrapes: 100 under 50 ms, 98 in (50, 100], 2 in (100, 250]
    after = {0.05: 200.0, 0.1: 298.0, 0.25: 300.0, inf: 300.0}
    assert bench_bridge.histogram_quantile(0.5, before, after) == 50.0
    assert abs(bench_bridge.histogram_quantile(0.99, before, after) - 100.0) < 1e-9
    assert abs(bench_bridge.histogram_quantile(0.995, before, after) - 175.0) < 1e-9
    beyond = {0.05: 0.0, 0.1: 0.0, 0.25: 0.0, inf: 10.0}
    assert bench_bridge.histogram_quantile(0.99, {}, beyond) == 250.0


def test_the_half_load_cycle_is_read_from_the_worker_series_between_two_scrapes():
    """The cloud -> legacy cycle's breakdown counts only what happened between the scrapes,
    from the lines of a real exposition (other series and directions left out)."""
    import bench_bridge

    def scrape(claims: int, claim_s: float, records: int, record_s: float, passes: int,
               rows: int, pass_s: float) -> dict[str, float]:
        text = "\n".join([
            "# HELP cloud_db_transaction_seconds Time to run one transaction",
            f'cloud_db_transaction_seconds_count{{desc="claim_outbox"}} {claims}.0',
            f'cloud_db_transaction_seconds_sum{{desc="claim_outbox"}} {claim_s}',
            f'cloud_db_transaction_seconds_count{{desc="complete_outbox_batch"}} {records}.0',
            f'cloud_db_transaction_seconds_sum{{desc="complete_outbox_batch"}} {record_s}',
            'cloud_db_transaction_seconds_count{desc="commit_plan"} 999.0',
            f'bridge_batch_size_messages_count{{direction="to_legacy"}} {passes}.0',
            f'bridge_batch_size_messages_sum{{direction="to_legacy"}} {rows}.0',
            f'bridge_batch_duration_seconds_count{{direction="to_legacy"}} {passes}.0',
            f'bridge_batch_duration_seconds_sum{{direction="to_legacy"}} {pass_s}',
            'bridge_batch_size_messages_count{direction="to_cloud"} 77.0'])
        return {series: float(value)
                for series, value in bench_bridge._CYCLE_SERIES.findall(text)}

    before = scrape(10, 1.0, 9, 0.5, 9, 900, 0.9)
    after = scrape(30, 1.6, 29, 1.1, 29, 10_900, 2.9)
    assert len(after) == 8  # the other series and directions are not read
    assert bench_bridge.pass_breakdown(before, after, 4.0) == {
        "claims_per_s": 5.0, "rows_per_pass": 500.0, "claim_ms": 30.0, "pass_ms": 100.0,
        "record_ms": 30.0}
    assert bench_bridge.pass_breakdown(after, after, 4.0)["pass_ms"] is None


def test_the_cloud_to_legacy_figures_are_judged_and_shown_per_worker_count():
    """The issue's cloud -> legacy targets: the ratio to the drain of the same run (>= 0.5),
    the p99 lag at half load (<= 100 ms) and the worst peak RSS (<= 256 MB); the table has a
    row per worker count."""
    r = results(ratio=0.65, p99=80, rss=70, seconds=5.5, moved=0.007)
    curve = [{"fraction": f, "rate": 5_000 * f, "posted_per_s": s(5_000 * f),
              "busy": s(f), "p50_ms": s(10), "p99_ms": s(p99), "store_cpu_us_per_post": s(70)}
             for f, p99 in ((0.125, 21), (0.25, 34), (0.5, 50))]
    raw = {"posted_per_s": s(2_400), "busy": s(0.45), "p50_ms": s(9), "p99_ms": s(47),
           "store_cpu_us_per_post": s(55)}
    point = {"workers": 1, "outbox_rows": 50_000, "msgs_per_s": s(5_000),
             "half_load_rate": 2_500, "p99_lag_ms": s(50), "peak_rss_mb": s(62),
             "lag_curve": curve, "raw_posts": raw}
    r["bridge"].update({"to_legacy_msgs_per_s": s(5_000), "to_legacy_ratio_to_drain": 0.25,
                        "to_legacy_p99_lag_ms": s(50), "to_legacy_peak_rss_mb": s(300),
                        "to_legacy_scaling": [point, {**point, "workers": 2}]})
    r["targets"] = run_all.judge(r)
    verdicts = {t["path"]: t["met"] for t in r["targets"]}
    assert verdicts["bridge.to_legacy_ratio_to_drain"] is False       # 0.25 < 0.5
    assert verdicts["bridge.to_legacy_p99_lag_ms.median"] is True     # 50 ms
    assert verdicts["bridge.to_legacy_peak_rss_mb.max"] is False      # max 330 MB
    table = run_all.render(r, markdown=True).splitlines()
    rows = [line for line in table if "cloud -> legacy, 50,000-row outbox" in line]
    assert len(rows) == 2 and "0.250" in rows[0] and ">= 0.5: NOT met" in rows[0]
    # the lower loads of the lag curve each get a row (the half load has its own, above)
    curve_rows = [line for line in table if "p99 lag at 0.125 of the drain" in line]
    assert len(curve_rows) == 2 and "625/s posted, 12% of the cores busy" in curve_rows[0]
    assert curve_rows[0].split("|")[2].strip() == "21"
    assert not [line for line in table if "p99 lag at 0.5 of the drain" in line]
    # the half load's busy share is its curve point's
    busy_rows = [line for line in table if "cores busy meanwhile" in line]
    assert len(busy_rows) == 2 and busy_rows[0].split("|")[2].strip() == "0.500"
    # the same half load of raw posts (only their rows): the lag's floor, as the half load's
    # ceiling column and a row of its own, with PostgreSQL's CPU per post for both
    half = next(line for line in table
                if "cloud -> legacy p99 lag at half load (" in line).split("|")
    assert half[2].strip() == "50" and half[4].strip() == "raw posts 47"
    raw_rows = [line for line in table if "p99 lag at half load of raw posts" in line]
    assert len(raw_rows) == 2 and "2,400/s posted, 45% of the cores busy" in raw_rows[0]
    assert raw_rows[0].split("|")[2].strip() == "47"
    cpu = [line.split("|")[2].strip() for line in table if "CPU per" in line and "post" in line]
    assert cpu[:2] == ["70", "55"]


def test_the_big_simulation_is_judged_by_its_steady_state_and_shows_its_setup():
    """The 1,000-supernode simulation is judged by steady-state simulated s per wall s
    (>= 1.0); the table also shows its setup time apart."""
    r = results(ratio=0.65, p99=80, rss=70, seconds=5.5, moved=0.007)
    legacy = {"sim_medium": {"frames_per_s": s(30_000), "events_per_s": s(9_000),
                             "sim_seconds_per_wall_second": s(2.0)},
              "sim_1000sn_100k_users": {"sim_seconds_per_wall_second": s(0.8),
                                        "steady_frames_per_s": s(90_000),
                                        "setup_wall_seconds": s(300)},
              "tcp_decode": {"supernode_frames_per_s": s(400_000),
                             "bare_twisted_frames_per_s": s(2_000_000), "ratio_to_bare": 0.2}}
    r["legacy"] = legacy
    r["targets"] = run_all.judge(r)
    path = "legacy.sim_1000sn_100k_users.sim_seconds_per_wall_second.median"
    assert {t["path"]: t["met"] for t in r["targets"]}[path] is False  # 0.8 < 1.0
    table = run_all.render(r, markdown=True).splitlines()
    steady = next(line for line in table if "steady state: simulated s per wall s" in line)
    assert "0.80" in steady and ">= 1.0: NOT met" in steady
    assert any("setup wall s" in line and "300" in line for line in table)
    legacy["sim_1000sn_100k_users"]["sim_seconds_per_wall_second"] = s(1.3)
    r["targets"] = run_all.judge(r)
    assert {t["path"]: t["met"] for t in r["targets"]}[path] is True


def test_the_simulation_census_counts_only_the_run_per_simulated_day():
    """bench_sim's transaction census: what ran before the run is left out, figures are
    per simulated day, the descriptions come by time spent, at most CENSUS_TOP of them."""
    import bench_sim

    before = {"commit_plan": (10.0, 1.0), "claim_outbox": (5.0, 0.5)}
    after = {"commit_plan": (410.0, 9.0), "claim_outbox": (5.0, 0.5),
             "heartbeat_worker": (100.0, 2.0)}
    got = bench_sim.census(before, after, 2.0)
    assert got["transactions_per_day"] == 250 and got["transaction_s_per_day"] == 5.0
    assert got["top"] == [
        {"desc": "commit_plan", "per_day": 200, "s_per_day": 4.0, "mean_ms": 20.0},
        {"desc": "heartbeat_worker", "per_day": 50, "s_per_day": 1.0, "mean_ms": 20.0}]
    many = {f"t{i}": (1.0, float(i)) for i in range(bench_sim.CENSUS_TOP + 5)}
    top = bench_sim.census({}, many, 1.0)["top"]
    assert len(top) == bench_sim.CENSUS_TOP and top[0]["desc"] == f"t{bench_sim.CENSUS_TOP + 4}"


def test_the_simulation_checks_say_how_the_gaps_runs_after_day_31_went():
    """bench_sim's checks of a long run: the gaps runs after day 31 (only those), clean and
    unclean outside a fault window; none for a run of 31 days or less."""
    import bench_sim

    def run(day: float, kind: str, clean: bool, faults: bool) -> dict:
        return {"day": day, "kind": kind, "exit_code": 0 if clean else 1, "clean": clean,
                "during_faults": faults}
    report = {"simulated_days": 45.0, "lost": 0, "duplicates": 1, "notifications_owed": 9,
              "notifications_acked": 8,
              "notifications_failed": 1, "reconcile_runs": [
                  run(30.5, "gaps", False, False), run(31.25, "gaps", True, False),
                  run(31.25, "notifications", False, False), run(32.0, "gaps", False, True),
                  run(33.0, "gaps", False, False)]}
    got = bench_sim.checks(report)
    assert got["gaps_after_day_31"] == {"runs": 3, "clean": 1, "unclean_outside_faults": 1}
    assert (got["lost"], got["duplicates"], got["notifications_failed"]) == (0, 1, 1)
    report["reconcile_runs"] = report["reconcile_runs"][:1]  # none after day 31: it shows
    assert bench_sim.checks(report)["gaps_after_day_31"] == {
        "runs": 0, "clean": 0, "unclean_outside_faults": 0}
    report["simulated_days"] = 31.0
    assert bench_sim.checks(report)["gaps_after_day_31"] is None
