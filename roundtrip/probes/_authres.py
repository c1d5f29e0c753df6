"""The receiving server's verdicts, read from the Authentication-Results fields (RFC 8601) of
the delivered copy (docs/auth-checks.md, section 1).

One authserv-id counts: that of the topmost field whose authserv-id is the receiving host
(the ``by`` of the topmost Received field), else of one of the same organizational domain,
else of the topmost field (RFC 8601 section 5: fields from elsewhere may be forged; the
finding says which rule picked it). The results of that field and of the fields with the
same authserv-id right below it are read together: filters on one host often write a field
each (OpenDKIM, then OpenDMARC for ``spf=`` and again for ``dmarc=``). A field of another
authserv-id, or a Received field of another host, ends that block: a field with the
receiver's authserv-id below it came with the message, and a receiver that follows RFC 8601
section 5 would have removed it. ``authres`` parses each field; the comments it drops (where
verifiers write the DMARC policy applied) are read here.
"""

from __future__ import annotations

import re
from typing import Any

import authres  # type: ignore[import-untyped]

from .._headerblock import header_bounds
from ._authdns import MAX_EVIDENCE_CHARS, is_name, organizational
from ._net import INFO, WARN, Finding

#: Results an Authentication-Results method reports that deserve a warning (RFC 8601 2.7).
_BAD_RESULTS = frozenset({"fail", "softfail", "permerror", "temperror", "hardfail"})

#: The methods reported one finding per result.
_METHODS = ("spf", "dkim", "dmarc", "arc")


def _split_head(raw: bytes) -> bytes:
    """The header block of a raw message (roundtrip/_headerblock.py)."""
    return raw[: header_bounds(raw)[0]]


def _head(raw: bytes) -> list[tuple[str, str]]:
    """Every field of the head as (lower-case name, unfolded value), top to bottom."""
    text = _split_head(raw).decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n", text):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.append((key.strip().lower(), value.strip()))
    return fields


def header_fields(raw: bytes, name: str) -> list[str]:
    """The values of every ``name`` field in the head, unfolded, top to bottom."""
    return [value for key, value in _head(raw) if key == name.lower()]


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


def _scan(value: str) -> tuple[list[str], list[str]]:
    """``value`` split at the semicolons outside comments and quoted strings (RFC 5322
    section 3.2), each part as (its text without comments, its top-level comments)."""
    bare: list[str] = []
    comments: list[list[str]] = [[]]
    text: list[str] = []
    comment: list[str] = []
    depth, quoted, escaped = 0, False, False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif depth:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if not depth:
                    comments[-1].append("".join(comment))
                    comment = []
                    continue
        elif char == '"':
            quoted = True
        elif char == "(":
            depth = 1
            text.append(" ")
            continue
        elif char == ";":
            bare.append("".join(text))
            comments.append([])
            text = []
            continue
        (comment if depth else text).append(char)
    if depth and comment:  # an unclosed comment: keep what it says
        comments[-1].append("".join(comment))
    bare.append("".join(text))
    return bare, ["; ".join(t for t in (_tidy(c) for c in found) if t) for found in comments]


def _tidy(comment: str) -> str:
    """A comment's words; a quoted string that makes up the whole comment (Rspamd writes
    ``("body hash did not verify")``) without its quotes."""
    text = " ".join(comment.split())
    whole = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', text)
    return re.sub(r"\\(.)", r"\1", whole.group(1)) if whole else text


def _comments(value: str) -> dict[str, list[str]]:
    """The comments of each ``method=result`` of a field, per method, in order: every
    top-level comment of its part of the field, joined with "; " (``authres`` drops
    comments; OpenDMARC, Rspamd and Gmail put the policy applied in one, Rspamd after the
    properties when DMARC fails)."""
    found: dict[str, list[str]] = {}
    bare, comments = _scan(value)
    for text, comment in zip(bare, comments, strict=True):
        match = re.match(r"\s*([A-Za-z][\w-]*)\s*(?:/\s*\d+\s*)?=\s*[A-Za-z]+", text)
        if match:
            found.setdefault(match.group(1).lower(), []).append(comment)
    return found


def _same_id(header: Any, authserv: str) -> bool:
    """Whether a parsed field's authserv-id is ``authserv`` (case and a final dot aside)."""
    return str(header.authserv_id).lower().rstrip(".") == authserv.lower().rstrip(".")


def _received_by(value: str) -> str:
    """The ``by`` host of a Received field (RFC 5321 section 4.4), comments left out."""
    bare = " ".join(_scan(value)[0])
    match = re.search(r"(?i)\bby\s+([^\s;]+)", bare)
    return match.group(1).strip("[]").lower().rstrip(".") if match else ""


def _ours(by: str, authserv: str) -> bool:
    """Whether a Received field's ``by`` host is the authserv-id's host or organization."""
    host = authserv.lower().rstrip(".")
    if by == host:
        return True
    return is_name(by) and is_name(host) and organizational(by) == organizational(host)


def _block(
    fields: list[tuple[str, str, Any]], start: int, authserv: str
) -> tuple[list[tuple[str, Any]], str]:
    """The field at ``start`` and the fields with its authserv-id right below it.

    Args:
        fields: the head's Authentication-Results and Received fields, top to bottom, as
            (name, value, ``authres`` reading or ``None``).
        start: the index of the picked field.
        authserv: its authserv-id.

    Returns:
        The fields read, as (value, reading), and a note on the fields with the same
        authserv-id below the block that were left out ("" when none).
    """
    block = [(fields[start][1], fields[start][2])]
    if authserv == NO_AUTHSERV_ID:
        # Such a field names no host: Microsoft 365 copies can carry the sending side's too.
        return block, ""
    ended, left_out = "", 0
    for name, value, header in fields[start + 1 :]:
        if name == "received":
            if not ended and not _ours(_received_by(value), authserv):
                ended = "a Received field of another host"
        elif header is None:
            continue
        elif not _same_id(header, authserv):
            ended = ended or f"a field of {header.authserv_id}"
        elif ended:
            left_out += 1
        else:
            block.append((value, header))
    note = ""
    if left_out:
        plural = "field" if left_out == 1 else "fields"
        note = (
            f"; {left_out} {plural} of {authserv} below {ended} not read: they came with the"
            " message (RFC 8601 section 5)"
        )
    return block, note


def auth_results(raw: bytes, receiver: str) -> list[Finding]:
    """Findings for the receiving server's Authentication-Results in ``raw``.

    Args:
        raw: the delivered copy, as fetched.
        receiver: the receiving host (the ``by`` of the topmost Received field); empty or an
            address literal when unknown.

    Returns:
        An ``auth-results`` summary of the fields read (every one as evidence), then one
        finding per spf, dkim (each signature), dmarc and arc result of those fields (``warn``
        for fail, softfail, permerror and temperror, with its field as evidence);
        ``auth-results-missing`` when no field was added.
    """
    fields: list[tuple[str, str, Any]] = []
    unreadable: list[str] = []
    for name, value in _head(raw):
        if name == "received":
            fields.append((name, value, None))
        elif name == "authentication-results":
            header = _parse_field(value)
            if isinstance(header, str):
                unreadable.append(f"{value[:MAX_EVIDENCE_CHARS]} ({header})")
            else:
                fields.append((name, value, header))
    parsed = [i for i, (name, _, _) in enumerate(fields) if name == "authentication-results"]
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
    host = receiver.lower().rstrip(".")
    chosen, how = parsed[0], "the topmost field (receiving host unknown)"
    if is_name(receiver):
        ids = {i: str(fields[i][2].authserv_id) for i in parsed}
        exact = [i for i in parsed if ids[i].lower().rstrip(".") == host]
        org = organizational(host)
        same_org = [i for i in parsed if is_name(ids[i]) and organizational(ids[i]) == org]
        if exact:
            chosen, how = exact[0], f"the field of the receiving host {receiver}"
        elif same_org:
            chosen, how = same_org[0], f"the field of the receiving organization {org}"
        else:
            how = f"the topmost field: none names the receiving host {receiver}"
    authserv = str(fields[chosen][2].authserv_id)
    block, note = _block(fields, chosen, authserv)
    if len(block) > 1:
        how += f" and the {len(block) - 1} below it with that authserv-id"
    evidence = tuple(f"Authentication-Results: {value}"[:MAX_EVIDENCE_CHARS] for value, _ in block)
    summary = (
        ", ".join(f"{r.method}={r.result}" for _, header in block for r in header.results)
        or "no results"
    )
    findings.append(
        Finding(
            "auth-results",
            INFO,
            f"Authentication-Results by {authserv} ({how}): {summary}{note}",
            authserv,
            evidence,
        )
    )
    for value, header in block:
        comments = _comments(value)
        for result in header.results:
            method, verdict = str(result.method).lower(), str(result.result).lower()
            comment = comments.get(method, [])
            said = comment.pop(0) if comment else ""
            if method not in _METHODS:
                continue
            details = [f"{p.type}.{p.name}={p.value}" for p in result.properties]
            if result.reason:
                details.insert(0, f"reason {result.reason!r}")
            if said:
                details.insert(0, f"comment {said!r}")
            text = f"{authserv}: {method}={verdict}" + (
                f" ({', '.join(details)})" if details else ""
            )
            findings.append(
                Finding(
                    f"auth-{method}",
                    WARN if verdict in _BAD_RESULTS else INFO,
                    text,
                    authserv,
                    (f"Authentication-Results: {value}"[:MAX_EVIDENCE_CHARS],),
                )
            )
    return findings
