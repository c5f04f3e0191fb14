"""``bridgectl db upgrade|status|dsn|stop``: the cloud store's database and its schema."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bridge import state
from bridgectl import options
from bridgectl.database import connect, redact_dsn, resolve_dsn, schema_status
from bridgectl.errors import EXIT_OK, RuntimeFailure


def add_commands(sub: Any) -> None:
    dsub = options.add_group(
        sub, "db", help="the cloud store's database",
        description="Manage the cloud store's PostgreSQL database. Without --dsn or "
                    "$BRIDGE_DSN, commands use the embedded server under $BRIDGE_HOME (default "
                    "./.bridge), starting it when needed.")
    for name, text, handler in (
            ("upgrade", "apply pending schema migrations (safe to run twice)", cmd_db_upgrade),
            ("status", "show applied and pending schema versions", cmd_db_status),
            ("dsn", "print the DSN in use, so other tools can connect", cmd_db_dsn),
            ("stop", "stop the embedded server (if it runs)", cmd_db_stop)):
        sp = dsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name != "stop":
            options.add_dsn_option(sp)
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(handler=handler)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from cloud import schema

    dsn, origin = resolve_dsn(args)
    with connect(dsn, origin) as conn:
        try:
            done = schema.upgrade(conn)
            current = schema.status(conn).current
        except schema.MigrationError as e:
            raise RuntimeFailure(str(e)) from None
    if done:
        print(f"applied {', '.join(f'{v:04d}' for v in done)}; schema at {current:04d}")
    else:
        print(f"schema at {current:04d}; nothing to apply")
    return EXIT_OK


def cmd_db_status(args: argparse.Namespace) -> int:
    dsn, origin = resolve_dsn(args)
    st = schema_status(dsn, origin)
    if args.json:
        print(json.dumps({
            "database": origin, "dsn": redact_dsn(dsn), "current": st.current,
            "applied": [{"version": v, "name": n} for v, n in st.applied],
            "pending": [{"version": v, "name": n} for v, n in st.pending]}, sort_keys=True))
        return EXIT_OK
    print(f"database: {origin}")
    print(f"schema:   {st.current:04d}" + (" (empty)" if not st.applied else ""))
    for v, n in st.applied:
        print(f"  applied  {v:04d}_{n}")
    for v, n in st.pending:
        print(f"  pending  {v:04d}_{n}")
    if st.pending:
        print("run `bridgectl db upgrade` to apply the pending versions")
    return EXIT_OK


def cmd_db_dsn(args: argparse.Namespace) -> int:
    dsn, _origin = resolve_dsn(args)
    print(dsn)
    return EXIT_OK


def cmd_db_stop(args: argparse.Namespace) -> int:
    from cloud import embedded

    home = state.state_home()
    if embedded.stop(home):
        print(f"stopped the embedded server in {embedded.data_dir(home)}")
    else:
        print(f"no embedded server runs in {embedded.data_dir(home)}")
    return EXIT_OK
