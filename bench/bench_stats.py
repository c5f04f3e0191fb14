"""The one summary every benchmark figure gets: median, min and max of its runs."""

from __future__ import annotations

import statistics


def summarize(values: list[float], digits: int = 1) -> dict:
    """Median, min and max of *values* rounded to *digits*, and how many runs there were."""
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": len(values)}
