"""Client-side plumbing shared by the probes: timed connects, TLS facts, error translation.

Every blocking call has a timeout. The socket options matter for honest timings: without
TCP_NODELAY and TCP_QUICKACK a client waits about 40 ms for a Postfix SMTPS greeting (delayed
ACKs; NOTES.md), which would be reported as the server's slowness.
"""

from __future__ import annotations

import contextlib
import datetime
import imaplib
import poplib
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import (
    AuthError,
    ConnectError,
    ProbeError,
    RejectedError,
    TLSError,
)

__all__ = ["Step", "TLSFacts", "Timeline", "map_errors", "open_socket", "wrap_tls"]


@dataclass
class Step:
    """One timed step of a probe."""

    name: str
    seconds: float
    ok: bool = True
    detail: str = ""
    server: str = ""


@dataclass
class TLSFacts:
    """What one TLS connection showed."""

    server: str
    server_name: str
    version: str
    cipher: str
    subject: str
    issuer: str
    not_after: str
    days_left: int
    hostname_verified: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timeline:
    """Collects the steps and TLS facts of one probe run."""

    steps: list[Step] = field(default_factory=list)
    tls: list[TLSFacts] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def add(self, name: str, started: float, *, server: str = "", detail: str = "") -> Step:
        step = Step(name, time.perf_counter() - started, True, detail, server)
        self.steps.append(step)
        return step

    def fail(self, name: str, started: float, *, server: str = "", detail: str = "") -> Step:
        step = Step(name, time.perf_counter() - started, False, detail, server)
        self.steps.append(step)
        return step


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def open_socket(
    host: str, port: int, timeout: float, timeline: Timeline, label: str
) -> socket.socket:
    """TCP connect with the probe's socket options; records a ``<label> connect`` step."""
    started = time.perf_counter()
    sock = socket.create_connection((host, port), timeout)
    _tune(sock)
    timeline.add(f"{label} connect", started, server=f"{host}:{port}")
    return sock


def wrap_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_name: str,
    timeline: Timeline,
    label: str,
) -> ssl.SSLSocket:
    """TLS handshake verifying ``server_name``; records a step and the connection's facts."""
    started = time.perf_counter()
    peer = sock.getpeername()
    server = f"{peer[0]}:{peer[1]}"
    tls_sock = context.wrap_socket(sock, server_hostname=server_name)
    _tune(tls_sock)
    step = timeline.add(f"{label} tls", started, server=server)
    facts = tls_facts(
        tls_sock, server=server, server_name=server_name, verified=context.check_hostname
    )
    timeline.tls.append(facts)
    step.detail = f"{facts.version} {facts.cipher}"
    if facts.version in ("TLSv1", "TLSv1.1", "SSLv3"):
        timeline.findings.append(f"{label}: negotiated {facts.version}, below TLS 1.2 (RFC 8996)")
    if facts.days_left < 30:
        timeline.findings.append(
            f"{label}: certificate for {facts.subject} expires in {facts.days_left} days"
        )
    return tls_sock


def _name(rdns: Any) -> str:
    parts = []
    for rdn in rdns or ():
        for key, value in rdn:
            if key in ("commonName", "organizationName"):
                parts.append(f"{'CN' if key == 'commonName' else 'O'}={value}")
    return ", ".join(parts)


def tls_facts(sock: ssl.SSLSocket, *, server: str, server_name: str, verified: bool) -> TLSFacts:
    cert = sock.getpeercert() or {}
    not_after = str(cert.get("notAfter", ""))
    days = -1
    if not_after:
        expires = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), datetime.UTC)
        days = (expires - datetime.datetime.now(datetime.UTC)).days
    subject = _name(cert.get("subject"))
    if not subject:
        alt_names: Any = cert.get("subjectAltName", ())
        sans = [str(v) for k, v in alt_names if k in ("DNS", "IP Address")]
        subject = "SAN=" + ",".join(sans[:4])
    cipher = sock.cipher()
    return TLSFacts(
        server=server,
        server_name=server_name,
        version=sock.version() or "",
        cipher=cipher[0] if cipher else "",
        subject=subject,
        issuer=_name(cert.get("issuer")),
        not_after=not_after,
        days_left=days,
        hostname_verified=verified,
    )


def _reply_text(exc: BaseException) -> str:
    code = getattr(exc, "smtp_code", None)
    error = getattr(exc, "smtp_error", None)
    if code is not None:
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
        return f"{code} {text}"
    return str(exc)


@contextlib.contextmanager
def map_errors(step: str, server: str) -> Iterator[None]:
    """Translate client-library and socket exceptions into ``ProbeError`` subclasses.

    The one place where smtplib, imaplib, poplib, ssl and OSError exceptions become ours
    (STYLE.md section 5); the original stays on ``__cause__``.
    """
    try:
        yield
    except ProbeError:
        raise
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(
            f"{step}: certificate verification failed for {server}: {exc.verify_message}",
            step=step,
            host=server,
        ) from exc
    except ssl.SSLError as exc:
        raise TLSError(f"{step}: TLS failed with {server}: {exc}", step=step, host=server) from exc
    except smtplib.SMTPAuthenticationError as exc:
        raise AuthError(
            f"{step}: {server} refused the credentials: {_reply_text(exc)!r}",
            step=step,
            host=server,
            reply=_reply_text(exc),
        ) from exc
    except smtplib.SMTPRecipientsRefused as exc:
        replies = {r: f"{c} {m.decode('utf-8', 'replace')}" for r, (c, m) in exc.recipients.items()}
        raise RejectedError(
            f"{step}: {server} refused the recipient(s): {replies!r}",
            step="RCPT",
            host=server,
            reply=str(replies),
        ) from exc
    except smtplib.SMTPSenderRefused as exc:
        raise RejectedError(
            f"{step}: {server} refused the sender: {_reply_text(exc)!r}",
            step="MAIL",
            host=server,
            reply=_reply_text(exc),
        ) from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise RejectedError(f"{step}: {server}: {exc}", step=step, host=server) from exc
    except smtplib.SMTPResponseException as exc:
        raise RejectedError(
            f"{step}: {server} answered {_reply_text(exc)!r}",
            step=step,
            host=server,
            reply=_reply_text(exc),
        ) from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise ConnectError(
            f"{step}: {server} closed the connection: {exc}", step=step, host=server
        ) from exc
    except smtplib.SMTPException as exc:
        raise RejectedError(f"{step}: {server}: {exc}", step=step, host=server) from exc
    except imaplib.IMAP4.error as exc:
        text = str(exc)
        cls = (
            AuthError if step.endswith("LOGIN") or "AUTHENTICATIONFAILED" in text else RejectedError
        )
        raise cls(
            f"{step}: {server} answered {text!r}", step=step, host=server, reply=text
        ) from exc
    except poplib.error_proto as exc:
        text = str(exc.args[0] if exc.args else exc)
        if isinstance(exc.args[0] if exc.args else None, bytes):
            text = exc.args[0].decode("utf-8", "replace")
        cls = AuthError if step.endswith(("USER", "PASS", "LOGIN")) else RejectedError
        raise cls(
            f"{step}: {server} answered {text!r}", step=step, host=server, reply=text
        ) from exc
    except TimeoutError as exc:
        raise ConnectError(
            f"{step}: {server} did not answer in time", step=step, host=server
        ) from exc
    except OSError as exc:
        raise ConnectError(
            f"{step}: cannot talk to {server}: {exc}", step=step, host=server
        ) from exc
