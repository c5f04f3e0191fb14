"""The web client in real headless Chromium, served by a real ``bridgectl cloud run``.

Two browser sessions (two Chromium processes, each with a fresh profile) log in as two
users, through the page's own forms and keys, and chat: a message sent in one shows in the
other within 2 s through the notification long poll, which the page acknowledges. The
member panel adds and removes members, shows presence, and an API refusal is shown on the
page. Set WEBCLIENT_SCREENSHOTS=DIR to keep the screenshots (docs/ has them).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from cloud.model import Account
from cloud.passwords import hash_password
from cloud.store import accounts as accounts_store
from tests.bridge.ops.test_statuspage_browser import Process
from tests.bridge.test_bridge_tcp import BRIDGECTL, wait_for
from tests.chromium import CHROMIUM, SKIP_REASON, Browser, Page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)

PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password",
             "carol": "carol's long password"}
LIVE_WITHIN_S = 2.0


def make_accounts(conn) -> dict[str, uuid.UUID]:
    ids = {}
    with conn.transaction():
        for handle, password in PASSWORDS.items():
            ids[handle] = uuid.uuid4()
            accounts_store.create_account(conn, Account(ids[handle], handle, "cloud", handle),
                                          hash_password(password, iterations=1000))
    return ids


def log_in(page: Page, handle: str, password: str) -> None:
    """Through the login form, with the keyboard: type, then Enter in the password field."""
    page.wait_for("document.body.dataset.ready === 'true'")
    page.fill("login-handle", handle)
    page.fill("login-password", password)
    page.press_enter()
    page.wait_for("!document.getElementById('app-view').hidden")


def text_of(page: Page, element_id: str) -> str:
    return page.js(f"document.getElementById({json.dumps(element_id)}).textContent.trim()")


def message_bodies(page: Page) -> list[str]:
    return page.js("Array.from(document.querySelectorAll('#messages .body'), e => e.textContent)")


def shows_message(page: Page, body: str) -> str:
    return (f"Array.from(document.querySelectorAll('#messages .body'))"
            f".some(e => e.textContent === {json.dumps(body)})")


def send(page: Page, body: str) -> None:
    """Type into the message box and press Enter (which sends)."""
    page.fill("composer-body", body)
    page.press_enter()


def click(page: Page, selector: str) -> None:
    """Click the element once it is there."""
    page.wait_for(f"!!document.querySelector({json.dumps(selector)})")
    page.js(f"document.querySelector({json.dumps(selector)}).click()")


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    keep = os.environ.get("WEBCLIENT_SCREENSHOTS")
    path = (Path(keep) if keep else tmp_path) / name
    page.screenshot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cloud_api(conn, db_dsn, tmp_path):
    """A real ``bridgectl cloud run`` on a free port; its base URL."""
    env = {"BRIDGE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    api = Process([*BRIDGECTL, "cloud", "run", "--dsn", db_dsn, "--port", "0",
                   "--resend-after", "30"], env)
    try:
        m = wait_for(lambda: api.find(r"cloud API on (http://127\.0\.0\.1:\d+)/v1"), timeout=20)
        yield m.group(1)
    finally:
        rc = api.stop()
    assert rc == 0, "".join(api.lines[-20:])


def test_two_users_chat_live_in_two_browser_sessions(conn, cloud_api, tmp_path):
    """Alice and Bob, each in their own Chromium: log in, start a conversation, and each
    message shows in the other's page within 2 s, acknowledged; members and presence show,
    a member is added and removed, and refusals are shown, not a blank page."""
    ids = make_accounts(conn)
    alice_browser = Browser(tmp_path / "alice-profile")
    bob_browser = Browser(tmp_path / "bob-profile")
    try:
        alice = alice_browser.page(cloud_api + "/")
        bob = bob_browser.page(cloud_api + "/")

        # a wrong password: a visible reason, still on the login form
        alice.wait_for("document.body.dataset.ready === 'true'")
        alice.fill("login-handle", "alice")
        alice.fill("login-password", "not the password")
        alice.press_enter()
        alice.wait_for("document.getElementById('login-error').textContent.length > 0")
        assert "wrong password" in text_of(alice, "login-error")
        assert alice.js("document.getElementById('app-view').hidden") is True

        log_in(alice, "alice", PASSWORDS["alice"])
        log_in(bob, "bob", PASSWORDS["bob"])
        assert text_of(alice, "me-handle") == "alice"

        # Alice starts a conversation with Bob through the form; it opens for her
        click(alice, "#new-conversation summary")
        alice.fill("new-members", "bob")
        alice.fill("new-title", "Weekend plans")
        alice.js("document.getElementById('new-conversation-form').requestSubmit()")
        alice.wait_for("document.getElementById('conversation-title').textContent === "
                       "'Weekend plans'")
        cid = alice.wait_for("document.querySelector('#conversation-list "
                             "button[aria-current=\"true\"]')?.dataset.conversationId")
        assert conn.execute("SELECT count(*) FROM members WHERE conversation_id = %s",
                            (uuid.UUID(cid),)).fetchone()[0] == 2

        # her first message reaches Bob's list (a conversation new to his page), unread
        send(alice, "Hello Bob, ready for Saturday?")
        alice.wait_for(shows_message(alice, "Hello Bob, ready for Saturday?"))
        bob.wait_for(f"document.querySelector('[data-conversation-id=\"{cid}\"] .unread')"
                     "?.textContent === '1'", timeout=5)
        click(bob, f'[data-conversation-id="{cid}"]')
        bob.wait_for(shows_message(bob, "Hello Bob, ready for Saturday?"))
        assert bob.js("document.getElementById('messages').getAttribute('aria-live')") == \
            "polite"

        # live both ways, each within 2 s of the Enter key
        for sender, receiver, body in ((bob, alice, "Yes! Bring the map."),
                                       (alice, bob, "Will do. 10 am at the station."),
                                       (bob, alice, "See you there.")):
            started = time.monotonic()
            send(sender, body)
            receiver.wait_for(shows_message(receiver, body), timeout=LIVE_WITHIN_S)
            assert time.monotonic() - started < LIVE_WITHIN_S, body
        expected = ["Hello Bob, ready for Saturday?", "Yes! Bring the map.",
                    "Will do. 10 am at the station.", "See you there."]
        wait_for(lambda: message_bodies(alice) == expected and message_bodies(bob) == expected,
                 timeout=5, every=0.05)
        mine = alice.js("Array.from(document.querySelectorAll('#messages .message'), "
                        "e => e.classList.contains('mine'))")
        assert mine == [True, False, True, False]

        # every notification the pages were sent is acknowledged by them
        def all_acked() -> bool:
            states = conn.execute("SELECT state, count(*) FROM notifications GROUP BY state"
                                  ).fetchall()
            return dict(states) == {"acked": 4}
        wait_for(all_acked, timeout=10, every=0.1)

        # presence: each sees the other online, and Bob's "busy" reaches Alice's panel
        alice.js("refreshPresence()")
        alice.wait_for(f"document.querySelector('#member-list li[data-account-id="
                       f"\"{ids['bob']}\"] .presence')?.dataset.status === 'online'")
        bob.js("(() => { const s = document.getElementById('my-status'); s.value = 'busy'; "
               "s.dispatchEvent(new Event('change')); })()")
        alice.wait_for(f"(refreshPresence(), document.querySelector('#member-list li"
                       f"[data-account-id=\"{ids['bob']}\"] .presence')?.dataset.status "
                       "=== 'busy')", timeout=5, every=0.2)
        screenshot(alice, "webclient-conversation.png", tmp_path)

        # members: an unknown handle is refused visibly; Carol is added, then removed
        alice.fill("add-member-handle", "nobody-by-that-name")
        alice.press_enter()
        alice.wait_for("document.getElementById('member-error').textContent.length > 0")
        assert "not_found" in text_of(alice, "member-error")
        alice.fill("add-member-handle", "carol")
        alice.press_enter()
        alice.wait_for(f"!!document.querySelector('#member-list li[data-account-id="
                       f"\"{ids['carol']}\"]')")
        assert text_of(alice, "member-error") == ""
        click(alice, f'#member-list li[data-account-id="{ids["carol"]}"] button')
        alice.wait_for(f"!document.querySelector('#member-list li[data-account-id="
                       f"\"{ids['carol']}\"]')")
        members = {row[0] for row in conn.execute(
            "SELECT account_id FROM members WHERE conversation_id = %s", (uuid.UUID(cid),))}
        assert members == {ids["alice"], ids["bob"]}
        remove_label = alice.js(f"document.querySelector('#member-list li[data-account-id="
                                f"\"{ids['bob']}\"] button').getAttribute('aria-label')")
        assert remove_label == "Remove bob from this conversation"

        # Bob is removed: his page drops the conversation at its next look at the list (every
        # 20 s; asked at once here) and says why
        click(alice, f'#member-list li[data-account-id="{ids["bob"]}"] button')
        wait_for(lambda: conn.execute("SELECT count(*) FROM members WHERE conversation_id = "
                                      "%s", (uuid.UUID(cid),)).fetchone()[0] == 1, timeout=5)
        bob.js("refreshConversations()")
        bob.wait_for(f"!document.querySelector('[data-conversation-id=\"{cid}\"]')")
        assert "no longer a member" in text_of(bob, "error-text")
        assert bob.js("document.getElementById('error').hidden") is False

        # a narrow screen: one column, nothing wider than the screen
        narrow = alice_browser.page(cloud_api + "/", width=380, height=800)
        narrow.wait_for("!document.getElementById('app-view').hidden || "
                        "!document.getElementById('login-view').hidden")
        if not narrow.js("document.getElementById('login-view').hidden"):
            log_in(narrow, "alice", PASSWORDS["alice"])
        click(narrow, f'[data-conversation-id="{cid}"]')
        narrow.wait_for(shows_message(narrow, "See you there."))
        assert narrow.js("document.documentElement.scrollWidth") <= 380
        assert narrow.js("getComputedStyle(document.getElementById('app-view')).display") == \
            "block"
        screenshot(narrow, "webclient-narrow.png", tmp_path)

        # logging out returns to the form; the token is gone from the tab
        click(alice, "#logout")
        alice.wait_for("!document.getElementById('login-view').hidden")
        assert alice.js("sessionStorage.getItem('chat-session')") is None
        screenshot(alice, "webclient-login.png", tmp_path)
    finally:
        alice_browser.close()
        bob_browser.close()
