"""Mail for outside domains: the assertions and wait_for see the outbound capture.

An application that mails ``carol@gmail.com`` from inside a test must not pass
``assert_not_delivered()``: the stack accepted the message and would have sent it. And
``wait_for`` and ``assert_delivered`` must agree on where such mail is.
"""

from __future__ import annotations

import smtplib

import pytest

from roundtrip import MailStack
from roundtrip.errors import ConfigError, NotDeliveredError

TIMEOUT = 5.0
OUTSIDE = "carol@gmail.com"


@pytest.fixture
def stack(two_domains: MailStack) -> MailStack:
    return two_domains


def _send(stack: MailStack, to: list[str], subject: str) -> None:
    _send_raw(stack, to, to, subject)


def test_outbound_assert_not_delivered_fails_for_captured_mail(stack: MailStack) -> None:
    _send(stack, [OUTSIDE], "reset link")
    assert len(stack.outbound) == 1
    with pytest.raises(AssertionError, match="outbound capture") as info:
        stack.assert_not_delivered(timeout=TIMEOUT)
    assert OUTSIDE in str(info.value)
    with pytest.raises(AssertionError):
        stack.assert_not_delivered(OUTSIDE, timeout=TIMEOUT)
    with pytest.raises(AssertionError):
        stack.assert_not_delivered(subject="reset link", timeout=TIMEOUT)


def test_outbound_assert_not_delivered_twin_passes(stack: MailStack) -> None:
    stack.assert_not_delivered(timeout=TIMEOUT)  # nothing sent at all
    _send(stack, [OUTSIDE], "reset link")
    stack.assert_not_delivered("dave@gmail.com", timeout=TIMEOUT)  # another outside address
    stack.assert_not_delivered(stack.user("example.org").address, timeout=TIMEOUT)
    stack.assert_not_delivered(subject="something else", timeout=TIMEOUT)


def test_outbound_wait_for_and_assert_delivered_agree(stack: MailStack) -> None:
    _send(stack, [OUTSIDE], "welcome")
    found = stack.wait_for(OUTSIDE, timeout=TIMEOUT)
    assert found.subject == "welcome"
    assert found.envelope_to == (OUTSIDE,)
    assert found.captured
    [delivered] = stack.assert_delivered(OUTSIDE.upper(), subject="welcome", timeout=TIMEOUT)
    assert delivered.captured
    assert [m.subject for m in stack.messages(OUTSIDE)] == ["welcome"]


def test_outbound_wait_for_another_outside_address_times_out(stack: MailStack) -> None:
    _send(stack, [OUTSIDE], "welcome")
    stack.wait_for(OUTSIDE, timeout=TIMEOUT)
    with pytest.raises(NotDeliveredError, match="outbound capture"):
        stack.wait_for("dave@gmail.com", timeout=0.2)
    with pytest.raises(AssertionError, match=r"expected exactly 1 message to dave@gmail\.com"):
        stack.assert_delivered("dave@gmail.com", timeout=0.2)


def test_outbound_unknown_user_of_a_stack_domain_is_a_config_error(stack: MailStack) -> None:
    with pytest.raises(ConfigError, match="its domain is served by it"):
        stack.wait_for("nobody@example.com", timeout=0.2)


def test_outbound_mixed_recipients_counted_per_copy(stack: MailStack) -> None:
    local = stack.user("example.org").address
    _send(stack, [local, OUTSIDE], "both")
    stack.assert_delivered(local, subject="both", timeout=TIMEOUT)
    stack.assert_delivered(OUTSIDE, subject="both", timeout=TIMEOUT)
    stack.assert_delivered(subject="both", count=2, timeout=TIMEOUT)
    assert [m.subject for m in stack.messages()] == ["both"]  # users' mailboxes only


def _send_raw(stack: MailStack, envelope: list[str], header_to: list[str], subject: str) -> None:
    """Submit with these envelope recipients and a To field that names ``header_to``."""
    user = stack.user("example.com")
    raw = (
        f"From: <{user.address}>\r\nTo: {', '.join(header_to)}\r\nSubject: {subject}\r\n\r\nhi\r\n"
    ).encode()
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, envelope, raw)


def test_outbound_copy_counts_for_its_envelope_recipient_only(stack: MailStack) -> None:
    """The captured copy for carol names a local user in its To field; it is carol's."""
    local = stack.user("example.org").address
    _send_raw(stack, [OUTSIDE], [OUTSIDE, local], "carol only")
    stack.assert_delivered(OUTSIDE, subject="carol only", timeout=TIMEOUT)
    stack.assert_not_delivered(local, subject="carol only", timeout=0.5)


def test_outbound_copy_twin_a_missing_local_copy_fails_the_assertion(stack: MailStack) -> None:
    """With the header counted, ``assert_delivered(local)`` passed on carol's copy although
    the local user never got one (as test_outbound_mixed_recipients_counted_per_copy did,
    until its local copy came in as well and made it two)."""
    local = stack.user("example.org").address
    _send_raw(stack, [OUTSIDE], [OUTSIDE, local], "not for local")
    stack.assert_delivered(OUTSIDE, subject="not for local", timeout=TIMEOUT)
    with pytest.raises(AssertionError, match=r"carol@gmail\.com"):
        stack.assert_delivered(local, subject="not for local", timeout=0.5)


def test_mailbox_copy_belongs_to_its_owner_not_to_the_other_names_in_to(
    stack: MailStack,
) -> None:
    """alice's copy of a message addressed to alice and bob is no proof that bob got his."""
    here = stack.user("example.com").address
    there = stack.user("example.org").address
    _send_raw(stack, [here], [here, there], "only here")
    stack.assert_delivered(here, subject="only here", timeout=TIMEOUT)
    stack.assert_not_delivered(there, subject="only here", timeout=0.5)
    with pytest.raises(AssertionError):
        stack.assert_delivered(there, subject="only here", timeout=0.5)


def test_user_lookup_by_address(stack: MailStack) -> None:
    user = stack.user("example.org")
    assert stack.user(user.address) == user
    assert stack.user(user.address.upper()) == user
    with pytest.raises(ConfigError, match="is not a user of this stack; its users"):
        stack.user("noreply@example.com")
    with pytest.raises(ConfigError, match=r"no user in domain 'example\.net'"):
        stack.user("example.net")
