"""How commands print a result: one JSON object with ``--json``, aligned lines without."""

from __future__ import annotations

import json
from typing import Any


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """A run's summary: one JSON object, or ``key  value`` lines."""
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
