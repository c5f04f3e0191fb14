"""The operator documentation matches the code: metrics, dashboard, alerts, units, flag tables.

    metrics the code serves   bridge worker /metrics   modules `bridgectl bridge run` imports
                              cloud API /metrics       modules `bridgectl cloud run` imports
                              reconciler textfile      a real report rendered by reconcilers.report
    vs. docs/grafana/bridge-dashboard.json   every PromQL expr (and variable query)
        docs/operations.md                   every metric named; every ```promql alert block
        docs/systemd/*.service               ExecStart parses with bridgectl.main.build_parser()
        docs/cron, docs/k8s                  every bridgectl command line parses too
        README.md                            flag tables == build_parser(); env variables

Each process's registry is collected in a fresh interpreter: the test process has imported
every module (legacy supernodes included), so its own registry would claim metrics that no
scraped endpoint serves.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridgectl import main as cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DASHBOARD = DOCS / "grafana" / "bridge-dashboard.json"
OPERATIONS = DOCS / "operations.md"
README = ROOT / "README.md"
SYSTEMD = DOCS / "systemd"

#: Sample names a family of each type exposes, by suffix of the family name.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
            "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "stateset": ("",),
            "unknown": ("",)}

# ---------------------------------------------------------------- what the code exports

_COLLECT = r"""
import importlib, json, sys
from prometheus_client import REGISTRY

def families():
    return {f.name: {"type": f.type, "samples": sorted({s.name for s in f.samples})}
            for f in REGISTRY.collect()}

baseline = families()  # prometheus_client's own process, platform and gc collectors
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:  # "from pkg import attribute", not a submodule
        if e.name != name:
            raise
out = families()
print(json.dumps({"runtime": {k: v for k, v in out.items() if k in baseline},
                  "project": {k: v for k, v in out.items() if k not in baseline}}))
"""


@functools.cache
def _registry_after_importing(modules: tuple[str, ...]) -> dict[str, dict]:
    """``{"project": {family: {type, samples}}, "runtime": {...}}`` of a fresh interpreter
    after importing *modules* (``runtime``: what prometheus_client registers by itself)."""
    done = subprocess.run([sys.executable, "-c", _COLLECT, *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def modules_imported_by(command: tuple[str, str | None]) -> tuple[str, ...]:
    """Every module the command's function imports, directly or through the functions of its
    ``bridgectl/cmd_*.py`` module that it calls, plus that module's own imports (our packages
    import their metric modules at module level)."""
    handler = cli.commands()[command]
    module = sys.modules[handler.__module__]
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    modules = {"bridgectl.main", handler.__module__}
    todo, seen = [handler.__name__], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module)
                modules.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                todo.append(node.func.id)
    return tuple(sorted(modules))


def sample_names(name: str, info: dict) -> set[str]:
    return {name + s for s in SUFFIXES[info["type"]]} | set(info["samples"])


def documented_name(name: str, info: dict) -> str:
    """How operations.md names a family: counters with ``_total``, the rest as declared."""
    return name + "_total" if info["type"] == "counter" else name


def reconciler_families(tmp_path: Path) -> dict[str, dict]:
    """The families of a real reconcile textfile, as node_exporter would read it."""
    from reconcilers import report
    from reconcilers.runner import Report

    path = tmp_path / "bridge_reconcile.prom"
    report.write_textfile(path, [Report(kind="gaps", completed=True, compared=1)], now=1.0)
    return {f.name: {"type": f.type, "samples": sorted({s.name for s in f.samples})}
            for f in text_string_to_metric_families(path.read_text(encoding="utf-8"))}


@functools.cache
def served() -> dict[str, dict[str, dict]]:
    """Process -> families it serves on /metrics (project ones only)."""
    return {"bridge worker": _registry_after_importing(
                modules_imported_by(("bridge", "run")))["project"],
            "cloud API": _registry_after_importing(
                modules_imported_by(("cloud", "run")))["project"]}


@functools.cache
def runtime_families() -> dict[str, dict]:
    """process_* and python_* families prometheus_client adds to every /metrics."""
    return _registry_after_importing(modules_imported_by(("bridge", "run")))["runtime"]


@functools.cache
def defined_anywhere() -> dict[str, dict]:
    """Every family any module of ours defines (the legacy network's in-process counters
    too, which no endpoint serves)."""
    import pkgutil

    names = []
    for package in ("legacy", "cloud", "bridge", "reconcilers"):
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / package)], f"{package}.")]
    return _registry_after_importing(tuple(sorted(names)))["project"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Every family a scrape can see: both /metrics endpoints and the reconciler textfile."""
    families: dict[str, dict] = {}
    for per_process in served().values():
        families.update(per_process)
    families.update(reconciler_families(tmp_path_factory.mktemp("prom")))
    return families


# ---------------------------------------------------------------- PromQL

#: PromQL words that are not metrics: aggregations, functions, operators, modifiers.
PROMQL_WORDS = frozenset("""
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio by without on ignoring group_left group_right and or unless bool offset atan2
    abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month
    day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters double_exponential_smoothing hour idelta increase irate
    label_join label_replace ln log2 log10 minute month predict_linear rate resets round
    scalar sgn sort sort_desc sort_by_label sort_by_label_desc sqrt time timestamp vector
    year avg_over_time min_over_time max_over_time sum_over_time count_over_time
    quantile_over_time stddev_over_time stdvar_over_time last_over_time present_over_time
    mad_over_time acos acosh asin asinh atan atanh cos cosh sin sinh tan tanh deg rad pi
    inf nan le start end label_values query_result metrics label_names
""".split())

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: A name not preceded by a word character, `.` or `$` (numbers, durations, variables), followed
#: by a selector, a range, a closing parenthesis, whitespace, an operator or the end: never by
#: `(`, which makes it a function.
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)"
                         r"(?=\s*(?:[{\[)]|\s|$|[-+*/%^<>=!,]))")


def promql_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression (Grafana variables allowed)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # ${DS_PROMETHEUS}, $__rate_interval
    text = re.sub(r"\{[^}]*\}", "{}", text)          # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)         # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"(label_values\([^,()]*),\s*\w+\s*\)", r"\1)", text)  # Grafana's
    return {m for m in _IDENTIFIER.findall(text) if m.lower() not in PROMQL_WORDS}


def test_the_promql_reader_finds_metrics_and_only_metrics():
    """The expression reader keeps metric names and drops functions, labels and keywords."""
    assert promql_metrics(
        'histogram_quantile(0.99, sum by (le, direction) (rate('
        'bridge_mirror_lag_seconds_bucket{job="$bridge_job", direction=~"to_.*"}'
        '[$__rate_interval])))') == {"bridge_mirror_lag_seconds_bucket"}
    assert promql_metrics(
        "time() - max by (kind) (bridge_reconcile_last_success_timestamp_seconds) > 3 * 600"
    ) == {"bridge_reconcile_last_success_timestamp_seconds"}
    assert promql_metrics(
        "sum(rate(a_total[5m])) / ignoring(status) group_left sum(rate(b_total[5m]))>0.01"
    ) == {"a_total", "b_total"}
    assert promql_metrics("deriv(max(bridge_backlog_messages)[15m:1m]) > 0 and up == 0") == {
        "bridge_backlog_messages", "up"}
    assert promql_metrics("label_values(bridge_feeds_connected, instance)") == {
        "bridge_feeds_connected"}
    assert promql_metrics("x_bucket offset 1h") == {"x_bucket"}


# ---------------------------------------------------------------- the dashboard

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out += all_panels(panel.get("panels", []))
    return out


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, every query variable and every Prometheus
    annotation (its ``expr``, or its ``target.expr`` as newer Grafana saves it)."""
    exprs = [(f"panel {p.get('title')!r}", t["expr"])
             for p in all_panels(board["panels"]) for t in p.get("targets", []) if "expr" in t]
    for anno in board.get("annotations", {}).get("list", []):
        for expr in (anno.get("expr"), anno.get("target", {}).get("expr")):
            if expr:
                exprs.append((f"annotation {anno['name']!r}", expr))
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            exprs.append((f"variable {var['name']!r}", query))
    return exprs


def metric_problems(board: dict, families: dict[str, dict], runtime: dict[str, dict]
                    ) -> list[str]:
    """What is wrong between a dashboard and the exported families (empty: nothing)."""
    known = {s: name for name, info in {**runtime, **families}.items()
             for s in sample_names(name, info)}
    problems, used = [], set()
    for where, expr in dashboard_exprs(board):
        for metric in promql_metrics(expr):
            if metric not in known:
                problems.append(f"{where} uses {metric}, which no code exports")
            else:
                used.add(known[metric])
    problems += [f"exported family {name} appears in no panel"
                 for name in sorted(set(families) - used)]
    return problems


def test_the_dashboard_loads_and_every_panel_queries_something():
    """(e) The dashboard is importable JSON: schema version, datasource variable, targets."""
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in all_panels(board["panels"]) if p.get("type") != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in all_panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no target"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel.get("title")
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel.get("title")
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"empty expr in {panel.get('title')!r}"
            assert target["refId"]


def test_cohort_changes_are_annotated_from_an_exported_metric(exported):
    """The dashboard's cohort annotation queries the worker's cohort gauge (exported, see
    bridge/ops/store_metrics.py), on the dashboard's data source, and places each event at
    the gauge's value: the moment of the cohort's change, in milliseconds."""
    annotations = {a["name"]: a for a in dashboard()["annotations"]["list"]}
    cohorts = annotations["Cohort changes"]
    assert cohorts["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert cohorts["enable"] is True and cohorts["useValueForTime"] is True
    metrics = promql_metrics(cohorts["expr"])
    assert metrics == {"bridge_cohort_last_action_timestamp_seconds"}
    assert exported["bridge_cohort_last_action_timestamp_seconds"]["type"] == "gauge"
    assert "* 1000" in cohorts["expr"] and "> 0" in cohorts["expr"]  # ms, never 1970
    assert set(cohorts["tagKeys"].split(",")) == {"cohort", "action"}
    assert "{{cohort}}" in cohorts["titleFormat"] and "{{action}}" in cohorts["titleFormat"]


def test_an_annotation_on_a_metric_nobody_exports_is_caught(exported):
    """The metric check reads annotations too: a renamed gauge there is a problem."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8").replace(
        "bridge_cohort_last_action_timestamp_seconds{", "bridge_cohort_last_move_seconds{"))
    problems = metric_problems(board, exported, runtime_families())
    assert ("annotation 'Cohort changes' uses bridge_cohort_last_move_seconds, which no code "
            "exports") in problems


def test_the_dashboard_uses_exactly_the_exported_metrics(exported):
    """(a) every dashboard metric is exported; (b) every exported family is on a panel."""
    assert "bridge_mirror_lag_seconds" in exported  # the collection itself works
    assert "cloud_api_requests" in exported
    assert "bridge_reconcile_last_success_timestamp_seconds" in exported
    assert metric_problems(dashboard(), exported, runtime_families()) == []


def test_a_renamed_or_unused_metric_is_caught(exported):
    """The check fails for a dashboard metric the code lacks and for an unused family."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8").replace(
        "bridge_feed_gaps_total", "bridge_feed_gap_total"))
    problems = metric_problems(board, exported, runtime_families())
    assert any("bridge_feed_gap_total, which no code exports" in p for p in problems)
    assert "exported family bridge_feed_gaps appears in no panel" in problems


def test_legacy_counters_no_endpoint_serves_are_not_on_the_dashboard():
    """`legacy run` serves no /metrics: its supernode counters must not be charted."""
    everything = json.dumps(dashboard())
    served_names = {n for per in served().values() for n in per}
    for name in set(defined_anywhere()) - served_names:
        if name.startswith("legacy_"):
            assert name not in everything, name


# ---------------------------------------------------------------- docs/operations.md

def test_every_metric_is_documented_in_operations(tmp_path):
    """(c) operations.md names every family the code defines, served or in-process."""
    text = OPERATIONS.read_text(encoding="utf-8")
    families = {**defined_anywhere(), **reconciler_families(tmp_path)}
    missing = [documented_name(n, i) for n, i in sorted(families.items())
               if not re.search(rf"(?<![\w]){re.escape(documented_name(n, i))}(?![\w])", text)]
    assert missing == []


def test_the_alert_expressions_use_exported_metrics(exported):
    """Every ```promql block in operations.md names only metrics a scrape can see."""
    text = OPERATIONS.read_text(encoding="utf-8")
    blocks = re.findall(r"```promql\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    known = {s for name, info in {**runtime_families(), **exported}.items()
             for s in sample_names(name, info)}
    for block in blocks:
        for line in block.splitlines():
            expr = line.split("#", 1)[0].strip()
            if expr:
                assert promql_metrics(expr) <= known, (expr, promql_metrics(expr) - known)


# ---------------------------------------------------------------- unit files, cron, k8s

#: systemd expands these itself before exec; the example instance is a metrics port.
SPECIFIERS = {"%i": "48091", "%I": "48091", "%H": "bridge-host-1", "%%": "%"}


def unit_sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current, lines = None, path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
        else:
            key, _, value = line.partition("=")
            sections[current].append((key.strip(), value.strip()))
    return sections


def _no_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A shortened flag parses today and breaks when a longer one is added: refuse it."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)
    return parser


def parses(argv: list[str]) -> argparse.Namespace:
    """*argv* (after ``bridgectl``) through the real parser; fails the test if it errors."""
    try:
        return _no_abbreviations(cli.build_parser()).parse_args(argv)
    except SystemExit as e:  # argparse printed the reason to stderr
        pytest.fail(f"bridgectl {shlex.join(argv)} does not parse (exit {e.code})")


def test_every_systemd_unit_runs_a_command_the_cli_accepts():
    """(d) each ExecStart, binary path stripped, parses with build_parser()."""
    services = sorted(SYSTEMD.glob("*.service"))
    assert len(services) >= 4
    for path in services:
        sections = unit_sections(path)
        service = dict(sections["Service"])
        execs = [v for k, v in sections["Service"] if k == "ExecStart"]
        assert len(execs) == 1, path.name
        argv = shlex.split(execs[0])
        assert argv[0].endswith("/bridgectl"), path.name
        if "@" in path.name:
            argv = [re.sub(r"%[iIH%]", lambda m: SPECIFIERS[m.group()], a) for a in argv]
        assert not any("%" in a or "$" in a for a in argv[1:]), (path.name, argv)
        args = parses(argv[1:])
        assert "EnvironmentFile" in service and service.get("User"), path.name
        assert service.get("NoNewPrivileges") == "yes", path.name
        assert service.get("ProtectSystem") == "strict", path.name
        if service.get("Type") == "oneshot":
            assert args.command == "reconcile", path.name
            assert (SYSTEMD / path.name.replace(".service", ".timer")).exists(), path.name
        else:
            assert service.get("Restart") == "on-failure", path.name
            assert service.get("KillSignal") == "SIGTERM", path.name
            assert int(service["TimeoutStopSec"]) >= 30, path.name
            # long-running: READY=1, STOPPING=1 and the watchdog (servicekit.sdnotify),
            # pinged every WatchdogSec/2 with room for a slow heartbeat
            assert service.get("Type") == "notify", path.name
            assert service.get("NotifyAccess") == "main", path.name
            assert 30 <= int(service["WatchdogSec"]) <= 300, path.name
    for timer in SYSTEMD.glob("*.timer"):
        assert (SYSTEMD / timer.name.replace(".timer", ".service")).exists(), timer.name


def test_the_cron_and_kubernetes_examples_parse():
    """The crontab lines and the CronJobs' args are commands the CLI accepts."""
    crontab = (DOCS / "cron" / "bridge-reconcile.crontab").read_text(encoding="utf-8")
    env = dict(re.findall(r"^([A-Z_]+)=(\S+)$", crontab, re.M))
    lines = [line for line in crontab.splitlines() if line and not line.startswith("#")
             and "bridgectl" in line]
    assert len(lines) == 4
    for line in lines:
        command = line[line.index("bridgectl"):].split(">>")[0]
        command = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], command)
        parses(shlex.split(command)[1:])
    k8s = (DOCS / "k8s" / "reconcile-cronjob.yaml").read_text(encoding="utf-8")
    jobs = re.findall(r"args: \[(.*?)\]", k8s, re.S)
    assert len(jobs) == 4
    for job in jobs:
        argv = [a.strip().strip('"') for a in job.replace("\n", " ").split(",")]
        assert argv[0] == "bridgectl"
        parses(argv[1:])


# ---------------------------------------------------------------- README flag tables

def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """'legacy run' -> its parser, for every command bridgectl has."""
    out = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(path)] = parser
            return
        for name, sub in subs[0].choices.items():
            walk(sub, [*path, name])

    walk(cli.build_parser(), [])
    return out


def readme_flag_tables() -> dict[str, dict[str, str]]:
    """README's Configuration section: command -> {flag or POSITIONAL: default cell}."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Configuration' section"
    tables: dict[str, dict[str, str]] = {}
    command = None
    for line in section.group(1).splitlines():
        heading = re.match(r"^#{3,5} .*?`bridgectl ([a-z -]+?)`", line)
        if heading:
            command = heading.group(1).strip()
            tables[command] = {}
        elif command and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            token = re.match(r"`([^` ]+)", cells[0]).group(1)
            tables[command][token] = cells[1] if len(cells) > 1 else ""
    return tables


def _default_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_readme_flag_tables_match_the_parser():
    """Every command has a README table listing exactly its flags, defaults as parsed."""
    tables = readme_flag_tables()
    parsers = leaf_parsers()
    assert set(tables) == set(parsers)
    for command, parser in parsers.items():
        want = {}
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            token = action.option_strings[0] if action.option_strings else (
                action.metavar or action.dest).upper()
            want[token] = action
        assert set(tables[command]) == set(want), command
        for token, action in want.items():
            cell = tables[command][token]
            if action.required:
                assert "required" in cell, (command, token, cell)
            elif action.default not in (None, False):
                assert f"`{_default_text(action.default)}`" in cell, (command, token, cell)


def test_readme_names_every_environment_variable():
    """Every environment variable the code, tests, benches or CI read is in the README."""
    text = README.read_text(encoding="utf-8")
    found = set()
    for folder in ("bridge", "cloud", "legacy", "reconcilers", "tests", "bench", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ""):
                source = path.read_text(encoding="utf-8", errors="replace")
                found |= set(re.findall(
                    r"(?:environ|env)(?:\.get\(|\[)\s*[\"']([A-Z][A-Z0-9_]+)[\"']", source))
                found |= set(re.findall(r"\$\{?(BRIDGE_[A-Z0-9_]+)", source))
    assert {"BRIDGE_DSN", "BRIDGE_HOME", "BRIDGE_TEST_DSN"} <= found
    assert sorted(v for v in found if f"`{v}`" not in text) == []


# ---------------------------------------------------------------- links between the docs

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_docs_resolve():
    """Every relative link in README.md and docs/*.md names a file (and heading) that exists."""
    pages = [README, *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


# ---------------------------------------------------------------- modules and files the docs name

#: A path in the repository as the docs write it (``bridge/mirror.py``, ``tests/drills/``).
_PATH = re.compile(r"(?<![\w/.-])((?:servicekit|legacy|cloud|bridge|reconcilers|drills|"
                   r"bridgectl|tests|bench|docs)/[\w/.-]*\w/?)")
#: A dotted name of ours in backticks (``bridge.mirror.translate``, ``cloud.store.outbox``).
_DOTTED = re.compile(r"`((?:servicekit|legacy|cloud|bridge|reconcilers|drills|bridgectl)"
                     r"(?:\.\w+)+)")
#: Names the docs use that are files in $BRIDGE_HOME or docs, not modules.
_NOT_MODULES = (".secret", ".md", ".example")


def _resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest module prefix of *dotted*."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        obj: object = importlib.import_module(name)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def doc_references(text: str) -> tuple[set[str], set[str]]:
    """(paths, dotted names) that *text* names; placeholders such as NNNN_name are left out."""
    paths = {p for p in _PATH.findall(text) if "NNNN" not in p and not p.endswith("_")}
    dotted = {d for d in _DOTTED.findall(text) if not d.endswith(_NOT_MODULES)}
    return paths, dotted


def test_the_modules_and_files_the_docs_name_exist():
    """README.md and docs/*.md name modules and files that exist: a move or a rename that
    leaves the docs behind fails here."""
    missing = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        paths, dotted = doc_references(page.read_text(encoding="utf-8"))
        missing += [f"{page.name}: {p}" for p in sorted(paths) if not (ROOT / p).exists()]
        missing += [f"{page.name}: {d}" for d in sorted(dotted) if not _resolves(d)]
    assert missing == []


def test_a_stale_module_or_path_in_the_docs_is_caught():
    """The check above sees what it guards: an old path and an old module name fail it."""
    paths, dotted = doc_references("see `bridge/cli.py` and `bridge.follower.mirror_legacy`")
    assert [p for p in paths if not (ROOT / p).exists()] == ["bridge/cli.py"]
    assert [d for d in dotted if not _resolves(d)] == ["bridge.follower.mirror_legacy"]
