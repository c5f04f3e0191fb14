"""The offline-message service (``legacy.supernode.offline``) and the 2010 client's crash on
its late answers (``legacy.client``): a bounded queue, answered in order, on the clock."""

from __future__ import annotations

import random

import pytest

from legacy import wire
from tests.legacy.netfixture import LegacyNet, RecordingDevice


class AnsweredDevice(RecordingDevice):
    """A device that also records when each offline-message answer reached it."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.answers: list[float] = []  # clock seconds

    def _offline_reply(self, proto) -> None:
        self.answers.append(self.clock.seconds())
        super()._offline_reply(proto)


def devices(net: LegacyNet, n: int, at: str = "sn0") -> list[AnsweredDevice]:
    out = []
    for i in range(n):
        user = net.add_user(f"user-{i}")
        out.append(AnsweredDevice(user, "d0", network=net.net, login_host="127.0.0.1",
                                  login_port=net.login_port,
                                  rng=random.Random(net.rng.getrandbits(64)),
                                  stats=net.stats, trace=net.trace,
                                  pin=net.directory[at]))
    return out


def serving(rate: float) -> tuple[LegacyNet, object]:
    """A network whose supernode sn0 answers offline-message requests, *rate* a second."""
    net = LegacyNet(2).start()
    node = net.supernodes["sn0"]
    node.offline.enabled = True
    node.offline.set_rate(rate)
    return net, node


def test_without_the_service_a_login_gets_no_offline_answer():
    """Off by default: a device that logs in gets Welcome and nothing about offline
    messages (the network before the service existed)."""
    net = LegacyNet(2).start()
    (dev,) = devices(net, 1)
    net.online(dev)
    net.run(5)
    assert dev.answers == [] and net.supernodes["sn0"].offline.answered == 0


def test_a_burst_of_logins_is_answered_in_order_one_per_turn_of_the_rate():
    """Five logins in the same moment at a supernode answering 1 a second: the first at
    once, then one a second in login order; four of them waited, the service counts them."""
    net, node = serving(1.0)
    devs = devices(net, 5)
    net.online(*devs)
    t0 = min(d.attached_at for d in devs)
    net.run(10)
    got = sorted((d.answers[0] - t0, d.user.handle) for d in devs)
    assert [round(t) for t, _ in got] == [0, 1, 2, 3, 4]
    order = sorted(devs, key=lambda d: d.attached_at)
    assert [h for _, h in got] == [d.user.handle for d in order]
    assert (node.offline.answered, node.offline.delayed) == (5, 4)
    assert all(len(d.answers) == 1 and d.state == "online" for d in devs)


def test_lifting_the_bound_answers_every_waiting_request_at_once():
    """A queue at one answer every 100 s is emptied the moment the bound is lifted."""
    net, node = serving(0.01)
    devs = devices(net, 4)
    net.online(*devs)
    net.run(5)
    assert sum(len(d.answers) for d in devs) == 1 and node.offline.waiting() == 3
    node.offline.set_rate(None)
    assert node.offline.waiting() == 0
    net.run(1)
    assert sum(len(d.answers) for d in devs) == 4


def test_a_late_answer_crashes_a_device_with_the_bug_which_logs_in_again():
    """Answers every 5 s, the bug's limit 3 s: the first device in line gets its answer in
    time, those after it with the bug crash (their connections drop with no logout) and
    each logs in again after its restart delay (15 s at least), when the queue is empty and
    the answer comes at once. A device without the bug waits as long and does not crash."""
    net, node = serving(0.2)
    devs = devices(net, 4)
    for d in devs[:3]:
        d.late_reply_crash_s = 3.0
    net.online(*devs)
    logins = net.stats.logins
    net.run(18)
    crashed = [d for d in devs if d.late_reply_crash_s and d.answers
               and d.answers[0] - d.attached_at > 3.0]
    assert len(crashed) >= 2 and all(d.state != "online" for d in crashed)
    assert net.stats.client_crashes == len(crashed)
    net.run(120)
    for d in crashed:  # back, answered at once this time, and not crashed again
        assert d.state == "online" and len(d.answers) == 2
        assert d.answers[1] - d.attached_at < 1.0
    assert net.stats.logins == logins + len(crashed)
    assert net.stats.client_crashes == len(crashed)
    bugless = devs[3]
    assert bugless.state == "online" and len(bugless.answers) == 1


def test_a_crash_of_the_supernode_drops_its_queue():
    """What waits is in the supernode's memory: a crash loses it, and the new incarnation
    starts with an empty queue and no answer left to send."""
    net, node = serving(0.01)
    devs = devices(net, 3)
    net.online(*devs)
    assert node.offline.waiting() == 2
    for dev in devs:
        dev.stop()  # they do not come back: only the old queue could answer them
    node.crash()
    node.restart()
    assert node.offline.waiting() == 0
    net.run(150)  # past the old queue's next turn (at 100 s): it answers nobody
    assert node.offline.answered == 1 and node.offline.waiting() == 0
    assert [len(d.answers) for d in devs] == [1, 0, 0]


@pytest.mark.parametrize("rate", [0, -1.0])
def test_a_rate_must_be_above_zero(rate):
    net = LegacyNet(1)
    with pytest.raises(ValueError, match="above 0"):
        net.supernodes["sn0"].offline.set_rate(rate)


def test_the_answer_round_trips_on_the_wire():
    f = wire.OfflineReply(waited_ms=12_345)
    assert wire.decode(wire.encode(f)) == f
