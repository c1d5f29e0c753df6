"""Header field values for the MIME parser: comments, quoted strings, parameters, charsets.

Theory of operation
-------------------
``_mime`` keeps header values as raw bytes; this module turns them into text when a caller needs
text. Values are UTF-8 when valid (RFC 6532), else Latin-1, so no byte is ever lost.

- Content-Type / Content-Disposition parameters (RFC 2045 5.1, RFC 2183): comments skipped,
  quoted strings unescaped, RFC 2231 continuations merged and ``charset'lang'%XX`` decoded.
- RFC 2047 encoded-words, with whitespace between adjacent words dropped.
- Charsets: ``bytes.decode`` accepts only text encodings, so a ``zlib`` or ``bz2`` "charset"
  cannot inflate anything; an unknown or failing charset falls back to UTF-8 with U+FFFD. That
  fallback, and the lenient base64 of RFC 2045 6.8, are the expected answer to hostile input,
  not a bug to report.

Every scan is linear; the regular expressions are listed in docs/security.md.
"""

from __future__ import annotations

import binascii
import re
from urllib.parse import unquote_to_bytes

__all__ = [
    "as_text",
    "b64decode",
    "decode_charset",
    "decode_params",
    "decode_words",
    "parse_content_type",
    "read_quoted",
    "skip_comment",
    "split_params",
]

#: RFC 2047 encoded-word; the charset may carry an RFC 2231 language suffix ("utf-8*en").
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t\r\n]+(?==\?)")


def as_text(value: bytes) -> str:
    """Header bytes as text: UTF-8 (RFC 6532) when valid, else Latin-1 (lossless)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def skip_comment(s: str, i: int) -> int:
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


def read_quoted(s: str, i: int) -> tuple[str, int]:
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


def split_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """``head; a=b; c="d"`` -> (head without comments/whitespace, raw (name, value) pairs)."""
    n = len(value)
    i = 0
    head: list[str] = []
    while i < n and value[i] != ";":
        c = value[i]
        if c == "(":
            i = skip_comment(value, i)
        elif c == '"':
            text, i = read_quoted(value, i)
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
                i = skip_comment(value, i)
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
            text, i = read_quoted(value, i)
        else:
            start = i
            while i < n and value[i] not in ";(" and not value[i].isspace():
                i += 1
            text = value[start:i]
        while i < n and value[i] != ";":
            i = skip_comment(value, i) if value[i] == "(" else i + 1
        if name:
            pairs.append(("".join(name).lower(), text))
    return "".join(head), pairs


_SECTION = re.compile(r"^(.*?)\*([0-9]+)(\*?)$")


def decode_params(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
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
    return decode_charset(b"".join(chunks), charset.split("*", 1)[0] or "us-ascii")


def parse_content_type(value: bytes) -> tuple[str, str, list[tuple[str, str]]] | None:
    head, pairs = split_params(as_text(value))
    maintype, slash, subtype = head.lower().partition("/")
    if not slash or not maintype or not subtype:
        return None
    return maintype, subtype, decode_params(pairs)


def decode_charset(data: bytes, charset: str) -> str:
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


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded-words; whitespace between adjacent encoded-words is dropped."""
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub("", text)

    def word(match: re.Match[str]) -> str:
        charset, encoding, payload = match.group(1), match.group(2).lower(), match.group(3)
        data = payload.encode("ascii", "replace")
        try:
            raw = b64decode(data) if encoding == "b" else binascii.a2b_qp(data, header=True)
        except (binascii.Error, ValueError):
            return match.group(0)
        return decode_charset(raw, charset.split("*", 1)[0])

    return _ENCODED_WORD.sub(word, text)


def b64decode(data: bytes) -> bytes:
    """Lenient base64: drop non-alphabet bytes, repair padding (RFC 2045 6.8 says ignore them)."""
    data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    if len(data) % 4 == 1:
        data = data[:-1]
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        return b""
