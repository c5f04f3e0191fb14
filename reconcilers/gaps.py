"""The gaps reconciler: find and repair messages one stack has and the other lacks.

For each conversation with a legacy chat (on either side), over ``[since, watermark)``::

    root digest, legacy (home supernode) vs cloud (SQL)  -- equal: done, nothing moved
      differ and the range is hot  -> split the time window in halves, compare each
      differ                       -> 16 children by the next 4 GUID-hash bits, compare each
        child small or 32 bits deep -> list its GUIDs on both sides: the difference is
                                       the suspects (missing in cloud / missing in legacy)
        child still large           -> descend into it
    second look at the suspects a moment later (in-flight mirroring is not a finding)
    repair: missing in cloud  -> fetch from legacy, write through the bridge's idempotent path
            missing in legacy -> inject from the cloud (members still on legacy clients only)
    each repaired (or failed) conversation: a reconcile_findings row and an audit_log row

Only digests travel for ranges that agree, so the data moved grows with the difference, not
with the history: with k differences among N messages, O(k log N) GUIDs are listed and
exactly the k missing messages are fetched. The watermark (now minus the bridge's measured
lag minus a margin) keeps messages still in flight out of the comparison.

Which conversations a pass compares (Riak's active anti-entropy: both sides keep their
digests current as they write, so an exchange reads roots). By default the dirty set
(``digest_dirty``, kept by the store's triggers: conversations whose cloud messages changed
since a compare last found them equal, and those never compared), the conversations homed at
supernodes with open feed gaps or whose epoch changed since the last complete pass (the
legacy side's own losses: a restart loses a supernode's memory and its tree), those an
earlier run left to retry, and the chats a supernode lists that the cloud store does not
know. A conversation in none of these was compared equal and neither side has changed it
since (a legacy change reaches the cloud through the bridge, which writes it, or is a feed
gap or a restart), so it is not compared again: an in-sync pass costs what changed, not the
history. A root is read from the
maintained slots on the cloud side (``digests_store.window_root``) and the home supernode's
tree on the legacy side. ``--full-sweep`` (``GapsConfig.full_sweep``) compares every
conversation, for audits; a targeted run compares its whole scope. A pass that went through
everything it had to compare without a failure, an uncovered supernode or a dry run vouches
for the conversations it skipped (``digests_store.record_clean_through``).

Conversations homed at supernodes with open ``feed_gap`` findings go first; a completed pass
closes those whose losses its window reached: ``repaired`` when the pass could compare what was
lost (entries out of a live feed's buffer), ``unrecoverable`` when it died with the
supernode's memory (an old epoch's tail).

Partial runs: a supernode that can not list its chats at the start, or whose link fails
(refused, lost, timed out) while the pass runs, is *lost* for the rest of the run: its
conversations are not compared (no reconnect-and-wait per chat), they are named in
``detail.uncovered`` and counted in ``report.uncovered``, and the run exits 3. They stay in
``progress["retry"]`` with the conversations whose differences were found but not yet
repaired, so a run the deadline stops is resumed with those first, then after the last
conversation it finished: nothing is skipped.

The window never reaches past the legacy retention (less a margin): history a supernode is
about to drop would look missing there, and its re-injection would be refused as too old.
The floor is taken again by every run (a resumed pass too), and a message that aged past it
between the looks is not re-injected.

Each conversation compared equal is written down as it goes (``record_clean_compares``):
its ``last_clean_reconcile_ms`` becomes the pass's watermark, and its earlier open or failed
repair findings within the window are repaired. The migration gate asks this of every
conversation of a cohort, so a run that stopped at its deadline, or resumed and compared only
the tail, vouches for the conversations it compared and no others. A conversation repaired
in this pass is vouched for by the next one.

A targeted run (``scope``, ``reconcilers.gaps_scope``: one account's conversations, or one)
runs the same pass over its conversations only. It writes down what it compared clean and
repairs what differs as a full pass does, but it closes no feed gap (it did not compare
every conversation homed at the supernode), and its run row keeps its own resume cursor.

The pass counts its conversations (``ctx.count``: done of total, across the runs of a
resumed pass), which is what ``status`` and the metrics show as its progress and ETA.

The module is long (about 700 lines) because its SQL transactions (each a function, safe
to run twice) sit beside the pass that runs them, as the other reconcilers' do.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import psycopg
from psycopg.types.json import Jsonb
from twisted.internet import defer, error, task
from twisted.logger import Logger

from bridge import ids
from bridge.mirror import LegacyChanges, mirror_changes
from cloud import admin
from cloud.db import TransactionRunner
from cloud.model import Digest
from cloud.store import audit as audit_store
from cloud.store import conversations as conversations_store
from cloud.store import digests as digests_store
from cloud.store.conversations import SNAPSHOT
from legacy import wire
from legacy.peer import PeerConnection
from reconcilers.feed_gaps import close_gap_findings, open_gap_sources
from reconcilers.gaps_scope import GapsScope, cloud_chats
from reconcilers.runner import RunContext, RunCutOff

log = Logger()

#: Origin mark of messages the reconciler injects (never mirrored back by the bridge).
ORIGIN = "reconciler"
SPLIT_BITS = 4
LIST_LIMIT = 400          # a supernode lists at most this many GUIDs per request
#: How many conversation ids ``detail.uncovered`` names per supernode (the count is exact).
UNCOVERED_NAMED = 200

#: A failure of the link to a supernode (not of the reconciler): refused, lost, timed out.
LINK_ERRORS = (error.ConnectError, error.ConnectionClosed, defer.TimeoutError, ConnectionError)
#: The run was cut off at its deadline (``reconcilers.runner``): stop, do not count it.
CUT_OFF = (defer.CancelledError, RunCutOff)
REPAIRED_NAMED = 100      # conversations a closed feed gap names at most
#: conversations whose cloud roots one transaction reads ahead of their compare
ROOTS_AHEAD = 200


class LegacyHistory(Protocol):
    """What the reconciler needs from the legacy side (``bridge.discovery.SupernodeLinks``)."""

    ring: Any
    directory: dict

    async def peer(self, sn_id: str) -> PeerConnection: ...

    async def for_chat(self, chat_id: str) -> PeerConnection: ...


#: How long a legacy supernode keeps history (``SupernodeConfig.retention_seconds``).
LEGACY_RETENTION_MS = 30 * 86400 * 1000
#: The window ends this far inside the retention: longer than a run (and a resumed pass's
#: next run takes the floor again), and than any skew between the clocks.
RETENTION_MARGIN_MS = 3600 * 1000


@attrs.frozen
class GapsConfig:
    since_ms: int = 30 * 86400 * 1000    # how far back to compare (within the retention)
    margin_ms: int = 10_000              # below the watermark beyond the measured lag
    #: compare only what is younger than the legacy retention less this margin
    legacy_retention_ms: int = LEGACY_RETENTION_MS
    retention_margin_ms: int = RETENTION_MARGIN_MS
    lag_ms: int | None = None            # use this instead of the workers' measured lag
    list_at: int = 64                    # list a range's GUIDs at or below this many messages
    hot_range: int = 20_000              # split a time window holding more than this
    confirm_after_s: float = 1.0         # the second look
    fetch_batch: int = 200
    #: with a deadline, stop comparing this long (at most a quarter of the run's time), plus
    #: the second look's delay, before it, so the repairs of what was found still fit
    repair_reserve_s: float = 15.0
    #: confirm and repair after this many conversations with differences (a round), so a
    #: run cut by its deadline keeps the repairs of its earlier rounds
    confirm_every: int = 50
    #: compare every conversation, not only the dirty set (see the module docstring)
    full_sweep: bool = False

    def __attrs_post_init__(self) -> None:
        if self.since_ms <= 0:
            raise ValueError("--since must be positive")
        if self.margin_ms < 0:
            raise ValueError("--margin must not be negative")
        if self.legacy_retention_ms <= 0:
            raise ValueError("--legacy-retention must be positive")
        if not 0 <= self.retention_margin_ms < self.legacy_retention_ms:
            raise ValueError("--retention-margin must not be negative and must be shorter "
                             "than --legacy-retention")

    def retention_floor_ms(self, now_ms: int) -> int:
        """The oldest moment a comparison (or a re-injection) may reach back to at *now_ms*:
        the legacy retention less the margin. Legacy drops what is older, and refuses to
        take it again."""
        return now_ms - self.legacy_retention_ms + self.retention_margin_ms


@attrs.define
class Counters:
    digest_requests: int = 0
    listed_guids: int = 0
    fetched_messages: int = 0
    messages_covered: int = 0
    #: stored rows (maintained slots and messages) the cloud side summed for its digests
    digest_rows_read: int = 0


@attrs.define
class ChatDiff:
    chat_id: str
    conversation_id: uuid.UUID
    missing_in_cloud: set[str] = attrs.Factory(set)
    missing_in_legacy: set[str] = attrs.Factory(set)


def _digest_pair(legacy: Any, cloud: Digest) -> bool:
    return legacy.count == cloud.count and legacy.total % (1 << 64) == cloud.total


def lag_ms(conn: psycopg.Connection, now_ms: int) -> int:
    """The worst lag live bridge workers report (0 when none report one)."""
    return max((max(w.lag_to_cloud_ms or 0, w.lag_to_legacy_ms or 0)
                for w in admin.live_workers(conn, now_ms)), default=0)


#: Finding kinds of this reconciler's own repairs: a later clean compare answers them.
REPAIR_KINDS = ("missing_in_cloud", "missing_in_legacy")


def record_clean_compares(conn: psycopg.Connection, conversation_ids: Sequence[uuid.UUID],
                          watermark_ms: int, since_ms: int, run_id: int | None,
                          now_ms: int, dirty: dict[uuid.UUID, int] | None = None) -> int:
    """These conversations were compared and found equal on both stacks over
    ``[since_ms, watermark_ms)``: their ``last_clean_reconcile_ms`` moves up to the
    watermark (what the migration gate asks of a cohort's conversations), they leave the
    dirty set if no write changed them since the pass read its versions (*dirty*), and
    their open or failed repair findings made within that window are repaired (the
    divergence is gone). Returns how many findings that closed."""
    if not conversation_ids:
        return 0
    ids_ = list(conversation_ids)
    conn.execute(
        "UPDATE conversations SET last_clean_reconcile_ms = "
        "greatest(coalesce(last_clean_reconcile_ms, 0), %s) WHERE conversation_id = ANY(%s)",
        (watermark_ms, ids_))
    if dirty:  # after the conversations, as every writer locks them before their digests
        digests_store.clear_dirty(conn, {c: dirty[c] for c in ids_ if c in dirty},
                                  watermark_ms)
    return conn.execute(
        "UPDATE reconcile_findings SET state = 'repaired', resolved_ms = %s, "
        "detail = detail || jsonb_build_object('resolved_by_run', %s::bigint, "
        "'was', state) "
        "WHERE conversation_id = ANY(%s) AND kind = ANY(%s) AND state IN ('open', 'failed') "
        "AND created_ms >= %s AND created_ms < %s",
        (now_ms, run_id, ids_, list(REPAIR_KINDS), since_ms, watermark_ms)).rowcount


def record_repair(conn: psycopg.Connection, run_id: int | None, kind: str, state: str,
                  conversation_id: uuid.UUID, detail: dict, now_ms: int) -> None:
    """One finding (already repaired, or failed) and its audit row, in one transaction."""
    conn.execute(
        "INSERT INTO reconcile_findings (run_id, kind, state, conversation_id, detail, "
        "created_ms, resolved_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (run_id, kind, state, conversation_id, Jsonb(detail), now_ms,
         now_ms if state == "repaired" else None))
    audit_store.record(conn, f"repair_{kind}" if state == "repaired" else f"repair_{kind}_failed",
                       str(conversation_id), actor="reconciler", now_ms=now_ms, detail=detail)


@attrs.frozen
class CloudRepair:
    """A chat's messages that the second look confirmed missing in the cloud."""

    diff: ChatDiff
    #: the chat's member list as its home supernode listed it (None: not listed)
    members: tuple[str, ...] | None
    messages: tuple[wire.ChatMessage, ...]

    def detail(self) -> dict:
        """The finding's detail."""
        return {"chat_id": self.diff.chat_id, "count": len(self.messages),
                "guids": sorted(m.guid for m in self.messages)[:50]}


def repair_in_cloud(conn: psycopg.Connection, repairs: Sequence[CloudRepair], now_ms: int,
                    run_id: int | None) -> list[int]:
    """Write the chats' missing messages through the mirror path and record a finding per
    chat, in one transaction (a repair is never committed without its finding); how many
    messages of each the store now has (written, or there already; the rest it refused,
    e.g. a body it can not hold)."""
    # A list read now may be older than one the follower has mirrored since: it only seeds
    # a chat that has no list yet, it never changes members.
    chats = {r.diff.chat_id: ((r.members, SNAPSHOT),) for r in repairs if r.members}
    messages = sorted((m for r in repairs for m in r.messages),
                      key=lambda m: (m.chat_id, m.legacy_seq))
    outcome = mirror_changes(conn, LegacyChanges(chats, messages), now_ms)
    refused = collections.Counter(f.conversation_id for f in outcome.refused)
    inserted = collections.Counter(m.conversation_id for m in outcome.result.inserted)
    resolved = []
    for r in repairs:
        cid = r.diff.conversation_id
        n = len(r.messages) - refused[cid]
        record_repair(conn, run_id, "missing_in_cloud",
                      "repaired" if n == len(r.messages) else "failed", cid,
                      {**r.detail(), "inserted": inserted[cid]}, now_ms)
        resolved.append(n)
    return resolved


@attrs.frozen
class SecondLook:
    """What the store holds of a chat's differences, for the second look."""

    #: of the GUIDs missing in the cloud, those it still lacks
    still_missing: frozenset[str]
    #: the members' legacy-side handles, and how many still have legacy clients
    handles: tuple[str, ...]
    legacy_clients: int
    #: ``messages_by_guid``'s rows of the GUIDs missing in legacy (guid, sender, sent_ms,
    #: body); the second look keeps those legacy still lacks
    stored: tuple[tuple, ...]
    #: of the GUIDs missing in legacy, those the outbox holds (pending: in flight) or ended
    #: unsent (skipped, failed: its own finding): the injector's, not repaired here
    left_to_outbox: int = 0


def second_look_rows(conn: psycopg.Connection, diffs: Sequence[ChatDiff]
                     ) -> dict[uuid.UUID, SecondLook]:
    """The store's side of a round's second look, for every chat of it, in one
    transaction."""
    looks = {}
    for d in diffs:
        still = (missing_guids(conn, d.conversation_id, sorted(d.missing_in_cloud))
                 if d.missing_in_cloud else set())
        handles: tuple[str, ...] = ()
        legacy_clients, rows, left = 0, [], 0
        if d.missing_in_legacy:
            handles, legacy_clients = conversations_store.member_handles(
                conn, d.conversation_id)
            rows, left = digests_store.messages_by_guid(conn, d.conversation_id,
                                                        sorted(d.missing_in_legacy))
        looks[d.conversation_id] = SecondLook(frozenset(still), handles, legacy_clients,
                                              tuple(rows), left)
    return looks


def missing_guids(conn: psycopg.Connection, conversation_id: uuid.UUID,
                  guids: Sequence[str]) -> set[str]:
    """Which of *guids* the cloud store still lacks (the second look)."""
    have = {r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %s AND legacy_guid = ANY(%s)",
        (conversation_id, list(guids)))}
    return set(guids) - have


class GapsReconciler:
    kind = "gaps"

    def __init__(self, legacy: LegacyHistory, config: GapsConfig | None = None,
                 scope: GapsScope | None = None) -> None:
        self.legacy = legacy
        self.config = config or GapsConfig()
        #: None: a full pass; else the conversations a targeted run compares
        self.scope = scope
        self.counters = Counters()
        #: the chats the cloud store knows (``_all_chats``): a listed chat it does not know
        #: is compared whatever the dirty set says
        self._cloud_known: set[str] = set()
        #: supernode -> the epoch its peer connection reported when it listed its chats
        self._epochs: dict[str, int] = {}

    # -- the pass --------------------------------------------------------------------------

    async def run(self, ctx: RunContext) -> None:
        cfg, report, db, progress = self.config, ctx.report, ctx.db, ctx.progress
        now = ctx.now_ms()
        left = ctx.time_left()
        reserve = 0.0 if left is None else min(cfg.repair_reserve_s, max(0.0, left) / 4)
        chats, unreachable = await self._all_chats(db)
        if self.scope is not None:
            report.detail["scope"] = {**self.scope.to_json(), "conversations": len(chats)}
        ring = self.legacy.ring
        #: supernode -> why, for those lost at the start or mid-pass; their chats not compared
        lost: dict[str, str] = dict(unreachable)
        uncovered: dict[str, set[str]] = {}
        gap_sources = sorted(set(await db.run("open_gap_sources", open_gap_sources)))
        if progress.get("phase") is not None and progress.get("gap_sources") != gap_sources:
            # new feed gaps since the pass began: their chats would move ahead of where the
            # pass stopped and be skipped; start the pass over instead
            for key in ("phase", "after", "retry", "done", "total"):
                progress.pop(key, None)
            report.detail["restarted"] = True
        #: conversations of this pass not yet known to be in sync (see the module docstring)
        retry: set[str] = set(progress.get("retry", []))

        def not_covered(chat_id: str) -> None:
            # named as it happens: a run cut off at its deadline reports them too
            sn = ring.home_of(chat_id)
            if chat_id not in uncovered.setdefault(sn, set()):
                uncovered[sn].add(chat_id)
                report.uncovered += 1
                named = report.detail.setdefault("uncovered", {}).setdefault(sn, [])
                if len(named) < UNCOVERED_NAMED:
                    named.append(chat_id)
            retry.add(chat_id)
            progress["retry"] = sorted(retry)

        if unreachable:
            # a supernode down right now (crashed, partitioned): compare everything else and
            # report the run as partial (exit 3); the next run covers its chats
            report.detail.setdefault("errors", []).extend(
                f"supernode {sn} unreachable: {why}" for sn, why in sorted(unreachable.items()))
            skipped = sorted(c for c in chats if ring.home_of(c) in unreachable)
            report.detail["unreachable_supernodes"] = sorted(unreachable)
            report.detail["skipped_conversations"] = len(skipped)
            for chat_id in skipped:
                del chats[chat_id]
                not_covered(chat_id)
        if progress.get("phase") is None:  # a new pass: fix its window and its gap set
            lag = (cfg.lag_ms if cfg.lag_ms is not None
                   else await db.run("mirror_lag_ms", lag_ms, now))
            progress.update({"watermark_ms": now - lag - cfg.margin_ms,
                             "since_ms": max(0, now - cfg.since_ms), "lag_ms": lag,
                             "gap_sources": gap_sources, "epochs": dict(self._epochs)})
        # The retention floor is taken again by every run, a resumed pass's too: what aged
        # past it since the pass began is no longer compared.
        floor = cfg.retention_floor_ms(now)
        end, start = progress["watermark_ms"], max(progress["since_ms"], floor)
        report.detail.update({"watermark_ms": end, "since_ms": start,
                              "lag_ms": progress["lag_ms"], "retention_floor_ms": floor,
                              "since_clamped_to_retention": start > progress["since_ms"]})
        ring = self.legacy.ring
        #: the dirty set as this run found it: conversation -> version (see clear_dirty)
        dirty = await db.run("dirty_versions", digests_store.dirty_versions)
        #: supernodes that restarted (lost their memory) since the last pass that went
        #: through everything, or since this pass began: all their chats are compared
        recorded = await db.run("clean_through_epochs", digests_store.clean_through_epochs)
        began = progress.get("epochs", {})
        if recorded is None or set(recorded) != set(self.legacy.directory):
            restarted = set(self.legacy.directory)  # no record, or another ring: all
        else:
            restarted = {sn for sn in self.legacy.directory
                         if self._epochs.get(sn) != recorded.get(sn)
                         or self._epochs.get(sn) != began.get(sn)}
        #: each chat's home, hashed once (a pass with nothing to compare is mostly this)
        homes = {c: ring.home_of(c) for c in chats}
        first = sorted(c for c in chats if homes[c] in gap_sources)
        rest = sorted(c for c in chats if homes[c] not in gap_sources)
        order = [("priority", c) for c in first] + [("rest", c) for c in rest]
        done_phase, done_after = progress.get("phase"), progress.get("after")
        #: conversations earlier runs of this pass went through (none: a new pass)
        base = int(progress.get("done", 0)) if done_phase is not None else 0
        if done_phase is not None:  # resume after the last chat a previous run finished
            phases = ["priority", "rest"]
            order = [(ph, c) for ph, c in order
                     if phases.index(ph) > phases.index(done_phase)
                     or (ph == done_phase and c > done_after)]
        # what an earlier run of this pass left uncovered or unrepaired goes first
        ahead = {c for _, c in order}
        again = sorted(c for c in retry if c in chats and c not in ahead)
        order = [("retry", c) for c in again] + order
        mode = ("scope" if self.scope is not None
                else "full_sweep" if cfg.full_sweep else "dirty_set")
        if mode == "dirty_set":  # of what this run has to do, what changed (module docstring)
            wanted = len(order)
            order = [(ph, c) for ph, c in order
                     if chats[c][0] in dirty or c in retry or c not in self._cloud_known
                     or homes[c] in gap_sources or homes[c] in restarted]
            skipped = wanted - len(order)
        else:
            skipped = 0
        report.detail.update({"mode": mode, "dirty": len(dirty), "skipped_clean": skipped,
                              "restarted_supernodes": sorted(restarted)})
        total = base + len(order)
        ctx.count(base, total)
        diffs: list[ChatDiff] = []
        #: conversation -> its cloud root over the window, read ahead (window_roots)
        roots: dict[uuid.UUID, digests_store.DigestAnswer] = {}

        async def confirm_round() -> None:
            """Second look at what was found so far, and its repair: done in rounds, so a
            run the deadline cuts has repaired what earlier rounds found."""
            await task.deferLater(ctx.clock, cfg.confirm_after_s, lambda: None)
            batch = diffs[:]
            diffs.clear()
            if not ctx.dry_run:  # not clean until a compare finds them equal
                await db.run("mark_dirty", digests_store.mark_dirty,
                             [d.conversation_id for d in batch])
            # the store's side of the round's second look, read at once
            store_side = await db.run("second_look_rows", second_look_rows,
                                      [d for d in batch if homes[d.chat_id] not in lost])

            async def each(diffs: list[ChatDiff], work: Callable[[ChatDiff], Awaitable[Any]]
                           ) -> list[ChatDiff]:
                """*work* for each chat whose home is not lost; the chats it went through
                (one that failed stays to retry: uncovered, or failed with its error)."""
                went = []
                for diff in diffs:
                    home = homes[diff.chat_id]
                    if home in lost:
                        not_covered(diff.chat_id)
                        continue
                    try:
                        await work(diff)
                    except Exception as e:
                        if isinstance(e, CUT_OFF):
                            raise  # the run ended at its deadline: this chat stays in retry
                        if isinstance(e, LINK_ERRORS):
                            self._lose(report, lost, home, e)
                            not_covered(diff.chat_id)
                            continue
                        report.failed += 1
                        report.detail.setdefault("errors", []).append(f"{diff.chat_id}: {e}")
                        continue
                    went.append(diff)
                return went

            # first what the cloud lacks: confirmed at the homes, then written all at once
            # (before any injection: a repair may seed a chat's member list, which an
            # injection into legacy then sends)
            to_cloud: list[CloudRepair] = []

            async def look_for_cloud(diff: ChatDiff) -> None:
                repair = await self._confirm_for_cloud(ctx, diff, chats[diff.chat_id][1],
                                                       store_side[diff.conversation_id])
                if repair is not None:
                    to_cloud.append(repair)

            looked = await each(batch, look_for_cloud)
            if to_cloud:
                await self._repair_cloud(ctx, to_cloud)
            seeded = {r.diff.conversation_id for r in to_cloud if r.members}

            async def repair_legacy(diff: ChatDiff) -> None:
                await self._confirm_for_legacy(ctx, diff, store_side[diff.conversation_id],
                                               diff.conversation_id in seeded)

            looked = await each(looked, repair_legacy)
            for diff in looked:
                retry.discard(diff.chat_id)
            progress["retry"] = sorted(retry)
            await save()

        clean: list[uuid.UUID] = []  # compared equal, not yet written down
        pending_unsaved = 0

        async def save() -> None:
            # what was compared clean is written before the progress that skips it next time
            if clean and not ctx.dry_run:
                closed = await db.run("record_clean_compares", record_clean_compares,
                                      list(clean), end, start, report.run_id, ctx.now_ms(),
                                      dirty)
                report.detail["findings_closed"] = (report.detail.get("findings_closed", 0)
                                                    + closed)
                report.detail["compared_clean"] = (report.detail.get("compared_clean", 0)
                                                   + len(clean))
            clean.clear()
            await ctx.save()

        for i, (phase, chat_id) in enumerate(order):
            ctx.count(base + i, total)
            # every run compares at least one: it always advances; and it stops comparing
            # while the second look and the repairs of what it found still fit
            left = ctx.time_left()
            if i and (ctx.out_of_time() or (
                    left is not None
                    and left < reserve + (cfg.confirm_after_s if diffs else 0.0))):
                ctx.interrupted = True
                await save()
                break
            home = homes[chat_id]
            if home in lost:
                not_covered(chat_id)
                continue
            cid, members = chats[chat_id]
            try:
                if cid not in roots:  # the cloud roots of the next conversations, at once
                    ahead_ids = [chats[c][0] for _, c in order[i:i + ROOTS_AHEAD]]
                    roots = await db.run("window_roots", digests_store.window_roots,
                                         ahead_ids, start, end)
                diff = await self._compare_chat(db, chat_id, cid, start, end, roots.pop(cid))
            except Exception as e:
                if isinstance(e, CUT_OFF):
                    raise  # the run ended at its deadline: this chat stays to do
                if isinstance(e, LINK_ERRORS):
                    self._lose(report, lost, home, e)
                    not_covered(chat_id)
                    continue
                report.failed += 1
                report.detail.setdefault("errors", []).append(f"{chat_id}: {e}")
                continue
            report.compared += 1
            if diff.missing_in_cloud or diff.missing_in_legacy:
                report.suspects += len(diff.missing_in_cloud) + len(diff.missing_in_legacy)
                diffs.append(diff)
                retry.add(chat_id)  # until repaired: a cut-off run leaves it to the next
            else:
                retry.discard(chat_id)
                clean.append(cid)
            progress["retry"] = sorted(retry)
            if phase != "retry":
                progress.update({"phase": phase, "after": chat_id})
            ctx.count(base + i + 1, total)
            pending_unsaved += 1
            if pending_unsaved >= 50 or i == len(order) - 1:
                pending_unsaved = 0
                await save()
            ctx.on_progress(f"gaps: {base + i + 1}/{total} conversations, "
                            f"{report.suspects} suspects")
            if len(diffs) >= cfg.confirm_every:
                await confirm_round()
        if not ctx.interrupted:
            ctx.count(total, total)
            # those the dirty set vouches for are covered: equal when last compared, and
            # unchanged since (the detail tells them apart: skipped_clean)
            report.compared += report.detail["skipped_clean"]
        if clean:  # the last conversations' compare raised: the ones before it still count
            await save()
        if diffs:
            await confirm_round()
        report.detail.update(attrs.asdict(self.counters))
        if (not ctx.interrupted and report.failed == 0 and not uncovered
                and not ctx.dry_run and self.scope is None):
            # a short --since compares recent history only: a gap whose losses may be older
            # stays open (its supernode keeps going first) until a pass reaches them
            closed = await db.run("close_gap_findings", close_gap_findings, end, gap_sources,
                                  report.run_id, ctx.now_ms(), window_start_ms=start,
                                  whole_retention=start <= max(floor, 0),
                                  repaired=progress.get("repaired_by_source", {}))
            report.detail["feed_gaps_covered"] = sum(closed.values())
            report.detail["feed_gaps_unrecoverable"] = closed["unrecoverable"]
            if await self._unrestarted(progress.get("epochs", {})):
                await db.run("record_clean_through", digests_store.record_clean_through, end,
                             report.run_id, ctx.now_ms(), progress.get("epochs", {}))

    async def _unrestarted(self, epochs: dict[str, int]) -> bool:
        """Every supernode still runs the incarnation the pass began with (*epochs*): what
        the pass compared clean at each is still there, so the pass may vouch for it."""
        if set(epochs) != set(self.legacy.directory):
            return False
        try:
            for sn in sorted(self.legacy.directory):
                if (await self.legacy.peer(sn)).epoch != epochs[sn]:
                    return False
        except CUT_OFF:
            raise
        except Exception:
            return False  # out of reach: not known to be the same incarnation
        return True

    @staticmethod
    def _lose(report: Any, lost: dict[str, str], sn: str, e: Exception) -> None:
        """Supernode *sn*'s link failed mid-pass: its other chats are not tried this run."""
        why = f"{type(e).__name__}: {e}"
        lost[sn] = why
        report.detail.setdefault("lost_supernodes", {})[sn] = why
        report.detail.setdefault("errors", []).append(f"supernode {sn} lost mid-pass: {why}")

    async def _all_chats(self, db: TransactionRunner
                         ) -> tuple[dict[str, tuple[uuid.UUID, tuple[str, ...] | None]],
                                    dict[str, str]]:
        """Chats known to either side: chat id -> (conversation id, legacy members); and the
        supernodes that could not list theirs (id -> why). A targeted run's scope: the chats
        in it (one conversation's lists no supernode)."""
        scope = self.scope
        known = (await db.run("legacy_chats", conversations_store.legacy_chats)
                 if scope is None else await db.run("scope_chats", cloud_chats, scope))
        self._cloud_known = set(known)
        chats: dict[str, tuple[uuid.UUID, tuple[str, ...] | None]] = {
            chat: (cid, None) for chat, cid in known.items()}
        unreachable: dict[str, str] = {}
        if scope is not None and scope.chat_id is not None:
            return chats, unreachable
        for sn in sorted(self.legacy.directory):
            try:
                peer = await self.legacy.peer(sn)
                self._epochs[sn] = peer.epoch
                after = ""
                while True:
                    page = await peer.chats(after, 200)
                    for info in page.chats:
                        if (scope is None or info.chat_id in chats
                                or scope.keeps_listed(info.chat_id, info.members)):
                            chats[info.chat_id] = (ids.conversation_id(info.chat_id),
                                                   tuple(info.members))
                    if page.done or not page.chats:
                        break
                    after = page.chats[-1].chat_id
            except CUT_OFF:
                raise
            except Exception as e:
                unreachable[sn] = str(e) or type(e).__name__
        return chats, unreachable

    # -- digest descent --------------------------------------------------------------------

    async def _compare_chat(self, db: TransactionRunner, chat_id: str, cid: uuid.UUID,
                            start: int, end: int,
                            cloud_root: digests_store.DigestAnswer | None = None) -> ChatDiff:
        """Descend from the window's root where the digests differ; *cloud_root* is the
        cloud's root of the window when it was read ahead."""
        peer = await self.legacy.for_chat(chat_id)
        diff = ChatDiff(chat_id, cid)
        stack = [(start, end, 0, 0, True)]
        while stack:
            lo, hi, pbits, prefix, root = stack.pop()
            if hi <= lo:
                continue
            rng = wire.Range(chat_id=chat_id, start_ms=lo, end_ms=hi, prefix_bits=pbits,
                             prefix=prefix)
            if root:
                [legacy] = await peer.digests(rng, 0)
                whole = pbits == 0 and lo == start and hi == end
                answer = (cloud_root if whole and cloud_root is not None else
                          await db.run("maintained_digests", digests_store.maintained_digests,
                                       cid, lo, hi, pbits, prefix, 0))
                [cloud] = answer.digests
                self.counters.digest_requests += 1
                self.counters.digest_rows_read += answer.rows_read
                if pbits == 0 and lo == start and hi == end:
                    self.counters.messages_covered += max(legacy.count, cloud.count)
                if _digest_pair(legacy, cloud):
                    continue
                biggest = max(legacy.count, cloud.count)
                if pbits == 0 and biggest > self.config.hot_range and hi - lo > 1:
                    mid = lo + (hi - lo) // 2  # a hot conversation: split the window first
                    stack += [(lo, mid, 0, 0, True), (mid, hi, 0, 0, True)]
                    continue
                if biggest <= self.config.list_at or pbits >= 32:
                    await self._list_leaf(db, peer, diff, rng)
                    continue
            split = min(SPLIT_BITS, 32 - pbits)
            legacy_children = await peer.digests(rng, split)
            answer = await db.run("maintained_digests", digests_store.maintained_digests, cid,
                                  lo, hi, pbits, prefix, split)
            cloud_children = answer.digests
            self.counters.digest_requests += 1
            self.counters.digest_rows_read += answer.rows_read
            for i, (lc, cc) in enumerate(zip(legacy_children, cloud_children, strict=True)):
                if _digest_pair(lc, cc):
                    continue
                child_bits, child_prefix = pbits + split, (prefix << split) | i
                child = wire.Range(chat_id=chat_id, start_ms=lo, end_ms=hi,
                                   prefix_bits=child_bits, prefix=child_prefix)
                if max(lc.count, cc.count) <= self.config.list_at or child_bits >= 32:
                    await self._list_leaf(db, peer, diff, child)
                else:
                    stack.append((lo, hi, child_bits, child_prefix, False))
        return diff

    async def _list_leaf(self, db: TransactionRunner, peer: PeerConnection, diff: ChatDiff,
                         rng: wire.Range) -> None:
        reply = await peer.list_guids(rng, LIST_LIMIT)
        legacy_guids = set(reply.guids)
        if reply.truncated:  # more than a list holds: split by bucket bits instead
            raise RuntimeError(f"range of {rng.chat_id} too large to list at "
                               f"{rng.prefix_bits} bits")
        cloud_guids = set(await db.run("range_guids", digests_store.range_guids,
                                       diff.conversation_id,
                                       rng.start_ms, rng.end_ms, rng.prefix_bits, rng.prefix))
        self.counters.listed_guids += len(legacy_guids) + len(cloud_guids)
        diff.missing_in_cloud |= legacy_guids - cloud_guids
        diff.missing_in_legacy |= cloud_guids - legacy_guids

    # -- second look and repair ------------------------------------------------------------

    async def _confirm_for_cloud(self, ctx: RunContext, diff: ChatDiff,
                                 members: tuple[str, ...] | None,
                                 look: SecondLook) -> CloudRepair | None:
        """The second look at what the cloud lacks of a chat (*look*: what the store holds
        of it): the messages its home still has, for ``_repair_cloud`` to write with the
        round's others (None: nothing to write, or a dry run)."""
        if not diff.missing_in_cloud:
            return None
        peer = await self.legacy.for_chat(diff.chat_id)
        still = look.still_missing
        fetched, _ = await self._fetch(peer, diff.chat_id, sorted(still))
        confirmed = [m for m in fetched if m.guid in still]
        ctx.report.confirmed += len(confirmed)
        if confirmed and not ctx.dry_run:
            return CloudRepair(diff, members, tuple(confirmed))
        return None

    async def _confirm_for_legacy(self, ctx: RunContext, diff: ChatDiff, look: SecondLook,
                                  members_seeded: bool) -> None:
        """The second look at what legacy lacks of a chat, and its repair: the messages
        its home still lacks, injected there. *members_seeded*: this round's repair into
        the cloud gave the chat a member list, so the members are read again."""
        if not diff.missing_in_legacy:
            return
        report = ctx.report
        if look.left_to_outbox:  # in flight (delivered in order), or ended unsent
            report.detail["left_to_outbox"] = (
                report.detail.get("left_to_outbox", 0) + look.left_to_outbox)
        handles, legacy_clients = look.handles, look.legacy_clients
        if members_seeded:
            handles, legacy_clients = await ctx.db.run(
                "member_handles", conversations_store.member_handles, diff.conversation_id)
        if legacy_clients == 0:
            return  # nobody reads this chat on legacy any more: nothing to repair
        peer = await self.legacy.for_chat(diff.chat_id)
        # the second look asks for the messages themselves: only what it still lacks counts
        _, lacking = await self._fetch(peer, diff.chat_id, sorted(diff.missing_in_legacy),
                                       count=False)
        rows = [r for r in look.stored if r[0] in lacking]
        # A message that aged past the retention floor since the first look is legacy's
        # to drop, not missing: re-injecting it would be refused as too old.
        floor = self.config.retention_floor_ms(ctx.now_ms())
        kept = [r for r in rows if r[2] >= floor]
        if len(kept) < len(rows):
            report.detail["aged_out"] = report.detail.get("aged_out", 0) + len(rows) - len(kept)
        report.confirmed += len(kept)
        if kept and not ctx.dry_run:
            await self._repair_legacy(ctx, diff, peer, handles, kept)

    async def _fetch(self, peer: PeerConnection, chat_id: str, guids: list[str], *,
                     count: bool = True) -> tuple[list[wire.ChatMessage], set[str]]:
        """The messages the home supernode has among *guids*, and the GUIDs it lacks
        (asking in batches; a reply may stop early, then the rest is asked again)."""
        found: list[wire.ChatMessage] = []
        missing: set[str] = set()
        todo = list(guids)
        while todo:
            reply = await peer.fetch(chat_id, todo[:self.config.fetch_batch])
            found += reply.messages
            missing |= set(reply.missing)
            answered = {m.guid for m in reply.messages} | set(reply.missing)
            if not answered:
                raise RuntimeError(f"supernode answered nothing for {chat_id}")
            todo = [g for g in todo if g not in answered]
        if count:
            self.counters.fetched_messages += len(found)
        return found, missing

    def _note_repair(self, ctx: RunContext, diff: ChatDiff) -> None:
        """Remember (in the pass's progress, so a resumed pass keeps it) a conversation
        repaired at a supernode with open feed gaps: the gaps' findings name it."""
        sn = self.legacy.ring.home_of(diff.chat_id)
        if sn in ctx.progress.get("gap_sources", ()):
            noted = ctx.progress.setdefault("repaired_by_source", {}).setdefault(sn, [])
            cid = str(diff.conversation_id)
            if cid not in noted and len(noted) < REPAIRED_NAMED:
                noted.append(cid)

    async def _repair_cloud(self, ctx: RunContext, repairs: list[CloudRepair]) -> None:
        """Write a round's confirmed messages into the cloud, with a finding per chat, in one
        transaction; if that fails, chat by chat, so that one chat's failure is its own."""
        for r in repairs:
            ctx.report.bytes_from_legacy += sum(
                len(m.body.encode()) + len(m.guid) + len(m.sender) for m in r.messages)
        if not await self._write_cloud_repairs(ctx, repairs):
            for r in repairs:
                await self._write_cloud_repairs(ctx, [r])

    async def _write_cloud_repairs(self, ctx: RunContext, repairs: list[CloudRepair]) -> bool:
        """*repairs* in one transaction, counted in the report; False, and nothing written
        or counted, when several failed together. One that fails alone is recorded as a
        failed repair."""
        report = ctx.report
        try:
            resolved = await ctx.db.run("repair_in_cloud", repair_in_cloud, repairs,
                                        ctx.now_ms(), report.run_id)
        except Exception as e:
            if isinstance(e, CUT_OFF):
                raise
            if len(repairs) > 1:
                return False
            [r] = repairs
            report.failed += len(r.messages)
            await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_cloud",
                             "failed", r.diff.conversation_id, {**r.detail(), "error": str(e)},
                             ctx.now_ms())
            return True
        for r, n in zip(repairs, resolved, strict=True):
            report.repaired += n
            if n:
                self._note_repair(ctx, r.diff)
            report.failed += len(r.messages) - n
        return True

    async def _repair_legacy(self, ctx: RunContext, diff: ChatDiff, peer: PeerConnection,
                             handles: tuple[str, ...], rows: list[tuple]) -> None:
        """Inject *rows* (``messages_by_guid``'s: guid, sender, sent_ms, body) from the cloud
        into the chat's home supernode."""
        report = ctx.report
        repaired, errors = [], []
        for guid, sender, sent_ms, body in rows:
            msg = wire.ChatMessage(chat_id=diff.chat_id, guid=guid, legacy_seq=0, sender=sender,
                                   ts_ms=sent_ms, body=body, origin=ORIGIN)
            try:
                await peer.inject_message(msg, handles)
                repaired.append(guid)
            except Exception as e:
                errors.append(f"{guid}: {e}")
        report.repaired += len(repaired)
        if repaired:
            self._note_repair(ctx, diff)
        report.failed += len(rows) - len(repaired)
        detail = {"chat_id": diff.chat_id, "count": len(repaired), "guids": repaired[:50]}
        if repaired:
            await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_legacy",
                             "repaired", diff.conversation_id, detail, ctx.now_ms())
        if errors:
            await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_legacy",
                             "failed", diff.conversation_id, {**detail, "errors": errors[:20]},
                             ctx.now_ms())

