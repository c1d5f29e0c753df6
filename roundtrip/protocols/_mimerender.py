"""ENVELOPE and BODYSTRUCTURE rendering (RFC 3501 7.4.2) over a parsed ``_mime.Part`` tree.

Theory of operation
-------------------
The parser (``_mime.parse``) has already cut the message into byte offsets; this module only
serialises. Address headers are tokenised here (RFC 5322 3.4 with groups and obsolete routes)
into RFC 3501 address structures; a missing local part or domain gets Dovecot's
``MISSING_MAILBOX`` / ``MISSING_DOMAIN`` markers. Strings become IMAP nstrings with
:func:`quote`. The conventions for what RFC 3501 leaves open are listed in ``_mime``.
Recursion in :func:`render_body` is bounded by ``_mime.MAX_DEPTH``: the tree is never deeper.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote_from_bytes

from ._mimepart import Part
from ._mimetext import as_text, decode_params, read_quoted, skip_comment, split_params

__all__ = ["Address", "line_count", "quote", "render_body", "render_envelope"]

#: Strings longer than this are sent as literals rather than quoted strings, keeping response
#: lines short (RFC 3501 4.3 allows either form for any string).
_QUOTED_MAX = 1000

_NIL = b"NIL"

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
            end = skip_comment(s, i)
            tokens.append(("c", s[i + 1 : end - 1].strip()))
            i = end
        elif c == '"':
            text, i = read_quoted(s, i)
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


def render_envelope(node: Part) -> bytes:
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
    head, pairs = split_params(as_text(value))
    if not head:
        return _NIL
    return _list([quote(head.upper()), _params(decode_params(pairs))])


def _language(node: Part) -> bytes:
    value = node.header("content-language")
    if value is None:
        return _NIL
    # ``[^()]``: a run of unclosed "(" is scanned once, not once per "(" (docs/security.md,
    # regular expressions that see client input).
    tags = [t.strip() for t in re.sub(r"\([^()]*\)", "", as_text(value)).split(",") if t.strip()]
    if not tags:
        return _NIL
    if len(tags) == 1:
        return quote(tags[0])
    return _list(quote(tag) for tag in tags)


def line_count(raw: bytes, start: int, end: int) -> int:
    lines = raw.count(b"\n", start, end)
    if end > start and raw[end - 1] != 0x0A:
        lines += 1
    return lines


def render_body(raw: bytes, node: Part, extended: bool) -> bytes:
    # Recursion is bounded by MAX_DEPTH (the tree is never deeper).
    if node.children:
        out = b"(" + b"".join(render_body(raw, child, extended) for child in node.children)
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
        quote(as_text(encoding).strip().upper() if encoding else "7BIT"),
        b"%d" % (node.end - node.body_start),
    ]
    if node.message is not None:
        items += [
            render_envelope(node.message),
            render_body(raw, node.message, extended),
            b"%d" % line_count(raw, node.body_start, node.end),
        ]
    elif node.maintype == "text":
        items.append(b"%d" % line_count(raw, node.body_start, node.end))
    if extended:
        items += [
            quote(node.header("content-md5")),
            _disposition(node),
            _language(node),
            quote(node.header("content-location")),
        ]
    return _list(items)
