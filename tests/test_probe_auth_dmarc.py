"""The DMARC posture check of ``roundtrip probe`` (roundtrip/probes/_posture.py,
docs/auth-checks.md): tag values (RFC 7489 section 6.3) and what receivers apply when they are
invalid (RFC 7489 sections 6.6.3 and 6.6.4), with the records served by the stack's DNS server
on loopback and read through ``Lookup``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from roundtrip import MailStack
from roundtrip.probes.authcheck import Lookup, check_posture
from roundtrip.protocols.dns import Record

SENDER = "example.com"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _dmarc(stack: MailStack, record: str, *more: Record) -> dict[str, list[Any]]:
    """The DMARC findings with ``record`` as the sender's only DMARC record."""
    stack.reset()
    name = f"_dmarc.{SENDER}"
    kept = [r for r in stack.default_dns_records() if (r.name.lower(), r.rtype) != (name, "TXT")]
    stack.set_dns_records([*kept, Record(name, "TXT", record), *more])
    assert stack.dns is not None
    report = check_posture(SENDER, Lookup((stack.dns.host, stack.dns.port), timeout=5.0))
    codes: dict[str, list[Any]] = {}
    for finding in report.findings:
        if finding.code.startswith("dmarc"):
            codes.setdefault(finding.code, []).append(finding)
    return codes


# -- pct (RFC 7489 sections 6.3 and 6.6.4) ----------------------------------------------------


@pytest.mark.parametrize(
    ("record", "says"),
    [
        (
            "v=DMARC1; p=reject; pct=0",
            "p=reject for only 0% of failing mail; all of it gets p=quarantine",
        ),
        (
            "v=DMARC1; p=quarantine; pct=0",
            "p=quarantine for only 0% of failing mail; all of it gets p=none",
        ),
        (
            "v=DMARC1; p=reject; pct=25",
            "p=reject for only 25% of failing mail; the other 75% gets p=quarantine",
        ),
    ],
)
def test_dmarc_pct_below_100_is_a_warning_with_the_policy_applied(
    stack: MailStack, record: str, says: str
) -> None:
    codes = _dmarc(stack, record)
    (pct,) = codes["dmarc-pct"]
    assert pct.severity == "warn" and says in pct.message
    assert set(codes) == {"dmarc-pct"}


@pytest.mark.parametrize("pct", ["abc", "101", "-1", "5.5", ""])
def test_dmarc_invalid_pct_is_reported(stack: MailStack, pct: str) -> None:
    codes = _dmarc(stack, f"v=DMARC1; p=quarantine; pct={pct}")
    (invalid,) = codes["dmarc-invalid"]
    assert invalid.severity == "warn"
    assert f"pct={pct!r} is not valid (it must be an integer from 0 to 100)" in invalid.message
    assert "use the default pct=100" in invalid.message
    assert [f.message for f in codes["dmarc"]] == ["DMARC policy of example.com: p=quarantine"]


@pytest.mark.parametrize("record", ["v=DMARC1; p=reject; pct=100", "v=DMARC1; p=reject"])
def test_dmarc_full_pct_is_the_plain_policy(stack: MailStack, record: str) -> None:
    codes = _dmarc(stack, record)
    assert set(codes) == {"dmarc"}
    assert [f.severity for f in codes["dmarc"]] == ["info"]
    assert codes["dmarc"][0].message == "DMARC policy of example.com: p=reject"


# -- p= and sp= (RFC 7489 section 6.6.3) ------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "says"),
    [
        (
            "v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.com",
            "invalid subdomain policy sp='bogus' (none, quarantine or reject): receivers act as "
            "if it were p=none (its rua= is valid)",
        ),
        (
            "v=DMARC1; p=reject; sp=bogus",
            "invalid subdomain policy sp='bogus' (none, quarantine or reject): receivers apply "
            "no DMARC policy (it has no valid rua=)",
        ),
        (
            "v=DMARC1; p=block; rua=mailto:d@example.com",
            "has no valid policy (p=block): receivers act as if it were p=none",
        ),
    ],
)
def test_dmarc_invalid_p_or_sp_is_not_the_published_policy(
    stack: MailStack, record: str, says: str
) -> None:
    codes = _dmarc(stack, record)
    (invalid,) = codes["dmarc-invalid"]
    assert invalid.severity == "warn" and says in invalid.message
    assert "dmarc" not in codes


def test_dmarc_invalid_sp_of_the_organizational_domain_reaches_its_subdomains(
    stack: MailStack,
) -> None:
    # A subdomain without a record of its own inherits sp= (RFC 7489 section 6.3).
    stack.reset()
    name = f"_dmarc.{SENDER}"
    kept = [r for r in stack.default_dns_records() if (r.name.lower(), r.rtype) != (name, "TXT")]
    assert stack.dns is not None
    lookup = Lookup((stack.dns.host, stack.dns.port), timeout=5.0)
    for sp, code in (("bogus", "dmarc-invalid"), ("quarantine", "dmarc")):
        stack.set_dns_records([*kept, Record(name, "TXT", f"v=DMARC1; p=reject; sp={sp}")])
        found = [f for f in check_posture(f"sub.{SENDER}", lookup).findings if "dmarc" in f.code]
        assert [f.code for f in found] == [code], found
        assert "from the organizational domain example.com" in found[0].message


@pytest.mark.parametrize("sp", ["none", "quarantine", "reject", "Reject"])
def test_dmarc_valid_sp_keeps_the_domains_policy(stack: MailStack, sp: str) -> None:
    codes = _dmarc(stack, f"v=DMARC1; p=reject; sp={sp}; rua=mailto:d@example.com")
    assert set(codes) == {"dmarc"}
    assert codes["dmarc"][0].message == "DMARC policy of example.com: p=reject"


# -- the other known tags (RFC 7489 section 6.3) ----------------------------------------------


@pytest.mark.parametrize(
    ("tag", "says"),
    [
        ("adkim=x", "adkim='x' is not valid (it must be r or s); receivers ignore it and use "),
        ("aspf=q", "aspf='q' is not valid (it must be r or s)"),
        ("fo=9", "fo='9' is not valid (it must be 0, 1, d or s, separated by ':')"),
        ("fo=1:x", "fo='1:x' is not valid"),
        ("ri=day", "ri='day' is not valid (it must be a number of seconds)"),
        ("rua=http://x.example", "rua= holds 'http://x.example', not a mailto: URI"),
        ("ruf=d@example.com", "ruf= holds 'd@example.com', which is not a URI"),
        ("rua=mailto:", "rua= holds 'mailto:', which is not a URI"),
        ("rua=mailto:nobody", "rua= holds 'mailto:nobody', a mailto: URI without an address"),
        (
            "rua=mailto:d@example.com,ftp://x.example",
            "rua= holds 'ftp://x.example', not a mailto: URI",
        ),
    ],
)
def test_dmarc_invalid_tag_value_is_reported(stack: MailStack, tag: str, says: str) -> None:
    codes = _dmarc(stack, f"v=DMARC1; p=reject; {tag}")
    (invalid,) = codes["dmarc-invalid"]
    assert invalid.severity == "warn" and says in invalid.message
    # The policy itself stands: receivers ignore the invalid tag.
    assert [f.message for f in codes["dmarc"]] == ["DMARC policy of example.com: p=reject"]


def test_dmarc_valid_tag_values_are_not_reported(stack: MailStack) -> None:
    codes = _dmarc(
        stack,
        "v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=R; fo=0:1 : d:s; ri=3600; pct=100; "
        "rua=mailto:d@example.com!10m, mailto:e@example.com; ruf=mailto:f@example.com",
    )
    assert set(codes) == {"dmarc"}


# -- report destinations in other domains (RFC 7489 section 7.1) ------------------------------


def test_dmarc_reports_to_another_domain_without_its_consent_warn(stack: MailStack) -> None:
    codes = _dmarc(
        stack,
        "v=DMARC1; p=reject; rua=mailto:d@reports.example.net,mailto:e@example.com; "
        "ruf=mailto:f@example.org",
    )
    found = codes["dmarc-report-unauthorized"]
    assert [f.severity for f in found] == ["warn", "warn"]
    assert "sends rua= reports to reports.example.net, which does not accept them" in (
        found[0].message
    )
    assert found[0].evidence == ("example.com._report._dmarc.reports.example.net TXT: NXDOMAIN",)
    assert "sends ruf= reports to example.org" in found[1].message
    assert [f.severity for f in codes["dmarc"]] == ["info"]


def test_dmarc_reports_to_a_consenting_or_own_domain_pass(stack: MailStack) -> None:
    codes = _dmarc(
        stack,
        "v=DMARC1; p=reject; rua=mailto:d@reports.example.org,mailto:e@sub.example.com; "
        "ruf=mailto:f@example.org!10m",
        Record("example.com._report._dmarc.reports.example.org", "TXT", "v=DMARC1"),
        Record("example.com._report._dmarc.example.org", "TXT", "v=DMARC1;"),
    )
    assert set(codes) == {"dmarc"}


def test_dmarc_report_consent_is_asked_for_the_policy_domain(stack: MailStack) -> None:
    # A subdomain inheriting the organizational record: the record came from example.com, so
    # the destination's consent is looked up for example.com (RFC 7489 section 7.1).
    stack.reset()
    name = f"_dmarc.{SENDER}"
    kept = [r for r in stack.default_dns_records() if (r.name.lower(), r.rtype) != (name, "TXT")]
    assert stack.dns is not None
    lookup = Lookup((stack.dns.host, stack.dns.port), timeout=5.0)
    record = Record(name, "TXT", "v=DMARC1; p=reject; rua=mailto:d@example.org")
    consent = Record("example.com._report._dmarc.example.org", "TXT", "v=DMARC1")
    for more, warned in (([], True), ([consent], False)):
        stack.set_dns_records([*kept, record, *more])
        codes = {f.code for f in check_posture(f"sub.{SENDER}", lookup).findings}
        assert ("dmarc-report-unauthorized" in codes) is warned
        assert "dmarc" in codes
