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
