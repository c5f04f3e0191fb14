"""Account recovery across both stacks: a password recovered on the cloud API reaches the
legacy login server through the bridge's credential delivery (in-memory legacy network,
real PostgreSQL), the old password is refused on both stacks, and nothing is lost when the
login server is unreachable or the delivering worker dies."""

from __future__ import annotations

import json
import random

from twisted.internet import defer

from bridge import ids
from bridge.accounts import import_accounts
from bridge.credentials import CredentialDelivery, deliver_once
from cloud import recovery
from cloud.api import CloudAPI
from cloud.db import InlineDatabase
from cloud.passwords import hash_password
from cloud.push import NotificationChannel
from cloud.store import accounts as accounts_store
from cloud.store import recovery as recovery_store
from legacy import wire
from legacy.client import UserAccount
from legacy.peer import connect_peer
from tests.bridge.test_worker import make_worker
from tests.cloud.test_api import SECRET, Connection, Harness, raw_request
from tests.dbfixture import tx
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet

CODE = "K7QM-3XWD-PN8A"
NEW = "correct horse battery"


def now_ms(net: LegacyNet) -> int:
    return int(net.clock.seconds() * 1000)


def both_stacks(conn) -> tuple[LegacyNet, Harness, UserAccount]:
    """A legacy network with alice, her account imported and in phase dual, a cloud API on
    the network's clock, and a recovery code issued for her."""
    net = LegacyNet(2).start()
    alice = net.add_user("alice")
    db = InlineDatabase(conn)
    net.wait(defer.Deferred.fromCoroutine(import_accounts(net.login_peer(), db, now_ms(net))))
    tx(conn, accounts_store.set_phase, ids.account_id("alice"), "dual")
    channel = NotificationChannel(net.clock)
    api = CloudAPI(db, net.clock, channel, SECRET,
                   password_hash=lambda p: defer.succeed(hash_password(p, iterations=10)))
    tx(conn, recovery_store.issue_code, "alice", recovery.hash_code(CODE, iterations=10),
       now_ms=now_ms(net), expires_ms=now_ms(net) + 3_600_000, actor="ops")
    return net, Harness(conn, net.clock, channel, api, api.site()), alice


def post(h: Harness, path: str, body: dict) -> int:
    c = Connection(h.site)
    c.send(raw_request(b"POST", path.encode(), body=json.dumps(body).encode()))
    return c.response().status


def cloud_login(h: Harness, password: str) -> int:
    return post(h, "/v1/login", {"handle": "alice", "password": password})


def legacy_login(net: LegacyNet, password: str) -> object:
    result = net.login.login("alice", password)
    return "ok" if isinstance(result, wire.Credential) else result[0]


def delivery(net: LegacyNet, conn, port: int | None = None) -> CredentialDelivery:
    return CredentialDelivery(
        net.clock, InlineDatabase(conn),
        lambda: connect_peer(net.net, HOST, port or net.login_port, name="bridge",
                             secret=PEER_SECRET, timeout=2.0, request_timeout=2.0),
        random.Random(1), poll_interval_s=1.0)


def credential(conn) -> dict:
    return tx(conn, recovery_store.credential_state, ids.account_id("alice"))


def test_a_recovered_password_works_on_both_stacks_and_the_old_on_neither(conn):
    net, h, alice = both_stacks(conn)
    assert post(h, "/v1/recover", {"handle": "alice", "code": CODE,
                                   "new_password": NEW}) == 200
    assert cloud_login(h, NEW) == 200 and cloud_login(h, alice.password) == 401
    loop = delivery(net, conn)
    loop.startService()
    net.run(3)
    assert credential(conn)["state"] == "delivered"
    assert legacy_login(net, NEW) == "ok"
    assert legacy_login(net, alice.password) == "bad_login"
    # a legacy client logs in with the new password and attaches to a supernode
    device = net.device(UserAccount("alice", NEW))
    net.online(device)
    # the next account import (the worker's sync) reads the new hash: nothing reverts
    counts = net.wait(defer.Deferred.fromCoroutine(import_accounts(
        net.login_peer(), InlineDatabase(conn), now_ms(net))))
    assert counts.updated == 0
    assert cloud_login(h, NEW) == 200 and cloud_login(h, alice.password) == 401
    net.wait(loop.stopService())


def test_an_unreachable_login_server_is_retried_until_it_answers(conn):
    """Delivery through a port nobody listens on fails, backs off and keeps the row pending
    (the account import meanwhile keeps the recovered password); a later loop delivers it."""
    net, h, alice = both_stacks(conn)
    assert post(h, "/v1/recover", {"handle": "alice", "code": CODE,
                                   "new_password": NEW}) == 200
    link = net.login_peer()
    link.transport.loseConnection()  # a link that is gone: the request fails
    net.run(0.1)
    counts = net.wait(defer.Deferred.fromCoroutine(deliver_once(
        link, InlineDatabase(conn), now_ms(net), random.Random(1))))
    assert counts == {"delivered": 0, "skipped": 0, "failed": 1}
    state = credential(conn)
    assert state["state"] == "pending" and state["attempts"] == 1 and state["last_error"]
    assert legacy_login(net, alice.password) == "ok"  # legacy has not heard yet
    net.wait(defer.Deferred.fromCoroutine(import_accounts(
        net.login_peer(), InlineDatabase(conn), now_ms(net))))
    assert cloud_login(h, NEW) == 200  # the stale legacy hash did not come back
    # a worker that died (the loop never ran) loses nothing: another delivers after backoff
    loop = delivery(net, conn)
    loop.startService()
    net.run(10)
    assert credential(conn)["state"] == "delivered"
    assert legacy_login(net, NEW) == "ok" and legacy_login(net, alice.password) == "bad_login"
    net.wait(loop.stopService())


def test_a_handle_the_login_server_does_not_have_is_skipped(conn):
    net, h, _alice = both_stacks(conn)
    assert post(h, "/v1/recover", {"handle": "alice", "code": CODE,
                                   "new_password": NEW}) == 200
    del net.login.accounts["alice"]
    loop = delivery(net, conn)
    loop.startService()
    net.run(3)
    state = credential(conn)
    assert state["state"] == "skipped" and "no such handle" in state["last_error"]
    assert cloud_login(h, NEW) == 200
    net.wait(loop.stopService())


def test_a_bridge_worker_delivers_recovered_passwords(conn):
    """The worker runs the delivery loop: a recovery stored while it runs reaches the login
    server within a few seconds, and its periodic account sync does not undo it."""
    net, h, alice = both_stacks(conn)
    worker = make_worker(net, conn)
    worker.startService()
    net.run(3)
    assert post(h, "/v1/recover", {"handle": "alice", "code": CODE,
                                   "new_password": NEW}) == 200
    net.run(5)
    assert credential(conn)["state"] == "delivered"
    assert legacy_login(net, NEW) == "ok" and legacy_login(net, alice.password) == "bad_login"
    net.run(worker.config.accounts_sync_s + 1)  # one more account sync
    assert cloud_login(h, NEW) == 200 and cloud_login(h, alice.password) == 401
    net.wait(worker.stopService())
