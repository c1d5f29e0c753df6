"""RSA DKIM signatures computed through OpenSSL are dkimpy's own, byte for byte.

``roundtrip.protocols.dkim.sign`` has dkimpy's signer use the ``cryptography`` package for the
RSA step (RFC 8017 RSASSA-PKCS1-v1_5, deterministic), so the result must equal what dkimpy's
pure-Python function computes from the same digest and key. That OpenDKIM verifies the stack's
signatures made this way is tests/test_dkim_opendkim.py; here the signature itself is compared.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from roundtrip.protocols import dkim as ours
from roundtrip.stack._dkim import domain_keys

dkimpy = pytest.importorskip("dkim")
from dkim import crypto as dkim_crypto  # noqa: E402  # type: ignore[import-untyped]

HEAD = (
    b"From: <user@example.com>\r\nTo: <user@example.org>\r\nSubject: openssl rsa\r\n"
    b"Date: Thu, 03 Dec 2026 22:00:00 +0000\r\nMessage-ID: <rsa@example.com>\r\n\r\n"
)
RAW = HEAD + b"hello\r\n" * 100


def _rsa_key() -> ours.SigningKey:
    (key,) = [k for k in domain_keys("example.com") if k.algorithm == "rsa-sha256"]
    return key


@pytest.mark.parametrize("name", ["sha256", "sha1"])
def test_dkim_openssl_rsa_signature_equals_dkimpys(name: str) -> None:
    parsed = dkim_crypto.parse_pem_private_key(_rsa_key().private)
    digest = hashlib.new(name, b"the headers dkimpy hashed")
    assert ours._rsa_sign_openssl(digest, parsed) == dkim_crypto.RSASSA_PKCS1_v1_5_sign(
        digest, parsed
    )


def test_dkim_openssl_rsa_is_what_sign_uses_and_verifies() -> None:
    signed = ours.sign(RAW, [_rsa_key()])
    assert getattr(dkimpy.RSASSA_PKCS1_v1_5_sign, "_roundtrip_openssl", False)
    record = _rsa_key().record.encode()
    results = ours.verify(signed, lambda name: ours.KeyAnswer("found", record))
    assert [r.result for r in results] == ["pass"]


def test_dkim_openssl_rsa_other_digest_does_not_verify() -> None:
    """The twin: the OpenSSL signature binds the digest; another digest's check fails."""
    key = _rsa_key()
    parsed = dkim_crypto.parse_pem_private_key(key.private)
    signature = ours._rsa_sign_openssl(hashlib.sha256(b"signed"), parsed)
    private = serialization.load_pem_private_key(key.private, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    public = private.public_key()
    prehashed = utils.Prehashed(hashes.SHA256())
    public.verify(signature, hashlib.sha256(b"signed").digest(), padding.PKCS1v15(), prehashed)
    with pytest.raises(InvalidSignature):
        public.verify(signature, hashlib.sha256(b"other").digest(), padding.PKCS1v15(), prehashed)


def test_dkim_openssl_rsa_unusual_input_falls_back_to_dkimpy() -> None:
    """What the OpenSSL path does not take (here an MD5 digest) goes to dkimpy, which raises
    its own error as before: nothing is signed differently."""
    ours.sign(RAW, [_rsa_key()])  # installs the OpenSSL step
    parsed = dkim_crypto.parse_pem_private_key(_rsa_key().private)
    with pytest.raises(KeyError):
        dkimpy.RSASSA_PKCS1_v1_5_sign(hashlib.md5(b"x"), parsed)
