"""The relay after a failed STARTTLS handshake: plaintext under ``none`` and ``testing``, never
under ``enforce`` (RFC 7435, RFC 8461 §5; ``protocols/delivery.handshake_fallback``).

The MX here is a raw socket that offers STARTTLS, answers it with 220, and then breaks the
handshake: it sends bytes that are not TLS, or closes the connection (or, first, completes a
handshake with a certificate from a foreign CA). Later connections are answered the same way
until one goes on in plaintext; anything that reaches DATA is recorded with whether that
connection had tried STARTTLS.
"""

from __future__ import annotations

import contextlib
import email.utils
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trustme

from roundtrip import MailStack, StackConfig
from roundtrip.protocols.delivery import FALLBACK_WORDS, handshake_fallback
from roundtrip.protocols.dns import Record
from roundtrip.protocols.tlspolicy import TLSPolicy

TIMEOUT = 10.0
DOMAIN = "example.org"
MX = "broken-tls.example.org"


# -- the rule, without I/O ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "certificate_failed", "expected"),
    [
        ("none", False, "plaintext"),
        ("none", True, "plaintext"),
        ("testing", False, "plaintext"),
        ("testing", True, "unverified-tls"),
    ],
)
def test_relay_tls_fallback_rule_goes_on_without_a_policy_that_requires_tls(
    mode: str, certificate_failed: bool, expected: str
) -> None:
    assert handshake_fallback(mode, certificate_failed=certificate_failed) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("certificate_failed", [False, True])
def test_relay_tls_fallback_rule_enforce_always_defers(certificate_failed: bool) -> None:
    assert handshake_fallback("enforce", certificate_failed=certificate_failed) == "defer"
    assert "no plaintext" in FALLBACK_WORDS["defer"]


# -- a loopback MX whose handshake fails --------------------------------------------------------


@dataclass
class Session:
    starttls: bool = False
    commands: list[str] = field(default_factory=list)
    data: bytes = b""


class BrokenTLSMX:
    """Offers STARTTLS on every connection; after ``220`` it sends garbage or hangs up."""

    def __init__(self, breakage: str) -> None:
        self.breakage = breakage
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.sessions: list[Session] = []
        self.delivered = threading.Event()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        # Wake the accept() the server thread is blocked in, then let it see the stop flag.
        socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT).close()
        self._thread.join(TIMEOUT)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed, or no connection within TIMEOUT
                continue
            if self._stop.is_set():
                conn.close()
                break
            session = Session()
            self.sessions.append(session)
            try:
                with conn:
                    conn.settimeout(TIMEOUT)
                    self._session(conn, session)
            except (ConnectionError, TimeoutError):
                pass  # the relay dropped a cached connection, or its own failed one
            except Exception as exc:  # surfaced by the tests through .errors
                self.errors.append(exc)

    @staticmethod
    def _foreign_tls() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trustme.CA().issue_cert(MX).configure_cert(context)
        return context

    @staticmethod
    def _line(sock: socket.socket, buf: bytearray) -> bytes:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("client went away")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        return line

    def _session(self, conn: socket.socket, session: Session) -> None:
        buf = bytearray()
        conn.sendall(f"220 {MX} ESMTP\r\n".encode())
        while True:
            line = self._line(conn, buf)
            session.commands.append(line.decode("ascii", "replace"))
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            if verb == b"EHLO":
                conn.sendall(f"250-{MX}\r\n250-8BITMIME\r\n250 STARTTLS\r\n".encode())
            elif verb == b"STARTTLS":
                session.starttls = True
                conn.sendall(b"220 2.0.0 ready\r\n")
                if self.breakage == "untrusted-then-garbage" and len(self.sessions) == 1:
                    # A real handshake, with a certificate from a CA the relay does not trust.
                    with contextlib.suppress(ssl.SSLError, OSError):
                        self._foreign_tls().wrap_socket(conn, server_side=True).close()
                    return
                if self.breakage != "close":
                    # Not a TLS record: the client's handshake reads this as its ServerHello.
                    conn.sendall(b"this is not a TLS server hello\r\n" * 4)
                return  # closing the socket ends the handshake either way
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while (chunk := self._line(conn, buf)) != b".":
                    session.data += chunk + b"\r\n"
                conn.sendall(b"250 2.0.0 stored\r\n")
                self.delivered.set()
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 ok\r\n")


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    # Fast retries: the enforce twin waits for a second attempt.
    with MailStack(StackConfig(retry_delays=(0.05, 0.1), queue_lifetime=30)) as running:
        yield running


def _route_to(stack: MailStack, mx: BrokenTLSMX, mode: str) -> None:
    records = [
        r
        for r in stack.default_dns_records()
        if not (r.rtype == "MX" and r.name.rstrip(".") == DOMAIN)
    ]
    records += [Record(DOMAIN, "MX", f"10 {MX}."), Record(MX, "A", "127.0.0.1")]
    stack.set_dns_records(records)
    stack.mx_ports[MX] = mx.port
    stack.tls_policies[DOMAIN] = TLSPolicy(mode=mode)  # type: ignore[arg-type]


def _submit(stack: MailStack, subject: str) -> None:
    sender = stack.user("example.com")
    raw = (
        f"From: <{sender.address}>\r\nTo: <user@{DOMAIN}>\r\nSubject: {subject}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='example.com')}\r\n"
        f"Date: {email.utils.formatdate()}\r\n\r\nhello\r\n"
    ).encode()
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [f"user@{DOMAIN}"], raw)


def _events(stack: MailStack, step: str) -> list[str]:
    assert stack.relay is not None
    return [e.detail for e in list(stack.relay.events) if e.step == step]


@pytest.fixture(params=["garbage", "close"])
def broken_mx(request: pytest.FixtureRequest, stack: MailStack) -> Iterator[BrokenTLSMX]:
    stack.reset()
    mx = BrokenTLSMX(request.param)
    try:
        yield mx
    finally:
        stack.reset()
        mx.close()
    stack.check()


@pytest.mark.parametrize("mode", ["none", "testing"])
def test_relay_tls_fallback_delivers_in_plaintext_after_a_failed_handshake(
    stack: MailStack, broken_mx: BrokenTLSMX, mode: str
) -> None:
    _route_to(stack, broken_mx, mode)
    _submit(stack, f"fallback {mode}")
    assert broken_mx.delivered.wait(TIMEOUT), (broken_mx.sessions, _events(stack, "tls-failure"))
    stack.wait_relay(lambda q: not q, TIMEOUT)
    stack.relay_idle()
    assert broken_mx.errors == []
    first, *later = broken_mx.sessions
    assert first.starttls and first.data == b""
    (carrier,) = [s for s in later if s.data]
    assert not carrier.starttls, carrier.commands  # STARTTLS was not tried a second time
    assert f"Subject: fallback {mode}".encode() in carrier.data
    (failure,) = _tls_failures = _events(stack, "tls-failure")
    assert failure.startswith(f"validation-failure: {MX}[127.0.0.1]: "), failure
    assert failure.endswith(f"(TLS policy of {DOMAIN}: {mode}; {FALLBACK_WORDS['plaintext']})")
    assert any(c.endswith(" without TLS") for c in _events(stack, "connected")), _tls_failures


def test_relay_tls_fallback_enforce_defers_and_never_sends_plaintext(
    stack: MailStack, broken_mx: BrokenTLSMX
) -> None:
    """The twin: the same MX under ``enforce`` gets no MAIL FROM outside TLS, ever."""
    _route_to(stack, broken_mx, "enforce")
    _submit(stack, "fallback enforce")
    queue = stack.wait_relay(lambda q: any(e.attempts >= 2 for e in q), TIMEOUT)
    stack.relay_idle()
    assert broken_mx.errors == []
    assert len(broken_mx.sessions) >= 2
    for session in broken_mx.sessions:
        assert session.starttls, session.commands
        assert not any(c.upper().startswith("MAIL") for c in session.commands), session.commands
    assert not broken_mx.delivered.is_set()
    (entry,) = queue
    assert "deferred, no plaintext" in entry.last_error, entry.last_error
    failures = _events(stack, "tls-failure")
    assert failures and all("enforce; deferred, no plaintext" in f for f in failures), failures
    assert stack.messages("user@example.com") == []  # deferred, not bounced


def test_relay_tls_fallback_testing_goes_from_unverified_tls_to_plaintext(
    stack: MailStack,
) -> None:
    """testing: an untrusted certificate gets a second connection with unverified TLS; when
    that handshake fails too, a third connection carries the message in plaintext."""
    stack.reset()
    mx = BrokenTLSMX("untrusted-then-garbage")
    try:
        _route_to(stack, mx, "testing")
        _submit(stack, "fallback twice")
        assert mx.delivered.wait(TIMEOUT), (mx.sessions, _events(stack, "tls-failure"))
        stack.wait_relay(lambda q: not q, TIMEOUT)
        stack.relay_idle()
        failures = _events(stack, "tls-failure")
    finally:
        stack.reset()
        mx.close()
    assert mx.errors == []
    assert [s.starttls for s in mx.sessions[:3]] == [True, True, False], mx.sessions
    assert b"Subject: fallback twice" in mx.sessions[2].data
    assert len(failures) == 2, failures
    assert failures[0].startswith("certificate-not-trusted: ")
    assert failures[0].endswith(f"testing; {FALLBACK_WORDS['unverified-tls']})")
    assert failures[1].startswith("validation-failure: ")
    assert failures[1].endswith(f"testing; {FALLBACK_WORDS['plaintext']})")
