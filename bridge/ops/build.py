"""Which release this is: the version of the installed distribution (``setup.cfg``), for
``bridgectl --version`` and the worker's ``bridge_build_info`` gauge."""

from __future__ import annotations

from importlib import metadata

#: The distribution name in ``setup.cfg``.
DISTRIBUTION = "dualstack-bridge"


def version() -> str:
    """The installed distribution's version; ``unknown`` when it is not installed (a bare
    checkout on ``PYTHONPATH``), so nothing fails for want of metadata."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
