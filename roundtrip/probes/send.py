"""Submit a uniquely tagged message over SMTP (implicit TLS or STARTTLS), timing each step."""

from __future__ import annotations

import email.utils
import secrets
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from ..config import Endpoint, check_envelope_address
from ..errors import AuthError, ConnectError, RejectedError, TLSError
from ._net import (
    FAIL,
    Timeline,
    check_implicit_tls,
    compare_capabilities,
    dial,
    display,
    map_errors,
    record_tls,
    starttls_context,
)

__all__ = ["ProbeMessage", "build_probe_message", "submit"]


@dataclass(frozen=True, slots=True)
class ProbeMessage:
    """A message made for a probe: its bytes and the token that finds it again."""

    token: str
    message_id: str
    subject: str
    mail_from: str
    rcpt_to: str
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1]


def build_probe_message(*, mail_from: str, rcpt_to: str, now: float | None = None) -> ProbeMessage:
    """A small text message carrying a random token in Subject, Message-ID and body."""
    for address in (mail_from, rcpt_to):
        check_envelope_address(address)
    token = secrets.token_hex(8)
    stamp = time.time() if now is None else now
    domain = mail_from.rpartition("@")[2] or "roundtrip.invalid"
    message_id = f"<roundtrip-{token}@{domain}>"
    subject = f"roundtrip probe {token}"
    lines = [
        f"From: <{mail_from}>",
        f"To: <{rcpt_to}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(stamp)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
        f"roundtrip probe token {token}",
        "A line starting with a dot follows, to check dot transparency:",
        ".leading dot",
        "",
    ]
    raw = "\r\n".join(lines).encode("ascii")
    return ProbeMessage(token, message_id, subject, mail_from, rcpt_to, raw)


class _LastLine:
    """The reply file of ``_SMTPClient``: remembers the last line read, so that a greeting
    smtplib cannot parse (an IMAP or POP3 server's) can be quoted as it came."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.last = b""

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._file.readline(size)
        self.last = line
        return line

    def close(self) -> None:
        self._file.close()


#: What a greeting that is not SMTP's probably is.
_OTHER_PROTOCOLS = ((b"* ", "an IMAP server?"), (b"+OK", "a POP3 server?"), (b"HTTP/", "HTTP?"))


class _SMTPClient(smtplib.SMTP):
    """smtplib with timed, tuned sockets; dials ``endpoint.host``, verifies ``server_name``."""

    def __init__(
        self, endpoint: Endpoint, context: ssl.SSLContext, timeline: Timeline, timeout: float
    ) -> None:
        self._endpoint = endpoint
        self._context = context
        self._timeline = timeline
        self.socket_ready = time.perf_counter()
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = dial(self._endpoint, self._context, self._timeline, timeout, "smtp")
        #: When the socket was ready: the greeting's wait starts here.
        self.socket_ready = time.perf_counter()
        return sock

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _LastLine(self.sock.makefile("rb"))
        return super().getreply()

    @property
    def last_line(self) -> bytes:
        return self.file.last if isinstance(self.file, _LastLine) else b""


def _check_greeting(client: _SMTPClient, code: int, reply: bytes, server: str) -> None:
    """Fail unless the server greeted with 220 (RFC 5321 section 4.2), quoting what came."""
    if code == 220:
        return
    if code < 0:  # not an SMTP reply at all
        line = display(client.last_line)
        guess = next((g for p, g in _OTHER_PROTOCOLS if client.last_line.startswith(p)), "")
        raise ConnectError(
            f"CONNECT: expected a 220 greeting from {server}, got {line!r}"
            + (f" ({guess})" if guess else ""),
            step="CONNECT",
            host=server,
            reply=line,
        )
    text = f"{code} {display(reply)}"
    raise RejectedError(
        f"CONNECT: expected a 220 greeting from {server}, got {text!r}",
        step="CONNECT",
        host=server,
        reply=text,
    )


def submit(
    endpoint: Endpoint,
    message: ProbeMessage,
    *,
    context: ssl.SSLContext,
    timeout: float,
    timeline: Timeline,
    local_hostname: str = "roundtrip.probe",
) -> str:
    """Connect, secure, authenticate and submit ``message``; return the server's DATA reply.

    A STARTTLS endpoint that does not offer STARTTLS fails before any credential is sent.

    Raises:
        ConnectError, TLSError, AuthError, RejectedError: the step that failed, with the reply.
    """
    server = endpoint.address
    client = _SMTPClient(endpoint, context, timeline, timeout)
    try:
        try:
            with map_errors("CONNECT", server, timeout=timeout, waiting="the greeting"):
                code, greeting = client.connect(endpoint.server_name, endpoint.port)
                client._host = endpoint.server_name  # type: ignore[attr-defined]  # starttls()
        except ConnectError as exc:
            check_implicit_tls(endpoint, timeline, "smtp", timeout, exc)
            raise
        # From the end of the connect (and TLS) steps: they are timed on their own.
        if code != 220:
            timeline.fail("smtp greeting", client.socket_ready, server=server, detail=f"{code}")
        _check_greeting(client, code, greeting, server)
        timeline.add("smtp greeting", client.socket_ready, server=server, detail=f"{code}")
        with map_errors("EHLO", server, timeout=timeout):
            started = time.perf_counter()
            client.ehlo(local_hostname)
            timeline.add("smtp ehlo", started, server=server)
        if endpoint.tls == "starttls":
            _starttls(client, endpoint, context, timeline, timeout, local_hostname)
        if endpoint.user:
            if not client.has_extn("auth"):
                raise AuthError(
                    f"AUTH: {server} does not offer AUTH after TLS", step="AUTH", host=server
                )
            with map_errors("AUTH", server, timeout=timeout):
                started = time.perf_counter()
                client.login(endpoint.user, endpoint.password)
                timeline.add("smtp auth", started, server=server)
        with map_errors("SUBMIT", server, timeout=timeout):
            started = time.perf_counter()
            data_reply = _transaction(client, message)
            timeline.submitted_at = time.perf_counter()
            timeline.add("smtp submit", started, server=server, detail=data_reply)
        with map_errors("QUIT", server, timeout=timeout):
            started = time.perf_counter()
            try:
                client.quit()
            except smtplib.SMTPServerDisconnected:
                pass
            timeline.add("smtp quit", started, server=server)
        return data_reply
    finally:
        client.close()


def _starttls(
    client: _SMTPClient,
    endpoint: Endpoint,
    context: ssl.SSLContext,
    timeline: Timeline,
    timeout: float,
    local_hostname: str,
) -> None:
    """Upgrade to TLS (RFC 3207) and say EHLO again; refuse to go on without STARTTLS."""
    server = endpoint.address
    if client.has_extn("auth"):
        timeline.finding(
            "auth-before-tls",
            FAIL,
            f"smtp {server}: AUTH is offered before STARTTLS on a STARTTLS port "
            "(RFC 8314 section 3.3: credentials could be sent in plaintext)",
            server,
        )
    if not client.has_extn("starttls"):
        raise TLSError(
            f"STARTTLS: {server} does not offer STARTTLS; no credentials were sent",
            step="STARTTLS",
            host=server,
        )
    before = list(client.esmtp_features)
    with map_errors("STARTTLS", server, timeout=timeout):
        started = time.perf_counter()
        client.starttls(context=starttls_context(client.sock, context))
        assert client.sock is not None
        record_tls(timeline, "smtp", started, client.sock, server, endpoint.server_name, context)
        client.ehlo(local_hostname)
    compare_capabilities(
        timeline,
        label="smtp",
        server=server,
        before=before,
        after=client.esmtp_features,
        command="STARTTLS",
    )


def _transaction(client: _SMTPClient, message: ProbeMessage) -> str:
    """MAIL, RCPT and DATA; returns the DATA reply as ``"250 text"``. A refusal raises the
    smtplib exception ``map_errors`` turns into the step that failed."""
    code, reply = client.mail(message.mail_from)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, reply, message.mail_from)
    code, reply = client.rcpt(message.rcpt_to)
    if code not in (250, 251):
        raise smtplib.SMTPRecipientsRefused({message.rcpt_to: (code, reply)})
    code, reply = client.data(message.raw)
    if code != 250:
        raise smtplib.SMTPDataError(code, reply)
    return f"{code} {reply.decode('utf-8', 'replace')}"
