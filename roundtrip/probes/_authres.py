"""The receiving server's verdicts, read from the Authentication-Results field (RFC 8601) of
the delivered copy (docs/auth-checks.md, section 1).

Only one field counts: the topmost whose authserv-id is the receiving host (the ``by`` of the
topmost Received field), else one of the same organizational domain, else the topmost field
(RFC 8601 section 5: fields from elsewhere may be forged; the finding says which rule picked
it). ``authres`` parses it; the comments it drops (where verifiers write the DMARC policy
applied) are read here.
"""

from __future__ import annotations

import re
from typing import Any

import authres  # type: ignore[import-untyped]

from ._authdns import MAX_EVIDENCE_CHARS, is_name, organizational
from ._net import INFO, WARN, Finding

#: Results an Authentication-Results method reports that deserve a warning (RFC 8601 2.7).
_BAD_RESULTS = frozenset({"fail", "softfail", "permerror", "temperror", "hardfail"})


def _split_head(raw: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = raw.find(sep)
        if idx >= 0:
            return raw[:idx]
    return raw


def header_fields(raw: bytes, name: str) -> list[str]:
    """The values of every ``name`` field in the head, unfolded, top to bottom."""
    text = _split_head(raw).decode("utf-8", "replace")
    fields: list[str] = []
    current: str | None = None
    for line in re.split(r"\r?\n", text):
        if line[:1] in (" ", "\t") and current is not None:
            current += " " + line.strip()
            continue
        if current is not None:
            fields.append(current)
        key, sep, value = line.partition(":")
        current = value.strip() if sep and key.strip().lower() == name.lower() else None
    if current is not None:
        fields.append(current)
    return fields


#: The authserv-id put in front of a field that has none (Microsoft 365 writes such fields,
#: against RFC 8601 section 2.2), so that its results can still be read.
NO_AUTHSERV_ID = "(no authserv-id)"


def _parse_field(value: str) -> Any:
    """``authres``'s reading of one field, or the name of the error when it has none."""
    try:
        return authres.AuthenticationResultsHeader.parse_value(value)
    except (authres.AuthResError, ValueError, IndexError) as exc:
        error = type(exc).__name__
    if not re.match(r"\s*[A-Za-z][\w.-]*\s*=", value):
        return error
    try:
        header = authres.AuthenticationResultsHeader.parse_value("missing; " + value)
    except (authres.AuthResError, ValueError, IndexError):
        return error
    header.authserv_id = NO_AUTHSERV_ID
    return header


def _segments(value: str) -> list[str]:
    """``value`` split at the semicolons outside comments and quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted = 0, False
    for char in value:
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == ";" and not depth:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _comments(value: str) -> dict[str, list[str]]:
    """The comment right after each ``method=result`` of a field, per method, in order
    (``authres`` drops comments; OpenDMARC, Rspamd and Gmail put the policy applied in one)."""
    found: dict[str, list[str]] = {}
    for segment in _segments(value):
        match = re.match(r"\s*([A-Za-z][\w-]*)\s*=\s*[A-Za-z]+\s*(\(([^()]*)\))?", segment)
        if match:
            found.setdefault(match.group(1).lower(), []).append(
                " ".join((match.group(3) or "").split())
            )
    return found


def auth_results(raw: bytes, receiver: str) -> list[Finding]:
    """Findings for the receiving server's Authentication-Results in ``raw``.

    Args:
        raw: the delivered copy, as fetched.
        receiver: the receiving host (the ``by`` of the topmost Received field); empty or an
            address literal when unknown.

    Returns:
        An ``auth-results`` summary, then one finding per spf, dkim (each signature), dmarc and
        arc result (``warn`` for fail, softfail, permerror and temperror, with the field as
        evidence); ``auth-results-missing`` when no field was added.
    """
    parsed: list[tuple[str, Any]] = []
    unreadable: list[str] = []
    for value in header_fields(raw, "Authentication-Results"):
        header = _parse_field(value)
        if isinstance(header, str):
            unreadable.append(f"{value[:MAX_EVIDENCE_CHARS]} ({header})")
        else:
            parsed.append((value, header))
    findings = [
        Finding(
            "auth-results-unreadable",
            WARN,
            "an Authentication-Results field does not parse (RFC 8601 section 2.2)",
            receiver,
            (line,),
        )
        for line in unreadable
    ]
    if not parsed:
        findings.append(
            Finding(
                "auth-results-missing",
                INFO,
                f"the receiving server ({receiver or 'unknown'}) added no Authentication-Results"
                " field: its SPF, DKIM and DMARC verdicts are not known",
                receiver,
            )
        )
        return findings
    known = is_name(receiver)
    host = receiver.lower().rstrip(".")
    chosen, how = parsed[0], "the topmost field (receiving host unknown)"
    if known:
        exact = [p for p in parsed if str(p[1].authserv_id).lower().rstrip(".") == host]
        if exact:
            chosen, how = exact[0], f"the field of the receiving host {receiver}"
        else:
            org = organizational(host)
            same_org = [
                p
                for p in parsed
                if is_name(str(p[1].authserv_id)) and organizational(str(p[1].authserv_id)) == org
            ]
            if same_org:
                chosen, how = same_org[0], f"the field of the receiving organization {org}"
            else:
                how = f"the topmost field: none names the receiving host {receiver}"
    value, header = chosen
    evidence = (f"Authentication-Results: {value}"[:MAX_EVIDENCE_CHARS],)
    authserv = str(header.authserv_id)
    results = [
        r for r in header.results if str(r.method).lower() in ("spf", "dkim", "dmarc", "arc")
    ]
    summary = ", ".join(f"{r.method}={r.result}" for r in header.results) or "no results"
    findings.append(
        Finding(
            "auth-results",
            INFO,
            f"Authentication-Results by {authserv} ({how}): {summary}",
            authserv,
            evidence,
        )
    )
    comments = _comments(value)
    for result in results:
        method, verdict = str(result.method).lower(), str(result.result).lower()
        details = [f"{p.type}.{p.name}={p.value}" for p in result.properties]
        if result.reason:
            details.insert(0, f"reason {result.reason!r}")
        comment = comments.get(method, [])
        if comment and comment[0]:
            details.insert(0, f"comment {comment[0]!r}")
        del comment[:1]
        text = f"{authserv}: {method}={verdict}" + (f" ({', '.join(details)})" if details else "")
        findings.append(
            Finding(
                f"auth-{method}",
                WARN if verdict in _BAD_RESULTS else INFO,
                text,
                authserv,
                evidence,
            )
        )
    return findings
