"""The MX's sender verdicts (SPF, DKIM, DMARC) on a message's journey, driven with smtplib:
the ``smtp accepted`` step carries what the MX's Authentication-Results field says."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.stack._journeys import HopAuth, HopTiming, Journeys

TIMEOUT = 5.0
RCPT = "user@example.org"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        domains=("example.com", "example.org", "junk.test"),
        dkim=True,
        dmarc_policy={"junk.test": "quarantine"},
        retry_delays=(0.05, 0.1),
    )
    with MailStack(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _mx_step(stack: MailStack, message_id: str) -> HopTiming:
    stack.relay_idle()  # the loop has finished routing (journeys are indexed on store)
    steps = [h for h in stack.journey(message_id) if h.step == "smtp accepted"]
    assert len(steps) == 1, stack.journey(message_id)
    return steps[0]


def test_journey_auth_cross_domain_mx_hop_records_pass(stack: MailStack) -> None:
    user = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    raw = make_message(sender=user.address, recipient=RCPT, subject="journey verdicts")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [RCPT], raw)
    msg = stack.wait_for(RCPT, subject="journey verdicts", timeout=TIMEOUT)
    hop = _mx_step(stack, msg.message_id or "")
    assert hop.host == "mail.example.org"
    assert hop.auth == HopAuth(spf="pass", dkim=("pass", "pass"), dmarc="pass")
    # The same verdicts as the stored copy's Authentication-Results.
    assert msg.auth.spf[0].result == "pass"
    assert msg.auth.dmarc[0].result == "pass"
    # Only the MX checks senders: the submission hop carries no verdicts.
    others = [h for h in stack.journey(msg.message_id or "") if h.step != "smtp accepted"]
    assert others and all(h.auth is None for h in others)


def test_journey_auth_forged_from_records_dmarc_fail(stack: MailStack) -> None:
    """The twin: a From of a p=quarantine stack domain, sent by an outsider straight to the
    MX, is recorded as dmarc=fail (and filed into Junk)."""
    raw = make_message(sender="user@junk.test", recipient=RCPT, subject="journey forged")
    host, port = stack.endpoints("example.org").address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail("someone@elsewhere.test", [RCPT], raw)
    msg = stack.wait_for(RCPT, subject="journey forged", mailbox="Junk", timeout=TIMEOUT)
    hop = _mx_step(stack, msg.message_id or "")
    assert hop.auth is not None
    assert hop.auth.dmarc == "fail"
    assert hop.auth.spf == "none"  # elsewhere.test publishes no SPF record
    assert hop.auth.dkim == ("none",)


def test_journey_auth_without_checks_records_nothing() -> None:
    """An MX that checks no sender leaves ``auth`` unset; verdicts attach only to the
    accepting step and survive the journey's re-timing."""
    journeys = Journeys()
    journeys.record("Q1", "smtp accepted", "mail.example.org", 10.0)
    journeys.record("Q1", "stored", "mail.example.org", 10.5)
    journeys.authenticated("Q2", HopAuth(spf="pass"))  # unknown queue id: ignored
    raw = (
        b"Received: from x ([127.0.0.1])\r\n\tby mail.example.org id Q1\r\n"
        b"Message-ID: <a@b>\r\n\r\n"
    )
    journeys.index(raw)
    assert [h.auth for h in journeys.journey("<a@b>")] == [None, None]
    journeys.authenticated("Q1", HopAuth(spf="fail", dmarc="fail"))
    accepted, stored = journeys.journey("<a@b>")
    assert accepted.auth == HopAuth(spf="fail", dmarc="fail")
    assert (accepted.at, stored.at, stored.auth) == (0.0, 0.5, None)
