"""DKIM keys of the stack's domains, minted at start-up, and key look-ups for the MX.

Minting an RSA-2048 key takes tens of milliseconds, so keys are kept per domain for the life
of the process, as the pytest plugin keeps one CA per session: every stack serving
``example.org`` signs with the same two keys. Nothing is written to disk.

The MX looks key records up through :func:`zone_lookup`, which asks the stack's own DNS server
in memory (its ``answer``, the same code its listeners run): the verifier sees exactly what the
DNS serves, records set by a test included, and never blocks the event loop on a socket.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

if TYPE_CHECKING:
    from ..protocols.dkim import KeyAnswer, KeyLookup, SigningKey

# roundtrip.protocols.dkim (and dkimpy with it) is imported by the functions below, which run
# only when DKIM is on or a test publishes a key: DKIM is off by default (StackConfig.dkim),
# and a test that does not use it should not pay for the import (issue #17).

__all__ = ["ED25519_SELECTOR", "RSA_SELECTOR", "domain_keys", "public_record", "zone_lookup"]

#: Selectors of the stack's keys (``<selector>._domainkey.<domain>``).
ED25519_SELECTOR = "rt-ed25519"
RSA_SELECTOR = "rt-rsa"
_RSA_BITS = 2048


@functools.cache
def domain_keys(domain: str) -> tuple[SigningKey, ...]:
    """The signing keys of ``domain``: Ed25519 first, then RSA-2048 (RFC 8463 section 4)."""
    from ..protocols.dkim import SigningKey
    from ..protocols.dkim import public_key_record as _record

    ed = ed25519.Ed25519PrivateKey.generate()
    ed_public = ed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    ed_seed = ed.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return (
        SigningKey(
            domain,
            ED25519_SELECTOR,
            "ed25519-sha256",
            base64.b64encode(ed_seed),
            _record("ed25519-sha256", ed_public),
        ),
        SigningKey(domain, RSA_SELECTOR, "rsa-sha256", rsa_pem, _record("rsa-sha256", rsa_public)),
    )


def public_record(public_key: str | bytes | object) -> str:
    """The TXT value publishing ``public_key``.

    Args:
        public_key: a PEM public key (RSA or Ed25519), a ``cryptography`` public key object,
            or a ready record (text starting ``v=DKIM1``, used as given).

    Raises:
        ValueError: none of those.
    """
    from ..protocols.dkim import public_key_record as _record

    if isinstance(public_key, bytes):
        public_key = public_key.decode("ascii")
    if isinstance(public_key, str):
        if public_key.lstrip().startswith("v=DKIM1"):
            return public_key.strip()
        public_key = serialization.load_pem_public_key(public_key.encode("ascii"))
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return _record("ed25519-sha256", raw)
    if isinstance(public_key, rsa.RSAPublicKey):
        der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _record("rsa-sha256", der)
    raise ValueError(
        f"not a DKIM public key: {type(public_key).__name__}; give an RSA or Ed25519 PEM "
        "public key, a cryptography public key, or a record starting 'v=DKIM1'"
    )


def zone_lookup(answer: Callable[[bytes], bytes]) -> KeyLookup:
    """A key look-up over ``answer`` (query wire -> reply wire, ``b""`` for no reply)."""
    from ..protocols.dkim import KeyAnswer, key_answer, key_query

    def lookup(name: str) -> KeyAnswer:
        try:
            query = key_query(name)
        except Exception:  # a name no DNS query can carry (bad labels in d= or s=)
            return KeyAnswer("missing")
        return key_answer(answer(query))

    return lookup
