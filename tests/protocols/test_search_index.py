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
