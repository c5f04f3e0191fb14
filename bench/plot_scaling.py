"""The scaling plot of ``make bench``: ``bench/scaling.png`` from ``bench/results.json``.

Six panels, each point a median with its min–max range as error bars, targets dotted.
Top, against bridge workers: legacy -> cloud msgs/s (with the raw COPY ceiling of the same
runs), p99 mirror lag at half load, peak RSS. Bottom, against messages in the history: gaps
reconcile seconds, the fraction of the history it moved, and memory.

Usage: python bench/plot_scaling.py [bench/results.json] [bench/scaling.png]
(needs matplotlib: pip install -e '.[bench]')
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _series(points: list[tuple[float, dict]]) -> tuple[list, list, list]:
    """x values, medians, and [below, above] error bar lengths from min–max summaries."""
    xs = [x for x, _ in points]
    medians = [s["median"] for _, s in points]
    below = [s["median"] - s["min"] for _, s in points]
    above = [s["max"] - s["median"] for _, s in points]
    return xs, medians, [below, above]


def plot(results: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    (ax_tp, ax_lag, ax_rss), (ax_rec, ax_moved, ax_mem) = axes
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    busy = (f"; other processes used {100 * machine['other_share_of_machine']:.0f}% of the "
            "machine" if machine else "")
    fig.suptitle(f"make bench, {meta.get('started', '?')}, {meta.get('cores', '?')} cores, "
                 f"{meta.get('repeat', '?')} run(s) per point"
                 f"{' (--quick)' if meta.get('quick') else ''}{busy}; median, bars: min–max"
                 + "".join(f"\n{name} from the run of {m.get('started')}"
                           for name, m in meta.get("merged", {}).items()),
                 fontsize=9)

    scaling = results.get("bridge", {}).get("scaling", [])
    if scaling:
        workers = [p["workers"] for p in scaling]
        xs, ys, err = _series([(p["workers"], p["msgs_per_s"]) for p in scaling])
        ax_tp.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="bridge legacy → cloud")
        xs, ys, err = _series([(p["workers"], p["copy_rows_per_s"]) for p in scaling])
        ax_tp.errorbar(xs, ys, yerr=err, marker="s", capsize=4, linestyle="--",
                       label="raw COPY, same runs (ceiling)")
        ax_tp.plot(xs, [0.6 * y for y in ys], linestyle=":", color="grey",
                   label="target: 0.6 × raw COPY")
        ax_tp.set_ylabel("messages (rows) per second")
        ax_tp.set_ylim(bottom=0)
        ax_tp.set_title("bridge: legacy → cloud, draining a backlog", fontsize=10)

        xs, ys, err = _series([(p["workers"], p["p99_lag_ms"]) for p in scaling])
        ax_lag.errorbar(xs, ys, yerr=err, marker="o", capsize=4,
                        label="p99, the workers' heartbeats")
        if all("db_p99_lag_ms" in p for p in scaling):
            xs, ys, err = _series([(p["workers"], p["db_p99_lag_ms"]) for p in scaling])
            ax_lag.errorbar(xs, ys, yerr=err, marker="^", capsize=4, linestyle="--",
                            label="p99 from the rows, after warm-up")
        ax_lag.axhline(100, linestyle=":", color="grey", label="target: 100 ms")
        ax_lag.set_yscale("log")
        ax_lag.set_ylabel("ms")
        ax_lag.set_title("bridge: mirror lag at half of each drain speed", fontsize=10)

        xs, ys, err = _series([(p["workers"], p["peak_rss_mb"]) for p in scaling])
        ax_rss.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="per worker (worst)")
        if all("peak_rss_total_mb" in p for p in scaling):
            xs, ys, err = _series([(p["workers"], p["peak_rss_total_mb"]) for p in scaling])
            ax_rss.errorbar(xs, ys, yerr=err, marker="s", capsize=4, linestyle="--",
                            label="all workers together")
        ax_rss.axhline(256, linestyle=":", color="grey", label="target: 256 MB per bridge")
        ax_rss.set_ylabel("MB")
        ax_rss.set_ylim(bottom=0)
        ax_rss.set_title("bridge: peak RSS during the drain", fontsize=10)
        for ax in (ax_tp, ax_lag, ax_rss):
            ax.set_xlabel("bridge workers (4 supernode feeds)")
            ax.set_xticks(workers)
            ax.legend(fontsize=8)

    sizes = results.get("reconcile", {}).get("by_size", {})
    if sizes:
        ordered = sorted(sizes.values(), key=lambda s: s["messages"])
        ns = [s["messages"] for s in ordered]
        xs, ys, err = _series([(s["messages"], s["seconds"]) for s in ordered])
        ax_rec.errorbar(xs, ys, yerr=err, marker="o", capsize=4,
                        label="pass with 100 differences")
        ax_rec.plot(ns, [s["in_sync_pass_seconds"] for s in ordered], marker="x",
                    linestyle="--", label="pass over stacks in sync (1 run)")
        ax_rec.plot([1_000_000], [10], marker="*", markersize=12, linestyle="none",
                    color="grey", label="target: 10 s at 10^6")
        ax_rec.set_yscale("log")
        ax_rec.set_ylabel("wall seconds")
        ax_rec.set_title("gaps reconcile: one pass", fontsize=10)

        xs, ys, err = _series([(s["messages"], {k: 100 * v for k, v in s["fraction_moved"].items()
                                                 if k != "runs"}) for s in ordered])
        ax_moved.errorbar(xs, ys, yerr=err, marker="o", capsize=4,
                          label="GUIDs listed + messages fetched + injected")
        ax_moved.plot([1_000_000], [1], marker="*", markersize=12, linestyle="none",
                      color="grey", label="target: 1% at 10^6")
        ax_moved.set_yscale("log")
        ax_moved.set_ylabel("% of the history")
        ax_moved.set_title("gaps reconcile: what travels (100 differences)", fontsize=10)

        ax_mem.plot(ns, [s["peak_rss_mb"] for s in ordered], marker="o",
                    label="peak RSS of the bench process\n(the in-memory legacy network "
                          "holds the history)")
        extra = [(s["messages"], s["pass_extra_mb"]) for s in ordered if s.get("pass_extra_mb")]
        if extra:
            xs, ys, err = _series(extra)
            ax_mem.errorbar(xs, ys, yerr=err, marker="^", capsize=4, linestyle="--",
                            label="RSS added by a reconcile pass (a lower bound:\n"
                                  "freed memory is reused first)")
        ax_mem.set_ylabel("MB")
        ax_mem.set_ylim(bottom=0)
        ax_mem.set_title("gaps reconcile: memory", fontsize=10)
        for ax in (ax_rec, ax_moved, ax_mem):
            ax.set_xscale("log")
            ax.set_xlabel("messages in the history")
            ax.set_xticks(ns)
            ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results.json")
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "scaling.png")
    with open(src) as f:
        print(plot(json.load(f), dst))


if __name__ == "__main__":
    main()
