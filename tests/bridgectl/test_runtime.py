"""bridgectl.runtime: the service tree starts in order and stops in reverse, one after
another; a listening port is a service; a failed start undoes itself."""

from __future__ import annotations

import pytest
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from bridgectl.runtime import ServiceTree, TCPListener


class Recorded(Service):
    """Records its start and stop in *journal*; its stop fires only when released."""

    def __init__(self, name: str, journal: list[str], *, fail_start: bool = False) -> None:
        self.setName(name)
        self.journal, self.fail_start = journal, fail_start
        self.stopping: defer.Deferred | None = None

    def startService(self) -> None:  # noqa: N802
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")
        super().startService()
        self.journal.append(f"start {self.name}")

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        self.journal.append(f"stop {self.name}")
        self.stopping = defer.Deferred()
        return self.stopping


def tree_of(*services: Service) -> ServiceTree:
    tree = ServiceTree()
    for service in services:
        service.setServiceParent(tree)
    return tree


def test_children_start_in_order_and_stop_in_reverse_one_after_another():
    """The database, added first, starts first and begins to stop only after every other
    child's stop has finished."""
    journal: list[str] = []
    db, worker, port = (Recorded(n, journal) for n in ("db", "worker", "port"))
    tree = tree_of(db, worker, port)
    assert defer.Deferred.fromCoroutine(tree.start()).called
    assert journal == ["start db", "start worker", "start port"]
    stopped = tree.stopService()
    assert journal[3:] == ["stop port"]  # the worker waits for the port's stop
    port.stopping.callback(None)
    assert journal[3:] == ["stop port", "stop worker"]
    worker.stopping.callback(None)
    assert journal[3:] == ["stop port", "stop worker", "stop db"]
    assert not stopped.called
    db.stopping.callback(None)
    assert stopped.called


def test_a_child_that_fails_to_stop_does_not_keep_the_others_running():
    """A failed stop is logged; the children before it still stop."""
    journal: list[str] = []
    db, worker = Recorded("db", journal), Recorded("worker", journal)
    tree = tree_of(db, worker)
    assert defer.Deferred.fromCoroutine(tree.start()).called
    stopped = tree.stopService()
    worker.stopping.errback(RuntimeError("stuck"))
    assert journal[-1] == "stop db"
    db.stopping.callback(None)
    assert stopped.called


def test_a_failed_start_stops_what_started_then_raises():
    """The port is in use (say): the services already started stop again, in reverse, and
    the error comes out only once they have stopped (a database pool still closing would
    otherwise keep the process alive after the reactor stops)."""
    journal: list[str] = []
    db, worker = Recorded("db", journal), Recorded("worker", journal)
    broken = Recorded("port", journal, fail_start=True)
    tree = tree_of(db, worker, broken)
    started = defer.Deferred.fromCoroutine(tree.start())
    assert journal == ["start db", "start worker", "stop worker"]
    assert not started.called  # waits for the stops
    worker.stopping.callback(None)
    assert journal[-1] == "stop db" and not started.called
    db.stopping.callback(None)
    errors: list = []
    started.addErrback(errors.append)
    assert [str(f.value) for f in errors] == ["port cannot start"]
    assert not tree.running


def test_a_listening_port_is_a_service():
    """It listens on start, on the address asked for, and stops listening on stop."""
    reactor = MemoryReactorClock()
    listener = TCPListener(reactor, 4321, Factory.forProtocol(Protocol), interface="127.0.0.1")
    listener.startService()
    [(port, _factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (4321, "127.0.0.1") and listener.running
    listener.stopService()
    assert not listener.running and listener.port is None


def test_a_port_in_use_fails_the_start_at_once():
    """CannotListenError comes out of startService, so the tree can undo its start."""

    class Taken(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):  # noqa: N802
            raise CannotListenError(interface, port, OSError("in use"))

    listener = TCPListener(Taken(), 4321, Factory.forProtocol(Protocol))
    with pytest.raises(CannotListenError):
        listener.startService()
    assert not listener.running
