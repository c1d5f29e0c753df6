"""DKIM signing and verification rules (RFC 6376, RFC 8463) and their Authentication-Results.

Theory of operation. Submission (465/587) signs mail its user authenticated for, once per key
of the signing domain (an Ed25519 and an RSA-2048 key: RFC 8463 section 4 dual signing, so a
verifier that knows only RSA still finds a signature it can check). The receiving MX verifies
every DKIM-Signature, topmost first, and writes one Authentication-Results field (RFC 8601)
naming itself as authserv-id, with one ``dkim=`` result per signature, or ``dkim=none``.

The cryptography and canonicalization are dkimpy's (``dkim``); this module decides what is
signed and how a verification outcome maps to an RFC 8601 result:

- Signed: the header fields RFC 6376 section 5.4.1 recommends (:data:`SIGNED_HEADERS`), From
  once more than it occurs (oversigning, section 8.15: a second From added on the way breaks
  the signature); canonicalization relaxed/relaxed (section 3.4), which survives the header
  refolding and trailing-space changes relays make.
- Results: the key record is looked up through a function the caller passes
  (:data:`KeyLookup`), answering from whatever the stack's DNS serves. A missing record is
  ``permerror`` (RFC 6376 section 6.1.2, "no key for signature"), a DNS failure
  ``temperror``, a record that does not parse or is revoked (empty ``p=``, section 3.6.1)
  ``permerror``, a malformed or expired signature ``permerror`` (section 6.1.1), a body hash
  or signature that does not match ``fail`` (RFC 8601 section 2.7.1). An rsa-sha1 signature
  is ``permerror`` without a key look-up: RFC 8301 section 3.1 makes it historic, a
  permanently failed evaluation, which no verifier may consider valid.
- Bad input never escapes as an exception: whatever dkimpy raises on one signature becomes
  that signature's ``permerror``, and the message is delivered.

Deliberately unsupported: ``l=`` body length limits and ``i=`` identities other than the
domain (we never sign with them; a verified one is reported as dkimpy reads it), ARC, ADSP.
dkimpy reads the wall clock itself for ``t=`` when signing and for the ``x=`` expiry check.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Literal

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from ._lines import header_section

__all__ = [
    "CANONICALIZATION",
    "OVERSIGNED",
    "SIGNED_HEADERS",
    "DKIMResult",
    "KeyAnswer",
    "KeyLookup",
    "SigningKey",
    "authentication_results",
    "from_domain",
    "key_answer",
    "key_query",
    "key_record_name",
    "public_key_record",
    "sign",
    "verify",
]

#: Header fields signed when present (RFC 6376 section 5.4.1's list); absent ones are signed
#: too (as empty), so adding one later breaks the signature (section 5.4.2).
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "reply-to",
    "subject",
    "date",
    "to",
    "cc",
    "resent-date",
    "resent-from",
    "resent-to",
    "resent-cc",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "sender",
)
#: Header fields signed once more than they occur (RFC 6376 section 8.15).
OVERSIGNED: tuple[str, ...] = ("from",)
#: relaxed/relaxed (RFC 6376 section 3.4.2 and 3.4.4).
CANONICALIZATION: tuple[bytes, bytes] = (b"relaxed", b"relaxed")

Algorithm = Literal["ed25519-sha256", "rsa-sha256"]
Result = Literal["pass", "fail", "neutral", "temperror", "permerror", "none"]


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One private key of a signing domain.

    Attributes:
        domain: the ``d=`` domain.
        selector: the ``s=`` selector; the public key is at :func:`key_record_name`.
        algorithm: ``ed25519-sha256`` or ``rsa-sha256``.
        private: what dkimpy signs with: the base64 Ed25519 seed, or an RSA PEM (PKCS#1).
        record: the TXT value publishing the public key (``v=DKIM1; k=...; p=...``).
    """

    domain: str
    selector: str
    algorithm: Algorithm
    private: bytes
    record: str


@dataclass(frozen=True, slots=True)
class KeyAnswer:
    """What the DNS said for a key record name.

    Attributes:
        status: ``found`` (``text`` holds the first TXT record, its strings joined),
            ``missing`` (NXDOMAIN, or no TXT record at the name), ``error`` (any other
            answer, or none).
        text: the record, when found.
    """

    status: Literal["found", "missing", "error"]
    text: bytes = b""


#: Looks a key record name (``sel._domainkey.example.org``) up; never raises.
KeyLookup = Callable[[str], KeyAnswer]


@dataclass(frozen=True, slots=True)
class DKIMResult:
    """The outcome for one DKIM-Signature (or ``none`` when there was no signature).

    Attributes:
        result: an RFC 8601 section 2.7.1 result.
        reason: why, for anything but ``pass`` and ``none``.
        domain: ``d=`` (``header.d``), when it could be read.
        selector: ``s=`` (``header.s``).
        algorithm: ``a=`` (``header.a``, RFC 8601 section 2.7.1).
        b: the first 8 characters of ``b=`` (``header.b``, RFC 6008), telling apart two
            signatures of one domain.
    """

    result: Result
    reason: str = ""
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""


def key_record_name(selector: str, domain: str) -> str:
    """Where the public key lives (RFC 6376 section 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def sign(raw: bytes, keys: Iterable[SigningKey]) -> bytes:
    """``raw`` with one DKIM-Signature per key prepended (the first key's on top).

    Raises:
        dkim.DKIMException: a key is unusable, or the message has no header block dkimpy
            can parse (the caller decides whether that stops delivery).
    """
    fields: list[bytes] = []
    # One parse for every key: parsing a large message costs as much as hashing it.
    import dkim  # type: ignore[import-untyped]  # dkimpy: only when something is signed

    _openssl_rsa(dkim)
    signer = dkim.DKIM(raw)
    present = [name.lower() for name, _ in signer.headers]
    include = list(SIGNED_HEADERS)
    for name in OVERSIGNED:
        include += [name] * present.count(name.encode())
    for key in keys:
        fields.append(
            signer.sign(
                key.selector.encode(),
                key.domain.encode(),
                key.private,
                signature_algorithm=key.algorithm.encode(),
                canonicalize=CANONICALIZATION,
                include_headers=[h.encode() for h in include],
            )
        )
    return b"".join(fields) + raw


# RSA signing through OpenSSL. dkimpy computes RSA signatures with Python's pow() (about 8 ms
# for a 2048-bit key, most of what StackConfig(dkim=True) adds to a message); the
# ``cryptography`` package's OpenSSL does the same in well under 1 ms. RSASSA-PKCS1-v1_5
# (RFC 8017 section 8.2) is deterministic, so the signature is byte for byte the one dkimpy
# computes (tests/test_dkim_opendkim_signed_openssl.py compares them): only dkimpy's last step,
# the modular exponentiation over the digest it prepared, is replaced. Anything the OpenSSL
# path does not take (an unknown digest, a key it refuses) goes to dkimpy's own function.

#: OpenSSL key objects by RSA modulus (building one checks the key: done once per key).
_RSA_KEYS: dict[int, Any] = {}
_RSA_KEYS_MAX = 64


def _openssl_rsa(dkim: Any) -> None:
    """Have dkimpy's signer (``dkim.RSASSA_PKCS1_v1_5_sign``) use OpenSSL; idempotent."""
    pure = dkim.RSASSA_PKCS1_v1_5_sign
    if getattr(pure, "_roundtrip_openssl", False):
        return

    def rsa_sign(digest: Any, key: dict[str, int]) -> bytes:
        try:
            return _rsa_sign_openssl(digest, key)
        except Exception:  # not a key or digest the OpenSSL path takes: dkimpy decides
            return bytes(pure(digest, key))

    rsa_sign._roundtrip_openssl = True  # type: ignore[attr-defined]
    dkim.RSASSA_PKCS1_v1_5_sign = rsa_sign


def _rsa_sign_openssl(digest: Any, key: dict[str, int]) -> bytes:
    """RSASSA-PKCS1-v1_5 over ``digest`` (a hash object dkimpy fed) with dkimpy's parsed key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    algorithm = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}[str(digest.name).lower()]
    modulus = key["modulus"]
    private = _RSA_KEYS.get(modulus)
    if private is None:
        public = rsa.RSAPublicNumbers(key["publicExponent"], modulus)
        private = rsa.RSAPrivateNumbers(
            key["prime1"],
            key["prime2"],
            key["privateExponent"],
            key["exponent1"],
            key["exponent2"],
            key["coefficient"],
            public,
        ).private_key()
        if len(_RSA_KEYS) >= _RSA_KEYS_MAX:
            _RSA_KEYS.clear()
        _RSA_KEYS[modulus] = private
    signature: bytes = private.sign(
        digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm())
    )
    return signature


def from_domain(raw: bytes) -> str | None:
    """The domain of the first From address (lower case), or None."""
    head = header_section(raw)
    try:
        fields = BytesHeaderParser(policy=compat32).parsebytes(head).get_all("From") or []
        pairs = getaddresses([str(f) for f in fields])
    except Exception:  # a From the email package cannot read: no domain to sign for
        return None
    for _, address in pairs:
        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        if "@" in address and domain:
            return domain
    return None


def key_query(name: str) -> bytes:
    """A TXT query for ``name`` in wire format, for the stack's DNS to answer."""
    return dns.message.make_query(name, "TXT").to_wire()


def key_answer(reply: bytes) -> KeyAnswer:
    """Read a DNS reply to :func:`key_query` (``b""``: no answer at all)."""
    if not reply:
        return KeyAnswer("error")
    try:
        message = dns.message.from_wire(reply)
    except Exception:  # an unparsable reply from our own server: a temporary failure
        return KeyAnswer("error")
    rcode = message.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return KeyAnswer("missing")
    if rcode != dns.rcode.NOERROR:
        return KeyAnswer("error")
    for rrset in message.answer:
        if rrset.rdtype != dns.rdatatype.TXT:
            continue
        for rdata in rrset:
            assert isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
            return KeyAnswer("found", b"".join(rdata.strings))
    return KeyAnswer("missing")


def verify(raw: bytes, lookup: KeyLookup) -> list[DKIMResult]:
    """One result per DKIM-Signature of ``raw``, topmost first; ``[none]`` without any.

    Never raises: whatever goes wrong with one signature is that signature's result.
    """
    if not re.search(rb"(?im)^dkim-signature[ \t]*:", header_section(raw)):
        return [DKIMResult("none")]  # dkimpy is not even imported for unsigned mail
    import dkim

    try:
        verifier = dkim.DKIM(raw)
        headers: Sequence[tuple[bytes, bytes]] = verifier.headers
    except Exception as exc:  # dkimpy's header parser: garbage headers are a permerror
        if re.search(rb"(?im)^dkim-signature[ \t]*:", header_section(raw)):
            return [DKIMResult("permerror", f"message not parsable: {_short(exc)}")]
        return [DKIMResult("none")]
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if not signatures:
        return [DKIMResult("none")]
    return [_verify_one(verifier, index, value, lookup) for index, value in enumerate(signatures)]


def _verify_one(verifier: Any, index: int, value: bytes, lookup: KeyLookup) -> DKIMResult:
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]

    try:
        tags = parse_tag_value(value)
    except (InvalidTagValueList, ValueError, IndexError) as exc:
        return DKIMResult("permerror", f"malformed signature: {_short(exc)}")
    found = DKIMResult(
        "permerror",
        domain=_text(tags.get(b"d", b"")),
        selector=_text(tags.get(b"s", b"")),
        algorithm=_text(tags.get(b"a", b"")),
        b=_text(re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8]),
    )

    def outcome(result: Result, reason: str = "") -> DKIMResult:
        return DKIMResult(result, reason, found.domain, found.selector, found.algorithm, found.b)

    try:
        dkim.validate_signature_fields(tags)
    except dkim.DKIMException as exc:
        return outcome("permerror", f"malformed signature: {_short(exc)}")
    except Exception as exc:  # dkimpy on input it did not foresee: still this signature's
        return outcome("permerror", f"malformed signature: {_short(exc)}")
    if found.algorithm.lower() == "rsa-sha1":  # dkimpy would check it, and could pass it
        return outcome("permerror", "rsa-sha1 is historic (RFC 8301 section 3.1)")
    name = key_record_name(found.selector, found.domain)
    answer = lookup(name)
    if answer.status == "missing":
        return outcome("permerror", "no key for signature")
    if answer.status == "error":
        return outcome("temperror", "key lookup failed")
    if not re.search(rb"(?:^|;)\s*p\s*=\s*[^;\s]", answer.text):
        return outcome("permerror", "key revoked (empty p=)")
    try:
        dkim.evaluate_pk(name.encode(), answer.text)
    except Exception as exc:  # KeyFormatError, or dkimpy tripping over the record
        return outcome("permerror", f"bad key record: {_short(exc)}")

    def from_memory(_name: bytes, timeout: float = 0) -> bytes:
        return answer.text

    try:
        good = verifier.verify(idx=index, dnsfunc=from_memory)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return outcome("fail", "body hash did not verify")
        return outcome("permerror", f"malformed signature: {_short(exc)}")
    except Exception as exc:  # MessageFormatError, KeyFormatError, dkimpy's own slips
        return outcome("permerror", _short(exc))
    if good:
        return outcome("pass")
    return outcome("fail", "signature did not verify")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


# Authentication-Results (RFC 8601 section 2.2)

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-./^_`{|}~@]+")


def _value(text: str) -> str:
    """A ``value`` (RFC 2045 token) or a quoted-string. Control and non-ASCII characters
    become ``?``; quotes and backslashes become ``'`` and ``/``, since some parsers (authres
    among them) keep quoted-pair backslashes in what they return."""
    clean = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    clean = clean.replace('"', "'").replace("\\", "/")
    if clean and _TOKEN.fullmatch(clean) and "@" not in clean[:1]:
        return clean
    return f'"{clean}"'


def _resinfo(result: DKIMResult) -> str:
    parts = [f"dkim={result.result}"]
    if result.reason:
        parts.append(f"reason={_value(result.reason)}")
    for prop, value in (
        ("header.d", result.domain),
        ("header.s", result.selector),
        ("header.a", result.algorithm),
        ("header.b", result.b),
    ):
        if value:
            parts.append(f"{prop}={_value(value)}")
    return " ".join(parts)


def authentication_results(authserv_id: str, results: Sequence[DKIMResult]) -> bytes:
    """The Authentication-Results field (with its CRLF) reporting ``results``.

    Each result goes on its own folded line, so the field stays short of 998 octets.
    """
    lines = [f"Authentication-Results: {authserv_id}"]
    lines += [_resinfo(r) for r in (results or [DKIMResult("none")])]
    return (";\r\n\t".join(lines) + "\r\n").encode("ascii")


def public_key_record(algorithm: Algorithm, public: bytes) -> str:
    """The TXT value for a public key: raw 32 bytes (Ed25519, RFC 8463 section 4.2) or a DER
    SubjectPublicKeyInfo (RSA, RFC 6376 section 3.6.1)."""
    kind = "ed25519" if algorithm == "ed25519-sha256" else "rsa"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"
