"""Client-side plumbing shared by the probes: timed connects, TLS facts, error translation.

Every blocking call has a timeout. The socket options matter for honest timings: without
TCP_NODELAY and TCP_QUICKACK a client waits about 40 ms for a Postfix SMTPS greeting (delayed
ACKs), which would be reported as the server's slowness.
"""

from __future__ import annotations

import contextlib
import datetime
import imaplib
import ipaddress
import poplib
import smtplib
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from cryptography import x509

from ..config import Endpoint
from ..errors import (
    AuthError,
    ConnectError,
    ProbeError,
    RejectedError,
    TLSError,
)
from ._limits import MAX_REPLY_BYTES, ReplyTooLargeError, StepDeadlineError, step_limit
from ._transcript import Recorder, RecordingContext, RecordingSocket, Transcript
from .tlsfacts import certificate_issues, peer_chain, verified_chain, wildcard_covers

__all__ = [
    "Finding",
    "Step",
    "TLSFacts",
    "Timeline",
    "Transcript",
    "apply_checks",
    "check_legacy_tls",
    "diagnose_certificate",
    "display",
    "expiry_text",
    "map_errors",
    "open_socket",
    "starttls_context",
    "tls_facts",
    "wrap_tls",
]

#: Findings that make the probe fail (exit 1) rather than merely warn.
FAIL = "fail"
#: Findings reported but not failing the probe (unless ``--fail-on warn``).
WARN = "warn"
#: Facts worth a line in the report (the Received chain's hops), never failing.
INFO = "info"
#: Severities from the mildest up.
SEVERITIES = (INFO, WARN, FAIL)
#: Connections whose transcripts one probe run keeps (the first and the latest ones: POP3
#: reconnects to poll).
MAX_TRANSCRIPTS = 12
#: A certificate expiring sooner than this many days is reported.
EXPIRY_WARNING_DAYS = 30
_LEGACY_VERSIONS = frozenset({"SSLv3", "TLSv1", "TLSv1.1"})


@dataclass
class Step:
    """One timed step of a probe."""

    name: str
    seconds: float
    ok: bool = True
    detail: str = ""
    server: str = ""


@dataclass(frozen=True)
class Finding:
    """Something the probe noticed about a server.

    ``code`` is stable (``auth-before-tls``, ``legacy-tls``, ``cert-expiring``,
    ``plaintext-hop``, ``duplicate``, ``legacy-tls-untested``, ``port-mode-mismatch``, ...;
    docs/checks.md lists them); ``severity`` is ``"fail"`` (the probe fails), ``"warn"`` or
    ``"info"``; ``server`` the server it concerns: ``host:port`` of a server the probe
    talked to, the host name of a Received field's ``by`` for a hop, empty for the message;
    ``evidence`` the reply lines (or header fields) that prove it. ``str(finding)`` is the
    message.
    """

    code: str
    severity: str
    message: str
    server: str = ""
    evidence: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.message


def apply_checks(
    result: Any, findings: list[Finding], checks: dict[str, bool], *, what: str, step: str
) -> None:
    """Add ``findings`` and ``checks`` to a ``ProbeResult``: a failed check fails it, and
    when the round trip itself passed, the error names the failed ``what`` checks (with the
    failing findings) and ``error_step`` becomes ``step``."""
    result.findings.extend(findings)
    result.checks.update(checks)
    failed = [name for name, ok in checks.items() if not ok]
    if not failed:
        return
    result.ok = False
    if not result.error:
        failing = [f.message for f in findings if f.severity == FAIL]
        result.error = f"{what} checks failed: " + ", ".join(failed)
        if failing:
            result.error += " (" + "; ".join(failing) + ")"
        result.error_step = step


@dataclass
class TLSFacts:
    """What one TLS connection showed.

    ``hostname_verified``: the TLS library verified chain and name (always, except for the
    facts of a diagnostic handshake made after a verification failure).
    ``hostname_match``: the certificate names ``server_name`` (our own check of its SANs).
    """

    server: str
    server_name: str
    version: str
    cipher: str
    subject: str
    issuer: str
    not_after: str
    days_left: int
    hostname_verified: bool
    hostname_match: bool = False
    san: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timeline:
    """Collects the steps, TLS facts and findings of one probe run."""

    steps: list[Step] = field(default_factory=list)
    tls: list[TLSFacts] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    #: ``time.perf_counter()`` when the fetcher first saw the message.
    visible_at: float | None = None
    #: ``time.perf_counter()`` when the server answered DATA (the message accepted): where
    #: the time to visible starts, before QUIT and its reply.
    submitted_at: float | None = None
    #: The session transcript of each connection (at most ``MAX_TRANSCRIPTS``).
    transcripts: list[Transcript] = field(default_factory=list)
    #: Transcripts dropped to keep within ``MAX_TRANSCRIPTS``.
    transcripts_omitted: int = 0
    #: The latest connection of each protocol: the one its steps are recorded on.
    _current: dict[str, Transcript] = field(default_factory=dict, repr=False)
    _recorders: dict[str, Recorder] = field(default_factory=dict, repr=False)
    #: Findings about each verified handshake's certificate chain and names (kept apart
    #: from ``findings``; ``run_probe`` reports both).
    certificate_findings: list[Finding] = field(default_factory=list)

    def add(self, name: str, started: float, *, server: str = "", detail: str = "") -> Step:
        step = Step(name, time.perf_counter() - started, True, detail, server)
        self._record(step)
        return step

    def fail(self, name: str, started: float, *, server: str = "", detail: str = "") -> Step:
        step = Step(name, time.perf_counter() - started, False, detail, server)
        self._record(step)
        return step

    def _record(self, step: Step) -> None:
        self.steps.append(step)
        transcript = self._current.get(step.name.partition(" ")[0])
        if transcript is not None and step.name not in transcript.steps:
            transcript.steps.append(step.name)

    def connection(self, protocol: str, peer: str) -> Recorder:
        """A recorder for a new connection, its transcript kept on this timeline."""
        recorder = Recorder(protocol, peer)
        self._current[protocol] = recorder.transcript
        self._recorders[protocol] = recorder
        if len(self.transcripts) >= MAX_TRANSCRIPTS:
            # Keep the first connection (the submission) and the latest ones.
            del self.transcripts[1]
            self.transcripts_omitted += 1
        self.transcripts.append(recorder.transcript)
        return recorder

    def last_received(self, protocol: str) -> str:
        """The latest line the server of ``protocol``'s current connection sent."""
        recorder = self._recorders.get(protocol)
        return recorder.last_received if recorder is not None else ""

    def mark_failed(self) -> None:
        """Mark the latest connection as the one the probe failed on."""
        if self.transcripts:
            self.transcripts[-1].failed = True

    def finding(
        self,
        code: str,
        severity: str,
        message: str,
        server: str = "",
        evidence: tuple[str, ...] = (),
    ) -> None:
        self.findings.append(Finding(code, severity, message, server, evidence))

    def note_tls(self, facts: TLSFacts, label: str) -> None:
        """Record ``facts`` and the findings they imply."""
        self.tls.append(facts)
        if facts.version in _LEGACY_VERSIONS:
            self.finding(
                "legacy-tls",
                FAIL,
                f"{label} {facts.server}: negotiated {facts.version}, below TLS 1.2 (RFC 8996)",
                facts.server,
            )
        if 0 <= facts.days_left < EXPIRY_WARNING_DAYS:
            self.finding(
                "cert-expiring",
                WARN,
                f"{label} {facts.server}: certificate {facts.subject} expires in "
                f"{facts.days_left} days ({facts.not_after})",
                facts.server,
            )


def compare_capabilities(
    timeline: Timeline,
    *,
    label: str,
    server: str,
    before: Iterable[str],
    after: Iterable[str],
    command: str,
) -> None:
    """After STARTTLS (or STLS): record what the capabilities fetched again over TLS show.

    An info finding (``starttls``) says the upgrade took effect and lists the capabilities
    before and after TLS (RFC 3207 section 4.2, RFC 2595 sections 3.1 and 4: a client
    discards what it learnt before TLS and asks again). A server that still offers
    ``command`` over TLS gets a warning (``starttls-offered-after-tls``): RFC 3207 section
    4.2 forbids it for SMTP, and anywhere it says the server does not see the session as
    protected (TLS terminated by a proxy in front of it, say).
    """
    old = sorted({c.upper() for c in before})
    new = sorted({c.upper() for c in after})
    added = [c for c in new if c not in old]
    removed = [c for c in old if c not in new]
    evidence = (f"before TLS: {' '.join(old)}", f"after TLS: {' '.join(new)}")
    change = "; ".join(
        part
        for part in (
            f"added after TLS: {' '.join(added)}" if added else "",
            f"withdrawn after TLS: {' '.join(removed)}" if removed else "",
        )
        if part
    )
    timeline.finding(
        "starttls",
        INFO,
        f"{label} {server}: {command} offered and effective; capabilities fetched again over "
        f"TLS ({change or 'unchanged'})",
        server,
        evidence,
    )
    if command in new:
        timeline.finding(
            "starttls-offered-after-tls",
            WARN,
            f"{label} {server}: {command} is still offered after TLS started (RFC 3207 "
            "section 4.2 forbids it for SMTP; the server does not see the session as "
            "protected)",
            server,
            evidence,
        )


class PhaseTimeoutError(TimeoutError):
    """A timeout that names what it waited for (``"the TCP connect"``, ...)."""


class PlaintextAnswerError(ConnectionError):
    """The server answered a TLS ClientHello in plaintext: it speaks the protocol without
    TLS on a port dialled for implicit TLS. ``banner`` is its first line."""

    def __init__(self, banner: str) -> None:
        super().__init__(f"answered in plaintext on an implicit-TLS port: {banner!r}")
        self.banner = banner


#: OpenSSL's reasons for a handshake that met bytes which are not TLS records (a server
#: greeting in plaintext, "220 ..." or "* OK ...", parses as a bad record header).
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
        "RECORD_LENGTH_MISMATCH",
    }
)
#: Bytes of a plaintext banner read as evidence.
_BANNER_BYTES = 512


def plaintext_banner(host: str, port: int, timeout: float) -> str:
    """The first line a server sends unprompted on a new connection, or ``""`` if it sends
    none within ``timeout`` (a TLS server waits for the client's hello)."""
    try:
        with socket.create_connection((host, port), timeout) as sock:
            data = b""
            deadline = time.monotonic() + timeout
            while b"\n" not in data and len(data) < _BANNER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(_BANNER_BYTES - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:
        return ""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line or any((byte < 0x20 and byte != 0x09) or byte > 0x7E for byte in line):
        return ""  # no text: not a plaintext protocol greeting
    return line.decode("ascii")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def open_socket(
    host: str,
    port: int,
    timeout: float,
    timeline: Timeline,
    label: str,
    recorder: Recorder | None = None,
) -> socket.socket:
    """TCP connect with the probe's socket options; records a ``<label> connect`` step
    (and, with ``recorder``, the peer or the failure in the connection's transcript)."""
    started = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError as exc:
        if recorder is not None:
            recorder.note(f"connect to {host}:{port} failed: {exc}")
        if isinstance(exc, TimeoutError):
            raise PhaseTimeoutError("the TCP connect") from exc
        raise
    _tune(sock)
    if recorder is not None:
        peer = sock.getpeername()
        recorder.note(f"connected to {peer[0]}:{peer[1]}")
    timeline.add(f"{label} connect", started, server=f"{host}:{port}")
    return sock


def wrap_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_name: str,
    timeline: Timeline,
    label: str,
    recorder: Recorder | None = None,
) -> ssl.SSLSocket:
    """TLS handshake verifying ``server_name``; records a step and the connection's facts
    (with ``recorder``, in the connection's transcript too)."""
    started = time.perf_counter()
    peer = sock.getpeername()
    server = f"{peer[0]}:{peer[1]}"
    try:
        tls_sock = context.wrap_socket(sock, server_hostname=server_name)
    except (OSError, ValueError) as exc:
        if recorder is not None:
            recorder.note(f"TLS handshake failed: {exc}")
        if isinstance(exc, TimeoutError):
            raise PhaseTimeoutError("the TLS handshake") from exc
        if isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS_REASONS:
            _plaintext_answer(peer, sock.gettimeout(), timeline, label, server, exc, recorder)
        raise
    _tune(tls_sock)
    record_tls(timeline, label, started, tls_sock, server, server_name, context, recorder)
    return tls_sock


def _plaintext_answer(
    peer: tuple[Any, ...],
    timeout: float | None,
    timeline: Timeline,
    label: str,
    server: str,
    exc: ssl.SSLError,
    recorder: Recorder | None,
) -> None:
    """After a handshake that met no TLS: if a new connection shows a plaintext greeting,
    record the port/mode mismatch (RFC 8314 section 3: 465, 993 and 995 start with TLS) and
    raise ``PlaintextAnswerError``; else return (the TLS error stands)."""
    banner = plaintext_banner(peer[0], peer[1], min(timeout or 5.0, 5.0))
    if not banner:
        return
    if recorder is not None:
        recorder.note(f"a new connection shows a plaintext greeting: {banner!r}")
    timeline.finding(
        "port-mode-mismatch",
        FAIL,
        f"{label} {server}: the server answered in plaintext on an implicit-TLS port "
        f"(RFC 8314 section 3); its greeting: {banner!r}",
        server,
        (banner,),
    )
    raise PlaintextAnswerError(banner) from exc


def tls_at_once(host: str, port: int, server_name: str, timeout: float) -> str:
    """The TLS version a new connection to ``host:port`` negotiates when it starts the
    handshake at once (nothing verified, nothing sent after it), or ``""`` when it does not."""
    try:
        with socket.create_connection((host, port), timeout) as raw:
            sni = None if _is_address(server_name) else server_name
            with _unverified_context().wrap_socket(raw, server_hostname=sni) as tls:
                return tls.version() or "TLS"
    except (OSError, ValueError):
        return ""


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _waited_in_vain(error: ProbeError) -> bool:
    """Whether ``error`` is a read that timed out (possibly wrapped by the client library),
    rather than a connect that did."""
    cause = error.__cause__
    for exc in (cause, getattr(cause, "__context__", None)):
        if isinstance(exc, TimeoutError):
            return not isinstance(exc, PhaseTimeoutError | StepDeadlineError)
    return False


def check_implicit_tls(
    endpoint: Endpoint, timeline: Timeline, label: str, timeout: float, error: ProbeError
) -> None:
    """After a STARTTLS endpoint sent no greeting: if the port speaks TLS at once, record the
    port/mode mismatch (RFC 8314 section 3) and raise a ``TLSError`` saying so; else
    return, and ``error`` stands."""
    if endpoint.tls != "starttls" or not _waited_in_vain(error):
        return
    server = endpoint.address
    version = tls_at_once(endpoint.host, endpoint.port, endpoint.server_name, min(timeout, 5.0))
    if not version:
        return
    timeline.finding(
        "port-mode-mismatch",
        FAIL,
        f"{label} {server}: no greeting in plaintext, but a TLS handshake on a new connection "
        f"succeeded ({version}): the port expects implicit TLS (RFC 8314 section 3), not "
        "STARTTLS",
        server,
        (f"no greeting within {timeout:g} s", f"TLS handshake at once: {version}"),
    )
    raise TLSError(
        f"{error.step}: {server} sent no greeting: it speaks TLS at once ({version}); dial it "
        f"as implicit TLS ({label}s://)",
        step=error.step,
        host=server,
    ) from error


def dial(
    endpoint: Endpoint, context: ssl.SSLContext, timeline: Timeline, timeout: float, label: str
) -> socket.socket:
    """Connect to ``endpoint`` (timed, tuned), with the TLS handshake when it is implicit.

    The socket returned records its session in a transcript on ``timeline``: it is a
    ``RecordingSocket``, which offers the calls smtplib, imaplib and poplib make; give
    ``starttls_context(sock, context)`` to their STARTTLS so that recording goes on.
    """
    recorder = timeline.connection(label, f"{endpoint.host}:{endpoint.port}")
    sock = open_socket(endpoint.host, endpoint.port, timeout, timeline, label, recorder)
    if endpoint.tls == "implicit":
        try:
            sock = wrap_tls(sock, context, endpoint.server_name, timeline, label, recorder)
        except BaseException:
            sock.close()
            raise
    # Duck-typed: the client libraries see a socket (see RecordingSocket).
    return cast(socket.socket, RecordingSocket(sock, recorder))


def starttls_context(sock: object, context: ssl.SSLContext) -> ssl.SSLContext:
    """The context to give a client's STARTTLS on ``sock``: one that keeps the transcript
    going through the handshake when ``sock`` came from ``dial``."""
    if isinstance(sock, RecordingSocket):
        return cast(ssl.SSLContext, RecordingContext(context, sock.recorder))
    return context


def record_tls(
    timeline: Timeline,
    label: str,
    started: float,
    sock: socket.socket | RecordingSocket,
    server: str,
    server_name: str,
    context: ssl.SSLContext,
    recorder: Recorder | None = None,
) -> None:
    """Record a finished TLS handshake (implicit or STARTTLS): its step, facts and findings,
    and a line in the transcript (``recorder``, or that of a ``RecordingSocket``)."""
    if isinstance(sock, RecordingSocket):
        recorder = recorder or sock.recorder
        sock = sock.wrapped
    assert isinstance(sock, ssl.SSLSocket)
    step = timeline.add(f"{label} tls", started, server=server)
    facts = tls_facts(sock, server=server, server_name=server_name, verified=context.check_hostname)
    timeline.note_tls(facts, label)
    if context.check_hostname:
        anchors = context.get_ca_certs(binary_form=True)
        for issue in certificate_issues(
            peer_chain(sock),
            server_name=server_name,
            anchors=anchors,
            verified=verified_chain(sock),
        ):
            finding = Finding(
                issue.code,
                issue.severity,
                f"{label} {server}: {issue.message}",
                server,
                issue.evidence,
            )
            if finding not in timeline.certificate_findings:
                timeline.certificate_findings.append(finding)
    step.detail = f"{facts.version} {facts.cipher}"
    if recorder is not None:
        recorder.note(
            f"TLS {facts.version} {facts.cipher}; peer certificate subject "
            f"{facts.subject or '?'}; issuer {facts.issuer or '?'}"
        )


def expiry_text(not_after: str, days_left: int) -> str:
    """A certificate's expiry for people: days when near, the date and years when far
    (the same wording as ``roundtrip.report.expiry_text``, which may not import probes)."""
    if not not_after:
        return "no certificate"
    date = not_after[:10]
    if days_left < 0:
        return f"EXPIRED {-days_left} days ago ({date})"
    if days_left <= 2 * 365:
        return f"{days_left} days to expiry ({date})"
    return f"expires {date} (in {days_left / 365.25:.0f} years)"


def _hostname_matches(san: list[str], name: str) -> bool:
    """RFC 6125 matching of ``name`` against ``DNS:``/``IP:`` SAN entries (wildcard: one
    left-most label)."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    for entry in san:
        kind, _, value = entry.partition(":")
        if ip is not None:
            if kind == "IP":
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(value) == ip:
                        return True
            continue
        if kind != "DNS":
            continue
        pattern, host = value.lower().rstrip("."), name.lower().rstrip(".")
        if pattern == host:
            return True
        if wildcard_covers(pattern, host):
            return True
    return False


def _certificate_facts(der: bytes | None) -> tuple[str, str, str, int, list[str]]:
    """(subject, issuer, not_after, days_left, san) of a DER certificate."""
    if not der:
        return "", "", "", -1, []
    cert = x509.load_der_x509_certificate(der)
    expires = cert.not_valid_after_utc
    days = (expires - datetime.datetime.now(datetime.UTC)).days
    san: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        san += [f"DNS:{v}" for v in ext.value.get_values_for_type(x509.DNSName)]
        san += [f"IP:{v}" for v in ext.value.get_values_for_type(x509.IPAddress)]
    subject = cert.subject.rfc4514_string() or ("SAN " + ",".join(san[:4]))
    return subject, cert.issuer.rfc4514_string(), expires.isoformat(), days, san


def tls_facts(sock: ssl.SSLSocket, *, server: str, server_name: str, verified: bool) -> TLSFacts:
    """The protocol version, cipher and certificate of an established TLS connection."""
    subject, issuer, not_after, days, san = _certificate_facts(sock.getpeercert(binary_form=True))
    cipher = sock.cipher()
    return TLSFacts(
        server=server,
        server_name=server_name,
        version=sock.version() or "",
        cipher=cipher[0] if cipher else "",
        subject=subject,
        issuer=issuer,
        not_after=not_after,
        days_left=days,
        hostname_verified=verified,
        hostname_match=_hostname_matches(san, server_name),
        san=san,
    )


# -- handshakes outside the probe's own sessions ----------------------------------------------
#
# Both helpers below send no credentials: they go as far as the TLS handshake (after the
# protocol's STARTTLS command where needed) and hang up.

_STARTTLS_DANCE: dict[str, tuple[bytes, bytes]] = {
    # protocol: (command, the reply prefix that means "go ahead")
    "smtp": (b"STARTTLS\r\n", b"220"),
    "imap": (b"RT1 STARTTLS\r\n", b"RT1 OK"),
    "pop3": (b"STLS\r\n", b"+OK"),
}


_DANCE_TIMED_OUT = "the STARTTLS exchange did not finish in time"


def _read_reply(sock: socket.socket, protocol: str, buf: bytearray, deadline: float) -> bytes:
    """One complete reply (SMTP: multi-line up to ``NNN `` ; IMAP: the tagged line), read
    before ``deadline`` (``time.monotonic()``): a server trickling continuation lines does
    not keep the exchange going past it."""
    while True:
        while b"\n" in buf:
            idx = buf.index(b"\n") + 1
            line, buf[:] = bytes(buf[:idx]), buf[idx:]
            if protocol == "smtp" and line[3:4] == b"-":
                continue
            if protocol == "imap" and line.startswith(b"* ") and not line.startswith(b"* OK"):
                continue
            return line
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(_DANCE_TIMED_OUT)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except TimeoutError as exc:
            raise TimeoutError(_DANCE_TIMED_OUT) from exc
        if not chunk:
            raise ConnectionError("connection closed before the reply")
        if len(buf) > 65536:
            raise ConnectionError("reply too long")
        buf += chunk


def _starttls_dance(sock: socket.socket, protocol: str, timeout: float) -> None:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    _read_reply(sock, protocol, buf, deadline)  # greeting
    if protocol == "smtp":
        sock.sendall(b"EHLO roundtrip.probe\r\n")
        _read_reply(sock, protocol, buf, deadline)
    command, ok = _STARTTLS_DANCE[protocol]
    sock.sendall(command)
    reply = _read_reply(sock, protocol, buf, deadline)
    if not reply.startswith(ok):
        raise ssl.SSLError(f"STARTTLS refused: {reply!r}")


def _handshake(
    *,
    host: str,
    port: int,
    protocol: str,
    tls: str,
    server_name: str,
    context: ssl.SSLContext,
    timeout: float,
) -> ssl.SSLSocket:
    sock = socket.create_connection((host, port), timeout)
    try:
        if tls == "starttls":
            _starttls_dance(sock, protocol, timeout)
        return context.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


#: OpenSSL's SSL_OP_LEGACY_SERVER_CONNECT (``ssl.OP_LEGACY_SERVER_CONNECT`` from Python 3.12).
_LEGACY_SERVER_CONNECT = getattr(ssl, "OP_LEGACY_SERVER_CONNECT", 0x4)


def _unverified_context() -> ssl.SSLContext:
    """The context of the diagnostic handshakes (no credentials are ever sent on them).

    OpenSSL 3 aborts a handshake with a server that lacks secure renegotiation (RFC 5746)
    unless told otherwise; such a server answering an old ClientHello must read "accepted",
    not "refused", so the diagnostic handshakes allow it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= _LEGACY_SERVER_CONNECT
    return ctx


def diagnose_certificate(
    *,
    host: str,
    port: int,
    protocol: str,
    tls: str,
    server_name: str,
    timeout: float,
    chain: list[bytes] | None = None,
) -> TLSFacts | None:
    """After a failed verification: handshake without verifying, only to describe the
    certificate the server presents (subject, issuer, expiry, names). Returns None when even
    that fails. The connection is closed right after the handshake. ``chain``, when given,
    receives the certificates the server sent (DER, leaf first)."""
    try:
        sock = _handshake(
            host=host,
            port=port,
            protocol=protocol,
            tls=tls,
            server_name=server_name,
            context=_unverified_context(),
            timeout=timeout,
        )
    except (OSError, ValueError):
        return None
    with sock:
        server = f"{host}:{port}"
        if chain is not None:
            chain[:] = peer_chain(sock)
        return tls_facts(sock, server=server, server_name=server_name, verified=False)


def check_legacy_tls(
    *, host: str, port: int, protocol: str, tls: str, server_name: str, timeout: float
) -> str:
    """Offer only TLS 1.0 and 1.1 to the server.

    Returns:
        ``"refused"`` (good), ``"accepted TLSv1.1"`` (or 1.0: RFC 8996 forbids it), or
        ``"not tested: ..."`` when this machine's OpenSSL cannot offer those versions or the
        server could not be reached.
    """
    ctx = _unverified_context()
    try:
        with warnings.catch_warnings():
            # The ssl module deprecates the very versions this check is about.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        return f"not tested: local OpenSSL cannot offer TLS 1.0/1.1 ({exc})"
    try:
        sock = _handshake(
            host=host,
            port=port,
            protocol=protocol,
            tls=tls,
            server_name=server_name,
            context=ctx,
            timeout=timeout,
        )
    except ssl.SSLError as exc:
        text = str(exc)
        if "NO_PROTOCOLS_AVAILABLE" in text.upper() or "no protocols available" in text:
            return f"not tested: local OpenSSL cannot offer TLS 1.0/1.1 ({exc.reason})"
        if "STARTTLS refused" in text:
            return f"not tested: {text}"
        return "refused"
    except (OSError, ValueError) as exc:
        # A server that drops the connection on an old ClientHello refuses it too.
        if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
            return "refused"
        return f"not tested: {exc}"
    with sock:
        return f"accepted {sock.version()}"


#: The versions ``scan_tls`` tries one by one, by the name ``SSLSocket.version()`` gives.
_SCAN_VERSIONS = (
    ("TLSv1", ssl.TLSVersion.TLSv1),
    ("TLSv1.1", ssl.TLSVersion.TLSv1_1),
    ("TLSv1.2", ssl.TLSVersion.TLSv1_2),
    ("TLSv1.3", ssl.TLSVersion.TLSv1_3),
)
#: TLS 1.2 cipher suites with static RSA key exchange: no forward secrecy (RFC 9325
#: section 4.1: SHOULD NOT be negotiated).
_NO_FORWARD_SECRECY = "kRSA:!aNULL:!eNULL:@SECLEVEL=0"
#: Cipher classes RFC 9325 section 4.1 rules out, each offered alone at TLS 1.2: NULL
#: encryption, anonymous key exchange, RC4 and export-grade suites MUST NOT be negotiated;
#: 3DES (112-bit security) SHOULD NOT. OpenSSL 3 builds without the legacy provider cannot
#: offer RC4, export suites or (at any security level) 3DES: those come back "not tested".
WEAK_CIPHER_CLASSES = {
    "null-encryption": "eNULL:@SECLEVEL=0",
    "anonymous": "aNULL:!eNULL:@SECLEVEL=0",
    "rc4": "RC4:@SECLEVEL=0",
    "export": "EXP:@SECLEVEL=0",
    "3des": "3DES:@SECLEVEL=0",
}


def _scan_one(ctx: ssl.SSLContext, **where: Any) -> str:
    """``"accepted <version> <cipher>"``, ``"refused"`` or ``"not tested: ..."``; ``where``
    are ``_handshake``'s arguments but the context."""
    try:
        sock = _handshake(context=ctx, **where)
    except ssl.SSLError as exc:
        text = str(exc)
        if "NO_PROTOCOLS_AVAILABLE" in text.upper() or "NO_CIPHERS_AVAILABLE" in text.upper():
            return f"not tested: local OpenSSL cannot offer it ({exc.reason})"
        if "STARTTLS refused" in text:
            return f"not tested: {text}"
        return "refused"
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "refused"
    except (OSError, ValueError) as exc:
        return f"not tested: {exc}"
    with sock:
        cipher = sock.cipher()
        return f"accepted {sock.version()} {cipher[0] if cipher else ''}".rstrip()


def scan_tls(
    *, host: str, port: int, protocol: str, tls: str, server_name: str, timeout: float
) -> dict[str, str]:
    """Which TLS versions the server accepts, one handshake each, and whether it accepts a
    TLS 1.2 cipher suite without forward secrecy (static RSA key exchange) or of a weak class
    (:data:`WEAK_CIPHER_CLASSES`).

    Nothing is verified and nothing is sent after the handshake (after STARTTLS where the
    endpoint needs it). ``server_name`` is sent in SNI.

    Returns:
        ``{"TLSv1": outcome, "TLSv1.1": ..., "TLSv1.2": ..., "TLSv1.3": ...,
        "no-forward-secrecy": outcome, "null-encryption": ..., "anonymous": ..., "rc4": ...,
        "export": ..., "3des": ...}``, each outcome ``"accepted <version> <cipher>"``,
        ``"refused"`` or ``"not tested: <why>"``.
    """
    where = {
        "host": host,
        "port": port,
        "protocol": protocol,
        "tls": tls,
        "server_name": server_name,
        "timeout": timeout,
    }
    outcomes: dict[str, str] = {}
    ciphers = {"no-forward-secrecy": _NO_FORWARD_SECRECY, **WEAK_CIPHER_CLASSES}
    tls12 = ssl.TLSVersion.TLSv1_2
    for name, version in (*_SCAN_VERSIONS, *((name, tls12) for name in ciphers)):
        ctx = _unverified_context()
        try:
            with warnings.catch_warnings():
                # The ssl module deprecates the very versions this scan asks about.
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ctx.maximum_version = version
            ctx.set_ciphers(ciphers.get(name, "DEFAULT:@SECLEVEL=0"))
        except (ValueError, ssl.SSLError) as exc:
            outcomes[name] = f"not tested: local OpenSSL cannot offer it ({exc})"
            continue
        outcomes[name] = _scan_one(ctx, **where)
    return outcomes


def display(value: object) -> str:
    """A server reply as text for messages: bytes decoded (UTF-8, invalid bytes replaced),
    lists of lines joined by spaces, so a message never shows a Python ``b'...'`` literal."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace").rstrip("\r\n")
    if isinstance(value, list | tuple):
        return " ".join(display(item) for item in value if item is not None)
    return str(value)


@dataclass(frozen=True)
class _Where:
    """The step a translated exception happened in, and what names it in the message."""

    step: str
    server: str
    timeout: float | None
    waiting: str

    def timed_out(self, exc: BaseException) -> ConnectError:
        limit = f"within {self.timeout:g} s" if self.timeout is not None else "in time"
        phase = str(exc) if isinstance(exc, PhaseTimeoutError) else self.waiting
        message = f"{self.step}: {self.server} did not answer {limit}" + (
            f" (waiting for {phase})" if phase else ""
        )
        return ConnectError(message, step=self.step, host=self.server)


def _reply_text(exc: BaseException) -> str:
    code = getattr(exc, "smtp_code", None)
    error = getattr(exc, "smtp_error", None)
    if code is not None:
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
        return f"{code} {text}"
    return str(exc)


def _timed_out(exc: TimeoutError, where: _Where) -> ProbeError:
    return where.timed_out(exc)


def _evidence(last_line: str) -> str:
    return f"; the last line it sent: {last_line!r}" if last_line else ""


def _deadline_passed(exc: StepDeadlineError, where: _Where) -> ProbeError:
    return ConnectError(
        f"{where.step}: {where.server} did not finish within {exc.limit.timeout:g} s "
        f"(the step's own deadline{_evidence(exc.last_line)})",
        step=where.step,
        host=where.server,
        reply=exc.last_line,
    )


def _reply_too_large(exc: ReplyTooLargeError, where: _Where) -> ProbeError:
    return ConnectError(
        f"{where.step}: {where.server} {exc}{_evidence(exc.last_line)}",
        step=where.step,
        host=where.server,
        reply=exc.last_line,
    )


def _plaintext(exc: PlaintextAnswerError, where: _Where) -> ProbeError:
    return TLSError(
        f"{where.step}: {where.server} {exc} (RFC 8314 section 3: this port starts with TLS)",
        step=where.step,
        host=where.server,
        reply=exc.banner,
    )


def _certificate_rejected(exc: ssl.SSLCertVerificationError, where: _Where) -> ProbeError:
    return TLSError(
        f"{where.step}: certificate verification failed for {where.server}: {exc.verify_message}",
        step=where.step,
        host=where.server,
    )


#: OpenSSL's reasons for a handshake that found no TLS version both sides accept. A server
#: limited to TLS 1.0/1.1 answers a TLS 1.2 ClientHello with its own version, and some OpenSSL
#: 3.0 builds (Debian 12's) stop at its MD5+SHA1 key-exchange signature, which only those
#: versions use, before they check the version: LEGACY_SIGALG_DISALLOWED_OR_UNSUPPORTED.
_NO_COMMON_VERSION = frozenset(
    {
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "LEGACY_SIGALG_DISALLOWED_OR_UNSUPPORTED",
    }
)


def _no_common_version(exc: ssl.SSLError) -> bool:
    # An older Python may not know an OpenSSL reason by name (reason None, the text only).
    reason = exc.reason or str(exc).upper().replace(" ", "_")
    return any(known in reason for known in _NO_COMMON_VERSION)


def _tls_failed(exc: ssl.SSLError, where: _Where) -> ProbeError:
    if _no_common_version(exc):
        return TLSError(
            f"{where.step}: {where.server} accepts none of the TLS versions the probe offers "
            f"(TLS 1.2 and above; it never offers less: RFC 8996): {exc}",
            step=where.step,
            host=where.server,
        )
    return TLSError(
        f"{where.step}: TLS failed with {where.server}: {exc}", step=where.step, host=where.server
    )


def _smtp_auth_refused(exc: smtplib.SMTPAuthenticationError, where: _Where) -> ProbeError:
    return AuthError(
        f"{where.step}: {where.server} refused the credentials: {_reply_text(exc)!r}",
        step=where.step,
        host=where.server,
        reply=_reply_text(exc),
    )


def _smtp_recipients_refused(exc: smtplib.SMTPRecipientsRefused, where: _Where) -> ProbeError:
    replies = {r: f"{c} {m.decode('utf-8', 'replace')}" for r, (c, m) in exc.recipients.items()}
    return RejectedError(
        f"{where.step}: {where.server} refused the recipient(s): {replies!r}",
        step="RCPT",
        host=where.server,
        reply=str(replies),
    )


def _smtp_sender_refused(exc: smtplib.SMTPSenderRefused, where: _Where) -> ProbeError:
    return RejectedError(
        f"{where.step}: {where.server} refused the sender: {_reply_text(exc)!r}",
        step="MAIL",
        host=where.server,
        reply=_reply_text(exc),
    )


def _smtp_refused(exc: smtplib.SMTPException, where: _Where) -> ProbeError:
    """An SMTP failure without a reply code (such as an extension the server lacks)."""
    return RejectedError(f"{where.step}: {where.server}: {exc}", step=where.step, host=where.server)


def _smtp_answered(exc: smtplib.SMTPResponseException, where: _Where) -> ProbeError:
    return RejectedError(
        f"{where.step}: {where.server} answered {_reply_text(exc)!r}",
        step=where.step,
        host=where.server,
        reply=_reply_text(exc),
    )


def _smtp_disconnected(exc: smtplib.SMTPServerDisconnected, where: _Where) -> ProbeError:
    # A read timeout, which smtplib words "Connection unexpectedly closed: timed out", is
    # looked through by ``_translate``.
    return ConnectError(
        f"{where.step}: {where.server} closed the connection: {exc}",
        step=where.step,
        host=where.server,
    )


def _imap_answered(exc: imaplib.IMAP4.error, where: _Where) -> ProbeError:
    # imaplib raises with the server's reply as bytes (or a list of them).
    text = display(exc.args[0]) if len(exc.args) == 1 else str(exc)
    login = where.step.endswith("LOGIN") or "AUTHENTICATIONFAILED" in text
    cls = AuthError if login else RejectedError
    return cls(
        f"{where.step}: {where.server} answered {text!r}",
        step=where.step,
        host=where.server,
        reply=text,
    )


def _pop3_answered(exc: poplib.error_proto, where: _Where) -> ProbeError:
    text = str(exc.args[0] if exc.args else exc)
    if isinstance(exc.args[0] if exc.args else None, bytes):
        text = exc.args[0].decode("utf-8", "replace")
    cls = AuthError if where.step.endswith(("USER", "PASS", "LOGIN")) else RejectedError
    return cls(
        f"{where.step}: {where.server} answered {text!r}",
        step=where.step,
        host=where.server,
        reply=text,
    )


def _unreachable(exc: OSError, where: _Where) -> ProbeError:
    return ConnectError(
        f"{where.step}: cannot talk to {where.server}: {exc}", step=where.step, host=where.server
    )


#: What ``map_errors`` translates, and how. The first row whose type matches wins, so a
#: subclass comes before its base (every smtplib and ssl exception is an ``OSError``).
_TRANSLATIONS: tuple[tuple[type[BaseException], Callable[[Any, _Where], ProbeError]], ...] = (
    (StepDeadlineError, _deadline_passed),
    (ReplyTooLargeError, _reply_too_large),
    (PlaintextAnswerError, _plaintext),
    (PhaseTimeoutError, _timed_out),
    (ssl.SSLCertVerificationError, _certificate_rejected),
    (ssl.SSLError, _tls_failed),
    (smtplib.SMTPAuthenticationError, _smtp_auth_refused),
    (smtplib.SMTPRecipientsRefused, _smtp_recipients_refused),
    (smtplib.SMTPSenderRefused, _smtp_sender_refused),
    (smtplib.SMTPResponseException, _smtp_answered),
    (smtplib.SMTPServerDisconnected, _smtp_disconnected),
    (smtplib.SMTPException, _smtp_refused),
    (imaplib.IMAP4.error, _imap_answered),
    (poplib.error_proto, _pop3_answered),
    (TimeoutError, _timed_out),
    (OSError, _unreachable),
)
_TRANSLATED = tuple(kind for kind, _ in _TRANSLATIONS)


#: Errors of ours that a client library may wrap in its own (smtplib turns any OSError of a
#: read into ``SMTPServerDisconnected``, imaplib one of a send into ``abort``): the wrapper
#: is looked through, so the message says what happened.
_OURS = (StepDeadlineError, ReplyTooLargeError, PlaintextAnswerError)
#: Wrappers looked through when they hide a plain timeout ("Connection unexpectedly
#: closed: The read operation timed out" is a timeout, not a close).
_WRAPPERS = (smtplib.SMTPServerDisconnected, imaplib.IMAP4.abort)


def _translate(exc: BaseException, where: _Where) -> ProbeError:
    inner = exc.__context__
    if not isinstance(exc, _OURS) and (
        isinstance(inner, _OURS) or (isinstance(exc, _WRAPPERS) and isinstance(inner, TimeoutError))
    ):
        exc = inner
    for kind, build in _TRANSLATIONS:
        if isinstance(exc, kind):
            return build(exc, where)
    raise AssertionError(f"map_errors caught {exc!r}, which it has no translation for")


@contextlib.contextmanager
def map_errors(
    step: str,
    server: str,
    *,
    timeout: float | None = None,
    waiting: str = "",
    deadline: float | None = None,
    max_reply_bytes: int = MAX_REPLY_BYTES,
) -> Iterator[None]:
    """Translate client-library and socket exceptions into ``ProbeError`` subclasses.

    The one place where smtplib, imaplib, poplib, ssl and OSError exceptions become ours
    (each through its row of ``_TRANSLATIONS``); the original stays on ``__cause__``.

    With ``timeout``, the step also runs under a ``_limits.StepLimit``: a deadline of its
    own (``deadline``, a ``time.monotonic()`` value, else ``timeout`` from now) and a bound
    on the bytes of one reply, both enforced on the probe's connections.

    Args:
        timeout: the socket timeout in force, named when the server does not answer.
        waiting: what the step waits for when it times out, unless the timeout says it
            (``PhaseTimeoutError``), e.g. ``"the greeting"``.
        deadline: when the step must be over, if not ``timeout`` from now.
        max_reply_bytes: the most one reply may take (``_limits.MAX_REPLY_BYTES``).
    """
    try:
        if timeout is None:
            yield
        else:
            with step_limit(
                step, timeout=timeout, deadline=deadline, max_reply_bytes=max_reply_bytes
            ):
                yield
    except ProbeError:
        raise
    except _TRANSLATED as exc:
        raise _translate(exc, _Where(step, server, timeout, waiting)) from exc
