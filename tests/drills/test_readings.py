"""The drills' live figures against a real PostgreSQL."""

from __future__ import annotations

import pytest

from cloud.store import messages as messages_store
from cloud.store import outbox as outbox_store
from drills.readings import figures
from tests.dbfixture import make_account, make_conversation, tx

NOW = 1_800_000_000_000


@pytest.mark.db
def test_a_cloud_post_counts_as_on_legacy_once_its_row_is_done_not_while_queued(conn):
    """A queued post has its legacy GUID already: it is counted on legacy only once its
    outbox row is done."""
    a, c = make_account(conn, "ann", "dual"), make_account(conn, "carl", "legacy")
    cid = make_conversation(conn, a, c, chat="chat-ac")
    for i in range(2):
        tx(conn, messages_store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    got = tx(conn, figures, NOW + 10)
    assert (got["cloud_posts"], got["mirrored_to_legacy"], got["outbox_pending"]) == (2, 0, 2)
    [first, _] = tx(conn, outbox_store.claim_outbox, NOW + 10, 10, 1000)
    tx(conn, outbox_store.complete_outbox, first, "chat-ac", first.legacy_guid, NOW + 20)
    got = tx(conn, figures, NOW + 30)
    assert (got["mirrored_to_legacy"], got["outbox_pending"]) == (1, 1)
