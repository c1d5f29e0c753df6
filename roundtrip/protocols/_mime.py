"""MIME analysis for the IMAP server: ENVELOPE, BODYSTRUCTURE, BODY[section], SEARCH helpers.

Theory of operation
-------------------
The IMAP machine (``protocols/imap.py``) answers FETCH and SEARCH over stored raw messages. This
module turns the raw bytes into a small tree of byte offsets (:class:`Part`) exactly once, and
every other function reads that tree plus the raw bytes: nothing is ever re-serialised, so
``BODY[]`` and every section are byte-exact slices of what was stored (SECURITY.md A5.2).

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

Hostile input (SECURITY.md A5.5, A5.6): the parser is iterative, with an explicit work list;
nesting is capped at :data:`MAX_DEPTH` and the number of entities at :data:`MAX_PARTS`, past which
containers are reported as ``application/octet-stream`` leaves. Every scan is linear
(``bytes.find`` for boundaries), ``bytes.decode`` refuses non-text codecs (no ``zlib`` charset
bombs), and every public function is total: it returns a valid answer for any bytes and never
raises. CPython's ``email`` parser is not used on whole messages because it recurses.

Deliberately unsupported: ``BINARY[]`` / decoded sections (RFC 3516), ``message/global``
encapsulation (RFC 6532; reported as a leaf), partial fetches (the caller slices), and group
syntax inside Sender/Reply-To defaults beyond copying From.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from urllib.parse import quote_from_bytes, unquote_to_bytes

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
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

#: Deepest nesting of multiparts / encapsulated messages that is parsed (SECURITY.md A5.5;
#: Dovecot CVE-2020-12100). Containers below it are reported as application/octet-stream leaves.
MAX_DEPTH = 64

#: Most entities parsed in one message (Dovecot's limit after CVE-2020-12100 is 10000 too).
#: Past it, the last part of a multipart runs to the end of its parent and further containers
#: are reported as application/octet-stream leaves.
MAX_PARTS = 10_000

#: Strings longer than this are sent as literals rather than quoted strings, keeping response
#: lines short (RFC 3501 4.3 allows either form for any string).
_QUOTED_MAX = 1000

#: A header field line: RFC 5322 3.6.8 field-name (printable US-ASCII but ":"), with the
#: obsolete whitespace before the colon (RFC 5322 4.5).
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")

#: RFC 2047 encoded-word; the charset may carry an RFC 2231 language suffix ("utf-8*en").
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t\r\n]+(?==\?)")

_WSP = b" \t"
_NIL = b"NIL"

# One header field: (lower-case name, unfolded raw value, offset of the field, offset past it).
Field = tuple[str, bytes, int, int]


@dataclass(eq=False, slots=True)
class Part:
    """One MIME entity of a parsed message, as byte offsets into the raw message.

    ``raw[start:body_start]`` is the entity's header block (including the empty line, when there
    is one) and ``raw[body_start:end]`` its body. The top-level message is the root; a multipart
    has ``children``; a ``message/rfc822`` part has ``message``, the encapsulated message.
    """

    start: int
    body_start: int
    end: int
    depth: int
    fields: list[Field] = field(default_factory=list)
    #: Effective media type, lower case (after defaults and degradation).
    maintype: str = "text"
    subtype: str = "plain"
    #: Decoded parameters (RFC 2231 merged), names lower case, in order of appearance.
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None
    _first: dict[str, bytes] | None = field(default=None, repr=False)

    def header(self, name: str) -> bytes | None:
        """The unfolded raw value of the first field called ``name``, or None."""
        if self._first is None:
            self._first = {}
            for fname, value, _, _ in reversed(self.fields):
                self._first[fname] = value
        return self._first.get(name.lower())

    @property
    def content_type(self) -> str:
        """``maintype/subtype``, lower case."""
        return f"{self.maintype}/{self.subtype}"

    def param(self, name: str) -> str | None:
        """The decoded value of Content-Type parameter ``name``, or None."""
        name = name.lower()
        for pname, value in self.params:
            if pname == name:
                return value
        return None


# --------------------------------------------------------------------------- parsing


def parse(raw: bytes) -> Part:
    """Parse ``raw`` once into a :class:`Part` tree (iterative, depth-capped, never raises).

    Args:
        raw: the message exactly as stored.

    Returns:
        The root entity; pass it as ``tree=`` to the other functions to avoid re-parsing.
    """
    try:
        return _parse(bytes(raw))
    except Exception:  # totality edge: a parser bug must not take the IMAP session down
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
    parsed = _parse_content_type(ctype) if ctype is not None else None
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


# --------------------------------------------------------------------------- parameters


def _text(value: bytes) -> str:
    """Header bytes as text: UTF-8 (RFC 6532) when valid, else Latin-1 (lossless)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _skip_comment(s: str, i: int) -> int:
    """Index just past the (possibly nested) comment starting at ``s[i] == "("``."""
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def _read_quoted(s: str, i: int) -> tuple[str, int]:
    """The unescaped content of the quoted string at ``s[i] == '"'`` and the index past it."""
    out: list[str] = []
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n:
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return "".join(out), n


def _split_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """``head; a=b; c="d"`` -> (head without comments/whitespace, raw (name, value) pairs)."""
    n = len(value)
    i = 0
    head: list[str] = []
    while i < n and value[i] != ";":
        c = value[i]
        if c == "(":
            i = _skip_comment(value, i)
        elif c == '"':
            text, i = _read_quoted(value, i)
            head.append(text)
        else:
            if not c.isspace():
                head.append(c)
            i += 1
    pairs: list[tuple[str, str]] = []
    while i < n:
        i += 1  # the ";"
        name: list[str] = []
        while i < n and value[i] not in "=;":
            c = value[i]
            if c == "(":
                i = _skip_comment(value, i)
                continue
            if not c.isspace():
                name.append(c)
            i += 1
        if i >= n or value[i] == ";":
            continue  # a parameter without "=": ignored
        i += 1  # the "="
        while i < n and value[i].isspace():
            i += 1
        text = ""
        if i < n and value[i] == '"':
            text, i = _read_quoted(value, i)
        else:
            start = i
            while i < n and value[i] not in ";(" and not value[i].isspace():
                i += 1
            text = value[start:i]
        while i < n and value[i] != ";":
            i = _skip_comment(value, i) if value[i] == "(" else i + 1
        if name:
            pairs.append(("".join(name).lower(), text))
    return "".join(head), pairs


_SECTION = re.compile(r"^(.*?)\*([0-9]+)(\*?)$")


def _decode_params(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merge RFC 2231 continuations and decode ``charset'lang'%XX`` values."""
    order: list[str] = []
    plain: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[str, bool]]] = {}
    for name, value in pairs:
        match = _SECTION.match(name)
        if match is not None:
            base, number, star = match.group(1), int(match.group(2)), bool(match.group(3))
        elif name.endswith("*"):
            base, number, star = name[:-1], 0, True
        else:
            if name not in plain:
                plain[name] = value
                if name not in order:
                    order.append(name)
            continue
        if not base or number > 10_000:
            continue
        sections.setdefault(base, {}).setdefault(number, (value, star))
        if base not in order:
            order.append(base)
    result: list[tuple[str, str]] = []
    for name in order:
        if name in sections:
            result.append((name, _join_sections(sections[name])))
        else:
            result.append((name, plain[name]))
    return result


def _join_sections(parts: dict[int, tuple[str, bool]]) -> str:
    ordered = [parts[k] for k in sorted(parts)]
    first, first_star = ordered[0]
    charset = ""
    if first_star and first.count("'") >= 2:
        charset, _, first = first.split("'", 2)
        ordered[0] = (first, True)
    if not any(star for _, star in ordered):
        return "".join(text for text, _ in ordered)
    chunks = [
        unquote_to_bytes(text) if star else text.encode("utf-8", "surrogateescape")
        for text, star in ordered
    ]
    return _decode_charset(b"".join(chunks), charset.split("*", 1)[0] or "us-ascii")


def _parse_content_type(value: bytes) -> tuple[str, str, list[tuple[str, str]]] | None:
    head, pairs = _split_params(_text(value))
    maintype, slash, subtype = head.lower().partition("/")
    if not slash or not maintype or not subtype:
        return None
    return maintype, subtype, _decode_params(pairs)


def _decode_charset(data: bytes, charset: str) -> str:
    """Decode text bytes; unknown, non-text or failing codecs fall back to UTF-8 with U+FFFD."""
    charset = charset.strip().lower()
    if charset in ("", "us-ascii", "ascii", "unknown-8bit", "x-unknown"):
        charset = "utf-8"
    try:
        # bytes.decode accepts only text encodings, so "zlib"/"bz2" charsets cannot inflate.
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- RFC 2047


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded-words; whitespace between adjacent encoded-words is dropped."""
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub("", text)

    def word(match: re.Match[str]) -> str:
        charset, encoding, payload = match.group(1), match.group(2).lower(), match.group(3)
        data = payload.encode("ascii", "replace")
        try:
            raw = _b64decode(data) if encoding == "b" else binascii.a2b_qp(data, header=True)
        except (binascii.Error, ValueError):
            return match.group(0)
        return _decode_charset(raw, charset.split("*", 1)[0])

    return _ENCODED_WORD.sub(word, text)


def _b64decode(data: bytes) -> bytes:
    """Lenient base64: drop non-alphabet bytes, repair padding (RFC 2045 6.8 says ignore them)."""
    data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    if len(data) % 4 == 1:
        data = data[:-1]
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        return b""


# --------------------------------------------------------------------------- addresses

_ADDR_SPECIALS = "<>@,;:"
_MISSING_MAILBOX = b"MISSING_MAILBOX"
_MISSING_DOMAIN = b"MISSING_DOMAIN"

# (name, adl, mailbox, host) as in RFC 3501 7.4.2; a group start has only mailbox (the group
# name), a group end is all None.
Address = tuple[bytes | None, bytes | None, bytes | None, bytes | None]


def _address_tokens(s: str) -> list[tuple[str, str]]:
    """Tokens: ("a", atom or domain literal), ("q", quoted), ("c", comment), ("s", special)."""
    tokens: list[tuple[str, str]] = []
    n = len(s)
    i = 0
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            end = _skip_comment(s, i)
            tokens.append(("c", s[i + 1 : end - 1].strip()))
            i = end
        elif c == '"':
            text, i = _read_quoted(s, i)
            tokens.append(("q", text))
        elif c == "[":
            end = s.find("]", i)
            end = n if end < 0 else end + 1
            tokens.append(("a", s[i:end]))
            i = end
        elif c in _ADDR_SPECIALS:
            tokens.append(("s", c))
            i += 1
        else:
            start = i
            while i < n and s[i] not in ' \t\r\n("[' and s[i] not in _ADDR_SPECIALS:
                i += 1
            tokens.append(("a", s[start:i]))
    return tokens


def _addr_spec(tokens: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    """(mailbox, host) from the tokens of an addr-spec; missing pieces get Dovecot's markers."""
    texts = [text for kind, text in tokens if kind != "c"]
    if "@" in [text for kind, text in tokens if kind == "s"]:
        at = next(k for k, (kind, text) in enumerate(tokens) if kind == "s" and text == "@")
        local = "".join(text for kind, text in tokens[:at] if kind != "c")
        domain = "".join(text for kind, text in tokens[at + 1 :] if kind != "c")
    else:
        local, domain = "".join(texts), ""
    mailbox = local.encode("latin-1") if local else _MISSING_MAILBOX
    host = domain.encode("latin-1") if domain else _MISSING_DOMAIN
    return mailbox, host


def _parse_addresses(value: bytes) -> list[Address]:
    """An RFC 5322 address-list (with groups) as RFC 3501 address structures."""
    tokens = _address_tokens(value.decode("latin-1"))
    out: list[Address] = []
    phrase: list[tuple[str, str]] = []
    comment: str | None = None
    emitted = False
    in_group = False

    def name_of(words: list[tuple[str, str]]) -> bytes | None:
        text = " ".join(text for kind, text in words if kind in "aq")
        return text.encode("latin-1") if text else None

    def flush() -> None:
        nonlocal phrase, comment, emitted
        if not emitted and any(kind != "c" for kind, _ in phrase):
            mailbox, host = _addr_spec(phrase)
            name = comment.encode("latin-1") if comment else None
            out.append((name, None, mailbox, host))
        phrase, comment, emitted = [], None, False

    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        i += 1
        if kind == "c":
            comment = comment or text or None
        elif emitted and not (kind == "s" and text in ",;"):
            continue  # junk after an angle address
        elif kind == "s" and text == ":" and not in_group:
            out.append((None, None, name_of(phrase) or b"", None))
            phrase, comment, in_group = [], None, True
        elif kind == "s" and text == "<":
            inner: list[tuple[str, str]] = []
            while i < len(tokens) and tokens[i] != ("s", ">"):
                inner.append(tokens[i])
                i += 1
            i += 1
            adl = None
            colon = [k for k, tok in enumerate(inner) if tok == ("s", ":")]
            if colon and inner and inner[0] == ("s", "@"):
                route = "".join(text for kind, text in inner[: colon[0]] if kind != "c")
                adl = route.encode("latin-1")
                inner = inner[colon[0] + 1 :]
            if any(kind != "c" for kind, _ in inner):
                mailbox, host = _addr_spec(inner)
                out.append((name_of(phrase), adl, mailbox, host))
            emitted = True
        elif kind == "s" and text == ",":
            flush()
        elif kind == "s" and text == ";":
            flush()
            if in_group:
                out.append((None, None, None, None))
                in_group = False
        else:
            phrase.append((kind, text))
    flush()
    if in_group:
        out.append((None, None, None, None))
    return out


# --------------------------------------------------------------------------- serialisation


def quote(value: str | bytes | None) -> bytes:
    """Serialise an IMAP nstring (RFC 3501 4.3, 4.5).

    Args:
        value: text (sent as UTF-8), raw bytes, or None.

    Returns:
        ``NIL`` for None; a quoted string (``\\`` and ``"`` escaped) for short 7-bit values
        without CR, LF or NUL; otherwise a literal ``{n}\\r\\n`` followed by the bytes.
    """
    if value is None:
        return _NIL
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if len(data) > _QUOTED_MAX or not data.isascii() or re.search(rb"[\r\n\x00]", data):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _list(items: Iterable[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


def _address_list(value: bytes | None) -> bytes:
    if value is None:
        return _NIL
    addresses = _parse_addresses(value)
    if not addresses:
        return _NIL
    return b"(" + b"".join(_list(quote(x) for x in address) for address in addresses) + b")"


def _envelope(node: Part) -> bytes:
    def addresses(name: str) -> bytes:
        return _address_list(node.header(name))

    sender_from = addresses("from")
    sender = addresses("sender")
    reply_to = addresses("reply-to")
    return _list(
        [
            quote(node.header("date")),
            quote(node.header("subject")),
            sender_from,
            sender_from if sender == _NIL else sender,
            sender_from if reply_to == _NIL else reply_to,
            addresses("to"),
            addresses("cc"),
            addresses("bcc"),
            quote(node.header("in-reply-to")),
            quote(node.header("message-id")),
        ]
    )


def _params(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return _NIL
    items: list[bytes] = []
    for name, value in params:
        if value.isascii():
            items += [quote(name.upper()), quote(value)]
        else:  # RFC 2231 form keeps BODYSTRUCTURE 7-bit, as Dovecot does
            encoded = quote_from_bytes(value.encode("utf-8", "surrogateescape"), safe="")
            items += [quote(name.upper() + "*"), quote("utf-8''" + encoded)]
    return _list(items)


def _disposition(node: Part) -> bytes:
    value = node.header("content-disposition")
    if value is None:
        return _NIL
    head, pairs = _split_params(_text(value))
    if not head:
        return _NIL
    return _list([quote(head.upper()), _params(_decode_params(pairs))])


def _language(node: Part) -> bytes:
    value = node.header("content-language")
    if value is None:
        return _NIL
    # ``[^()]``: a run of unclosed "(" is scanned once, not once per "(" (docs/security.md,
    # regular expressions that see client input).
    tags = [t.strip() for t in re.sub(r"\([^()]*\)", "", _text(value)).split(",") if t.strip()]
    if not tags:
        return _NIL
    if len(tags) == 1:
        return quote(tags[0])
    return _list(quote(tag) for tag in tags)


def _line_count(raw: bytes, start: int, end: int) -> int:
    lines = raw.count(b"\n", start, end)
    if end > start and raw[end - 1] != 0x0A:
        lines += 1
    return lines


def _body(raw: bytes, node: Part, extended: bool) -> bytes:
    # Recursion is bounded by MAX_DEPTH (the tree is never deeper).
    if node.children:
        out = b"(" + b"".join(_body(raw, child, extended) for child in node.children)
        out += b" " + quote(node.subtype.upper())
        if extended:
            out += b" " + b" ".join(
                [
                    _params(node.params),
                    _disposition(node),
                    _language(node),
                    quote(node.header("content-location")),
                ]
            )
        return out + b")"
    encoding = node.header("content-transfer-encoding")
    items = [
        quote(node.maintype.upper()),
        quote(node.subtype.upper()),
        _params(node.params),
        quote(node.header("content-id")),
        quote(node.header("content-description")),
        quote(_text(encoding).strip().upper() if encoding else "7BIT"),
        b"%d" % (node.end - node.body_start),
    ]
    if node.message is not None:
        items += [
            _envelope(node.message),
            _body(raw, node.message, extended),
            b"%d" % _line_count(raw, node.body_start, node.end),
        ]
    elif node.maintype == "text":
        items.append(b"%d" % _line_count(raw, node.body_start, node.end))
    if extended:
        items += [
            quote(node.header("content-md5")),
            _disposition(node),
            _language(node),
            quote(node.header("content-location")),
        ]
    return _list(items)


# --------------------------------------------------------------------------- public API


def _tree(raw: bytes, tree: Part | None) -> Part:
    return tree if tree is not None else parse(raw)


def envelope(raw: bytes, *, tree: Part | None = None) -> bytes:
    """The ENVELOPE of a message (RFC 3501 7.4.2), serialised.

    Args:
        raw: the stored message.
        tree: ``parse(raw)``, when the caller has cached it.

    Returns:
        ``(date subject from sender reply-to to cc bcc in-reply-to message-id)`` with header
        values in their raw (RFC 2047-encoded) form; Sender and Reply-To default to From.
    """
    try:
        return _envelope(_tree(raw, tree))
    except Exception:  # totality edge
        return b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def bodystructure(raw: bytes, *, extended: bool = True, tree: Part | None = None) -> bytes:
    """BODYSTRUCTURE (``extended=True``) or BODY (``extended=False``), RFC 3501 7.4.2.

    Args:
        raw: the stored message.
        extended: include the extension data (MD5, disposition, language, location).
        tree: ``parse(raw)``, when the caller has cached it.

    Returns:
        The serialised body structure; always syntactically valid.
    """
    try:
        return _body(raw, _tree(raw, tree), extended)
    except Exception:  # totality edge
        fallback = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d' % (
            len(raw),
            _line_count(raw, 0, len(raw)),
        )
        return fallback + (b" NIL NIL NIL NIL)" if extended else b")")


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


def section(
    raw: bytes,
    part: tuple[int, ...],
    text: str | None = None,
    fields: tuple[str, ...] = (),
    *,
    tree: Part | None = None,
) -> bytes:
    """The bytes of ``BODY[<part>.<text>]`` (RFC 3501 6.4.5).

    Args:
        raw: the stored message.
        part: the part number, ``()`` for the whole message.
        text: None, ``"HEADER"``, ``"HEADER.FIELDS"``, ``"HEADER.FIELDS.NOT"``, ``"TEXT"`` or
            ``"MIME"``.
        fields: the field names for HEADER.FIELDS[.NOT].
        tree: ``parse(raw)``, when the caller has cached it.

    Returns:
        The section's bytes; ``b""`` when the part or the section does not exist.
    """
    try:
        root = _tree(raw, tree)
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
    except Exception:  # totality edge
        return b""


def header_values(raw: bytes, name: str, *, tree: Part | None = None) -> list[str]:
    """All values of top-level header field ``name``, unfolded and RFC 2047-decoded.

    Args:
        raw: the stored message.
        name: the field name (any case).
        tree: ``parse(raw)``, when the caller has cached it.
    """
    try:
        wanted = name.lower()
        return [
            _decode_words(_text(value))
            for fname, value, _, _ in _tree(raw, tree).fields
            if fname == wanted
        ]
    except Exception:  # totality edge
        return []


def _transfer_decode(node: Part, data: bytes) -> bytes:
    encoding = node.header("content-transfer-encoding")
    kind = _text(encoding).strip().lower() if encoding else ""
    try:
        if kind == "base64":
            return _b64decode(data)
        if kind == "quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        return data
    return data


def search_text(raw: bytes, *, tree: Part | None = None) -> str:
    """Decoded text of the body for SEARCH BODY (SEARCH TEXT is the headers plus this).

    The text/* leaves are transfer-decoded and charset-decoded; the headers of encapsulated
    messages are included (RFC 2047-decoded) since they are body content of the outer message.
    Other leaves (attachments) are skipped.

    Args:
        raw: the stored message.
        tree: ``parse(raw)``, when the caller has cached it.
    """
    try:
        pieces: list[str] = []
        # (entity, whether it is an encapsulated message whose header is body content)
        work: list[tuple[Part, bool]] = [(_tree(raw, tree), False)]
        while work:
            node, encapsulated = work.pop()
            if encapsulated:
                pieces.extend(
                    f"{fname}: {_decode_words(_text(value))}" for fname, value, _, _ in node.fields
                )
            if node.children:
                work.extend((child, False) for child in reversed(node.children))
            elif node.message is not None:
                work.append((node.message, True))
            elif node.maintype == "text":
                data = _transfer_decode(node, raw[node.body_start : node.end])
                pieces.append(_decode_charset(data, node.param("charset") or ""))
        return "\n".join(pieces)
    except Exception:  # totality edge
        return ""


def header_date(raw: bytes, *, tree: Part | None = None) -> float | None:
    """The Date: header as a POSIX timestamp, or None when it is missing or unparseable.

    Args:
        raw: the stored message.
        tree: ``parse(raw)``, when the caller has cached it.
    """
    try:
        value = _tree(raw, tree).header("date")
        if value is None:
            return None
        when = parsedate_to_datetime(_text(value))
        if when.tzinfo is None:  # "-0000": UTC without a known local offset (RFC 5322 3.3)
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except Exception:  # totality edge: parsedate raises a zoo of exception types
        return None
