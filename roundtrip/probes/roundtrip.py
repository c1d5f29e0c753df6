"""A full round trip: submit a tagged message, wait for it, fetch it, verify it, report.

Verification: exactly one copy arrived; the body is unchanged byte for byte once line ends
are made CRLF (sha256; a server may store LF and serve CRLF, RFC 5321 section 2.3.8); From,
To, Subject and Message-ID are unchanged; the Received chain is parsed, each hop described by
an info finding (TLS or not, seconds since the previous hop) and any hop without TLS reported
as a warning. Every finding of severity ``fail`` (AUTH offered before STARTTLS, TLS below 1.2
negotiated or accepted, a forbidden cipher suite, a duplicate, a timing above its ``crit``
threshold, ...) also fails the probe through a named check; a certificate expiring within 30
days is a warning. docs/checks.md lists every check.
"""

from __future__ import annotations

import datetime
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .._headerblock import first_empty_line
from ..config import Endpoint
from ..errors import ProbeError, TLSError
from ._net import (
    FAIL,
    INFO,
    WARN,
    Finding,
    Step,
    Timeline,
    TLSFacts,
    Transcript,
    check_legacy_tls,
    diagnose_certificate,
    expiry_text,
    scan_tls,
)
from .authcheck import delivered_findings
from .fetch import fetch_imap, fetch_pop3
from .send import ProbeMessage, build_probe_message, submit
from .tlsfacts import certificate_issues, header_issues

__all__ = [
    "TIMINGS",
    "Finding",
    "Hop",
    "ProbeResult",
    "Thresholds",
    "parse_hops",
    "run_probe",
    "timings",
    "verify",
]

#: The timings thresholds apply to: ``submit`` (from the SMTP connect to the server's reply
#: to DATA), ``deliver`` (from that reply to the message showing in the mailbox), ``fetch``
#: (retrieving the copies: IMAP UID FETCH, POP3 RETR).
TIMINGS = ("submit", "deliver", "fetch")


@dataclass(frozen=True)
class Thresholds:
    """Seconds above which a timing is a warning (``warn``) or a failure (``crit``), per
    name of ``TIMINGS``; a name absent is not judged."""

    warn: dict[str, float] = field(default_factory=dict)
    crit: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.warn or self.crit)


#: Bytes a copy of the probe message may have grown by in transit (trace, DKIM, ARC and
#: spam-report header fields); a server announcing more is refused unread.
MAX_GROWTH = 1024 * 1024

#: The check each failing finding code turns into.
FINDING_CHECKS = {
    "auth-before-tls": "no AUTH before TLS",
    "legacy-tls": "TLS below 1.2 refused",
    "chain-incomplete": "certificate chain complete",
    "weak-signature": "no certificate signed with SHA-1 or MD5",
    "weak-cipher": "no cipher suite RFC 9325 forbids",
}


@dataclass
class Hop:
    """One Received line, oldest first.

    ``delay``: seconds from the previous hop's date stamp to this one's (RFC 5321 section
    4.4; None for the first hop or a date that does not parse; negative when the two
    servers' clocks disagree). ``field``: the Received field itself, unfolded, cut at
    ``MAX_FIELD_CHARS`` (the evidence of the hop's finding).
    """

    by: str
    from_: str
    with_: str
    tls: bool
    date: str
    delay: float | None = None
    field: str = ""


#: Characters of a Received field kept as a hop's evidence.
MAX_FIELD_CHARS = 300


@dataclass
class ProbeResult:
    """Outcome of one probe round trip. ``ok`` is True only when every check passed."""

    ok: bool
    smtp: str
    retrieve: str
    token: str = ""
    message_id: str = ""
    steps: list[Step] = field(default_factory=list)
    tls: list[TLSFacts] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""
    error_step: str = ""
    total_seconds: float = 0.0
    submit_reply: str = ""
    #: Seconds from the server's 250 for DATA to the message showing in the mailbox.
    time_to_visible: float | None = None
    #: Server address -> "refused", "accepted TLSv1.1" or "not tested: ..." (when checked).
    legacy_tls: dict[str, str] = field(default_factory=dict)
    #: Per-hop timings inside the server, when it can tell them (the embedded stack):
    #: dicts of ``step``, ``host`` and ``at`` (seconds since the submission was accepted).
    journey: list[dict[str, Any]] = field(default_factory=list)
    #: The session transcript of each connection (credentials redacted, message content
    #: abbreviated); the one the probe failed on has ``failed`` set.
    transcripts: list[Transcript] = field(default_factory=list)
    #: Connections whose transcripts were dropped (the first and latest ones are kept).
    transcripts_omitted: int = 0
    #: Seconds of each of ``TIMINGS`` this run measured (a step not reached is absent).
    timings: dict[str, float] = field(default_factory=dict)
    #: Server address -> ``_net.scan_tls`` outcomes (TLS versions one by one, and a cipher
    #: suite without forward secrecy), when asked for (``scan_tls``).
    tls_scan: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        # A transcript has its own JSON form (its kept lines, with the omission marker).
        data = asdict(replace(self, transcripts=[]))
        data["steps"] = [asdict(s) for s in self.steps]
        data["transcripts"] = [t.as_dict() for t in self.transcripts]
        return data


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """The header block and the body, by the wider reading of roundtrip/_headerblock.py
    (every line up to the first empty line): a server that mangled a header line (a bare
    LF, a stray line) is reported by the header findings, with the whole line as evidence,
    and the fields below it are still compared, as a lenient mail reader would show them."""
    end, body = first_empty_line(raw)
    return raw[:end], raw[body:]


def _normalise(body: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", body)


def parse_hops(raw: bytes) -> list[Hop]:
    """The Received chain of a message, oldest hop first."""
    headers = _HEADER_PARSER.parsebytes(_split(raw)[0] + b"\r\n\r\n")
    hops: list[Hop] = []
    previous: datetime.datetime | None = None
    for value in reversed(headers.get_all("Received") or []):
        text = " ".join(str(value).split())
        by = re.search(r"\bby\s+(\S+)", text)
        frm = re.search(r"\bfrom\s+(\S+)", text)
        proto = _with_after_by(text.split())
        tls = bool(re.match(r"(?i)(E?SMTPS|ESMTPSA|LMTPS|UTF8SMTPS)", proto)) or "TLS" in text
        date = text.rpartition(";")[2].strip() if ";" in text else ""
        stamp = _parse_date(date)
        delay = None
        if stamp is not None and previous is not None:
            delay = (stamp - previous).total_seconds()
        previous = stamp
        hops.append(
            Hop(
                by=by.group(1) if by else "",
                from_=frm.group(1) if frm else "",
                with_=proto,
                tls=tls,
                date=date,
                delay=delay,
                field=text[:MAX_FIELD_CHARS],
            )
        )
    return hops


def _parse_date(text: str) -> datetime.datetime | None:
    """An RFC 5322 date-time, or None when it does not parse. A ``-0000`` zone (UTC, the
    local zone unknown: RFC 5322 section 3.3) is taken as UTC."""
    try:
        stamp = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=datetime.UTC)


def _with_after_by(tokens: list[str]) -> str:
    """The protocol of the ``with`` clause that follows ``by`` (RFC 5321 4.4), by one scan of
    the tokens: a regular expression with a lazy ``.*?`` between the two was quadratic on a
    long field (docs/security.md, regular expressions that see client input)."""
    seen_by = False
    for position, token in enumerate(tokens[:-1]):
        if token == "by":
            seen_by = True
        elif seen_by and token == "with":
            return tokens[position + 1].rstrip(";")
    return ""


def _body_difference(sent: bytes, got: bytes) -> str:
    """Where the received body first differs from the one sent."""
    want_lines = _normalise(sent).split(b"\r\n")
    got_lines = _normalise(got).split(b"\r\n")
    for number, (want, have) in enumerate(zip(want_lines, got_lines, strict=False), 1):
        if want != have:
            # Quote both lines around their first differing byte, so a change past the start
            # of a long line shows in the quotes.
            at = next(
                (i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b),
                min(len(want), len(have)),
            )
            start = max(at - 30, 0)
            where = f" at byte {at + 1}" if start else ""
            return (
                f"the body changed in transit: line {number}{where} sent "
                f"{want[start : start + 60]!r}, got {have[start : start + 60]!r}"
            )
    return (
        f"the body changed in transit: sent {len(want_lines)} lines, got {len(got_lines)} "
        f"(sha256 {hashlib.sha256(_normalise(sent)).hexdigest()[:16]} vs "
        f"{hashlib.sha256(_normalise(got)).hexdigest()[:16]})"
    )


def verify(sent: ProbeMessage, copies: list[bytes], result: ProbeResult) -> None:
    """Fill ``result.checks`` and ``result.findings`` from the copies that arrived."""
    result.checks["exactly one copy"] = len(copies) == 1
    if not copies:
        return
    got = copies[0]
    head, body = _split(got)
    result.checks["body unchanged"] = (
        hashlib.sha256(_normalise(body)).hexdigest()
        == hashlib.sha256(_normalise(sent.body)).hexdigest()
    )
    if not result.checks["body unchanged"]:
        result.findings.append(Finding("altered", FAIL, _body_difference(sent.body, body)))
    received = _HEADER_PARSER.parsebytes(head + b"\r\n\r\n")
    original = _HEADER_PARSER.parsebytes(_split(sent.raw)[0] + b"\r\n\r\n")
    for name in ("From", "To", "Subject", "Message-ID"):
        want = " ".join(str(original.get(name, "")).split())
        got_value = " ".join(str(received.get(name, "")).split())
        result.checks[f"{name} unchanged"] = got_value == want
        if got_value != want:
            result.findings.append(
                Finding(
                    "altered",
                    FAIL,
                    f"the {name} header changed in transit: sent {want!r}, got {got_value!r}",
                )
            )
    result.findings += _header_findings(original, head)
    result.hops = parse_hops(got)
    for number, hop in enumerate(result.hops, 1):
        evidence = (hop.field,) if hop.field else ()
        if hop.delay is None:
            when = "the first hop" if number == 1 else "no delay known (date stamp unreadable)"
        else:
            when = f"{hop.delay:+.0f} s after the previous hop"
        result.findings.append(
            Finding(
                "received-hop",
                INFO,
                f"hop {number}: {hop.from_ or '?'} -> {hop.by or '?'} with {hop.with_ or '?'}"
                f" ({'TLS' if hop.tls else 'no TLS'}), {when}",
                hop.by,
                evidence,
            )
        )
        if not hop.tls:
            result.findings.append(
                Finding(
                    "plaintext-hop",
                    WARN,
                    f"hop to {hop.by or '?'} from {hop.from_ or '?'} used {hop.with_ or '?'}"
                    " without TLS",
                    hop.by,
                    evidence,
                )
            )
    if len(copies) > 1:
        result.findings.append(
            Finding("duplicate", FAIL, f"the message arrived {len(copies)} times")
        )


def _header_findings(sent: email.message.Message, head: bytes) -> list[Finding]:
    """Header sanity of the delivered copy (RFC 5322 section 3.6): the Date may lie within
    a window around the probe's own Date (the submission) and now."""
    try:
        submitted = email.utils.parsedate_to_datetime(str(sent.get("Date", "")))
    except (TypeError, ValueError):
        submitted = datetime.datetime.now(datetime.UTC)
    if submitted.tzinfo is None:  # "-0000": UTC, local offset unknown (RFC 5322 3.3)
        submitted = submitted.replace(tzinfo=datetime.UTC)
    now = datetime.datetime.now(datetime.UTC)
    return [
        Finding(issue.code, issue.severity, issue.message, "", issue.evidence)
        for issue in header_issues(head, submitted=min(submitted, now), now=now)
    ]


def _unique(items: Iterable[Any]) -> list[Any]:
    """Items in order without repeats (POP3 reconnects while polling, each time TLS)."""
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _describe(facts: TLSFacts) -> str:
    names = ", ".join(facts.san) or "none"
    return (
        f"server presented: subject {facts.subject or '?'}; issuer {facts.issuer or '?'}; "
        f"names {names}; {expiry_text(facts.not_after, facts.days_left)}; "
        f"matches {facts.server_name}: {'yes' if facts.hostname_match else 'no'}"
    )


def run_probe(
    smtp: Endpoint,
    retrieve: Endpoint,
    *,
    context: ssl.SSLContext,
    mail_from: str,
    rcpt_to: str,
    timeout: float = 30.0,
    keep: bool = False,
    check_legacy_tls: bool = False,
    scan_tls: bool = False,
    settle: float = 0.25,
    thresholds: Thresholds | None = None,
    auth_checks: bool = False,
    dns: tuple[str, int] | None = None,
) -> ProbeResult:
    """Submit through ``smtp``, find the message through ``retrieve`` (IMAP or POP3), verify.

    Args:
        settle: once the message shows, look again this many seconds later, so that a
            duplicate delivered just after the first copy fails the one-copy check.
        check_legacy_tls: also offer each server only TLS 1.0/1.1 in an extra handshake
            (no credentials sent); acceptance is a failing finding.
        scan_tls: also try each TLS version on its own, and a TLS 1.2 cipher suite without
            forward secrecy, with each server (five extra handshakes each, no credentials);
            an info finding lists the versions, accepting the cipher suite is a warning.
        thresholds: a timing above its ``warn`` threshold is a warning finding, above its
            ``crit`` one a failing finding and a failed check (``<name> within N s``).
        auth_checks: also report the receiving server's Authentication-Results and verify
            the delivered copy's DKIM signatures, as findings (docs/auth-checks.md).
        dns: with ``auth_checks``, the DNS server (host, port) the DKIM keys are looked up
            in; None: the system resolver, or no lookup for a loopback target.

    Never raises ``ProbeError``: a failed step is recorded in the result (``ok`` False,
    ``error`` and ``error_step`` set). Passwords are never put in the result.
    """
    timeline = Timeline()
    result = ProbeResult(ok=False, smtp=smtp.url, retrieve=retrieve.url)
    started = time.perf_counter()
    message = build_probe_message(mail_from=mail_from, rcpt_to=rcpt_to)
    result.token = message.token
    result.message_id = message.message_id
    deadline = time.monotonic() + timeout
    current = smtp
    try:
        result.submit_reply = submit(
            smtp, message, context=context, timeout=timeout, timeline=timeline
        )
        # The delivery clock starts at the server's reply to DATA, not after QUIT.
        submitted_at = timeline.submitted_at or time.perf_counter()
        current = retrieve
        fetcher = fetch_imap if retrieve.protocol == "imap" else fetch_pop3
        copies = fetcher(
            retrieve,
            message_id=message.message_id,
            context=context,
            timeout=timeout,
            deadline=deadline,
            timeline=timeline,
            delete=not keep,
            settle=settle,
            max_size=len(message.raw) + MAX_GROWTH,
        )
        if timeline.visible_at is not None:
            result.time_to_visible = max(timeline.visible_at - submitted_at, 0.0)
        verify(message, copies, result)
        if auth_checks:  # the receiver's Authentication-Results, our own DKIM verdict
            result.findings += delivered_findings(
                copies, result.hops, target=smtp, dns_server=dns, timeout=timeout
            )
    except ProbeError as exc:
        result.error = str(exc)
        result.error_step = exc.step
        timeline.mark_failed()
        if isinstance(exc, TLSError) and isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            _describe_rejected_certificate(result, timeline, current, timeout, context)
    finally:
        result.steps = timeline.steps
        result.tls = _unique(timeline.tls)
        result.findings = _unique(
            timeline.findings + timeline.certificate_findings + result.findings
        )
        result.transcripts = timeline.transcripts
        result.transcripts_omitted = timeline.transcripts_omitted
    if check_legacy_tls:
        _check_legacy(result, (smtp, retrieve), timeout)
    if scan_tls:
        _scan_tls(result, (smtp, retrieve), timeout)
    result.total_seconds = time.perf_counter() - started
    result.timings = timings(result)
    if thresholds:
        _judge_timings(result, thresholds, smtp.address, retrieve.address)
    _conclude(result, (smtp, retrieve), legacy_checked=check_legacy_tls, scan_checked=scan_tls)
    return result


def timings(result: ProbeResult) -> dict[str, float]:
    """The ``TIMINGS`` of ``result`` that it measured (see ``TIMINGS``)."""
    measured: dict[str, float] = {}
    # From the connect to the reply to DATA: QUIT, timed as a step of its own, is not in it.
    submit = [s for s in result.steps if s.name.startswith("smtp ") and s.name != "smtp quit"]
    if any(s.name == "smtp submit" and s.ok for s in submit):
        measured["submit"] = sum(s.seconds for s in submit)
    if result.time_to_visible is not None:
        measured["deliver"] = result.time_to_visible
    fetch = [s for s in result.steps if s.name in ("imap fetch", "pop3 fetch") and s.ok]
    if fetch:
        measured["fetch"] = sum(s.seconds for s in fetch)
    return measured


def _judge_timings(result: ProbeResult, thresholds: Thresholds, smtp: str, reader: str) -> None:
    """Findings (and, for ``crit``, checks) for the timings above their thresholds;
    ``smtp`` and ``reader`` are the servers (``host:port``) the timings concern."""
    for name in TIMINGS:
        crit, warn = thresholds.crit.get(name), thresholds.warn.get(name)
        seconds = result.timings.get(name)
        if crit is not None and seconds is not None:
            result.checks[f"{name} within {crit:g} s"] = seconds <= crit
        if seconds is None:
            continue
        if crit is not None and seconds > crit:
            limit, severity, kind = crit, FAIL, "critical"
        elif warn is not None and seconds > warn:
            limit, severity, kind = warn, WARN, "warning"
        else:
            continue
        result.findings.append(
            Finding(
                f"slow-{name}",
                severity,
                f"{name} took {seconds:.3f} s, above the {kind} threshold of {limit:g} s",
                smtp if name == "submit" else reader,
                (f"{name} {seconds:.6f} s",),
            )
        )


def _describe_rejected_certificate(
    result: ProbeResult,
    timeline: Timeline,
    endpoint: Endpoint,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> None:
    """Add what the certificate that failed verification says to the error, if it can be had,
    and the findings about the chain it came with (judged against ``context``'s anchors)."""
    chain: list[bytes] = []
    facts = diagnose_certificate(
        host=endpoint.host,
        port=endpoint.port,
        protocol=endpoint.protocol,
        tls=endpoint.tls,
        server_name=endpoint.server_name,
        timeout=min(timeout, 10.0),
        chain=chain,
    )
    if facts is not None:
        timeline.tls.append(facts)
        result.error += f" ({_describe(facts)})"
    anchors = context.get_ca_certs(binary_form=True) if context is not None else []
    for issue in certificate_issues(
        chain, server_name=endpoint.server_name, anchors=anchors, verified=[]
    ):
        timeline.certificate_findings.append(
            Finding(
                issue.code,
                issue.severity,
                f"{endpoint.protocol} {endpoint.address}: {issue.message}",
                endpoint.address,
                issue.evidence,
            )
        )


def _conclude(
    result: ProbeResult,
    endpoints: tuple[Endpoint, ...],
    *,
    legacy_checked: bool,
    scan_checked: bool = False,
) -> None:
    """Turn failing findings into failed checks, then set ``ok`` and, when only a check
    failed, the ``VERIFY`` error naming the failed checks and findings."""
    for finding in result.findings:
        # Every failing finding fails the result: one without a check of its own fails the
        # check named after its code, so a new kind of failing finding can never read PASS.
        if finding.severity == FAIL:
            result.checks[FINDING_CHECKS.get(finding.code, f"no {finding.code} finding")] = False
    # Passed only where every server was offered TLS 1.0/1.1 and refused it; a server that
    # could not be tested leaves the check unset (its warning finding says why).
    outcomes = list(result.legacy_tls.values())
    if legacy_checked and outcomes and all(o == "refused" for o in outcomes):
        result.checks.setdefault(FINDING_CHECKS["legacy-tls"], True)
    if scan_checked and result.tls_scan:
        result.checks.setdefault(FINDING_CHECKS["weak-cipher"], True)
    if any(e.tls == "starttls" for e in endpoints) and result.checks:
        result.checks.setdefault(FINDING_CHECKS["auth-before-tls"], True)
    result.ok = not result.error and bool(result.checks) and all(result.checks.values())
    if not result.error and not result.ok:
        failed = [name for name, ok in result.checks.items() if not ok]
        failing = [f.message for f in result.findings if f.severity == FAIL]
        result.error = "verification failed: " + ", ".join(failed)
        if failing:
            result.error += " (" + "; ".join(failing) + ")"
        result.error_step = "VERIFY"


def _handshaken(result: ProbeResult, endpoints: tuple[Endpoint, ...]) -> list[Endpoint]:
    """The endpoints whose verified TLS handshake succeeded in this run."""
    # Implicit-TLS facts name the peer IP, STARTTLS facts the host as given: compare ports.
    ports = {facts.server.rpartition(":")[2] for facts in result.tls if facts.hostname_verified}
    return [e for e in endpoints if str(e.port) in ports]


def _scan_tls(result: ProbeResult, endpoints: tuple[Endpoint, ...], timeout: float) -> None:
    """``scan_tls`` with every server whose TLS handshake succeeded, and its findings."""
    for endpoint in _handshaken(result, endpoints):
        if endpoint.address in result.tls_scan:
            continue
        outcomes = scan_tls(
            host=endpoint.host,
            port=endpoint.port,
            protocol=endpoint.protocol,
            tls=endpoint.tls,
            server_name=endpoint.server_name,
            timeout=min(timeout, 10.0),
        )
        result.tls_scan[endpoint.address] = outcomes
        label = f"{endpoint.protocol} {endpoint.address}"
        evidence = tuple(f"{name}: {outcome}" for name, outcome in outcomes.items())
        versions = {k: v for k, v in outcomes.items() if k.startswith("TLSv")}
        accepted = [k for k, v in versions.items() if v.startswith("accepted")]
        refused = [k for k, v in versions.items() if v == "refused"]
        untested = [k for k, v in versions.items() if v.startswith("not tested")]
        parts = [f"accepts {', '.join(accepted) or 'none'}"]
        if refused:
            parts.append(f"refuses {', '.join(refused)}")
        if untested:
            parts.append(f"not tested {', '.join(untested)}")
        result.findings.append(
            Finding(
                "tls-versions", INFO, f"{label}: {'; '.join(parts)}", endpoint.address, evidence
            )
        )
        weak = outcomes["no-forward-secrecy"]
        if weak.startswith("accepted"):
            result.findings.append(
                Finding(
                    "no-forward-secrecy",
                    WARN,
                    f"{label}: accepts a TLS 1.2 cipher suite without forward secrecy "
                    f"({weak.rpartition(' ')[2]}, static RSA key exchange; RFC 9325 section "
                    "4.1: SHOULD NOT be negotiated)",
                    endpoint.address,
                    (f"no-forward-secrecy: {weak}",),
                )
            )
        result.findings.extend(weak_cipher_findings(label, endpoint.address, outcomes))


#: RFC 9325 section 4.1 on each weak class: MUST NOT (fail) or SHOULD NOT (warn).
_WEAK_CLASS_RULES = {
    "null-encryption": (FAIL, "NULL encryption", "MUST NOT"),
    "anonymous": (FAIL, "anonymous key exchange", "MUST NOT"),
    "rc4": (FAIL, "RC4", "MUST NOT"),
    "export": (FAIL, "export-grade encryption", "MUST NOT"),
    "3des": (WARN, "3DES (112-bit security)", "SHOULD NOT"),
}


def weak_cipher_findings(label: str, address: str, outcomes: dict[str, str]) -> list[Finding]:
    """One ``weak-cipher`` finding per weak class the server accepted; one ``info`` naming the
    classes the local OpenSSL could not offer, so a silent gap is never read as a pass."""
    findings: list[Finding] = []
    untested: list[str] = []
    for name, (severity, what, rule) in _WEAK_CLASS_RULES.items():
        outcome = outcomes.get(name, "not tested: not scanned")
        if outcome.startswith("accepted"):
            findings.append(
                Finding(
                    "weak-cipher",
                    severity,
                    f"{label}: accepts a cipher suite with {what} "
                    f"({outcome.rpartition(' ')[2]}; RFC 9325 section 4.1: {rule} be "
                    "negotiated)",
                    address,
                    (f"{name}: {outcome}",),
                )
            )
        elif outcome.startswith("not tested"):
            untested.append(name)
    if untested:
        findings.append(
            Finding(
                "weak-cipher-untested",
                INFO,
                f"{label}: cipher classes the local OpenSSL cannot offer, not tested: "
                f"{', '.join(untested)}",
                address,
                tuple(f"{name}: {outcomes.get(name, 'not scanned')}" for name in untested),
            )
        )
    return findings


def _check_legacy(result: ProbeResult, endpoints: tuple[Endpoint, ...], timeout: float) -> None:
    """Try a TLS 1.0/1.1-only handshake with every server whose TLS handshake succeeded."""
    for endpoint in _handshaken(result, endpoints):
        if endpoint.address in result.legacy_tls:
            continue
        outcome = check_legacy_tls(
            host=endpoint.host,
            port=endpoint.port,
            protocol=endpoint.protocol,
            tls=endpoint.tls,
            server_name=endpoint.server_name,
            timeout=min(timeout, 10.0),
        )
        result.legacy_tls[endpoint.address] = outcome
        label = f"{endpoint.protocol} {endpoint.address}"
        if outcome.startswith("accepted"):
            result.findings.append(
                Finding(
                    "legacy-tls",
                    FAIL,
                    f"{label}: {outcome.partition(' ')[2]} was accepted; TLS below 1.2 must be "
                    "refused (RFC 8996)",
                    endpoint.address,
                )
            )
        elif outcome.startswith("not tested"):
            result.findings.append(
                Finding(
                    "legacy-tls-untested",
                    WARN,
                    f"{label}: TLS below 1.2 {outcome}",
                    endpoint.address,
                )
            )
