"""Section extraction over a parsed ``_mime.Part`` tree: BODY[section] bytes and SEARCH text.

Theory of operation
-------------------
Part numbers and HEADER/TEXT/MIME/HEADER.FIELDS[.NOT] follow RFC 3501 6.4.5: a non-multipart
message has only part 1 (its body); the parts of a ``message/rfc822`` part are those of the
encapsulated message, and HEADER/TEXT of such a part apply to the encapsulated message. Every
section is a byte-exact slice of the stored message (docs/security.md A5.2); only
HEADER.FIELDS[.NOT] assembles its answer, from whole field lines.

SEARCH BODY reads :func:`body_text`: text/* leaves transfer-decoded (RFC 2045 6) and
charset-decoded, plus the (RFC 2047-decoded) header of every encapsulated message. A broken
base64 or quoted-printable body is searched as it is stored: hostile input, not a bug.
"""

from __future__ import annotations

import binascii

from ._mimepart import Part
from ._mimetext import as_text, b64decode, decode_charset, decode_words

__all__ = ["body_text", "extract"]


def _resolve(root: Part, part: tuple[int, ...]) -> Part | None:
    node = root
    for level, number in enumerate(part):
        if node.children:
            subparts = node.children
        elif level == 0:  # a non-multipart message has a part 1: its body
            subparts = [node]
        elif node.message is not None:
            inner = node.message
            subparts = inner.children or [inner]
        else:  # a leaf body part has no subparts
            return None
        if not 1 <= number <= len(subparts):
            return None
        node = subparts[number - 1]
    return node


def _header_fields(raw: bytes, node: Part, names: tuple[str, ...], keep: bool) -> bytes:
    wanted = {name.lower() for name in names}
    out: list[bytes] = []
    for fname, _, start, end in node.fields:
        if (fname in wanted) == keep:
            chunk = raw[start:end]
            out.append(chunk if chunk.endswith(b"\n") else chunk + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def extract(
    raw: bytes, root: Part, part: tuple[int, ...], text: str | None, fields: tuple[str, ...]
) -> bytes:
    """The bytes of ``BODY[<part>.<text>]``; ``b""`` when the part or section does not exist."""
    node = _resolve(root, part)
    spec = text.upper() if text else None
    if node is None:
        return b""
    if spec is None:
        return raw if not part else raw[node.body_start : node.end]
    if spec == "MIME":
        return raw[node.start : node.body_start] if part else b""
    message = node if not part else node.message
    if message is None:
        return b""
    if spec == "HEADER":
        return raw[message.start : message.body_start]
    if spec == "TEXT":
        return raw[message.body_start : message.end]
    if spec in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        return _header_fields(raw, message, fields, spec == "HEADER.FIELDS")
    return b""


def _transfer_decode(node: Part, data: bytes) -> bytes:
    encoding = node.header("content-transfer-encoding")
    kind = as_text(encoding).strip().lower() if encoding else ""
    try:
        if kind == "base64":
            return b64decode(data)
        if kind == "quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):  # undecodable body: searched as stored
        return data
    return data


def body_text(raw: bytes, root: Part) -> str:
    """Decoded text of the body of ``root`` for SEARCH BODY (see the module docstring)."""
    pieces: list[str] = []
    # (entity, whether it is an encapsulated message whose header is body content)
    work: list[tuple[Part, bool]] = [(root, False)]
    while work:
        node, encapsulated = work.pop()
        if encapsulated:
            pieces.extend(
                f"{fname}: {decode_words(as_text(value))}" for fname, value, _, _ in node.fields
            )
        if node.children:
            work.extend((child, False) for child in reversed(node.children))
        elif node.message is not None:
            work.append((node.message, True))
        elif node.maintype == "text":
            data = _transfer_decode(node, raw[node.body_start : node.end])
            pieces.append(decode_charset(data, node.param("charset") or ""))
    return "\n".join(pieces)
