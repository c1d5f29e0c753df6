"""SEARCH HEADER Message-ID "<id>" goes through the store's index and agrees with a scan."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _support import backend_store

from roundtrip.protocols.imap import IMAPConnection
from roundtrip.store import Store

USER = "u@example.org"


def _session(store: Store) -> IMAPConnection:
    conn = IMAPConnection(
        store, hostname="h", secure=True, starttls_available=False, clock=time.time
    )
    conn.data_to_send()
    conn.receive_data(f"a LOGIN {USER} pw\r\nb SELECT INBOX\r\n".encode())
    conn.data_to_send()
    return conn


def _search(conn: IMAPConnection, command: bytes) -> bytes:
    conn.receive_data(command)
    return conn.data_to_send().split(b"\r\n")[0]


@pytest.fixture
def store() -> Store:
    store = Store()
    store.add_user(USER, "pw")
    for i in range(20):
        mid = "<dup@example.com>" if i in (3, 11) else f"<m{i}@example.com>"
        store.deliver(USER, f"Message-ID: {mid}\r\nSubject: {i}\r\n\r\nbody\r\n".encode())
    return store


@pytest.mark.parametrize("command", [b"UID SEARCH", b"SEARCH"])
def test_search_message_id_index_matches_the_scan(store: Store, command: bytes) -> None:
    store.expunge(USER, "INBOX", [1])  # sequence numbers now differ from UIDs
    conn = _session(store)
    fast = _search(conn, b"s " + command + b' HEADER Message-ID "<DUP@example.com>"\r\n')
    # The same question asked in a shape the index does not take: a full scan.
    slow = _search(conn, b"t " + command + b' HEADER Message-ID "DUP@example.com>"\r\n')
    assert fast == slow
    assert fast == (b"* SEARCH 4 12" if command == b"UID SEARCH" else b"* SEARCH 3 11")


def test_search_index_follows_expunge_and_delivery(store: Store) -> None:
    conn = _session(store)
    assert _search(conn, b'a UID SEARCH HEADER Message-ID "<m5@example.com>"\r\n') == (
        b"* SEARCH 6"
    )
    store.expunge(USER, "INBOX", [6])
    store.deliver(USER, b"Message-ID: <m5@example.com>\r\n\r\nagain\r\n")
    conn.receive_data(b"n NOOP\r\n")
    conn.data_to_send()
    assert _search(conn, b'b UID SEARCH HEADER Message-ID "<m5@example.com>"\r\n') == (
        b"* SEARCH 21"
    )
    assert _search(conn, b'c UID SEARCH HEADER Message-ID "<nope@example.com>"\r\n') == (
        b"* SEARCH"
    )


HEAD = b"Received: from a by mx.example.org; Thu, 3 Dec 2026 10:00:00 +0000\r\n"


@pytest.mark.parametrize("backend", ["memory", "maildir"])
def test_search_message_id_index_skips_a_body_line(backend: str, tmp_path: Path) -> None:
    """A message kept as the MX's fields plus bytes that start with the empty line has no
    Message-ID of its own: the index and the scan both skip the one in its body, and both
    find a real field (the twin)."""
    with backend_store(backend, tmp_path, {USER: "pw"}) as store:
        store.deliver(USER, b"\r\nMessage-ID: <body@example.com>\r\n\r\nx\r\n", head=HEAD)
        store.deliver(USER, b"Message-ID: <head@example.com>\r\n\r\nx\r\n", head=HEAD)
        conn = _session(store)
        for tag, key, want in (
            (b"a", b'"<body@example.com>"', b"* SEARCH"),
            (b"b", b'"body@example.com>"', b"* SEARCH"),
            (b"c", b'"<head@example.com>"', b"* SEARCH 2"),
            (b"d", b'"head@example.com>"', b"* SEARCH 2"),
        ):
            assert _search(conn, tag + b" UID SEARCH HEADER Message-ID " + key + b"\r\n") == want


#: Message-ID fields in which the id is contained but is not the whole value.
CONTAINED = [
    b"Message-ID: <c1@example.com> (a comment after it)\r\n\r\nx\r\n",
    b"Message-ID: <first@example.com>\r\nMessage-ID: <c2@example.com>\r\n\r\nx\r\n",
    b"Message-ID: <other@example.com><c3@example.com>\r\n\r\nx\r\n",
    b"Message-ID:\r\n <c4@example.com>\r\n\r\nx\r\n",
]
#: Fields that do not contain the id searched for (the twins).
NOT_CONTAINED = [
    b"Message-ID: <xc5@example.com>\r\n\r\nx\r\n",  # a longer id that ends like it
    b"Subject: <c5@example.com>\r\n\r\nx\r\n",  # another field
    b"Message-ID: <c5@example.com.evil>\r\n\r\nx\r\n",
]


@pytest.mark.parametrize("backend", ["memory", "maildir"])
def test_search_message_id_index_finds_an_id_the_field_contains(
    backend: str, tmp_path: Path
) -> None:
    """RFC 3501 section 6.4.4: HEADER matches a field that contains the string. The index
    finds what a scan finds: an id followed by a comment, in a second field, or second in
    its field; and neither finds a field that only looks alike."""
    with backend_store(backend, tmp_path, {USER: "pw"}) as store:
        for raw in CONTAINED + NOT_CONTAINED:
            store.deliver(USER, raw)
        conn = _session(store)
        for n in (1, 2, 3, 4, 5):
            wanted = f"<C{n}@example.com>".encode()
            fast = _search(conn, b's UID SEARCH HEADER Message-ID "' + wanted + b'"\r\n')
            slow = _search(conn, b't UID SEARCH HEADER Message-ID "' + wanted[1:] + b'"\r\n')
            if n <= 4:
                assert fast == slow == f"* SEARCH {n}".encode(), wanted
            else:
                # "<c5@example.com>" is in no field; "c5@example.com>" is, inside <xc5@...>.
                assert fast == b"* SEARCH", fast
                assert slow == b"* SEARCH 5", slow
