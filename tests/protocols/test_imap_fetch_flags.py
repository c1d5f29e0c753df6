"""FETCH of FLAGS and UID alone answers exactly as the general FETCH path does (issue #17).

A client syncing a folder fetches the flags of every message (``FETCH 1:* (FLAGS)``,
``UID FETCH 1:* (UID FLAGS)``); at 100,000 messages the general path took 688 ms and the
flags-only path 340 ms (``IMAPConnection._fetch_flags``). These tests run both paths over
random mailboxes (system flags, keywords announced on the way, ``\\Recent`` in one session
and not in the other, a message expunged by another session and not yet announced) and
require the same bytes; the twin shows the comparison sees one flag of one message.
"""

from __future__ import annotations

import random

import pytest
from _support import imap_session

import roundtrip.protocols.imap as imap_module
from roundtrip.protocols.imap import IMAPConnection
from roundtrip.store import Store

ALICE = "alice@example.com"
PASSWORD = "secret"
RAW = b"From: <bob@example.org>\r\nSubject: one\r\n\r\nbody\r\n"
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$label1", "$Forwarded", "Junk")


def _connection(store: Store) -> IMAPConnection:
    return imap_session(store, ALICE, PASSWORD)


def _cmd(conn: IMAPConnection, line: str) -> bytes:
    list(conn.receive_data(line.encode() + b"\r\n"))
    return conn.data_to_send()


def _mailbox(seed: int) -> Store:
    rng = random.Random(seed)
    store = Store()
    store.add_user(ALICE, PASSWORD)
    for _ in range(rng.randint(5, 40)):
        store.deliver(ALICE, RAW, flags=rng.sample(FLAGS, rng.randint(0, 3)))
    return store


def _session_output(store: Store, command: str, *, fast: bool, seed: int) -> bytes:
    """SELECT in a first session (it claims \\Recent), deliver and change more, then run
    ``command`` in a second session that selected before the changes."""
    rng = random.Random(seed)
    first, second = _connection(store), _connection(store)
    _cmd(first, "s SELECT INBOX")
    _cmd(second, "s EXAMINE INBOX" if seed % 2 else "s SELECT INBOX")
    for _ in range(rng.randint(0, 5)):
        store.deliver(ALICE, RAW, flags=rng.sample(FLAGS, rng.randint(0, 2)))
    uids = store.mailbox(ALICE, "INBOX").uids()
    changed = rng.sample(uids, min(3, len(uids)))
    store.set_flags(ALICE, "INBOX", {u: frozenset(rng.sample(FLAGS, 2)) for u in changed})
    if len(uids) > 2:  # expunged by the first session: the second has not been told yet
        _cmd(first, f"x UID STORE {uids[1]} +FLAGS (\\Deleted)")
        _cmd(first, "y EXPUNGE")
    old = imap_module._FLAGS_FAST_PATH
    imap_module._FLAGS_FAST_PATH = fast
    try:
        return _cmd(second, command)
    finally:
        imap_module._FLAGS_FAST_PATH = old


COMMANDS = (
    "f FETCH 1:* (FLAGS)",
    "f FETCH 1:* FLAGS",
    "f FETCH 1:* (UID FLAGS)",
    "f FETCH 1:* (FLAGS UID)",
    "f FETCH 2:4 (UID)",
    "f UID FETCH 1:* (FLAGS)",
    "f UID FETCH 1:* (UID FLAGS)",
    "f FETCH 1,3:* (FLAGS FLAGS)",
)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("seed", range(8))
def test_flags_only_fetch_equals_the_general_path(command: str, seed: int) -> None:
    fast = _session_output(_mailbox(seed), command, fast=True, seed=seed)
    general = _session_output(_mailbox(seed), command, fast=False, seed=seed)
    assert b"f OK FETCH completed" in fast
    assert fast == general


def test_the_comparison_sees_one_flag_of_one_message() -> None:
    """The twin: the same mailbox but one message's flags differ gives other bytes."""
    store, other = _mailbox(3), _mailbox(3)
    uid = other.mailbox(ALICE, "INBOX").uids()[0]
    flags = other.mailbox(ALICE, "INBOX").get(uid)
    assert flags is not None
    other.set_flags(ALICE, "INBOX", {uid: flags.flags ^ {"\\Flagged"}})
    command = "f FETCH 1:* (FLAGS)"
    assert _session_output(store, command, fast=True, seed=3) != _session_output(
        other, command, fast=True, seed=3
    )


def test_a_new_keyword_is_announced_before_the_fetch_that_shows_it() -> None:
    store = Store()
    store.add_user(ALICE, PASSWORD)
    store.deliver(ALICE, RAW)
    conn = _connection(store)
    _cmd(conn, "s SELECT INBOX")
    other = _connection(store)
    _cmd(other, "s SELECT INBOX")
    _cmd(other, "t STORE 1 +FLAGS ($fresh)")
    out = _cmd(conn, "f FETCH 1:* (FLAGS)")
    assert out.index(b"* FLAGS (") < out.index(b"* 1 FETCH (FLAGS ($fresh")


def _big_mailbox(count: int) -> Store:
    store = Store()
    store.add_user(ALICE, PASSWORD)
    for i in range(count):
        store.deliver(ALICE, RAW, flags=("\\Seen",) if i % 2 else ())
    return store


def test_a_long_flags_fetch_hands_its_output_over_while_it_runs() -> None:
    conn = _connection(_big_mailbox(3000))
    _cmd(conn, "s SELECT INBOX")
    handed: list[int] = []
    conn.flush_hook = lambda: handed.append(len(conn.data_to_send()))
    rest = _cmd(conn, "f FETCH 1:* (FLAGS)")
    # Two batches of 1,024 lines went to the adapter before the command ended; the rest and
    # the tagged reply came after.
    assert len(handed) == 2 and all(n > 0 for n in handed)
    assert rest.endswith(b"f OK FETCH completed\r\n") and rest.startswith(b"* 2049 FETCH")


def test_nothing_is_handed_over_early_behind_a_failed_login() -> None:
    """The twin: a failed LOGIN in the same input is an event the adapter must see first (it
    holds that reply back, docs/security.md A4.3), so the FETCH's output waits too."""
    store = _big_mailbox(3000)
    conn = imap_session(store, ALICE, PASSWORD, login=False)
    handed: list[int] = []
    conn.flush_hook = lambda: handed.append(1)
    pipelined = (
        f"a LOGIN {ALICE} wrong\r\nb LOGIN {ALICE} {PASSWORD}\r\n"
        "c SELECT INBOX\r\nd FETCH 1:* (FLAGS)\r\n"
    )
    events = conn.receive_data(pipelined.encode())
    out = conn.data_to_send()
    assert events and handed == []
    assert b"a NO" in out and out.endswith(b"d OK FETCH completed\r\n")
