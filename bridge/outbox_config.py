"""How the outbox injector (``bridge.outbox``) paces itself: claims, the window of
injections in flight, timeouts, retries and giving up."""

from __future__ import annotations

import attrs

from legacy import wire
from servicekit.retry import RetryPolicy
from servicekit.validators import positive

_COUNT = [attrs.validators.instance_of(int), positive]


@attrs.frozen
class InjectorConfig:
    """How the outbox injector paces itself. Times in seconds."""

    #: Most outbox rows claimed by one tick. (1,000 with 4 passes drained a 50,000-row
    #: outbox at 15,380-17,285 msgs/s against 12,821-14,730 with 500 and 2, alternated.)
    batch: int = attrs.field(default=1000, validator=_COUNT)
    #: How long claimed rows stay invisible to other workers; must outlast an injection.
    claim_s: float = attrs.field(default=30.0, converter=float, validator=positive)
    #: Pause between ticks when the last one did not fill a batch (NOTIFY wakes it earlier).
    poll_interval_s: float = attrs.field(default=1.0, converter=float, validator=positive)
    #: A supernode that has not acknowledged an injection by then is treated as unreachable.
    inject_timeout_s: float = attrs.field(default=10.0, converter=float, validator=positive)
    #: Backoff after a failed injection.
    retry: RetryPolicy = attrs.field(
        factory=lambda: RetryPolicy(initial_s=1.0, factor=2.0, cap_s=60.0, jitter=0.2),
        validator=attrs.validators.instance_of(RetryPolicy))
    #: Most rows of one conversation in a claim (a claim spreads over the oldest
    #: conversations; a conversation's rows are injected in seq order).
    per_conversation: int = attrs.field(default=50, validator=_COUNT)
    #: Most injections in flight at once, over all connections (a claim's rows are sent
    #: without waiting for each other's Acks, up to this many). What an operator's
    #: ``bridgectl control set injector-concurrency N`` replaces, live: the load the
    #: injector puts on the legacy network (``passes`` only overlaps database round trips).
    window: int = attrs.field(default=1000, validator=_COUNT)
    #: Most message rows in one InjectBatch request (a conversation's consecutive message
    #: rows share one; the wire format allows ``wire.MAX_INJECT_BATCH``). The window bounds
    #: it too: a batch never holds more rows than ``window``.
    inject_batch: int = attrs.field(default=wire.MAX_INJECT_BATCH, validator=[
        *_COUNT, attrs.validators.le(wire.MAX_INJECT_BATCH)])
    #: Claims in flight at once: the next batch is claimed while the last one is injected
    #: and recorded, so the database's round trips overlap the supernodes' (each claim
    #: holds whole conversations, so order per conversation is kept all the same). With 2,
    #: a drain kept 1.5 of 2 cores busy; 4 gained most of the 25% (6 no more).
    passes: int = attrs.field(default=4, validator=_COUNT)
    #: A row whose injection failed this many times is given up: state ``failed``, with an
    #: ``inject_failed`` finding (its conversation's later rows go on).
    max_attempts: int = attrs.field(default=30, validator=_COUNT)
    #: ... and so is a row whose injection failed once it is older than this.
    max_age_s: float = attrs.field(default=6 * 3600.0, converter=float, validator=positive)
    #: How often the pending rows are counted (for the heartbeat, the metrics and status):
    #: not every tick, where a count over a large backlog would cost more than the claim.
    backlog_every_s: float = attrs.field(default=5.0, converter=float, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.claim_s <= self.inject_timeout_s:
            raise ValueError(f"claim_s ({self.claim_s}) must be longer than inject_timeout_s "
                             f"({self.inject_timeout_s}): a claim must outlast one injection")
