"""Which release runs: ``bridgectl --version`` and the worker's ``bridge_build_info`` both
say the installed package's version."""

from __future__ import annotations

from importlib import metadata

import pytest
from prometheus_client import REGISTRY, generate_latest

from bridge.ops import build, metrics
from bridgectl import main as cli


def test_version_is_the_installed_package_version(monkeypatch):
    """version() reads the distribution's metadata, and says unknown without any."""
    assert build.version() == metadata.version("dualstack-bridge")

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert build.version() == "unknown"


def test_bridgectl_version_prints_it_and_exits_0(capsys):
    """bridgectl --version prints 'bridgectl VERSION' and exits 0 before any command runs."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"bridgectl {build.version()}"


def test_build_info_is_one_series_set_to_1_with_the_version():
    """/metrics (the default registry the worker serves) has bridge_build_info{version} 1."""
    assert metrics.BUILD_INFO is not None
    text = generate_latest(REGISTRY).decode()
    assert f'bridge_build_info{{version="{build.version()}"}} 1.0' in text
    assert text.count("bridge_build_info{") == 1
