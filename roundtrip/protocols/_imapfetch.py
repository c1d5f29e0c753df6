"""FETCH, STORE and SEARCH: data items parsed, responses built (RFC 3501 6.4.4-6.4.6, 7.4.2).

Theory of operation
-------------------
``IMAPConnection`` owns the selected mailbox and the order of responses; this module holds what
those commands compute. FETCH data items (one atom, a macro, or a parenthesised list; RFC 3501
allows macros only alone, but clients such as imapclient parenthesise them) become
:class:`FetchItem` values; :func:`render_item` turns one item of one message into response bytes,
a message or section literal as a ``(prefix, data)`` pair so the stored bytes are never copied.
ENVELOPE, BODYSTRUCTURE and sections come from ``_mime``, which reports an exception of ours to
``on_error`` and still answers. STORE's flag arithmetic and the SEARCH shortcut for
``HEADER Message-ID <id>`` (an index lookup instead of a scan) live here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._imapparse import MAX_NUMBER, ParseError, Token
from ._imapsearch import SearchMessage, mime_tree
from ._imapwire import flag_list, internal_date, parse_flags, safe

if TYPE_CHECKING:
    from . import _mime

__all__ = [
    "FetchItem",
    "fetch_response",
    "message_id_needle",
    "parse_fetch_items",
    "parse_store",
    "render_item",
    "stored_flags",
]

_SECTION_RE = re.compile(
    r"(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d{1,10})(?:\.(\d{1,10}))?>)?\Z", re.IGNORECASE
)
_SECTION_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")
_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE_ITEMS = frozenset(
    [
        "UID",
        "FLAGS",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
        "BODYSTRUCTURE",
        "BODY",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
    ]
)
_MSGID_SHAPE = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One FETCH data item: its response name and how to compute it."""

    name: str
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()
    start: int | None = None
    length: int | None = None
    sets_seen: bool = False
    section: bool = False


def parse_fetch_items(tok: Token) -> list[FetchItem]:
    """Parse the FETCH data items (one atom, a macro, or a parenthesised list)."""
    if isinstance(tok, str) and tok.upper() in _MACROS:
        return [FetchItem(n) for n in _MACROS[tok.upper()]]
    atoms = tok if isinstance(tok, list) else [tok]
    if not atoms:
        raise ParseError("empty FETCH item list")
    items: list[FetchItem] = []
    for atom in atoms:
        if not isinstance(atom, str):
            raise ParseError("FETCH items must be atoms")
        if atom.upper() in _MACROS:
            # RFC 3501 allows macros only alone, but clients (imapclient) parenthesise them.
            items.extend(FetchItem(n) for n in _MACROS[atom.upper()])
        else:
            items.append(_parse_item(atom))
    return items


def _parse_item(atom: str) -> FetchItem:
    upper = atom.upper()
    if upper in _SIMPLE_ITEMS:
        if upper == "RFC822":
            return FetchItem("RFC822", sets_seen=True, section=True)
        if upper == "RFC822.HEADER":
            return FetchItem("RFC822.HEADER", text="HEADER", section=True)
        if upper == "RFC822.TEXT":
            return FetchItem("RFC822.TEXT", text="TEXT", sets_seen=True, section=True)
        return FetchItem(upper)
    m = _SECTION_RE.match(atom)
    if m is None:
        raise ParseError(f"invalid FETCH item {safe(atom[:40])}")
    peek = m.group(1).upper() == "BODY.PEEK"
    spec = m.group(2)
    fields: tuple[str, ...] = ()
    field_text = ""
    if "(" in spec:
        head, _, rest = spec.partition("(")
        if not rest.endswith(")") or not head.endswith(" "):
            raise ParseError("invalid header field list")
        fields = tuple(f.strip('"') for f in rest[:-1].split())
        if not fields or any(not f or not f.isascii() for f in fields):
            raise ParseError("invalid header field list")
        field_text = " (" + " ".join(fields) + ")"
        spec = head[:-1]
    part: list[int] = []
    words = spec.split(".") if spec else []
    while words and words[0].isdigit():
        n = int(words.pop(0)) if len(words[0]) <= 10 else 0
        if not 1 <= n <= MAX_NUMBER:
            raise ParseError("invalid part number")
        part.append(n)
    text = ".".join(words).upper() or None
    if text is not None and text not in _SECTION_TEXTS:
        raise ParseError(f"invalid section {safe(spec[:40])}")
    if (text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT")) != bool(fields):
        raise ParseError("header field list required with HEADER.FIELDS only")
    if text == "MIME" and not part:
        raise ParseError("MIME needs a part number")
    start = length = None
    name_spec = ".".join([*(str(p) for p in part), *([text] if text else [])]) + field_text
    name = f"BODY[{name_spec}]"
    if m.group(3) is not None:
        start = int(m.group(3))
        if m.group(4) is not None:
            length = int(m.group(4))
            if length == 0:
                raise ParseError("partial length must be positive")
        name += f"<{start}>"
    return FetchItem(
        name, tuple(part), text, fields, start, length, sets_seen=not peek, section=True
    )


def render_item(
    msg: SearchMessage,
    item: FetchItem,
    on_error: _mime.OnError = None,
    *,
    flags: frozenset[str] | None = None,
) -> bytes | tuple[bytes, bytes]:
    """The response item; a literal as (``NAME {n}\\r\\n``, data), so data is not copied.

    ``flags``: the flags to show (the session adds ``\\Recent``); None shows the stored ones.
    """
    name = item.name
    if name == "UID":
        return b"UID %d" % msg.uid
    if name == "FLAGS":
        return b"FLAGS " + flag_list(msg.flags if flags is None else flags)
    if name == "INTERNALDATE":
        return b"INTERNALDATE " + internal_date(msg.internal_date)
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % msg.size
    if name == "ENVELOPE":
        from . import _mime  # here: only parts, envelopes and structures need the parser

        tree = mime_tree(msg, on_error)
        return b"ENVELOPE " + _mime.envelope(msg.raw, tree=tree, on_error=on_error)
    if name == "BODYSTRUCTURE" or (name == "BODY" and not item.section):
        from . import _mime

        extended = name == "BODYSTRUCTURE"
        tree = mime_tree(msg, on_error)
        structure = _mime.bodystructure(msg.raw, extended=extended, tree=tree, on_error=on_error)
        return name.encode("ascii") + b" " + structure
    if item.text is None and not item.part:
        data = msg.raw
    else:
        from . import _mime

        tree = mime_tree(msg, on_error)
        data = _mime.section(
            msg.raw, item.part, item.text, item.fields, tree=tree, on_error=on_error
        )
    if item.start is not None:
        end = None if item.length is None else item.start + item.length
        data = data[item.start : end]
    return name.encode("ascii") + b" {%d}\r\n" % len(data), data


def fetch_response(
    index: int,
    msg: SearchMessage,
    items: list[FetchItem],
    *,
    add_flags: bool,
    flags: frozenset[str] | None = None,
    on_error: _mime.OnError = None,
) -> list[bytes]:
    """One untagged FETCH response as chunks to send in order.

    A literal's data is a chunk of its own, the stored bytes themselves: a message is never
    copied. ``add_flags`` appends FLAGS the client did not ask for (RFC 3501 6.4.5: \\Seen was
    just set). ``flags``: the flags to show, as for ``render_item``.
    """
    parts = [render_item(msg, item, on_error, flags=flags) for item in items]
    if add_flags:
        parts.append(b"FLAGS " + flag_list(msg.flags if flags is None else flags))
    chunks = [b"* %d FETCH (" % (index + 1)]
    for n, part in enumerate(parts):
        if n:
            chunks.append(b" ")
        if isinstance(part, tuple):
            chunks.extend(part)
        else:
            chunks.append(part)
    chunks.append(b")\r\n")
    return chunks


def parse_store(args: list[Token]) -> tuple[str, bool, frozenset[str]]:
    """STORE's item (``FLAGS``, ``+FLAGS`` or ``-FLAGS``), whether ``.SILENT``, and the flags."""
    if len(args) < 3 or not isinstance(args[1], str):
        raise ParseError("STORE expects a sequence set, an item and flags")
    item = args[1].upper()
    silent = item.endswith(".SILENT")
    if silent:
        item = item[: -len(".SILENT")]
    if item not in ("FLAGS", "+FLAGS", "-FLAGS"):
        raise ParseError(f"unknown STORE item {safe(item[:30])}")
    flag_args = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
    return item, silent, parse_flags(flag_args)


def stored_flags(item: str, old: frozenset[str], flags: frozenset[str]) -> frozenset[str]:
    """The flags a message gets from STORE ``item`` with ``flags``."""
    if item == "FLAGS":
        return flags
    if item == "+FLAGS":
        return old | flags
    return old - flags


def message_id_needle(args: list[Token]) -> str | None:
    """The id of a search that is exactly ``HEADER Message-ID <complete msg-id>``, else None."""
    if len(args) != 3:
        return None
    words = []
    for arg in args:
        if isinstance(arg, bytes):
            words.append(arg.decode("utf-8", "replace"))
        elif isinstance(arg, str):
            words.append(arg)
        else:
            return None
    key, name, text = words
    if key.upper() != "HEADER" or name.lower() != "message-id":
        return None
    if not _MSGID_SHAPE.match(text.strip()):
        return None
    return text.strip()
