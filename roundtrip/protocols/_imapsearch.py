"""IMAP SEARCH keys (RFC 3501 section 6.4.4) compiled to predicates.

Theory of operation
-------------------
``compile_search`` turns the tokens after ``SEARCH [CHARSET x]`` into one predicate over
``(message, sequence number)``; top-level keys are ANDed, ``OR``/``NOT``/parentheses nest.
Matching is case-insensitive substring matching on decoded text (RFC 3501: "case-insensitive
substring"); an address field also matches in its parsed form (``name <local@domain>``, without
comments). SINCE/BEFORE/ON compare the internal date's calendar day in UTC; SENTSINCE/SENTBEFORE/
SENTON compare the Date: field's day in its own zone, "disregarding time and timezone".

SEARCH scans the selected mailbox, which is allowed; what a message parses into (the MIME tree,
decoded header values, body text, Date header) is memoised in ``StoredMessage.cache`` so a
second SEARCH does not parse again.

Supported charsets: UTF-8 and US-ASCII (anything else is ``NO [BADCHARSET]``).
``RECENT``/``NEW``/``OLD`` read the session's ``\\Recent`` UIDs (the caller passes them).
Unsupported: ``MODSEQ`` (CONDSTORE), ``YOUNGER``/``OLDER`` (WITHIN), ``FUZZY``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Container
from email.utils import getaddresses, parsedate_tz
from typing import TYPE_CHECKING, Any, Protocol

from .._headerblock import header_bounds
from ._imapparse import MAX_DEPTH, ParseError, SequenceSet, Token, parse_date, parse_sequence_set

if TYPE_CHECKING:
    from . import _mime

# ``_mime`` (the MIME parser) is imported where a message is parsed: a stack that never
# searches or fetches a part does not load it (tests/test_startup_imports.py).

__all__ = ["BadCharsetError", "Matcher", "SearchMessage", "compile_search", "mime_tree"]


class SearchMessage(Protocol):
    """What SEARCH reads of a stored message."""

    @property
    def uid(self) -> int: ...

    @property
    def raw(self) -> bytes: ...

    @property
    def flags(self) -> frozenset[str]: ...

    @property
    def internal_date(self) -> float: ...

    @property
    def size(self) -> int: ...

    @property
    def cache(self) -> dict[str, Any]: ...


Matcher = Callable[[SearchMessage, int], bool]


class BadCharsetError(ParseError):
    """SEARCH named a charset we do not support: ``NO [BADCHARSET (UTF-8 US-ASCII)]``."""


CHARSETS = ("UTF-8", "US-ASCII")


def mime_tree(msg: SearchMessage, on_error: _mime.OnError = None) -> Any:
    """The parsed MIME tree of ``msg``, memoised in its cache.

    ``on_error`` hears of a parser bug (``_mime.parse``); the fallback tree is memoised too, so
    one message reports it once.
    """
    tree = msg.cache.get("mime")
    if tree is None:
        from . import _mime

        tree = msg.cache["mime"] = _mime.parse(msg.raw, on_error=on_error)
    return tree


def _header_text(msg: SearchMessage, name: str, on_error: _mime.OnError) -> list[str]:
    key = "hdr:" + name.lower()
    values = msg.cache.get(key)
    if values is None:
        from . import _mime

        tree = mime_tree(msg, on_error)
        found = _mime.header_values(msg.raw, name, tree=tree, on_error=on_error)
        values = msg.cache[key] = [v.casefold() for v in found]
    return list(values)


def _body_text(msg: SearchMessage, on_error: _mime.OnError) -> str:
    text = msg.cache.get("search_text")
    if text is None:
        from . import _mime

        tree = mime_tree(msg, on_error)
        found = _mime.search_text(msg.raw, tree=tree, on_error=on_error)
        text = msg.cache["search_text"] = found.casefold()
    return str(text)


def _all_headers_text(msg: SearchMessage) -> str:
    text = msg.cache.get("header_text")
    if text is None:
        # BODY[HEADER]'s block (roundtrip/_headerblock.py): none when the message starts with
        # the empty line or a line that is not a field.
        head = msg.raw[: header_bounds(msg.raw)[0]]
        text = msg.cache["header_text"] = head.decode("utf-8", "replace").casefold()
    return str(text)


def _sent_day(msg: SearchMessage, on_error: _mime.OnError) -> datetime.date | None:
    """The calendar day of the Date: field in the field's own zone (RFC 3501 6.4.4)."""
    if "sent_day" not in msg.cache:
        from . import _mime

        tree = mime_tree(msg, on_error)
        values = _mime.header_values(msg.raw, "Date", tree=tree, on_error=on_error)
        msg.cache["sent_day"] = _date_field_day(values[0]) if values else None
    day = msg.cache["sent_day"]
    return day if isinstance(day, datetime.date) else None


def _date_field_day(text: str) -> datetime.date | None:
    """The day a Date: value names, disregarding its time and zone; None when unreadable."""
    try:
        parts = parsedate_tz(text)
        if parts is None:
            return None
        return datetime.date(parts[0], parts[1], parts[2])
    except (ValueError, TypeError, IndexError, OverflowError):
        return None


def _address_text(msg: SearchMessage, name: str, on_error: _mime.OnError) -> list[str]:
    """An address field's decoded values, plus each address as ``name <local@domain>``.

    The parsed form drops comments and folding that sit inside an address (``<a (c)@ b.org>``
    is ``a@b.org``), so a search for the address itself finds it, as it does in Dovecot.
    """
    key = "addr:" + name.lower()
    values = msg.cache.get(key)
    if values is None:
        raw_values = _header_text(msg, name, on_error)
        parsed = [f"{n} <{a}>".casefold() for n, a in getaddresses(raw_values) if n or a]
        values = msg.cache[key] = raw_values + parsed
    return list(values)


def _day(when: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).date()


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}

_ADDRESS_KEYS = {"FROM": "From", "TO": "To", "CC": "Cc", "BCC": "Bcc", "SUBJECT": "Subject"}
#: Header fields whose addresses SEARCH also matches in parsed form.
_ADDRESS_FIELDS = frozenset({"from", "to", "cc", "bcc", "sender", "reply-to"})


class _Compiler:
    def __init__(
        self,
        tokens: list[Token],
        charset: str,
        count: int,
        max_uid: int,
        recent: Container[int],
        depth: int = 0,
        on_error: _mime.OnError = None,
    ) -> None:
        if depth > MAX_DEPTH:
            raise ParseError("search keys nested too deeply")
        self._depth = depth
        self._tokens = tokens
        self._pos = 0
        self._charset = charset
        self._count = count
        self._max_uid = max_uid
        self._recent = recent
        self._on_error = on_error

    def _next(self) -> Token:
        if self._pos >= len(self._tokens):
            raise ParseError("missing search key or argument")
        tok = self._tokens[self._pos]
        self._pos += 1
        return tok

    def _string(self) -> str:
        tok = self._next()
        if isinstance(tok, list):
            raise ParseError("expected a string")
        if isinstance(tok, str):
            return tok.casefold()
        codec = "ascii" if self._charset == "US-ASCII" else "utf-8"
        try:
            return tok.decode(codec).casefold()
        except UnicodeDecodeError as exc:
            raise ParseError(f"search string is not {self._charset}") from exc

    def _atom(self) -> str:
        tok = self._next()
        if not isinstance(tok, str):
            if isinstance(tok, bytes):
                return tok.decode("ascii", "replace")
            raise ParseError("expected an atom")
        return tok

    def _number(self) -> int:
        text = self._atom()
        if not text.isdigit() or len(text) > 10:
            raise ParseError("expected a number")
        return int(text)

    def _date(self) -> datetime.date:
        year, month, day = parse_date(self._atom())
        return datetime.date(year, month, day)

    def compile_all(self) -> Matcher:
        keys: list[Matcher] = []
        while self._pos < len(self._tokens):
            keys.append(self.key())
        if not keys:
            raise ParseError("SEARCH needs at least one key")
        return _and(keys)

    def key(self) -> Matcher:
        tok = self._next()
        if isinstance(tok, list):
            sub = _Compiler(
                tok,
                self._charset,
                self._count,
                self._max_uid,
                self._recent,
                self._depth + 1,
                self._on_error,
            )
            return sub.compile_all()
        if isinstance(tok, bytes):
            raise ParseError("expected a search key")
        name = tok.upper()
        if name == "ALL":
            return lambda m, s: True
        if name in _FLAG_KEYS:
            flag, wanted = _FLAG_KEYS[name]
            return lambda m, s: (flag in m.flags) is wanted
        recent = self._recent
        if name == "RECENT":
            return lambda m, s: m.uid in recent
        if name == "NEW":  # RECENT UNSEEN
            return lambda m, s: m.uid in recent and "\\Seen" not in m.flags
        if name == "OLD":  # NOT RECENT
            return lambda m, s: m.uid not in recent
        if name in ("KEYWORD", "UNKEYWORD"):
            kw = self._atom().casefold()
            wanted = name == "KEYWORD"
            return lambda m, s: any(f.casefold() == kw for f in m.flags) is wanted
        if name in _ADDRESS_KEYS:
            return self._header_matcher(_ADDRESS_KEYS[name], self._string())
        if name == "HEADER":
            field = self._atom()
            return self._header_matcher(field, self._string())
        report = self._on_error
        if name == "BODY":
            needle = self._string()
            return lambda m, s: needle in _body_text(m, report)
        if name == "TEXT":
            needle = self._string()
            return lambda m, s: needle in _all_headers_text(m) or needle in _body_text(m, report)
        if name in ("SINCE", "BEFORE", "ON"):
            return _date_matcher(name, self._date(), lambda m: _day(m.internal_date))
        if name in ("SENTSINCE", "SENTBEFORE", "SENTON"):
            return _date_matcher(name[4:], self._date(), lambda m: _sent_day(m, report))
        if name == "LARGER":
            n = self._number()
            return lambda m, s: m.size > n
        if name == "SMALLER":
            n = self._number()
            return lambda m, s: m.size < n
        if name == "UID":
            uids = parse_sequence_set(self._atom())
            top = self._max_uid
            return lambda m, s: uids.contains(m.uid, top)
        if name in ("NOT", "OR"):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise ParseError("search keys nested too deeply")
            try:
                if name == "NOT":
                    inner = self.key()
                    return lambda m, s: not inner(m, s)
                left, right = self.key(), self.key()
                return lambda m, s: left(m, s) or right(m, s)
            finally:
                self._depth -= 1
        if name[:1].isdigit() or name[:1] == "*":
            seqs: SequenceSet = parse_sequence_set(name)
            count = self._count
            return lambda m, s: seqs.contains(s, count)
        raise ParseError(f"unknown search key {name[:40]!r}")

    def _header_matcher(self, field: str, needle: str) -> Matcher:
        report = self._on_error
        text = _address_text if field.lower() in _ADDRESS_FIELDS else _header_text

        def match(m: SearchMessage, s: int) -> bool:
            values = text(m, field, report)
            if not needle:
                return bool(values)
            return any(needle in v for v in values)

        return match


def _and(keys: list[Matcher]) -> Matcher:
    if len(keys) == 1:
        return keys[0]
    return lambda m, s: all(k(m, s) for k in keys)


def _date_matcher(
    how: str, day: datetime.date, get: Callable[[SearchMessage], datetime.date | None]
) -> Matcher:
    def match(m: SearchMessage, s: int) -> bool:
        have = get(m)
        if have is None:
            return False
        if how == "SINCE":
            return have >= day
        if how == "BEFORE":
            return have < day
        return have == day

    return match


def compile_search(
    tokens: list[Token],
    *,
    count: int,
    max_uid: int,
    recent: Container[int] = frozenset(),
    on_error: _mime.OnError = None,
) -> Matcher:
    """Compile SEARCH arguments (everything after the verb) into a predicate.

    Args:
        tokens: the arguments, ``CHARSET x`` included when the client sent it.
        count: messages in the session's view (what ``*`` means for sequence numbers).
        max_uid: the highest UID in the view (what ``*`` means in ``UID`` keys).
        recent: the UIDs that are ``\\Recent`` in the session (RECENT, NEW, OLD).
        on_error: hears of an exception of ours in the MIME functions the predicate calls
            (they still answer, see ``_mime``).

    Raises:
        BadCharsetError: an unsupported ``CHARSET``.
        ParseError: a malformed or unknown key.
    """
    charset = "UTF-8"
    if tokens and isinstance(tokens[0], str) and tokens[0].upper() == "CHARSET":
        if len(tokens) < 2 or isinstance(tokens[1], list):
            raise ParseError("CHARSET needs a name")
        raw = tokens[1]
        name = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw).upper()
        if name not in CHARSETS:
            raise BadCharsetError(f"unsupported charset {name[:40]!r}")
        charset = name
        tokens = tokens[2:]
    return _Compiler(tokens, charset, count, max_uid, recent, on_error=on_error).compile_all()
