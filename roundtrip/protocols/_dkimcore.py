"""The DKIM computations shared by DKIM (RFC 6376, RFC 8463) and ARC (RFC 8617).

Tag lists, header selection, the two canonicalizations, the body hash and the signature
primitives. Pure functions over bytes: no I/O, no clock, no DNS.

Why not dkimpy's: dkimpy keeps the whole body as one string and builds two or three
canonicalized copies of it per signature, so a 20 MB message signed twice (Ed25519 and RSA,
RFC 8463 section 4) peaked at 5.7 times its size at the MX (tests/test_memory.py), and every
signature hashed the body again. Here the body is canonicalized in slices of
:data:`BODY_CHUNK` octets straight from the message, once per canonicalization however many
signatures use it (:class:`BodyHashes`), and the signatures themselves are OpenSSL's
(``cryptography``). dkimpy stays the independent verifier our tests compare against.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = [
    "BODY_CHUNK",
    "BodyHashes",
    "Canon",
    "HeaderField",
    "PublicKey",
    "TagError",
    "canonical_header",
    "header_hash_input",
    "load_private",
    "parse_public_key",
    "parse_tags",
    "remember_private",
    "select_headers",
    "sign_data",
    "split_message",
    "strip_b_value",
    "verify_data",
]

#: How much of a body is canonicalized at a time (the peak extra memory per hash).
BODY_CHUNK = 1 << 20

Canon = Literal["simple", "relaxed"]


class TagError(ValueError):
    """A tag-list (RFC 6376 section 3.2) that does not parse."""


_TAG_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_]*\Z")
_FWS = re.compile(rb"[ \t\r\n]+")


def parse_tags(value: bytes) -> dict[str, bytes]:
    """A tag-list as ``{name: value}``, values with surrounding whitespace removed.

    Raises:
        TagError: a tag without ``=``, a bad tag name, or a tag given twice (section 3.2).
    """
    tags: dict[str, bytes] = {}
    parts = value.split(b";")
    if parts and not parts[-1].strip(b" \t\r\n"):
        parts.pop()  # a trailing ";" is allowed
    for part in parts:
        name, eq, tag_value = part.partition(b"=")
        name = name.strip(b" \t\r\n")
        if not eq:
            raise TagError(f"tag without '=': {part.strip()[:40]!r}")
        if not _TAG_NAME.match(name):
            raise TagError(f"bad tag name {name[:40]!r}")
        key = name.decode("ascii")
        if key in tags:
            raise TagError(f"tag {key}= given twice")
        tags[key] = tag_value.strip(b" \t\r\n")
    return tags


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as it stands in the message.

    Attributes:
        name: the field name as written (before the colon).
        raw: the whole field: name, colon, value with its folding, and the final CRLF.
    """

    name: bytes
    raw: bytes

    @property
    def value(self) -> bytes:
        """Everything after the colon, folding included, without the final CRLF."""
        value = self.raw.partition(b":")[2]
        return value[:-2] if value.endswith(b"\r\n") else value.rstrip(b"\n")


def split_message(raw: bytes) -> tuple[list[HeaderField], int]:
    """The header fields of ``raw`` and the offset where its body starts.

    Lines end in CRLF (the stack's SMTP servers store them so); a line that does not start a
    field and does not continue one is skipped, as a verifier cannot sign it either.
    """
    end = raw.find(b"\r\n\r\n")
    if raw.startswith(b"\r\n"):
        head_end, body = 0, 2
    elif end < 0:
        head_end, body = len(raw), len(raw)
    else:
        head_end, body = end + 2, end + 4
    fields: list[HeaderField] = []
    current: list[bytes] = []
    for line in raw[:head_end].split(b"\r\n")[:-1] if head_end else []:
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        if current:
            fields.append(_field(current))
        current = [line] if b":" in line else []
    if current:
        fields.append(_field(current))
    return fields, body


def _field(lines: list[bytes]) -> HeaderField:
    raw = b"\r\n".join(lines) + b"\r\n"
    return HeaderField(raw.partition(b":")[0], raw)


def select_headers(fields: Sequence[HeaderField], names: Iterable[str]) -> list[HeaderField]:
    """The fields ``h=`` names, in its order: each name takes the lowest (last) instance not
    yet used; a name with none left contributes nothing (RFC 6376 section 5.4.2)."""
    by_name: dict[bytes, list[HeaderField]] = {}
    for f in fields:
        by_name.setdefault(f.name.strip().lower(), []).append(f)
    chosen: list[HeaderField] = []
    for name in names:
        left = by_name.get(name.strip().lower().encode("ascii", "replace"))
        if left:
            chosen.append(left.pop())
    return chosen


_WSP_RUN = re.compile(rb"[ \t]+")
_UNFOLD = re.compile(rb"\r\n(?=[ \t])")


def canonical_header(f: HeaderField, canon: Canon) -> bytes:
    """One field canonicalized (RFC 6376 section 3.4.1 and 3.4.2), with its CRLF."""
    if canon == "simple":
        return f.raw
    value = f.value
    # Each substitution runs only where it changes something: most fields are one line
    # with single spaces (regular expressions cost more than the finds that skip them).
    if b"\r\n" in value:
        value = _UNFOLD.sub(b"", value).replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return f.name.strip(b" \t").lower() + b":" + value.strip(b" ") + b"\r\n"


def strip_b_value(raw_field: bytes) -> bytes:
    """The field with the ``b=`` tag's value (and the whitespace around it) emptied
    (RFC 6376 section 3.7), the field's CRLF kept."""
    name, colon, value = raw_field.partition(b":")
    tail = b"\r\n" if value.endswith(b"\r\n") else b""
    if tail:
        value = value[:-2]
    out: list[bytes] = []
    for part in value.split(b";"):
        tag, eq, _ = part.partition(b"=")
        out.append(tag + eq if eq and tag.strip(b" \t\r\n") == b"b" else part)
    return name + colon + b";".join(out) + tail


def header_hash_input(fields: Sequence[HeaderField], signature: HeaderField, canon: Canon) -> bytes:
    """What a header signature covers: the selected fields canonicalized, then the signature
    field itself with an empty ``b=`` and without its final CRLF (RFC 6376 section 3.7)."""
    own = canonical_header(HeaderField(signature.name, strip_b_value(signature.raw)), canon)
    return b"".join(canonical_header(f, canon) for f in fields) + own[:-2]


# The body hash (RFC 6376 section 3.4.3, 3.4.4, 3.7)

_TRAILING_WSP = re.compile(rb"[ \t]+(?=\r\n)")
_TRAILING_CRLFS = re.compile(rb"(?:\r\n)+\Z")


def _trailing_crlfs(chunk: bytes) -> int:
    """How many CRLFs end ``chunk``. Only the run of CR and LF at its end is looked at: a
    regular expression anchored at the end still tries every position of the chunk."""
    tail = chunk[len(chunk.rstrip(b"\r\n")) :]
    if tail == b"\r\n" * (len(tail) // 2):  # the usual case: CRLFs and nothing else
        return len(tail) // 2
    match = _TRAILING_CRLFS.search(tail)  # a bare CR or LF among them
    return (match.end() - match.start()) // 2 if match else 0


class _Canonicalizer:
    """Feeds a body to hashes in canonical form, holding back trailing empty lines."""

    def __init__(self, canon: Canon, sinks: list[_Sink]) -> None:
        self.canon = canon
        self.sinks = sinks
        self.pending = 0  # empty lines seen since the last line with content
        self.emitted = False
        self.length = 0  # canonical octets so far

    def _emit(self, data: bytes) -> None:
        self.emitted = True
        self.length += len(data)
        for sink in self.sinks:
            sink.update(data)

    def feed(self, chunk: bytes, *, last: bool) -> None:
        if self.canon == "relaxed":
            # A last line without CRLF keeps its trailing space (compressed), as dkimpy
            # and OpenDKIM read RFC 6376 section 3.4.4; SMTP never delivers such a body.
            # The substitutions run only where they change something: base64 and most text
            # have no trailing space and no run of spaces, and bytes.find is much faster.
            if b" \r\n" in chunk or b"\t\r\n" in chunk:
                chunk = _TRAILING_WSP.sub(b"", chunk)
            if b"\t" in chunk or b"  " in chunk:
                chunk = _WSP_RUN.sub(b" ", chunk)
        crlfs = _trailing_crlfs(chunk)
        content = chunk[: len(chunk) - 2 * crlfs] if crlfs else chunk
        if not content:
            self.pending += crlfs
            return
        self._emit(b"\r\n" * self.pending + content + b"\r\n")
        self.pending = max(crlfs - 1, 0)

    def finish(self) -> None:
        if not self.emitted and self.canon == "simple":
            self._emit(b"\r\n")  # an empty body is one CRLF in simple (section 3.4.3)


class _Sink:
    """A hash that takes at most ``limit`` octets (the ``l=`` tag), or all of them."""

    def __init__(self, algorithm: str, limit: int | None) -> None:
        self.hash = hashlib.new(algorithm)
        self.left = limit

    def update(self, data: bytes) -> None:
        if self.left is None:
            self.hash.update(data)
        elif self.left > 0:
            self.hash.update(data[: self.left])
            self.left -= min(len(data), self.left)


class BodyHashes:
    """Body hashes of one message, each computed once.

    Args:
        raw: the message.
        body_offset: where its body starts (:func:`split_message`).
        chunk: octets canonicalized at a time.
    """

    def __init__(self, raw: bytes, body_offset: int, chunk: int = BODY_CHUNK) -> None:
        self.raw = raw
        self.offset = body_offset
        self.chunk = max(chunk, 2)
        self._done: dict[tuple[Canon, str, int | None], bytes] = {}
        self._lengths: dict[Canon, int] = {}

    def get(self, canon: Canon, algorithm: str = "sha256", limit: int | None = None) -> bytes:
        """The digest of the body under ``canon`` and ``algorithm``, of its first ``limit``
        canonical octets when given."""
        key = (canon, algorithm, limit)
        if key not in self._done:
            self.compute([key])
        return self._done[key]

    def length(self, canon: Canon) -> int:
        """How many octets the canonical body has (what an ``l=`` tag is compared with)."""
        if canon not in self._lengths:
            self.compute([(canon, "sha256", None)])
        return self._lengths[canon]

    def compute(self, keys: Iterable[tuple[Canon, str, int | None]]) -> None:
        """Compute several digests in one pass over the body per canonicalization."""
        todo: dict[Canon, list[tuple[tuple[Canon, str, int | None], _Sink]]] = {}
        for key in keys:
            if key not in self._done:
                todo.setdefault(key[0], []).append((key, _Sink(key[1], key[2])))
        for canon, pairs in todo.items():
            feeder = _Canonicalizer(canon, [sink for _, sink in pairs])
            raw, pos, end = self.raw, self.offset, len(self.raw)
            while pos < end:
                stop = min(pos + self.chunk, end)
                if stop < end:
                    cut = raw.rfind(b"\r\n", pos, stop)
                    stop = cut + 2 if cut >= pos else stop
                    if cut < pos:  # one line longer than a chunk: find its end
                        cut = raw.find(b"\r\n", stop - 1)
                        stop = end if cut < 0 else cut + 2
                feeder.feed(raw[pos:stop], last=stop >= end)
                pos = stop
            feeder.finish()
            self._lengths[canon] = feeder.length
            for key, sink in pairs:
                self._done[key] = sink.hash.digest()


# Keys and signatures

PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_PRIVATE: dict[bytes, PrivateKey] = {}


def load_private(private: bytes) -> PrivateKey:
    """A private key from what :class:`roundtrip.protocols.dkim.SigningKey` holds: an RSA
    PEM, or the base64 of a 32-octet Ed25519 seed. Parsed once per process.

    Raises:
        ValueError: neither.
    """
    key = _PRIVATE.get(private)
    if key is None:
        if private.lstrip().startswith(b"-----BEGIN"):
            # Only the stack's own keys come here (minted by it, or read back from its cache
            # directory): the slow consistency check of an RSA key (tens of ms) is skipped.
            loaded = serialization.load_pem_private_key(
                private, password=None, unsafe_skip_rsa_key_validation=True
            )
            if not isinstance(loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
                raise ValueError(f"not an RSA or Ed25519 key: {type(loaded).__name__}")
            key = loaded
        else:
            seed = base64.b64decode(private, validate=True)
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        if len(_PRIVATE) > 256:
            _PRIVATE.clear()
        _PRIVATE[private] = key
    return key


def remember_private(private: bytes, key: PrivateKey) -> None:
    """Let :func:`load_private` answer ``private`` with ``key`` without parsing it."""
    _PRIVATE[private] = key


def sign_data(data: bytes, algorithm: str, key: PrivateKey) -> bytes:
    """The signature over ``data``: RSASSA-PKCS1-v1_5 with SHA-256 (RFC 6376 section 3.3.1),
    or Ed25519 over the SHA-256 digest of ``data`` (RFC 8463 section 3).

    Raises:
        ValueError: the key does not match the algorithm.
    """
    if algorithm == "rsa-sha256" and isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if algorithm == "ed25519-sha256" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(hashlib.sha256(data).digest())
    raise ValueError(f"a {type(key).__name__} cannot sign {algorithm}")


def verify_data(data: bytes, signature: bytes, algorithm: str, key: PublicKey) -> bool:
    """Whether ``signature`` is ``key``'s over ``data`` (see :func:`sign_data`)."""
    try:
        if algorithm == "rsa-sha256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            return True
        if algorithm == "ed25519-sha256" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, hashlib.sha256(data).digest())
            return True
    except InvalidSignature:
        return False
    return False


#: RSA keys shorter than this are refused (RFC 8301 section 3.2).
MIN_RSA_BITS = 1024
#: Nor longer than this: RFC 8301 section 3.2 asks verifiers to handle 1024 to 4096 bits;
#: 8192 is the largest size in use, and a larger key only costs the verifier time.
MAX_RSA_BITS = 8192


@functools.lru_cache(maxsize=256)
def parse_public_key(kind: bytes, p: bytes) -> PublicKey:
    """The key a record's ``k=`` and ``p=`` publish.

    Raises:
        ValueError: an unknown ``k=``, ``p=`` that is not base64 or not a key of that kind,
            an RSA key shorter than 1024 bits.
    """
    try:
        der = base64.b64decode(_FWS.sub(b"", p), validate=True)
    except ValueError:
        raise ValueError("p= is not base64") from None
    kind = kind.lower()
    if kind == b"ed25519":
        if len(der) != 32:
            raise ValueError(f"an Ed25519 key is 32 octets, not {len(der)}")
        return ed25519.Ed25519PublicKey.from_public_bytes(der)
    if kind != b"rsa":
        raise ValueError(f"unknown key type k={kind.decode('ascii', 'replace')}")
    try:
        loaded = serialization.load_der_public_key(der)
    except ValueError:
        raise ValueError("p= is not an RSA public key") from None
    if not isinstance(loaded, rsa.RSAPublicKey):
        raise ValueError(f"p= is a {type(loaded).__name__}, not an RSA key")
    if loaded.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {loaded.key_size} bits, under {MIN_RSA_BITS}")
    if loaded.key_size > MAX_RSA_BITS:
        raise ValueError(f"RSA key of {loaded.key_size} bits, above {MAX_RSA_BITS}")
    return loaded
