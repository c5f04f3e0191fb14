"""The API's post batcher against a real PostgreSQL: posts that queue while the writers are
busy go out together in one transaction, each gets its own answer, and a batch that fails as
a whole is retried post by post."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from cloud.db import DatabaseUnavailable, InlineDatabase
from cloud.posting import PostBatcher
from cloud.store import messages as messages_store
from cloud.store.errors import NotMember
from cloud.store.messages import Post
from tests.cloud.store.storefixture import NOW, table_rows
from tests.dbfixture import make_account, make_conversation

_CASE = SynchronousTestCase()


class HeldDatabase:
    """A TransactionRunner whose transactions wait until the test lets them run, and that
    can fail the next batch as a whole."""

    def __init__(self, inner: InlineDatabase) -> None:
        self.inner = inner
        self.held: list[tuple[str, defer.Deferred]] = []
        self.fail_next_batch: Exception | None = None

    def run(self, desc: str, fn: Callable, *args, **kwargs) -> defer.Deferred:
        gate: defer.Deferred = defer.Deferred()
        self.held.append((desc, gate))

        def go(_: object) -> defer.Deferred:
            if fn is messages_store.post_messages and self.fail_next_batch is not None:
                error, self.fail_next_batch = self.fail_next_batch, None
                return defer.fail(error)
            return self.inner.run(desc, fn, *args, **kwargs)
        return gate.addCallback(go)

    def release_all(self) -> None:
        """Let the transactions held now run (those they lead to are held in turn)."""
        held, self.held = self.held, []
        for _, gate in held:
            gate.callback(None)


@pytest.fixture
def scene(conn):
    a, b, c = make_account(conn, "alice"), make_account(conn, "bob"), make_account(conn, "cy")
    return conn, a, b, c, make_conversation(conn, a, b)


def test_posts_queued_behind_busy_writers_are_written_together(scene):
    """With its one writer busy, three posts queue and go out as one batch; each gets its
    own answer, in seq order, and a non-member's post its own refusal."""
    conn, a, b, c, cid = scene
    db = HeldDatabase(InlineDatabase(conn))
    batcher = PostBatcher(db, writers=1)
    first = batcher.post(Post(cid, a, "c-1", "alone", NOW))
    queued = [batcher.post(Post(cid, b, "c-2", "x", NOW)),
              batcher.post(Post(cid, c, "c-3", "outsider", NOW)),
              batcher.post(Post(cid, a, "c-4", "y", NOW))]
    assert [desc for desc, _ in db.held] == ["post_message"]  # the rest wait for the writer
    db.release_all()  # the first post is written; the queue goes out as one batch
    assert [desc for desc, _ in db.held] == ["post_messages"]
    db.release_all()
    assert _CASE.successResultOf(first)[0].seq == 1
    assert [_CASE.successResultOf(queued[i])[0].seq for i in (0, 2)] == [2, 3]
    _CASE.failureResultOf(queued[1], NotMember)
    assert batcher.in_flight == 0 and table_rows(conn, "messages") == 3


def test_a_batch_that_fails_as_a_whole_is_retried_post_by_post(scene):
    """A statement error in a batch (e.g. a client-id race) costs its posts nothing: each
    is written alone."""
    conn, a, b, _, cid = scene
    db = HeldDatabase(InlineDatabase(conn))
    db.fail_next_batch = psycopg.errors.UniqueViolation("a racing duplicate")
    batcher = PostBatcher(db, writers=1)
    posts = [batcher.post(Post(cid, a if i % 2 else b, f"c-{i}", "x", NOW)) for i in range(4)]
    while db.held:
        db.release_all()
    assert db.fail_next_batch is None  # the batch was tried, and failed
    assert sorted(_CASE.successResultOf(p)[0].seq for p in posts) == [1, 2, 3, 4]
    assert table_rows(conn, "messages") == 4


def test_an_unreachable_database_fails_the_batchs_posts_at_once(scene):
    """DatabaseUnavailable is every post's answer (the API's 503), not a retry per post."""
    conn, a, b, _, cid = scene
    db = HeldDatabase(InlineDatabase(conn))
    db.fail_next_batch = DatabaseUnavailable("connection refused")
    batcher = PostBatcher(db, writers=1)
    first = batcher.post(Post(cid, a, "c-0", "x", NOW))
    posts = [batcher.post(Post(cid, b, f"c-{i}", "x", NOW)) for i in range(1, 3)]
    db.release_all()
    db.release_all()
    _CASE.successResultOf(first)
    for p in posts:
        _CASE.failureResultOf(p, DatabaseUnavailable)
    assert not db.held and table_rows(conn, "messages") == 1


def test_the_batcher_refuses_a_configuration_that_could_never_write():
    """No writers, or batches of nothing: ValueError at construction."""
    for bad in ({"writers": 0}, {"max_batch": 0}):
        with pytest.raises(ValueError):
            PostBatcher(InlineDatabase.__new__(InlineDatabase), **bad)
