"""IMAP command framing and grammar: the pure parsing half of ``protocols.imap``.

Theory of operation
-------------------
``CommandReader`` turns the byte stream into commands (RFC 3501 section 2.2, 4.3, 7.5). A
command is one or more CRLF lines; a line that ends in ``{n}`` (synchronising) or ``{n+}``
(non-synchronising, RFC 7888) announces a literal of ``n`` octets that follows. The reader stops
at every announcement and returns ``LiteralAnnounced``; the machine checks the size *before*
anything is sent (no ``+`` for a literal that is too big, docs/security.md A6.1) and then calls
``accept_literal()`` or ``reject_literal()``. Literal octets are taken as data and never looked
at as lines, so commands hidden inside a literal are never executed (docs/security.md A6.2).

``tokenize`` turns a framed command into tokens: ``str`` for an atom (``NIL`` included),
``bytes`` for a string (quoted or literal), ``list`` for a parenthesised list. An atom may carry
a bracketed section with spaces and parentheses in it (``BODY[HEADER.FIELDS (FROM TO)]<0.10>``),
as the FETCH grammar needs.

``ListPattern`` matches LIST/LSUB mailbox patterns (RFC 3501 section 6.3.8) in time linear in
the pattern and the name: a backtracking regular expression took k**n steps for n wildcards,
and one LIST of 100 stars held the event loop (and the GIL) for good (docs/security.md).

Also here: sequence sets, evaluated lazily with bisection (``1:4294967295`` never becomes a
list, docs/security.md A6.7), IMAP dates, and modified UTF-7 mailbox names (RFC 3501 section 5.1.3).

Unsupported: ``literal8`` (``~{n}``, RFC 3516 BINARY) and literals inside a bracketed section.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import calendar
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ParseError
from ._lines import LineBuffer, LineTooLong

__all__ = [
    "MAX_DEPTH",
    "MAX_NUMBER",
    "CommandReader",
    "ListPattern",
    "LiteralAnnounced",
    "ParseError",
    "RawCommand",
    "SequenceSet",
    "Token",
    "decode_mutf7",
    "encode_mutf7",
    "format_uid_set",
    "parse_date",
    "parse_date_time",
    "parse_sequence_set",
    "tokenize",
]

#: nz-number / uniqueid are 32-bit unsigned (RFC 3501 section 9).
MAX_NUMBER = 4294967295

Token = str | bytes | list["Token"]

#: Nesting limit for parenthesised lists and SEARCH keys: bounded recursion (docs/security.md A6.8).
MAX_DEPTH = 64


@dataclass(slots=True)
class RawCommand:
    """One framed command: line fragments with the literals that sat between them."""

    fragments: list[bytes]
    literals: list[bytes]

    @property
    def head(self) -> bytes:
        return self.fragments[0]


@dataclass(frozen=True, slots=True)
class LiteralAnnounced:
    """A line ended in ``{size}`` or ``{size+}``: accept or reject it before reading on."""

    tag: str
    verb: str
    size: int
    sync: bool
    #: Octets of this command read so far (lines and literals).
    total: int


_LITERAL_RE = re.compile(rb"\{(\d{1,20})(\+?)\}$")


def command_words(head: bytes) -> tuple[str, str]:
    """Tag and upper-case verb of a command line (empty strings when missing)."""
    parts = head.split(b" ", 2)
    tag = parts[0].decode("ascii", "replace")
    verb = parts[1].decode("ascii", "replace").upper() if len(parts) > 1 else ""
    if verb == "UID" and len(parts) > 2:
        verb = "UID " + parts[2].split(b" ", 1)[0].decode("ascii", "replace").upper()
    return tag, verb


@dataclass(slots=True)
class CommandReader:
    """Frames commands out of a byte stream with bounded memory."""

    max_line: int
    buffer: LineBuffer = field(init=False)
    _fragments: list[bytes] = field(default_factory=list)
    _literals: list[bytes] = field(default_factory=list)
    _literal: bytearray = field(default_factory=bytearray)
    _need: int = 0
    _announced: int | None = None
    _total: int = 0

    def __post_init__(self) -> None:
        self.buffer = LineBuffer(self.max_line)

    def feed(self, data: bytes) -> None:
        self.buffer.feed(data)

    @property
    def in_command(self) -> bool:
        return bool(self._fragments) or self._need > 0

    def next_line(self) -> bytes | None:
        """A raw line outside any command (IDLE's ``DONE``, a SASL response)."""
        return self.buffer.next_line()

    def next(self) -> RawCommand | LiteralAnnounced | None:
        """The next command or literal announcement; None when more input is needed.

        Raises:
            LineTooLong: a line passed ``max_line`` (the partial command is dropped).
        """
        if self._announced is not None:
            raise RuntimeError("accept_literal() or reject_literal() must be called first")
        while True:
            if self._need:
                chunk = self.buffer.take(self._need)
                self._literal += chunk
                self._need -= len(chunk)
                if self._need:
                    return None
                self._literals.append(bytes(self._literal))
                self._literal.clear()
            try:
                line = self.buffer.next_line()
            except LineTooLong:
                self._reset()
                raise
            if line is None:
                return None
            self._total += len(line) + 2
            match = _LITERAL_RE.search(line)
            if match is None:
                self._fragments.append(line)
                cmd = RawCommand(self._fragments, self._literals)
                self._reset()
                return cmd
            self._fragments.append(line[: match.start()])
            size = int(match.group(1))
            self._announced = size
            tag, verb = command_words(self._fragments[0])
            return LiteralAnnounced(tag, verb, size, not match.group(2), self._total)

    def accept_literal(self) -> None:
        assert self._announced is not None
        self._need = self._announced
        self._total += self._announced
        self._announced = None
        if self._need == 0:
            self._literals.append(b"")

    def reject_literal(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._fragments = []
        self._literals = []
        self._literal = bytearray()
        self._need = 0
        self._announced = None
        self._total = 0


# Tokens

_ATOM_END = frozenset(b' ()"')


class _Tokenizer:
    __slots__ = ("_cmd", "_depth", "_frag", "_line", "_pos")

    def __init__(self, cmd: RawCommand) -> None:
        self._cmd = cmd
        self._frag = 0
        self._line = cmd.fragments[0]
        self._pos = 0
        self._depth = 0

    def _skip_spaces(self) -> None:
        line = self._line
        while self._pos < len(line) and line[self._pos] == 0x20:
            self._pos += 1

    def _at_fragment_end(self) -> bool:
        return self._pos >= len(self._line)

    def tokens(self, *, in_list: bool = False) -> list[Token]:
        out: list[Token] = []
        while True:
            self._skip_spaces()
            if self._at_fragment_end():
                if self._frag < len(self._cmd.literals):
                    out.append(self._cmd.literals[self._frag])
                    self._frag += 1
                    self._line = self._cmd.fragments[self._frag]
                    self._pos = 0
                    continue
                if in_list:
                    raise ParseError("unterminated parenthesised list")
                return out
            c = self._line[self._pos]
            if c == 0x28:  # (
                self._pos += 1
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise ParseError("parentheses nested too deeply")
                out.append(self.tokens(in_list=True))
                self._depth -= 1
            elif c == 0x29:  # )
                if not in_list:
                    raise ParseError("unexpected ')'")
                self._pos += 1
                return out
            elif c == 0x22:  # "
                out.append(self._quoted())
            else:
                out.append(self._atom())

    def _quoted(self) -> bytes:
        line = self._line
        i = self._pos + 1
        buf = bytearray()
        while i < len(line):
            c = line[i]
            if c == 0x5C:  # backslash
                if i + 1 >= len(line) or line[i + 1] not in (0x5C, 0x22):
                    raise ParseError("bad escape in quoted string")
                buf.append(line[i + 1])
                i += 2
            elif c == 0x22:
                self._pos = i + 1
                return bytes(buf)
            elif c in (0x0D, 0x0A, 0x00):
                raise ParseError("control character in quoted string")
            else:
                buf.append(c)
                i += 1
        raise ParseError("unterminated quoted string")

    def _atom(self) -> str:
        line = self._line
        start = i = self._pos
        while i < len(line):
            c = line[i]
            if c == 0x5B:  # [ ... ] may hold spaces and parentheses
                end = line.find(b"]", i)
                # Without a "]" the "[" is an ordinary ATOM-CHAR (RFC 3501 section 9: only
                # "]", a resp-special, is excluded from atoms), as in a mailbox name "a[b".
                # What the brackets hold is 7-bit too (a section spec; quoted strings there
                # are 7-bit): "[\x80]" is refused, not decoded.
                if end >= 0 and _NOT_7BIT_TEXT.search(line, i, end):
                    raise ParseError("non-ASCII or control character in atom")
                i = i + 1 if end < 0 else end + 1
                continue
            if c in _ATOM_END:
                break
            if c == 0x7B:
                raise ParseError("unexpected '{'")
            if c < 0x20 or c >= 0x7F:
                raise ParseError("non-ASCII or control character in atom")
            i += 1
        self._pos = i
        if i == start:
            raise ParseError("empty atom")
        return line[start:i].decode("ascii")


#: A byte no atom may hold, inside a section's brackets included (RFC 3501 section 9).
_NOT_7BIT_TEXT = re.compile(rb"[\x00-\x1f\x7f-\xff]")


def tokenize(cmd: RawCommand) -> list[Token]:
    """Split a framed command into tokens (tag and verb included).

    Raises:
        ParseError: the command does not follow the IMAP token grammar.
    """
    return _Tokenizer(cmd).tokens()


# Sequence sets


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A parsed sequence set; ``None`` stands for ``*``. Evaluated, never expanded."""

    ranges: tuple[tuple[int | None, int | None], ...]

    def _explicit_max(self) -> int:
        return max((n for r in self.ranges for n in r if n is not None), default=0)

    def seq_indices(self, count: int) -> list[int]:
        """0-based indices of the messages named by sequence number, ascending.

        Raises:
            ParseError: a number past ``count`` (RFC 3501 section 9: invalid message set).
        """
        if self._explicit_max() > count:
            raise ParseError("invalid message sequence number")
        if count == 0:
            return []
        spans = []
        for a, b in self.ranges:
            lo = count if a is None else a
            hi = count if b is None else b
            if lo > hi:
                lo, hi = hi, lo
            spans.append((lo - 1, hi))
        return list(_merge(spans))

    def uid_indices(self, uids: list[int]) -> list[int]:
        """0-based indices into the ascending ``uids`` of the UIDs in the set (bisection)."""
        if not uids:
            return []
        top = uids[-1]
        spans = []
        for a, b in self.ranges:
            lo = top if a is None else a
            hi = top if b is None else b
            if lo > hi:
                lo, hi = hi, lo
            spans.append((bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi)))
        return list(_merge(spans))

    def contains(self, number: int, star: int) -> bool:
        """Whether ``number`` is in the set, ``*`` meaning ``star`` (for SEARCH)."""
        for a, b in self.ranges:
            lo = star if a is None else a
            hi = star if b is None else b
            if lo > hi:
                lo, hi = hi, lo
            if lo <= number <= hi:
                return True
        return False


def _merge(spans: list[tuple[int, int]]) -> Iterator[int]:
    """Indices covered by half-open spans, ascending and unique."""
    last = -1
    for lo, hi in sorted(spans):
        for i in range(max(lo, last + 1), hi):
            yield i
            last = i


_SEQ_RE = re.compile(r"(?:\d+|\*)(?::(?:\d+|\*))?(?:,(?:\d+|\*)(?::(?:\d+|\*))?)*\Z")


def parse_sequence_set(text: str) -> SequenceSet:
    """Parse ``1:*,3,5:7`` (RFC 3501 ``sequence-set``).

    Raises:
        ParseError: not a sequence set, or a number that is 0 or past 2**32-1.
    """
    if not _SEQ_RE.match(text):
        raise ParseError("invalid sequence set")
    ranges: list[tuple[int | None, int | None]] = []
    for item in text.split(","):
        first, _, second = item.partition(":")
        a = _seq_number(first)
        b = _seq_number(second) if second else a
        ranges.append((a, b))
    return SequenceSet(tuple(ranges))


def _seq_number(text: str) -> int | None:
    if text == "*":
        return None
    if len(text) > 10:
        raise ParseError("sequence number out of range")
    n = int(text)
    if not 1 <= n <= MAX_NUMBER:
        raise ParseError("sequence number out of range")
    return n


def format_uid_set(uids: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1:3,7`` (order kept, consecutive runs joined)."""
    out: list[str] = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(str(uids[i]) if i == j else f"{uids[i]}:{uids[j]}")
        i = j + 1
    return ",".join(out)


# LIST patterns


class ListPattern:
    """A LIST/LSUB mailbox pattern: ``*`` matches anything, ``%`` anything but ``delimiter``.

    RFC 3501 section 6.3.8; every other character matches itself (case-sensitively: the
    caller folds ``INBOX``). The pattern is an automaton with one state per position, and
    ``matches`` simulates all of its states at once, one character of the name at a time, as
    the bits of an int: each character costs a few big-int operations on at most twice as
    many bits as the name has characters read so far, whatever the pattern, so no pattern
    makes a name cost more than quadratic time in its own length (which the store bounds)
    and never anything exponential. A run of wildcards is one wildcard (``*`` if the run
    holds one), so a wildcard's state never leads straight to another wildcard's.
    """

    __slots__ = ("_accept", "_delimiter", "_literals", "_masks", "_positions", "_star", "_wild")

    def __init__(self, pattern: str, *, delimiter: str = "/") -> None:
        tokens: list[str] = []
        for ch in pattern:
            if ch in "*%" and tokens and tokens[-1] in "*%":
                if ch == "*":
                    tokens[-1] = "*"
                continue
            tokens.append(ch)
        self._delimiter = delimiter
        self._positions: dict[str, list[int]] = {}
        for i, ch in enumerate(tokens):
            if ch not in "*%":
                self._positions.setdefault(ch, []).append(i)
        # Bit i is state i; built from a string of bits, in time linear in the pattern.
        backwards = tokens[::-1]
        self._star = int("0" + "".join("1" if ch == "*" else "0" for ch in backwards), 2)
        self._wild = int("0" + "".join("1" if ch in "*%" else "0" for ch in backwards), 2)
        self._literals = sum(len(p) for p in self._positions.values())
        self._masks: dict[str, int] = {}
        self._accept = 1 << len(tokens)

    def _mask(self, ch: str) -> int:
        """The states whose literal is ``ch``, built on first use (see ``matches``)."""
        mask = self._masks.get(ch)
        if mask is None:
            mask = 0
            for i in self._positions.get(ch, ()):
                mask |= 1 << i
            self._masks[ch] = mask
        return mask

    def matches(self, name: str) -> bool:
        """True when the whole of ``name`` matches the pattern."""
        # Each literal consumes one character. Past this check the pattern has at most
        # 2 * len(name) + 1 states, so the masks built lazily stay as small as the name.
        if self._literals > len(name):
            return False
        star, wild = self._star, self._wild
        states = 1 | ((1 & wild) << 1)
        for ch in name:
            stay = states & (star if ch == self._delimiter else wild)
            states = stay | ((states & self._mask(ch)) << 1)
            if not states:
                return False
            states |= (states & wild) << 1
        return bool(states & self._accept)


# Dates

_MONTHS = {m.upper(): i for i, m in enumerate(calendar.month_abbr) if m}
_DATE_RE = re.compile(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z")
_DATE_TIME_RE = re.compile(
    r"([ \d]?\d)-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})\Z"
)


def parse_date(text: str) -> tuple[int, int, int]:
    """``1-Feb-1994`` -> ``(1994, 2, 1)`` (RFC 3501 ``date``)."""
    m = _DATE_RE.match(text)
    if m is None or m.group(2).upper() not in _MONTHS:
        raise ParseError(f"invalid date {text!r}")
    year, month, day = int(m.group(3)), _MONTHS[m.group(2).upper()], int(m.group(1))
    if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise ParseError(f"invalid date {text!r}")
    return year, month, day


def parse_date_time(text: str) -> float:
    """``17-Jul-1996 02:44:25 -0700`` -> POSIX seconds (RFC 3501 ``date-time``)."""
    m = _DATE_TIME_RE.match(text)
    if m is None or m.group(2).upper() not in _MONTHS:
        raise ParseError(f"invalid date-time {text!r}")
    day, year = int(m.group(1).strip()), int(m.group(3))
    month = _MONTHS[m.group(2).upper()]
    hour, minute, second = int(m.group(4)), int(m.group(5)), int(m.group(6))
    if (
        year < 1
        or not 1 <= day <= calendar.monthrange(year, month)[1]
        or hour > 23
        or minute > 59
        or second > 60
    ):
        raise ParseError(f"invalid date-time {text!r}")
    offset = (int(m.group(8)) * 60 + int(m.group(9))) * 60
    if m.group(7) == "-":
        offset = -offset
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset


# Modified UTF-7 (RFC 3501 section 5.1.3)


def decode_mutf7(raw: bytes) -> str:
    """Decode a mailbox name from modified UTF-7.

    Raises:
        ParseError: not valid modified UTF-7 (8-bit bytes, a bad shift sequence, or a
            shifted character that must be written directly).
    """
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == 0x26:  # &
            end = raw.find(b"-", i + 1)
            if end < 0:
                raise ParseError("unterminated '&' in mailbox name")
            if end == i + 1:
                out.append("&")
            else:
                chunk = raw[i + 1 : end].replace(b",", b"/")
                if len(chunk) % 4 == 1:
                    raise ParseError("bad base64 in mailbox name")
                try:
                    data = base64.b64decode(chunk + b"=" * (-len(chunk) % 4), validate=True)
                    text = data.decode("utf-16-be")
                except (binascii.Error, UnicodeDecodeError) as exc:
                    raise ParseError("bad modified UTF-7 in mailbox name") from exc
                if len(data) % 2 or any(0x20 <= ord(ch) <= 0x7E for ch in text):
                    raise ParseError("bad modified UTF-7 in mailbox name")
                out.append(text)
            i = end + 1
        elif 0x20 <= c <= 0x7E:
            out.append(chr(c))
            i += 1
        else:
            raise ParseError("8-bit or control character in mailbox name")
    return "".join(out)


def encode_mutf7(name: str) -> bytes:
    """Encode a mailbox name as modified UTF-7."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.extend(b"&" + base64.b64encode(data).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            pending.append(ch)
    flush()
    return bytes(out)
