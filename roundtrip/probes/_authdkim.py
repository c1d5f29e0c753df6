"""The delivered copy's DKIM signatures, verified by ``dkimpy`` (RFC 6376, RFC 8463) with the
keys looked up in the DNS the probe was given (docs/auth-checks.md, section 2).

RFC 8301 is applied here, not left to ``dkimpy`` (which still verifies rsa-sha1): an rsa-sha1
signature (section 3.1) and an RSA key shorter than 1024 bits (section 3.2) make the
signature a permerror, never a pass. The key record's flags are read too (RFC 6376 section
3.6.1): a key in testing mode (``t=y``) makes a verified signature count as unsigned mail, and
an empty ``p=`` is a revoked key.
"""

from __future__ import annotations

from dataclasses import dataclass

import dkim  # type: ignore[import-untyped]

from ._authdns import MAX_EVIDENCE_CHARS, Lookup
from ._authres import header_fields
from ._net import INFO, WARN, Finding


class _Notes:
    """A logger for dkimpy that keeps its error lines (why a verification returned False)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, msg: object, *args: object) -> None:
        self.errors.append(str(msg) % args if args else str(msg))

    def debug(self, *args: object) -> None:
        pass

    info = warning = debug


def _tags(signature: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in signature.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), "".join(value.split()))
    return tags


#: RFC 8301 section 3.2: verifiers must not consider a signature with a shorter RSA key valid.
MIN_RSA_BITS = 1024

#: RFC 8301 section 3.2: the RSA key size signers should use at least.
RECOMMENDED_RSA_BITS = 2048


@dataclass(frozen=True)
class Verdict:
    """One signature's result (RFC 8601 section 2.7.1: ``pass``, ``fail``, ``permerror``),
    why, the RSA key size seen (0 when none was loaded or the key is not RSA), and whether
    the key record says the domain is testing DKIM (``t=y``, RFC 6376 section 3.6.1)."""

    result: str
    reason: str = ""
    rsa_bits: int = 0
    testing: bool = False


def verify_signature(raw: bytes, index: int, tags: dict[str, str], lookup: Lookup) -> Verdict:
    """Verify the ``index``-th DKIM-Signature of ``raw`` (its ``tags``) with RFC 8301 applied."""
    if tags.get("a", "").lower() == "rsa-sha1":
        return Verdict(
            "permerror",
            "rsa-sha1 is historic and verifiers must not consider it valid (RFC 8301 section "
            "3.1); the signature was not verified",
        )
    notes = _Notes()
    key_records: list[bytes] = []

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        record = lookup.dkim_key(name, timeout)
        if record is not None:
            key_records.append(record)
        return record

    # minkey=0: the key size is judged below, also for a signature that does not verify.
    verifier = dkim.DKIM(raw, logger=notes, minkey=0)
    try:
        ok = bool(verifier.verify(idx=index, dnsfunc=dnsfunc))
        reason = "; ".join(notes.errors) or "the signature does not match"
    except dkim.DKIMException as exc:
        ok, reason = False, str(exc)
    key = _tags(key_records[-1].decode("ascii", "replace")) if key_records else {}
    # RFC 6376 section 3.6.1: t= is a colon-separated list of flags; "y" is testing mode.
    testing = "y" in (flag.lower() for flag in key.get("t", "").split(":"))
    if not ok and key.get("p") == "":
        reason = (
            f"the key at {tags.get('s', '?')}._domainkey.{tags.get('d', '?')} is revoked "
            "(empty p=, RFC 6376 section 3.6.1)"
        )
    bits = int(getattr(verifier, "keysize", 0) or 0)
    if getattr(verifier, "ktag", b"") != b"rsa":
        bits = 0
    if 0 < bits < MIN_RSA_BITS:
        return Verdict(
            "permerror",
            f"the RSA key has {bits} bits, fewer than {MIN_RSA_BITS}: verifiers must not "
            "consider the signature valid (RFC 8301 section 3.2)"
            + ("" if ok else f"; it does not verify either: {reason}"),
            bits,
            testing,
        )
    return Verdict("pass", "", bits, testing) if ok else Verdict("fail", reason, bits, testing)


def verify_dkim(raw: bytes, lookup: Lookup | None) -> list[Finding]:
    """Verify every DKIM-Signature of ``raw``: a ``dkim-verify`` info finding per signature
    that verifies, a ``dkim-verify-fail`` warning per one that does not, a
    ``dkim-verify-permerror`` warning per one RFC 8301 forbids to pass (rsa-sha1, an RSA key
    under 1024 bits); each failure with the reason and the signature as evidence.
    ``dkim-unsigned`` when there is none, ``dkim-verify-skipped`` when ``lookup`` is None."""
    signatures = header_fields(raw, "DKIM-Signature")
    if not signatures:
        return [Finding("dkim-unsigned", INFO, "the delivered copy carries no DKIM signature")]
    if lookup is None:
        return [
            Finding(
                "dkim-verify-skipped",
                INFO,
                f"{len(signatures)} DKIM signature(s) not verified: a loopback target's "
                "domains are not looked up in the public DNS (give --dns HOST:PORT)",
            )
        ]
    findings: list[Finding] = []
    for index, signature in enumerate(signatures):
        tags = _tags(signature)
        label = f"d={tags.get('d', '?')} s={tags.get('s', '?')} ({tags.get('a', '?')})"
        verdict = verify_signature(raw, index, tags, lookup)
        evidence = (f"DKIM-Signature: {signature}"[:MAX_EVIDENCE_CHARS],)
        testing = (
            "; its key is in testing mode (t=y): verifiers must treat the message like unsigned "
            "mail (RFC 6376 section 3.6.1)"
            if verdict.testing
            else ""
        )
        if verdict.result == "pass":
            short = 0 < verdict.rsa_bits < RECOMMENDED_RSA_BITS
            findings.append(
                Finding(
                    "dkim-testing" if verdict.testing else "dkim-verify",
                    WARN if verdict.testing else INFO,
                    f"DKIM signature {label} of the delivered copy verifies (key via {lookup})"
                    + (
                        f"; its RSA key has {verdict.rsa_bits} bits, signers should use "
                        f"{RECOMMENDED_RSA_BITS} (RFC 8301 section 3.2)"
                        if short
                        else ""
                    )
                    + testing,
                    tags.get("d", ""),
                    evidence if verdict.testing else (),
                )
            )
        elif verdict.result == "permerror":
            findings.append(
                Finding(
                    "dkim-verify-permerror",
                    WARN,
                    f"DKIM signature {label} of the delivered copy is a permerror, not a "
                    f"pass: {verdict.reason}{testing}",
                    tags.get("d", ""),
                    evidence,
                )
            )
        else:
            findings.append(
                Finding(
                    "dkim-verify-fail",
                    WARN,
                    f"DKIM signature {label} of the delivered copy does not verify: "
                    f"{verdict.reason}{testing}",
                    tags.get("d", ""),
                    evidence,
                )
            )
    return findings
