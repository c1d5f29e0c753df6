"""DKIM keys of the stack's domains, minted at start-up, and key look-ups for the MX.

Minting an RSA-2048 key takes 25 to 200 ms, so keys are kept per domain for the life of the
process, as the pytest plugin keeps one CA per session: every stack serving ``example.org``
signs with the same two keys. A stack mints the keys it lacks on worker threads as soon as it
starts (OpenSSL releases the GIL), while its listeners bind and its certificates are made,
and takes them just before its DNS zone is built (:func:`mint_in_background`).

With a cache directory (``StackConfig.cert_cache``, ``ROUNDTRIP_CERT_CACHE``) the keys are
kept there too, one file per domain (``dkim-<domain>.pem``: the RSA key in PEM, then the
Ed25519 seed), written and trusted again under the same rules as the certificates
(roundtrip/stack/_certcache.py: mode 0600, owner only, atomic replace); a later session loads
them instead of minting. Nothing is written without one.

The MX looks key records up through :func:`zone_lookup`, which asks the stack's own DNS server
in memory (its ``lookup``: the reply its listeners would send, as Python values): the verifier
sees exactly what the DNS serves, records set by a test included, and never blocks the event
loop on a socket.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ._certcache import _check_directory, _read_private, _write_private

if TYPE_CHECKING:
    from ..protocols.dkim import KeyAnswer, KeyLookup, SigningKey
    from ..protocols.dns import ZoneSource

__all__ = [
    "ED25519_SELECTOR",
    "RSA_SELECTOR",
    "domain_keys",
    "mint_in_background",
    "public_record",
    "zone_lookup",
]

#: Selectors of the stack's keys (``<selector>._domainkey.<domain>``).
ED25519_SELECTOR = "rt-ed25519"
RSA_SELECTOR = "rt-rsa"
_RSA_BITS = 2048
_SEED_LINE = re.compile(rb"^ed25519-seed: ([A-Za-z0-9+/=]{44})\r?$", re.M)

_KEYS: dict[str, tuple[SigningKey, ...]] = {}
_KEYS_LOCK = threading.RLock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_PENDING: dict[str, concurrent.futures.Future[tuple[SigningKey, ...]]] = {}


def domain_keys(domain: str, cache: str | os.PathLike[str] | None = None) -> tuple[SigningKey, ...]:
    """The signing keys of ``domain``: Ed25519 first, then RSA-2048 (RFC 8463 section 4).

    The same keys for the life of the process; read from, or written to, ``cache`` when given.
    """
    domain = domain.lower()
    with _KEYS_LOCK:
        known = _KEYS.get(domain)
    if known is not None:
        return known
    keys = _load(domain, Path(cache)) if cache is not None else None
    if keys is None:
        ed = ed25519.Ed25519PrivateKey.generate()
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
        keys = _signing_keys(domain, ed, rsa_key)
        if cache is not None:
            _store(domain, Path(cache), keys)
    with _KEYS_LOCK:
        return _KEYS.setdefault(domain, keys)


def mint_in_background(
    domains: Iterable[str], cache: str | os.PathLike[str] | None = None
) -> Callable[[], dict[str, tuple[SigningKey, ...]]]:
    """Start minting (or loading) the keys of ``domains`` on worker threads; the returned
    function waits for them and gives ``{domain: keys}``."""
    global _POOL
    wanted = [d.lower() for d in domains]
    futures: dict[str, concurrent.futures.Future[tuple[SigningKey, ...]]] = {}
    with _KEYS_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="roundtrip-dkim")
        ready = {d: _KEYS[d] for d in wanted if d in _KEYS}
        for d in wanted:
            if d in ready:
                continue
            # A key already being minted (the plugin starts the session's keys early) is
            # waited for, not minted a second time.
            pending = _PENDING.get(d)
            if pending is None:
                pending = _PENDING[d] = _POOL.submit(domain_keys, d, cache)
                pending.add_done_callback(functools.partial(_done, d))
            futures[d] = pending

    def result() -> dict[str, tuple[SigningKey, ...]]:
        return {**ready, **{d: f.result() for d, f in futures.items()}}

    return result


def _done(domain: str, _future: object) -> None:
    """A minting finished: its keys are in ``_KEYS``, or a later start tries again."""
    with _KEYS_LOCK:
        _PENDING.pop(domain, None)


def _signing_keys(
    domain: str, ed: ed25519.Ed25519PrivateKey, rsa_key: rsa.RSAPrivateKey
) -> tuple[SigningKey, ...]:
    from ..protocols._dkimcore import remember_private
    from ..protocols.dkim import SigningKey
    from ..protocols.dkim import public_key_record as _record

    ed_public = ed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    ed_seed = base64.b64encode(
        ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    remember_private(ed_seed, ed)  # signing needs no parse of what was just made
    remember_private(rsa_pem, rsa_key)
    return (
        SigningKey(
            domain,
            ED25519_SELECTOR,
            "ed25519-sha256",
            ed_seed,
            _record("ed25519-sha256", ed_public),
        ),
        SigningKey(domain, RSA_SELECTOR, "rsa-sha256", rsa_pem, _record("rsa-sha256", rsa_public)),
    )


def _key_file(domain: str, directory: Path) -> Path:
    safe = re.sub(r"[^a-z0-9.-]", "_", domain)
    return directory / f"dkim-{safe}.pem"


def _load(domain: str, directory: Path) -> tuple[SigningKey, ...] | None:
    """The keys cached for ``domain``, or None (absent, damaged, or readable by others)."""
    _check_directory(directory)
    data = _read_private(_key_file(domain, directory))
    if data is None:
        return None
    seed = _SEED_LINE.search(data)
    if seed is None:
        return None
    try:
        rsa_key = serialization.load_pem_private_key(
            data[: seed.start()], password=None, unsafe_skip_rsa_key_validation=True
        )
        ed = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed.group(1)))
    except ValueError:
        return None  # damaged: minted again and replaced
    if not isinstance(rsa_key, rsa.RSAPrivateKey) or rsa_key.key_size != _RSA_BITS:
        return None
    return _signing_keys(domain, ed, rsa_key)


def _store(domain: str, directory: Path, keys: tuple[SigningKey, ...]) -> None:
    _check_directory(directory)
    ed, rsa_key = keys
    _write_private(
        _key_file(domain, directory), rsa_key.private + b"ed25519-seed: " + ed.private + b"\n"
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


def zone_lookup(answer: Callable[[bytes], bytes] | ZoneSource) -> KeyLookup:
    """A key look-up over ``answer``.

    Args:
        answer: the stack's DNS server, or anything with its ``lookup`` (a
            :class:`~roundtrip.protocols.dns.ZoneSource`): asked for the TXT records as
            Python values, with no wire format to build and parse; or a function from query
            wire to reply wire (``b""`` for no reply). Both give the same ``KeyAnswer``
            (tests/test_dns_structured_lookup.py).
    """
    from ..protocols.dkim import KeyAnswer, key_answer, key_query
    from ..protocols.dns import ZoneSource

    if not isinstance(answer, ZoneSource):
        wire = answer

        def lookup(name: str) -> KeyAnswer:
            try:
                query = key_query(name)
            except Exception:  # a name no DNS query can carry (bad labels in d= or s=)
                return KeyAnswer("missing")
            return key_answer(wire(query))

        return lookup

    import dns.rdtypes.ANY.TXT

    source = answer

    def structured(name: str) -> KeyAnswer:
        # What key_answer reads from the reply to key_query, read from the records.
        try:
            found = source.lookup(name, "TXT")
        except Exception:  # a name no DNS query can carry (bad labels in d= or s=)
            return KeyAnswer("missing")
        if found is None:
            return KeyAnswer("error")
        if found.rcode == "NXDOMAIN":
            return KeyAnswer("missing")
        if found.rcode != "NOERROR":
            return KeyAnswer("error")
        for rdata in found.rdatas("TXT"):
            if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
                return KeyAnswer("found", b"".join(rdata.strings))
        return KeyAnswer("missing")

    return structured
