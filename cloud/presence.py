"""The presence merge rule: one user's effective presence from all of their sources.

A user can be present through several sources at once: the cloud API (``cloud``) and each
legacy supernode a device is attached to (``legacy:<sn>``, mirrored by the bridge). The
effective status is the most available one among the sources still live::

    online > busy > away > offline      (no live source: offline)

A source counts as live until ``expires_ms + GRACE_MS``. The grace is the hysteresis: a
device that refreshes a little late, or a source whose refresh is still crossing the bridge,
does not make a user who is online elsewhere (or here) flicker offline and back.
"""

from __future__ import annotations

from collections.abc import Iterable

from cloud.model import Presence

#: How long past its expiry a source still counts (hysteresis against flapping).
GRACE_MS = 15_000

_RANK = {"offline": 0, "away": 1, "busy": 2, "online": 3}


def effective_status(sources: Iterable[Presence], now_ms: int) -> str:
    """The merged status of one user's presence sources at *now_ms*."""
    best = "offline"
    for p in sources:
        if p.expires_ms + GRACE_MS > now_ms and _RANK[p.status] > _RANK[best]:
            best = p.status
    return best
