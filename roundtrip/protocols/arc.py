"""ARC, the Authenticated Received Chain (RFC 8617): sealing at a forwarder, validation at an MX.

A forwarder that changes a message (a mailing list adding a subject tag or a footer) breaks
the author's DKIM signature, and with it DMARC at the next receiver. ARC lets the forwarder
vouch for what it saw: it adds an ARC set of three fields, all with the same instance ``i=N``:

- ``ARC-Authentication-Results`` (AAR): its own Authentication-Results, verdicts as received;
- ``ARC-Message-Signature`` (AMS): a DKIM-style signature of the message as it leaves
  (relaxed/relaxed, the header fields DKIM signs);
- ``ARC-Seal`` (AS): a signature over every ARC set so far, ``cv=`` giving the chain's state as
  it arrived (``none`` for the first set, ``pass`` after, ``fail`` if it arrived broken).

A receiver validates the chain (RFC 8617 section 5.2): the sets are complete and numbered 1..N
(N <= 50), the newest seal does not say ``cv=fail``, the newest AMS verifies, and every seal
verifies from the newest down. It may then trust the sealer's AAR where DMARC failed (section
7.2): roundtrip/stack/_auth.py decides that.

Keys, canonicalization and signatures are DKIM's (roundtrip/protocols/_dkimcore.py,
roundtrip/protocols/dkim.py): the keys are looked up at ``<s>._domainkey.<d>``. Pure code: the
caller passes the clock and the key look-up.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._dkimcore import (
    BodyHashes,
    Canon,
    HeaderField,
    PublicKey,
    TagError,
    canonical_header,
    header_hash_input,
    load_private,
    parse_tags,
    select_headers,
    sign_data,
    split_message,
    strip_b_value,
    verify_data,
)
from ._lines import header_section
from .delivery import normalize_line_endings
from .dkim import (
    OVERSIGNED,
    SIGNED_HEADERS,
    KeyLookup,
    SigningKey,
    fetch_key,
)

__all__ = ["MAX_INSTANCE", "ARCResult", "resinfo", "seal", "validate"]

#: The highest instance a chain may reach (RFC 8617 section 4.2.1).
MAX_INSTANCE = 50

_AAR = b"arc-authentication-results"
_AMS = b"arc-message-signature"
_AS = b"arc-seal"
_HAS_ARC = re.compile(rb"(?im)^arc-(?:seal|message-signature|authentication-results)[ \t]*:")
_INSTANCE = re.compile(rb"\A[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([0-9]{1,3})[ \t\r\n]*;")
_WSP = re.compile(rb"[ \t\r\n]+")
_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


@dataclass(frozen=True, slots=True)
class ARCResult:
    """What validating a message's ARC chain gave.

    Attributes:
        result: ``none`` (no ARC set), ``pass`` or ``fail`` (RFC 8617 section 4.4).
        reason: why, for ``fail``.
        instance: the highest ``i=`` seen (0: no ARC set).
        sealer: ``d=`` of the newest ARC-Seal.
        results: the newest AAR after its ``i=N;``: the sealer's authserv-id and verdicts.
    """

    result: Literal["none", "pass", "fail"]
    reason: str = ""
    instance: int = 0
    sealer: str = ""
    results: str = ""


def _instance(f: HeaderField) -> int | None:
    match = _INSTANCE.match(f.value)
    return int(match.group(1)) if match else None


def _sets(fields: Sequence[HeaderField]) -> dict[int, dict[bytes, list[HeaderField]]] | str:
    """The ARC fields by instance and kind, or why they cannot be read."""
    sets: dict[int, dict[bytes, list[HeaderField]]] = {}
    for f in fields:
        kind = f.name.strip().lower()
        if kind not in (_AAR, _AMS, _AS):
            continue
        i = _instance(f)
        if i is None:
            return f"{f.name.decode('ascii', 'replace')} without a readable i="
        sets.setdefault(i, {}).setdefault(kind, []).append(f)
    return sets


def validate(raw: bytes, lookup: KeyLookup, *, now: float | None = None) -> ARCResult:
    """Validate ``raw``'s ARC chain (RFC 8617 section 5.2). Never raises.

    Args:
        raw: the message as received.
        lookup: answers key record names.
        now: the caller's clock (unused by ARC itself, kept for symmetry with DKIM).
    """
    if not _HAS_ARC.search(header_section(raw)):
        return ARCResult("none")
    raw = normalize_line_endings(raw)
    fields, offset = split_message(raw)
    sets = _sets(fields)
    if isinstance(sets, str):
        return ARCResult("fail", sets)
    if not sets:
        return ARCResult("none")
    top = max(sets)
    newest_seal = sets[top].get(_AS, [])
    sealer = ""
    if len(newest_seal) == 1:
        try:
            sealer = parse_tags(newest_seal[0].value).get("d", b"").decode("ascii", "replace")
        except TagError:
            sealer = ""
    aar = sets[top].get(_AAR, [])
    results = ""
    if len(aar) == 1:
        results = _INSTANCE.sub(b"", aar[0].value, count=1).decode("utf-8", "replace")
        results = " ".join(results.split())

    def fail(reason: str) -> ARCResult:
        return ARCResult("fail", reason, top, sealer, results)

    # i= runs from 1 to 50 (RFC 8617 section 4.2.1); any other value makes the chain fail
    # (section 5.2, step 2), checked before the sets 1..top are read.
    if top > MAX_INSTANCE:
        return fail(f"instance {top} above {MAX_INSTANCE}")
    if min(sets) < 1:
        return fail(f"instance {min(sets)} below 1")
    for i in range(1, top + 1):
        kinds = sets.get(i, {})
        for kind in (_AAR, _AMS, _AS):
            count = len(kinds.get(kind, []))
            if count != 1:
                name = {_AAR: "ARC-Authentication-Results", _AMS: "ARC-Message-Signature"}
                return fail(f"{count} {name.get(kind, 'ARC-Seal')} fields with i={i}")
    seals: dict[int, dict[str, bytes]] = {}
    for i in range(1, top + 1):
        try:
            seals[i] = parse_tags(sets[i][_AS][0].value)
        except TagError as exc:
            return fail(f"ARC-Seal i={i} malformed: {exc}")
    if seals[top].get("cv", b"").lower() == b"fail":
        return fail(f"ARC-Seal i={top} says cv=fail")
    for i, tags in seals.items():
        expected = b"none" if i == 1 else b"pass"
        if tags.get("cv", b"").lower() != expected:
            return fail(f"ARC-Seal i={i} has cv={tags.get('cv', b'').decode('ascii', 'replace')}")
    bodies = BodyHashes(raw, offset)
    problem = _check_ams(fields, sets[top][_AMS][0], bodies, lookup)
    if problem:
        return fail(f"ARC-Message-Signature i={top} {problem}")
    for i in range(top, 0, -1):
        problem = _check_seal(sets, i, seals[i], lookup)
        if problem:
            return fail(f"ARC-Seal i={i} {problem}")
    return ARCResult("pass", "", top, sealer, results)


def _key_and_signature(
    tags: dict[str, bytes], lookup: KeyLookup
) -> tuple[PublicKey, bytes, str] | str:
    for tag in ("a", "b", "d", "s"):
        if not tags.get(tag):
            return f"malformed: no {tag}="
    algorithm = tags["a"].decode("ascii", "replace").lower()
    if algorithm not in _ALGORITHMS:
        return f"uses a={algorithm}"
    try:
        signature = base64.b64decode(_WSP.sub(b"", tags["b"]), validate=True)
    except ValueError:
        return "malformed: b= is not base64"
    selector = tags["s"].decode("ascii", "replace")
    domain = tags["d"].decode("ascii", "replace")
    key = fetch_key(lookup, selector, domain, algorithm, {"d": tags["d"]})
    if isinstance(key, tuple):
        return f"{key[0]}: {key[1]}"
    return key, signature, algorithm


def _check_ams(
    fields: Sequence[HeaderField], ams: HeaderField, bodies: BodyHashes, lookup: KeyLookup
) -> str:
    try:
        tags = parse_tags(ams.value)
    except TagError as exc:
        return f"malformed: {exc}"
    if not tags.get("bh") or not tags.get("h"):
        return "malformed: no bh= or h="
    found = _key_and_signature(tags, lookup)
    if isinstance(found, str):
        return found
    key, signature, algorithm = found
    header_canon, _, body_canon = tags.get("c", b"relaxed/relaxed").lower().partition(b"/")
    canons: dict[bytes, Canon] = {b"simple": "simple", b"relaxed": "relaxed"}
    hc, bc = canons.get(header_canon), canons.get(body_canon or b"simple")
    if hc is None or bc is None:
        return "malformed: bad c="
    try:
        expected = base64.b64decode(_WSP.sub(b"", tags["bh"]), validate=True)
    except ValueError:
        return "malformed: bh= is not base64"
    if bodies.get(bc, "sha256") != expected:
        return "body hash did not verify"
    names = [n.decode("ascii", "replace") for n in _WSP.sub(b"", tags["h"]).split(b":")]
    if any(n.lower().startswith("arc-") for n in names):
        return "malformed: signs ARC fields"
    data = header_hash_input(select_headers(fields, names), ams, hc)
    if not verify_data(data, signature, algorithm, key):
        return "did not verify"
    return ""


def _seal_input(
    sets: dict[int, dict[bytes, list[HeaderField]]], upto: int, seal_field: HeaderField
) -> bytes:
    """What the seal of instance ``upto`` covers (RFC 8617 section 5.1.1)."""
    parts: list[bytes] = []
    for i in range(1, upto + 1):
        parts.append(canonical_header(sets[i][_AAR][0], "relaxed"))
        parts.append(canonical_header(sets[i][_AMS][0], "relaxed"))
        if i < upto:
            parts.append(canonical_header(sets[i][_AS][0], "relaxed"))
    own = canonical_header(HeaderField(seal_field.name, strip_b_value(seal_field.raw)), "relaxed")
    return b"".join(parts) + own[:-2]


def _check_seal(
    sets: dict[int, dict[bytes, list[HeaderField]]],
    i: int,
    tags: dict[str, bytes],
    lookup: KeyLookup,
) -> str:
    if "h" in tags:
        return "malformed: h= in a seal"
    found = _key_and_signature(tags, lookup)
    if isinstance(found, str):
        return found
    key, signature, algorithm = found
    data = _seal_input(sets, i, sets[i][_AS][0])
    if not verify_data(data, signature, algorithm, key):
        return "did not verify"
    return ""


def seal(
    raw: bytes,
    key: SigningKey,
    authserv_id: str,
    results: str,
    chain: ARCResult,
    *,
    now: float | None = None,
) -> bytes:
    """The three fields of a new ARC set for ``raw`` (to prepend to it), top to bottom:
    ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results.

    Args:
        raw: the message as it will leave, the forwarder's changes made (CRLF line ends).
        key: the sealer's key (its domain's; rsa-sha256 is what every ARC verifier knows).
        authserv_id: the forwarder's host name, as in its Authentication-Results.
        results: its verdicts without the authserv-id (``dkim=pass header.d=...; spf=...``).
        chain: :func:`validate` of the message as it arrived.
        now: the ``t=`` timestamp; None: no ``t=``.

    Raises:
        ValueError: the chain is already at :data:`MAX_INSTANCE`, or the key is unusable.
    """
    raw = normalize_line_endings(raw)
    instance = chain.instance + 1
    if instance > MAX_INSTANCE:
        raise ValueError(f"an ARC chain ends at i={MAX_INSTANCE}")
    # cv=none only when no chain arrived; a chain that failed, even one whose only sets
    # claim i=0, is cv=fail (RFC 8617 section 4.4).
    cv = "none" if chain.result == "none" else ("pass" if chain.result == "pass" else "fail")
    fields, offset = split_message(raw)
    stamp = "" if now is None else f" t={int(now)};"
    verdicts = ";\r\n\t".join(p.strip() for p in results.split(";") if p.strip()) or "none"
    aar = f"ARC-Authentication-Results: i={instance}; {authserv_id};\r\n\t{verdicts}\r\n"
    present = [f.name.strip().lower().decode("ascii", "replace") for f in fields]
    include: list[str] = []
    for name in SIGNED_HEADERS:
        include += [name] * (present.count(name) + (name in OVERSIGNED))
    bh = base64.b64encode(BodyHashes(raw, offset).get("relaxed")).decode("ascii")
    private = load_private(key.private)
    ams_head = (
        f"ARC-Message-Signature: i={instance}; a={key.algorithm}; c=relaxed/relaxed;\r\n"
        f"\td={key.domain}; s={key.selector};{stamp}\r\n"
        f"\th={':'.join(include)};\r\n"
        f"\tbh={bh};\r\n"
        "\tb=\r\n"
    ).encode("ascii")
    ams_field = HeaderField(b"ARC-Message-Signature", ams_head)
    data = header_hash_input(select_headers(fields, include), ams_field, "relaxed")
    ams = _with_b(ams_head, sign_data(data, key.algorithm, private))
    as_head = (
        f"ARC-Seal: i={instance}; a={key.algorithm}; cv={cv};\r\n"
        f"\td={key.domain}; s={key.selector};{stamp}\r\n"
        "\tb=\r\n"
    ).encode("ascii")
    existing = _sets(fields)
    sets = dict(existing) if isinstance(existing, dict) else {}
    sets[instance] = {
        _AAR: [HeaderField(b"ARC-Authentication-Results", aar.encode("utf-8"))],
        _AMS: [HeaderField(b"ARC-Message-Signature", ams)],
        _AS: [HeaderField(b"ARC-Seal", as_head)],
    }
    if cv == "fail":  # a broken chain is sealed over this set alone (RFC 8617 section 5.1.2)
        sets = {i: s for i, s in sets.items() if i == instance}
        sealed = _seal_input_fail(sets[instance], as_head)
    else:
        sealed = _seal_input(sets, instance, HeaderField(b"ARC-Seal", as_head))
    seal_field = _with_b(as_head, sign_data(sealed, key.algorithm, private))
    return seal_field + ams + aar.encode("utf-8")


def _seal_input_fail(own: dict[bytes, list[HeaderField]], as_head: bytes) -> bytes:
    parts = [canonical_header(own[_AAR][0], "relaxed"), canonical_header(own[_AMS][0], "relaxed")]
    tail = canonical_header(HeaderField(b"ARC-Seal", strip_b_value(as_head)), "relaxed")
    return b"".join(parts) + tail[:-2]


def _with_b(head: bytes, signature: bytes) -> bytes:
    value = base64.b64encode(signature)
    folded = b"\r\n\t ".join(value[i : i + 72] for i in range(0, len(value), 72))
    return head[:-2] + folded + b"\r\n"


def resinfo(chain: ARCResult) -> str:
    """The ``arc=`` result for an Authentication-Results field (RFC 8617 section 10.2)."""
    if chain.result == "none":
        return "arc=none"
    who = f" (i={chain.instance}{' d=' + chain.sealer if chain.sealer else ''})"
    if chain.result == "pass":
        return f"arc=pass{who}"
    reason = chain.reason.replace('"', "'").replace("\\", "/")
    reason = "".join(c if " " <= c < "\x7f" else "?" for c in reason)[:160]
    return f'arc=fail{who} reason="{reason}"'
