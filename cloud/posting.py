"""Posting cloud messages under load: many requests' posts, one transaction per batch.

    post() --> queue --> (a writer free?) --> batch of up to max_batch queued posts
                 ^                               |  one:  post_message (one statement)
                 |                               |  more: post_messages (one statement
                 +---- a writer is done ---------+        for all, so one commit)
                       and posts are queued         each post's Deferred fires with its own
                                                    (message, created) or refusal

At most ``writers`` batches are in flight. A post that finds a writer free goes alone at
once, so a quiet API adds no wait; under load the posts that arrive while the writers are
busy form the next batches by themselves. A batch pays one thread hop, one round trip, one
statement's planning and one commit for all its posts: the per-post transaction cost (the
API's measured limit) is shared. A batch that fails as a whole (a statement error, e.g. a
race on a client message id with another transaction) is retried post by post, so one
post's trouble is its own; ``DatabaseUnavailable`` fails the batch's posts at once (the API
answers 503).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from prometheus_client import Histogram
from twisted.internet import defer
from twisted.logger import Logger

from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.model import PHASES
from cloud.store import messages as messages_store
from cloud.store.messages import Post

log = Logger()

POST_BATCH_SIZE = Histogram(
    "cloud_api_post_batch_size", "Posts written per transaction by the API's post batcher.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))


class PostBatcher:
    """Writes posts through *db*, batching those that queue while *writers* are busy.

    Two writers by default: under load, fewer batches in flight make bigger ones, so each
    post costs less CPU in the API and in PostgreSQL for as many posts per second; a quiet
    API still sends each post at once (README, benchmark notes)."""

    def __init__(self, db: TransactionRunner, *, writers: int = 2, max_batch: int = 64,
                 sender_phases: Sequence[str] = PHASES) -> None:
        if writers < 1 or max_batch < 1:
            raise ValueError("writers and max_batch must be at least 1")
        self._db = db
        self._writers = writers
        self._max_batch = max_batch
        self._sender_phases = tuple(sender_phases)
        self._queue: deque[tuple[Post, defer.Deferred]] = deque()
        #: batches being written now
        self.in_flight = 0

    def post(self, post: Post) -> defer.Deferred:
        """Fires with ``(message, created)``, or fails with the post's refusal (as
        ``post_message`` raises it) or ``DatabaseUnavailable``."""
        done: defer.Deferred = defer.Deferred()
        self._queue.append((post, done))
        self._start_batches()
        return done

    def _start_batches(self) -> None:
        while self._queue and self.in_flight < self._writers:
            batch = [self._queue.popleft()
                     for _ in range(min(len(self._queue), self._max_batch))]
            self.in_flight += 1
            POST_BATCH_SIZE.observe(len(batch))
            d = defer.Deferred.fromCoroutine(self._write(batch))
            d.addErrback(lambda f: log.failure("a post batch failed unexpectedly", f))
            d.addBoth(self._written)

    def _written(self, _: object) -> None:
        self.in_flight -= 1
        self._start_batches()

    async def _write(self, batch: list[tuple[Post, defer.Deferred]]) -> None:
        posts = [post for post, _ in batch]
        if len(posts) == 1:
            outcomes = [await self._one(posts[0])]
        else:
            try:
                outcomes = await self._db.run("post_messages", messages_store.post_messages,
                                              posts, sender_phases=self._sender_phases)
            except DatabaseUnavailable as e:
                outcomes = [e] * len(posts)
            except Exception:
                outcomes = [await self._one(post) for post in posts]
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                done.errback(outcome)
            else:
                done.callback(outcome)

    async def _one(self, post: Post) -> object:
        """One post alone: its result, or the exception it raised (as a value)."""
        try:
            return await self._db.run(
                "post_message", messages_store.post_message, post.conversation_id,
                post.sender_account_id, post.client_message_id, post.body, post.now_ms,
                sender_phases=self._sender_phases)
        except Exception as e:
            return e
