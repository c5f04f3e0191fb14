"""Failed-login budgets (``login_buckets``), shared by every API process of a deployment.

A budget is a token bucket of ``capacity`` failures that refills continuously at
``capacity`` per window (``servicekit.ratelimit.TokenBuckets``, the same arithmetic). A row
keeps one number, ``full_at_ms``: when the bucket is full again. With
``interval = window / capacity`` (the time one failure takes to refill)::

    spent at t     = max(0, full_at - t) / interval       (no row: 0)
    take  at t     = full_at := max(full_at, t) + interval, allowed while
                     max(full_at, t) + interval - t <= window   (i.e. spent + 1 <= capacity)
    refused        = wait max(full_at, t) + interval - t - window, take nothing
    give back at t = full_at := full_at - interval; the row goes when that is <= t (full)
    prune at t     = delete rows with full_at <= t; past max_keys per scope, the rows that
                     will be full soonest (they hold the least) go first

Each call is one statement with the caller's clock as a parameter (never ``now()``), so
one round trip decides and spends. ``try_take`` spends from every budget of an attempt or
from none: it locks the rows that exist (in key order, so two attempts never deadlock),
decides on their latest values, and upserts; two API processes racing on one budget are
serialised by the row lock, so together they never get more than its capacity (a first
failure of a key nobody has failed with yet is the one exception: two may both see no row,
and both count). Times are milliseconds as floats: ``interval`` need not be whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import psycopg

from cloud.db import one_statement

#: The logins' budgets' scopes.
SCOPES = ("account", "address")
#: The account recovery route's (``POST /v1/recover``): apart, so neither spends the other's.
RECOVERY_SCOPES = ("recover_account", "recover_address")
#: Every scope (the table's CHECK says the same).
ALL_SCOPES = SCOPES + RECOVERY_SCOPES
#: A wait shorter than this is none (float arithmetic on millisecond times).
EPSILON_MS = 1e-6


@attrs.frozen
class Budget:
    """One bucket to check or spend: its scope, key and size."""

    scope: str = attrs.field(validator=attrs.validators.in_(ALL_SCOPES))
    key: str
    capacity: int
    window_ms: float

    @property
    def interval_ms(self) -> float:
        """How long one failure takes to refill."""
        return self.window_ms / self.capacity


def _arrays(budgets: Sequence[Budget]) -> dict[str, list]:
    return {"scopes": [b.scope for b in budgets], "keys": [b.key for b in budgets],
            "intervals": [b.interval_ms for b in budgets],
            "windows": [float(b.window_ms) for b in budgets]}


_WANT = ("want AS (SELECT * FROM unnest(%(scopes)s::text[], %(keys)s::text[], "
         "%(intervals)s::float8[], %(windows)s::float8[]) AS w(scope, key, interval_ms, "
         "window_ms))")


@one_statement
def wait_ms(conn: psycopg.Connection, budget: Budget, now_ms: float) -> float:
    """Milliseconds until *budget* has a failure to spend (0.0: it has one now); reads only."""
    row = conn.execute("SELECT full_at_ms FROM login_buckets WHERE scope = %s AND key = %s",
                       (budget.scope, budget.key)).fetchone()
    if row is None:
        return 0.0
    over = max(row[0], now_ms) + budget.interval_ms - now_ms - budget.window_ms
    return over if over > EPSILON_MS else 0.0


@one_statement
def try_take(conn: psycopg.Connection, budgets: Sequence[Budget], now_ms: float) -> float:
    """Spend one failure from every one of *budgets* and return 0.0, or, when any of them is
    spent, spend nothing and return the milliseconds until all have one again."""
    over, taken = conn.execute(
        f"WITH {_WANT}, "
        "locked AS (SELECT b.scope, b.key, b.full_at_ms FROM login_buckets b "
        "  JOIN want w ON b.scope = w.scope AND b.key = w.key "
        "  ORDER BY b.scope, b.key FOR UPDATE OF b), "
        "verdict AS (SELECT max(greatest(l.full_at_ms, %(now)s) + w.interval_ms - %(now)s "
        "  - w.window_ms) AS over_ms FROM want w LEFT JOIN locked l USING (scope, key)), "
        "taken AS (INSERT INTO login_buckets AS b (scope, key, full_at_ms) "
        "  SELECT w.scope, w.key, %(now)s + w.interval_ms FROM want w, verdict v "
        "  WHERE v.over_ms <= %(eps)s "
        "  ON CONFLICT (scope, key) DO UPDATE "
        "  SET full_at_ms = greatest(b.full_at_ms, %(now)s) + (EXCLUDED.full_at_ms - %(now)s) "
        "  RETURNING 1) "
        "SELECT v.over_ms, (SELECT count(*) FROM taken) FROM verdict v",
        {**_arrays(budgets), "now": float(now_ms), "eps": EPSILON_MS}).fetchone()
    return 0.0 if taken else max(over, EPSILON_MS)


@one_statement
def give_back(conn: psycopg.Connection, budgets: Sequence[Budget], now_ms: float) -> None:
    """Return one failure to each of *budgets* (the password was right); a bucket that is
    full again loses its row."""
    conn.execute(
        f"WITH {_WANT}, "
        "gone AS (DELETE FROM login_buckets b USING want w "
        "  WHERE b.scope = w.scope AND b.key = w.key "
        "  AND b.full_at_ms - w.interval_ms <= %(now)s RETURNING b.key) "
        "UPDATE login_buckets b SET full_at_ms = b.full_at_ms - w.interval_ms FROM want w "
        "WHERE b.scope = w.scope AND b.key = w.key AND b.full_at_ms - w.interval_ms > %(now)s",
        {**_arrays(budgets), "now": float(now_ms)})


def prune(conn: psycopg.Connection, now_ms: float, max_keys: int) -> int:
    """Delete the buckets that are full again and, past *max_keys* per scope, those that will
    be full soonest; return how many rows went."""
    full = conn.execute("DELETE FROM login_buckets WHERE full_at_ms <= %s",
                        (float(now_ms),)).rowcount
    over = conn.execute(
        "DELETE FROM login_buckets b USING (SELECT scope, key FROM (SELECT scope, key, "
        "  row_number() OVER (PARTITION BY scope ORDER BY full_at_ms DESC, key) AS n "
        "  FROM login_buckets) ranked WHERE n > %s) old "
        "WHERE b.scope = old.scope AND b.key = old.key", (max_keys,)).rowcount
    return full + over


def bucket_count(conn: psycopg.Connection,
                 scopes: Sequence[str] = SCOPES) -> dict[str, int]:
    """Rows per scope of *scopes* (the logins' by default; 0 included)."""
    counts = dict.fromkeys(scopes, 0)
    counts.update(conn.execute("SELECT scope, count(*) FROM login_buckets "
                               "WHERE scope = ANY(%s) GROUP BY 1", (list(scopes),)))
    return counts
