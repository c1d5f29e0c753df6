"""Values on the IMAP wire that several command groups share: arguments in, strings out.

Theory of operation
-------------------
Command handlers (``imap``, ``_imapfetch``, ``_imapmailbox``, ``_imapauth``) read their arguments
through these functions and refuse bad ones with ``ParseError`` (tagged ``BAD``) or
:class:`NoResponseError` (tagged ``NO`` with an RFC 5530 response code). ``IMAPConnection`` turns
both into the reply in one place. Mailbox names are checked for directory traversal here
(docs/security.md A6.5) before the store checks them again; flags are the five system flags of
RFC 3501 2.3.2 or keyword atoms. Everything sent back is made safe for a response line.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable

from ._imapparse import ParseError, Token, decode_mutf7
from ._imapsearch import SearchMessage

__all__ = [
    "FLAGS_TEXT",
    "NoResponseError",
    "canonical_name",
    "decode_name",
    "flag_list",
    "flags_lines",
    "has_flag",
    "internal_date",
    "mailbox_arg",
    "mailbox_name",
    "parse_flags",
    "quote",
    "safe",
    "text_arg",
]


class NoResponseError(Exception):
    """A command failed for a reason the client can act on: tagged ``NO``."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


FLAGS_TEXT = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"
_SYSTEM_FLAGS = {f.lower(): f for f in FLAGS_TEXT.split()}
_KEYWORD_RE = re.compile(r'[^\x00-\x20\x7f(){%*"\\\]]+\Z')
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def quote(text: str | bytes) -> bytes:
    """A quoted string when possible, otherwise a literal."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if all(0x20 <= b < 0x7F for b in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def safe(text: str) -> str:
    """Text for a response line: no CR, LF or other control characters, bounded length."""
    return "".join(c if " " <= c < "\x7f" else "?" for c in text)[:200]


def internal_date(when: float) -> bytes:
    """``"dd-Mon-yyyy hh:mm:ss +0000"`` (RFC 3501 date-time), quoted."""
    d = datetime.datetime.fromtimestamp(int(when), datetime.UTC)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        d.day,
        _MONTHS[d.month - 1].encode(),
        d.year,
        d.hour,
        d.minute,
        d.second,
    )


def flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(sorted(flags)).encode("utf-8", "replace") + b")"


def flags_lines(keywords: Iterable[str]) -> list[str]:
    """Untagged FLAGS and PERMANENTFLAGS (RFC 3501 7.2.6, 7.1): system flags and ``keywords``.

    ``\\*`` says a client may create keywords; each one in use is listed once, so a FETCH
    never shows a flag the client was not told of.
    """
    text = " ".join([FLAGS_TEXT, *sorted(keywords)])
    return [f"* FLAGS ({text})", f"* OK [PERMANENTFLAGS ({text} \\*)] Flags permitted."]


def has_flag(msg: SearchMessage | None, flag: str) -> bool:
    """``flag`` is set on ``msg`` (None: an expunged message, no flags)."""
    return msg is not None and flag in msg.flags


def text_arg(tok: Token, what: str) -> bytes:
    """An astring argument as bytes."""
    if isinstance(tok, list):
        raise ParseError(f"{what} must be a string")
    return tok.encode("ascii") if isinstance(tok, str) else tok


def mailbox_arg(tok: Token) -> str:
    """A mailbox name from the wire: modified UTF-7 decoded and checked for traversal."""
    return mailbox_name(decode_name(text_arg(tok, "mailbox name")))


def decode_name(raw: bytes) -> str:
    """A mailbox name from modified UTF-7; one that is not valid names no mailbox.

    The command itself is well formed (the name is a valid astring), so the answer is
    ``NO [CANNOT]``, not ``BAD``, as in Dovecot.
    """
    try:
        return decode_mutf7(raw)
    except ParseError as exc:
        raise NoResponseError(f"invalid mailbox name: {exc}", "CANNOT") from exc


def mailbox_name(name: str) -> str:
    """Refuse names that could escape a directory tree (docs/security.md A6.5)."""
    if name.upper() == "INBOX":
        return "INBOX"
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise NoResponseError(f"invalid mailbox name {safe(name)!r}", "CANNOT")
    return name


def canonical_name(name: str) -> str:
    """``name`` with a leading ``INBOX`` part in capitals, as the store keeps it."""
    head, sep, tail = name.partition("/")
    return ("INBOX" if head.upper() == "INBOX" else head) + sep + tail


def parse_flags(tokens: list[Token]) -> frozenset[str]:
    """A flag list of STORE or APPEND: system flags in their canonical case, or keywords."""
    out: set[str] = set()
    for tok in tokens:
        if not isinstance(tok, str):
            raise ParseError("flags must be atoms")
        if tok.startswith("\\"):
            flag = _SYSTEM_FLAGS.get(tok.lower())
            if flag is None:
                raise ParseError(f"invalid system flag {safe(tok[:30])}")
            out.add(flag)
        elif _KEYWORD_RE.match(tok):
            out.add(tok)
        else:
            raise ParseError(f"invalid keyword {safe(tok[:30])}")
    return frozenset(out)
