"""The simulated population and its traffic: users, devices, chats of 2-20, a message rate.

Everything is drawn from the RNG handed in, so one seed gives one population and one stream
of messages. Sessions churn (online for an exponential time, then offline) so that offline
holding and presence expiry are exercised, not just the happy path.
"""

from __future__ import annotations

import random

import attrs
from twisted.internet.interfaces import IReactorTime

from legacy.client import Device, UserAccount


@attrs.frozen
class WorkloadConfig:
    users: int = 200
    rate: float = 20.0  # messages per second, Poisson
    chats_per_user: float = 0.5
    max_chat_size: int = 20
    two_person_share: float = 0.6
    second_device_share: float = 0.25
    initially_online: float = 0.85
    login_spread: float = 5.0  # seconds over which the first logins are spread
    session_mean: float = 300.0
    offline_mean: float = 60.0
    max_contacts: int = 50

    def __attrs_post_init__(self) -> None:
        if self.users < 2:
            raise ValueError("the workload needs at least 2 users")
        if self.rate < 0:
            raise ValueError("the message rate must not be negative")


@attrs.frozen
class Chat:
    chat_id: str
    members: tuple


def build_population(cfg: WorkloadConfig, rng: random.Random
                     ) -> tuple[list[UserAccount], list[Chat]]:
    """Users with passwords and contacts, and chats; deterministic for a given RNG state."""
    handles = [f"u{i:06d}" for i in range(cfg.users)]
    n_chats = max(1, int(cfg.users * cfg.chats_per_user))
    chats = []
    contacts: dict[str, dict[str, None]] = {h: {} for h in handles}
    for i in range(n_chats):
        if rng.random() < cfg.two_person_share:
            size = 2
        else:
            size = rng.randint(3, max(3, min(cfg.max_chat_size, cfg.users)))
        size = min(size, cfg.users)
        members = tuple(rng.sample(handles, size))
        chats.append(Chat(f"c{i:06d}", members))
        for m in members:
            c = contacts[m]
            for other in members:
                if other != m and len(c) < cfg.max_contacts:
                    c[other] = None
    users = [UserAccount(handle=h, password=f"pw-{h}", contacts=tuple(sorted(contacts[h])))
             for h in handles]
    return users, chats


class TrafficGenerator:
    """Schedules logins, session churn and message sends on the injected clock."""

    def __init__(self, cfg: WorkloadConfig, chats: list[Chat],
                 devices: dict[str, list[Device]], clock: IReactorTime,
                 rng: random.Random) -> None:
        self.cfg = cfg
        self.chats = chats
        self.devices = devices
        self.clock = clock
        self.rng = rng
        self.sending = False
        self.churning = False
        self.skipped_offline = 0
        self._counter = 0
        self._next_send = None

    def start_sessions(self) -> None:
        """Log devices in over ``login_spread`` seconds; some start offline."""
        self.churning = True
        for handle in self.devices:
            for dev in self.devices[handle]:
                if self.rng.random() < self.cfg.initially_online:
                    delay = self.rng.random() * self.cfg.login_spread
                    self.clock.callLater(delay, self._go_online, dev)
                else:
                    delay = self.rng.expovariate(1.0 / self.cfg.offline_mean)
                    self.clock.callLater(delay, self._go_online, dev)

    def _go_online(self, dev: Device) -> None:
        dev.start()
        if self.churning:
            self.clock.callLater(self.rng.expovariate(1.0 / self.cfg.session_mean),
                                 self._go_offline, dev)

    def _go_offline(self, dev: Device) -> None:
        if not self.churning:
            return
        dev.stop()
        self.clock.callLater(self.rng.expovariate(1.0 / self.cfg.offline_mean),
                             self._go_online, dev)

    def stop_churn(self) -> None:
        """Stop session churn; devices stay as they are (offline ones stay offline)."""
        self.churning = False

    def start_sending(self) -> None:
        if self.cfg.rate <= 0 or self.sending:
            return
        self.sending = True
        self._schedule()

    def stop_sending(self) -> None:
        self.sending = False
        if self._next_send is not None and self._next_send.active():
            self._next_send.cancel()
        self._next_send = None

    def _schedule(self) -> None:
        self._next_send = self.clock.callLater(self.rng.expovariate(self.cfg.rate), self._tick)

    def _tick(self) -> None:
        if not self.sending:
            return
        self._send_one()
        self._schedule()

    def _send_one(self) -> None:
        chat = self.chats[self.rng.randrange(len(self.chats))]
        for _ in range(3):
            sender = chat.members[self.rng.randrange(len(chat.members))]
            online = [d for d in self.devices[sender] if d.state == "online"]
            if online:
                dev = online[self.rng.randrange(len(online))]
                self._counter += 1
                pad = "x" * self.rng.randint(10, 200)
                dev.send(chat.chat_id, chat.members, f"m{self._counter} {pad}")
                return
        self.skipped_offline += 1

    def relogin_storm(self) -> None:
        """Every online device drops and logs in again at once (the 2010 recovery shape)."""
        for handle in self.devices:
            for dev in self.devices[handle]:
                if dev.want_online:
                    dev.stop()
                    dev.start()
