"""Active checks of a real mail server: opt-in (``roundtrip probe --checks``), bounded, own mailbox.

Theory of operation
-------------------
The round trip (``probes/roundtrip.py``) only does what any mail client does. The checks here
send what a client normally never sends, so they run only when asked for by group name
(``--checks smuggling,open-relay`` or ``--checks all``), and each one keeps to these bounds
(docs/active-checks.md):

- Mail is only ever addressed to the probe's own mailbox (the reader's user, or ``--to``).
  The open-relay check names ``relay-test@example.invalid`` (RFC 2606: can never be
  delivered), from the probe's own sender, and stops after RCPT: it never sends DATA.
- A fixed number of connections and commands per group (seven smuggling vectors, one
  connection each, on the submission port and at the MX; one connection per STARTTLS port
  for injection), each group within the probe's ``--timeout``, every reply bounded in lines
  and bytes; a server that stalls ends the group with a "not tested" finding.
- Credentials only after TLS; the bogus credentials of ``plaintext-auth`` and
  ``brute-force`` belong to a user that does not exist (no account can be locked); nothing
  secret ever appears in a finding, even when a server echoes it.

The SMTP side is a raw-socket client (``_Wire``): smtplib normalises line endings and
dot-stuffs bare LFs, which would hide exactly what the smuggling check sends (CVE-2023-51764),
and it cannot write a pipelined group or STARTTLS plus a command in one segment.

Every group produces findings in the probe's shape (``_net.Finding``: code, severity, the
server, the reply lines as evidence) and, for the checks that fail a probe, an entry in
``checks`` (``no SMTP smuggling``...). A group that cannot run (no MX answered, no STARTTLS
port given) is listed in ``skipped`` with the reason, and reported as an ``info`` finding.
"""

from __future__ import annotations

import base64
import email.utils
import imaplib
import poplib
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._headerblock import header_bounds
from ..config import Endpoint, parse_host_port
from ..errors import ConfigError
from ._net import FAIL, INFO, WARN, Finding, apply_checks, display

if TYPE_CHECKING:
    from .roundtrip import ProbeResult

__all__ = [
    "GROUPS",
    "SMUGGLING_VECTORS",
    "ActiveReport",
    "parse_checks",
    "parse_mx",
    "run_active_checks",
]

#: The groups ``--checks`` accepts, in the order they run (``all`` selects every one).
GROUPS = (
    "starttls-injection",
    "plaintext-auth",
    "open-relay",
    "spoofing",
    "pipelining",
    "chunking",
    "smuggling",
    # Last: a server's penalty for failed AUTH would slow every login of the groups after it.
    "brute-force",
)

#: End-of-data variants a lenient server may take for ``<CRLF>.<CRLF>`` (SEC Consult's
#: SMTP smuggling research; CVE-2023-51764 Postfix, CVE-2023-51765 Sendmail, CVE-2023-51766
#: Exim). The name says the bytes: LF, CR, CRLF, NUL around the dot.
SMUGGLING_VECTORS: tuple[tuple[str, bytes], ...] = (
    ("LF.LF", b"\n.\n"),
    ("LF.CR", b"\n.\r"),
    ("CR.LF", b"\r.\n"),
    ("CR.CR", b"\r.\r"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n"),
)

#: The foreign recipient of the open-relay check. RFC 2606 section 2 reserves ``.invalid``:
#: it never resolves, so no relay can deliver there, and a server that verifies recipients
#: contacts nobody. A documentation domain such as example.com is no better: a relay that
#: checks recipient domains may refuse it with a 5xx for its DNS (RFC 7505 null MX, X.1.10),
#: which says nothing about relaying (docs/active-checks.md). The sender is the probe's own
#: address: a domain that resolves passes sender-domain checks (Postfix
#: reject_unknown_sender_domain answers 450 for ``.invalid``), and a relay that trusts its
#: own domain's senders is caught too.
RELAY_RECIPIENT = "relay-test@example.invalid"
#: Enhanced status codes (RFC 3463 section 3.2, RFC 7372, RFC 7505 sections 4.2-4.3) by which
#: a 5xx to the foreign RCPT refuses an address, not relaying: a relay says the same. X.1.2 bad
#: destination system, X.1.7/X.1.8 bad sender mailbox or system, X.1.10 recipient null MX,
#: X.7.23/X.7.24 SPF failed or errored, X.7.27 sender null MX.
_NOT_RELAY_STATUS = frozenset({"1.2", "1.7", "1.8", "1.10", "7.23", "7.24", "7.27"})
#: Longest reply line read (RFC 5321 section 4.5.3.1.5 allows 512; servers send more).
MAX_LINE = 8192
#: Most lines of one reply (an EHLO reply has a dozen).
MAX_REPLY_LINES = 100
#: Most lines one connection may send (the longest exchange here has about 40).
MAX_SESSION_LINES = 1000
#: Replies read after a smuggling payload: the outer 250, then at most MAIL, RCPT, DATA,
#: the inner 250 and QUIT's 221.
MAX_SMUGGLING_REPLIES = 6
#: Seconds a STARTTLS injection check waits, after the handshake, for an answer to the
#: injected command (a vulnerable server answers from its buffer at once).
INJECTION_WAIT = 1.0
#: Seconds the smuggling check looks again after the outer messages arrived, for a second
#: message delivered just after them.
SMUGGLING_SETTLE = 1.0
#: Failed AUTH attempts the brute-force check makes, with a user that does not exist.
BRUTE_FORCE_ATTEMPTS = 3
#: Bytes of each smuggling probe message read back over IMAP (headers and the variant).
MAX_STORED_BYTES = 16384
#: Messages the POP3 look at the mailbox reads the headers of, at most (newest first).
MAX_POP3_SCAN = 200
#: The standard STARTTLS ports tried beside implicit-TLS URLs on the standard ports
#: (RFC 8314 section 3: 465/587, 993/143, 995/110).
_STANDARD_STARTTLS = {("smtp", 465): 587, ("imap", 993): 143, ("pop3", 995): 110}


class _TroubleError(Exception):
    """The server did something that ends the check early (said in the message)."""


def parse_checks(text: str) -> tuple[str, ...]:
    """``--checks`` value: comma-separated group names or ``all`` -> groups in run order.

    Raises:
        ConfigError: an unknown group (the message lists the valid ones) or none given.
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"--checks {text!r}: expected group names or all")
    if "all" in names:
        return GROUPS
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise ConfigError(
            f"--checks: unknown group {unknown[0]!r}; choose from {', '.join(GROUPS)} or all"
        )
    return tuple(group for group in GROUPS if group in names)


def parse_mx(text: str) -> tuple[str, int]:
    """``--mx HOST[:PORT]`` (port 25 when absent; ``[v6]:port`` for IPv6).

    Raises:
        ConfigError: an empty host or a bad port.
    """
    return parse_host_port(text, default_port=25, option="--mx")


@dataclass
class ActiveReport:
    """What ``run_active_checks`` did: the groups it ran, those it skipped (with why), its
    findings, the pass/fail checks (``check name -> passed``), and how long it took."""

    requested: tuple[str, ...]
    ran: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``active`` key of ``roundtrip probe --json``."""
        return {
            "requested": list(self.requested),
            "ran": list(self.ran),
            "skipped": dict(self.skipped),
            "checks": dict(self.checks),
            "seconds": self.seconds,
            "findings": [
                {
                    "code": f.code,
                    "severity": f.severity,
                    "message": f.message,
                    "server": f.server,
                    "evidence": list(f.evidence),
                }
                for f in self.findings
            ],
        }

    def summary(self) -> str:
        """One line: the groups run and the groups skipped with the reason."""
        text = f"active checks ran: {', '.join(self.ran) or 'none'}"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{g} ({why})" for g, why in self.skipped.items())
        return text

    def apply(self, result: ProbeResult) -> None:
        """Add the findings and checks to a ``ProbeResult``; a failed check fails it (with
        ``error_step`` ``CHECKS`` when the round trip itself passed)."""
        apply_checks(result, self.findings, self.checks, what="active", step="CHECKS")


# -- the raw SMTP/IMAP/POP3 line client --------------------------------------------------------


class _Wire:
    """One connection with a deadline: lines in (bounded), bytes out, TLS on demand.

    ``received`` keeps every line the server sent (the evidence); nothing sent is kept.
    """

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.host, self.port, self.deadline = host, port, deadline
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.received: list[str] = []
        self._buf = bytearray()
        self.sock: socket.socket = socket.create_connection((host, port), self._remaining())

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the check's deadline passed")
        return left

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._remaining())
        self.sock.sendall(data)

    def tls(self, context: ssl.SSLContext, server_name: str) -> str:
        """Upgrade to TLS (implicit, or after STARTTLS); returns the version."""
        self.sock.settimeout(self._remaining())
        tls_sock = context.wrap_socket(self.sock, server_hostname=server_name)
        self.sock = tls_sock
        return tls_sock.version() or "TLS"

    def _fill(self, timeout: float | None = None) -> bool:
        """Read once more; False on EOF."""
        self.sock.settimeout(self._remaining() if timeout is None else timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def line(self) -> str:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise _TroubleError(f"a line longer than {MAX_LINE} bytes")
            if not self._fill():
                raise _TroubleError("the server closed the connection")
        index = self._buf.index(b"\n") + 1
        raw, self._buf[:] = bytes(self._buf[:index]), self._buf[index:]
        if len(self.received) >= MAX_SESSION_LINES:
            raise _TroubleError(f"more than {MAX_SESSION_LINES} lines on one connection")
        text = display(raw[:MAX_LINE])
        self.received.append(text)
        return text

    def reply(self) -> tuple[int, list[str]]:
        """One SMTP reply (RFC 5321 section 4.2: ``NNN-`` lines, then ``NNN ``)."""
        lines: list[str] = []
        while len(lines) < MAX_REPLY_LINES:
            text = self.line()
            lines.append(text)
            if text[3:4] != "-":
                code = text[:3]
                if not code.isdigit():
                    raise _TroubleError(f"not an SMTP reply: {text!r}")
                return int(code), lines
        raise _TroubleError(f"a reply of more than {MAX_REPLY_LINES} lines")

    def command(self, text: str) -> tuple[int, list[str]]:
        self.send(text.encode("utf-8") + b"\r\n")
        return self.reply()

    def pending(self) -> bool:
        """Whether unread bytes are buffered (the server said more than was asked)."""
        return bool(self._buf)

    def listen(self, wait: float, *, grace: float = 0.2) -> list[str]:
        """Whatever the server sends within ``wait`` seconds unprompted, as lines (once a
        line came, only ``grace`` seconds more; at most ``MAX_LINE`` bytes unterminated)."""
        until = min(time.monotonic() + wait, self.deadline)
        got: list[str] = []
        while True:
            while b"\n" in self._buf and len(got) < MAX_REPLY_LINES:
                got.append(self.line())
            if got:
                until = min(until, time.monotonic() + grace)
            left = until - time.monotonic()
            if left <= 0 or len(got) >= MAX_REPLY_LINES or len(self._buf) > MAX_LINE:
                break
            try:
                if not self._fill(left):
                    break
            except (TimeoutError, ssl.SSLWantReadError):
                break
        if self._buf and len(got) < MAX_REPLY_LINES:
            got.append(display(bytes(self._buf[:MAX_LINE])))
            self._buf.clear()
        return got


def _capabilities(lines: list[str]) -> set[str]:
    """EHLO keywords (``AUTH`` for ``250-AUTH PLAIN LOGIN``), upper-cased."""
    return {line[4:].split(" ", 1)[0].upper() for line in lines[1:] if len(line) > 4}


def _auth_mechanisms(lines: list[str]) -> set[str]:
    for line in lines[1:]:
        words = line[4:].upper().split()
        if words[:1] == ["AUTH"]:
            return set(words[1:])
    return set()


@dataclass
class _Session:
    wire: _Wire
    ehlo: list[str]

    @property
    def caps(self) -> set[str]:
        return _capabilities(self.ehlo)


def _expect(wire: _Wire, code: int, lines: list[str], what: str) -> None:
    if code // 100 != 2 and not (what == "DATA" and code == 354):
        raise _TroubleError(f"{what} answered {' '.join(lines)!r}")


def _smtp_open(
    endpoint: Endpoint,
    context: ssl.SSLContext,
    deadline: float,
    *,
    auth: bool,
    starttls: bool | None = None,
) -> _Session:
    """Greeting, EHLO, TLS as ``endpoint`` says (``starttls`` overrides), and AUTH.

    STARTTLS is required when asked for: a server that does not offer it is ``_TroubleError``
    and no credentials are sent (fail closed: the probe never lowers its own security).
    """
    wire = _Wire(endpoint.host, endpoint.port, deadline)
    try:
        if endpoint.tls == "implicit":
            wire.tls(context, endpoint.server_name)
        code, lines = wire.reply()
        _expect(wire, code, lines, "the greeting")
        code, ehlo = wire.command("EHLO roundtrip.probe")
        _expect(wire, code, ehlo, "EHLO")
        if starttls if starttls is not None else endpoint.tls == "starttls":
            if "STARTTLS" not in _capabilities(ehlo):
                raise _TroubleError("STARTTLS is not offered; nothing further was sent")
            code, lines = wire.command("STARTTLS")
            _expect(wire, code, lines, "STARTTLS")
            wire.tls(context, endpoint.server_name)
            code, ehlo = wire.command("EHLO roundtrip.probe")
            _expect(wire, code, ehlo, "EHLO")
        if auth:
            _smtp_auth(wire, ehlo, endpoint)
        return _Session(wire, ehlo)
    except BaseException:
        wire.close()
        raise


def _smtp_auth(wire: _Wire, ehlo: list[str], endpoint: Endpoint) -> None:
    """AUTH PLAIN (else LOGIN); the credentials are never kept in ``received``."""
    mechanisms = _auth_mechanisms(ehlo)
    user, password = endpoint.user.encode(), endpoint.password.encode()
    mark = len(wire.received)
    token = base64.b64encode(b"\0" + user + b"\0" + password).decode()
    secret = base64.b64encode(password).decode()
    if "PLAIN" in mechanisms:
        code, lines = wire.command(f"AUTH PLAIN {token}")
    elif "LOGIN" in mechanisms:
        wire.command("AUTH LOGIN")
        wire.command(base64.b64encode(user).decode())
        code, lines = wire.command(secret)
    else:
        raise _TroubleError(f"no AUTH PLAIN or LOGIN offered: {' '.join(ehlo)!r}")
    # A server that echoes what it got must not put the credentials into the evidence.
    for text in (token, secret, endpoint.password):
        if text:
            wire.received[mark:] = [line.replace(text, "****") for line in wire.received[mark:]]
            lines = [line.replace(text, "****") for line in lines]
    if code != 235:
        raise _TroubleError(f"AUTH answered {' '.join(lines)!r}")


def _quit(wire: _Wire) -> None:
    try:
        wire.command("QUIT")
    except (OSError, _TroubleError):
        pass
    finally:
        wire.close()


# -- the run -----------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every group needs: the endpoints, addresses, TLS context and limits."""

    smtp: Endpoint
    reader: Endpoint | None
    context: ssl.SSLContext
    mail_from: str
    rcpt_to: str
    timeout: float
    mx: tuple[str, int] | None
    keep: bool
    report: ActiveReport
    discover: bool = True
    token: str = field(default_factory=lambda: secrets.token_hex(6))
    #: The MX to test (``--mx``, else port 25 of the SMTP host when it answers).
    mx_target: Endpoint | None = None

    def finding(
        self,
        code: str,
        severity: str,
        message: str,
        server: str = "",
        evidence: Iterable[str] = (),
    ) -> None:
        self.report.findings.append(Finding(code, severity, message, server, tuple(evidence)))

    def check(self, name: str, ok: bool) -> None:
        self.report.checks[name] = self.report.checks.get(name, True) and ok

    def deadline(self) -> float:
        return time.monotonic() + self.timeout


def run_active_checks(
    groups: Iterable[str],
    *,
    smtp: Endpoint,
    reader: Endpoint | None,
    context: ssl.SSLContext,
    mail_from: str,
    rcpt_to: str,
    timeout: float,
    mx: tuple[str, int] | None = None,
    discover: bool = True,
    keep: bool = False,
) -> ActiveReport:
    """Run the named groups (see ``GROUPS``) against ``smtp`` (and ``reader``, the probe's
    own mailbox, for ``smuggling``); each group within ``timeout`` seconds.

    Args:
        mail_from: the probe's own sender (the SMTP user's address).
        rcpt_to: the probe's own mailbox: the only recipient any check sends mail to.
        mx: the MX to test for open relay; default port 25 of ``smtp``'s host, if it answers.
        discover: try the standard ports (25 for the MX; 587, 143, 110 beside implicit-TLS
            URLs on 465, 993, 995); False tests only what is named.
        keep: leave the smuggling check's messages in the mailbox.

    Never raises for what a server does: a group that cannot complete gives an ``info`` or
    ``warn`` finding saying why.
    """
    started = time.monotonic()
    wanted = tuple(g for g in GROUPS if g in set(groups))
    report = ActiveReport(requested=wanted)
    ctx = _Context(
        smtp, reader, context, mail_from, rcpt_to, timeout, mx, keep, report, discover=discover
    )
    if {"starttls-injection", "plaintext-auth", "open-relay", "smuggling"} & set(wanted):
        ctx.mx_target = _mx_endpoint(ctx)
    runners: dict[str, Callable[[_Context], str | None]] = {
        "starttls-injection": _starttls_injection,
        "plaintext-auth": _plaintext_auth,
        "open-relay": _open_relay,
        "spoofing": _spoofing,
        "pipelining": _pipelining,
        "chunking": _chunking,
        "brute-force": _brute_force,
        "smuggling": _smuggling,
    }
    for group in wanted:
        skipped = runners[group](ctx)
        if skipped is None:
            report.ran.append(group)
        else:
            report.skipped[group] = skipped
            ctx.finding("check-skipped", INFO, f"active check {group} skipped: {skipped}")
    report.seconds = time.monotonic() - started
    return report


def _answers(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connect to ``host:port`` succeeds within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def _not_tested(ctx: _Context, code: str, server: str, exc: BaseException, wire: Any) -> None:
    evidence = list(getattr(wire, "received", []))[-6:]
    ctx.finding(code, WARN, f"{code} at {server} not tested: {exc}", server, evidence)


def _starttls_targets(ctx: _Context) -> list[Endpoint]:
    """The STARTTLS ports to test: those given as URLs, the standard ones beside implicit-TLS
    URLs on standard ports (when they answer), and the MX."""
    given = [e for e in (ctx.smtp, ctx.reader) if e is not None]
    targets = [e for e in given if e.tls == "starttls"]
    for endpoint in given:
        port = _STANDARD_STARTTLS.get((endpoint.protocol, endpoint.port))
        if (
            ctx.discover
            and endpoint.tls == "implicit"
            and port
            and _answers(endpoint.host, port, 2.0)
        ):
            targets.append(Endpoint(endpoint.protocol, "starttls", endpoint.host, port))
    if ctx.mx_target is not None:
        targets.append(ctx.mx_target)
    unique: dict[tuple[str, str, int], Endpoint] = {}
    for target in targets:
        unique.setdefault((target.protocol, target.host, target.port), target)
    return list(unique.values())


def _mx_endpoint(ctx: _Context) -> Endpoint | None:
    if ctx.mx is not None:
        return Endpoint("smtp", "starttls", ctx.mx[0], ctx.mx[1])
    host = ctx.smtp.host
    if ctx.smtp.port == 25 or (ctx.discover and _answers(host, 25, min(2.0, ctx.timeout))):
        return Endpoint("smtp", "starttls", host, 25)
    return None


def _unverified() -> ssl.SSLContext:
    """For the MX (its name is not checked against the host dialled); the checks that
    use it send no credentials."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- STARTTLS command injection (CVE-2011-0411, RFC 3207 section 4.2) ------------------------------

#: protocol: (STARTTLS plus the injected command in one write, the go-ahead reply prefix)
_INJECTION = {
    "smtp": (b"STARTTLS\r\nNOOP\r\n", "220"),
    "imap": (b"RTI1 STARTTLS\r\nRTI2 NOOP\r\n", "RTI1 OK"),
    "pop3": (b"STLS\r\nCAPA\r\n", "+OK"),
}


def _starttls_injection(ctx: _Context) -> str | None:
    targets = _starttls_targets(ctx)
    if not targets:
        return (
            "no STARTTLS port: give smtp://, imap:// or pop3:// URLs, or --mx "
            "(implicit-TLS URLs on 465/993/995 also try 587/143/110)"
        )
    for target in targets:
        _inject(ctx, target)
    return None


def _inject(ctx: _Context, target: Endpoint) -> None:
    """Write STARTTLS and a second command in one segment (CVE-2011-0411, RFC 3207 section
    4.2: the server must discard what came before TLS), then listen inside TLS."""
    server = target.address
    wire: _Wire | None = None
    context = _unverified() if target == ctx.mx_target else ctx.context
    try:
        wire = _Wire(target.host, target.port, ctx.deadline())
        if target.protocol == "smtp":
            code, lines = wire.reply()
            _expect(wire, code, lines, "the greeting")
            code, ehlo = wire.command("EHLO roundtrip.probe")
            if "STARTTLS" not in _capabilities(ehlo):
                ctx.finding(
                    "starttls-injection",
                    INFO,
                    f"smtp {server}: STARTTLS not offered; injection not tested",
                    server,
                    ehlo,
                )
                return
        else:
            wire.line()  # the greeting
        payload, go_ahead = _INJECTION[target.protocol]
        injected = payload.split(b"\r\n")[1].decode()
        wire.send(payload)
        try:
            reply = wire.reply()[1] if target.protocol == "smtp" else [wire.line()]
        except (_TroubleError, ConnectionError) as exc:
            if "closed" not in str(exc) and not isinstance(exc, ConnectionError):
                raise
            # Refusing to go on with plaintext buffered behind STARTTLS is safe too.
            ctx.check("no STARTTLS command injection", True)
            ctx.finding(
                "starttls-injection",
                INFO,
                f"{target.protocol} {server}: closed the connection on STARTTLS followed by "
                f"{injected!r} in the same segment (the injection is refused)",
                server,
                wire.received[-2:],
            )
            return
        if not reply[-1].startswith(go_ahead):
            ctx.finding(
                "starttls-injection",
                INFO,
                f"{target.protocol} {server}: STARTTLS refused; injection not tested",
                server,
                reply,
            )
            return
        plaintext = wire.listen(0.0) if wire.pending() else []
        version = wire.tls(context, target.server_name)
        answered = wire.listen(min(INJECTION_WAIT, ctx.timeout))
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "starttls-injection", server, exc, wire)
        return
    finally:
        if wire is not None:
            wire.close()
    ctx.check("no STARTTLS command injection", not answered)
    if answered:
        ctx.finding(
            "starttls-injection",
            FAIL,
            f"{target.protocol} {server}: answered the command {injected!r} sent in plaintext "
            f"with STARTTLS, inside {version} (CVE-2011-0411; RFC 3207 section 4.2)",
            server,
            answered,
        )
    else:
        ctx.finding(
            "starttls-injection",
            INFO,
            f"{target.protocol} {server}: the command {injected!r} sent with STARTTLS was "
            f"discarded (no answer inside {version} within {INJECTION_WAIT:g} s)",
            server,
            [*reply, *plaintext],
        )


# -- AUTH before TLS (RFC 8314 section 3, RFC 4954 section 4) --------------------------------------

_BOGUS_USER = "roundtrip-no-such-user@example.invalid"


def _plaintext_auth(ctx: _Context) -> str | None:
    targets = [t for t in _starttls_targets(ctx) if t.protocol == "smtp"]
    if not targets:
        return "no SMTP port with STARTTLS (587 or 25): give an smtp:// URL or --mx"
    for target in targets:
        _auth_before_tls(ctx, target)
    return None


def _auth_before_tls(ctx: _Context, target: Endpoint) -> None:
    """EHLO in plaintext must not offer AUTH, and AUTH with a bogus user must be refused
    unread (RFC 4954 section 4; 538 5.7.11, or 503/530)."""
    server = target.address
    wire: _Wire | None = None
    try:
        wire = _Wire(target.host, target.port, ctx.deadline())
        code, lines = wire.reply()
        _expect(wire, code, lines, "the greeting")
        code, ehlo = wire.command("EHLO roundtrip.probe")
        offered = _auth_mechanisms(ehlo)
        bogus = base64.b64encode(f"\0{_BOGUS_USER}\0bogus-{ctx.token}".encode()).decode()
        code, reply = wire.command(f"AUTH PLAIN {bogus}")
        if code == 334:  # asks for the credentials: it runs the exchange in plaintext
            wire.command("*")
        _quit(wire)
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "plaintext-auth", server, exc, wire)
        if wire is not None:
            wire.close()
        return
    accepted = code in (235, 334, 535)
    evidence = [line for line in ehlo if "AUTH" in line.upper()] + reply
    ctx.check("no AUTH before TLS", not (offered or accepted))
    if offered or accepted:
        what = []
        if offered:
            what.append(f"EHLO offers AUTH {' '.join(sorted(offered))} before STARTTLS")
        if accepted:
            what.append(f"AUTH with a bogus user got {reply[-1]!r}: credentials are read in clear")
        ctx.finding(
            "plaintext-auth",
            FAIL,
            f"smtp {server}: {'; '.join(what)} (RFC 4954 section 4: refuse with 538 5.7.11)",
            server,
            evidence,
        )
    else:
        ctx.finding(
            "plaintext-auth",
            INFO,
            f"smtp {server}: no AUTH before TLS (AUTH with a bogus user got {reply[-1]!r})",
            server,
            evidence,
        )


# -- open relay (RFC 5321 section 7.1) -------------------------------------------------------------


def _mx_open(target: Endpoint, deadline: float) -> _Session:
    """An unauthenticated session with an MX, upgraded with STARTTLS when it is offered
    (certificate not verified: nothing secret is sent, and an MX's name is often not the
    host dialled)."""
    session = _smtp_open(target, _unverified(), deadline, auth=False, starttls=False)
    try:
        if "STARTTLS" in session.caps:
            session.wire.send(b"STARTTLS\r\n")
            if session.wire.reply()[0] == 220:
                session.wire.tls(_unverified(), target.server_name)
                code, ehlo = session.wire.command("EHLO roundtrip.probe")
                _expect(session.wire, code, ehlo, "EHLO")
                session.ehlo = ehlo
        return session
    except BaseException:
        session.wire.close()
        raise


def _enhanced_status(lines: list[str]) -> str:
    """The subject.detail of a reply's enhanced status code (RFC 3463 section 2; RFC 2034
    section 4: after the reply code), or "" when there is none."""
    match = re.match(r"\d{3}[ -]([245])\.(\d{1,3}\.\d{1,3})(?:\s|$)", lines[-1] if lines else "")
    return match.group(2) if match else ""


def _open_relay(ctx: _Context) -> str | None:
    """MAIL FROM the probe's own address, RCPT TO a foreign ``.invalid`` address, without
    AUTH. Only a 5xx to that RCPT proves the MX refuses to relay (RFC 5321 section 7.1); a
    refused MAIL, a 4xx (RFC 5321 section 4.2.1: temporary, may be accepted later) or a 5xx
    about an address (``_NOT_RELAY_STATUS``) leaves it not tested: a warning, no check."""
    target = ctx.mx_target
    if target is None:
        if not ctx.discover:
            return "no MX given: give --mx HOST:PORT"
        return f"no MX: nothing answered on {ctx.smtp.host}:25; give --mx HOST:PORT"
    server = target.address
    sender = ctx.mail_from
    session: _Session | None = None
    try:
        session = _mx_open(target, ctx.deadline())
        mail = session.wire.command(f"MAIL FROM:<{sender}>")
        rcpt = session.wire.command(f"RCPT TO:<{RELAY_RECIPIENT}>") if mail[0] // 100 == 2 else None
        # Never DATA (docs/active-checks.md): the answer to RCPT is the verdict.
        session.wire.command("RSET")
        _quit(session.wire)
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "open-relay", server, exc, session.wire if session else None)
        if session is not None:
            session.wire.close()
        return None
    evidence = mail[1] + (rcpt[1] if rcpt else [])
    untested = ""
    if rcpt is None:
        untested = f"MAIL FROM:<{sender}> got {mail[1][-1]!r}, so no RCPT was sent"
    elif rcpt[0] // 100 == 4:
        untested = (
            f"RCPT TO:<{RELAY_RECIPIENT}> got {rcpt[1][-1]!r}, a temporary refusal "
            "(RFC 5321 section 4.2.1), not a refusal to relay"
        )
    elif rcpt[0] // 100 == 5 and _enhanced_status(rcpt[1]) in _NOT_RELAY_STATUS:
        untested = (
            f"RCPT TO:<{RELAY_RECIPIENT}> got {rcpt[1][-1]!r}, a refusal of an address "
            "(RFC 3463), not a refusal to relay"
        )
    elif rcpt[0] // 100 != 5 and rcpt[0] // 100 != 2:
        untested = f"RCPT TO:<{RELAY_RECIPIENT}> got {rcpt[1][-1]!r}, not an SMTP verdict"
    if untested:
        ctx.finding(
            "open-relay", WARN, f"open-relay at {server} not tested: {untested}", server, evidence
        )
        return None
    assert rcpt is not None
    relays = rcpt[0] // 100 == 2
    ctx.check("no open relay", not relays)
    if relays:
        ctx.finding(
            "open-relay",
            FAIL,
            f"smtp {server}: accepted mail from {sender} to {RELAY_RECIPIENT} without "
            "AUTH: an open relay (RFC 5321 section 7.1; CVE-1999-0512); no DATA was sent",
            server,
            evidence,
        )
    else:
        ctx.finding(
            "open-relay",
            INFO,
            f"smtp {server}: refused to relay from {sender} to {RELAY_RECIPIENT} ({rcpt[1][-1]!r})",
            server,
            evidence,
        )
    return None


# -- submission without AUTH, sender spoofing (RFC 6409 section 6.1) -------------------------------


def _spoofing(ctx: _Context) -> str | None:
    server = ctx.smtp.address
    domain = ctx.mail_from.rpartition("@")[2]
    if not domain:
        return f"the probe's sender {ctx.mail_from!r} has no domain to pick another address in"
    other = f"postmaster@{domain}"
    if other.lower() == ctx.mail_from.lower():
        other = f"abuse@{domain}"
    session: _Session | None = None
    try:
        session = _smtp_open(ctx.smtp, ctx.context, ctx.deadline(), auth=False)
        plain_mail = session.wire.command(f"MAIL FROM:<{ctx.mail_from}>")
        plain_rcpt = session.wire.command(f"RCPT TO:<{ctx.rcpt_to}>")
        session.wire.command("RSET")
        _quit(session.wire)
        unauth_ok = plain_mail[0] // 100 == 2 and plain_rcpt[0] // 100 == 2
        plain = plain_mail[1] + plain_rcpt[1]
        ctx.check("submission requires AUTH", not unauth_ok)
        ctx.finding(
            "unauthenticated-submission",
            FAIL if unauth_ok else INFO,
            f"smtp {server}: "
            + (
                f"accepted MAIL and RCPT to {ctx.rcpt_to} without AUTH (RFC 6409 section 4.3;"
                " RFC 4954 section 6: 530 5.7.0)"
                if unauth_ok
                else f"refused a transaction without AUTH ({plain[-1]!r})"
            ),
            server,
            plain,
        )
        session = _smtp_open(ctx.smtp, ctx.context, ctx.deadline(), auth=True)
        mail = session.wire.command(f"MAIL FROM:<{other}>")
        rcpt = session.wire.command(f"RCPT TO:<{ctx.rcpt_to}>") if mail[0] // 100 == 2 else None
        # Never DATA: the envelope is the verdict (docs/active-checks.md).
        session.wire.command("RSET")
        _quit(session.wire)
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "sender-spoofing", server, exc, session.wire if session else None)
        if session is not None:
            session.wire.close()
        return None
    evidence = mail[1] + (rcpt[1] if rcpt else [])
    spoofs = rcpt is not None and rcpt[0] // 100 == 2
    login = ctx.smtp.user or ctx.mail_from
    ctx.finding(
        "sender-spoofing",
        WARN if spoofs else INFO,
        f"smtp {server}: "
        + (
            f"user {login} may send as {other} (MAIL FROM accepted; Postfix: "
            "reject_sender_login_mismatch; RFC 6409 section 6.1); no DATA was sent"
            if spoofs
            else f"user {login} may not send as {other} ({evidence[-1]!r})"
        ),
        server,
        evidence,
    )
    return None


# -- PIPELINING and CHUNKING (RFC 2920, RFC 3030) --------------------------------------------------


def _pipelining(ctx: _Context) -> str | None:
    server = ctx.smtp.address
    session: _Session | None = None
    try:
        session = _smtp_open(ctx.smtp, ctx.context, ctx.deadline(), auth=True)
        if "PIPELINING" not in session.caps:
            ctx.finding(
                "pipelining",
                INFO,
                f"smtp {server}: PIPELINING not advertised (RFC 2920)",
                server,
                session.ehlo,
            )
            _quit(session.wire)
            return None
        # One write, a group RFC 2920 section 3.1 allows; RSET instead of DATA: no mail.
        commands = [f"MAIL FROM:<{ctx.mail_from}>", f"RCPT TO:<{ctx.rcpt_to}>", "RSET", "NOOP"]
        session.wire.send("".join(c + "\r\n" for c in commands).encode())
        replies = [session.wire.reply() for _ in commands]
        _quit(session.wire)
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "pipelining", server, exc, session.wire if session else None)
        if session is not None:
            session.wire.close()
        return None
    evidence = [line for _, lines in replies for line in lines]
    works = all(code // 100 == 2 for code, _ in replies)
    ctx.finding(
        "pipelining",
        INFO if works else WARN,
        f"smtp {server}: PIPELINING "
        + (
            "works: MAIL, RCPT, RSET, NOOP in one write got four replies in order"
            if works
            else "is advertised but a pipelined MAIL, RCPT, RSET, NOOP was not answered "
            "2xx in order (RFC 2920 section 3.1)"
        ),
        server,
        evidence,
    )
    return None


def _chunking(ctx: _Context) -> str | None:
    server = ctx.smtp.address
    session: _Session | None = None
    chunk = b"Subject: roundtrip chunking probe\r\n"
    try:
        session = _smtp_open(ctx.smtp, ctx.context, ctx.deadline(), auth=True)
        if "CHUNKING" not in session.caps:
            ctx.finding(
                "chunking",
                INFO,
                f"smtp {server}: CHUNKING not advertised (RFC 3030)",
                server,
                session.ehlo,
            )
            _quit(session.wire)
            return None
        wire = session.wire
        mail = wire.command(f"MAIL FROM:<{ctx.mail_from}>")
        rcpt = wire.command(f"RCPT TO:<{ctx.rcpt_to}>")
        # One chunk that is not the LAST, then RSET: the transaction is dropped, no mail.
        wire.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
        bdat = wire.reply()
        rset = wire.command("RSET")
        _quit(wire)
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "chunking", server, exc, session.wire if session else None)
        if session is not None:
            session.wire.close()
        return None
    replies = [mail, rcpt, bdat, rset]
    evidence = [line for _, lines in replies for line in lines]
    works = all(code // 100 == 2 for code, _ in replies)
    ctx.finding(
        "chunking",
        INFO if works else WARN,
        f"smtp {server}: CHUNKING "
        + (
            f"works: a BDAT chunk of {len(chunk)} octets got {bdat[1][-1]!r}; RSET dropped it"
            if works
            else "is advertised but BDAT did not work (RFC 3030 section 2)"
        ),
        server,
        evidence,
    )
    return None


# -- brute-force protection (report only) ------------------------------------------------


def _brute_force(ctx: _Context) -> str | None:
    """A few AUTH attempts, over TLS, with a user that cannot exist: how the replies slow
    down, and whether the server hangs up (421). Never a real user name: nobody's account
    can be locked by it."""
    server = ctx.smtp.address
    session: _Session | None = None
    attempts: list[tuple[float, str]] = []
    closed = ""
    try:
        session = _smtp_open(ctx.smtp, ctx.context, ctx.deadline(), auth=False)
        if not _auth_mechanisms(session.ehlo) & {"PLAIN", "LOGIN"}:
            ctx.finding(
                "auth-throttling",
                INFO,
                f"smtp {server}: no AUTH PLAIN or LOGIN offered; not tested",
                server,
                session.ehlo,
            )
            _quit(session.wire)
            return None
        for number in range(BRUTE_FORCE_ATTEMPTS):
            bogus = f"\0{_BOGUS_USER}\0wrong-{ctx.token}-{number}".encode()
            started = time.monotonic()
            try:
                code, lines = session.wire.command(f"AUTH PLAIN {base64.b64encode(bogus).decode()}")
            except _TroubleError as exc:
                closed = str(exc)
                break
            attempts.append((time.monotonic() - started, lines[-1]))
            if code == 235:
                break
            if code == 421:
                closed = lines[-1]
                break
        _quit(session.wire)
    except (OSError, ValueError, _TroubleError) as exc:
        _not_tested(ctx, "auth-throttling", server, exc, session.wire if session else None)
        if session is not None:
            session.wire.close()
        return None
    if attempts and attempts[-1][1].startswith("235"):
        ctx.check("AUTH refuses unknown users", False)
        ctx.finding(
            "auth-accepts-anyone",
            FAIL,
            f"smtp {server}: AUTH accepted a user that does not exist ({_BOGUS_USER}) with a "
            "made-up password (RFC 4954 section 4)",
            server,
            [reply for _, reply in attempts],
        )
        return None
    ctx.check("AUTH refuses unknown users", True)
    delays = [seconds for seconds, _ in attempts]
    grows = len(delays) > 1 and delays[-1] > delays[0] + 0.05
    said = ", ".join(f"{reply!r} after {seconds:.2f} s" for seconds, reply in attempts)
    if closed or grows:
        verdict = "slows a password guesser down" + (
            f" and ends the session ({closed})" if closed else ""
        )
    else:
        verdict = (
            f"the replies did not slow down ({min(delays, default=0):.2f} to "
            f"{max(delays, default=0):.2f} s) and the session stayed open (Postfix: "
            "smtpd_client_auth_rate_limit; Dovecot: auth_failure_delay)"
        )
    ctx.finding(
        "auth-throttling",
        INFO,
        f"smtp {server}: {len(attempts)} failed AUTH with a non-existent user: {verdict}",
        server,
        [said] if said else [],
    )
    return None


# -- SMTP smuggling (CVE-2023-51764) ---------------------------------------------------------------


@dataclass
class _Vector:
    name: str
    seq: bytes
    outer_id: str
    inner_id: str
    #: ``submission`` (authenticated, the --smtp endpoint) or ``MX`` (inbound, no AUTH).
    route: str = "submission"
    replies: list[str] = field(default_factory=list)
    refused: bool = False
    #: The server took a second DATA (354) after the fake end of data.
    second_transaction: bool = False
    outer_seen: bool = False
    inner_seen: bool = False
    error: str = ""
    #: The start of the outer message as stored (IMAP only: POP3 clients see lines).
    stored: bytes = b""


def _smuggling_payload(ctx: _Context, vector: _Vector) -> bytes:
    """The outer message with the vector, then a complete second transaction to the probe's
    own mailbox, then the real end of data."""
    date = email.utils.formatdate()

    def headers(message_id: str, part: str) -> str:
        return (
            f"From: <{ctx.mail_from}>\r\nTo: <{ctx.rcpt_to}>\r\nDate: {date}\r\n"
            f"Subject: roundtrip smuggling probe {ctx.token} {vector.name} {part}\r\n"
            f"Message-ID: {message_id}\r\n\r\n"
        )

    outer = headers(vector.outer_id, "outer") + (
        f"roundtrip smuggling probe {ctx.token}: end-of-data variant {vector.name}"
    )
    inner = (
        f"MAIL FROM:<{ctx.mail_from}>\r\nRCPT TO:<{ctx.rcpt_to}>\r\nDATA\r\n"
        + headers(vector.inner_id, "inner")
        + "If this arrived as a message of its own, the server ended DATA early.\r\n"
    )
    return outer.encode() + vector.seq + inner.encode() + b".\r\n"


def _smuggling(ctx: _Context) -> str | None:
    if ctx.reader is None or not ctx.reader.user:
        return "needs the probe's own mailbox: an --imap or --pop3 URL with a user"
    domain = ctx.mail_from.rpartition("@")[2] or "roundtrip.invalid"
    mx = ctx.mx_target
    routes: dict[str, tuple[Endpoint, Callable[[float], _Session]]] = {
        "submission": (
            ctx.smtp,
            lambda deadline: _smtp_open(ctx.smtp, ctx.context, deadline, auth=True),
        ),
    }
    if mx is not None:
        # Inbound: the MX takes mail for the probe's own domain without AUTH.
        routes["MX"] = (mx, lambda deadline: _mx_open(mx, deadline))
    vectors = [
        _Vector(
            name,
            seq,
            f"<roundtrip-smuggle-{ctx.token}-{route[0].lower()}{index}@{domain}>",
            f"<roundtrip-smuggle-{ctx.token}-{route[0].lower()}{index}-inner@{domain}>",
            route,
        )
        for route in routes
        for index, (name, seq) in enumerate(SMUGGLING_VECTORS)
    ]
    deadline = ctx.deadline()
    for vector in vectors:
        _send_vector(ctx, vector, deadline, routes[vector.route][1])
    _look_for_smuggled(ctx, vectors, deadline)
    for route, (endpoint, _) in routes.items():
        _judge_smuggling(ctx, [v for v in vectors if v.route == route], endpoint.address, route)
    return None


def _send_vector(
    ctx: _Context, vector: _Vector, deadline: float, open_session: Callable[[float], _Session]
) -> None:
    session: _Session | None = None
    try:
        session = open_session(deadline)
        wire = session.wire
        for command in (f"MAIL FROM:<{ctx.mail_from}>", f"RCPT TO:<{ctx.rcpt_to}>", "DATA"):
            code, lines = wire.command(command)
            _expect(wire, code, lines, command.split(":")[0])
        mark = len(wire.received)
        # QUIT in the same write: its 221 (or the close) ends the replies to read.
        wire.send(_smuggling_payload(ctx, vector) + b"QUIT\r\n")
        first = True
        for _ in range(MAX_SMUGGLING_REPLIES):
            try:
                code, lines = wire.reply()
            except _TroubleError:
                break
            if first and code // 100 != 2:
                vector.refused = True
            first = False
            if code == 354:
                vector.second_transaction = True
            if code == 221:
                break
        vector.replies = wire.received[mark:]
    except (OSError, ValueError, _TroubleError) as exc:
        vector.error = str(exc)
        if session is not None:
            vector.replies = session.wire.received[-4:]
    finally:
        if session is not None:
            session.wire.close()


def _look_for_smuggled(ctx: _Context, vectors: list[_Vector], deadline: float) -> None:
    """Poll the mailbox until every accepted outer message shows (then once more after
    ``SMUGGLING_SETTLE``, or until the deadline when a server took a second DATA); delete
    what was found unless ``keep``."""
    assert ctx.reader is not None
    expected = [v for v in vectors if not v.refused and not v.error]
    found: dict[str, Any] = {}
    delay = 0.05
    settle_until: float | None = None
    while True:
        found = _mailbox_find(ctx, deadline, delete=False)
        if all(v.outer_id in found for v in expected):
            waiting_inner = [
                v for v in expected if v.second_transaction and v.inner_id not in found
            ]
            if not waiting_inner:
                if settle_until is None:
                    settle_until = min(time.monotonic() + SMUGGLING_SETTLE, deadline)
                elif time.monotonic() >= settle_until:
                    break
        if time.monotonic() + delay >= deadline:
            break
        time.sleep(delay)  # polling a mailbox, as the round trip's POP3 wait does
        delay = min(delay * 2, 1.0)
    for vector in vectors:
        vector.outer_seen = vector.outer_id in found
        vector.inner_seen = vector.inner_id in found
        if vector.outer_seen:
            vector.stored = found[vector.outer_id][1]
    if found and not ctx.keep:
        _mailbox_find(ctx, time.monotonic() + ctx.timeout, delete=True)


def _stored_as(vector: _Vector) -> str:
    """How the outer message stored the variant: kept, normalised, cut there, changed."""
    marker = f"end-of-data variant {vector.name}".encode()
    index = vector.stored.find(marker)
    if index < 0:
        return "not found in the first bytes of the stored copy"
    after = vector.stored[index + len(marker) :]
    if not after.strip():
        return "the stored message ends there (DATA ended at the variant)"
    got = after.split(b"MAIL FROM:", 1)[0]
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", vector.seq)
    if got == vector.seq:
        return "kept as sent" + (" (bare CR/LF stored as is)" if got != normal else "")
    if got == normal:
        return "normalised: each bare CR or LF became CRLF"
    if got.replace(b"\n..", b"\n.") in (vector.seq, normal):
        return f"dot-stuffed: stored as {got!r}"
    return f"changed: stored as {got!r}"


def _judge_smuggling(ctx: _Context, vectors: list[_Vector], server: str, route: str) -> None:
    smuggled = [v for v in vectors if v.inner_seen]
    doubtful = [v for v in vectors if not v.inner_seen and v.second_transaction]
    untested = [v for v in vectors if v.error or (not v.refused and not v.outer_seen)]
    evidence = [
        f"{v.name}: "
        + (" | ".join(v.replies) or v.error or "no reply")
        + ("; a second message arrived" if v.inner_seen else "")
        for v in vectors
    ]
    if smuggled or len(untested) < len(vectors):
        ctx.check("no SMTP smuggling", not smuggled)
    if smuggled:
        names = ", ".join(v.name for v in smuggled)
        ctx.finding(
            "smtp-smuggling",
            FAIL,
            f"smtp {server} ({route}): the end-of-data variant(s) {names} ended DATA early: "
            "the second transaction hidden in the body arrived as a message of its own (SMTP "
            "smuggling; CVE-2023-51764, CVE-2023-51765, CVE-2023-51766; Postfix: "
            "smtpd_forbid_bare_newline = normalize)",
            server,
            evidence,
        )
    elif doubtful:
        ctx.finding(
            "smtp-smuggling",
            WARN,
            f"smtp {server} ({route}): the server took a second DATA after the variant(s) "
            f"{', '.join(v.name for v in doubtful)}, but no second message arrived by the "
            "deadline",
            server,
            evidence,
        )
    elif len(untested) == len(vectors):
        ctx.finding(
            "smtp-smuggling",
            WARN,
            f"smtp {server} ({route}): smuggling not tested: no probe message could be sent or "
            "found",
            server,
            evidence,
        )
    else:
        tested = len(vectors) - len(untested)
        ctx.finding(
            "smtp-smuggling",
            INFO,
            f"smtp {server} ({route}): none of {tested} end-of-data variants ended DATA "
            "early (each gave one message, or was refused)"
            + (f"; {len(untested)} not tested" if untested else ""),
            server,
            evidence,
        )
    stored = [v for v in vectors if v.stored]
    if stored:
        ctx.finding(
            "smuggling-bytes",
            INFO,
            f"smtp {server} ({route}): how the stored copies keep the end-of-data variants "
            "(bare CR or LF kept as is can carry smuggling on to a lenient receiver)",
            server,
            [f"{v.name}: {_stored_as(v)}" for v in stored],
        )


def _mailbox_find(ctx: _Context, deadline: float, *, delete: bool) -> dict[str, Any]:
    """Message-ID -> server id of the messages of this run's smuggling check in the probe's
    own mailbox (IMAP: UIDs of INBOX; POP3: message numbers); with ``delete``, removes them."""
    reader = ctx.reader
    assert reader is not None
    marker = f"roundtrip-smuggle-{ctx.token}-"
    timeout = max(0.1, deadline - time.monotonic())
    try:
        if reader.protocol == "imap":
            return _imap_find(reader, ctx.context, timeout, marker, delete)
        return _pop3_find(reader, ctx.context, timeout, marker, delete)
    except (OSError, ValueError, imaplib.IMAP4.error, poplib.error_proto):
        return {}


def _split_head(raw: bytes) -> bytes:
    """The header block of a raw message (roundtrip/_headerblock.py)."""
    return raw[: header_bounds(raw)[0]]


def _message_id(header_block: bytes) -> str:
    for line in header_block.replace(b"\r\n", b"\n").split(b"\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"message-id":
            return value.strip().decode("ascii", "replace")
    return ""


def _imap_find(
    reader: Endpoint, context: ssl.SSLContext, timeout: float, marker: str, delete: bool
) -> dict[str, Any]:
    imap: imaplib.IMAP4
    if reader.tls == "implicit":
        imap = imaplib.IMAP4_SSL(reader.host, reader.port, ssl_context=context, timeout=timeout)
    else:
        imap = imaplib.IMAP4(reader.host, reader.port, timeout=timeout)
        imap.starttls(ssl_context=context)
    try:
        imap.login(reader.user, reader.password)
        imap.select("INBOX")
        _, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{marker}"')
        uids = b" ".join(d for d in data if isinstance(d, bytes)).split()[:100]
        found: dict[str, Any] = {}
        if uids:
            uid_set = b",".join(uids).decode()
            # The start of each message, raw: how the server stored the variant's bytes.
            _, parts = imap.uid("FETCH", uid_set, f"(UID BODY.PEEK[]<0.{MAX_STORED_BYTES}>)")
            for part in parts:
                if isinstance(part, tuple) and len(part) == 2:
                    head = part[0].decode("ascii", "replace")
                    uid = head.split("UID ", 1)[1].split()[0].rstrip(")") if "UID " in head else ""
                    message_id = _message_id(_split_head(part[1]))
                    if marker in message_id:
                        found[message_id] = (uid, part[1])
        if delete and found:
            uid_set = ",".join(str(u) for u, _ in found.values())
            imap.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)")
            if "UIDPLUS" in imap.capabilities:
                imap.uid("EXPUNGE", uid_set)
            else:
                imap.expunge()
        imap.logout()
        return found
    finally:
        try:
            imap.shutdown()
        except OSError:
            pass


class _POP3(poplib.POP3):
    """poplib, implicit TLS verifying ``server_name``, and no socket left open when the
    greeting fails (poplib's own constructor leaves it)."""

    def __init__(self, reader: Endpoint, context: ssl.SSLContext, timeout: float) -> None:
        self._reader, self._context = reader, context
        try:
            super().__init__(reader.host, reader.port, timeout=timeout)
        except BaseException:
            sock = getattr(self, "sock", None)
            if sock is not None:
                sock.close()
            raise

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self._reader.host, self._reader.port), timeout)
        if self._reader.tls != "implicit":
            return sock
        try:
            return self._context.wrap_socket(sock, server_hostname=self._reader.server_name)
        except BaseException:
            sock.close()
            raise


def _pop3_find(
    reader: Endpoint, context: ssl.SSLContext, timeout: float, marker: str, delete: bool
) -> dict[str, Any]:
    pop = _POP3(reader, context, timeout)
    try:
        if reader.tls == "starttls":
            pop.stls(context=context)
        pop.user(reader.user)
        pop.pass_(reader.password)
        count = int(pop.stat()[0])
        found: dict[str, Any] = {}
        for number in range(count, max(count - MAX_POP3_SCAN, 0), -1):
            _, lines, _ = pop.top(number, 0)
            message_id = _message_id(b"\n".join(lines))
            if marker in message_id:
                found[message_id] = (number, b"")
        if delete:
            for number, _ in found.values():
                pop.dele(number)
        pop.quit()
        return found
    finally:
        try:
            pop.close()
        except OSError:
            pass
