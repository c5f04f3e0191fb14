"""Waking the outbox injector as soon as a cloud message commits: PostgreSQL's
``LISTEN/NOTIFY`` on ``outbox_to_legacy`` (``cloud.store.messages.post_message`` NOTIFYs in the
message's own transaction). The injector's poll is the fallback for whatever this misses."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from cloud.store import outbox as outbox_store
from servicekit.retry import RetryPolicy

log = Logger()


class OutboxListener(Service):
    """Calls *on_notify* on the reactor thread for every NOTIFY on ``outbox_to_legacy``,
    with its payload (the conversation id ``post_message`` sends; a back-fill sends an
    account id), or with None.

    Payloads that arrive while the reactor has not yet taken the last ones are handed over
    with them, in one call into the reactor thread, each distinct payload once (a post of a
    few messages NOTIFYs once per conversation: at 2,800 posts/s, a call into the reactor
    thread for every one kept the listener busy for 15% of the worker's samples).

    psycopg's ``notifies`` blocks, so a daemon thread holds its own autocommit connection,
    LISTENs and waits at most ``wait_s`` at a time, so that a stop is seen within about that
    long. A broken connection is reopened with the *retry* policy's backoff; *on_notify* is
    also called (with None) each time LISTEN (re)starts, because rows committed while nobody
    listened sent their notifications to no one. The injector's poll covers whatever is
    still missed.
    """

    def __init__(self, reactor: Any, dsn: str, on_notify: Callable[[str | None], object], *,
                 channel: str = outbox_store.OUTBOX_CHANNEL, retry: RetryPolicy | None = None,
                 rng: random.Random | None = None, wait_s: float = 1.0,
                 connect_timeout_s: int = 5, name: str = "outbox-listener") -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._on_notify = on_notify
        self._channel = channel
        self._retry = retry if retry is not None else RetryPolicy(
            initial_s=0.5, factor=2.0, cap_s=30.0, jitter=0.2)
        self._rng = rng if rng is not None else random.Random()
        self._wait_s = wait_s
        self._connect_timeout_s = connect_timeout_s
        self.setName(name)
        self._stop = threading.Event()
        #: payloads received and not yet taken by the reactor thread, under _lock; a call
        #: to _hand_over is on its way while _handing
        self._lock = threading.Lock()
        self._received: list[str | None] = []
        self._handing = False
        self._ended: defer.Deferred | None = None
        self.thread: threading.Thread | None = None
        #: True while LISTEN is active (read from the reactor thread; only a hint).
        self.listening = False
        #: Notifications received and connections (re)opened, for tests and status.
        self.notifications = 0
        self.connects = 0

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._stop.clear()
        self._ended = defer.Deferred()
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        """Fires once the thread has closed its connection and ended (within ~``wait_s``)."""
        super().stopService()
        self._stop.set()
        ended, self._ended = self._ended, None
        return ended if ended is not None else defer.succeed(None)

    def _run(self) -> None:
        ended = self._ended
        failures = 0
        try:
            while not self._stop.is_set():
                connects = self.connects
                try:
                    self._listen()
                except Exception as e:
                    self.listening = False
                    # a connection that was up before it broke starts a new outage
                    failures = 1 if self.connects > connects else failures + 1
                    delay_s = self._retry.delay(failures, self._rng)
                    if failures == 1:
                        log.warn("outbox listener lost its database connection ({error}); "
                                 "reconnecting with backoff, polling covers the gap",
                                 error=str(e).strip() or type(e).__name__)
                    self._stop.wait(delay_s)
        finally:
            self.listening = False
            if ended is not None:
                self._reactor.callFromThread(ended.callback, None)

    def _listen(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True,
                             connect_timeout=self._connect_timeout_s) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self.connects += 1
            self.listening = True
            if self.connects > 1:
                log.info("outbox listener is listening again")
            self._received_payload(None)
            while not self._stop.is_set():
                for notify in conn.notifies(timeout=self._wait_s):
                    self._received_payload(notify.payload)
                    self.notifications += 1  # after: a test that saw it can take the payload

    def _received_payload(self, payload: str | None) -> None:
        """(The listening thread.) Queue *payload* for the reactor thread, and call it over
        unless a call that will take it is already on its way."""
        with self._lock:
            self._received.append(payload)
            if self._handing:
                return
            self._handing = True
        self._reactor.callFromThread(self._hand_over)

    def _hand_over(self) -> None:
        """(The reactor thread.) *on_notify* for each distinct payload received, in order."""
        with self._lock:
            received, self._received = self._received, []
            self._handing = False
        for payload in dict.fromkeys(received):
            try:
                self._on_notify(payload)
            except Exception:  # the others still go, as they did with a call each
                log.failure("the outbox listener's callback failed on {payload!r}",
                            payload=payload)
