"""Passive judgements of what a round trip shows anyway: the certificate chain a server
sends, the names its certificate carries, and the header section of the delivered copy.

Nothing here opens a connection. The TLS helpers read an established ``ssl.SSLSocket``;
everything else works on bytes (DER certificates, the header section of a message) and
returns ``Issue`` tuples that the caller turns into findings with the server they concern.

Chain (RFC 5280 section 6, RFC 8446 section 4.4.2): a server must send its leaf and every
intermediate up to (not necessarily including) a trust anchor, because a mail client does not
fetch missing intermediates (no AIA chasing in OpenSSL). The chain as received comes from
``SSLSocket.get_unverified_chain()`` on Python 3.13, and from the same method of the private
``_sslobj`` on 3.10 to 3.12 (the public wrapper arrived in 3.13); where neither exists only
the leaf is known. A verified connection is judged by comparing what OpenSSL built (the
verified chain) with what the server sent: a certificate other than the anchor that the
server did not send came from the client's own store. After a failed verification (no
verified chain) the received certificates are walked from the leaf, each issuer looked up
among the sent certificates and then among the client's trust anchors.

Names (RFC 9525 section 6, RFC 7817 section 3): only DNS-ID and IP-ID subjectAltName entries
count, the CN is never used (RFC 9525 section 6.3); a wildcard matches one whole left-most
label only.

Header section (RFC 5322 section 3.6): From and Date exactly once, Message-ID at most once
and present (section 3.6.4 SHOULD), the other single-instance fields at most once; no bare
CR or LF (section 2.2); Message-ID in ``msg-id`` syntax (section 3.6.4).
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import ipaddress
import re
import ssl
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

__all__ = [
    "Issue",
    "certificate_issues",
    "header_issues",
    "peer_chain",
    "verified_chain",
    "wildcard_covers",
]

#: RSA (and DSA) keys below this many bits are a warning (RFC 9325 section 4.3, NIST SP
#: 800-57 part 1: 112-bit security needs 2048 bits).
MIN_RSA_BITS = 2048
#: Elliptic-curve keys below this many bits are a warning (the same 112-bit floor rounded up
#: to the smallest curve in use, P-256).
MIN_EC_BITS = 256
#: Signature hashes that no longer protect a certificate (SHA-1: SHAttered 2017, chosen-prefix
#: collisions 2020; MD5: CVE-2004-2761).
WEAK_HASHES = ("sha1", "md5")
#: How far the delivered Date may lie from the submission, either way, before it is
#: implausible (clock skew between the probe and the servers, queueing).
DATE_WINDOW = datetime.timedelta(minutes=15)
#: RFC 5322 section 3.6: fields that may occur at most once (From and Date exactly once).
SINGLE_FIELDS = (
    "from",
    "date",
    "message-id",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "subject",
    "in-reply-to",
    "references",
)
#: Characters of a field quoted as evidence.
MAX_EVIDENCE_CHARS = 200


class Issue(NamedTuple):
    """One thing noticed: a finding without its server (the caller knows it)."""

    code: str
    severity: str
    message: str
    evidence: tuple[str, ...] = ()


# -- the chain as received --------------------------------------------------------------------


def wildcard_covers(pattern: str, host: str) -> bool:
    """Whether the DNS-ID ``pattern`` names ``host`` through a wildcard: ``*`` as the whole
    left-most label (RFC 9525 section 6.3) over at least two labels, as OpenSSL's verifier
    requires (``*.example.org`` covers ``mail.example.org``; ``*.org`` and ``*.test`` cover
    nothing)."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not pattern.startswith("*.") or "." not in pattern[2:]:
        return False
    label, _, parent = host.partition(".")
    return bool(label) and parent == pattern[2:]


def _der(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    # Python 3.10 to 3.12: _ssl.Certificate objects; 2 is _ssl.ENCODING_DER.
    return bytes(item.public_bytes(2))


def _chain(sock: ssl.SSLSocket, method: str) -> list[bytes]:
    getter = getattr(sock, method, None) or getattr(getattr(sock, "_sslobj", None), method, None)
    if getter is None:
        return []
    try:
        return [_der(item) for item in getter() or []]
    except (AttributeError, ValueError, ssl.SSLError):
        return []


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, leaf first, in DER (just the leaf where this
    Python cannot tell more)."""
    chain = _chain(sock, "get_unverified_chain")
    if not chain:
        leaf = sock.getpeercert(binary_form=True)
        chain = [leaf] if leaf else []
    return chain


def verified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The chain OpenSSL built to a trust anchor, leaf first (empty when not verified)."""
    return _chain(sock, "get_verified_chain")


# -- judging a chain ----------------------------------------------------------------------


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _missing_issuer(
    certs: list[x509.Certificate], anchors: list[x509.Certificate]
) -> x509.Name | None:
    """Walk from the leaf through the sent certificates to an anchor; the issuer name the
    walk could not find, or None when it reached a self-issued certificate or an anchor."""
    current = certs[0]
    for _ in range(len(certs) + 1):
        if _self_issued(current) or any(_issued_by(current, a) for a in anchors):
            return None
        nxt = next((c for c in certs if c is not current and _issued_by(current, c)), None)
        if nxt is None:
            return current.issuer
        current = nxt
    return None


def _key_issue(cert: x509.Certificate, role: str) -> Issue | None:
    key = cert.public_key()
    if isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey)) and key.key_size < MIN_RSA_BITS:
        kind, floor = ("RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"), MIN_RSA_BITS
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.key_size < MIN_EC_BITS:
        kind, floor = f"EC {key.curve.name}", MIN_EC_BITS
    else:
        return None
    return Issue(
        "weak-key",
        "warn",
        f"the {role} certificate {_name(cert)} has a {key.key_size}-bit {kind} key, below "
        f"{floor} bits (RFC 9325 section 4.3)",
        (f"{role}: {_name(cert)}; key {kind} {key.key_size} bits",),
    )


def _signature_issue(cert: x509.Certificate, role: str) -> Issue | None:
    if _self_issued(cert):  # an anchor's own signature is never checked (RFC 5280 6.1)
        return None
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    if algorithm is None or algorithm.name not in WEAK_HASHES:
        return None
    return Issue(
        "weak-signature",
        "fail",
        f"the {role} certificate {_name(cert)} is signed with {algorithm.name.upper()}, which "
        "no longer protects a certificate (RFC 9155 forbids it in TLS 1.2 signatures)",
        (f"{role}: {_name(cert)}; signature {cert.signature_algorithm_oid._name}",),
    )


def chain_issues(chain: list[bytes], *, anchors: list[bytes], verified: list[bytes]) -> list[Issue]:
    """Completeness, signature hashes and key sizes of the chain a server sent.

    Args:
        chain: the certificates as received, leaf first (DER).
        anchors: the client's trust anchors (DER), used when ``verified`` is empty.
        verified: the chain OpenSSL built, leaf first (DER); empty after a failed
            verification.
    """
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    if not certs:
        return []
    issues: list[Issue] = []
    sent = set(chain)
    if verified:
        fetched = [x509.load_der_x509_certificate(der) for der in verified[1:-1] if der not in sent]
        missing = [_name(cert) for cert in fetched]
    else:
        roots = [x509.load_der_x509_certificate(der) for der in anchors]
        name = _missing_issuer(certs, roots)
        missing = [name.rfc4514_string()] if name is not None else []
    if missing:
        issues.append(
            Issue(
                "chain-incomplete",
                "fail",
                f"the server sent {len(certs)} certificate(s) without the intermediate "
                f"{', '.join(missing)}; a client that does not already hold it cannot verify "
                "the chain (RFC 8446 section 4.4.2)",
                tuple(
                    f"sent {n}: subject {_name(c)}; issuer {c.issuer.rfc4514_string()}"
                    for n, c in enumerate(certs)
                )
                + tuple(f"missing: {name}" for name in missing),
            )
        )
    for number, cert in enumerate(certs):
        role = "leaf" if number == 0 else "intermediate"
        for issue in (_signature_issue(cert, role), _key_issue(cert, role)):
            if issue is not None:
                issues.append(issue)
    return issues


# -- the names of the leaf --------------------------------------------------------------------


def _reference(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return name.lower().rstrip(".")


def name_issues(leaf: bytes, server_name: str) -> list[Issue]:
    """How the leaf names ``server_name``: an info issue listing its names, and a warning
    when the name matches only through a wildcard or only through the CN."""
    cert = x509.load_der_x509_certificate(leaf)
    dns: list[str] = []
    ips: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        ips = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    evidence = tuple(
        [f"DNS:{v}" for v in dns] + [f"IP:{v}" for v in ips] + [f"CN={cn}" for cn in cns]
    )
    reference = _reference(server_name)
    how = "no name"
    if isinstance(reference, str):
        exact = any(v.lower().rstrip(".") == reference for v in dns)
        wildcard = any(wildcard_covers(v, reference) for v in dns)
        if exact:
            how = "an exact DNS-ID"
        elif wildcard:
            how = "a wildcard DNS-ID only"
        elif not dns and any(cn.lower().rstrip(".") == reference for cn in cns):
            how = "the CN only"
    elif any(_reference(v) == reference for v in ips):
        how = "an exact IP-ID"
    names = ", ".join(evidence) or "none"
    issues = [
        Issue(
            "cert-names",
            "info",
            f"certificate names {names}; {server_name} matches {how}",
            evidence,
        )
    ]
    if how == "a wildcard DNS-ID only":
        issues.append(
            Issue(
                "cert-name-wildcard",
                "warn",
                f"{server_name} is named only through a wildcard; RFC 9525 section 6.3 and "
                "RFC 7817 section 3 prefer the exact host name in a DNS-ID",
                evidence,
            )
        )
    elif how == "the CN only":
        issues.append(
            Issue(
                "cert-name-cn-only",
                "warn",
                f"{server_name} appears only in the subject CN, which RFC 9525 section 6.3 "
                "forbids clients to use: a conforming client refuses this certificate",
                evidence,
            )
        )
    return issues


def certificate_issues(
    chain: list[bytes], *, server_name: str, anchors: list[bytes], verified: list[bytes]
) -> list[Issue]:
    """``chain_issues`` and ``name_issues`` of one handshake (none without a certificate)."""
    if not chain:
        return []
    try:
        return chain_issues(chain, anchors=anchors, verified=verified) + name_issues(
            chain[0], server_name
        )
    except ValueError as exc:  # a certificate cryptography cannot parse
        return [Issue("cert-unparsable", "warn", f"the certificate could not be read: {exc}")]


# -- the delivered copy's header section ------------------------------------------------------

#: RFC 5322 section 3.6.4 msg-id, without CFWS: "<" id-left "@" id-right ">" where id-left is
#: a dot-atom-text and id-right a dot-atom-text or a no-fold-literal.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_MSG_ID = re.compile(rf"<{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[\x21-\x5a\x5e-\x7e]*\])>")


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_EVIDENCE_CHARS else text[:MAX_EVIDENCE_CHARS] + "..."


def _fields(head: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of a header section."""
    fields: list[tuple[str, str]] = []
    for line in re.split(rb"\r\n|\n|\r", head):
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + text.strip())
        elif ":" in text:
            name, _, value = text.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


def header_issues(
    head: bytes, *, submitted: datetime.datetime, now: datetime.datetime
) -> list[Issue]:
    """RFC 5322 sanity of a delivered copy's header section (``head``, without the blank
    line). ``submitted`` and ``now`` bound the plausible Date (``DATE_WINDOW`` either way).
    Every issue is a warning, with the offending field as evidence."""
    issues: list[Issue] = []
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", head)
    if bare is not None:
        start = head.rfind(b"\n", 0, max(bare.start() - 1, 0)) + 1
        line = head[start : bare.end() + 60].decode("utf-8", "replace")
        issues.append(
            Issue(
                "header-bare-newline",
                "warn",
                f"the header section holds a bare {'CR' if head[bare.start()] == 13 else 'LF'}"
                f" at byte {bare.start()}; RFC 5322 section 2.2 allows CR and LF only "
                "together",
                (repr(line[:MAX_EVIDENCE_CHARS]),),
            )
        )
    fields = _fields(head)
    for name in SINGLE_FIELDS:
        found = [f"{n}: {_cut(v)}" for n, v in fields if n == name]
        required = name in ("from", "date", "message-id")
        if len(found) > 1 or (required and not found):
            label = "-".join(p.capitalize() for p in name.split("-")).replace("Id", "ID")
            issues.append(
                Issue(
                    "header-count",
                    "warn",
                    f"the delivered copy has {len(found)} {label} fields; RFC 5322 section 3.6 "
                    f"allows {'exactly' if name in ('from', 'date') else 'at most'} one",
                    tuple(found) or (f"no {label} field",),
                )
            )
    for _, value in (f for f in fields if f[0] == "date"):
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is None:  # "-0000" (RFC 5322 section 3.3)
            when = when.replace(tzinfo=datetime.UTC)
        if when is None:
            issues.append(
                Issue(
                    "header-date",
                    "warn",
                    "the Date field does not parse as an RFC 5322 section 3.3 date-time",
                    (f"date: {_cut(value)}",),
                )
            )
        elif not submitted - DATE_WINDOW <= when <= now + DATE_WINDOW:
            issues.append(
                Issue(
                    "header-date",
                    "warn",
                    f"the Date field says {when.isoformat()}, outside "
                    f"{int(DATE_WINDOW.total_seconds() // 60)} minutes of the submission "
                    f"({submitted.isoformat(timespec='seconds')})",
                    (f"date: {_cut(value)}",),
                )
            )
    for _, value in (f for f in fields if f[0] == "message-id"):
        if not _MSG_ID.fullmatch(value.strip()):
            issues.append(
                Issue(
                    "header-message-id",
                    "warn",
                    "the Message-ID is not an RFC 5322 section 3.6.4 msg-id "
                    "(<left@right>, both dot-atoms or a [literal] on the right)",
                    (f"message-id: {_cut(value)}",),
                )
            )
    return issues
