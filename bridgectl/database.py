"""Which database a command uses and how it connects: ``--dsn``, ``$BRIDGE_DSN``, or the
embedded server under ``$BRIDGE_HOME``, checked once, with errors an operator can act on."""

from __future__ import annotations

import argparse
import os

import psycopg
from psycopg import conninfo

from bridge import state
from bridgectl.errors import RuntimeFailure, UsageError
from cloud import embedded, schema


def resolve_dsn(args: argparse.Namespace) -> tuple[str, str]:
    """The DSN to use and where it came from: --dsn, $BRIDGE_DSN, or the embedded server."""
    for dsn, origin in ((getattr(args, "dsn", None), "--dsn"),
                        (os.environ.get("BRIDGE_DSN"), "$BRIDGE_DSN")):
        if dsn:
            try:
                conninfo.conninfo_to_dict(dsn)
            except Exception as e:  # psycopg.ProgrammingError: not a DSN at all
                raise UsageError(f"{origin} is not a valid PostgreSQL connection string: "
                                 f"{str(e).strip()}") from None
            return dsn, origin
    home = state.state_home()
    try:
        return embedded.ensure_running(home), f"embedded server in {embedded.data_dir(home)}"
    except embedded.EmbeddedServerError as e:
        raise RuntimeFailure(str(e)) from None


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and status output."""
    params = conninfo.conninfo_to_dict(dsn)
    if "password" in params:
        params["password"] = "***"
    return conninfo.make_conninfo(**params)


def connect(dsn: str, origin: str, *,
            statement_timeout_s: float | None = None) -> psycopg.Connection:
    """An autocommit connection (one transaction per ``run_transaction``), or one line.

    With *statement_timeout_s* every statement (and lock wait) is cut off by the server
    after that long, and TCP keepalives notice a server that vanished, so no wait on this
    connection is unbounded (a cron run's deadline depends on it)."""
    bounds: dict = {}
    if statement_timeout_s is not None:
        ms = max(1, int(statement_timeout_s * 1000))
        bounds = {"options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
                  "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                  "keepalives_count": 3}
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, **bounds)
    except psycopg.OperationalError as e:
        first = (str(e).strip().splitlines() or ["connection failed"])[0]
        raise RuntimeFailure(f"cannot connect to the database ({origin}: "
                             f"{redact_dsn(dsn)}): {first}") from None


def schema_status(dsn: str, origin: str) -> schema.SchemaStatus:
    """The applied and pending schema versions, or one ``RuntimeFailure`` line."""
    with connect(dsn, origin) as conn:
        try:
            return schema.status(conn)
        except schema.MigrationError as e:
            raise RuntimeFailure(str(e)) from None


def require_current_schema(dsn: str, origin: str) -> None:
    """Refuse to run against a schema with pending migrations."""
    st = schema_status(dsn, origin)
    if st.pending:
        versions = ", ".join(f"{v:04d}" for v, _ in st.pending)
        raise RuntimeFailure(f"the database schema is not current (pending {versions}); "
                             "run `bridgectl db upgrade` first")


def current_database(args: argparse.Namespace) -> tuple[str, str]:
    """``resolve_dsn`` plus ``require_current_schema``: what a command that serves needs."""
    dsn, origin = resolve_dsn(args)
    require_current_schema(dsn, origin)
    return dsn, origin
