"""Round-trip your own ``.eml`` files through a stack in one line per test.

Parametrise over a directory with :func:`roundtrip.corpus.corpus_params` (this module does not
import pytest), then call :func:`roundtrip_eml`::

    from roundtrip.corpus import corpus_params
    from roundtrip.testing import roundtrip_eml

    @pytest.mark.parametrize("eml", corpus_params("tests/emails"), ids=str)
    def test_email_survives(mailstack, eml):
        outcome = roundtrip_eml(mailstack, eml.raw)
        assert outcome.identical, outcome.diff()

``roundtrip_eml`` submits the message over implicit TLS with AUTH (port 465 semantics) as the
first user of the first domain to the first user of the last domain, so the message crosses
the relay, the DNS MX lookup and the recipient's MX; it waits until the message is stored and
downloads it over IMAP ``BODY[]`` and/or POP3 ``RETR``, reading the exact octets
(:func:`download_imap` with imapclient, :func:`download_pop3` with poplib; both usable on
their own for a message whose UID is known).

What is submitted: the message in SMTP's canonical form (:func:`canonical_form`), as a mail
client submits a file. Saved mail usually ends its lines with a bare LF; SMTP carries lines
ending in CRLF (RFC 5321 section 2.3.8), so every LF or CR outside a CRLF pair becomes CRLF
and a final CRLF is added when missing. ``outcome.submitted`` holds those bytes,
``outcome.original`` the ones given, and ``outcome.diff()`` says when they differ.
``canonicalize=False`` sends the bytes exactly as given (for tests of bare-LF smuggling and
the like); the stack's relay then turns every stray CR or LF into CRLF (docs/security.md, A2.2),
so such a message is only :attr:`RoundtripOutcome.equivalent`.

What "identical" means: the stored message is exactly the submitted bytes with two kinds of
additions, and every download equals the stored copy.

1. Fields prepended in front of the message by the servers on the way: trace and filter
   fields (``Received``, ``X-Spam-*``; see :data:`TRACE_FIELDS`). Which bytes were prepended
   is found by locating the submitted message's own first bytes, so a message that itself
   starts with ``Received`` or ``Delivered-To`` keeps those fields.
2. ``Date`` and ``Message-ID`` added at the end of the header block by the submission server
   when the message lacks them (RFC 6409 sections 8.2 and 8.3; :data:`SUBMISSION_FIELDS`).
   Only a field the submitted header does not have counts, each at most once, and only at
   that place; ``outcome.submission_fields`` names them.

Both kinds must be well-formed header fields, not just carry allowed names: every line ends
as the message's lines do (CRLF, or bare LF for a message stored with bare LF), holds no
other CR or LF, is not empty nor white space only, and starts a field or continues one (RFC
5322 sections 2.2, 2.2.3, 3.2.2). An empty line would turn the message's header into body,
and a lone CR would hide a new field from a check that splits at LF but not from a parser
that splits at CR; ``outcome.malformed_added`` quotes what is wrong.

Every client here verifies certificates (against the stack's CA, or the context given).
"""

from __future__ import annotations

import difflib
import fnmatch
import poplib
import re
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from ._headerblock import header_bounds
from .config import Endpoint, User
from .errors import ConfigError
from .stack import DeliveredMessage, MailStack

__all__ = [
    "SUBMISSION_FIELDS",
    "TRACE_FIELDS",
    "RoundtripOutcome",
    "canonical_form",
    "download_imap",
    "download_pop3",
    "relayed_form",
    "roundtrip_eml",
    "send_eml",
    "smtp_options",
    "split_added_headers",
]

#: Header fields a receiving side may prepend without the message counting as changed
#: (``fnmatch`` patterns, case-insensitive): trace fields (RFC 5321 section 4.4) and the
#: headers that delivery agents and filters conventionally add.
TRACE_FIELDS = (
    "Received",
    "Return-Path",
    "Delivered-To",
    "X-Original-To",
    "Authentication-Results",
    # Not a trace field, but prepended on the way too: the stack's submission signs
    # authenticated mail (RFC 6376 section 5.6), like any signing MTA.
    "DKIM-Signature",
    "X-Spam-*",
)

#: Fields a submission server adds at the end of the header block when a message lacks them
#: (RFC 6409 section 8.2 ``Date``, section 8.3 ``Message-ID``); the stack's submission
#: servers do exactly that. They never count as a change when the submitted header has no
#: field of that name.
SUBMISSION_FIELDS = ("Date", "Message-ID")

Retrieve = Literal["imap", "pop3", "both"]

_STRAY_EOL = re.compile(rb"\r\n|\r|\n")
_HAS_STRAY = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_DIFF_WINDOW = 600  # bytes either side of the first difference shown by diff()
_DIFF_LINES = 40


def canonical_form(raw: bytes) -> bytes:
    """``raw`` in SMTP's canonical form, as a submission client sends a saved message.

    Lines end in CRLF (RFC 5321 section 2.3.8; RFC 5322 section 2.3 allows CR and LF only
    together): every CRLF stays, every LF or CR outside a CRLF pair becomes CRLF, and CRLF
    is appended when the message does not end with one. This is what ``smtplib`` does to a
    ``str`` message (it does nothing to ``bytes``). A message already in that form is
    returned as is.
    """
    data = _STRAY_EOL.sub(b"\r\n", raw) if _HAS_STRAY.search(raw) else raw
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def relayed_form(raw: bytes) -> bytes:
    """``raw`` as a normalising SMTP path delivers it when it was sent as bytes, unconverted.

    (Not the relay's own ``normalize_line_endings`` in protocols/delivery.py, which models one
    hop; this models the client's final CRLF too.)

    First the SMTP client ends the content with CRLF if it does not already end so (smtplib
    appends CRLF even after a bare LF), then every CR, LF or CRLF becomes CRLF: what the
    stack's relay does to every message it forwards (docs/security.md, A2.2). Unlike
    :func:`canonical_form`, a final bare LF therefore becomes an empty line.
    """
    data = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    return _STRAY_EOL.sub(b"\r\n", data) if _HAS_STRAY.search(data) else data


def _conversion_note(original: bytes, submitted: bytes) -> str:
    """What :func:`canonical_form` changed, in words ("" when nothing)."""
    if original == submitted:
        return ""
    parts = []
    lf, cr = len(_BARE_LF.findall(original)), len(_BARE_CR.findall(original))
    if lf:
        parts.append(f"{lf} bare LF")
    if cr:
        parts.append(f"{cr} bare CR")
    if not _STRAY_EOL.sub(b"\r\n", original).endswith(b"\r\n"):
        parts.append("final CRLF added")
    return f"line endings converted to CRLF for submission ({', '.join(parts)})"


def smtp_options(raw: bytes, *addresses: str) -> list[str]:
    """The MAIL FROM parameters ``raw`` needs: SMTPUTF8 and/or BODY=8BITMIME.

    SMTPUTF8 (RFC 6531) when the header block or an address holds non-ASCII; BODY=8BITMIME
    (RFC 6152) when any octet is 8-bit.
    """
    head = raw[: _header_block_end(raw)]
    utf8 = not head.isascii() or not all(a.isascii() for a in addresses)
    if utf8:
        return ["SMTPUTF8", "BODY=8BITMIME"]
    return [] if raw.isascii() else ["BODY=8BITMIME"]


def _header_block_end(raw: bytes) -> int:
    """Where the header block's last line ends (roundtrip/_headerblock.py): just before the
    empty line, or before the first line that is not a field.

    0 when the message starts with either, ``len(raw)`` when it is all fields. This is
    where a submission server inserts the fields it adds (roundtrip/protocols/smtp.py,
    ``add_missing_headers``).
    """
    return header_bounds(raw)[0]


def _field_starts(raw: bytes) -> list[int]:
    """Offsets where each header field starts, up to the empty line that ends the header."""
    starts: list[int] = []
    pos = 0
    size = len(raw)
    while pos < size:
        eol = raw.find(b"\n", pos)
        nxt = size if eol == -1 else eol + 1
        if raw[pos:nxt] in (b"\r\n", b"\n"):
            break
        if raw[pos : pos + 1] not in (b" ", b"\t") or not starts:
            starts.append(pos)
        pos = nxt
    return starts


def _field_name(field_bytes: bytes) -> str:
    return field_bytes.split(b":", 1)[0].strip().decode("ascii", "replace")


def _field_names(block: bytes) -> list[str]:
    return [_field_name(block[s:e]) for s, e in _pairs(_field_starts(block), len(block))]


#: A line that starts a header field: its name (printable US-ASCII but the colon, RFC 5322
#: section 3.6.8), white space the obsolete syntax allows (section 4.5), then the colon.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_PROBLEMS_SHOWN = 5  # per block, in diff() and the problem lists
_EXCERPT = 120  # bytes of an offending line quoted


def _line_ending(data: bytes, at: int) -> bytes:
    """How the line that starts at ``at`` ends: in a bare LF, or else (also when no LF
    follows) in CRLF."""
    lf = data.find(b"\n", at)
    return b"\n" if lf != -1 and (lf == at or data[lf - 1] != 0x0D) else b"\r\n"


def _excerpt(line: bytes, at: int = 0) -> str:
    """``line`` quoted as a bytes literal, cut to about :data:`_EXCERPT` bytes around ``at``."""
    start = max(0, min(at - _EXCERPT // 2, len(line) - _EXCERPT))
    end = start + _EXCERPT
    return f"{'...' if start else ''}{line[start:end]!r}{'...' if end < len(line) else ''}"


def _line_problem(line: bytes, eol: bytes, first: bool) -> tuple[str, int] | None:
    """What is wrong with one line of added fields (without its ``eol``) and where, if
    anything. Header fields are lines ending in CRLF (here: in ``eol``, the message's own
    line ending), with no CR or LF alone (RFC 5322 sections 2.2 and 2.2.3); each is the
    start of a field or continues the one before it, never empty (the empty line ends the
    header block, section 2.1) nor white space only (section 3.2.2)."""
    cr, lf = line.find(b"\r"), line.find(b"\n")
    if eol == b"\n" and line.endswith(b"\r") and cr == len(line) - 1 and lf == -1:
        return "ends in CRLF where the message's lines end in LF", cr
    if cr != -1 and (lf == -1 or cr < lf):
        return "has a CR that does not end the line", cr
    if lf != -1:
        return "has an LF that does not end the line", lf
    if not line:
        return "is empty (an empty line ends the header block: what follows is body)", 0
    if line[:1] in (b" ", b"\t"):
        if first:
            return "continues a field that is not there (it starts with white space)", 0
        if not line.strip(b" \t"):
            return "is white space only", 0
        return None
    if not _FIELD_START.match(line):
        return "is neither a field (name and colon) nor a continuation", 0
    return None


def _block_problems(block: bytes, eol: bytes, what: str) -> list[str]:
    """Why ``block`` is not whole header fields whose lines end in ``eol``, one sentence per
    offending line with its bytes quoted; ``[]`` when it is (or is empty)."""
    if not block:
        return []
    lines = block.split(eol)
    problems: list[str] = []
    if lines[-1]:
        ending = "CRLF" if eol == b"\r\n" else "LF"
        problems.append(f"{what} does not end in {ending}: {_excerpt(lines[-1], len(lines[-1]))}")
    for number, line in enumerate(lines[:-1], 1):
        found = _line_problem(line, eol, first=number == 1)
        if found is not None:
            reason, at = found
            problems.append(f"{what}, line {number} {reason}: {_excerpt(line + eol, at)}")
    if len(problems) > _PROBLEMS_SHOWN:
        more = len(problems) - _PROBLEMS_SHOWN
        problems[_PROBLEMS_SHOWN:] = [f"{what}: {more} more malformed line(s)"]
    return problems


def _missing_submission_fields(head: bytes) -> set[str]:
    present = {name.lower() for name in _field_names(head + b"\r\n")}
    return {name.lower() for name in SUBMISSION_FIELDS} - present


def _is_submission_block(block: bytes, missing: set[str], eol: bytes) -> bool:
    """Whether ``block`` is whole header fields with lines ending in ``eol``, each one of
    ``missing``, none twice."""
    if not block or _block_problems(block, eol, ""):
        return False
    names = [name.lower() for name in _field_names(block)]
    return len(set(names)) == len(names) and set(names) <= missing


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the stored copy differs in shape from what was submitted.

    ``stored[:prepended]`` was put in front; ``stored[inserted_at:inserted_end]`` was added at
    the end of the message's header block by the submission server.
    """

    prepended: int
    inserted_at: int
    inserted_end: int


def _line_starts(data: bytes, limit: int) -> list[int]:
    """0 and every offset after an LF, up to and including ``limit``."""
    starts = [0]
    pos = data.find(b"\n", 0, limit)
    while pos != -1:
        starts.append(pos + 1)
        pos = data.find(b"\n", pos + 1, limit)
    return starts


def _locate(stored: bytes, submitted: bytes) -> _Layout | None:
    """How ``stored`` is ``submitted`` plus prepended fields plus submission fields, if it is.

    The header block ``head`` and the rest ``tail`` (empty line and body) of ``submitted``
    must appear as ``prefix + head + added + tail``, with ``added`` only fields of
    :data:`SUBMISSION_FIELDS` that ``head`` lacks. The candidate offsets for ``head`` are
    line starts, tried from the front, so a message that starts with a ``Received`` field
    of its own is matched at its own first byte, not after it.
    """
    split = _header_block_end(submitted)
    head, tail = submitted[:split], submitted[split:]
    if len(stored) < len(submitted) or not stored.endswith(tail):
        return None
    tail_at = len(stored) - len(tail)
    last = tail_at - len(head)
    missing = _missing_submission_fields(head)
    for start in _line_starts(stored, last):
        if start > last or not stored.startswith(head, start):
            continue
        at = start + len(head)
        if at == tail_at or (
            missing
            and _is_submission_block(stored[at:tail_at], missing, _line_ending(stored, start))
        ):
            return _Layout(start, at, tail_at)
    return None


def _best_guess(stored: bytes, submitted: bytes) -> _Layout:
    """A layout for a message that changed in transit, so that a diff shows the change.

    The prepended block ends at the field start where the longest run of ``submitted``'s
    header begins (ties: the earliest), if that run covers at least its first line;
    otherwise the field counts decide. Fields the submission server would add that follow
    an intact header are set aside too.
    """
    split = _header_block_end(submitted)
    head = submitted[:split]
    starts = _field_starts(stored) or [0]
    best, best_len = 0, -1
    for start in starts:
        same = _first_difference(stored[start : start + len(head)], head)
        if same > best_len:
            best, best_len = start, same
    first_line = submitted.find(b"\n") + 1
    if best_len < min(first_line or len(head), len(head)):
        missing = _missing_submission_fields(head)
        names = [name.lower() for name in _field_names(stored[: _header_block_end(stored)])]
        added = len(starts) - len(_field_starts(submitted)) - len(missing & set(names))
        best = starts[added] if 0 < added < len(starts) else 0
        best_len = _first_difference(stored[best : best + len(head)], head)
    at = best + len(head)
    end = at
    missing = _missing_submission_fields(head) if best_len == len(head) else set()
    if missing and at <= (block_end := _header_block_end(stored)):
        block = stored[at:block_end]
        eol = _line_ending(stored, best)
        for s, e in _pairs(_field_starts(block), len(block)):
            name = _field_name(block[s:e]).lower()
            if s != end - at or name not in missing or _block_problems(block[s:e], eol, ""):
                break
            missing.discard(name)
            end = at + e
    return _Layout(best, at, end)


def split_added_headers(stored: bytes, submitted: bytes) -> tuple[bytes, bytes]:
    """Split ``stored`` into ``(prepended fields, the rest)``.

    The split is where ``submitted`` (as is, with a final CRLF added, or line-ending
    normalised) begins in ``stored``, found by matching its own first bytes; the rest may
    hold fields the submission server added at the end of the header block
    (:data:`SUBMISSION_FIELDS`). When ``stored`` is not ``submitted`` plus such additions,
    the split is the best guess for a readable diff.
    """
    layout = _layout(stored, submitted)
    return stored[: layout.prepended], stored[layout.prepended :]


def _layout(stored: bytes, submitted: bytes) -> _Layout:
    variants = [submitted]
    if not submitted.endswith(b"\r\n"):
        variants.append(submitted + b"\r\n")  # SMTP clients add the final CRLF
    variants.append(relayed_form(submitted))  # the relay's stray CR/LF rule
    for wanted in dict.fromkeys(variants):
        found = _locate(stored, wanted)
        if found is not None:
            return found
    return _best_guess(stored, submitted)


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte (``min(len)`` when one is a prefix of the other)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    # Binary search on equal prefixes: O(n log n) memcmp, fine for 60 MB messages.
    while high - low > 4096:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    for i in range(low, high):
        if a[i] != b[i]:
            return i
    return high


def _byte_diff(expected: bytes, actual: bytes, what: str) -> list[str]:
    at = _first_difference(expected, actual)
    lines = [
        f"{what}: first difference at byte {at} (expected {len(expected)} bytes, got {len(actual)})"
    ]
    start = max(0, expected.rfind(b"\n", 0, max(0, at - _DIFF_WINDOW)) + 1)
    exp = expected[start : at + _DIFF_WINDOW].splitlines(keepends=True)
    act = actual[start : at + _DIFF_WINDOW].splitlines(keepends=True)
    diff = difflib.unified_diff(
        [repr(x)[2:-1] for x in exp],
        [repr(x)[2:-1] for x in act],
        "expected",
        "actual",
        lineterm="",
        n=2,
    )
    shown = list(diff)
    lines += [f"  {line}" for line in shown[:_DIFF_LINES]]
    if len(shown) > _DIFF_LINES:
        lines.append(f"  ... ({len(shown) - _DIFF_LINES} more diff lines)")
    return lines


@dataclass(frozen=True)
class RoundtripOutcome:
    """What happened to one message on its way through the stack.

    Attributes:
        submitted: the bytes handed to the SMTP client (after :func:`canonical_form` when
            :func:`roundtrip_eml` converted them).
        stored: the bytes the recipient's mailbox holds.
        fetched: the bytes downloaded by the first retrieval method.
        fetched_by: every download, by method (``"imap"``, ``"pop3"``).
        added_headers: the fields prepended to ``stored`` by the servers on the way.
        message: the stored message, parsed (``.stored`` has the mailbox and UID).
        allowed_added: the field-name patterns that count as trace or filter fields.
        submission_added: the fields the submission server added at the end of the
            message's header block because the message lacked them (``b""`` when none; see
            :data:`SUBMISSION_FIELDS`).
        submission_added_at: the offset of ``submission_added`` in ``stored``.
        original: the bytes given to :func:`roundtrip_eml`, when ``submitted`` is their
            canonical form rather than the same bytes (``None`` otherwise).
    """

    submitted: bytes = field(repr=False)
    stored: bytes = field(repr=False)
    fetched: bytes = field(repr=False)
    fetched_by: Mapping[str, bytes] = field(repr=False)
    added_headers: bytes
    message: DeliveredMessage | None = field(default=None, repr=False)
    allowed_added: tuple[str, ...] = TRACE_FIELDS
    submission_added: bytes = b""
    submission_added_at: int = field(default=0, repr=False)
    original: bytes | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        submitted: bytes,
        stored: bytes,
        fetched_by: Mapping[str, bytes],
        *,
        message: DeliveredMessage | None = None,
        allowed_added: Sequence[str] = TRACE_FIELDS,
        original: bytes | None = None,
    ) -> RoundtripOutcome:
        """Find what the servers added and wrap the results.

        Args:
            submitted: what was sent, byte for byte.
            stored: what the store holds.
            fetched_by: at least one download, by method name.
            message: the parsed stored message, if at hand.
            allowed_added: patterns of fields that may be prepended.
            original: the bytes ``submitted`` was converted from, if it was.
        """
        if not fetched_by:
            raise ConfigError("fetched_by needs at least one download")
        layout = _layout(stored, submitted)
        return cls(
            submitted=submitted,
            stored=stored,
            fetched=next(iter(fetched_by.values())),
            fetched_by=dict(fetched_by),
            added_headers=stored[: layout.prepended],
            message=message,
            allowed_added=tuple(allowed_added),
            submission_added=stored[layout.inserted_at : layout.inserted_end],
            submission_added_at=layout.inserted_at,
            original=None if original == submitted else original,
        )

    @property
    def delivered(self) -> bytes:
        """The stored message without what the servers added (prepended and submission fields).

        Equal to :attr:`submitted` when the message arrived intact.
        """
        at = self.submission_added_at
        if not self.submission_added:
            return self.stored[len(self.added_headers) :]
        return (
            self.stored[len(self.added_headers) : at]
            + self.stored[at + len(self.submission_added) :]
        )

    @property
    def added_fields(self) -> list[str]:
        """Names of the prepended fields, in order (``["X-Spam-Flag", ..., "Received"]``)."""
        return _field_names(self.added_headers)

    @property
    def submission_fields(self) -> list[str]:
        """Names of the fields the submission server added (``["Message-ID", "Date"]``)."""
        return _field_names(self.submission_added)

    @property
    def unexpected_added(self) -> list[str]:
        """Prepended fields that are not trace or filter fields (should be empty)."""
        patterns = [p.lower() for p in self.allowed_added]
        return [
            name
            for name in self.added_fields
            if not any(fnmatch.fnmatchcase(name.lower(), p) for p in patterns)
        ]

    @property
    def malformed_added(self) -> list[str]:
        """What makes the added blocks (prepended, and the submission server's) other than
        whole header fields, one sentence per offending line, its bytes quoted (should be
        empty).

        Their lines must end as the message's own first line does (CRLF; bare LF for a
        message stored with bare LF), with no CR or LF elsewhere, no empty or white-space
        line, each line a field start (``Name:``) or a continuation (RFC 5322 sections 2.2,
        2.2.3, 3.2.2). Field names alone cannot tell: ``Received: ...`` followed by an empty
        line turns the message's header into body, and a CR inside it starts a new field
        for parsers that split lines at CR.
        """
        eol = _line_ending(self.stored, len(self.added_headers))
        return _block_problems(self.added_headers, eol, "prepended fields") + _block_problems(
            self.submission_added, eol, "fields added by the submission server"
        )

    @property
    def converted(self) -> str:
        """How the line endings of :attr:`original` were converted for submission ("" if not)."""
        return "" if self.original is None else _conversion_note(self.original, self.submitted)

    @property
    def downloads_match(self) -> bool:
        """Every download equals the stored copy, byte for byte."""
        return all(data == self.stored for data in self.fetched_by.values())

    @property
    def identical(self) -> bool:
        """Byte identity: downloads equal the store, which is the submission plus additions.

        The additions allowed are prepended trace and filter fields (:attr:`allowed_added`)
        and, at the end of the header block, the :data:`SUBMISSION_FIELDS` the submitted
        message lacked, both well-formed header fields (:attr:`malformed_added` empty).
        Compared with :attr:`submitted`, the canonical form when :attr:`original` was
        converted.
        """
        return (
            self.downloads_match
            and not self.unexpected_added
            and not self.malformed_added
            and (self.delivered == self.submitted)
        )

    @property
    def equivalent(self) -> bool:
        """Identity up to SMTP's line-ending normalisation (final CRLF, stray CR/LF to CRLF)
        of the message itself; the additions must still be well-formed header fields."""
        return (
            self.downloads_match
            and not self.unexpected_added
            and not self.malformed_added
            and relayed_form(self.delivered) == relayed_form(self.submitted)
        )

    def diff(self) -> str:
        """A readable account of every difference (``"identical"`` when there is none).

        Notes that are not differences (the line-ending conversion before submission, the
        fields the submission server added) come first, in parentheses after ``identical``.
        """
        notes = [self.converted] if self.converted else []
        if self.submission_added:
            notes.append(
                "added by the submission server, as the message lacked them (RFC 6409 "
                f"section 8): {', '.join(self.submission_fields)}"
            )
        if self.identical:
            return f"identical ({'; '.join(notes)})" if notes else "identical"
        lines = [f"note: {note}" for note in notes]
        for method, data in self.fetched_by.items():
            if data != self.stored:
                lines += _byte_diff(self.stored, data, f"{method.upper()} download vs stored")
        if self.unexpected_added:
            lines.append(
                f"prepended fields that are not trace fields: {self.unexpected_added} "
                f"(allowed: {', '.join(self.allowed_added)})"
            )
        lines += [
            f"added fields that are not well-formed header fields: {problem}"
            for problem in self.malformed_added
        ]
        if self.delivered != self.submitted:
            note = (
                " (equal after line-ending normalisation)"
                if relayed_form(self.delivered) == relayed_form(self.submitted)
                else ""
            )
            what = "canonical form" if self.original is not None else "bytes"
            lines += _byte_diff(
                self.submitted,
                self.delivered,
                f"stored message after {len(self.added_fields)} prepended field(s) "
                f"vs submitted {what}{note}",
            )
        return "\n".join(lines)


def _pairs(starts: list[int], end: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each field, given the field starts and where the last one ends."""
    return list(zip(starts, [*starts[1:], end][: len(starts)], strict=True))


# -- clients ---------------------------------------------------------------------------------


def send_eml(
    target: MailStack | Endpoint,
    raw: bytes,
    *,
    sender: str | None = None,
    recipient: str | Sequence[str] | None = None,
    mail_options: Sequence[str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    canonicalize: bool = True,
) -> dict[str, tuple[int, bytes]]:
    """Submit ``raw`` over SMTP with AUTH, in SMTP's canonical form unless told otherwise.

    Args:
        target: a stack (its sender's domain's implicit-TLS submission port and the sender's
            password are used) or an SMTP :class:`~roundtrip.config.Endpoint` with credentials
            (``implicit`` or ``starttls``).
        raw: the message.
        sender: envelope sender; the stack's first user, or the endpoint's user, by default.
        recipient: envelope recipient(s); the stack's first user of its last domain by
            default (required with an endpoint).
        mail_options: MAIL FROM parameters; :func:`smtp_options` by default.
        context: the TLS context; the stack's (or the system's) verifying one by default.
        timeout: seconds for each socket operation.
        canonicalize: send :func:`canonical_form` of ``raw`` (bare LF and CR to CRLF, final
            CRLF), as a mail client does; False sends ``raw`` byte for byte (smtplib still
            appends a final CRLF when it is missing, and dot-stuffs).

    Returns:
        smtplib's refused-recipients dict (empty when all were accepted).

    Raises:
        smtplib.SMTPException, ssl.SSLError, OSError: as smtplib raises them.
    """
    if isinstance(target, MailStack):
        user = _find_user(target, sender) if sender else target.user()
        ep = target.endpoints(user.domain)
        endpoint = Endpoint(
            "smtp",
            "implicit",
            ep.host,
            ep.ports["submissions"],
            user.address,
            user.password,
            ep.hostname,
        )
        context = context or target.client_context()
        if recipient is None:
            recipient = target.user(target.config.domains[-1]).address
    else:
        endpoint = target
        context = context or ssl.create_default_context()
        if recipient is None:
            raise ConfigError("send_eml to an endpoint needs a recipient")
    if canonicalize:
        raw = canonical_form(raw)
    mail_from = sender or endpoint.user
    rcpts = [recipient] if isinstance(recipient, str) else list(recipient)
    options = (
        list(mail_options) if mail_options is not None else smtp_options(raw, mail_from, *rcpts)
    )
    client: smtplib.SMTP
    if endpoint.tls == "implicit":
        client = smtplib.SMTP_SSL(
            endpoint.host,
            endpoint.port,
            local_hostname="roundtrip.test",
            timeout=timeout,
            context=context,
        )
    else:
        client = smtplib.SMTP(
            endpoint.host, endpoint.port, local_hostname="roundtrip.test", timeout=timeout
        )
    with client:
        if endpoint.tls == "starttls":
            client.starttls(context=context)
        if endpoint.user:
            client.login(endpoint.user, endpoint.password)
        return client.sendmail(mail_from, rcpts, raw, mail_options=options)


def _find_user(stack: MailStack, address: str) -> User:
    for user in stack.users:
        if user.address.lower() == address.lower():
            return user
    known = ", ".join(u.address for u in stack.users)
    raise ConfigError(f"{address!r} is not a user of this stack ({known})")


def _user_password(stack: MailStack, address: str) -> str:
    return _find_user(stack, address).password


def download_imap(
    stack: MailStack,
    user: str,
    uid: int,
    *,
    mailbox: str = "INBOX",
    timeout: float = 30.0,
) -> bytes:
    """Download one stored message's exact octets over IMAPS, with imapclient.

    Logs in as ``user`` (the stack knows the password), selects ``mailbox`` read-only
    (``EXAMINE``) and sends ``UID FETCH uid (BODY.PEEK[])``, so the ``\\Seen`` flag stays as
    it was. The literal comes back byte for byte (imapclient checks its announced length).

    Unlike :func:`roundtrip.probes.fetch.fetch_imap`, which searches for a tagged message
    until a deadline and times each step, this reads one message whose UID is known.

    Args:
        stack: the running stack that stored the message.
        user: the mailbox owner's address (a user of the stack).
        uid: the message's UID (``DeliveredMessage.stored.uid``).
        mailbox: the folder holding it (encoded as modified UTF-7 on the wire).
        timeout: seconds for the connection and each read.

    Returns:
        The message as the server sends it for ``BODY[]``.

    Raises:
        ValueError: ``user`` is not a user of the stack.
        LookupError: ``mailbox`` cannot be selected, or it holds no message with that UID.
        imapclient.exceptions.LoginError: the server refused the login.
        imapclient.exceptions.IMAPClientError, ssl.SSLError, OSError: other IMAP, TLS or
            socket failures, as imapclient raises them (``IMAPClientError`` is
            ``imaplib.IMAP4.error``).
    """
    password = _user_password(stack, user)
    ep = stack.endpoints(user.rpartition("@")[2])
    with IMAPClient(
        ep.host,
        port=ep.ports["imaps"],
        use_uid=True,
        ssl=True,
        ssl_context=stack.client_context(),
        timeout=timeout,
    ) as client:
        client.login(user, password)
        try:
            client.select_folder(mailbox, readonly=True)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            raise LookupError(f"cannot select {mailbox!r} of {user}: {exc}") from exc
        fetched = client.fetch([uid], [b"BODY.PEEK[]"])
    body = fetched.get(uid, {}).get(b"BODY[]")
    if not isinstance(body, bytes):
        raise LookupError(f"no message with UID {uid} in {mailbox!r} of {user}: {fetched!r}")
    return body


def download_pop3(stack: MailStack, user: str, uid: int, *, timeout: float = 30.0) -> bytes:
    """Download one INBOX message's exact octets with POP3 ``RETR`` (POP3S), un-dot-stuffed.

    The message number is the position of ``uid`` in the INBOX (POP3 numbers the maildrop
    in UID order). poplib's ``retr()`` would rewrite line endings, so the multi-line reply is
    read from the connection directly.

    Unlike :func:`roundtrip.probes.fetch.fetch_pop3`, which reconnects until a tagged
    message shows up and times each step, this reads one message whose UID is known.

    Args:
        stack: the running stack that stored the message.
        user: the mailbox owner's address (a user of the stack).
        uid: the message's UID in the INBOX.
        timeout: seconds for the connection and each read.

    Returns:
        The message with the dot-stuffing of the multi-line reply removed.

    Raises:
        ValueError: ``user`` is not a user of the stack.
        LookupError: the message is not in the INBOX.
        poplib.error_proto, ssl.SSLError, OSError: as poplib raises them.
    """
    password = _user_password(stack, user)
    uids = stack.store.mailbox(user, "INBOX").uids()
    if uid not in uids:
        raise LookupError(f"no message with UID {uid} in the INBOX of {user}")
    number = uids.index(uid) + 1
    ep = stack.endpoints(user.rpartition("@")[2])
    client = poplib.POP3_SSL(
        ep.host, ep.ports["pop3s"], context=stack.client_context(), timeout=timeout
    )
    try:
        client.user(user)
        client.pass_(password)
        client.sock.sendall(f"RETR {number}\r\n".encode("ascii"))
        status = client.file.readline()
        if not status.startswith(b"+OK"):
            raise poplib.error_proto(status)
        lines = []
        while True:
            line = client.file.readline()
            if not line:
                raise poplib.error_proto(b"connection closed inside RETR")
            if line == b".\r\n":
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)
    finally:
        try:
            client.quit()
        except (poplib.error_proto, OSError):
            client.close()


def roundtrip_eml(
    stack: MailStack,
    raw: bytes,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    retrieve: Retrieve = "imap",
    mailbox: str = "INBOX",
    mail_options: Sequence[str] | None = None,
    allowed_added: Sequence[str] = TRACE_FIELDS,
    timeout: float | None = None,
    canonicalize: bool = True,
) -> RoundtripOutcome:
    """Submit ``raw``, wait until it is stored, download it, and compare.

    Args:
        stack: a running stack (the ``mailstack`` fixture).
        raw: the message bytes, as read from a file.
        sender: a user of the stack; its first user by default.
        recipient: a user of the stack; the first user of its last domain by default (so the
            message crosses the relay and the recipient domain's MX).
        retrieve: ``"imap"`` (``BODY[]``), ``"pop3"`` (``RETR``) or ``"both"``.
        mailbox: where to expect it (POP3 sees only ``INBOX``).
        mail_options: MAIL FROM parameters; detected from the bytes by default.
        allowed_added: field-name patterns the receiving side may prepend.
        timeout: seconds to wait for delivery and for each socket operation
            (``stack.config.timeouts.wait_timeout`` by default).
        canonicalize: submit :func:`canonical_form` of ``raw`` and compare against it (the
            default, as a mail client submits a saved file); False submits and compares
            ``raw`` byte for byte, for tests of what servers do with stray CR or LF.

    Returns:
        A :class:`RoundtripOutcome`; ``assert outcome.identical, outcome.diff()``.

    Raises:
        roundtrip.NotDeliveredError: the message was not stored in time.
        ValueError: ``retrieve`` is unknown, POP3 was asked for another mailbox than INBOX,
            or the sender or recipient is not a user of the stack.
    """
    methods = {"imap": ("imap",), "pop3": ("pop3",), "both": ("imap", "pop3")}.get(retrieve)
    if methods is None:
        raise ConfigError(f"retrieve must be 'imap', 'pop3' or 'both', not {retrieve!r}")
    if "pop3" in methods and mailbox.upper() != "INBOX":
        raise ConfigError(f"POP3 reads only the INBOX, not {mailbox!r}")
    wait = stack.config.timeouts.wait_timeout if timeout is None else timeout
    to = (
        _find_user(stack, recipient).address
        if recipient
        else stack.user(stack.config.domains[-1]).address
    )
    submitted = canonical_form(raw) if canonicalize else raw
    before = stack.store.mailbox(to, mailbox).uidnext
    send_eml(
        stack,
        submitted,
        sender=sender,
        recipient=to,
        mail_options=mail_options,
        timeout=max(wait, 1.0),
        canonicalize=False,
    )
    message = stack.wait_for(
        to, mailbox=mailbox, match=lambda m: m.stored.uid >= before, timeout=wait
    )
    uid = message.stored.uid
    fetched: dict[str, bytes] = {}
    for method in methods:
        if method == "imap":
            fetched[method] = download_imap(stack, to, uid, mailbox=mailbox, timeout=max(wait, 1.0))
        else:
            fetched[method] = download_pop3(stack, to, uid, timeout=max(wait, 1.0))
    return RoundtripOutcome.build(
        submitted,
        message.raw,
        fetched,
        message=message,
        allowed_added=allowed_added,
        original=raw if canonicalize else None,
    )
