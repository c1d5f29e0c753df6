"""A mailbox's keywords, kept as messages come, change flags and go (issue #17: SELECT).

IMAP's SELECT lists the keywords in use in its FLAGS response. It used to find them by
reading every message's flags, which made SELECT O(messages): 12.5 ms at 10,000 messages in
`python -m benchmarks.run` (0.2 ms before keywords were listed). ``Mailbox.keywords()`` is now
kept by the store on every delivery, flag change and expunge, on both backends; these tests
hold it to the keywords recomputed from the messages after random operations, and the twin
shows the comparison catches a keyword left behind.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import backend_store, imap_session

from roundtrip.maildir import MaildirStore
from roundtrip.store import Mailbox, Store

ALICE = "alice@example.com"
RAW = b"From: <bob@example.org>\r\nSubject: one\r\n\r\nbody\r\n"
FLAGS = ("\\Seen", "\\Flagged", "$label1", "$label2", "Junk", "$Forwarded")


@pytest.fixture(params=["memory", "maildir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with backend_store(request.param, tmp_path / "mail", {ALICE: "secret"}) as s:
        yield s


def _recomputed(box: Mailbox) -> set[str]:
    return {f for msg in box for f in msg.flags if not f.startswith("\\")}


def _random_flags(rng: random.Random) -> frozenset[str]:
    return frozenset(rng.sample(FLAGS, rng.randint(0, 3)))


@pytest.mark.parametrize("seed", range(8))
def test_keywords_follow_deliveries_flag_changes_and_expunges(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        box = store.mailbox(ALICE, "INBOX")
        uids = box.uids()
        action = rng.choice(("deliver", "deliver", "flags", "expunge"))
        if action == "deliver" or not uids:
            store.deliver(ALICE, RAW, flags=_random_flags(rng))
        elif action == "flags":
            chosen = rng.sample(uids, rng.randint(1, min(4, len(uids))))
            store.set_flags(ALICE, "INBOX", {uid: _random_flags(rng) for uid in chosen})
        else:
            store.expunge(ALICE, "INBOX", rng.sample(uids, rng.randint(1, min(3, len(uids)))))
        box = store.mailbox(ALICE, "INBOX")
        assert box.keywords() == _recomputed(box)


def test_the_comparison_catches_a_keyword_left_behind(store: Store) -> None:
    """The twin: a keyword whose last message went, if still listed, differs."""
    msg = store.deliver(ALICE, RAW, flags={"$label1"})
    store.deliver(ALICE, RAW, flags={"$label2"})
    box = store.mailbox(ALICE, "INBOX")
    before = box.keywords()
    store.expunge(ALICE, "INBOX", [msg.uid])
    assert before != _recomputed(store.mailbox(ALICE, "INBOX")) == {"$label2"}
    assert store.mailbox(ALICE, "INBOX").keywords() == {"$label2"}


def test_keywords_are_counted_again_when_a_maildir_is_reopened(tmp_path: Path) -> None:
    first = MaildirStore(tmp_path / "mail")
    first.add_user(ALICE, "secret")
    first.deliver(ALICE, RAW, flags={"$label1", "\\Seen"})
    gone = first.deliver(ALICE, RAW, flags={"$label2"})
    first.expunge(ALICE, "INBOX", [gone.uid])
    first.close()
    again = MaildirStore(tmp_path / "mail")
    try:
        box = again.mailbox(ALICE, "INBOX")
        assert box.keywords() == _recomputed(box) == {"$label1"}
    finally:
        again.close()


def _select_flags(store: Store) -> bytes:
    conn = imap_session(store, ALICE, "secret")
    list(conn.receive_data(b"b SELECT INBOX\r\n"))
    out = conn.data_to_send()
    return next(line for line in out.split(b"\r\n") if line.startswith(b"* FLAGS ("))


def test_select_lists_the_keywords_in_use_and_drops_expunged_ones() -> None:
    store = Store()
    store.add_user(ALICE, "secret")
    kept = store.deliver(ALICE, RAW, flags={"$label1"})
    gone = store.deliver(ALICE, RAW, flags={"$label2"})
    assert _select_flags(store).endswith(b"\\Draft $label1 $label2)")
    store.expunge(ALICE, "INBOX", [gone.uid])
    assert _select_flags(store).endswith(b"\\Draft $label1)")
    store.set_flags(ALICE, "INBOX", {kept.uid: frozenset({"\\Seen"})})
    assert _select_flags(store) == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
