"""The embedded default PostgreSQL: a private server from the ``pgserver`` package.

With no DSN configured, every command uses one server whose data directory is
``<state dir>/pg``. The first caller creates and starts it; later callers, in this process or
in others on the same machine, find it running (pgserver serialises this with a file lock)
and share it. It listens only on a Unix socket in its data directory, so it never collides
with a system server on port 5432. It keeps running after the process that started it exits,
like any database server, until ``bridgectl db stop``.
"""

from __future__ import annotations

import atexit
import logging
import warnings
from pathlib import Path

#: The database our schema lives in, inside the embedded server.
DATABASE = "bridge"


class EmbeddedServerError(Exception):
    """The embedded server could not be started or reached."""


def _pgserver():  # noqa: ANN202 - the module, imported late: it is slow and warns at import
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def data_dir(state_home: Path) -> Path:
    return Path(state_home) / "pg"


def _server(state_home: Path):  # noqa: ANN202 - pgserver.PostgresServer
    home = Path(state_home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        return _pgserver().get_server(data_dir(home), cleanup_mode=None)
    except Exception as e:  # pgserver raises assorted errors; the log file says why
        logfile = data_dir(home) / "log"
        raise EmbeddedServerError(
            f"could not start the embedded PostgreSQL in {data_dir(home)}: {e} "
            f"(its log: {logfile})") from e


def ensure_running(state_home: Path) -> str:
    """Start the embedded server if needed, create our database, return its DSN."""
    server = _server(state_home)
    admin_dsn = server.get_uri("postgres")
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            try:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it between our check and our CREATE
    return server.get_uri(DATABASE)


def admin_dsn(state_home: Path) -> str:
    """DSN of the embedded server's maintenance database (for creating test databases)."""
    return _server(state_home).get_uri("postgres")


def is_running(state_home: Path) -> bool:
    """True if the embedded server under *state_home* is up (never starts it)."""
    pid_file = data_dir(state_home) / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except ValueError:
        return False
    import psutil

    return psutil.pid_exists(pid)


def stop(state_home: Path) -> bool:
    """Stop the embedded server if it runs; True if it was running."""
    if not is_running(state_home):
        return False
    pgserver = _pgserver()
    from pgserver._commands import pg_ctl

    server = pgserver.get_server(data_dir(state_home), cleanup_mode=None)
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir(state_home), user=server.system_user)
    # Forget our handle, so pgserver's exit hook does not try to clean up a stopped server.
    atexit.unregister(server._cleanup)
    pgserver.PostgresServer._instances.pop(server.pgdata, None)
    return True
