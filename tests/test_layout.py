"""The import rules of docs/architecture.md, read from the source of every module (AST), and
the size rule: a module over 500 lines says at its top why."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Each package of ours, lowest first, with the packages it may import (itself always).
LAYERS = {
    "servicekit": set(),
    "legacy": {"servicekit"},
    "cloud": {"servicekit"},
    "bridge": {"servicekit", "legacy", "cloud"},
    "reconcilers": {"servicekit", "legacy", "cloud", "bridge"},
    "drills": {"servicekit", "legacy", "cloud", "bridge", "reconcilers"},
    "bridgectl": {"servicekit", "legacy", "cloud", "bridge", "reconcilers", "drills"},
}

#: What reaches the global reactor: importing it, or Twisted's helpers that use it unasked.
GLOBAL_REACTOR_NAMES = {"deferToThread", "callInThread", "react"}

LONG_MODULE_LINES = 500


def modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module in our packages."""
    found = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found.append((".".join(parts), path))
    return found


def imports_of(path: Path) -> set[str]:
    """Every module *path* imports, at module level or inside functions (absolute names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the rules read absolute ones"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def ours(name: str) -> str | None:
    top = name.split(".", 1)[0]
    return top if top in LAYERS else None


def service_modules(package: str) -> set[str]:
    """Modules of *package* that hold a long-lived Service (they import Twisted's service
    module or the toolkit's PollingLoop): the reconcilers may not reach into them."""
    return {name for name, path in modules()
            if name.startswith(package + ".")
            and ({"twisted.application.service", "servicekit.loop"} & imports_of(path))}


@pytest.mark.parametrize(("name", "path"), modules(), ids=[n for n, _ in modules()])
def test_imports_point_down_only(name, path):
    """A package imports only the packages below it (legacy and cloud: only the toolkit)."""
    package = name.split(".", 1)[0]
    allowed = LAYERS[package] | {package}
    upward = sorted(n for n in imports_of(path) if ours(n) and ours(n) not in allowed)
    assert not upward, f"{name} imports {upward}; {package} may import only {sorted(allowed)}"


def test_reconcilers_do_not_reach_into_bridge_services():
    """The reconcilers use the bridge's values and write path, never a Service module of it
    (follower, worker, outbox, ...)."""
    services = service_modules("bridge")
    assert {"bridge.follower", "bridge.worker"} <= services  # the rule sees what it guards
    reached = sorted((name, n) for name, path in modules() if name.startswith("reconcilers")
                     for n in imports_of(path)
                     if any(n == s or n.startswith(s + ".") for s in services))
    assert not reached, f"reconcilers import bridge Service modules: {reached}"


def global_reactor_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            found += [f"line {node.lineno}: import reactor" for a in node.names
                      if a.name == "reactor"]
        elif isinstance(node, ast.ImportFrom) and node.module in ("twisted.internet.threads",
                                                                  "twisted.internet.task"):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name in GLOBAL_REACTOR_NAMES]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name == "twisted.internet.reactor"]
        elif isinstance(node, ast.Attribute) and node.attr in GLOBAL_REACTOR_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize(("name", "path"), [m for m in modules()
                                            if m[0] != "bridgectl.runtime"],
                         ids=[n for n, _ in modules() if n != "bridgectl.runtime"])
def test_only_bridgectl_runtime_touches_the_global_reactor(name, path):
    """Everywhere but the composition root's runtime, time and threads come from an injected
    reactor."""
    assert global_reactor_uses(path) == [], f"{name} reaches the global reactor"


def test_the_reactor_rule_sees_a_violation(tmp_path):
    """The reactor check catches the import and the helpers that use the global reactor."""
    bad = tmp_path / "bad.py"
    bad.write_text("from twisted.internet import reactor, threads\n"
                   "from twisted.internet.task import react\n"
                   "threads.deferToThread(print)\n", encoding="utf-8")
    assert len(global_reactor_uses(bad)) == 3


def test_bridgectl_is_where_the_global_reactor_is():
    """The rule above is not vacuous: the composition root does import the reactor."""
    assert global_reactor_uses(ROOT / "bridgectl" / "runtime.py")


@pytest.mark.parametrize(("name", "path"), modules(), ids=[n for n, _ in modules()])
def test_a_long_module_says_why(name, path):
    """A module over 500 lines opens with a docstring that says why it is that long."""
    text = path.read_text(encoding="utf-8")
    if text.count("\n") <= LONG_MODULE_LINES:
        return
    doc = " ".join((ast.get_docstring(ast.parse(text)) or "").split())
    assert re.search(r"\bis long\b[^.]*\bbecause\b", doc, re.I), (
        f"{name} has {text.count(chr(10))} lines; say at its top why (\"... is long ... "
        "because ...\"), or split it")
