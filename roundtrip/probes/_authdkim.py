"""The delivered copy's DKIM signatures, verified by ``dkimpy`` (RFC 6376, RFC 8463) with the
keys looked up in the DNS the probe was given (docs/auth-checks.md, section 2).
"""

from __future__ import annotations

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


def verify_dkim(raw: bytes, lookup: Lookup | None) -> list[Finding]:
    """Verify every DKIM-Signature of ``raw`` with dkimpy: a ``dkim-verify`` info finding per
    signature that verifies, a ``dkim-verify-fail`` warning (with the reason and the
    signature as evidence) per one that does not; ``dkim-unsigned`` when there is none,
    ``dkim-verify-skipped`` when ``lookup`` is None."""
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
        notes = _Notes()
        try:
            verifier = dkim.DKIM(raw, logger=notes)
            ok = bool(verifier.verify(idx=index, dnsfunc=lookup.dkim_key))
            reason = "; ".join(notes.errors) or "the signature does not match"
        except dkim.DKIMException as exc:
            ok, reason = False, str(exc)
        if ok:
            findings.append(
                Finding(
                    "dkim-verify",
                    INFO,
                    f"DKIM signature {label} of the delivered copy verifies (key via {lookup})",
                    tags.get("d", ""),
                )
            )
        else:
            findings.append(
                Finding(
                    "dkim-verify-fail",
                    WARN,
                    f"DKIM signature {label} of the delivered copy does not verify: {reason}",
                    tags.get("d", ""),
                    (f"DKIM-Signature: {signature}"[:MAX_EVIDENCE_CHARS],),
                )
            )
    return findings
