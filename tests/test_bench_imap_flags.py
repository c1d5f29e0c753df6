"""The IMAP cost section's ``FETCH 1:* (FLAGS)`` read as bytes (``fetch_all_flags``).

Against a real stack over IMAPS with imaplib: the count of FETCH responses is the mailbox's
size, and imaplib goes on working on the same connection after it; the twin sends it where
the server answers BAD (no mailbox selected) and expects the failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.sections.imap_cost import check_ok, fetch_all_flags, open_imap
from roundtrip import MailStack, StackConfig

COUNT = 300


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(domains=("example.com",))) as running:
        user = running.user()
        for n in range(COUNT):
            raw = f"Subject: m{n}\r\nMessage-ID: <m{n}@example.com>\r\n\r\nbody {n}\r\n"
            running.store.deliver(user.address, raw.encode())
        yield running


@pytest.fixture
def imap(stack: MailStack) -> Iterator[Any]:
    user = stack.user()
    ep = stack.endpoints()
    conn = open_imap(
        ep.host, ep.ports["imaps"], stack.ca.ca_file(), ep.hostname, user.address, user.password
    )
    yield conn
    conn.logout()


def test_bench_fetch_all_flags_counts_every_message_and_leaves_imaplib_in_step(imap: Any) -> None:
    check_ok(imap.select("INBOX"))
    imap.store("7", "+FLAGS", r"(\Seen)")
    assert fetch_all_flags(imap) == COUNT
    assert fetch_all_flags(imap) == COUNT  # twice: nothing was left unread
    typ, data = imap.fetch("7", "(FLAGS)")
    assert typ == "OK" and rb"\Seen" in data[0]
    check_ok(imap.noop())


def test_bench_fetch_all_flags_twin_fails_on_a_refused_fetch(imap: Any) -> None:
    with pytest.raises(RuntimeError, match=r"FETCH 1:\* \(FLAGS\) answered b'RAW1 BAD"):
        fetch_all_flags(imap)  # no SELECT: the server refuses
    check_ok(imap.noop())
