"""An ordered record of a run's events, reduced to a hash: same seed, same hash."""

from __future__ import annotations

import hashlib

from twisted.internet.interfaces import IReactorTime


class Trace:
    """Hashes every event with the clock time it happened at; also counts them."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._hash = hashlib.sha256()
        self.events = 0

    def record(self, kind: str, *fields: object) -> None:
        self.events += 1
        line = f"{self.clock.seconds():.6f}|{kind}|" + "|".join(map(str, fields)) + "\n"
        self._hash.update(line.encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
