"""The probe's own DKIM verdict under RFC 8301 (roundtrip/probes/_authdkim.py,
docs/auth-checks.md section 2): an rsa-sha1 signature (section 3.1) and an RSA key shorter
than 1024 bits (section 3.2) are permerrors, never a pass; and the key record's flags
(RFC 6376 section 3.6.1): a key in testing mode (``t=y``) is a warning, an empty ``p=`` is
named as a revoked key.

Each message is signed here with a key minted at run time, sent over SMTP to the stack's MX,
fetched back over IMAPS, and verified with the key looked up in the stack's DNS server.
"""

from __future__ import annotations

import imaplib
import math
import secrets
import smtplib
from collections.abc import Iterator
from email.utils import make_msgid

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from roundtrip import MailStack
from roundtrip.probes.authcheck import Lookup, verify_dkim

SENDER, RECIPIENT = "example.com", "example.org"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _probably_prime(n: int) -> bool:
    """Miller-Rabin with 40 random bases."""
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(40):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """A fresh RSA key of ``bits`` bits; below 1024, built from primes found here, since
    ``cryptography`` refuses to generate keys that short."""
    if bits >= 1024:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    e = 65537
    while True:
        p, q = (_prime(bits // 2) for _ in range(2))
        phi = (p - 1) * (q - 1)
        if p != q and math.gcd(e, phi) == 1 and (p * q).bit_length() == bits:
            break
    d = pow(e, -1, phi)
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public)
    return numbers.private_key()


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if _probably_prime(candidate):
            return candidate


def _deliver_signed(
    stack: MailStack, key: rsa.RSAPrivateKey, algorithm: bytes, selector: str
) -> bytes:
    """Sign a message with ``key``, publish the key, send the message to the MX of
    ``RECIPIENT`` and return the copy IMAP serves."""
    stack.reset()
    stack.publish_dkim_key(SENDER, selector, key.public_key())
    sender, recipient = stack.user(SENDER), stack.user(RECIPIENT)
    subject = f"rfc 8301 {secrets.token_hex(4)}"
    message = (
        f"From: {sender.address}\r\nTo: {recipient.address}\r\nSubject: {subject}\r\n"
        f"Message-ID: {make_msgid(domain=SENDER)}\r\nDate: Fri, 4 Dec 2026 05:00:00 +0000\r\n"
        "\r\nRFC 8301 says which signatures count.\r\n"
    ).encode()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    signature = dkim.sign(
        message,
        selector.encode(),
        SENDER.encode(),
        pem,
        signature_algorithm=algorithm,
        include_headers=[b"from", b"to", b"subject", b"message-id", b"date"],
    )
    host, port = stack.endpoints(RECIPIENT).address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail(sender.address, [recipient.address], signature + message)
    stack.wait_for(recipient.address, subject=subject, timeout=TIMEOUT)
    host, port = stack.endpoints(RECIPIENT).address("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT) as imap:
        imap.login(recipient.address, recipient.password)
        imap.select("INBOX", readonly=True)
        _, found = imap.search(None, "SUBJECT", f'"{subject}"')
        (number,) = found[0].split()
        _, data = imap.fetch(number, "(BODY.PEEK[])")
    raw = data[0]
    assert isinstance(raw, tuple)
    stack.check()
    return bytes(raw[1])


def _lookup(stack: MailStack) -> Lookup:
    assert stack.dns is not None
    return Lookup((stack.dns.host, stack.dns.port), timeout=5.0)


@pytest.fixture(scope="module")
def key2048() -> rsa.RSAPrivateKey:
    return _rsa_key(2048)


def test_rsa_sha1_signature_is_a_permerror_never_a_pass(
    stack: MailStack, key2048: rsa.RSAPrivateKey
) -> None:
    raw = _deliver_signed(stack, key2048, b"rsa-sha1", "sha1sel")
    assert b"a=rsa-sha1" in raw
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert finding.code == "dkim-verify-permerror" and finding.severity == "warn"
    assert "d=example.com s=sha1sel (rsa-sha1)" in finding.message
    assert "rsa-sha1 is historic" in finding.message and "RFC 8301 section 3.1" in finding.message
    assert finding.evidence[0].startswith("DKIM-Signature: v=1; a=rsa-sha1")
    # dkimpy alone still calls the same signature valid: the refusal is the probe's own.
    assert dkim.verify(raw, dnsfunc=_lookup(stack).dkim_key)


def test_rsa_sha256_with_the_same_key_verifies(
    stack: MailStack, key2048: rsa.RSAPrivateKey
) -> None:
    raw = _deliver_signed(stack, key2048, b"rsa-sha256", "sha256sel")
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert (finding.code, finding.severity) == ("dkim-verify", "info")
    assert finding.message.startswith("DKIM signature d=example.com s=sha256sel (rsa-sha256)")
    assert "bits" not in finding.message  # 2048 bits: nothing to say about the key size


def test_rsa_key_under_1024_bits_is_a_permerror(stack: MailStack) -> None:
    raw = _deliver_signed(stack, _rsa_key(768), b"rsa-sha256", "shortsel")
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert finding.code == "dkim-verify-permerror" and finding.severity == "warn"
    assert "the RSA key has 768 bits, fewer than 1024" in finding.message
    assert "RFC 8301 section 3.2" in finding.message
    assert "does not verify either" not in finding.message  # the signature itself matches


def test_rsa_key_of_1024_bits_verifies_with_a_note(stack: MailStack) -> None:
    raw = _deliver_signed(stack, _rsa_key(1024), b"rsa-sha256", "oldsel")
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert (finding.code, finding.severity) == ("dkim-verify", "info")
    assert "its RSA key has 1024 bits, signers should use 2048" in finding.message


def test_short_key_that_does_not_verify_says_both(stack: MailStack) -> None:
    # A 768-bit key published for a message signed with another one: still a permerror for
    # the key size, and the reason says the signature does not match either.
    raw = _deliver_signed(stack, _rsa_key(768), b"rsa-sha256", "shortsel")
    stack.publish_dkim_key(SENDER, "shortsel", _rsa_key(768).public_key())
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert finding.code == "dkim-verify-permerror"
    assert "fewer than 1024" in finding.message and "does not verify either" in finding.message


# -- the key record's flags (RFC 6376 section 3.6.1) ------------------------------------------


def _republish(stack: MailStack, key: rsa.RSAPrivateKey, selector: str, flags: str) -> None:
    """Publish ``key`` again at ``selector`` with ``flags`` (``t=...;``) in its record."""
    value = stack.publish_dkim_key(SENDER, selector, key.public_key())
    assert value.startswith("v=DKIM1;")
    stack.publish_dkim_key(SENDER, selector, value.replace("v=DKIM1;", f"v=DKIM1; {flags}", 1))


@pytest.mark.parametrize("flags", ["t=y;", "t=s:y;", "t = Y ;"])
def test_key_in_testing_mode_is_a_warning(
    stack: MailStack, key2048: rsa.RSAPrivateKey, flags: str
) -> None:
    raw = _deliver_signed(stack, key2048, b"rsa-sha256", "testsel")
    _republish(stack, key2048, "testsel", flags)
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert (finding.code, finding.severity) == ("dkim-testing", "warn")
    assert "of the delivered copy verifies" in finding.message
    assert "its key is in testing mode (t=y): verifiers must treat the message like unsigned " in (
        finding.message
    )
    assert finding.evidence[0].startswith("DKIM-Signature: ")


@pytest.mark.parametrize("flags", ["t=s;", ""])
def test_key_not_in_testing_mode_is_a_plain_pass(
    stack: MailStack, key2048: rsa.RSAPrivateKey, flags: str
) -> None:
    raw = _deliver_signed(stack, key2048, b"rsa-sha256", "testsel")
    _republish(stack, key2048, "testsel", flags)
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert (finding.code, finding.severity) == ("dkim-verify", "info")
    assert "testing" not in finding.message


def test_revoked_key_is_named_as_revoked(stack: MailStack, key2048: rsa.RSAPrivateKey) -> None:
    raw = _deliver_signed(stack, key2048, b"rsa-sha256", "gonesel")
    stack.publish_dkim_key(SENDER, "gonesel", "v=DKIM1; k=rsa; p=")
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert (finding.code, finding.severity) == ("dkim-verify-fail", "warn")
    assert "the key at gonesel._domainkey.example.com is revoked (empty p=" in finding.message
    assert "could not parse" not in finding.message
    # Twin: another key in its place is a mismatch, not a revocation.
    stack.publish_dkim_key(SENDER, "gonesel", _rsa_key(2048).public_key())
    (finding,) = verify_dkim(raw, _lookup(stack))
    assert finding.code == "dkim-verify-fail" and "revoked" not in finding.message
