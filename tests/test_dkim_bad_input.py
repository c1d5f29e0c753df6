"""Hostile DKIM input at the MX: each case gets the RFC's verdict, never a pass, never a crash.

``l=`` tricks (RFC 6376 section 8.2), oversized keys (RFC 8301 section 3.2) and a second From
(RFC 6376 section 8.15, RFC 7489 section 6.6.1), each with a twin that passes.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import dkim  # dkimpy, to sign the way an outside signer would
import pytest
from _support import make_message
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from roundtrip import MailStack, StackConfig
from roundtrip.protocols.dkim import public_key_record, sign

TIMEOUT = 5.0
RCPT = "user@example.org"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(domains=("example.com", "example.org"))) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _mx_send(stack: MailStack, raw: bytes, mail_from: str = "app@example.com") -> None:
    """Hand ``raw`` to example.org's MX from 127.0.0.1 (the relay's address: SPF passes for a
    stack domain, so DKIM alone decides what these tests look at)."""
    host, port = stack.endpoints("example.org").address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail(mail_from, [RCPT], raw)


def _app_key(stack: MailStack, selector: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stack.publish_dkim_key("example.com", selector, key.public_key())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def test_dkim_body_appended_past_l_is_policy_not_pass(stack: MailStack) -> None:
    pem = _app_key(stack, "app")
    raw = make_message(sender="app@example.com", recipient=RCPT, subject="with l=")
    signed = dkim.sign(raw, b"app", b"example.com", pem, length=True) + raw
    _mx_send(stack, signed + b"P.S. Urgent: wire the money to this account.\r\n")
    (msg,) = stack.assert_delivered(RCPT, subject="with l=", auth={"dkim": "policy"})
    assert "unsigned" in (msg.auth.dkim[0].reason or "")


def test_dkim_l_covering_the_whole_body_passes(stack: MailStack) -> None:
    """The twin: the same l= signature, nothing appended."""
    pem = _app_key(stack, "app")
    raw = make_message(sender="app@example.com", recipient=RCPT, subject="whole l=")
    signed = dkim.sign(raw, b"app", b"example.com", pem, length=True) + raw
    assert b"l=" in signed.split(b"\r\n\r\n")[0]
    _mx_send(stack, signed)
    stack.assert_delivered(RCPT, subject="whole l=", auth={"dkim": "pass"})


def _fake_key_record(bits: int) -> str:
    """A record with an RSA modulus of ``bits`` bits (no private key: nothing can verify)."""
    modulus = (1 << (bits - 1)) | int.from_bytes(b"\x5a" * (bits // 8), "big") | 1
    modulus &= (1 << bits) - 1
    public = rsa.RSAPublicNumbers(65537, modulus).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public_key_record("rsa-sha256", der)


@pytest.mark.parametrize(
    ("bits", "result", "reason"),
    [
        (8200, "permerror", "above 8192"),  # refused before any arithmetic
        (8192, "fail", "signature did not verify"),  # the twin: checked, and wrong
    ],
)
def test_dkim_oversized_key_is_permerror(
    stack: MailStack, bits: int, result: str, reason: str
) -> None:
    stack.publish_dkim_key("example.com", "huge", _fake_key_record(bits))
    pem = _app_key(stack, "signer")
    raw = make_message(sender="app@example.com", recipient=RCPT, subject=f"key {bits}")
    signed = dkim.sign(raw, b"huge", b"example.com", pem) + raw  # signed with another key
    _mx_send(stack, signed)
    (msg,) = stack.assert_delivered(RCPT, subject=f"key {bits}", auth={"dkim": result})
    assert reason in (msg.auth.dkim[0].reason or "")


def _stack_signed(stack: MailStack, subject: str) -> bytes:
    raw = make_message(sender="user@example.com", recipient=RCPT, subject=subject)
    return sign(raw, stack.dkim_keys["example.com"], now=time.time())


def test_dkim_second_from_added_after_signing_fails(stack: MailStack) -> None:
    """From is oversigned: a From prepended on the way breaks both signatures."""
    signed = _stack_signed(stack, "two froms")
    _mx_send(stack, b"From: Security Team <security@example.com>\r\n" + signed)
    (msg,) = stack.assert_delivered(RCPT, subject="two froms")
    assert [r.result for r in msg.auth.dkim] == ["fail", "fail"]


def test_dkim_one_from_as_signed_passes(stack: MailStack) -> None:
    """The twin: the same signed message untouched."""
    _mx_send(stack, _stack_signed(stack, "one from"))
    stack.assert_delivered(RCPT, subject="one from", auth={"dkim": "pass", "dmarc": "pass"})


def test_dmarc_second_from_cannot_hide_a_forged_one(stack: MailStack) -> None:
    """Two From fields, one an outside domain with no policy, one a stack domain (p=reject)
    not authenticated: the strictest failing policy wins (RFC 7489 section 6.6.1)."""
    raw = make_message(sender="a@elsewhere.test", recipient=RCPT, subject="hidden forgery")
    forged = b"From: <ceo@example.com>\r\n" + raw
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, forged, mail_from="a@elsewhere.test")
    assert info.value.smtp_code == 550
    stack.assert_not_delivered(RCPT, subject="hidden forgery")
    _mx_send(stack, raw, mail_from="a@elsewhere.test")  # the twin: the outside From alone
    stack.assert_delivered(RCPT, subject="hidden forgery")
