"""The id check every supernode port applies (legacy/supernode/state.py)."""

from __future__ import annotations

import pytest

from legacy.supernode.state import has_control


@pytest.mark.parametrize("ch", ["\x00", "\x1f", "\x7f", "\x80", "\x85", "\x9f"])
def test_c0_del_and_c1_controls_are_found_anywhere_in_any_id(ch: str) -> None:
    assert has_control(f"cloud:{ch}id")
    assert has_control("fine", f"also fine{ch}")
    assert has_control(ch)


@pytest.mark.parametrize("text", ["", " ", "~", "\xa0", "é", "cloud:6f1c1a2e-1234", "日本"])
def test_printable_ids_pass(text: str) -> None:
    assert not has_control(text, "alice", "chat-1")
