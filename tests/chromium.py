"""A headless Chromium driven over the DevTools protocol on a pipe (for the browser tests).

``--remote-debugging-pipe`` makes Chromium read protocol messages from its fd 3 and write
them to its fd 4, each a JSON object ended by a NUL byte: no websocket, no port and no
library beyond the standard one. One ``Browser`` is one Chromium process with its own fresh
profile (so two of them are two separate browser sessions); ``Page`` is a tab in it.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = next(filter(None, (shutil.which(name) for name in
                              ("chromium", "chromium-browser", "google-chrome"))), None)
SKIP_REASON = ("no chromium binary on PATH (chromium, chromium-browser or google-chrome); "
               ".ci/run installs Debian's chromium when it can")


class ProtocolError(Exception):
    """A DevTools command answered with an error, or a page script threw."""


class Browser:
    """One headless Chromium process; ``page(url)`` opens a tab."""

    def __init__(self, profile: Path, *, width: int = 1200, height: int = 800) -> None:
        assert CHROMIUM is not None
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # in the child: its end of each pipe as fd 3 and fd 4 (high fds first, so a pipe
        # that happens to be fd 3 or 4 here is not overwritten before it is duplicated)
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 100)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 100)

        def child_fds() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--no-first-run",
             "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
             "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # fds 3 and 4 are made by dup2, so inheritable; every other fd of ours is not
            close_fds=False, preexec_fn=child_fds)
        for fd in (to_chrome_r, from_chrome_w, child_r, child_w):
            os.close(fd)
        self._next_id = 0
        self._lock = threading.Lock()
        self._answers: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffered = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffered += chunk
            *messages, buffered = buffered.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                answer = self._answers.get(message.get("id", -1))
                if answer is not None:
                    answer.put(message)
                else:
                    self.events.append(message)
        for answer in list(self._answers.values()):
            answer.put({"error": {"message": "chromium closed the pipe"}})

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        """Send one command and wait for its answer's ``result``."""
        with self._lock:
            self._next_id += 1
            call_id = self._next_id
            self._answers[call_id] = answer = queue.Queue()
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        try:
            got = answer.get(timeout=timeout)
        except queue.Empty:
            raise ProtocolError(f"no answer to {method} within {timeout} s") from None
        finally:
            self._answers.pop(call_id, None)
        if "error" in got:
            raise ProtocolError(f"{method}: {got['error']}")
        return got["result"]

    def page(self, url: str, *, width: int | None = None, height: int | None = None) -> Page:
        """A new tab at *url* (optionally with its own viewport size)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        if width is not None and height is not None:
            page.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1,
                       "mobile": width < 600})
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Log.enable")
        page.send("Page.navigate", {"url": url})
        page.wait_for("location.href !== 'about:blank' && document.readyState !== 'loading'")
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (ProtocolError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


class Page:
    """One tab: evaluate script in it, wait for a condition, take a screenshot."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def js(self, expression: str) -> Any:
        """The value of *expression* in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ProtocolError(f"script failed: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, every: float = 0.02) -> Any:
        """Poll *expression* until it is truthy; its value, or AssertionError at the end."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            time.sleep(every)

    def fill(self, element_id: str, value: str) -> None:
        """Set a form field as typing would (an input event follows)."""
        self.js(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
                f"e.focus(); e.value = {json.dumps(value)}; "
                "e.dispatchEvent(new Event('input', {bubbles: true})); })()")

    def press_enter(self) -> None:
        """Press Enter in the focused element, as the keyboard does."""
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {
                "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
                "nativeVirtualKeyCode": 13, **({"text": "\r"} if kind == "keyDown" else {})})

    def errors(self) -> list[str]:
        """Uncaught script exceptions and error log entries (a Content-Security-Policy
        violation among them) of this tab so far; failed requests, which the page handles
        itself, are left out."""
        found = []
        for event in list(self.browser.events):
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(details.get("exception", {}).get("description")
                             or details.get("text", "exception"))
            elif event.get("method") == "Log.entryAdded":
                entry = params.get("entry", {})
                if entry.get("level") == "error" and entry.get("source") != "network":
                    found.append(f"{entry.get('source')}: {entry.get('text')}")
        return found

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        import base64
        data = self.send("Page.captureScreenshot", {"format": "png",
                                                    "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
