"""The reconcile-crash chaos scenario, small and deterministic: gaps runs, cron-like and one
by hand, while 30% of the supernodes crash; every run exits 0, 3 or 4 within its deadline,
and once they are back a final run is clean and both stacks hold every message once.

(``make chaos`` runs the same scenario on real processes: ``drills.chaos``,
``reconcile-crash``.)
"""

from __future__ import annotations

import psycopg
from twisted.internet import defer

from cloud.db import InlineDatabase
from reconcilers import runner
from reconcilers.gaps import GapsConfig, GapsReconciler
from tests.bridge.test_follower import chat_messages
from tests.reconcilers.test_gaps import Scene, drop_from_cloud

#: Shorter than one whole pass over the 30 conversations here (about 0.25 s simulated), so
#: the deadline cuts runs and the next ones resume.
DEADLINE_S = 0.15
CONFIG = GapsConfig(margin_ms=1000, confirm_after_s=0.05, repair_reserve_s=0.1, confirm_every=3)


def test_reconcile_runs_during_a_crash_of_30_percent_of_supernodes(conn, db_dsn):
    """Cron runs every 3 s and one by hand overlapping them, during the crash: each exits
    0, 3 or 4 within its deadline (shorter than a pass: runs are cut and resumed); after
    the restart the final run is clean and every message is on both stacks exactly once."""
    scene = Scene(conn, db_dsn, supernodes=10, seed=17)
    hand_conn = psycopg.connect(db_dsn, autocommit=True)
    hand_lock = psycopg.connect(db_dsn, autocommit=True)
    try:
        chats = {f"chat-{i:02d}": scene.chat(f"chat-{i:02d}", 3, members=(f"c{i}a", f"c{i}b"))
                 for i in range(30)}
        scene.mirror()
        victims = sorted(scene.net.supernodes)[:3]  # 30% of 10
        # work to repair, on supernodes that stay up (a message dropped from the cloud and
        # lost by a crashed supernode would be gone from both stacks)
        safe = [c for c in chats if scene.net.ring.home_of(c) not in victims]
        drop_from_cloud(conn, chats[safe[0]][:2] + chats[safe[-1]][:1])
        scene.net.run(15.0)
        outcomes: list[tuple[str, int, float]] = []

        def start(why: str, db, lock_conn, max_seconds: float = DEADLINE_S,
                  **kw) -> defer.Deferred:
            t0 = scene.net.clock.seconds()
            rec = GapsReconciler(scene.links, CONFIG)
            d = defer.Deferred.fromCoroutine(runner.run_one(
                rec, clock=scene.net.clock, db=db, lock_conn=lock_conn, dry_run=False,
                max_seconds=max_seconds, **kw))
            return d.addCallback(lambda r: outcomes.append(
                (why, r.exit_code(), scene.net.clock.seconds() - t0)) or r)

        crashed = []

        progress_calls = []

        def crash_now(_text: str) -> None:  # mid-pass of the second cron run
            progress_calls.append(_text)
            if len(progress_calls) == 3:
                crashed.extend(victims)
                for sn in victims:
                    scene.net.supernodes[sn].crash()

        for k in range(5):
            runs = [start("cron", scene.db, scene.lock_conn,
                          on_progress=crash_now if k == 1 else (lambda _t: None))]
            if k == 1:  # the operator's run, started while the cron run holds the lock
                runs.append(start("hand", InlineDatabase(hand_conn), hand_lock))
            scene.net.wait(defer.gatherResults(runs), timeout=60)
            scene.net.run(3.0)
        assert crashed
        assert [w for w, _, _ in outcomes].count("hand") == 1 and len(outcomes) == 6
        for why, code, took in outcomes:
            assert code in (runner.EXIT_IN_SYNC, runner.EXIT_DIFFERENCES,
                            runner.EXIT_LOCKED), (why, code)
            assert took <= DEADLINE_S + 1e-6, (why, took)
        assert ("hand", runner.EXIT_LOCKED) in [(w, c) for w, c, _ in outcomes]
        assert runner.EXIT_DIFFERENCES in [c for _, c, _ in outcomes]  # partial, not 1

        for sn in victims:
            scene.net.wait(scene.net.supernodes[sn].restart())
        # the final run, as the drill's (a long deadline): it resumes the pass the cron runs
        # left, repairs what the crash lost, and the run after it is clean
        scene.net.run(3.0)
        final = scene.net.wait(start("final", scene.db, scene.lock_conn, 30.0), timeout=60)
        assert final.completed
        assert final.exit_code() == runner.EXIT_IN_SYNC and final.repaired > 0
        scene.net.run(3.0)
        clean = scene.net.wait(start("final", scene.db, scene.lock_conn, 30.0), timeout=60)
        assert clean.clean and clean.confirmed == 0 and clean.compared == len(chats)
        for chat_id, guids in chats.items():  # every message on both stacks, once
            cloud = [r[1] for r in chat_messages(conn, chat_id)]
            assert sorted(cloud) == sorted(guids), chat_id
            home = scene.net.supernodes[scene.net.ring.home_of(chat_id)]
            assert sorted(m.guid for m in home.history(chat_id)) == sorted(guids), chat_id
    finally:
        hand_conn.close()
        hand_lock.close()
        scene.lock_conn.close()
