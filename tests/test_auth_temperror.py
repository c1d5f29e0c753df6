"""A DMARC verdict the DNS left open is a temporary failure at the MX (451 4.4.3), so the
sender retries (RFC 7489 section 6.6.3, RFC 7208 section 8.6, RFC 3463 X.4.3; OpenDMARC's
RejectFailures temp-fails the same cases). Driven with smtplib against a running stack, each
case with its twin where the DNS answers."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.protocols.dkim import DKIMResult
from roundtrip.protocols.dmarc import DMARCResult
from roundtrip.protocols.dns import Record, default_records
from roundtrip.protocols.spf import SPFResult
from roundtrip.stack._auth import SenderVerdict, _undecided

TIMEOUT = 5.0
RCPT = "user@example.org"
PARTNER = "partner.test"  # a domain outside the stack, with the records a test gives it
INCLUDED = "spf.unreachable.test"  # what the partner's SPF record includes


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        domains=("example.com", "example.org"), sender_auth=True, retry_delays=(0.05, 0.1)
    )
    with MailStack(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _mx_send(stack: MailStack, raw: bytes, *, mail_from: str = f"x@{PARTNER}") -> None:
    """Hand ``raw`` to example.org's MX directly, as an outside server would."""
    host, port = stack.endpoints("example.org").address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail(mail_from, [RCPT], raw)


def _zone(domain: str, *txt: tuple[str, str]) -> list[Record]:
    records = [r for r in default_records(domain, "127.0.0.1") if r.rtype != "TXT"]
    return records + [Record(name, "TXT", value) for name, value in txt]


def _partner(stack: MailStack, policy: str, included: str | None) -> None:
    """The partner's SPF record includes :data:`INCLUDED`, which answers ``included`` (None:
    its server refuses, a DNS failure); its DMARC record says ``p=<policy>``."""
    records = [
        *stack.default_dns_records(),
        *_zone(
            PARTNER,
            (PARTNER, f"v=spf1 include:{INCLUDED} -all"),
            (f"_dmarc.{PARTNER}", f"v=DMARC1; p={policy}"),
        ),
    ]
    if included is not None:
        records += _zone("unreachable.test", (INCLUDED, included))
    stack.set_dns_records(records, refuse_outside=True)


def _msg(subject: str, sender: str = f"x@{PARTNER}") -> bytes:
    return make_message(sender=sender, recipient=RCPT, subject=subject)


# The From domain's DMARC record cannot be fetched


def test_unreachable_dmarc_record_is_451_and_its_twin_is_delivered(stack: MailStack) -> None:
    stack.set_dns_records(stack.default_dns_records(), refuse_outside=True)
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, _msg("dns refused", "x@elsewhere.test"), mail_from="x@elsewhere.test")
    assert info.value.smtp_code == 451
    assert info.value.smtp_error.startswith(b"4.4.3 DMARC policy of elsewhere.test ")
    stack.assert_not_delivered(RCPT, subject="dns refused", timeout=0.2)
    # The twin: the same names answered (NXDOMAIN): no policy, delivered.
    stack.set_dns_records(stack.default_dns_records())
    _mx_send(stack, _msg("dns answered", "x@elsewhere.test"), mail_from="x@elsewhere.test")
    stack.assert_delivered(RCPT, subject="dns answered", auth={"spf": "none", "dmarc": "none"})


def test_relay_retries_a_451_and_delivers_once_the_dns_answers(stack: MailStack) -> None:
    """End to end: a user submits mail whose From domain's DMARC record cannot be read; the
    relay gets 451 at example.org's MX, keeps the message, and delivers it on a later
    attempt, once the DNS answers."""
    stack.set_dns_records(stack.default_dns_records(), refuse_outside=True)
    user = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    raw = _msg("deferred then delivered", f"news@{PARTNER}")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [RCPT], raw)
    (entry,) = stack.wait_relay(lambda q: any("4.4.3" in m.last_error for m in q), TIMEOUT)
    assert entry.last_error.startswith("mail.example.org: 451 4.4.3 DMARC policy of partner.test")
    assert not stack.messages(RCPT)
    # Queued for a retry: not delivered yet, but it may be, so assert_not_delivered fails.
    with pytest.raises(AssertionError, match=r"Still in the relay queue for user@example\.org"):
        stack.assert_not_delivered(RCPT, subject="deferred then delivered", timeout=0.2)
    stack.set_dns_records(stack.default_dns_records())
    (msg,) = stack.assert_delivered(RCPT, subject="deferred then delivered", timeout=TIMEOUT)
    assert msg.auth.dmarc[0].result == "none"
    assert not any(b"Undelivered" in m.raw for m in stack.store.messages("user@example.com"))


# An aligned identifier's check fails on the DNS while the policy would act


def test_aligned_spf_temperror_under_reject_is_451(stack: MailStack) -> None:
    _partner(stack, "reject", None)
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, _msg("spf unknown"))
    assert info.value.smtp_code == 451
    assert info.value.smtp_error.startswith(b"4.4.3 DMARC policy of partner.test ")
    stack.assert_not_delivered(RCPT, subject="spf unknown", timeout=0.2)


def test_aligned_spf_twins_pass_and_fail_once_the_include_answers(stack: MailStack) -> None:
    # The include answers and names the sender: SPF and DMARC pass, delivered.
    _partner(stack, "reject", "v=spf1 ip4:127.0.0.1 -all")
    _mx_send(stack, _msg("spf passes"))
    stack.assert_delivered(RCPT, subject="spf passes", auth={"spf": "pass", "dmarc": "pass"})
    # The include answers and names nobody: a real failure is still refused for good.
    _partner(stack, "reject", "v=spf1 -all")
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, _msg("spf fails"))
    assert info.value.smtp_code == 550
    assert info.value.smtp_error.startswith(b"5.7.1 ")


def test_aligned_spf_temperror_under_p_none_is_delivered(stack: MailStack) -> None:
    """Nothing would be refused or quarantined: the message is delivered, the temperror
    on record in Authentication-Results."""
    _partner(stack, "none", None)
    _mx_send(stack, _msg("policy none"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="policy none", auth={"spf": "temperror", "dmarc": "fail"}
    )
    assert msg.auth.dmarc[0].properties["policy.dmarc"] == "none"


# The rule itself, for DKIM (whose key look-up can fail the same way)


def test_aligned_dkim_temperror_leaves_the_verdict_open_and_unaligned_does_not() -> None:
    failed = DMARCResult(
        "fail", "no aligned DKIM signature or SPF pass", "a.test", "reject", "reject"
    )
    spf = SPFResult("fail", "matched all", "bounces.elsewhere.test")
    aligned = _undecided(failed, spf, [DKIMResult("temperror", "DNS", "mail.a.test")])
    assert aligned.result == "temperror"
    assert "DKIM temperror for aligned d=mail.a.test" in aligned.reason
    verdict = SenderVerdict(b"", spf, aligned)
    assert verdict.deferred and verdict.reject_reply is not None
    assert verdict.reject_reply.startswith("451 4.4.3 DMARC policy of a.test ")
    # Twins: an unaligned d=, and a policy that does not act, keep the failure as it is.
    assert _undecided(failed, spf, [DKIMResult("temperror", "DNS", "b.test")]) == failed
    quiet = DMARCResult("fail", "", "a.test", "none", "none")
    assert _undecided(quiet, spf, [DKIMResult("temperror", "DNS", "a.test")]) == quiet
