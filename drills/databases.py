"""The drills' own databases: created afresh and migrated for a run, dropped after it. Only
names that start with ``bridge_demo``, ``bridge_chaos`` or ``bridge_sim`` are ever touched."""

from __future__ import annotations

import re

import psycopg

from drills.processes import DemoError


def fresh_database(server_dsn: str, name: str) -> str:
    """Drop and create database *name* on the server of *server_dsn*, migrate it, and
    return its DSN. Only names starting with ``bridge_demo``, ``bridge_chaos`` or
    ``bridge_sim``: nothing else on the server is ever touched."""
    from psycopg import conninfo, sql

    from cloud import schema

    try:
        drop_database(server_dsn, name)
        with psycopg.connect(server_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = conninfo.make_conninfo(server_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            schema.upgrade(conn)
    except psycopg.Error as e:
        first = (str(e).strip().splitlines() or ["failed"])[0]
        raise DemoError(f"cannot create the database {name}: {first}") from None
    return dsn


def drop_database(server_dsn: str, name: str) -> None:
    """Drop a database ``fresh_database`` made (same name rule)."""
    from psycopg import sql

    if not re.fullmatch(r"bridge_(demo|chaos|sim)[a-z0-9_]{0,50}", name):
        raise DemoError(f"refusing to drop or recreate database {name!r}")
    with psycopg.connect(server_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
