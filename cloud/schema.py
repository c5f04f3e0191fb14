"""Versioned SQL migrations: find them in the package, apply the pending ones in order.

Each file ``cloud/migrations/NNNN_name.sql`` is one version, applied in one transaction and
recorded in ``schema_migrations`` with its checksum. A session-level advisory lock serialises
concurrent upgraders, so running ``bridgectl db upgrade`` twice, or from two processes at
once, applies every version exactly once. An applied file whose text has changed since is
refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import attrs
import psycopg

#: Arbitrary but fixed: the advisory lock key all upgraders agree on ("bridge" + "mig").
MIGRATION_LOCK_KEY = 0x62726964_6D6967

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(Exception):
    """The database's schema history does not fit the migrations shipped in the package."""


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@attrs.frozen
class SchemaStatus:
    applied: tuple[tuple[int, str], ...]
    pending: tuple[tuple[int, str], ...]

    @property
    def current(self) -> int:
        return self.applied[-1][0] if self.applied else 0


def shipped_migrations() -> list[Migration]:
    """The package's migrations in version order; a malformed or duplicate name is a bug."""
    found: dict[int, Migration] = {}
    for entry in resources.files("cloud.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file name {entry.name!r} is not NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files have version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    return {v: (name, checksum) for v, name, checksum in rows}


def _check_history(applied: dict[int, tuple[str, str]], shipped: list[Migration]) -> None:
    by_version = {m.version: m for m in shipped}
    for version, (name, checksum) in sorted(applied.items()):
        mine = by_version.get(version)
        if mine is None:
            raise MigrationError(
                f"the database has migration {version:04d}_{name}, which this version of the "
                "software does not know; it was upgraded by a newer release")
        if mine.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{name} was changed after it was applied "
                "(checksum differs); write a new migration instead of editing an old one")


def status(conn: psycopg.Connection) -> SchemaStatus:
    """Applied and pending versions, checking the applied ones against the shipped files."""
    shipped = shipped_migrations()
    applied = _applied(conn)
    conn.rollback()
    _check_history(applied, shipped)
    return SchemaStatus(
        applied=tuple((m.version, m.name) for m in shipped if m.version in applied),
        pending=tuple((m.version, m.name) for m in shipped if m.version not in applied))


def upgrade(conn: psycopg.Connection) -> list[int]:
    """Apply every pending migration in order; return the versions this call applied.

    *conn* must be in autocommit mode: the advisory lock is held at session level across
    the per-migration transactions.
    """
    if not conn.autocommit:
        raise ValueError("upgrade() needs an autocommit connection")
    encoding = conn.execute("SHOW server_encoding").fetchone()[0]
    if encoding.upper() not in ("UTF8", "UTF-8"):
        raise MigrationError(f"the database encoding is {encoding}; the store needs UTF8")
    shipped = shipped_migrations()
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        conn.execute(_CREATE_TABLE)
        applied = _applied(conn)
        _check_history(applied, shipped)
        done = []
        for migration in shipped:
            if migration.version in applied:
                continue
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) "
                    "VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum))
            done.append(migration.version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
