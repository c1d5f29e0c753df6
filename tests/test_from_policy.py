"""docs/security.md A4.6: the From: header on submission, under each policy."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.errors import ConfigError

TIMEOUT = 5.0


@pytest.fixture(scope="module", params=["accept", "reject"])
def stack(request: pytest.FixtureRequest) -> Iterator[MailStack]:
    config = StackConfig(domains=("example.com",), from_header_policy=request.param)
    with MailStack(config) as running:
        yield running


def _send(stack: MailStack, from_header: str, subject: str) -> None:
    user = stack.user()
    raw = make_message(sender=from_header, recipient=user.address, subject=subject)
    host, port = stack.endpoints().address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [user.address], raw)


def test_from_policy_own_address_is_always_delivered(stack: MailStack) -> None:
    stack.reset()
    _send(stack, stack.user().address.upper(), "own")
    stack.assert_delivered(subject="own", timeout=TIMEOUT)


def test_from_policy_foreign_address(stack: MailStack) -> None:
    stack.reset()
    if stack.config.from_header_policy == "accept":
        _send(stack, "ceo@example.com", "foreign")  # the default: applications send as others
        stack.assert_delivered(subject="foreign", timeout=TIMEOUT)
        return
    with pytest.raises(smtplib.SMTPDataError) as info:
        _send(stack, "ceo@example.com", "foreign")
    assert info.value.smtp_code == 553
    assert b"5.7.1 <ceo@example.com>: From: header not owned by user" in info.value.smtp_error
    stack.assert_not_delivered(subject="foreign", timeout=TIMEOUT)


def test_from_policy_unknown_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="choose one of accept, reject"):
        StackConfig(from_header_policy="sometimes")
