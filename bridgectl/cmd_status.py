"""``bridgectl status``: the migration at a glance, from the cloud store."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bridgectl import options
from bridgectl.database import connect, current_database, redact_dsn
from bridgectl.errors import EXIT_OK


def add_commands(sub: Any) -> None:
    st = sub.add_parser("status", help="the migration at a glance",
                        description="Accounts per phase, mirror lag, outbox backlog, open "
                                    "findings, reconcile runs, bridge workers, leases and "
                                    "notifications, from the cloud store.")
    options.add_dsn_option(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from bridge.ops import status
    from cloud.db import run_transaction

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        snapshot = run_transaction(conn, "status_gather", status.gather, int(time.time() * 1000))
    snapshot = {"database": origin, "dsn": redact_dsn(dsn), **snapshot}
    print(json.dumps(snapshot, sort_keys=True) if args.json else status.render(snapshot))
    return EXIT_OK
