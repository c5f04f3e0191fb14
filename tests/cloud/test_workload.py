"""Simulated cloud devices (cloud/workload.py) against a recording ``CloudHTTP`` whose
presence route reads bodies with the API's own parser."""

from __future__ import annotations

import random
import uuid
from typing import Any

from twisted.internet import defer, task

from cloud.api import ApiError, PresenceUpdate
from cloud.workload import CloudDevice, WorkloadConfig, WorkloadStats


class PresenceOnlyAPI:
    """Logs anyone in; answers PUT /v1/presence as the API would (400 for a body it
    refuses); keeps every other request waiting, like an idle long poll."""

    def __init__(self) -> None:
        self.presence: list[tuple[int, Any]] = []

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                timeout_s: float | None = None) -> defer.Deferred:
        if path == "/v1/login":
            return defer.succeed((200, {"token": "t"}))
        if (method, path) == ("PUT", "/v1/presence"):
            try:
                PresenceUpdate.from_json(body)
            except ApiError as e:
                self.presence.append((e.status, body))
                return defer.succeed((e.status, {"error": {"code": e.code}}))
            self.presence.append((200, body))
            return defer.succeed((200, {}))
        return defer.Deferred()


def test_a_device_keeps_its_presence_with_a_body_the_api_accepts():
    """Presence is set at login and refreshed every third of its ttl, as whole seconds
    (a float ttl such as 60.0 was refused with a 400, so devices never showed online)."""
    clock, api, stats = task.Clock(), PresenceOnlyAPI(), WorkloadStats()
    device = CloudDevice(clock, api, "cloud-0", "pw", [uuid.uuid4()], random.Random(1),
                         WorkloadConfig(presence_ttl_s=60.0), stats)
    device.startService()
    clock.advance(0)
    clock.advance(20)
    device.stopService()
    assert [status for status, _ in api.presence] == [200, 200]
    assert api.presence[0][1] == {"status": "online", "ttl_s": 60}
    assert stats.errors == {}


def test_a_refused_presence_is_counted_as_an_error():
    """A presence the API refuses is counted by status, not ignored."""
    clock, stats = task.Clock(), WorkloadStats()

    class Refusing(PresenceOnlyAPI):
        def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                    timeout_s: float | None = None) -> defer.Deferred:
            if path == "/v1/presence":
                return defer.succeed((400, {"error": {"code": "invalid_field"}}))
            return super().request(method, path, body, token, timeout_s)

    device = CloudDevice(clock, Refusing(), "cloud-0", "pw", [uuid.uuid4()],
                         random.Random(1), WorkloadConfig(), stats)
    device.startService()
    clock.advance(0)
    device.stopService()
    assert stats.errors == {"presence_400": 1}
