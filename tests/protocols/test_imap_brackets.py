"""Bytes inside an atom's brackets are 7-bit, as the rest of the atom (RFC 3501 section 9).

The tokenizer skipped from "[" to "]" without looking, then decoded the atom as ASCII: a tag
"[\\x80]" raised UnicodeDecodeError out of the machine (found by tests/protocols/test_fuzz.py).
It is now a BAD, and the session goes on; the twin shows a well-formed section still parses.
"""

from __future__ import annotations

import pytest
from _support import imap_session

from roundtrip.protocols.imap import IMAPConnection
from roundtrip.store import Store

ALICE, PASSWORD = "alice@example.com", "secret"


def _session() -> tuple[Store, IMAPConnection]:
    store = Store()
    store.add_user(ALICE, PASSWORD)
    store.deliver(ALICE, b"From: <bob@example.org>\r\nSubject: hi\r\n\r\nbody\r\n")
    conn = imap_session(store, ALICE, PASSWORD)
    list(conn.receive_data(b"s SELECT INBOX\r\n"))
    conn.data_to_send()
    return store, conn


@pytest.mark.parametrize(
    "line",
    [b"[\x80]", b"[\x80] NOOP", b"a FETCH 1 BODY[\xff]", b"a FETCH 1 BODY[HEADER\x01]"],
)
def test_a_non_ascii_or_control_byte_in_brackets_is_bad_and_the_session_goes_on(
    line: bytes,
) -> None:
    _, conn = _session()
    list(conn.receive_data(line + b"\r\n"))
    out = conn.data_to_send()
    assert b" BAD " in out
    list(conn.receive_data(b"n NOOP\r\n"))
    assert b"n OK" in conn.data_to_send()


def test_a_well_formed_section_still_parses() -> None:
    _, conn = _session()
    list(conn.receive_data(b"a FETCH 1 BODY.PEEK[HEADER.FIELDS (Subject)]\r\n"))
    out = conn.data_to_send()
    assert b"Subject: hi" in out and b"a OK" in out
