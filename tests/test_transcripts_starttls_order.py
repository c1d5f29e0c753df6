"""After STARTTLS, a transcript shows the TLS note before the first command sent inside TLS.

A client may send its first encrypted command in the same flight as its last handshake
message (TLS 1.3 lets it write right after its Finished). On asyncio's loop that command
reached the session before the ``start_tls()`` await resumed, so it was recorded before the
note that TLS was up: the transcript read as if the command had gone in the clear. The client
here does exactly that, through a memory BIO, on 587, 143 and 110, on each loop.

The twin: a command pipelined in plaintext right behind STARTTLS (docs/security.md A3.1) is
still recorded before the TLS note, where it was sent.
"""

from __future__ import annotations

import importlib.util
import socket
import ssl
from collections.abc import Iterator

import pytest

from roundtrip import MailStack, StackConfig
from roundtrip.probes._transcript import Transcript

TIMEOUT = 5.0
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])

#: service -> (greeting and STARTTLS exchange, its last reply's marker, the first command
#: inside TLS, its reply's marker).
SERVICES = {
    "submission": (
        [(b"", b"\r\n"), (b"EHLO c.example\r\n", b"250 "), (b"STARTTLS\r\n", b"220 ")],
        b"EHLO c.example\r\n",
        b"250 ",
    ),
    "imap": (
        [(b"", b"\r\n"), (b"a0 STARTTLS\r\n", b"a0 OK")],
        b"a1 CAPABILITY\r\n",
        b"a1 OK",
    ),
    "pop3": (
        [(b"", b"\r\n"), (b"STLS\r\n", b"+OK")],
        b"CAPA\r\n",
        b"\r\n.\r\n",
    ),
}


@pytest.fixture(params=LOOPS)
def stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[MailStack]:
    monkeypatch.setenv("ROUNDTRIP_LOOP", request.param)
    with MailStack(StackConfig(domains=("example.com",))) as running:
        yield running


def _read_until(sock: socket.socket, marker: bytes, got: bytes = b"") -> bytes:
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {marker!r}: {got!r}")
        got += chunk
    return got


def _tls_then(stack: MailStack, sock: socket.socket, command: bytes, marker: bytes) -> bytes:
    """Finish the handshake and send ``command`` in the same write as the client's Finished."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = stack.client_context().wrap_bio(incoming, outgoing, server_hostname="mail.example.com")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise AssertionError("closed during the handshake") from None
            incoming.write(data)
    tls.write(command)
    sock.sendall(outgoing.read())  # Finished and the command: one flight
    got = b""
    while marker not in got:
        try:
            got += tls.read(65536)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"closed before {marker!r}: {got!r}") from None
            incoming.write(data)
    return got


def _lines(stack: MailStack, service: str) -> list[tuple[str, str]]:
    (transcript,) = stack.transcripts(service=service)
    assert isinstance(transcript, Transcript)
    return [(line.dir, line.text) for line in transcript.lines]


def _tls_note_at(lines: list[tuple[str, str]]) -> int:
    return next(i for i, (d, text) in enumerate(lines) if d == "==" and text.startswith("TLS"))


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_first_command_inside_tls_is_recorded_after_the_tls_note(
    stack: MailStack, service: str
) -> None:
    exchange, command, marker = SERVICES[service]
    host, port = stack.endpoints().address(service)
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        for sent, until in exchange:
            if sent:
                sock.sendall(sent)
            _read_until(sock, until)
        assert marker in _tls_then(stack, sock, command, marker)
        # The reply was written after the session recorded the command and its answer.
        lines = _lines(stack, service)
    tls_at = _tls_note_at(lines)
    first = command.decode().split()[-1].lower()
    inside = [i for i, (d, text) in enumerate(lines) if d == "->" and first in text.lower()]
    # Its last recording (SMTP's EHLO comes once before STARTTLS too) follows the note.
    assert inside and inside[-1] > tls_at, lines


def test_twin_plaintext_pipelined_behind_starttls_stays_before_the_note(stack: MailStack) -> None:
    host, port = stack.endpoints().address("submission")
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        _read_until(sock, b"\r\n")
        sock.sendall(b"EHLO c.example\r\n")
        _read_until(sock, b"250 ")
        sock.sendall(b"STARTTLS\r\nNOOP injected\r\n")  # the NOOP is thrown away, unread
        _read_until(sock, b"220 ")
        assert b"250 " in _tls_then(stack, sock, b"EHLO c.example\r\n", b"250 ")
        lines = _lines(stack, "submission")
    tls_at = _tls_note_at(lines)
    injected = [i for i, (d, text) in enumerate(lines) if d == "->" and "NOOP" in text]
    assert injected and injected[0] < tls_at, lines
    ehlos = [i for i, (d, text) in enumerate(lines) if d == "->" and "EHLO" in text]
    assert len(ehlos) == 2 and ehlos[0] < tls_at < ehlos[1], lines
