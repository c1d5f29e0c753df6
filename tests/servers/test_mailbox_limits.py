"""Abuse limits of the IMAP and POP3 listeners: login penalties, connection caps, deadlines.

docs/security.md A4.3 (brute force), A4.8 (pre-login abuse), A8.1 (slowloris), A8.2 (caps).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from roundtrip import MailStack, StackConfig, Timeouts
from roundtrip.config import SMTPLimits

TIMEOUT = 5.0
PENALTY = 0.4


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        domains=("example.org",),
        timeouts=Timeouts(login_timeout=0.6),
        smtp_limits=SMTPLimits(
            max_connections_per_ip=3, auth_penalty_initial=PENALTY, auth_penalty_max=PENALTY
        ),
    )
    with MailStack(config) as running:
        yield running


def _connect(stack: MailStack, service: str, source: str = "127.0.0.1") -> ssl.SSLSocket:
    ep = stack.endpoints()
    raw = socket.create_connection(ep.address(service), timeout=TIMEOUT, source_address=(source, 0))
    return stack.client_context().wrap_socket(raw, server_hostname=ep.hostname)


def _read_line(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def _login_imap(sock: ssl.SSLSocket, password: str) -> tuple[bytes, float]:
    started = time.monotonic()
    sock.sendall(b"a LOGIN user@example.org " + password.encode() + b"\r\n")
    line = _read_line(sock)
    return line, time.monotonic() - started


def test_imap_failed_login_reply_waits_the_penalty(stack: MailStack) -> None:
    with _connect(stack, "imaps") as sock:
        _read_line(sock)
        first, t1 = _login_imap(sock, "wrong")
        second, t2 = _login_imap(sock, "wrong")
    assert first.startswith(b"a NO [AUTHENTICATIONFAILED]") and t1 >= PENALTY * 0.9
    assert second.startswith(b"a NO [AUTHENTICATIONFAILED]") and t2 >= PENALTY * 0.9
    # The twin: another client address is not slowed, and the right password still works.
    with _connect(stack, "imaps", source="127.0.0.2") as sock:
        _read_line(sock)
        line, elapsed = _login_imap(sock, stack.user().password)
    assert line.startswith(b"a OK") and elapsed < PENALTY


def test_pop3_failed_login_reply_waits_the_penalty(stack: MailStack) -> None:
    with _connect(stack, "pop3s", source="127.0.0.3") as sock:
        _read_line(sock)
        sock.sendall(b"USER user@example.org\r\n")
        _read_line(sock)
        started = time.monotonic()
        sock.sendall(b"PASS wrong\r\n")
        line = _read_line(sock)
        elapsed = time.monotonic() - started
    assert line.startswith(b"-ERR [AUTH]") and elapsed >= PENALTY * 0.9


@pytest.mark.parametrize(
    ("service", "refusal"),
    [
        ("imaps", b"* BYE [UNAVAILABLE] 4.7.0 Error: too many connections from 127.0.0.4"),
        ("pop3s", b"-ERR [SYS/TEMP] 4.7.0 Error: too many connections from 127.0.0.4"),
    ],
)
def test_connection_cap_per_client_address(stack: MailStack, service: str, refusal: bytes) -> None:
    held = [_connect(stack, service, source="127.0.0.4") for _ in range(3)]
    try:
        for sock in held:
            assert _read_line(sock)  # greeted
        with _connect(stack, service, source="127.0.0.4") as extra:
            assert _read_line(extra).rstrip() == refusal
            assert extra.recv(1) == b""  # closed
        with _connect(stack, service, source="127.0.0.5") as other:  # another address
            assert not _read_line(other).startswith((b"* BYE", b"-ERR"))
        held.pop().close()
        deadline = time.monotonic() + TIMEOUT
        while True:  # the server notices the close asynchronously; retry until admitted
            with _connect(stack, service, source="127.0.0.4") as again:
                line = _read_line(again)
            if not line.startswith((b"* BYE", b"-ERR")) or time.monotonic() > deadline:
                break
        assert not line.startswith((b"* BYE", b"-ERR")), line
    finally:
        for sock in held:
            sock.close()


def test_trickling_client_is_dropped_at_the_login_deadline(stack: MailStack) -> None:
    with _connect(stack, "imaps", source="127.0.0.6") as sock:
        _read_line(sock)
        started = time.monotonic()
        sock.settimeout(0.1)
        closed_after = None
        for byte in b"a LOGIN user@example.org password-that-never-ends" * 4:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(64) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue  # the server said nothing: keep trickling
            except (ConnectionError, ssl.SSLError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and 0.5 <= closed_after < 2.0, closed_after


def test_complete_commands_keep_a_session_alive(stack: MailStack) -> None:
    """The twin: a client that finishes commands is not dropped by the same deadline."""
    with _connect(stack, "imaps", source="127.0.0.7") as sock:
        _read_line(sock)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            sock.sendall(b"n NOOP\r\n")
            assert _read_line(sock).startswith(b"n OK")
