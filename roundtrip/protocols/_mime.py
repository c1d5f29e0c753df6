"""MIME analysis for the IMAP server: ENVELOPE, BODYSTRUCTURE, BODY[section], SEARCH helpers.

Theory of operation
-------------------
The IMAP machine (``protocols/imap.py``) answers FETCH and SEARCH over stored raw messages. This
module turns the raw bytes into a small tree of byte offsets (:class:`Part`) exactly once, and
every other function reads that tree plus the raw bytes: nothing is ever re-serialised, so
``BODY[]`` and every section are byte-exact slices of what was stored (docs/security.md A5.2).

- Header block (RFC 5322 2.1, 2.2.3): the header ends at the first empty line (CRLF or bare LF).
  A line that is neither a field (``name:``) nor a continuation also ends it, the way CPython's
  ``email`` parser does (no blank line at all then precedes the body). Fields are unfolded by
  deleting the line breaks; their values stay raw bytes.
- Content-Type and Content-Disposition parameters (RFC 2045 5.1, RFC 2183) with RFC 2231
  continuations and charset/percent encodings. A missing or unusable Content-Type means
  ``text/plain; charset=us-ascii``, or ``message/rfc822`` inside ``multipart/digest``
  (RFC 2046 5.1.5).
- Multipart bodies (RFC 2046 5.1.1): parts are the bytes between delimiter lines
  (``--boundary`` plus optional whitespace, alone on a line); the line break before a delimiter
  belongs to the delimiter; preamble and epilogue are ignored; a missing close delimiter ends the
  last part at the end of the enclosing entity. A multipart without a boundary parameter or
  without any delimiter line degrades to a ``text/plain`` leaf over the whole body.
- ``message/rfc822`` bodies are parsed as encapsulated messages.
- Part numbers, HEADER/TEXT/MIME/HEADER.FIELDS[.NOT] follow RFC 3501 6.4.5: a non-multipart
  message has only part 1 (its body); the parts of a ``message/rfc822`` part are those of the
  encapsulated message, and HEADER/TEXT of such a part apply to the encapsulated message.

BODYSTRUCTURE conventions (RFC 3501 leaves them open): media types, parameter names, encodings
and disposition types are upper case, parameter values verbatim; an entity without Content-Type
reports ``("CHARSET" "US-ASCII")``; a non-ASCII RFC 2231 value is sent re-encoded as
``("NAME*" "utf-8''%E2%82%AC")`` so the response stays 7-bit (as Dovecot does); line counts count
a final unterminated line; Content-MD5 is reported verbatim (never verified).

Hostile input (docs/security.md A5.5, A5.6): the parser is iterative, with an explicit work
list; nesting is capped at :data:`MAX_DEPTH` and the number of entities at :data:`MAX_PARTS`,
past which containers are reported as ``application/octet-stream`` leaves. Every scan is linear
(``bytes.find`` for boundaries), ``bytes.decode`` refuses non-text codecs (no ``zlib`` charset
bombs), and every public function is total: it returns a valid answer for any bytes and never
raises. CPython's ``email`` parser is not used on whole messages because it recurses.

Totality is not silence. Input we expect to be bad (an absurd nesting depth, an unknown charset,
broken base64, an unparseable Date) gets its documented answer and nothing else. An exception
that escapes the code below is a bug of ours: each public function passes it to its
``on_error`` callback (the IMAP machine's error channel, which the stack turns into a failing
test) before it answers with its fallback, so a wrong FETCH or SEARCH answer never goes unseen.

Where each part lives: this module parses (:func:`parse`, the header block, multipart
boundaries) and holds the public, total functions; ``_mimepart`` the :class:`Part` tree;
``_mimetext`` header values (parameters, RFC 2231, RFC 2047, charsets); ``_mimerender`` ENVELOPE
and BODYSTRUCTURE; ``_mimesection`` BODY[section] bytes and the text SEARCH reads.

Deliberately unsupported: ``BINARY[]`` / decoded sections (RFC 3516), ``message/global``
encapsulation (RFC 6532; reported as a leaf), partial fetches (the caller slices), and group
syntax inside Sender/Reply-To defaults beyond copying From.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

from ._mimepart import Field, Part
from ._mimerender import line_count, quote, render_body, render_envelope
from ._mimesection import body_text, extract
from ._mimetext import as_text, decode_words, parse_content_type

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "OnError",
    "Part",
    "bodystructure",
    "envelope",
    "header_date",
    "header_values",
    "parse",
    "quote",
    "search_text",
    "section",
]

#: Deepest nesting of multiparts / encapsulated messages that is parsed (docs/security.md A5.5;
#: Dovecot CVE-2020-12100). Containers below it are reported as application/octet-stream leaves.
MAX_DEPTH = 64

#: Most entities parsed in one message (Dovecot's limit after CVE-2020-12100 is 10000 too).
#: Past it, the last part of a multipart runs to the end of its parent and further containers
#: are reported as application/octet-stream leaves.
MAX_PARTS = 10_000

#: A header field line: RFC 5322 3.6.8 field-name (printable US-ASCII but ":"), with the
#: obsolete whitespace before the colon (RFC 5322 4.5).
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")

_WSP = b" \t"

#: Where a public function reports an exception of ours before it answers with its fallback.
OnError = Callable[[BaseException], None] | None

#: parsedate_to_datetime refuses bad dates with ValueError; OverflowError, TypeError and
#: IndexError have escaped it on odd input in some CPython versions. All mean "no usable date".
_DATE_ERRORS = (ValueError, OverflowError, TypeError, IndexError)


# --------------------------------------------------------------------------- parsing


def parse(raw: bytes, *, on_error: OnError = None) -> Part:
    """Parse ``raw`` once into a :class:`Part` tree (iterative, depth-capped, never raises).

    Args:
        raw: the message exactly as stored.
        on_error: called with an exception of ours before a one-part text/plain tree over the
            whole message is returned.

    Returns:
        The root entity; pass it as ``tree=`` to the other functions to avoid re-parsing.
    """
    try:
        return _parse(bytes(raw))
    except Exception as exc:  # totality edge: a parser bug must not take the IMAP session down
        _bug(on_error, exc)
        return Part(0, 0, len(raw), 0, params=[("charset", "US-ASCII")])


def _parse(raw: bytes) -> Part:
    root = Part(0, 0, len(raw), 0)
    # Work list of (entity, inside multipart/digest); children are appended as they are found.
    work: list[tuple[Part, bool]] = [(root, False)]
    budget = MAX_PARTS - 1
    while work:
        node, in_digest = work.pop()
        budget -= _parse_entity(raw, node, in_digest, budget)
        for child in node.children:
            work.append((child, node.subtype == "digest"))
        if node.message is not None:
            work.append((node.message, False))
    return root


def _parse_entity(raw: bytes, node: Part, in_digest: bool, budget: int) -> int:
    """Fill in ``node``; create (unparsed) children within ``budget``; return how many."""
    node.fields, node.body_start = _parse_header(raw, node.start, node.end)
    ctype = node.header("content-type")
    parsed = parse_content_type(ctype) if ctype is not None else None
    if parsed is None:
        if in_digest:
            node.maintype, node.subtype, node.params = "message", "rfc822", []
        else:
            node.maintype, node.subtype = "text", "plain"
            node.params = [("charset", "US-ASCII")]
    else:
        node.maintype, node.subtype, node.params = parsed
    container = node.maintype == "multipart" or node.content_type == "message/rfc822"
    if container and (node.depth >= MAX_DEPTH or budget <= 0):
        node.maintype, node.subtype = "application", "octet-stream"
        return 0
    if node.maintype == "multipart":
        boundary = node.param("boundary")
        spans = (
            _split_multipart(raw, node.body_start, node.end, boundary, budget) if boundary else []
        )
        if not spans:
            node.maintype, node.subtype = "text", "plain"
            node.params = [("charset", "US-ASCII")]
            return 0
        node.children = [Part(s, s, e, node.depth + 1) for s, e in spans]
        return len(spans)
    if node.content_type == "message/rfc822":
        node.message = Part(node.body_start, node.body_start, node.end, node.depth + 1)
        return 1
    return 0


def _parse_header(raw: bytes, start: int, end: int) -> tuple[list[Field], int]:
    """Split the header block of ``raw[start:end]``; return its fields and the body offset."""
    fields: list[Field] = []
    name = ""
    field_start = value_start = -1
    pos = start
    body_start = end

    def finish(field_end: int) -> None:
        if field_start >= 0:
            value = raw[value_start:field_end].replace(b"\r\n", b"").replace(b"\n", b"")
            fields.append((name, value.strip(_WSP + b"\r"), field_start, field_end))

    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        content_end = end if nl < 0 else nl
        if content_end > pos and raw[content_end - 1] == 0x0D:
            content_end -= 1
        if content_end == pos:  # the empty line
            finish(pos)
            field_start = -1
            body_start = line_end
            break
        if raw[pos] in _WSP:  # continuation (a leading one without a field is ignored)
            pos = line_end
            continue
        match = _FIELD_NAME.match(raw, pos, content_end)
        finish(pos)
        if match is None:  # not a header line: the body starts here (as CPython's parser)
            field_start = -1
            body_start = pos
            break
        name = match.group(1).decode("ascii").lower()
        field_start, value_start = pos, match.end()
        pos = line_end
    else:
        finish(end)
    return fields, body_start


def _split_multipart(
    raw: bytes, start: int, end: int, boundary: str, limit: int
) -> list[tuple[int, int]]:
    """Offsets of the body parts of a multipart body ``raw[start:end]`` (RFC 2046 5.1.1).

    At most ``limit`` parts: the last one then runs to ``end``.
    """
    try:
        delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return []
    spans: list[tuple[int, int]] = []
    part_start = -1
    pos = start
    while True:
        i = raw.find(delimiter, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i > start and raw[i - 1] != 0x0A:
            continue
        j = i + len(delimiter)
        closing = raw.startswith(b"--", j, end)
        if closing:
            j += 2
        while j < end and raw[j] in _WSP:
            j += 1
        if j < end and raw[j] == 0x0D:
            j += 1
        if j < end and raw[j] != 0x0A:
            continue  # not alone on its line
        if part_start >= 0:
            part_end = i
            if part_end > start and raw[part_end - 1] == 0x0A:
                part_end -= 1
                if part_end > start and raw[part_end - 1] == 0x0D:
                    part_end -= 1
            spans.append((part_start, max(part_start, part_end)))
        if closing:
            return spans
        part_start = min(j + 1, end)
        if len(spans) + 1 >= limit:
            break
        pos = part_start
    if part_start >= 0:
        spans.append((part_start, end))
    return spans


# --------------------------------------------------------------------------- public API


def _bug(on_error: OnError, exc: Exception) -> None:
    """Report an exception of ours (see the module docstring); the caller then falls back."""
    if on_error is not None:
        on_error(exc)


def _tree(raw: bytes, tree: Part | None, on_error: OnError) -> Part:
    return tree if tree is not None else parse(raw, on_error=on_error)


def envelope(raw: bytes, *, tree: Part | None = None, on_error: OnError = None) -> bytes:
    """The ENVELOPE of a message (RFC 3501 7.4.2), serialised.

    Args:
        raw: the stored message.
        tree: ``parse(raw)``, when the caller has cached it.
        on_error: called with an exception of ours before the all-NIL fallback is returned.

    Returns:
        ``(date subject from sender reply-to to cc bcc in-reply-to message-id)`` with header
        values in their raw (RFC 2047-encoded) form; Sender and Reply-To default to From.
    """
    try:
        return render_envelope(_tree(raw, tree, on_error))
    except Exception as exc:  # totality edge: reported, then a well-formed answer
        _bug(on_error, exc)
        return b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def bodystructure(
    raw: bytes, *, extended: bool = True, tree: Part | None = None, on_error: OnError = None
) -> bytes:
    """BODYSTRUCTURE (``extended=True``) or BODY (``extended=False``), RFC 3501 7.4.2.

    Args:
        raw: the stored message.
        extended: include the extension data (MD5, disposition, language, location).
        tree: ``parse(raw)``, when the caller has cached it.
        on_error: called with an exception of ours before a one-part text/plain structure over
            the whole message is returned.

    Returns:
        The serialised body structure; always syntactically valid.
    """
    try:
        return render_body(raw, _tree(raw, tree, on_error), extended)
    except Exception as exc:  # totality edge: reported, then a well-formed answer
        _bug(on_error, exc)
        fallback = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d' % (
            len(raw),
            line_count(raw, 0, len(raw)),
        )
        return fallback + (b" NIL NIL NIL NIL)" if extended else b")")


def section(
    raw: bytes,
    part: tuple[int, ...],
    text: str | None = None,
    fields: tuple[str, ...] = (),
    *,
    tree: Part | None = None,
    on_error: OnError = None,
) -> bytes:
    """The bytes of ``BODY[<part>.<text>]`` (RFC 3501 6.4.5).

    Args:
        raw: the stored message.
        part: the part number, ``()`` for the whole message.
        text: None, ``"HEADER"``, ``"HEADER.FIELDS"``, ``"HEADER.FIELDS.NOT"``, ``"TEXT"`` or
            ``"MIME"``.
        fields: the field names for HEADER.FIELDS[.NOT].
        tree: ``parse(raw)``, when the caller has cached it.
        on_error: called with an exception of ours before ``b""`` is returned.

    Returns:
        The section's bytes; ``b""`` when the part or the section does not exist.
    """
    try:
        return extract(raw, _tree(raw, tree, on_error), part, text, fields)
    except Exception as exc:  # totality edge: reported, then a well-formed answer
        _bug(on_error, exc)
        return b""


def header_values(
    raw: bytes, name: str, *, tree: Part | None = None, on_error: OnError = None
) -> list[str]:
    """All values of top-level header field ``name``, unfolded and RFC 2047-decoded.

    Args:
        raw: the stored message.
        name: the field name (any case).
        tree: ``parse(raw)``, when the caller has cached it.
        on_error: called with an exception of ours before ``[]`` is returned.
    """
    try:
        wanted = name.lower()
        return [
            decode_words(as_text(value))
            for fname, value, _, _ in _tree(raw, tree, on_error).fields
            if fname == wanted
        ]
    except Exception as exc:  # totality edge: reported, then a well-formed answer
        _bug(on_error, exc)
        return []


def search_text(raw: bytes, *, tree: Part | None = None, on_error: OnError = None) -> str:
    """Decoded text of the body for SEARCH BODY (SEARCH TEXT is the headers plus this).

    The text/* leaves are transfer-decoded and charset-decoded; the headers of encapsulated
    messages are included (RFC 2047-decoded) since they are body content of the outer message.
    Other leaves (attachments) are skipped.

    Args:
        raw: the stored message.
        tree: ``parse(raw)``, when the caller has cached it.
        on_error: called with an exception of ours before ``""`` is returned.
    """
    try:
        return body_text(raw, _tree(raw, tree, on_error))
    except Exception as exc:  # totality edge: reported, then a well-formed answer
        _bug(on_error, exc)
        return ""


def header_date(raw: bytes, *, tree: Part | None = None, on_error: OnError = None) -> float | None:
    """The Date: header as a POSIX timestamp, or None when it is missing or unparseable.

    Args:
        raw: the stored message.
        tree: ``parse(raw)``, when the caller has cached it.
        on_error: called with an exception of ours (not with an unparseable date, which is
            the sender's fault) before None is returned.
    """
    try:
        value = _tree(raw, tree, on_error).header("date")
        if value is None:
            return None
        text = as_text(value)
    except Exception as exc:  # totality edge: reported, then a well-formed answer
        _bug(on_error, exc)
        return None
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": UTC without a known local offset (RFC 5322 3.3)
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except _DATE_ERRORS:  # a date nobody can read: expected input, not a bug
        return None
