"""A repeated SEARCH answers from the session's last result while nothing changed (issue #17).

A client polling for new mail repeats one search; over 100,000 messages SEARCH SUBJECT took
113 ms each time (Dovecot 0.5 ms). The selected mailbox's view keeps its last answer, keyed on
the mailbox's modseq, its own UIDs and the search itself. These tests change the mailbox in
every way a result depends on (a delivery, another session's flag change and expunge, this
session's own STORE, sequence numbers against UIDs) and require the new answer each time;
each step's twin is the answer before the change, which must differ from the one after.
"""

from __future__ import annotations

import re

from _support import imap_session

from roundtrip.protocols.imap import IMAPConnection
from roundtrip.store import Store

ALICE = "alice@example.com"
PASSWORD = "secret"


def _raw(subject: str) -> bytes:
    return f"From: <bob@example.org>\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def _cmd(conn: IMAPConnection, line: str) -> bytes:
    list(conn.receive_data(line.encode() + b"\r\n"))
    return conn.data_to_send()


def _hits(conn: IMAPConnection, command: str) -> list[int]:
    out = _cmd(conn, "s " + command)
    assert b"s OK SEARCH completed" in out, out
    found = re.search(rb"^\* SEARCH((?: \d+)*)\r$", out, re.M)
    assert found is not None, out
    return [int(n) for n in found.group(1).split()]


def _world() -> tuple[Store, IMAPConnection, IMAPConnection]:
    store = Store()
    store.add_user(ALICE, PASSWORD)
    for subject in ("apple pie", "banana", "apple tart", "cherry"):
        store.deliver(ALICE, _raw(subject))
    me, other = imap_session(store, ALICE, PASSWORD), imap_session(store, ALICE, PASSWORD)
    _cmd(me, "a SELECT INBOX")
    _cmd(other, "a SELECT INBOX")
    return store, me, other


def test_a_repeated_search_gives_the_same_answer() -> None:
    _, me, _ = _world()
    first = _hits(me, "SEARCH SUBJECT apple")
    assert first == [1, 3]
    assert _hits(me, "SEARCH SUBJECT apple") == first
    assert _hits(me, "UID SEARCH SUBJECT apple") == [1, 3]


def test_a_delivery_changes_the_answer() -> None:
    store, me, _ = _world()
    before = _hits(me, "SEARCH SUBJECT apple")
    store.deliver(ALICE, _raw("apple crumble"))
    _cmd(me, "n NOOP")  # the view learns of message 5
    after = _hits(me, "SEARCH SUBJECT apple")
    assert after == [1, 3, 5] != before


def test_another_sessions_flags_and_expunge_change_the_answer() -> None:
    _, me, other = _world()
    assert _hits(me, "SEARCH FLAGGED") == []
    _cmd(other, "f STORE 2 +FLAGS (\\Flagged)")
    assert _hits(me, "SEARCH FLAGGED") == [2]
    before = _hits(me, "UID SEARCH SUBJECT apple")
    _cmd(other, "d STORE 1 +FLAGS (\\Deleted)")
    _cmd(other, "e EXPUNGE")
    _cmd(me, "n NOOP")  # the expunge is announced; sequence numbers move
    assert _hits(me, "UID SEARCH SUBJECT apple") == [3] != before
    assert _hits(me, "SEARCH SUBJECT apple") == [2]


def test_this_sessions_own_store_changes_the_answer() -> None:
    _, me, _ = _world()
    assert _hits(me, "SEARCH UNSEEN") == [1, 2, 3, 4]
    _cmd(me, "f STORE 1:2 +FLAGS.SILENT (\\Seen)")
    assert _hits(me, "SEARCH UNSEEN") == [3, 4]


def test_sequence_numbers_and_uids_are_not_confused() -> None:
    _, me, _ = _world()
    _cmd(me, "d STORE 1 +FLAGS (\\Deleted)")
    _cmd(me, "e EXPUNGE")
    assert _hits(me, "SEARCH SUBJECT apple") == [2]
    assert _hits(me, "UID SEARCH SUBJECT apple") == [3]
    assert _hits(me, "SEARCH SUBJECT apple") == [2]
