// The status page's script (bridge/ops/statuspage.py inlines it; the CSP allows it by hash).
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const PHASES = ["legacy", "dual", "cloud", "cloud-only"];
  const NOTIFICATION_STATES = ["pending", "sent", "acked", "failed"];
  const FINDING_STATES = ["open", "repaired", "failed", "unrecoverable", "dismissed"];
  const page = { refreshes: 0, failedRefreshes: 0, fetchedAt: Date.now(), data: null };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  // One figure: data-field names it as a path into the status JSON, data-value is the raw
  // value (JSON), the text is what an operator reads.
  function field(name, raw, text, cls) {
    const attrs = { "data-field": name, "data-value": JSON.stringify(raw === undefined ? null : raw) };
    if (cls) attrs.class = cls;
    return el("span", attrs, text === undefined ? (raw === null || raw === undefined ? "-" : raw) : text);
  }
  function fmtMs(v) {
    if (v === null || v === undefined) return "-";
    const a = Math.abs(v);
    if (a < 10000) return v + " ms";
    const s = v / 1000;
    if (Math.abs(s) < 120) return s.toFixed(0) + " s";
    if (Math.abs(s) < 7200) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtRate(v) {
    if (v === null || v === undefined) return "-";
    return (v < 10 ? v.toFixed(2) : v.toFixed(1)) + "/s";
  }
  function fmtCount(v) { return v === null || v === undefined ? "-" : String(v); }
  function kv(label, value) { return el("div", { class: "kv" }, el("span", { class: "k" }, label), value); }
  function card(title, ...children) { return el("section", { class: "card" }, el("h2", {}, title), ...children); }
  function table(headers, rows, numeric) {
    const head = el("tr", {}, ...headers.map((h, i) => el("th", numeric[i] ? { class: "n" } : {}, h)));
    const body = rows.map(cells => el("tr", {}, ...cells.map((c, i) => el("td", numeric[i] ? { class: "n" } : {}, c))));
    return el("div", { class: "wide" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
  }
  function niceCeil(x) {
    if (!(x > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
    return 10 * p;
  }

  // A line chart of the history as inline SVG: one <polyline> per unbroken run of values
  // (null breaks the line), a dot for a lone value.
  function chart(key, title, series, samples, fmt) {
    const W = 420, H = 170, L = 58, R = 10, T = 12, B = 24;
    const tEnd = samples.length ? samples[samples.length - 1].t_ms : 0;
    const span = Math.max(60000, samples.length ? tEnd - samples[0].t_ms : 0);
    const tStart = tEnd - span;
    let max = 0;
    for (const s of series) for (const x of samples) if (x[s.key] !== null) max = Math.max(max, x[s.key]);
    const top = niceCeil(max);
    const X = t => (L + (t - tStart) / span * (W - L - R)).toFixed(1);
    const Y = v => (T + (1 - v / top) * (H - T - B)).toFixed(1);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title,
                              "data-chart": key, "data-rendered": "js", "data-samples": samples.length });
    for (const v of [0, top / 2, top]) {
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
      root.append(svg("text", { class: "axis", x: L - 6, y: Number(Y(v)) + 4, "text-anchor": "end" }, fmt(v)));
    }
    const minutes = span / 60000;
    root.append(svg("text", { class: "axis", x: L, y: H - 6 },
                    minutes >= 2 ? `-${minutes.toFixed(0)} min` : `-${(span / 1000).toFixed(0)} s`));
    root.append(svg("text", { class: "axis", x: W - R, y: H - 6, "text-anchor": "end" }, "now"));
    const legend = el("div", { class: "legend" });
    for (const s of series) {
      let run = [];
      const flush = () => {
        if (run.length >= 2) {
          root.append(svg("polyline", { class: s.cls, "data-series": s.key, "data-rendered": "js",
                                        points: run.map(p => p.join(",")).join(" ") }));
        } else if (run.length === 1) {
          root.append(svg("circle", { class: s.cls, "data-series": s.key, r: 2.5, cx: run[0][0], cy: run[0][1] }));
        }
        run = [];
      };
      for (const x of samples) {
        if (x[s.key] === null || x[s.key] === undefined) flush();
        else run.push([X(x.t_ms), Y(x[s.key])]);
      }
      flush();
      const last = samples.length ? samples[samples.length - 1][s.key] : null;
      const sw = svg("svg", { class: "swatch", width: 14, height: 4, viewBox: "0 0 14 4" });
      sw.append(svg("rect", { class: s.cls, width: 14, height: 4 }));
      legend.append(el("span", {}, sw, s.label + " ", el("b", {}, fmt(last))));
    }
    return el("section", { class: "card chart" }, el("h2", {}, title), root, legend);
  }

  function phaseBar(perPhase, total) {
    const bar = svg("svg", { class: "phasebar", viewBox: "0 0 100 4", preserveAspectRatio: "none" });
    if (!total) { bar.append(svg("rect", { class: "ph-empty", width: 100, height: 4 })); return bar; }
    let x = 0;
    for (const p of PHASES) {
      const w = 100 * (perPhase[p] || 0) / total;
      if (w > 0) bar.append(svg("rect", { class: "ph-" + p, x: x, width: w, height: 4 }));
      x += w;
    }
    return bar;
  }

  function tiles(st, last) {
    const acc = st.accounts;
    const phases = PHASES.map(p => {
      const sw = svg("svg", { class: "swatch", width: 10, height: 10, viewBox: "0 0 10 10" });
      sw.append(svg("rect", { class: "ph-" + p, width: 10, height: 10 }));
      return kv(el("span", {}, sw, p), field("accounts.per_phase." + p, acc.per_phase[p] || 0));
    });
    const lag = st.mirror_lag_ms;
    const box = st.outbox_to_legacy;
    const openTotal = Object.values(st.open_findings).reduce((a, b) => a + b, 0);
    const repairedTotal = Object.values(st.findings || {}).reduce((a, f) => a + f.repaired, 0);
    const openKinds = Object.keys(st.open_findings).sort().map(k =>
      kv(k, field("open_findings." + k, st.open_findings[k], undefined, "bad")));
    const n = st.notifications;
    const clean = st.last_clean_reconcile;
    return el("div", { class: "tiles" },
      card("Accounts", el("div", { class: "big" }, field("accounts.total", acc.total)),
           phaseBar(acc.per_phase, acc.total), ...phases),
      card("Mirror lag (p99, worst live worker)",
           kv("to cloud", field("mirror_lag_ms.to_cloud", lag.to_cloud, fmtMs(lag.to_cloud))),
           kv("to legacy", field("mirror_lag_ms.to_legacy", lag.to_legacy, fmtMs(lag.to_legacy))),
           ...["to_cloud", "to_legacy"].map(d => {
             const s = (st.lag_outside_faults || {})[d] || {};
             const note = s.samples ? " (" + s.met_faults + " of " + s.samples + " met a fault)" : "";
             return kv(d.replace("_", " ") + ", outside faults",
                       field("lag_outside_faults." + d + ".p99_ms", s.p99_ms, fmtMs(s.p99_ms) + note));
           })),
      card("Throughput",
           kv("to cloud", field("rate.to_cloud", last ? last.rate_to_cloud : null, fmtRate(last && last.rate_to_cloud))),
           kv("to legacy", field("rate.to_legacy", last ? last.rate_to_legacy : null, fmtRate(last && last.rate_to_legacy))),
           kv("mirrored", el("span", { class: "muted" },
              `${last ? last.mirrored_to_cloud : "-"} / ${last ? last.mirrored_to_legacy : "-"}`))),
      card("Outbox to legacy",
           el("div", { class: "big" }, field("outbox_to_legacy.pending", box.pending, undefined, box.pending ? "warn" : "")),
           kv("oldest", field("outbox_to_legacy.oldest_age_ms", box.oldest_age_ms, fmtMs(box.oldest_age_ms)))),
      card("Findings",
           kv("open", field("open_findings.total", openTotal, undefined, openTotal ? "bad" : "good")),
           kv("repaired", field("findings.repaired.total", repairedTotal)), ...openKinds),
      card("Notifications", ...NOTIFICATION_STATES.map(s =>
           kv(s, field("notifications." + s, n[s] || 0, undefined, s === "failed" && n[s] ? "bad" : "")))),
      card("Workers",
           el("div", { class: "big" }, field("live_workers", st.live_workers, undefined, st.live_workers ? "good" : "bad"),
              el("span", { class: "muted" }, " live of "), field("workers.count", st.workers.length)),
           kv("leases", field("leases.count", st.leases.length))),
      card("Last clean reconcile", clean === null
           ? field("last_clean_reconcile.run_id", null, "none yet", "warn")
           : el("div", {}, kv(clean.kind + " run", field("last_clean_reconcile.run_id", clean.run_id)),
                kv("finished", el("span", {}, fmtMs(clean.age_ms) + " ago")))));
  }

  function tablesOf(st) {
    const kinds = Object.keys(st.findings || {}).sort();
    const findings = kinds.length ? table(["kind", ...FINDING_STATES],
      kinds.map(k => [k, ...FINDING_STATES.map(s =>
        field(`findings.${k}.${s}`, st.findings[k][s], undefined, s === "open" && st.findings[k][s] ? "bad" : ""))]),
      [false, true, true, true, true]) : el("p", { class: "muted" }, "no findings");
    const workers = st.workers.length ? table(
      ["worker", "state", "", "heartbeat", "lag to cloud", "to legacy", "mirrored to cloud", "to legacy", "feeds"],
      st.workers.map(w => [w.worker_id, field(`workers.${w.worker_id}.state`, w.state),
        el("span", { class: w.live ? "good" : "muted" }, w.live ? "live" : "down"),
        fmtMs(w.heartbeat_age_ms) + " ago", fmtMs(w.lag_to_cloud_ms), fmtMs(w.lag_to_legacy_ms),
        fmtCount(w.mirrored_to_cloud), fmtCount(w.mirrored_to_legacy), fmtCount(w.feeds)]),
      [false, false, false, true, true, true, true, true, true]) : el("p", { class: "muted" }, "no worker has reported");
    const leases = st.leases.length ? table(["lease", "holder", "fence", "expires"],
      st.leases.map(l => [l.name, l.holder, String(l.fence),
        el("span", { class: l.expired ? "muted" : "" }, l.expires_ms <= 0 ? "released"
           : l.expired ? `expired ${fmtMs(-l.expires_in_ms)} ago` : `in ${fmtMs(l.expires_in_ms)}`)]),
      [false, false, true, false]) : el("p", { class: "muted" }, "no leases");
    const runKinds = Object.keys(st.reconcile).sort();
    const clean = c => c === null ? "" : c ? "clean" : "not clean";
    const pct = v => v === null || v === undefined ? "-" : (100 * v).toFixed(0) + "%";
    const eta = v => v === null || v === undefined ? "-" : fmtMs(Math.round(v * 1000));
    const runs = runKinds.length ? table(["kind", "run", "state", "result", "progress", "ETA", "age"],
      runKinds.map(k => { const r = st.reconcile[k]; return [k,
        field(`reconcile.${k}.run_id`, r.run_id), field(`reconcile.${k}.state`, r.state),
        field(`reconcile.${k}.clean`, r.clean, clean(r.clean), r.clean === false ? "bad" : "good"),
        field(`reconcile.${k}.progress_ratio`, r.progress_ratio, pct(r.progress_ratio)),
        field(`reconcile.${k}.eta_s`, r.eta_s, eta(r.eta_s)),
        fmtMs(r.age_ms) + " ago"]; }),
      [false, true, false, false, true, true, true]) : el("p", { class: "muted" }, "no reconcile runs yet");
    return el("div", { class: "tables" },
      card("Findings by kind", findings), card("Reconcile: last run of each kind", runs),
      el("section", { class: "card full" }, el("h2", {}, "Workers"), workers),
      card("Leases", leases));
  }

  function render(data) {
    page.data = data;
    const app = document.getElementById("app");
    const parts = [];
    const st = data.status;
    const ageNow = data.sampled_age_ms === null ? null : data.sampled_age_ms + (Date.now() - page.fetchedAt);
    if (page.failedRefreshes) {
      parts.push(el("p", { class: "banner", "data-field": "refresh_error" },
        `The bridge did not answer the last refresh; showing data sampled ${fmtMs(ageNow)} ago.`));
    }
    if (data.sample_error) {
      parts.push(el("p", { class: "banner", "data-field": "sample_error" },
        `The store did not answer the last sample (${data.sample_error.type}, ${fmtMs(data.sample_error.age_ms)} ago); ` +
        (st ? `showing the snapshot from ${fmtMs(data.sampled_age_ms)} ago.` : "no snapshot yet.")));
    } else if (st && data.sampled_age_ms > 3 * data.interval_ms) {
      parts.push(el("p", { class: "banner" }, `The latest snapshot is ${fmtMs(data.sampled_age_ms)} old.`));
    }
    if (!st) {
      parts.push(el("p", { class: "banner info" }, "Waiting for the first sample of the store."));
    } else {
      if (st.freeze) {
        parts.push(el("p", { class: "banner", "data-field": "freeze", "data-value": JSON.stringify(st.freeze) },
          `Promotions are frozen (gate frozen) by ${st.freeze.set_by}, ${fmtMs(st.freeze.age_ms)} ago: ${st.freeze.reason}`));
      }
      for (const [what, pause] of Object.entries((st.controls || {}).paused || {})) {
        if (pause) {
          parts.push(el("p", { class: "banner", "data-field": `paused_${what}`, "data-value": JSON.stringify(pause) },
            `${what === "injection" ? "Injection into legacy" : "Reconcile runs"} paused (bridgectl control) by ${pause.set_by}, ` +
            `${fmtMs(pause.age_ms)} ago${pause.reason ? ": " + pause.reason : ""}`));
        }
      }
      const samples = data.history;
      const last = samples.length ? samples[samples.length - 1] : null;
      parts.push(tiles(st, last));
      parts.push(el("div", { class: "charts" },
        chart("lag", "Mirror lag", [{ key: "lag_to_cloud_ms", label: "to cloud", cls: "s-cloud" },
                                     { key: "lag_to_legacy_ms", label: "to legacy", cls: "s-legacy" }], samples, fmtMs),
        chart("throughput", "Throughput (messages/s)", [{ key: "rate_to_cloud", label: "to cloud", cls: "s-cloud" },
                                                        { key: "rate_to_legacy", label: "to legacy", cls: "s-legacy" }], samples, fmtRate),
        chart("backlog", "Outbox pending and open findings", [{ key: "outbox_pending", label: "outbox pending", cls: "s-cloud" },
                                                              { key: "open_findings", label: "open findings", cls: "s-legacy" }], samples, fmtCount)));
      parts.push(tablesOf(st));
    }
    app.replaceChildren(...parts);
    app.setAttribute("data-rendered", "js");
    app.setAttribute("data-refreshes", String(page.refreshes));
    document.getElementById("age").replaceChildren(
      field("sampled_age_ms", data.sampled_age_ms, ageNow === null ? "no sample yet" : `sampled ${fmtMs(ageNow)} ago`));
    document.getElementById("taken").textContent = st ? "at " + new Date(st.now_ms).toLocaleTimeString() : "";
    document.getElementById("refresh").textContent = `refreshes every ${Math.round(data.refresh_ms / 1000)} s` +
      (page.failedRefreshes ? ` (${page.failedRefreshes} failed)` : "");
  }

  async function refresh() {
    try {
      const response = await fetch("/status.json", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      page.fetchedAt = Date.now();
      page.refreshes += 1;
      page.failedRefreshes = 0;
      render(data);
    } catch (e) {
      page.failedRefreshes += 1;
      render(page.data);
    }
  }

  page.fetchedAt = Date.now();
  render(JSON.parse(document.getElementById("status-data").textContent));
  setInterval(refresh, page.data.refresh_ms);
})();
