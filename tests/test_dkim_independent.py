"""Our DKIM against an independent implementation (dkimpy), both ways, byte for byte.

roundtrip signs and verifies with its own code (roundtrip/protocols/_dkimcore.py: the body is
canonicalized in slices, once per canonicalization); dkimpy is a second, independent reading
of RFC 6376 and RFC 8463. Every message of the shipped corpus, signed by us, must verify with
dkimpy, and signed by dkimpy must verify with us; the body hash of either canonicalization
must equal dkimpy's for any body, cut into slices anywhere. OpenDKIM is the third reader
(tests/test_dkim_opendkim.py).
"""

from __future__ import annotations

import base64
import hashlib

import dkim  # dkimpy, the independent verifier
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.corpus import CorpusMessage, iter_corpus
from roundtrip.protocols._dkimcore import BodyHashes, split_message
from roundtrip.protocols.delivery import normalize_line_endings
from roundtrip.protocols.dkim import KeyAnswer, SigningKey, public_key_record, sign, verify

DOMAIN = "signer.test"


def _keys() -> tuple[SigningKey, SigningKey, dict[bytes, bytes]]:
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    ed_pub = ed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rk.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = rk.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_record = public_key_record("ed25519-sha256", ed_pub)
    rsa_record = public_key_record("rsa-sha256", der)
    ed_key = SigningKey(DOMAIN, "ed", "ed25519-sha256", base64.b64encode(seed), ed_record)
    rsa_key = SigningKey(DOMAIN, "rsa", "rsa-sha256", pem, rsa_record)
    records = {
        f"ed._domainkey.{DOMAIN}.".encode(): ed_record.encode(),
        f"rsa._domainkey.{DOMAIN}.".encode(): rsa_record.encode(),
    }
    return ed_key, rsa_key, records


ED, RSA, RECORDS = _keys()
CORPUS: list[CorpusMessage] = iter_corpus()


def _dnsfunc(name: bytes, timeout: float = 5) -> bytes:
    return RECORDS.get(name if name.endswith(b".") else name + b".", b"")


def _lookup(name: str) -> KeyAnswer:
    text = RECORDS.get(f"{name}.".encode())
    return KeyAnswer("found", text) if text else KeyAnswer("missing")


def _crlf(raw: bytes) -> bytes:
    """The message as SMTP carries it (every line ending CRLF): what both sides see."""
    return normalize_line_endings(raw)


@pytest.mark.parametrize("item", CORPUS, ids=[c.name for c in CORPUS])
def test_dkim_ours_verify_with_dkimpy(item: CorpusMessage) -> None:
    raw = _crlf(item.raw)
    signed = sign(raw, [ED, RSA])
    # dkimpy verifies one signature at a time: idx 0 is ours with Ed25519, idx 1 RSA.
    for idx in (0, 1):
        assert dkim.DKIM(signed).verify(idx=idx, dnsfunc=_dnsfunc), (idx, item.name)


@pytest.mark.parametrize("item", CORPUS[:12], ids=[c.name for c in CORPUS[:12]])
def test_dkim_ours_altered_fail_with_dkimpy(item: CorpusMessage) -> None:
    """The twin: one changed body octet, and dkimpy refuses what we signed."""
    raw = _crlf(item.raw)
    signed = sign(raw, [RSA])
    head, sep, body = signed.partition(b"\r\n\r\n")
    altered = head + sep + b"X" + body
    assert not dkim.verify(altered, dnsfunc=_dnsfunc)


@pytest.mark.parametrize("canon", [b"relaxed/relaxed", b"simple/simple", b"relaxed/simple"])
@pytest.mark.parametrize("item", CORPUS, ids=[c.name for c in CORPUS])
def test_dkim_dkimpys_verify_with_ours(item: CorpusMessage, canon: bytes) -> None:
    raw = _crlf(item.raw)
    field = dkim.sign(
        raw, b"rsa", DOMAIN.encode(), RSA.private, canonicalize=tuple(canon.split(b"/"))
    )
    results = verify(field + raw, _lookup)
    assert [r.result for r in results] == ["pass"], results


def test_dkim_dkimpys_altered_headers_fail_with_ours() -> None:
    raw = _crlf(CORPUS[0].raw)
    field = dkim.sign(raw, b"rsa", DOMAIN.encode(), RSA.private)
    altered = field + raw.replace(b"Subject:", b"Subject: [changed]", 1)
    assert [r.result for r in verify(altered, _lookup)] == ["fail"]


_LINE = st.lists(
    st.sampled_from([b"a", b"b c", b" ", b"\t", b"  x\t ", b"", b"\r", b"."]), max_size=6
).map(b"".join)
_BODY = st.lists(_LINE, max_size=12).map(lambda lines: b"\r\n".join(lines))


@settings(max_examples=300, deadline=None)
@given(
    body=_BODY,
    ending=st.sampled_from([b"", b"\r\n", b"\r\n\r\n", b" \r\n\t\r\n"]),
    chunk=st.integers(2, 9),
)
def test_dkim_body_hash_equals_dkimpys_in_any_slicing(
    body: bytes, ending: bytes, chunk: int
) -> None:
    raw = b"From: a@b.test\r\n\r\n" + body + ending
    _, offset = split_message(raw)
    hashes = BodyHashes(raw, offset, chunk=chunk)
    payload = raw[offset:]
    assert hashes.get("relaxed") == hashlib.sha256(Relaxed.canonicalize_body(payload)).digest()
    assert hashes.get("simple") == hashlib.sha256(Simple.canonicalize_body(payload)).digest()


def test_dkim_body_hash_sees_a_changed_octet() -> None:
    """The twin: the comparison above can fail."""
    raw = b"From: a@b.test\r\n\r\nline one\r\nline two\r\n"
    _, offset = split_message(raw)
    changed = raw.replace(b"two", b"tw0")
    assert BodyHashes(raw, offset, chunk=4).get("relaxed") != BodyHashes(
        changed, offset, chunk=4
    ).get("relaxed")
