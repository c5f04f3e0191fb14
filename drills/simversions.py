"""The simulation's client versions (``drills.simulation``): minimum versions set mid-run,
as ``bridgectl legacy min-version`` sets them, and what they did.

Each legacy device reports a version drawn from the run's spread (``--client-versions``,
``legacy.versions``). At each ``--min-version VERSION@DAY`` the login server is told first
and the store written after, with its audit row, the command's order. Devices online then
stay online; at their next login an older one is refused with ``upgrade_required`` and stops
trying (``legacy.client``). The report counts those refusals, the devices refused, and the
versions the login server saw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from twisted.internet import defer
from twisted.logger import Logger

from bridge.min_versions import send_rules
from cloud.db import run_transaction
from cloud.store import controls as controls_store
from legacy import versions
from legacy.sim import LegacyDeployment

ACTOR = "simulate"
log = Logger()


def parse_min_version(text: str) -> tuple[float, str]:
    """``"8.0@12.5"`` -> (12.5, "8.0"): the version everyone needs from that simulated day
    on. ValueError with a sentence for anything else."""
    version, sep, day = text.partition("@")
    if not sep:
        raise ValueError(f"--min-version {text!r}: give VERSION@DAY, e.g. 8.0@20")
    try:
        version = versions.normalize(version.strip())
    except ValueError as e:
        raise ValueError(f"--min-version {text!r}: {e}") from None
    try:
        at = float(day)
    except ValueError:
        raise ValueError(f"--min-version {text!r}: the day must be a number") from None
    if not 0 <= at < float("inf"):
        raise ValueError(f"--min-version {text!r}: the day must be a number >= 0")
    return at, version


class SimVersions:
    """Sets the minimum versions of a run at their days and reports what they did."""

    def __init__(self, conn: psycopg.Connection, legacy: LegacyDeployment,
                 now_ms: Callable[[], int], day: Callable[[], float],
                 login_link: Callable[[], Any]) -> None:
        self.conn, self.legacy = conn, legacy
        self._now_ms, self._day, self._login_link = now_ms, day, login_link
        self.set: list[dict[str, Any]] = []

    def set_min_version(self, version: str) -> defer.Deferred:
        """``apply`` in the background (a failure is logged with its traceback)."""
        d = defer.Deferred.fromCoroutine(self.apply(version))
        d.addErrback(lambda f: log.failure("setting minimum version {v} failed", f, v=version))
        return d

    async def apply(self, version: str) -> None:
        """Everyone's minimum to *version*: the login server, then the store (audited)."""
        await send_rules(self._login_link(), [("", version, ())])
        run_transaction(self.conn, "set_min_version", controls_store.set_min_version, "",
                        version, actor=ACTOR, now_ms=self._now_ms())
        self.set.append({"day": round(self._day(), 3), "version": version,
                         "refused_before": self.legacy.stats.login_upgrade_required})

    def refused_logins(self) -> int:
        return self.legacy.stats.login_upgrade_required

    def report(self, spread: str) -> dict[str, Any]:
        devices = [d for ds in self.legacy.devices.values() for d in ds]
        refused = [d for d in devices if d.state == "upgrade_required"]
        seen = self.legacy.login.versions_reply(0)
        return {
            "spread": spread or None,
            "min_versions": self.set,
            "refused_logins": self.refused_logins(),
            "devices_refused": len(refused),
            "devices_refused_by_version": _count(d.version for d in refused),
            "devices_by_version": _count(d.version for d in devices),
            "logins_by_version": {v.version: v.logins for v in seen.versions},
        }


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        key = v or versions.UNKNOWN
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: versions.parse_version(item[0])))
