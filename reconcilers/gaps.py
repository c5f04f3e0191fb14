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

Conversations homed at supernodes with open ``feed_gap`` findings go first; a completed pass
over everything marks those findings repaired (the pass covered their ranges).

Each conversation compared equal is written down as it goes (``record_clean_compares``):
its ``last_clean_reconcile_ms`` becomes the pass's watermark, and its earlier open or failed
repair findings within the window are repaired. The migration gate asks this of every
conversation of a cohort, so a run that stopped at its deadline, or resumed and compared only
the tail, vouches for the conversations it compared and no others. A conversation repaired
in this pass is vouched for by the next one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import psycopg
from psycopg.types.json import Jsonb
from twisted.internet import task
from twisted.logger import Logger

from bridge import ids
from bridge.mirror import LegacyChanges, mirror_changes
from cloud import admin
from cloud.db import TransactionRunner
from cloud.model import Digest
from cloud.store import conversations as conversations_store
from cloud.store import digests as digests_store
from legacy import wire
from legacy.peer import PeerConnection
from reconcilers.runner import RunContext

log = Logger()

#: Origin mark of messages the reconciler injects (never mirrored back by the bridge).
ORIGIN = "reconciler"
SPLIT_BITS = 4
LIST_LIMIT = 400          # a supernode lists at most this many GUIDs per request


class LegacyHistory(Protocol):
    """What the reconciler needs from the legacy side (``bridge.discovery.SupernodeLinks``)."""

    ring: Any
    directory: dict

    async def peer(self, sn_id: str) -> PeerConnection: ...

    async def for_chat(self, chat_id: str) -> PeerConnection: ...


@attrs.frozen
class GapsConfig:
    since_ms: int = 30 * 86400 * 1000    # how far back to compare
    margin_ms: int = 10_000              # below the watermark beyond the measured lag
    lag_ms: int | None = None            # use this instead of the workers' measured lag
    list_at: int = 64                    # list a range's GUIDs at or below this many messages
    hot_range: int = 20_000              # split a time window holding more than this
    confirm_after_s: float = 1.0         # the second look
    fetch_batch: int = 200


@attrs.define
class Counters:
    digest_requests: int = 0
    listed_guids: int = 0
    fetched_messages: int = 0
    messages_covered: int = 0


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


def open_gap_sources(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT detail->>'source' FROM reconcile_findings "
        "WHERE kind = 'feed_gap' AND state = 'open'")]


def close_gap_findings(conn: psycopg.Connection, before_ms: int, sources: Sequence[str],
                       run_id: int | None, now_ms: int) -> int:
    """Close the feed_gap findings a completed pass covered: those of the supernodes whose
    chats it compared first, found before its watermark (so their losses were compared)."""
    return conn.execute(
        "UPDATE reconcile_findings SET state = 'repaired', resolved_ms = %s, "
        "detail = detail || jsonb_build_object('covered_by_run', %s::bigint) "
        "WHERE kind = 'feed_gap' AND state = 'open' AND created_ms < %s "
        "AND detail->>'source' = ANY(%s)",
        (now_ms, run_id, before_ms, list(sources))).rowcount


#: Finding kinds of this reconciler's own repairs: a later clean compare answers them.
REPAIR_KINDS = ("missing_in_cloud", "missing_in_legacy")


def record_clean_compares(conn: psycopg.Connection, conversation_ids: Sequence[uuid.UUID],
                          watermark_ms: int, since_ms: int, run_id: int | None,
                          now_ms: int) -> int:
    """These conversations were compared and found equal on both stacks over
    ``[since_ms, watermark_ms)``: their ``last_clean_reconcile_ms`` moves up to the
    watermark (what the migration gate asks of a cohort's conversations), and their open or
    failed repair findings made within that window are repaired (the divergence is gone).
    Returns how many findings that closed."""
    if not conversation_ids:
        return 0
    ids_ = list(conversation_ids)
    conn.execute(
        "UPDATE conversations SET last_clean_reconcile_ms = "
        "greatest(coalesce(last_clean_reconcile_ms, 0), %s) WHERE conversation_id = ANY(%s)",
        (watermark_ms, ids_))
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
    conn.execute(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES "
        "('reconciler', %s, %s, %s)",
        (f"repair_{kind}" if state == "repaired" else f"repair_{kind}_failed",
         str(conversation_id), Jsonb(detail)))


def missing_guids(conn: psycopg.Connection, conversation_id: uuid.UUID,
                  guids: Sequence[str]) -> set[str]:
    """Which of *guids* the cloud store still lacks (the second look)."""
    have = {r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %s AND legacy_guid = ANY(%s)",
        (conversation_id, list(guids)))}
    return set(guids) - have


class GapsReconciler:
    kind = "gaps"

    def __init__(self, legacy: LegacyHistory, config: GapsConfig | None = None) -> None:
        self.legacy = legacy
        self.config = config or GapsConfig()
        self.counters = Counters()

    # -- the pass --------------------------------------------------------------------------

    async def run(self, ctx: RunContext) -> None:
        cfg, report, db, progress = self.config, ctx.report, ctx.db, ctx.progress
        now = ctx.now_ms()
        chats, unreachable = await self._all_chats(db)
        if unreachable:
            # a supernode down right now (crashed, partitioned): compare everything else and
            # report the run as partial (exit 3); the next run covers its chats
            report.failed += len(unreachable)
            report.detail.setdefault("errors", []).extend(
                f"supernode {sn} unreachable: {why}" for sn, why in sorted(unreachable.items()))
            skipped = sorted(c for c in chats if self.legacy.ring.home_of(c) in unreachable)
            report.detail["unreachable_supernodes"] = sorted(unreachable)
            report.detail["skipped_conversations"] = len(skipped)
            for chat_id in skipped:
                del chats[chat_id]
        gap_sources = sorted(set(await db.run("open_gap_sources", open_gap_sources)))
        if progress.get("phase") is not None and progress.get("gap_sources") != gap_sources:
            # new feed gaps since the pass began: their chats would move ahead of where the
            # pass stopped and be skipped; start the pass over instead
            for key in ("phase", "after"):
                progress.pop(key, None)
            report.detail["restarted"] = True
        if progress.get("phase") is None:  # a new pass: fix its window and its gap set
            lag = (cfg.lag_ms if cfg.lag_ms is not None
                   else await db.run("mirror_lag_ms", lag_ms, now))
            progress.update({"watermark_ms": now - lag - cfg.margin_ms,
                             "since_ms": max(0, now - cfg.since_ms), "lag_ms": lag,
                             "gap_sources": gap_sources})
        end, start = progress["watermark_ms"], progress["since_ms"]
        report.detail.update({"watermark_ms": end, "since_ms": start,
                              "lag_ms": progress["lag_ms"]})
        ring = self.legacy.ring
        first = sorted(c for c in chats if ring.home_of(c) in gap_sources)
        rest = sorted(c for c in chats if ring.home_of(c) not in gap_sources)
        order = [("priority", c) for c in first] + [("rest", c) for c in rest]
        done_phase, done_after = progress.get("phase"), progress.get("after")
        if done_phase is not None:  # resume after the last chat a previous run finished
            phases = ["priority", "rest"]
            order = [(ph, c) for ph, c in order
                     if phases.index(ph) > phases.index(done_phase)
                     or (ph == done_phase and c > done_after)]
        diffs: list[ChatDiff] = []
        clean: list[uuid.UUID] = []  # compared equal, not yet written down
        pending_unsaved = 0

        async def save() -> None:
            # what was compared clean is written before the progress that skips it next time
            if clean and not ctx.dry_run:
                closed = await db.run("record_clean_compares", record_clean_compares,
                                      list(clean), end, start, report.run_id, ctx.now_ms())
                report.detail["findings_closed"] = (report.detail.get("findings_closed", 0)
                                                    + closed)
                report.detail["compared_clean"] = (report.detail.get("compared_clean", 0)
                                                   + len(clean))
            clean.clear()
            await ctx.save()

        for i, (phase, chat_id) in enumerate(order):
            if i and ctx.out_of_time():  # every run compares at least one: it always advances
                await save()
                break
            cid, members = chats[chat_id]
            try:
                diff = await self._compare_chat(db, chat_id, cid, start, end)
            except Exception as e:
                report.failed += 1
                report.detail.setdefault("errors", []).append(f"{chat_id}: {e}")
                continue
            report.compared += 1
            if diff.missing_in_cloud or diff.missing_in_legacy:
                report.suspects += len(diff.missing_in_cloud) + len(diff.missing_in_legacy)
                diffs.append(diff)
            else:
                clean.append(cid)
            ctx.progress.update({"phase": phase, "after": chat_id})
            pending_unsaved += 1
            if pending_unsaved >= 50 or i == len(order) - 1:
                pending_unsaved = 0
                await save()
            ctx.on_progress(f"gaps: {i + 1}/{len(order)} conversations, "
                            f"{report.suspects} suspects")
        if clean:  # the last conversations' compare raised: the ones before it still count
            await save()
        if diffs:
            await task.deferLater(ctx.clock, cfg.confirm_after_s, lambda: None)
            for diff in diffs:
                await self._confirm_and_repair(ctx, diff, chats[diff.chat_id][1])
        report.detail.update(attrs.asdict(self.counters))
        if not ctx.interrupted and report.failed == 0 and not ctx.dry_run:
            closed = await db.run("close_gap_findings", close_gap_findings, end, gap_sources,
                                  report.run_id, ctx.now_ms())
            report.detail["feed_gaps_covered"] = closed

    async def _all_chats(self, db: TransactionRunner
                         ) -> tuple[dict[str, tuple[uuid.UUID, tuple[str, ...] | None]],
                                    dict[str, str]]:
        """Chats known to either side: chat id -> (conversation id, legacy members); and the
        supernodes that could not list theirs (id -> why)."""
        chats: dict[str, tuple[uuid.UUID, tuple[str, ...] | None]] = {
            chat: (cid, None)
            for chat, cid in (await db.run("legacy_chats",
                                           conversations_store.legacy_chats)).items()}
        unreachable: dict[str, str] = {}
        for sn in sorted(self.legacy.directory):
            try:
                peer = await self.legacy.peer(sn)
                after = ""
                while True:
                    page = await peer.chats(after, 200)
                    for info in page.chats:
                        chats[info.chat_id] = (ids.conversation_id(info.chat_id),
                                               tuple(info.members))
                    if page.done or not page.chats:
                        break
                    after = page.chats[-1].chat_id
            except Exception as e:
                unreachable[sn] = str(e) or type(e).__name__
        return chats, unreachable

    # -- digest descent --------------------------------------------------------------------

    async def _compare_chat(self, db: TransactionRunner, chat_id: str, cid: uuid.UUID,
                            start: int, end: int) -> ChatDiff:
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
                [cloud] = await db.run("range_digests", digests_store.range_digests, cid, lo, hi,
                                       pbits, prefix, 0)
                self.counters.digest_requests += 1
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
            cloud_children = await db.run("range_digests", digests_store.range_digests, cid, lo, hi,
                                          pbits, prefix, split)
            self.counters.digest_requests += 1
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

    async def _confirm_and_repair(self, ctx: RunContext, diff: ChatDiff,
                                  members: tuple[str, ...] | None) -> None:
        db, report = ctx.db, ctx.report
        peer = await self.legacy.for_chat(diff.chat_id)
        if diff.missing_in_cloud:
            still = await db.run("missing_guids", missing_guids, diff.conversation_id,
                                 sorted(diff.missing_in_cloud))
            fetched, _ = await self._fetch(peer, diff.chat_id, sorted(still))
            confirmed = [m for m in fetched if m.guid in still]
            report.confirmed += len(confirmed)
            if confirmed and not ctx.dry_run:
                await self._repair_cloud(ctx, diff, members, confirmed)
        if diff.missing_in_legacy:
            handles, legacy_clients = await db.run("member_handles",
                                                   conversations_store.member_handles,
                                                   diff.conversation_id)
            if legacy_clients == 0:
                return  # nobody reads this chat on legacy any more: nothing to repair
            # the second look asks for the messages themselves: only what it still lacks counts
            _, lacking = await self._fetch(peer, diff.chat_id, sorted(diff.missing_in_legacy),
                                           count=False)
            confirmed_guids = sorted(lacking & diff.missing_in_legacy)
            report.confirmed += len(confirmed_guids)
            if confirmed_guids and not ctx.dry_run:
                await self._repair_legacy(ctx, diff, peer, handles, confirmed_guids)

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

    async def _repair_cloud(self, ctx: RunContext, diff: ChatDiff,
                            members: tuple[str, ...] | None,
                            messages: list[wire.ChatMessage]) -> None:
        report = ctx.report
        report.bytes_from_legacy += sum(len(m.body.encode()) + len(m.guid) + len(m.sender)
                                        for m in messages)
        chats = {diff.chat_id: members} if members else {}
        detail = {"chat_id": diff.chat_id, "count": len(messages),
                  "guids": sorted(m.guid for m in messages)[:50]}
        try:
            outcome = await ctx.db.run(
                "mirror_changes", mirror_changes,
                LegacyChanges(chats, sorted(messages, key=lambda m: m.legacy_seq)),
                ctx.now_ms())
        except Exception as e:
            report.failed += len(messages)
            await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_cloud",
                             "failed",
                             diff.conversation_id, {**detail, "error": str(e)}, ctx.now_ms())
            return
        # what the store now has; the rest it refused (e.g. a body it can not hold)
        result = outcome.result
        resolved = len(result.inserted) + result.duplicates
        report.repaired += resolved
        report.failed += len(messages) - resolved
        detail["inserted"] = len(result.inserted)
        await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_cloud",
                         "repaired" if resolved == len(messages) else "failed",
                         diff.conversation_id, detail, ctx.now_ms())

    async def _repair_legacy(self, ctx: RunContext, diff: ChatDiff, peer: PeerConnection,
                             handles: tuple[str, ...], guids: list[str]) -> None:
        report = ctx.report
        rows = await ctx.db.run("messages_by_guid", digests_store.messages_by_guid,
                                diff.conversation_id, guids)
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
        report.failed += len(guids) - len(repaired)
        detail = {"chat_id": diff.chat_id, "count": len(repaired), "guids": repaired[:50]}
        if repaired:
            await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_legacy",
                             "repaired", diff.conversation_id, detail, ctx.now_ms())
        if errors:
            await ctx.db.run("record_repair", record_repair, report.run_id, "missing_in_legacy",
                             "failed", diff.conversation_id, {**detail, "errors": errors[:20]},
                             ctx.now_ms())

