"""Header sanity of the delivered copy (RFC 5322 section 3.6): a stack that mangles the
header section on delivery, and its twin that does not."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from roundtrip import MailStack
from roundtrip.config import Endpoint
from roundtrip.probes.roundtrip import Finding, ProbeResult, run_probe
from roundtrip.probes.tlsfacts import header_issues
from roundtrip.stack import Faults

TIMEOUT = 5.0
HEADER_CODES = {"header-count", "header-date", "header-bare-newline", "header-message-id"}


@dataclass
class HeaderFaults(Faults):
    """Delivery that appends ``extra`` to the header section of every message."""

    extra: bytes = b""

    def altered(self, raw: bytes) -> bytes:
        head, sep, body = raw.partition(b"\r\n\r\n")
        return head + b"\r\n" + self.extra.rstrip(b"\r\n") + sep + body


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _endpoint(stack: MailStack, domain: str, service: str, protocol: str) -> Endpoint:
    ep, user = stack.endpoints(domain), stack.user(domain)
    return Endpoint(
        protocol, "implicit", ep.host, ep.ports[service], user.address, user.password, ep.hostname
    )


def _probe(stack: MailStack, reader: str = "imaps") -> ProbeResult:
    return run_probe(
        _endpoint(stack, "example.com", "submissions", "smtp"),
        _endpoint(stack, "example.org", reader, reader[:4]),
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=TIMEOUT,
        settle=0.05,
    )


def _header_findings(result: ProbeResult) -> list[Finding]:
    return [f for f in result.findings if f.code in HEADER_CODES]


@pytest.mark.parametrize("reader", ["imaps", "pop3s"])
def test_probe_headers_of_an_untouched_copy_give_no_finding(stack: MailStack, reader: str) -> None:
    result = _probe(stack, reader)
    assert result.ok, result.error
    assert _header_findings(result) == []


def test_probe_headers_duplicate_and_stale_date_are_warnings(stack: MailStack) -> None:
    stack.faults = HeaderFaults(extra=b"Date: Thu, 01 Jan 1998 00:00:00 +0000\r\n")
    result = _probe(stack)
    findings = _header_findings(result)
    assert {f.severity for f in findings} == {"warn"}
    (count,) = [f for f in findings if f.code == "header-count"]
    assert len(count.evidence) == 2 and "date: Thu, 01 Jan 1998 00:00:00 +0000" in count.evidence
    (date,) = [f for f in findings if f.code == "header-date"]
    assert date.evidence == ("date: Thu, 01 Jan 1998 00:00:00 +0000",)
    assert "1998-01-01" in date.message
    # Warnings only: the round trip itself still passes.
    assert result.ok, result.error


def test_probe_headers_second_malformed_message_id_is_a_warning(stack: MailStack) -> None:
    stack.faults = HeaderFaults(extra=b"Message-ID: not a msg-id\r\n")
    result = _probe(stack)
    codes = {f.code: f for f in _header_findings(result)}
    assert set(codes) == {"header-count", "header-message-id"}
    assert codes["header-message-id"].evidence == ("message-id: not a msg-id",)
    assert result.checks["Message-ID unchanged"] is True


def test_probe_headers_bare_line_feed_is_a_warning(stack: MailStack) -> None:
    stack.faults = HeaderFaults(extra=b"X-Mangled: one\ntwo\r\n")
    result = _probe(stack)
    (bare,) = [f for f in _header_findings(result) if f.code == "header-bare-newline"]
    assert bare.severity == "warn" and "bare LF" in bare.message
    assert "X-Mangled: one\\ntwo" in bare.evidence[0]


# -- the rules on bytes: the cases a delivery fault cannot make without other checks failing --

NOW = datetime.datetime(2026, 1, 2, 12, 0, tzinfo=datetime.UTC)
GOOD = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n"
    b"Date: Fri, 02 Jan 2026 12:00:00 +0000\r\nMessage-ID: <x.1@example.com>"
)


def _codes(head: bytes) -> list[str]:
    return [issue.code for issue in header_issues(head, submitted=NOW, now=NOW)]


def test_probe_headers_rules_accept_a_sane_header_section() -> None:
    assert _codes(GOOD) == []
    assert _codes(GOOD.replace(b"+0000", b"-0000")) == []
    assert _codes(GOOD.replace(b"<x.1@example.com>", b"<x.1@[127.0.0.1]>")) == []


@pytest.mark.parametrize(
    ("head", "codes"),
    [
        (GOOD.replace(b"From: a@example.com\r\n", b""), ["header-count"]),
        (GOOD.replace(b"\r\nMessage-ID: <x.1@example.com>", b""), ["header-count"]),
        (GOOD + b"\r\nSubject: again", ["header-count"]),
        (GOOD.replace(b"12:00:00", b"12:20:00"), ["header-date"]),
        (GOOD.replace(b"Fri, 02 Jan 2026 12:00:00 +0000", b"yesterday"), ["header-date"]),
        (GOOD.replace(b"<x.1@example.com>", b"<x..1@example.com>"), ["header-message-id"]),
        (GOOD.replace(b"<x.1@example.com>", b"x.1@example.com"), ["header-message-id"]),
        (GOOD.replace(b"Subject: s\r\n", b"Subject: s\r"), ["header-bare-newline"]),
    ],
)
def test_probe_headers_rules_flag_each_problem(head: bytes, codes: list[str]) -> None:
    assert _codes(head) == codes
