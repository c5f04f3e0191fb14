"""bridgectl accounts recovery-code: prints the code once (text and --json), stores only its
hash with the expiry, audits it, replaces an earlier code; an unknown handle or a bad --ttl
is a usage error that writes nothing; --dry-run writes nothing."""

from __future__ import annotations

import json
import re
import time

import pytest

from bridgectl import main as cli
from cloud import recovery
from cloud.store import recovery as recovery_store
from tests.bridge.test_phases import audit_rows, make_account
from tests.bridgectl.test_cli_migrate import home  # noqa: F401 (fixture)
from tests.dbfixture import tx

CODE_RE = re.compile(r"[2-9A-HJKMNP-Z]{4}-[2-9A-HJKMNP-Z]{4}-[2-9A-HJKMNP-Z]{4}")


def issue(db_dsn: str, *argv: str) -> int:
    return cli.main(["accounts", "recovery-code", *argv, "--dsn", db_dsn,
                     "--actor", "ops-dana"])


def codes(conn) -> list[tuple]:
    return conn.execute("SELECT account_id, code_hash, expires_ms, used_ms "
                        "FROM recovery_codes").fetchall()


def test_the_code_is_printed_once_and_stored_hashed(conn, db_dsn, home, capsys):  # noqa: F811
    alice = make_account(conn, "alice", "dual")
    before = int(time.time() * 1000)
    assert issue(db_dsn, "alice") == cli.EXIT_OK
    out = capsys.readouterr().out
    shown = CODE_RE.findall(out)
    assert len(shown) == 1 and f"recovery code for alice (account {alice})" in out
    assert "valid 3600 s" in out and "POST /v1/recover" in out
    [(account_id, code_hash, expires_ms, used_ms)] = codes(conn)
    assert account_id == alice and used_ms is None
    assert shown[0] not in code_hash and recovery.verify_code(shown[0], code_hash)
    assert before + 3_600_000 <= expires_ms <= int(time.time() * 1000) + 3_600_000
    [(actor, action, subject, detail, _at)] = audit_rows(conn)
    assert (actor, action, subject) == ("ops-dana", "recovery_code_issued", str(alice))
    assert shown[0] not in json.dumps(detail)  # the audit log never holds the code


def test_json_and_a_second_code_replaces_the_first(conn, db_dsn, home, capsys):  # noqa: F811
    alice = make_account(conn, "alice", "dual")
    assert issue(db_dsn, "alice", "--json", "--ttl", "30m") == cli.EXIT_OK
    first = json.loads(capsys.readouterr().out)
    assert first["account_id"] == str(alice) and CODE_RE.fullmatch(first["code"])
    assert (first["ttl_s"], first["replaced_unused"], first["changed"]) == (1800, False, True)
    assert issue(db_dsn, "alice", "--json") == cli.EXIT_OK
    second = json.loads(capsys.readouterr().out)
    assert second["replaced_unused"] is True and second["code"] != first["code"]
    row = tx(conn, recovery_store.code_for_handle, "alice")
    assert recovery.verify_code(second["code"], row.code_hash)
    assert not recovery.verify_code(first["code"], row.code_hash)


def test_an_unknown_handle_or_a_bad_ttl_is_a_usage_error(conn, db_dsn, home,  # noqa: F811
                                                          capsys):
    make_account(conn, "alice", "dual")
    assert issue(db_dsn, "nobody") == cli.EXIT_USAGE
    assert "unknown account: 'nobody'" in capsys.readouterr().err
    assert issue(db_dsn, "nobody", "--dry-run") == cli.EXIT_USAGE
    assert issue(db_dsn, "alice", "--ttl", "8d") == cli.EXIT_USAGE
    assert "--ttl must be at most 7 days" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        issue(db_dsn, "alice", "--ttl=-5m")
    assert exc.value.code == cli.EXIT_USAGE
    assert codes(conn) == [] and audit_rows(conn) == []


def test_dry_run_writes_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    alice = make_account(conn, "alice", "dual")
    assert issue(db_dsn, "alice", "--dry-run") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"would issue a recovery code for alice (account {alice})" in out
    assert not CODE_RE.search(out)
    assert issue(db_dsn, "alice", "--dry-run", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert (got["code"], got["dry_run"], got["changed"]) == (None, True, False)
    assert codes(conn) == [] and audit_rows(conn) == []
