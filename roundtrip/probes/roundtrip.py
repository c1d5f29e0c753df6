"""A full round trip: submit a tagged message, wait for it, fetch it, verify it, report.

Verification: exactly one copy arrived; the body is byte-identical (sha256); From, To,
Subject and Message-ID are unchanged; the Received chain is parsed and any hop without TLS is
reported as a finding.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import re
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import Endpoint
from ..errors import ProbeError
from ._net import Step, Timeline, TLSFacts
from .fetch import fetch_imap, fetch_pop3
from .send import ProbeMessage, build_probe_message, submit

__all__ = ["Hop", "ProbeResult", "parse_hops", "run_probe", "verify"]


@dataclass
class Hop:
    """One Received line, oldest first."""

    by: str
    from_: str
    with_: str
    tls: bool
    date: str


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
    findings: list[str] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""
    error_step: str = ""
    total_seconds: float = 0.0
    submit_reply: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [asdict(s) for s in self.steps]
        return data

    def step_seconds(self, name: str) -> float | None:
        for step in self.steps:
            if step.name == name:
                return step.seconds
        return None


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = raw.find(sep)
        if idx >= 0:
            return raw[:idx], raw[idx + len(sep) :]
    return raw, b""


def _normalise(body: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", body)


def parse_hops(raw: bytes) -> list[Hop]:
    """The Received chain of a message, oldest hop first."""
    headers = _HEADER_PARSER.parsebytes(_split(raw)[0] + b"\r\n\r\n")
    hops = []
    for value in reversed(headers.get_all("Received") or []):
        text = " ".join(str(value).split())
        by = re.search(r"\bby\s+(\S+)", text)
        frm = re.search(r"\bfrom\s+(\S+)", text)
        with_ = re.search(r"\bby\s+\S+.*?\bwith\s+(\S+)", text)
        proto = with_.group(1).rstrip(";") if with_ else ""
        tls = bool(re.match(r"(?i)(E?SMTPS|ESMTPSA|LMTPS|UTF8SMTPS)", proto)) or "TLS" in text
        date = text.rpartition(";")[2].strip() if ";" in text else ""
        hops.append(
            Hop(
                by=by.group(1) if by else "",
                from_=frm.group(1) if frm else "",
                with_=proto,
                tls=tls,
                date=date,
            )
        )
    return hops


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
    received = _HEADER_PARSER.parsebytes(head + b"\r\n\r\n")
    original = _HEADER_PARSER.parsebytes(_split(sent.raw)[0] + b"\r\n\r\n")
    for name in ("From", "To", "Subject", "Message-ID"):
        result.checks[f"{name} unchanged"] = " ".join(
            str(received.get(name, "")).split()
        ) == " ".join(str(original.get(name, "")).split())
    result.hops = parse_hops(got)
    for hop in result.hops:
        if not hop.tls:
            result.findings.append(
                f"hop to {hop.by or '?'} from {hop.from_ or '?'} used {hop.with_ or '?'}"
                " without TLS"
            )
    if len(copies) > 1:
        result.findings.append(f"the message arrived {len(copies)} times")


def run_probe(
    smtp: Endpoint,
    retrieve: Endpoint,
    *,
    context: ssl.SSLContext,
    mail_from: str,
    rcpt_to: str,
    timeout: float = 30.0,
    keep: bool = False,
) -> ProbeResult:
    """Submit through ``smtp``, find the message through ``retrieve`` (IMAP or POP3), verify.

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
    try:
        result.submit_reply = submit(
            smtp, message, context=context, timeout=timeout, timeline=timeline
        )
        fetcher = fetch_imap if retrieve.protocol == "imap" else fetch_pop3
        copies = fetcher(
            retrieve,
            message_id=message.message_id,
            context=context,
            timeout=timeout,
            deadline=deadline,
            timeline=timeline,
            delete=not keep,
        )
        verify(message, copies, result)
    except ProbeError as exc:
        result.error = str(exc)
        result.error_step = exc.step
    finally:
        result.steps = timeline.steps
        result.tls = timeline.tls
        result.findings = timeline.findings + result.findings
        result.total_seconds = time.perf_counter() - started
    result.ok = not result.error and bool(result.checks) and all(result.checks.values())
    if not result.error and not result.ok:
        failed = [name for name, ok in result.checks.items() if not ok]
        result.error = "verification failed: " + ", ".join(failed)
        result.error_step = "VERIFY"
    return result
