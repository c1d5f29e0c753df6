"""DKIM signing and verification rules (RFC 6376, RFC 8463) and their Authentication-Results.

Theory of operation. Submission (465/587) signs mail its user authenticated for, once per key
of the signing domain (an Ed25519 and an RSA-2048 key: RFC 8463 section 4 dual signing, so a
verifier that knows only RSA still finds a signature it can check). The receiving MX verifies
every DKIM-Signature, topmost first, and writes one Authentication-Results field (RFC 8601)
naming itself as authserv-id, with one ``dkim=`` result per signature, or ``dkim=none``.

The canonicalization, body hash and header hash are ours (roundtrip/protocols/_dkimcore.py:
the body is read in slices, once however many signatures use it), the signatures OpenSSL's
(``cryptography``); dkimpy and OpenDKIM verify what we sign in the tests. This module decides
what is signed and how a verification outcome maps to an RFC 8601 result:

- Signed: every field of the list RFC 6376 section 5.4.1 recommends (:data:`SIGNED_HEADERS`)
  that the message has, each instance, and From once more than it occurs (oversigning,
  section 8.15: a second From added on the way breaks the signature); canonicalization
  relaxed/relaxed (section 3.4), which survives the header refolding and trailing-space
  changes relays make.
- Results: the key record is looked up through a function the caller passes
  (:data:`KeyLookup`), answering from whatever the stack's DNS serves. A missing record is
  ``permerror`` (RFC 6376 section 6.1.2, "no key for signature"), a DNS failure
  ``temperror``, a record that does not parse or is revoked (empty ``p=``, section 3.6.1)
  ``permerror``, a malformed or expired signature ``permerror`` (section 6.1.1), a body hash
  or signature that does not match ``fail`` (RFC 8601 section 2.7.1). An rsa-sha1 signature
  is ``permerror`` without a key look-up: RFC 8301 section 3.1 makes it historic, a
  permanently failed evaluation, which no verifier may consider valid.
- Bad input never escapes as an exception: a tag list, key record or signature that does not
  parse is that signature's ``permerror`` (an RSA key under 1024 bits too, RFC 8301 section
  3.2), and the message is delivered.

- ``l=`` (body length): we never sign with it. A signature whose ``l=`` leaves part of the
  body unsigned is ``policy`` (RFC 8601 section 2.7.1), not ``pass``: whatever was appended
  after signing is unauthenticated (RFC 6376 section 8.2); one covering the whole body passes.
  RSA keys over 8192 bits are ``permerror``.

Deliberately unsupported: ``i=`` identities other than the domain (we never sign with them;
a verified one is honoured), ADSP. ARC is
roundtrip/protocols/arc.py. The clock (``t=``, the ``x=`` expiry) is a parameter.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Literal

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from ._author import AuthorDomains, read_from_fields
from ._dkimcore import (
    BodyHashes,
    Canon,
    HeaderField,
    PublicKey,
    TagError,
    header_hash_input,
    load_private,
    parse_public_key,
    parse_tags,
    select_headers,
    sign_data,
    split_message,
    verify_data,
)
from ._lines import header_section
from .delivery import normalize_line_endings

__all__ = [
    "CANONICALIZATION",
    "OVERSIGNED",
    "SIGNED_HEADERS",
    "DKIMResult",
    "KeyAnswer",
    "KeyLookup",
    "SigningKey",
    "authentication_results",
    "author_domains",
    "fetch_key",
    "from_domain",
    "from_field_values",
    "key_answer",
    "key_query",
    "key_record_name",
    "public_key_record",
    "sign",
    "verify",
]

#: Header fields signed when present (RFC 6376 section 5.4.1's list), every instance.
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
Result = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror", "none"]


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


def sign(raw: bytes, keys: Iterable[SigningKey], *, now: float | None = None) -> bytes:
    """``raw`` with one DKIM-Signature per key prepended (the first key's on top).

    Args:
        raw: the message; a bare CR or LF is signed, and returned, as CRLF.
        keys: the keys to sign with.
        now: the ``t=`` timestamp (the caller's clock: this module reads none); None: no
            ``t=`` (it is optional, RFC 6376 section 3.5).

    Raises:
        ValueError: a key that cannot be loaded or does not match its algorithm (the caller
            decides whether that stops delivery).
    """
    raw = normalize_line_endings(raw)  # signed as it travels: SMTP lines end in CRLF
    fields, offset = split_message(raw)
    present = [f.name.strip().lower().decode("ascii", "replace") for f in fields]
    include: list[str] = []
    for name in SIGNED_HEADERS:
        include += [name] * (present.count(name) + (name in OVERSIGNED))
    signed = select_headers(fields, include)
    bodies = BodyHashes(raw, offset)
    stamp = "" if now is None else f" t={int(now)};"
    out: list[bytes] = []
    for key in keys:
        bh = base64.b64encode(bodies.get("relaxed")).decode("ascii")
        head = (
            f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain};\r\n"
            f"\ts={key.selector};{stamp}\r\n"
            f"\th={_fold_list(include)};\r\n"
            f"\tbh={bh};\r\n"
            "\tb=\r\n"
        ).encode("ascii")
        field = HeaderField(b"DKIM-Signature", head)
        data = header_hash_input(signed, field, "relaxed")
        value = base64.b64encode(sign_data(data, key.algorithm, load_private(key.private)))
        out.append(head[:-2] + _fold_base64(value) + b"\r\n")
    return b"".join(out) + raw


def _fold_list(names: Sequence[str], width: int = 70) -> str:
    """``a:b:c`` folded after a colon so no line passes ``width``."""
    lines = [""]
    for name in names:
        piece = name if not lines[-1] else ":" + name
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines[-1] += ":"
            lines.append(name)
        else:
            lines[-1] += piece
    return "\r\n\t  ".join(lines)


def _fold_base64(value: bytes, width: int = 72) -> bytes:
    return b"\r\n\t ".join(value[i : i + width] for i in range(0, len(value), width))


#: A line the email package's header parser takes as a field without repairing anything: a
#: name of printable ASCII (no colon, no space) and a colon (RFC 5322 section 2.2).
_FIELD_START = re.compile(rb"[!-9;-~]+:")


def from_field_values(head: bytes) -> list[str]:
    """The values of the From fields of a header section (``header_section``), as the email
    package's ``BytesHeaderParser(policy=compat32)`` gives them: folding kept, the space
    after the colon dropped.

    A plain section (ASCII, CRLF line ends only, every line a field or the continuation of
    one) is read here, in about a quarter of the time; anything else goes to the email
    package, so one parser decides what the From fields of an odd message are, wherever
    they are read (DKIM signing at submission, DMARC at the MX).

    Raises:
        Whatever the email package raises on a section it cannot read.
    """
    values = _plain_from_values(head)
    if values is not None:
        return values
    fields = BytesHeaderParser(policy=compat32).parsebytes(head).get_all("From") or []
    return [str(f) for f in fields]


def _plain_from_values(head: bytes) -> list[str] | None:
    """``from_field_values`` of a plain section; None for any other."""
    if not (head.isascii() and head.endswith(b"\r\n\r\n")):
        return None
    block = head[:-4]
    crlfs = block.count(b"\r\n")
    if block.count(b"\r") != crlfs or block.count(b"\n") != crlfs:
        return None  # a bare CR or LF: the parser splits lines on those too
    values: list[list[bytes]] = []
    current: list[bytes] | None = None
    for index, line in enumerate(block.split(b"\r\n")):
        if line[:1] in (b" ", b"\t"):
            if index == 0:
                return None  # a first line that continues nothing: a defect to the parser
            if current is not None:
                current.append(line)
            continue
        found = _FIELD_START.match(line)
        if found is None:
            return None  # the parser ends the header section here
        if line[: found.end() - 1].lower() == b"from":
            current = [line[found.end() :].lstrip(b" \t")]
            values.append(current)
        else:
            current = None
    return [b"\r\n".join(value).decode("ascii") for value in values]


def author_domains(raw: bytes) -> AuthorDomains | None:
    """The author domains of ``raw`` (``roundtrip/protocols/_author.py``): the one reading of
    the From field that DKIM signing (:func:`from_domain`) and DMARC
    (``roundtrip/protocols/dmarc.py``) share; None when the header block cannot be read."""
    try:
        values = from_field_values(header_section(raw))
    except Exception:  # the email package on a section it cannot read
        return None
    return read_from_fields(values)


def from_domain(raw: bytes) -> str | None:
    """The domain of the first From address (lower case), or None: no From, or a malformed
    one (RFC 5322 section 3.6.2), whose domain readers may not agree on, so there is no
    domain to sign for (OpenDKIM does not sign a From it cannot parse either)."""
    found = author_domains(raw)
    if found is None or found.malformed or not found.domains:
        return None
    return found.domains[0]


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


def verify(raw: bytes, lookup: KeyLookup, *, now: float | None = None) -> list[DKIMResult]:
    """One result per DKIM-Signature of ``raw``, topmost first; ``[none]`` without any.

    Args:
        raw: the message as received.
        lookup: answers key record names from DNS.
        now: the time ``x=`` is checked against (the caller's clock: this module reads
            none); None: expiry is not checked.

    Never raises: whatever goes wrong with one signature is that signature's result.
    """
    if not _HAS_SIGNATURE.search(header_section(raw)):
        return [DKIMResult("none")]
    raw = normalize_line_endings(raw)  # a bare LF is read as the CRLF it stands for
    fields, offset = split_message(raw)
    signatures = [f for f in fields if f.name.strip().lower() == b"dkim-signature"]
    if not signatures:
        return [DKIMResult("none")]
    bodies = BodyHashes(raw, offset)
    return [_verify_one(fields, sig, bodies, lookup, now) for sig in signatures]


_HAS_SIGNATURE = re.compile(rb"(?im)^dkim-signature[ \t]*:")
_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
_WSP = re.compile(rb"[ \t\r\n]+")


def _verify_one(
    fields: Sequence[HeaderField],
    sig: HeaderField,
    bodies: BodyHashes,
    lookup: KeyLookup,
    now: float | None,
) -> DKIMResult:
    try:
        tags = parse_tags(sig.value)
    except TagError as exc:
        return DKIMResult("permerror", f"malformed signature: {_short(exc)}")
    found = DKIMResult(
        "permerror",
        domain=_text(tags.get("d", b"")),
        selector=_text(tags.get("s", b"")),
        algorithm=_text(tags.get("a", b"")),
        b=_text(_WSP.sub(b"", tags.get("b", b""))[:8]),
    )

    def outcome(result: Result, reason: str = "") -> DKIMResult:
        return DKIMResult(result, reason, found.domain, found.selector, found.algorithm, found.b)

    problem = _signature_problem(tags, now)
    if problem:
        return outcome("permerror", problem)
    algorithm = found.algorithm.lower()
    if algorithm == "rsa-sha1":
        return outcome("permerror", "rsa-sha1 is historic (RFC 8301 section 3.1)")
    if algorithm not in _ALGORITHMS:
        return outcome("permerror", f"malformed signature: unknown algorithm a={found.algorithm}")
    header_canon, body_canon = _canonicalization(tags.get("c", b"simple/simple"))
    public = fetch_key(lookup, found.selector, found.domain, algorithm, tags)
    if isinstance(public, tuple):
        return outcome(*public)
    try:
        limit = int(tags["l"]) if "l" in tags else None
        expected = base64.b64decode(_WSP.sub(b"", tags["bh"]), validate=True)
        signature = base64.b64decode(_WSP.sub(b"", tags["b"]), validate=True)
    except ValueError as exc:
        return outcome("permerror", f"malformed signature: {_short(exc)}")
    assert header_canon is not None and body_canon is not None
    if bodies.get(body_canon, "sha256", limit) != expected:
        return outcome("fail", "body hash did not verify")
    names = [n.decode("ascii", "replace") for n in _WSP.sub(b"", tags["h"]).split(b":")]
    data = header_hash_input(select_headers(fields, names), sig, header_canon)
    if not verify_data(data, signature, algorithm, public):
        return outcome("fail", "signature did not verify")
    if limit is not None and bodies.length(body_canon) > limit:
        # RFC 6376 section 8.2: content appended past l= is unsigned; an ADMD may refuse it
        # (RFC 8601 section 2.7.1, "policy"), and a test tool must not call it a pass.
        unsigned = bodies.length(body_canon) - limit
        return outcome("policy", f"l= leaves {unsigned} octets of the body unsigned")
    return outcome("pass")


def fetch_key(
    lookup: KeyLookup, selector: str, domain: str, algorithm: str, tags: dict[str, bytes]
) -> PublicKey | tuple[Result, str]:
    """The public key a signature names, or the ``(result, reason)`` it ends with: no record
    ``permerror``, a DNS failure ``temperror``, a revoked, unparsable or unsuitable record
    ``permerror`` (RFC 6376 section 6.1.2). DKIM-Signature and ARC (RFC 8617) share it."""
    answer = lookup(key_record_name(selector, domain))
    if answer.status == "missing":
        return ("permerror", "no key for signature")
    if answer.status == "error":
        return ("temperror", "key lookup failed")
    try:
        key_tags = parse_tags(answer.text)
    except TagError as exc:
        return ("permerror", f"bad key record: {_short(exc)}")
    if not key_tags.get("p"):
        return ("permerror", "key revoked (empty p=)")
    problem = _key_problem(key_tags, algorithm, tags)
    if problem:
        return ("permerror", f"bad key record: {problem}")
    try:
        return parse_public_key(key_tags.get("k", b"rsa"), key_tags["p"])
    except ValueError as exc:
        return ("permerror", f"bad key record: {_short(exc)}")


_REQUIRED = ("v", "a", "b", "bh", "d", "h", "s")


def _signature_problem(tags: dict[str, bytes], now: float | None) -> str:
    """Why a DKIM-Signature's tags are unusable (RFC 6376 section 6.1.1), or ``""``."""
    missing = [t for t in _REQUIRED if not tags.get(t)]
    if missing:
        return f"malformed signature: missing {', '.join(t + '=' for t in missing)}"
    if tags["v"] != b"1":
        return f"malformed signature: unsupported version v={_text(tags['v'])}"
    header_canon, body_canon = _canonicalization(tags.get("c", b"simple/simple"))
    if header_canon is None or body_canon is None:
        return f"malformed signature: bad c={_text(tags.get('c', b''))}"
    names = [n.lower() for n in _WSP.sub(b"", tags["h"]).split(b":")]
    if b"from" not in names:
        return "malformed signature: From is not signed"
    domain = tags["d"].lower().rstrip(b".")
    if "i" in tags:
        identity = tags["i"].rpartition(b"@")[2].lower().rstrip(b".")
        if identity != domain and not identity.endswith(b"." + domain):
            return "malformed signature: i= is not in d="
    for tag in ("l", "t", "x"):
        if tag in tags and not tags[tag].isdigit():
            return f"malformed signature: {tag}= is not a number"
    if "x" in tags:
        if now is not None and int(tags["x"]) < now:
            return "signature expired"
        if "t" in tags and int(tags["t"]) > int(tags["x"]):
            return "malformed signature: x= before t="
    return ""


def _key_problem(key: dict[str, bytes], algorithm: str, tags: dict[str, bytes]) -> str:
    """Why a key record does not apply to this signature (RFC 6376 section 3.6.1), or ``""``."""
    if "v" in key and key["v"] != b"DKIM1":
        return f"v={_text(key['v'])}"
    kind = key.get("k", b"rsa").lower()
    if kind not in (b"rsa", b"ed25519"):
        return f"unknown key type k={_text(kind)}"
    if kind.decode("ascii") != algorithm.partition("-")[0]:
        return f"a k={_text(kind)} key cannot check {algorithm}"
    if "h" in key and b"sha256" not in [h.strip() for h in key["h"].lower().split(b":")]:
        return "the key does not allow sha256 (h=)"
    if "s" in key and not {b"*", b"email"} & {s.strip() for s in key["s"].lower().split(b":")}:
        return "the key is not for e-mail (s=)"
    flags = {f.strip() for f in key.get("t", b"").lower().split(b":")}
    identity = tags.get("i", b"").rpartition(b"@")[2].lower().rstrip(b".")
    if b"s" in flags and "i" in tags and identity != tags["d"].lower().rstrip(b"."):
        return "t=s requires i= to be in d= itself"
    return ""


def _canonicalization(c: bytes) -> tuple[Canon | None, Canon | None]:
    head, _, body = c.strip().lower().partition(b"/")
    known: dict[bytes, Canon] = {b"simple": "simple", b"relaxed": "relaxed"}
    return known.get(head), known.get(body or b"simple")


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
