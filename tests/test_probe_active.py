"""The active checks (``roundtrip probe --checks``): each against a loopback server that has the
weakness and against its twin without it.

The twins without the weakness are the embedded stack (it discards plaintext buffered before
TLS, refuses AUTH before TLS with 538, is no open relay, holds MAIL FROM to the AUTH user and
ends DATA only at CRLF.CRLF, slows down failed logins). The weak servers are small
raw-socket servers below, each with one flaw switched on; a flawed SMTP server and a POP3
server sharing its mailbox prove the smuggling verdict. The same checks against Debian's
stock and hardened Postfix are in ``tests/live/test_probe_checks_postfix.py``.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from roundtrip.certs import CertificateAuthority
from roundtrip.cli import main
from roundtrip.config import Endpoint
from roundtrip.errors import ConfigError
from roundtrip.probes.active import (
    GROUPS,
    ActiveReport,
    parse_checks,
    parse_mx,
    run_active_checks,
)
from roundtrip.stack import MailStack

TIMEOUT = 5.0


# -- a small, deliberately flawed server -------------------------------------------------------


@dataclass
class Flaws:
    """What the weak server gets wrong (all off: a plain, correct-enough server)."""

    #: Keep plaintext read before the TLS handshake and answer it inside TLS (CVE-2011-0411).
    keep_plaintext: bool = False
    #: Offer AUTH before TLS and read the credentials sent in clear.
    auth_in_clear: bool = False
    #: Take RCPT to any domain.
    open_relay: bool = False
    #: Take MAIL and RCPT without AUTH.
    no_auth_needed: bool = False
    #: Advertise PIPELINING but refuse every command after the first of each read (503).
    refuse_pipelined: bool = False
    #: Advertise CHUNKING but refuse BDAT.
    refuse_bdat: bool = False
    #: End DATA at a bare-LF dot line too (``<LF>.<LF>``, ``<LF>.<CR><LF>``), as Postfix 3.7
    #: does without ``smtpd_forbid_bare_newline`` (CVE-2023-51764).
    lenient_data_end: bool = False
    #: Accept connections and never say a word.
    silent: bool = False
    #: Close every connection at once.
    hang_up: bool = False
    #: Answer EHLO with continuation lines that never end (until the client hangs up).
    endless_ehlo: bool = False
    #: Refuse AUTH quoting the command back, credentials and all.
    echo_auth: bool = False
    #: Refuse every AUTH at once, however often (no penalty, no disconnect).
    refuse_auth: bool = False
    #: Answer MAIL without AUTH with this reply (a sender check, as Postfix's
    #: reject_unknown_sender_domain or reject_unauthenticated_sender_login_mismatch).
    mail_reply: str = ""
    #: Answer RCPT to a foreign domain with this reply (MAIL taken without AUTH).
    relay_reply: str = ""


@dataclass
class WeakServer:
    """A threaded loopback server speaking just enough SMTP, IMAP or POP3 for the checks."""

    protocol: str
    flaws: Flaws
    ca: CertificateAuthority
    #: Messages stored by DATA, read by POP3 (shared between an SMTP and a POP3 server).
    mailbox: list[bytes] = field(default_factory=list)
    sock: socket.socket = field(init=False)
    errors: list[BaseException] = field(default_factory=list)
    received: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tls = self.ca.server_context(["weak.test", "127.0.0.1"])
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self._stop.set()
        self._accept.join(TIMEOUT)
        for thread in self._threads:
            thread.join(TIMEOUT)
        self.sock.close()
        if self.errors:
            raise self.errors[0]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        session = _Session(self, conn)
        try:
            session.run()
        except (OSError, ssl.SSLError, ConnectionError):
            pass  # the client hung up: what the checks do
        except BaseException as exc:  # surfaced by close()
            self.errors.append(exc)
        finally:
            session.conn.close()


class _Session:
    def __init__(self, server: WeakServer, conn: socket.socket) -> None:
        self.server, self.conn, self.flaws = server, conn, server.flaws
        self.buf = b""
        self.secure = False
        self.authed = False

    def send(self, text: str) -> None:
        self.conn.sendall(text.encode() + b"\r\n")

    def lines(self) -> Iterator[tuple[str, bool]]:
        """Each line, and whether more input was already waiting behind it."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.conn.recv(65536)
                if not chunk:
                    return
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            text = line.decode("utf-8", "replace")
            self.server.received.append(text)
            yield text, bool(self.buf)

    def starttls(self) -> None:
        self.conn = self.server.tls.wrap_socket(self.conn, server_side=True)
        self.secure = True
        if not self.flaws.keep_plaintext:
            self.buf = b""  # RFC 3207 section 4.2

    def run(self) -> None:
        if self.flaws.silent:
            self.conn.recv(1)  # until the client gives up and closes
            return
        if self.flaws.hang_up:
            return
        {"smtp": self.smtp, "imap": self.imap, "pop3": self.pop3}[self.server.protocol]()

    def smtp(self) -> None:
        self.send("220 weak.test ESMTP")
        in_group = False
        for line, more in self.lines():
            if in_group:
                self.send("503 5.5.0 improper pipelining")
                in_group = more
                continue
            verb = line.split(" ", 1)[0].upper().split(":")[0]
            if verb == "EHLO" and self.flaws.endless_ehlo:
                for number in range(1_000_000):
                    self.send(f"250-EXTENSION{number}")
            elif verb == "EHLO":
                caps = ["weak.test", "PIPELINING", "CHUNKING"]
                if not self.secure:
                    caps.append("STARTTLS")
                if self.secure or self.flaws.auth_in_clear:
                    caps.append("AUTH PLAIN")
                for cap in caps[:-1]:
                    self.send(f"250-{cap}")
                self.send(f"250 {caps[-1]}")
            elif verb == "STARTTLS":
                self.send("220 go ahead")
                self.starttls()
            elif verb == "AUTH" and self.flaws.echo_auth:
                self.send(f"535 5.7.8 refused: {line}")
            elif verb == "AUTH" and self.secure and self.flaws.refuse_auth:
                self.send("535 5.7.8 bad credentials")
            elif verb == "AUTH":
                if self.secure:
                    self.authed = True
                    self.send("235 2.7.0 ok")
                elif self.flaws.auth_in_clear:
                    self.send("535 5.7.8 bad credentials")
                else:
                    self.send("538 5.7.11 Encryption required")
            elif verb == "MAIL" and self.flaws.mail_reply and not self.authed:
                self.send(self.flaws.mail_reply)
            elif verb == "MAIL":
                ok = (
                    self.authed
                    or self.flaws.no_auth_needed
                    or self.flaws.open_relay
                    or bool(self.flaws.relay_reply)
                )
                self.send("250 2.1.0 ok" if ok else "530 5.7.0 Authentication required")
            elif verb == "RCPT" and self.flaws.relay_reply and "example.invalid" in line:
                self.send(self.flaws.relay_reply)
            elif verb == "RCPT":
                foreign = "example.invalid" in line
                ok = (self.authed or self.flaws.no_auth_needed) and not foreign
                self.send("250 2.1.5 ok" if ok or self.flaws.open_relay else "554 5.7.1 denied")
            elif verb == "DATA":
                self.send("354 go ahead")
                self.data()
                self.send("250 2.0.0 queued")
            elif verb == "BDAT":
                self.buf = self.buf[int(line.split()[1]) :]
                self.send("502 5.5.1 no" if self.flaws.refuse_bdat else "250 2.0.0 chunk")
            elif verb == "QUIT":
                self.send("221 bye")
                return
            else:
                self.send("250 2.0.0 ok")
            in_group = self.flaws.refuse_pipelined and more

    def data(self) -> None:
        """Read the message up to its end of data and store it (without dot-unstuffing:
        the checks send no line that starts with a dot)."""
        ends = [b"\r\n.\r\n"]
        if self.flaws.lenient_data_end:
            ends += [b"\n.\n", b"\n.\r\n"]
        while True:
            found = [(self.buf.find(end), end) for end in ends if end in self.buf]
            if found:
                index, end = min(found)
                message, self.buf = self.buf[:index], self.buf[index + len(end) :]
                with self.server.lock:
                    self.server.mailbox.append(message)
                return
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("closed in DATA")
            self.buf += chunk

    def imap(self) -> None:
        self.send("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] weak")
        for line, _ in self.lines():
            tag, _, command = line.partition(" ")
            if command.upper() == "STARTTLS":
                self.send(f"{tag} OK begin TLS")
                self.starttls()
            else:
                self.send(f"{tag} OK {command} done")

    def pop3(self) -> None:
        self.send("+OK weak ready")
        for line, _ in self.lines():
            if line.upper() == "STLS":
                self.send("+OK begin TLS")
                self.starttls()
            elif line.upper() == "CAPA":
                self.send("+OK capabilities\r\nSTLS\r\n.")
            elif not self.secure:
                self.send("-ERR STLS first")
            else:
                self.pop3_command(line)

    def pop3_command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        with self.server.lock:
            box = self.server.mailbox
            if verb.upper() in ("USER", "PASS", "QUIT"):
                self.send("+OK")
            elif verb.upper() == "STAT":
                self.send(f"+OK {len(box)} {sum(len(m) for m in box)}")
            elif verb.upper() == "TOP":
                head = box[int(arg.split()[0]) - 1].split(b"\r\n\r\n", 1)[0]
                self.conn.sendall(b"+OK\r\n" + head + b"\r\n.\r\n")
            elif verb.upper() == "DELE":
                box[int(arg) - 1] = b"Subject: deleted\r\n\r\n"
                self.send("+OK")
            else:
                self.send("-ERR unknown")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture
def weak(stack: MailStack) -> Iterator[list[WeakServer]]:
    """Weak servers started by the test (``weak.append(...)``), closed and checked after."""
    started: list[WeakServer] = []
    yield started
    for server in started:
        server.close()


def _weak(
    weak: list[WeakServer], protocol: str, *, of: WeakServer | None = None, **flaws: bool | str
) -> WeakServer:
    """A weak server; with ``of``, one sharing that server's CA and mailbox."""
    if of is not None:
        server = WeakServer(protocol, Flaws(**flaws), of.ca, of.mailbox)
    else:
        server = WeakServer(protocol, Flaws(**flaws), CertificateAuthority())
    weak.append(server)
    return server


def _weak_endpoint(server: WeakServer, protocol: str = "smtp") -> Endpoint:
    return Endpoint(protocol, "starttls", "127.0.0.1", server.port, "probe@weak.test", "pw")


def _weak_context(server: WeakServer) -> ssl.SSLContext:
    return server.ca.client_context()


def _run(
    groups: tuple[str, ...],
    *,
    smtp: Endpoint,
    context: ssl.SSLContext,
    reader: Endpoint | None = None,
    mx: tuple[str, int] | None = None,
    mail_from: str = "probe@weak.test",
    rcpt_to: str = "probe@weak.test",
) -> ActiveReport:
    return run_active_checks(
        groups,
        smtp=smtp,
        reader=reader,
        context=context,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        timeout=TIMEOUT,
        mx=mx,
        # Only what the test names: a standard port 25 on this machine must not join in.
        discover=False,
    )


def _stack_run(stack: MailStack, groups: tuple[str, ...], service: str) -> ActiveReport:
    sender = stack.user(stack.config.domains[0])
    recipient = stack.user(stack.config.domains[-1])
    mx = stack.endpoints(stack.config.domains[-1])
    return _run(
        groups,
        smtp=stack.endpoint(service, sender),
        reader=stack.endpoint("imaps", recipient),
        context=stack.client_context(),
        mx=(mx.host, mx.ports["smtp"]),
        mail_from=sender.address,
        rcpt_to=recipient.address,
    )


def _codes(report: ActiveReport, code: str) -> list[str]:
    return [f.severity for f in report.findings if f.code == code]


# -- parsing -----------------------------------------------------------------------------------


def test_active_parse_checks_all_and_names() -> None:
    assert parse_checks("all") == GROUPS
    assert parse_checks("smuggling, open-relay") == ("open-relay", "smuggling")


def test_active_parse_checks_rejects_unknown_and_empty() -> None:
    with pytest.raises(ConfigError, match=r"unknown group 'relay'.*choose from"):
        parse_checks("relay")
    with pytest.raises(ConfigError, match="expected group names"):
        parse_checks(" , ")


def test_active_parse_mx() -> None:
    assert parse_mx("mx.example.org") == ("mx.example.org", 25)
    assert parse_mx("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_mx("[::1]:25") == ("::1", 25)
    with pytest.raises(ConfigError):
        parse_mx("mx:99999")


# -- STARTTLS command injection (CVE-2011-0411, RFC 3207 section 4.2) ------------------------------


@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
def test_active_starttls_injection_flags_a_server_answering_inside_tls(
    weak: list[WeakServer], protocol: str
) -> None:
    server = _weak(weak, protocol, keep_plaintext=True)
    target = _weak_endpoint(server, protocol)
    smtp = target if protocol == "smtp" else Endpoint("smtp", "implicit", "127.0.0.1", 1)
    report = _run(
        ("starttls-injection",),
        smtp=smtp,
        reader=None if protocol == "smtp" else target,
        context=_weak_context(server),
    )
    assert report.checks == {"no STARTTLS command injection": False}
    (finding,) = [f for f in report.findings if f.code == "starttls-injection"]
    assert finding.severity == "fail" and "CVE-2011-0411" in finding.message
    assert finding.server == f"127.0.0.1:{server.port}" and finding.evidence


@pytest.mark.parametrize("service", ["submission", "imap", "pop3"])
def test_active_starttls_injection_twin_stack_discards_the_plaintext(
    stack: MailStack, service: str
) -> None:
    user = stack.user()
    target = stack.endpoint(service, user)
    smtp = target if service == "submission" else stack.endpoint("submissions", user)
    report = _run(
        ("starttls-injection",),
        smtp=smtp,
        reader=None if service == "submission" else target,
        context=stack.client_context(),
    )
    assert report.checks == {"no STARTTLS command injection": True}
    assert _codes(report, "starttls-injection") == ["info"]


def test_active_starttls_injection_skipped_without_a_starttls_port(stack: MailStack) -> None:
    report = _run(
        ("starttls-injection",),
        smtp=stack.endpoint("submissions"),
        context=stack.client_context(),
    )
    assert report.ran == [] and "no STARTTLS port" in report.skipped["starttls-injection"]
    assert _codes(report, "check-skipped") == ["info"]


# -- AUTH before TLS (RFC 8314 section 3, RFC 4954 section 4) --------------------------------------


def test_active_plaintext_auth_flags_auth_offered_and_read_in_clear(
    weak: list[WeakServer],
) -> None:
    server = _weak(weak, "smtp", auth_in_clear=True)
    report = _run(("plaintext-auth",), smtp=_weak_endpoint(server), context=_weak_context(server))
    assert report.checks == {"no AUTH before TLS": False}
    (finding,) = report.findings
    assert finding.severity == "fail"
    assert "EHLO offers AUTH PLAIN before STARTTLS" in finding.message
    assert "535 5.7.8" in finding.message and "RFC 4954" in finding.message
    # Only the made-up user went over the wire in clear, never the probe's own credentials.
    (auth,) = [line for line in server.received if line.upper().startswith("AUTH")]
    assert b"roundtrip-no-such-user" in base64.b64decode(auth.split()[-1])
    assert b"pw" not in base64.b64decode(auth.split()[-1]).split(b"\0")


def test_active_plaintext_auth_twin_stack_refuses_with_538(stack: MailStack) -> None:
    report = _stack_run(stack, ("plaintext-auth",), "submission")
    assert report.checks == {"no AUTH before TLS": True}
    assert all("538 5.7.11" in f.message for f in report.findings)


# -- open relay (RFC 5321 section 7.1) -------------------------------------------------------------


def test_active_open_relay_flags_a_relay_and_never_sends_data(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp", open_relay=True)
    report = _run(
        ("open-relay",),
        smtp=_weak_endpoint(server),
        context=_weak_context(server),
        mx=("127.0.0.1", server.port),
    )
    assert report.checks == {"no open relay": False}
    (finding,) = report.findings
    assert finding.severity == "fail" and "relay-test@example.invalid" in finding.message
    assert finding.evidence[-1] == "250 2.1.5 ok"
    verbs = [line.split(" ")[0].split(":")[0].upper() for line in server.received]
    assert "DATA" not in verbs and "BDAT" not in verbs
    assert "RCPT" in verbs
    # The sender is the probe's own address: a domain that resolves (docs/active-checks.md).
    assert "MAIL FROM:<probe@weak.test>" in server.received


def _relay_run(server: WeakServer) -> ActiveReport:
    return _run(
        ("open-relay",),
        smtp=_weak_endpoint(server),
        context=_weak_context(server),
        mx=("127.0.0.1", server.port),
    )


@pytest.mark.parametrize(
    "reply",
    [
        "450 4.1.8 <probe@weak.test>: Sender address rejected: Domain not found",
        "553 5.7.1 <probe@weak.test>: Sender address rejected: not logged in",
    ],
)
def test_active_open_relay_refused_mail_is_not_tested_never_a_pass(
    weak: list[WeakServer], reply: str
) -> None:
    # The same open relay as above, only refusing this sender: RCPT is never asked, so the
    # relay is not tested (a warning quoting the reply), never "no open relay".
    server = _weak(weak, "smtp", open_relay=True, mail_reply=reply)
    report = _relay_run(server)
    assert report.checks == {}
    assert report.ran == ["open-relay"]
    (finding,) = report.findings
    assert finding.severity == "warn" and "not tested" in finding.message
    assert repr(reply) in finding.message and finding.evidence == (reply,)
    assert not any(line.upper().startswith("RCPT") for line in server.received)


@pytest.mark.parametrize(
    "reply",
    [
        # Postfix reject_unknown_recipient_domain on .invalid (unknown_address_reject_code)
        "450 4.1.2 <relay-test@example.invalid>: Recipient address rejected: Domain not found",
        # Postfix defer_unauth_destination: temporary, may be accepted on a later try
        "454 4.7.1 <relay-test@example.invalid>: Relay access denied",
        # Sender checks Postfix runs at RCPT time (smtpd_delay_reject)
        "450 4.1.8 <probe@weak.test>: Sender address rejected: Domain not found",
        # 5xx refusing an address, not relaying (RFC 3463, RFC 7505, RFC 7372)
        "550 5.1.2 <relay-test@example.invalid>: Recipient address rejected: Domain not found",
        "556 5.1.10 <relay-test@example.invalid>: Recipient address rejected: null MX",
        "550 5.7.23 <probe@weak.test>: Sender address rejected: SPF fail",
    ],
)
def test_active_open_relay_inconclusive_rcpt_reply_is_not_a_pass(
    weak: list[WeakServer], reply: str
) -> None:
    server = _weak(weak, "smtp", relay_reply=reply)
    report = _relay_run(server)
    assert report.checks == {}
    (finding,) = report.findings
    assert finding.severity == "warn" and "not tested" in finding.message
    assert repr(reply) in finding.message and finding.evidence == ("250 2.1.0 ok", reply)


@pytest.mark.parametrize(
    "reply",
    [
        "554 5.7.1 <relay-test@example.invalid>: Relay access denied",  # Postfix
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",  # Exchange
        "550 relay not permitted",  # Exim, no enhanced status code
    ],
)
def test_active_open_relay_twin_5xx_to_rcpt_after_mail_250_passes(
    weak: list[WeakServer], reply: str
) -> None:
    # The twin of the two above: MAIL taken, then a permanent refusal of the foreign RCPT.
    server = _weak(weak, "smtp", relay_reply=reply)
    report = _relay_run(server)
    assert report.checks == {"no open relay": True}
    (finding,) = report.findings
    assert finding.severity == "info" and "refused to relay" in finding.message
    assert repr(reply) in finding.message and finding.evidence == ("250 2.1.0 ok", reply)


def test_active_open_relay_twin_stack_mx_refuses(stack: MailStack) -> None:
    report = _stack_run(stack, ("open-relay",), "submissions")
    assert report.checks == {"no open relay": True}
    assert "Relay access denied" in report.findings[0].message


def test_active_open_relay_skipped_without_an_mx(stack: MailStack) -> None:
    # No --mx, and nothing listens on port 25 of 127.0.0.2 (the stack is on 127.0.0.1).
    report = _run(
        ("open-relay",),
        smtp=Endpoint("smtp", "implicit", "127.0.0.2", 1),
        context=stack.client_context(),
    )
    assert "give --mx" in report.skipped["open-relay"]


# -- submission without AUTH, spoofing (RFC 6409 section 6.1) --------------------------------------


def test_active_spoofing_flags_submission_without_auth(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp", no_auth_needed=True)
    report = _run(("spoofing",), smtp=_weak_endpoint(server), context=_weak_context(server))
    assert report.checks == {"submission requires AUTH": False}
    assert _codes(report, "unauthenticated-submission") == ["fail"]
    # The weak server takes any sender once authenticated: spoofing is a warning.
    assert _codes(report, "sender-spoofing") == ["warn"]
    assert "postmaster@weak.test" in " ".join(f.message for f in report.findings)


def test_active_spoofing_twin_stack_holds_mail_from_to_the_login(stack: MailStack) -> None:
    report = _stack_run(stack, ("spoofing",), "submissions")
    assert report.checks == {"submission requires AUTH": True}
    assert _codes(report, "unauthenticated-submission") == ["info"]
    assert _codes(report, "sender-spoofing") == ["info"]
    assert any("553" in line for f in report.findings for line in f.evidence)


# -- PIPELINING and CHUNKING (RFC 2920, RFC 3030) --------------------------------------------------


def test_active_pipelining_broken_is_a_warning(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp", refuse_pipelined=True)
    report = _run(("pipelining",), smtp=_weak_endpoint(server), context=_weak_context(server))
    assert _codes(report, "pipelining") == ["warn"]
    assert "not answered 2xx in order" in report.findings[0].message
    assert "503 5.5.0 improper pipelining" in report.findings[0].evidence
    assert report.checks == {}


def test_active_pipelining_twin_stack_answers_in_order(stack: MailStack) -> None:
    report = _stack_run(stack, ("pipelining",), "submissions")
    assert _codes(report, "pipelining") == ["info"]
    assert "four replies in order" in report.findings[0].message


def test_active_chunking_refused_bdat_is_a_warning(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp", refuse_bdat=True)
    report = _run(("chunking",), smtp=_weak_endpoint(server), context=_weak_context(server))
    assert _codes(report, "chunking") == ["warn"]
    assert "502 5.5.1 no" in report.findings[0].evidence


def test_active_chunking_twin_works_on_a_server_that_takes_bdat(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp")
    report = _run(("chunking",), smtp=_weak_endpoint(server), context=_weak_context(server))
    assert _codes(report, "chunking") == ["info"]
    assert "works" in report.findings[0].message


def test_active_chunking_not_advertised_by_the_stack(stack: MailStack) -> None:
    report = _stack_run(stack, ("chunking",), "submissions")
    assert _codes(report, "chunking") == ["info"]
    assert "not advertised" in report.findings[0].message


# -- SMTP smuggling (CVE-2023-51764) (the susceptible twin is the stock Postfix of tests/live) -----


@pytest.mark.parametrize("lenient", [True, False], ids=["lenient", "strict"])
def test_active_smuggling_found_by_the_second_message_in_the_mailbox(
    weak: list[WeakServer], lenient: bool
) -> None:
    # The same flawed server is the submission port (AUTH) and the MX (no AUTH needed).
    smtp_server = _weak(weak, "smtp", lenient_data_end=lenient, no_auth_needed=True)
    pop3_server = _weak(weak, "pop3", of=smtp_server)
    report = _run(
        ("smuggling",),
        smtp=_weak_endpoint(smtp_server),
        reader=_weak_endpoint(pop3_server, "pop3"),
        context=_weak_context(smtp_server),
        mx=("127.0.0.1", smtp_server.port),
    )
    # POP3 shows lines, not raw bytes: no report of how the variants were stored.
    submission, mx = report.findings
    assert "(submission)" in submission.message and "(MX)" in mx.message
    assert report.checks == {"no SMTP smuggling": not lenient}
    for finding in (submission, mx):
        if lenient:
            assert finding.severity == "fail"
            assert "LF.LF, LF.CRLF ended DATA early" in finding.message
            assert "CVE-2023-51764" in finding.message
            assert sum("a second message arrived" in line for line in finding.evidence) == 2
        else:
            assert finding.severity == "info" and "none of 7" in finding.message
    # Every message went to the probe's own mailbox, and was deleted from it again.
    rcpts = {line for line in smtp_server.received if line.upper().startswith("RCPT")}
    assert rcpts == {"RCPT TO:<probe@weak.test>"}
    # Seven outer messages per route, and on the lenient server two smuggled ones each.
    assert len(smtp_server.mailbox) == ((7 + 2) * 2 if lenient else 7 * 2)
    assert all(m.startswith(b"Subject: deleted") for m in smtp_server.mailbox)


def test_active_smuggling_stack_ends_data_only_at_crlf_dot_crlf(stack: MailStack) -> None:
    report = _stack_run(stack, ("smuggling",), "submissions")
    assert report.checks == {"no SMTP smuggling": True}
    verdicts = [f for f in report.findings if f.code == "smtp-smuggling"]
    assert ["(submission)" in verdicts[0].message, "(MX)" in verdicts[1].message] == [True, True]
    for finding in verdicts:
        assert finding.severity == "info" and "none of 7" in finding.message
        assert len(finding.evidence) == 7
    # Over IMAP the raw copies are read back: how each variant's bytes were stored.
    stored = [f for f in report.findings if f.code == "smuggling-bytes"]
    assert [len(f.evidence) for f in stored] == [7, 7]
    assert all(line.startswith(("LF.", "CR.", "CRLF-NUL.")) for f in stored for line in f.evidence)
    # Every probe message was removed from the probe's own mailbox again.
    recipient = stack.user(stack.config.domains[-1])
    assert not [m for m in stack.messages(recipient.address) if "smuggling" in m.subject]


def test_active_smuggling_skipped_without_a_mailbox(stack: MailStack) -> None:
    report = _run(
        ("smuggling",), smtp=stack.endpoint("submissions"), context=stack.client_context()
    )
    assert "own mailbox" in report.skipped["smuggling"]


# -- brute-force protection (report only) ------------------------------------------------


def test_active_brute_force_reports_a_server_that_never_slows_down(
    weak: list[WeakServer],
) -> None:
    server = _weak(weak, "smtp", refuse_auth=True)
    report = _run(("brute-force",), smtp=_weak_endpoint(server), context=_weak_context(server))
    (finding,) = report.findings
    assert finding.code == "auth-throttling" and finding.severity == "info"
    assert "did not slow down" in finding.message and "stayed open" in finding.message
    assert finding.evidence[0].count("535 5.7.8 bad credentials") == 3
    # Only the made-up user was tried, never the probe's own.
    tried = [base64.b64decode(line.split()[-1]) for line in server.received if "AUTH" in line]
    assert len(tried) == 3 and all(b"roundtrip-no-such-user" in t for t in tried)


def test_active_brute_force_twin_stack_slows_down() -> None:
    # A stack of its own: the penalty for failed AUTH outlives the test (per client address).
    with MailStack() as own:
        report = _stack_run(own, ("brute-force",), "submissions")
    (finding,) = report.findings
    assert finding.code == "auth-throttling" and "slows a password guesser down" in finding.message
    assert report.checks == {"AUTH refuses unknown users": True}


def test_active_brute_force_flags_a_server_accepting_anyone(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp")  # takes any credentials once TLS is up
    report = _run(("brute-force",), smtp=_weak_endpoint(server), context=_weak_context(server))
    (finding,) = report.findings
    assert finding.code == "auth-accepts-anyone" and finding.severity == "fail"
    assert report.checks == {"AUTH refuses unknown users": False}


# -- hostile servers: every group ends within its deadline -------------------------------------


@pytest.mark.parametrize("flaw", ["silent", "hang_up"])
def test_active_hostile_server_ends_every_group_in_time(weak: list[WeakServer], flaw: str) -> None:
    server = _weak(weak, "smtp", **{flaw: True})
    started = time.monotonic()
    report = run_active_checks(
        GROUPS,
        smtp=_weak_endpoint(server),
        reader=_weak_endpoint(server, "pop3"),
        context=_weak_context(server),
        mail_from="probe@weak.test",
        rcpt_to="probe@weak.test",
        timeout=1.0,
        mx=("127.0.0.1", server.port),
    )
    # Each group has its own deadline of --timeout; a silent server costs at most that.
    assert time.monotonic() - started < len(GROUPS) * 1.0 + 3.0
    assert report.ran == list(GROUPS)
    assert report.checks == {}  # nothing could be concluded: no check passes or fails
    for finding in report.findings:
        assert finding.severity == "warn", finding
        assert "not tested" in finding.message
        assert finding.server == f"127.0.0.1:{server.port}"


def test_active_endless_reply_is_cut_off_not_buffered(weak: list[WeakServer]) -> None:
    server = _weak(weak, "smtp", endless_ehlo=True)
    started = time.monotonic()
    report = _run(("pipelining",), smtp=_weak_endpoint(server), context=_weak_context(server))
    assert time.monotonic() - started < TIMEOUT
    (finding,) = report.findings
    assert finding.severity == "warn" and "a reply of more than 100 lines" in finding.message
    assert len(finding.evidence) <= 6


def test_active_credentials_echoed_by_a_server_stay_out_of_the_report(
    weak: list[WeakServer],
) -> None:
    server = _weak(weak, "smtp", echo_auth=True)
    report = _run(("pipelining",), smtp=_weak_endpoint(server), context=_weak_context(server))
    (finding,) = report.findings
    assert "not tested" in finding.message and "535 5.7.8 refused: AUTH PLAIN ****" in (
        finding.message
    )
    token = base64.b64encode(b"\0probe@weak.test\0pw").decode()
    assert any(token in line for line in server.received)  # the server did echo it
    text = finding.message + " ".join(finding.evidence)
    assert token not in text


# -- the command line --------------------------------------------------------------------------


def _stack_argv(stack: MailStack, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sender = stack.user(stack.config.domains[0])
    recipient = stack.user(stack.config.domains[-1])
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", sender.password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", recipient.password)
    smtp = stack.endpoint("submissions", sender)
    imap = stack.endpoint("imaps", recipient)
    return [
        "probe",
        "--smtp",
        smtp.url,
        "--imap",
        imap.url,
        "--cafile",
        stack.ca_file,
        "--timeout",
        str(TIMEOUT),
    ]


def test_active_cli_open_relay_fails_the_probe(
    stack: MailStack,
    weak: list[WeakServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = _weak(weak, "smtp", open_relay=True)
    argv = [*_stack_argv(stack, monkeypatch), "--checks", "open-relay,chunking"]
    code = main([*argv, "--mx", f"127.0.0.1:{server.port}", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["ok"] is False
    assert doc["active"]["ran"] == ["open-relay", "chunking"]
    assert doc["active"]["checks"] == {"no open relay": False}
    (result,) = doc["results"]
    assert result["error_step"] == "CHECKS" and "no open relay" in result["error"]
    codes = {(f["code"], f["severity"]) for f in result["findings"]}
    assert ("open-relay", "fail") in codes and ("chunking", "info") in codes


def test_active_cli_twin_stack_passes_and_says_what_it_skipped(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_stack_argv(stack, monkeypatch), "--checks", "starttls-injection,spoofing"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "active checks ran: spoofing; skipped: starttls-injection (no STARTTLS port" in (
        captured.err
    )
    assert "active check starttls-injection skipped" in captured.out
    assert "ok   check submission requires AUTH" in captured.out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checks", "nope"], "unknown group 'nope'"),
        (["--mx", "127.0.0.1"], "--mx is for --checks"),
    ],
)
def test_active_cli_usage_errors(
    stack: MailStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main([*_stack_argv(stack, monkeypatch), *extra]) == 2
    assert message in capsys.readouterr().err


def test_active_cli_checks_need_a_named_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--checks", "all"]) == 2
    assert "--checks needs --smtp" in capsys.readouterr().err
