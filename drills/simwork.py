"""What a stretch of a simulation cost: the two halves of a simulated day's time
(docs/architecture.md, "What a simulated day costs")."""

from __future__ import annotations

from typing import Any

import attrs

from cloud.db import transaction_totals
from legacy.framing import FRAMES_RECEIVED


@attrs.frozen
class Work:
    """What a stretch of a run cost: the frames the legacy endpoints decoded (the in-memory
    network's work, the bridge's feeds included) and the database transactions, with their
    time. Frames and transactions are the same for the same seed; the seconds are wall time.
    The two halves of a simulated day's cost (docs/architecture.md, "What a simulated day
    costs")."""

    frames: int
    transactions: int
    seconds: float

    @staticmethod
    def now() -> Work:
        """This process's totals so far (``legacy_frames_received_total`` and
        ``cloud_db_transaction_seconds``)."""
        totals = transaction_totals().values()
        return Work(FRAMES_RECEIVED.value, round(sum(n for n, _ in totals)),
                    sum(s for _, s in totals))

    def since(self, before: Work) -> Work:
        """The work done between *before* and this reading."""
        return Work(self.frames - before.frames, self.transactions - before.transactions,
                    self.seconds - before.seconds)

    def to_json(self) -> dict[str, Any]:
        """The report's ``work``: frames, transactions, their seconds (one decimal)."""
        return {"legacy_frames": self.frames, "transactions": self.transactions,
                "transaction_seconds": round(self.seconds, 1)}
