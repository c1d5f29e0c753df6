"""docs/security.md catalogue A rows not covered elsewhere, end to end through a running MailStack.

Each test is named after its row (``test_a<row>_...``); docs/security.md maps every row of the
catalogue to the tests that cover it, here and in the other test modules.
"""

from __future__ import annotations

import base64
import email.utils
import imaplib
import poplib
import random
import re
import smtplib
import socket
import ssl
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from _support import AiosmtpdServer

from roundtrip import CertificateAuthority, MailStack, StackConfig
from roundtrip.config import Timeouts
from roundtrip.protocols.dns import Record

TIMEOUT = 10.0
# How long a peer must stay quiet for "nothing more was sent" (negative checks only).
SILENCE = 0.5
SENDER_DOMAIN, RCPT_DOMAIN = "example.com", "example.org"
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    # Fast retries: a deferral test must not wait for the default backoff.
    with MailStack(StackConfig(retry_delays=(0.05, 0.1), queue_lifetime=30)) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    if "stack" not in request.fixturenames:
        yield
        return
    stack: MailStack = request.getfixturevalue("stack")
    stack.reset()
    yield
    stack.check()


# -- clients ------------------------------------------------------------------------------


class RawSMTP:
    """SMTP over a raw (optionally TLS) socket: the bytes we write are the bytes sent.

    smtplib rewrites line endings and dot-stuffs, which would hide what a smuggling vector does
    (the validator's smuggling probes need the same).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def submissions(cls, stack: MailStack, domain: str = SENDER_DOMAIN) -> RawSMTP:
        ep = stack.endpoints(domain)
        plain = socket.create_connection(ep.address("submissions"), timeout=TIMEOUT)
        try:
            sock = stack.client_context().wrap_socket(plain, server_hostname=ep.hostname)
        except BaseException:
            plain.close()
            raise
        client = cls(sock)
        assert client.reply()[0].startswith("220"), "no banner"
        return client

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def cmd(self, line: str) -> list[str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def login(self, address: str, password: str) -> None:
        assert self.cmd("EHLO client.example")[0].startswith("250")
        token = base64.b64encode(f"\0{address}\0{password}".encode()).decode()
        assert self.cmd(f"AUTH PLAIN {token}")[0].startswith("235")

    def begin(self, sender: str, rcpt: str) -> None:
        assert self.cmd(f"MAIL FROM:<{sender}>")[0].startswith("250")
        assert self.cmd(f"RCPT TO:<{rcpt}>")[0].startswith("250")
        assert self.cmd("DATA")[0].startswith("354")

    def silent_for(self, seconds: float) -> bytes:
        """Whatever arrives within ``seconds`` (b"" when the server says nothing)."""
        self.sock.settimeout(seconds)
        try:
            data = self.buffer + self.sock.recv(65536)
        except TimeoutError:
            data = self.buffer
        finally:
            self.sock.settimeout(TIMEOUT)
        self.buffer = b""
        return data


def submit(
    stack: MailStack,
    raw: bytes,
    *,
    sender_domain: str = SENDER_DOMAIN,
    to: str = f"user@{RCPT_DOMAIN}",
) -> None:
    """Submit ``raw`` over 465 with smtplib (for tests that do not need exact bytes)."""
    sender = stack.user(sender_domain)
    host, port = stack.endpoints(sender_domain).address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=30) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [to], raw)


def imap_login(stack: MailStack, domain: str = RCPT_DOMAIN, timeout: float = TIMEOUT) -> Any:
    user = stack.user(domain)
    host, port = stack.endpoints(domain).address("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=timeout)
    imap.login(user.address, user.password)
    return imap


def pop_login(stack: MailStack, domain: str = RCPT_DOMAIN, timeout: float = TIMEOUT) -> Any:
    user = stack.user(domain)
    host, port = stack.endpoints(domain).address("pop3s")
    pop = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=timeout)
    try:
        pop.user(user.address)
        pop.pass_(user.password)
    except BaseException:
        pop.close()
        raise
    return pop


def message(subject: str, *, body: bytes = b"hello\r\n", extra: bytes = b"") -> bytes:
    return (
        (
            f"From: <user@{SENDER_DOMAIN}>\r\nTo: <user@{RCPT_DOMAIN}>\r\nSubject: {subject}\r\n"
            f"Message-ID: {email.utils.make_msgid(domain=SENDER_DOMAIN)}\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): an abrupt disconnect, not a polite FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- a loopback "remote MX" that records every DATA transaction -----------------------------


@dataclass
class Recorder:
    """aiosmtpd handler keeping each transaction's raw DATA bytes."""

    transactions: list[bytes] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.arrived:
            self.transactions.append(envelope.original_content)
            self.arrived.notify_all()
        return "250 2.0.0 recorded"

    def wait(self, count: int) -> list[bytes]:
        with self.arrived:
            ok = self.arrived.wait_for(lambda: len(self.transactions) >= count, TIMEOUT)
        assert ok, f"{len(self.transactions)} transactions, expected {count}"
        return list(self.transactions)


def route_domain_to(stack: MailStack, domain: str, mx_host: str, port: int) -> None:
    """Make ``domain``'s only MX ``mx_host`` (127.0.0.1, SMTP on ``port``)."""
    records = [
        r
        for r in stack.default_dns_records()
        if not (r.rtype == "MX" and r.name.rstrip(".") == domain)
    ]
    records += [Record(domain, "MX", f"10 {mx_host}."), Record(mx_host, "A", "127.0.0.1")]
    stack.set_dns_records(records)
    stack.mx_ports[mx_host] = port


@pytest.fixture
def recorder_mx(stack: MailStack) -> Iterator[Recorder]:
    """example.org's MX replaced by a recorder with a certificate from the stack CA."""
    recorder = Recorder()
    server = AiosmtpdServer(
        recorder,
        hostname="recorder.example.org",
        tls_context=stack.ca.server_context(["recorder.example.org"]),
        require_starttls=True,
    )
    try:
        route_domain_to(stack, RCPT_DOMAIN, "recorder.example.org", server.port)
        yield recorder
    finally:
        stack.reset()  # stop retries before the peer goes away
        server.close()


# -- A2.4 smuggling across our own hop (465 -> relay -> MX) --------------------------------

# docs/security.md A2.1: none of these may end DATA, at any hop.
SMUGGLING_VECTORS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
]


@pytest.mark.parametrize("vector", SMUGGLING_VECTORS, ids=repr)
def test_a2_4_smuggling_vector_is_one_transaction_end_to_end(
    stack: MailStack, recorder_mx: Recorder, vector: bytes
) -> None:
    sender = stack.user(SENDER_DOMAIN)
    token = uuid.uuid4().hex
    smuggled = (
        f"MAIL FROM:<{sender.address}>\r\nRCPT TO:<victim@{RCPT_DOMAIN}>\r\nDATA\r\n"
        f"Subject: SMUGGLED {token}\r\n\r\nx"
    ).encode()
    with closing(RawSMTP.submissions(stack)) as client:
        client.login(sender.address, sender.password)
        client.begin(sender.address, f"user@{RCPT_DOMAIN}")
        client.send(message("carrier", body=b"body") + vector + smuggled + b"\r\n.\r\n")
        reply = client.reply()
        assert reply[0].startswith("250 "), reply
        # Nothing smuggled ran on the submission server: one reply, then QUIT's.
        assert client.cmd("QUIT")[0].startswith("221")
    (raw,) = recorder_mx.wait(1)
    stack.relay_idle()
    assert len(recorder_mx.transactions) == 1, recorder_mx.transactions
    assert f"SMUGGLED {token}".encode() in raw.partition(b"\r\n\r\n")[2]
    assert not BARE_CR_OR_LF.search(raw), "stray CR or LF forwarded on the wire"
    assert stack.relay is not None and stack.relay.queue() == []


def test_a2_4_two_real_messages_are_two_transactions(
    stack: MailStack, recorder_mx: Recorder
) -> None:
    """The twin: two messages pipelined on one session are two transactions at the MX."""
    sender = stack.user(SENDER_DOMAIN)
    with closing(RawSMTP.submissions(stack)) as client:
        client.login(sender.address, sender.password)
        for subject in ("first", "second"):
            client.begin(sender.address, f"user@{RCPT_DOMAIN}")
            client.send(message(subject) + b".\r\n")
            assert client.reply()[0].startswith("250 ")
    transactions = recorder_mx.wait(2)
    assert len(transactions) == 2


# -- A3.5 protocol floor ------------------------------------------------------------------

IMPLICIT = ["submissions", "imaps", "pop3s"]


def _tls11_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _root_only(root: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    root.configure_trust(ctx)
    return ctx


def _handshake(ctx: ssl.SSLContext, address: tuple[str, int], name: str) -> str:
    """Complete a TLS handshake and return the negotiated version."""
    with (
        socket.create_connection(address, timeout=TIMEOUT) as plain,
        ctx.wrap_socket(plain, server_hostname=name) as tls,
    ):
        return str(tls.version())


@pytest.fixture(scope="module")
def tls11_possible() -> None:
    """Skip unless this OpenSSL can really negotiate TLS 1.1 (so a refusal means something)."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    with server_ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            version = _handshake(_tls11_client(), listener.getsockname(), "127.0.0.1")
        except (ssl.SSLError, OSError) as exc:
            pytest.skip(f"local OpenSSL cannot offer TLS 1.1: {exc}")
        finally:
            thread.join(TIMEOUT)
    if version != "TLSv1.1":
        pytest.skip(f"local OpenSSL negotiated {version}, not TLS 1.1")


@pytest.mark.parametrize("service", IMPLICIT)
def test_a3_5_tls11_refused(stack: MailStack, tls11_possible: None, service: str) -> None:
    ep = stack.endpoints()
    with pytest.raises(ssl.SSLError):
        _handshake(_tls11_client(), ep.address(service), ep.hostname)
    # The listener survives the refused handshake.
    assert _handshake(stack.client_context(), ep.address(service), ep.hostname).startswith("TLS")


@pytest.mark.parametrize("service", IMPLICIT)
def test_a3_5_tls13_works(stack: MailStack, service: str) -> None:
    ctx = stack.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ep = stack.endpoints()
    assert _handshake(ctx, ep.address(service), ep.hostname) == "TLSv1.3"


@pytest.mark.parametrize("service", IMPLICIT)
def test_a3_5_tls12_still_works(stack: MailStack, service: str) -> None:
    ctx = stack.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ep = stack.endpoints()
    assert _handshake(ctx, ep.address(service), ep.hostname) == "TLSv1.2"


# -- A3.6 the chain is served -------------------------------------------------------------


@pytest.fixture(scope="module")
def chained_stack() -> Iterator[tuple[MailStack, trustme.CA]]:
    """A stack whose leaves are issued by an intermediate CA under ``root``."""
    root = trustme.CA(organization_name="roundtrip root")
    # CertificateAuthority trusts the whole chain above an intermediate, so the stack's own
    # start-up check verifies; the tests below trust the root only.
    with MailStack(StackConfig(), ca=CertificateAuthority(root.create_child_ca())) as running:
        yield running, root


@pytest.mark.parametrize("service", IMPLICIT)
def test_a3_6_intermediate_is_sent(
    chained_stack: tuple[MailStack, trustme.CA], service: str
) -> None:
    running, root = chained_stack
    ep = running.endpoints()
    # Only the root is trusted: verification succeeds only if the server sent the intermediate.
    assert _handshake(_root_only(root), ep.address(service), ep.hostname).startswith("TLS")


def test_a3_6_starttls_sends_the_chain_too(chained_stack: tuple[MailStack, trustme.CA]) -> None:
    running, root = chained_stack
    ep = running.endpoints()
    with smtplib.SMTP(*ep.address("submission"), timeout=TIMEOUT) as smtp:
        smtp.starttls(context=_root_only(root))
        assert smtp.ehlo()[0] == 250


def test_a3_6_leaf_without_intermediate_fails_root_only_client() -> None:
    """The twin: a server that sends only its leaf is not verified by a root-only client."""
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("127.0.0.1")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with leaf.private_key_pem.tempfile() as key, leaf.cert_chain_pems[0].tempfile() as cert:
        server_ctx.load_cert_chain(cert, key)  # the leaf alone, no intermediate
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    with server_ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                _handshake(_root_only(root), listener.getsockname(), "127.0.0.1")
        finally:
            thread.join(TIMEOUT)


# -- A3.8 STARTTLS response injection against the relay -----------------------------------


class InjectingMX:
    """A fake MX that answers STARTTLS with ``220 go\\r\\n250 injected\\r\\n`` in one write.

    Inside TLS it records each command and whether the client sent anything before it was
    answered (which is what a client fooled by the injected 250 does).
    """

    def __init__(self, tls: ssl.SSLContext, name: str) -> None:
        self.tls = tls
        self.name = name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.tls_commands: list[str] = []
        self.early: list[bytes] = []
        self.stored: list[bytes] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(TIMEOUT)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            with conn:
                conn.settimeout(TIMEOUT)
                self._session(conn)
        except Exception as exc:  # surfaced by the test through .error
            self.error = exc

    @staticmethod
    def _line(sock: Any, buf: bytearray) -> bytes:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("client went away")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        return line

    def _session(self, conn: socket.socket) -> None:
        buf = bytearray()
        conn.sendall(f"220 {self.name} ESMTP\r\n".encode())
        assert self._line(conn, buf).upper().startswith(b"EHLO")
        conn.sendall(f"250-{self.name}\r\n250 STARTTLS\r\n".encode())
        assert self._line(conn, buf).upper() == b"STARTTLS"
        conn.sendall(b"220 go\r\n250 injected\r\n")  # one segment
        tls = self.tls.wrap_socket(conn, server_side=True)
        buf = bytearray()
        in_data = False
        while True:
            try:
                line = self._line(tls, buf)
            except ConnectionError:
                if self.stored:  # after the message, the relay may drop a cached connection
                    return
                raise
            if in_data:
                if line == b".":
                    in_data = False
                    tls.sendall(b"250 2.0.0 stored\r\n")
                else:
                    self.stored.append(line)
                continue
            self.tls_commands.append(line.decode("ascii", "replace"))
            # A client that took "250 injected" as a reply is one step ahead: it has already
            # sent its next command. A correct client waits for our answer.
            tls.settimeout(SILENCE)
            try:
                ahead = tls.recv(65536)
            except TimeoutError:
                ahead = b""
            finally:
                tls.settimeout(TIMEOUT)
            if ahead:
                self.early.append(ahead)
                buf += ahead
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                tls.sendall(f"250-{self.name}\r\n250 8BITMIME\r\n".encode())
            elif verb == b"DATA":
                in_data = True
                tls.sendall(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                tls.sendall(b"221 bye\r\n")
                tls.close()
                return
            else:
                tls.sendall(b"250 ok\r\n")


def test_a3_8_relay_ignores_injected_starttls_response(stack: MailStack) -> None:
    mx = InjectingMX(stack.ca.server_context(["inject.example.org"]), "inject.example.org")
    try:
        route_domain_to(stack, RCPT_DOMAIN, "inject.example.org", mx.port)
        submit(stack, message("injection probe"))
        queue = stack.wait_relay(
            lambda q: not q and bool(stack.relay and stack.relay.events), TIMEOUT
        )
        stack.relay_idle()
    finally:
        stack.reset()
        mx.close()
    assert mx.error is None, mx.error
    assert queue == []
    assert mx.early == [], f"client acted on the injected reply: {mx.early!r}"
    verbs = [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in mx.tls_commands]
    assert verbs[:4] == ["EHLO", "MAIL", "RCPT", "DATA"], mx.tls_commands
    assert any(b"injection probe" in line for line in mx.stored)


# -- A5.4 forged authentication results, hop limit ----------------------------------------


def test_a5_4_forged_authentication_results_is_removed(stack: MailStack) -> None:
    ep = stack.endpoints(RCPT_DOMAIN)
    forged = f"Authentication-Results: {ep.hostname}; dkim=pass header.d=example.com\r\n"
    with smtplib.SMTP(*ep.address("smtp"), timeout=TIMEOUT) as smtp:
        smtp.starttls(context=stack.client_context())
        smtp.sendmail(
            f"user@{SENDER_DOMAIN}",  # the From's domain: SPF-aligned, so DMARC passes
            [f"user@{RCPT_DOMAIN}"],
            message("forged ar", extra=forged.encode()),
        )
    stored = stack.wait_for(f"user@{RCPT_DOMAIN}", subject="forged ar", timeout=TIMEOUT)
    assert forged.strip().encode() not in stored.raw


def test_a5_4_foreign_authentication_results_is_kept(stack: MailStack) -> None:
    """The twin: another host's A-R header is trace data and stays untouched."""
    ep = stack.endpoints(RCPT_DOMAIN)
    other = "Authentication-Results: mx.elsewhere.example; spf=pass\r\n"
    with smtplib.SMTP(*ep.address("smtp"), timeout=TIMEOUT) as smtp:
        smtp.starttls(context=stack.client_context())
        smtp.sendmail(
            f"user@{SENDER_DOMAIN}",  # the From's domain: SPF-aligned, so DMARC passes
            [f"user@{RCPT_DOMAIN}"],
            message("other ar", extra=other.encode()),
        )
    stored = stack.wait_for(f"user@{RCPT_DOMAIN}", subject="other ar", timeout=TIMEOUT)
    assert other.strip().encode() in stored.raw


@pytest.mark.parametrize("hops", [49, 60])
def test_a5_4_hop_limit_through_submission(stack: MailStack, hops: int) -> None:
    # 49 arrive, each hop adds one: submission (50) then the MX (51 would be a loop).
    received = b"".join(
        b"Received: from h%d.example.net by h%d.example.net; %s\r\n"
        % (i, i + 1, email.utils.formatdate().encode())
        for i in range(hops)
    )
    raw = received + message(f"hops {hops}")
    if hops >= 50:
        with pytest.raises(smtplib.SMTPDataError) as info:
            submit(stack, raw)
        assert info.value.smtp_code == 554 and b"5.4.6" in info.value.smtp_error
        stack.assert_not_delivered(subject=f"hops {hops}", timeout=TIMEOUT)
    else:
        submit(stack, raw)
        stack.wait_for(f"user@{RCPT_DOMAIN}", subject=f"hops {hops}", timeout=TIMEOUT)


# -- A5.5 deeply nested MIME --------------------------------------------------------------


def nested_mime(depth: int, subject: str) -> bytes:
    head = message(
        subject, extra=b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b0"\r\n'
    )
    head = head.rpartition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    opening = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(depth)
    )
    leaf = b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth
    closing_ = b"".join(b"--b%d--\r\n" % i for i in range(depth, -1, -1))
    return head + opening + leaf + closing_


@pytest.mark.parametrize("depth", [300, 1000, 3000])
def test_a5_5_deep_mime_end_to_end(stack: MailStack, depth: int) -> None:
    subject = f"deep {depth}"
    raw = nested_mime(depth, subject)
    started = time.monotonic()
    submit(stack, raw)
    stored = stack.wait_for(f"user@{RCPT_DOMAIN}", subject=subject, timeout=TIMEOUT)
    assert raw.partition(b"\r\n\r\n")[2] in stored.raw  # the body was kept byte for byte
    imap = imap_login(stack)
    try:
        imap.select("INBOX")
        typ, data = imap.fetch("1", "(BODYSTRUCTURE)")
        assert typ == "OK" and b"BODYSTRUCTURE" in data[0]
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == stored.raw
        typ, data = imap.fetch("1", "(BODY.PEEK[1.1.1])")
        assert typ == "OK"
    finally:
        imap.logout()
    pop = pop_login(stack)
    try:
        lines = pop.retr(1)[1]
        assert b"\r\n".join(lines) + b"\r\n" == stored.raw
        pop.quit()
    finally:
        pop.close()
    assert time.monotonic() - started < 30
    # The servers are still up: a new session works.
    imap = imap_login(stack)
    try:
        assert imap.noop()[0] == "OK"
    finally:
        imap.logout()


# -- A5.6 huge and many headers -----------------------------------------------------------


def _fetch_subject_both_ways(stack: MailStack, subject: str) -> None:
    imap = imap_login(stack, timeout=30)
    try:
        imap.select("INBOX", readonly=True)
        typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODYSTRUCTURE)")
        assert typ == "OK" and subject.encode() in data[0][1]
        typ, data = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')
        assert typ == "OK" and data[0].split() != []
    finally:
        imap.logout()
    pop = pop_login(stack, timeout=30)
    try:
        head = b"\r\n".join(pop.top(1, 0)[1])
        assert subject.encode() in head
        pop.quit()
    finally:
        pop.close()


@pytest.mark.timeout(60)
def test_a5_6_one_megabyte_folded_header_is_refused(stack: MailStack) -> None:
    """A header field past header_size_limit (Postfix: 102400) gets 552 5.3.4, quickly."""
    folded = b"X-Huge: " + b"\r\n ".join([b"y" * 70] * (1024 * 1024 // 73)) + b"\r\n"
    assert len(folded) > 1024 * 1024 - 100
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPDataError) as info:
        submit(stack, message("huge header", extra=folded))
    assert info.value.smtp_code == 552 and b"5.3.4" in info.value.smtp_error
    stack.assert_not_delivered(subject="huge header", timeout=TIMEOUT)
    assert time.monotonic() - started < 30


def test_a5_6_header_field_just_under_the_limit_is_delivered(stack: MailStack) -> None:
    """The twin: a folded field of about 100 KB passes every hop and both readers."""
    folded = b"X-Big: " + b"\r\n ".join([b"y" * 70] * (100_000 // 73)) + b"\r\n"
    assert 90_000 < len(folded) < 102_400
    submit(stack, message("big header", extra=folded))
    stack.wait_for(f"user@{RCPT_DOMAIN}", subject="big header", timeout=30)
    _fetch_subject_both_ways(stack, "big header")


@pytest.mark.timeout(60)
def test_a5_6_hundred_thousand_headers(stack: MailStack) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
    started = time.monotonic()
    submit(stack, message("many headers", extra=many))
    stack.wait_for(f"user@{RCPT_DOMAIN}", subject="many headers", timeout=30)
    _fetch_subject_both_ways(stack, "many headers")
    assert time.monotonic() - started < 30


def test_a5_6_unfolded_megabyte_header_line_is_refused(stack: MailStack) -> None:
    """The twin: one 1 MB physical line breaks the 1000-octet text line limit (A1.2)."""
    with pytest.raises(smtplib.SMTPDataError) as info:
        submit(stack, message("long line", extra=b"X-Huge: " + b"y" * 1024 * 1024 + b"\r\n"))
    assert info.value.smtp_code == 500
    stack.assert_not_delivered(subject="long line", timeout=TIMEOUT)


# -- A6.9 concurrent IMAP sessions agree --------------------------------------------------


def _state(imap: Any) -> tuple[list[int], dict[int, set[str]]]:
    typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
    assert typ == "OK"
    flags: dict[int, set[str]] = {}
    for item in data:
        if not item:
            continue
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        found = re.search(r"UID (\d+)", text)
        got = re.search(r"FLAGS \(([^)]*)\)", text)
        assert found and got, text
        flags[int(found.group(1))] = set(got.group(1).split()) - {"\\Recent"}
    return sorted(flags), flags


def test_a6_9_concurrent_sessions_agree(stack: MailStack) -> None:
    clients = [imap_login(stack) for _ in range(4)]
    uidvalidity = set()
    try:
        for imap in clients:
            typ, _ = imap.select("INBOX")
            assert typ == "OK"
            uidvalidity.add(imap.response("UIDVALIDITY")[1][0])
        errors: list[BaseException] = []
        appended: list[list[int]] = [[] for _ in clients]

        def work(index: int, imap: Any) -> None:
            rnd = random.Random(index)
            try:
                for step in range(25):
                    op = rnd.choice(["append", "append", "store", "expunge", "fetch"])
                    if op == "append":
                        typ, data = imap.append("INBOX", None, None, message(f"c{index} s{step}"))
                        assert typ == "OK", data
                        code = re.search(rb"APPENDUID \d+ (\d+)", data[0])
                        assert code is not None, data
                        appended[index].append(int(code.group(1)))
                    elif op == "store":
                        flag = rnd.choice(["\\Seen", "\\Flagged", "\\Deleted", "$Label"])
                        sign = rnd.choice("+-")
                        assert imap.store("1:*", f"{sign}FLAGS", flag)[0] == "OK"
                    elif op == "expunge":
                        assert imap.expunge()[0] == "OK"
                    else:
                        assert imap.uid("FETCH", "1:*", "(FLAGS UID)")[0] == "OK"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        # Each session's own APPENDUIDs strictly increase, and no UID was given out twice.
        for uids in appended:
            assert uids == sorted(uids) and len(set(uids)) == len(uids)
        every = [u for uids in appended for u in uids]
        assert len(set(every)) == len(every)
        # Checkpoint: after NOOP everywhere, every session sees the same UIDs and flags.
        states = []
        for imap in clients:
            assert imap.noop()[0] == "OK"
            states.append(_state(imap))
        assert all(s == states[0] for s in states), states
        for imap in clients:
            typ, data = imap.select("INBOX")
            assert typ == "OK" and int(data[0]) == len(states[0][0])
            uidvalidity.add(imap.response("UIDVALIDITY")[1][0])
        assert len(uidvalidity) == 1
        box = stack.store.mailbox(f"user@{RCPT_DOMAIN}", "INBOX")
        assert sorted(m.uid for m in box) == states[0][0]
    finally:
        for imap in clients:
            imap.logout()


# -- A6.10 / A7.6 autologout, A8.4 abrupt disconnects -------------------------------------


@pytest.fixture(scope="module")
def impatient() -> Iterator[MailStack]:
    short = Timeouts(idle_timeout=0.5, imap_idle_timeout=0.5, pop3_idle_timeout=0.5)
    with MailStack(StackConfig(timeouts=short)) as running:
        yield running


def _read_until_closed(sock: Any, limit: float) -> bytes:
    sock.settimeout(limit)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_a6_10_idle_imap_session_is_logged_out(impatient: MailStack) -> None:
    imap = imap_login(impatient)
    try:
        imap.select("INBOX")
        started = time.monotonic()
        rest = _read_until_closed(imap.sock, 5)
        assert b"* BYE" in rest
        assert time.monotonic() - started < 3
    finally:
        imap.shutdown()


def test_a6_10_active_imap_session_is_not_logged_out(impatient: MailStack) -> None:
    imap = imap_login(impatient)
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # three idle periods, each one interrupted
            assert imap.noop()[0] == "OK"
            time.sleep(0.1)  # sleep-ok: spacing commands, not synchronising
        assert imap.noop()[0] == "OK"
    finally:
        imap.logout()


def test_a7_6_idle_pop3_session_is_logged_out(impatient: MailStack) -> None:
    pop = pop_login(impatient)
    try:
        rest = _read_until_closed(pop.sock, 5)
        assert rest.startswith(b"-ERR")
    finally:
        pop.close()
    # The maildrop lock was released: a new session logs in.
    pop = pop_login(impatient)
    try:
        assert pop.stat()[0] == 0
        pop.quit()
    finally:
        pop.close()


def _connections(stack: MailStack) -> int:
    return sum(len(c) for c in stack._listeners.connections)


def _wait(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # sleep-ok: polling a condition with a deadline
    return True


@pytest.mark.parametrize("sent", [0, 500, 999])
def test_a8_4_reset_mid_imap_append_stores_nothing(stack: MailStack, sent: int) -> None:
    baseline = _connections(stack)
    imap = imap_login(stack)
    imap.select("INBOX")
    imap.send(b"a1 APPEND INBOX {1000}\r\n")
    assert imap.readline().startswith(b"+")
    imap.send(b"x" * sent)
    imap.file.close()  # else the makefile() reference keeps the descriptor (and no RST) alive
    abort(imap.sock)
    # <=: a connection of an earlier test may still be closing when the baseline is taken.
    assert _wait(lambda: _connections(stack) <= baseline)
    assert stack.store.messages(f"user@{RCPT_DOMAIN}") == []
    again = imap_login(stack)
    try:
        typ, data = again.select("INBOX")
        assert typ == "OK" and data == [b"0"]
    finally:
        again.logout()


def test_a8_4_complete_append_is_stored(stack: MailStack) -> None:
    """The twin: the same APPEND, finished, stores exactly one message."""
    imap = imap_login(stack)
    try:
        typ, _ = imap.append("INBOX", None, None, message("appended"))
        assert typ == "OK"
    finally:
        imap.logout()
    assert len(stack.store.messages(f"user@{RCPT_DOMAIN}")) == 1


def test_a8_4_reset_mid_submission_data_stores_nothing(stack: MailStack) -> None:
    sender = stack.user(SENDER_DOMAIN)
    client = RawSMTP.submissions(stack)
    client.login(sender.address, sender.password)
    client.begin(sender.address, f"user@{RCPT_DOMAIN}")
    client.send(message("half", body=b"x" * 5000)[:3000])
    abort(client.sock)
    stack.assert_not_delivered(subject="half", timeout=TIMEOUT)
    assert stack.relay is not None and stack.relay.queue() == []


# -- A8.5 parallel submissions ------------------------------------------------------------


def test_a8_5_fifty_parallel_submissions_each_stored_once(stack: MailStack) -> None:
    tokens = [uuid.uuid4().hex for _ in range(50)]
    errors: list[BaseException] = []

    def send(token: str) -> None:
        try:
            submit(stack, message(f"par {token}", extra=f"X-Token: {token}\r\n".encode()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    stack.store.wait_until(lambda: len(stack.store.messages(f"user@{RCPT_DOMAIN}")) >= 50, 30)
    stack.relay_idle()
    assert len(stack.store.messages(f"user@{RCPT_DOMAIN}")) == 50
    imap = imap_login(stack)
    try:
        imap.select("INBOX", readonly=True)
        for token in tokens:
            typ, data = imap.search(None, "HEADER", "X-Token", token)
            assert typ == "OK" and len(data[0].split()) == 1, (token, data)
        # The twin: a token nobody sent is found nowhere.
        typ, data = imap.search(None, "HEADER", "X-Token", uuid.uuid4().hex)
        assert typ == "OK" and data[0].split() == []
    finally:
        imap.logout()


# -- A1.5 command sequence, A1.7 dot transparency, A2.3 text before 354 --------------------


def _mx(stack: MailStack, domain: str = RCPT_DOMAIN) -> RawSMTP:
    client = RawSMTP(socket.create_connection(stack.endpoints(domain).address("smtp"), TIMEOUT))
    assert client.reply()[0].startswith("220")
    return client


@pytest.mark.parametrize(
    "steps",
    [
        ["MAIL FROM:<a@example.net>"],
        ["EHLO c.example", "RCPT TO:<user@example.org>"],
        ["EHLO c.example", "DATA"],
        ["EHLO c.example", "MAIL FROM:<a@example.net>", "DATA"],
        ["EHLO c.example", "MAIL FROM:<a@example.net>", "MAIL FROM:<b@example.net>"],
        ["EHLO c.example", "MAIL FROM:<a@example.net>", "RSET", "RCPT TO:<user@example.org>"],
    ],
    ids=["mail-before-ehlo", "rcpt-before-mail", "data-before-mail", "data-before-rcpt",
         "second-mail", "rset-clears"],
)  # fmt: skip
def test_a1_5_bad_sequence_gets_503(stack: MailStack, steps: list[str]) -> None:
    with closing(_mx(stack)) as client:
        replies = [client.cmd(step)[-1] for step in steps]
        assert replies[-1].startswith("503"), replies
        assert all(r.startswith("250") for r in replies[:-1]), replies
        # The session still works for a proper transaction.
        client.cmd("RSET")
        assert client.cmd("EHLO c.example")[0].startswith("250")
        assert client.cmd("MAIL FROM:<a@example.net>")[0].startswith("250")
        assert client.cmd(f"RCPT TO:<user@{RCPT_DOMAIN}>")[0].startswith("250")


def test_a1_7_dot_lines_survive_every_hop(stack: MailStack) -> None:
    body = b".\r\n..x\r\n.\r\n. \r\nend\r\n"
    raw = message("dots", body=body)
    submit(stack, raw)  # smtplib stuffs the dots; every hop must unstuff and re-stuff them
    stored = stack.wait_for(f"user@{RCPT_DOMAIN}", subject="dots", timeout=TIMEOUT)
    assert stored.raw.endswith(b"\r\n\r\n" + body)
    imap = imap_login(stack)
    try:
        imap.select("INBOX", readonly=True)
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == stored.raw
    finally:
        imap.logout()
    pop = pop_login(stack)
    try:
        assert b"\r\n".join(pop.retr(1)[1]) + b"\r\n" == stored.raw
        pop.quit()
    finally:
        pop.close()


def test_a2_3_text_after_data_is_never_a_command(stack: MailStack) -> None:
    with closing(_mx(stack)) as client:
        assert client.cmd("EHLO c.example")[0].startswith("250")
        assert client.cmd("MAIL FROM:<a@example.net>")[0].startswith("250")
        assert client.cmd(f"RCPT TO:<user@{RCPT_DOMAIN}>")[0].startswith("250")
        client.send(b"DATA\r\nSubject: early\r\n\r\nRSET\r\nQUIT\r\n.\r\n")
        assert client.reply()[0].startswith("354")
        assert client.reply()[0].startswith("250 ")
        assert client.silent_for(SILENCE) == b""  # no reply to RSET or QUIT
    stored = stack.wait_for(f"user@{RCPT_DOMAIN}", subject="early", timeout=TIMEOUT)
    assert stored.raw.endswith(b"\r\n\r\nRSET\r\nQUIT\r\n")


# -- A3.4 implicit TLS listeners and garbage ----------------------------------------------


@pytest.mark.parametrize("service", IMPLICIT)
@pytest.mark.parametrize("garbage", [b"EHLO x\r\n", random.Random(7).randbytes(65536)], ids=repr)
def test_a3_4_implicit_tls_garbage_is_dropped(
    stack: MailStack, service: str, garbage: bytes
) -> None:
    ep = stack.endpoints()
    with socket.create_connection(ep.address(service), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(garbage)
            got = _read_until_closed(sock, TIMEOUT)
        except ConnectionResetError:
            got = b""
        # Never a plaintext banner: at most a TLS alert record (content type 21).
        assert got == b"" or got[:1] == b"\x15", got[:40]
    assert _handshake(stack.client_context(), ep.address(service), ep.hostname).startswith("TLS")


# -- A6.3 literal sizes up to 2**63, then EOF ---------------------------------------------


def test_a6_3_huge_literal_lengths_then_eof(stack: MailStack) -> None:
    baseline = _connections(stack)
    ep = stack.endpoints(RCPT_DOMAIN)
    user = stack.user(RCPT_DOMAIN)
    for exponent in [*range(15, 64, 4), 63, 64, 70]:
        with (
            socket.create_connection(ep.address("imaps"), timeout=TIMEOUT) as plain,
            stack.client_context().wrap_socket(plain, server_hostname=ep.hostname) as sock,
        ):
            sock.sendall(f'a LOGIN {user.address} "{user.password}"\r\n'.encode())
            sock.sendall(b"b APPEND INBOX {%d}\r\n" % 2**exponent + b"0123456789")
            sock.settimeout(TIMEOUT)
            got = b""
            while b"a OK" not in got or not re.search(rb"\r\n(\+ |b (NO|BAD))", got):
                chunk = sock.recv(65536)
                assert chunk, (exponent, got)
                got += chunk
            if exponent > 25:  # beyond the APPENDLIMIT: refused before any "+"
                assert b"\r\n+ " not in got, (exponent, got)
    # <=: a connection of an earlier test may still be closing when the baseline is taken.
    assert _wait(lambda: _connections(stack) <= baseline)
    assert stack.store.messages(user.address) == []
    imap = imap_login(stack)
    try:
        assert imap.noop()[0] == "OK"
    finally:
        imap.logout()


# -- A5.3 header injection through our API -------------------------------------------------


def test_a5_3_probe_message_refuses_crlf_in_addresses() -> None:
    from roundtrip.probes.send import build_probe_message

    with pytest.raises(ValueError):
        build_probe_message(mail_from="a@example.com\r\nBcc: v@example.net", rcpt_to="u@x.org")


def test_a5_3_probe_message_with_plain_addresses_has_one_of_each_header() -> None:
    from roundtrip.probes.send import build_probe_message

    raw = build_probe_message(mail_from="a@example.com", rcpt_to="u@example.org").raw
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    names = [line.split(b":", 1)[0].lower() for line in head]
    assert sorted(set(names)) == sorted(names) and b"bcc" not in names
