"""A served FETCH of every message's flags, sent while it is built (issue #17).

``IMAPConnection._fetch_flags`` hands batches to the connection while it answers, so a client
reads the first responses while the rest are built (FETCH 1:* (FLAGS) over 100,000 messages:
510 ms with imaplib against Dovecot's 587 ms, `python -m benchmarks.run --only imap`). These
tests read a large mailbox's flags with imaplib over IMAPS and check every message's answer
against the store; the twin changes one message's flags and must see the difference.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator

import pytest

from roundtrip import MailStack, StackConfig

COUNT = 5000
RAW = b"From: <bob@example.org>\r\nSubject: bulk\r\n\r\nbody\r\n"
FLAGS = (("\\Seen",), (), ("\\Flagged", "$label1"), ("\\Seen", "\\Answered"))
LINE = re.compile(rb"^(\d+) \(UID (\d+) FLAGS \(([^)]*)\)\)$")


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(domains=("example.com",))) as running:
        user = running.user("example.com")
        for i in range(COUNT):
            running.store.deliver(user.address, RAW, flags=FLAGS[i % len(FLAGS)])
        yield running


def _flags_over_imap(stack: MailStack) -> dict[int, frozenset[str]]:
    user = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=30)
    try:
        imap.login(user.address, user.password)
        imap.select("INBOX")
        typ, data = imap.fetch("1:*", "(UID FLAGS)")
        assert typ == "OK"
    finally:
        imap.logout()
    found: dict[int, frozenset[str]] = {}
    for item in data:
        assert isinstance(item, bytes), item
        m = LINE.match(item)
        assert m is not None, item
        found[int(m.group(2))] = frozenset(m.group(3).decode().split())
    return found


def _stored(stack: MailStack) -> dict[int, frozenset[str]]:
    box = stack.store.mailbox(stack.user("example.com").address, "INBOX")
    return {msg.uid: msg.flags for msg in box}


def test_every_messages_flags_arrive_over_imaps(stack: MailStack) -> None:
    over_imap = _flags_over_imap(stack)
    assert len(over_imap) == COUNT
    # \Recent is the session's (RFC 3501 2.3.2), not stored.
    assert {uid: flags - {"\\Recent"} for uid, flags in over_imap.items()} == _stored(stack)


def test_a_changed_flag_shows_in_the_next_fetch(stack: MailStack) -> None:
    """The twin: one message's flags change, and the comparison sees exactly that one."""
    before = _flags_over_imap(stack)
    address = stack.user("example.com").address
    uid = sorted(before)[COUNT // 2]
    stack.store.set_flags(address, "INBOX", {uid: frozenset({"\\Deleted"})})
    after = _flags_over_imap(stack)
    changed = [u for u in after if after[u] - {"\\Recent"} != before[u] - {"\\Recent"}]
    assert changed == [uid] and after[uid] - {"\\Recent"} == {"\\Deleted"}
