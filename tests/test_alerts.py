"""docs/prometheus/alerts.yml is a real Prometheus rules file about metrics the code exports.

    every rule     alert, expr, for:, labels.severity (page | ticket), summary, description,
                   runbook_url into an anchor docs/operations.md has
    every expr     names only metrics a scrape can see (the bridge worker's and the cloud
                   API's registries, the reconcilers' textfile) or Prometheus's own ``up``
    promtool       ``promtool check rules`` accepts the file, where promtool is installed

The project has no YAML library: the file keeps to a small block-style subset (mappings,
sequences of mappings, plain one-line scalars, ``|-`` and ``>-`` blocks), read here by a
strict reader that refuses anything else; promtool reads it as full YAML where installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_docs import (  # noqa: F401 - exported is a fixture
    OPERATIONS,
    exported,
    promql_metrics,
    runtime_families,
    sample_names,
)

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
SEVERITIES = {"page", "ticket"}
#: metrics Prometheus adds to every target itself
PROMETHEUS_OWN = {"up"}
_PLAIN_FORBIDDEN = re.compile(r"^[\"'{\[&*!|>%@`]|: | #|:$")


class SubsetError(ValueError):
    """The text uses YAML outside the subset this reader takes."""


def read_yaml_subset(text: str) -> dict:
    """Parse the block-style YAML subset of the rules file (see the module docstring)."""
    lines, pos = text.splitlines(), 0

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    def skip() -> None:
        nonlocal pos
        while pos < len(lines) and (not lines[pos].strip()
                                    or lines[pos].lstrip().startswith("#")):
            pos += 1

    def block(ind: int, style: str) -> str:
        nonlocal pos
        out = []
        while pos < len(lines) and (not lines[pos].strip() or indent(lines[pos]) > ind):
            out.append(lines[pos].strip())
            pos += 1
        while out and not out[-1]:
            out.pop()
        if not out:
            raise SubsetError(f"line {pos}: an empty block scalar")
        return "\n".join(out) if style == "|-" else " ".join(out)

    def scalar(value: str, ind: int) -> str:
        if value in ("|-", ">-"):
            return block(ind, value)
        if _PLAIN_FORBIDDEN.search(value):
            raise SubsetError(f"line {pos}: {value!r} is not a plain one-line scalar")
        return value

    def node(parent: int) -> dict | list:
        skip()
        if pos >= len(lines) or indent(lines[pos]) <= parent:
            raise SubsetError(f"line {pos}: a key without a value")
        line = lines[pos]
        return sequence(indent(line)) if line.strip().startswith("- ") else mapping(indent(line))

    def sequence(ind: int) -> list:
        out = []
        while True:
            skip()
            if pos >= len(lines) or indent(lines[pos]) < ind:
                return out
            line = lines[pos]
            if indent(line) > ind or not line.strip().startswith("- "):
                raise SubsetError(f"line {pos + 1}: expected a '- ' item at column {ind}")
            lines[pos] = " " * (ind + 2) + line.strip()[2:]  # the item's first key
            out.append(mapping(ind + 2))

    def mapping(ind: int) -> dict:
        nonlocal pos
        out: dict = {}
        while True:
            skip()
            if pos >= len(lines) or indent(lines[pos]) < ind:
                return out
            line = lines[pos].strip()
            if indent(lines[pos]) > ind or line.startswith("- "):
                raise SubsetError(f"line {pos + 1}: unexpected indentation or item")
            key, sep, rest = line.partition(":")
            if not sep or not re.fullmatch(r"[a-z_]+", key) or (rest and rest[0] != " "):
                raise SubsetError(f"line {pos + 1}: expected 'key: value'")
            if key in out:
                raise SubsetError(f"line {pos + 1}: duplicate key {key!r}")
            pos += 1
            out[key] = scalar(rest.strip(), ind) if rest.strip() else node(ind)

    doc = mapping(0)
    skip()
    if pos != len(lines):
        raise SubsetError(f"line {pos + 1}: text after the document")
    return doc


def rules() -> list[dict]:
    return [r for g in read_yaml_subset(ALERTS.read_text(encoding="utf-8"))["groups"]
            for r in g["rules"]]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of *markdown*."""
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def unknown_metrics(exprs: list[str], families: dict[str, dict]) -> set[str]:
    known = {s for name, info in {**runtime_families(), **families}.items()
             for s in sample_names(name, info)} | PROMETHEUS_OWN
    return {m for expr in exprs for m in promql_metrics(expr)} - known


def test_the_reader_takes_the_subset_and_refuses_the_rest():
    doc = read_yaml_subset("a:\n  - b: x y\n    c: |-\n      one\n      two\n  - b: z\n")
    assert doc == {"a": [{"b": "x y", "c": "one\ntwo"}, {"b": "z"}]}
    assert read_yaml_subset("d: >-\n  folded\n  text\n") == {"d": "folded text"}
    for bad in ("a: 1\na: 2\n", "a: {b: 1}\n", "a: x # comment\n", "a: 'q'\n", "a:\n",
                "a: b: c\n", "  a: 1\nb: 2\n"):
        with pytest.raises(SubsetError):
            read_yaml_subset(bad)


def test_every_rule_has_for_severity_and_a_runbook_that_exists():
    anchors = github_anchors(OPERATIONS.read_text(encoding="utf-8"))
    found = rules()
    names = [r["alert"] for r in found]
    assert len(names) == len(set(names)) >= 10
    for rule in found:
        where = rule["alert"]
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, where
        assert re.fullmatch(r"\d+[smhd]", rule["for"]), where
        assert rule["labels"]["severity"] in SEVERITIES, where
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, where
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in anchors, where


def test_the_alerts_the_pager_needs_are_there():
    """Outbox stuck, mirror lag, findings growing and inject_failed, a worker down, a long
    freeze: each has a rule on the metric that shows it."""
    exprs = " ".join(r["expr"] for r in rules())
    for needed in ("bridge_outbox_oldest_age_seconds", "bridge_mirror_lag_seconds_bucket",
                   "bridge_findings_open", 'kind="inject_failed"', 'up{job="bridge-worker"}',
                   "bridge_workers_live", "bridge_migration_freeze_set_timestamp_seconds"):
        assert needed in exprs, needed


def test_every_metric_in_an_alert_is_exported(exported):  # noqa: F811 - the fixture
    exprs = [r["expr"] for r in rules()]
    used = {m for e in exprs for m in promql_metrics(e)}
    assert {m for m in used if m.startswith("bridge_")} >= {
        "bridge_findings_open", "bridge_outbox_oldest_age_seconds"}
    assert unknown_metrics(exprs, exported) == set()
    # and the check would notice a metric the code lacks
    assert unknown_metrics(["max(bridge_findings_opened) > 0"], exported) == {
        "bridge_findings_opened"}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not on PATH (Debian's prometheus package has it)")
def test_promtool_accepts_the_rules_file():
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout
