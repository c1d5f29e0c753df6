"""Where a message's header block ends: the one rule every reader of raw messages uses.

RFC 5322 section 2.1: a message is header fields, then optionally an empty line and the body.
The rule, for the header block starting at ``start``:

- A line ends in CRLF or in a bare LF. A bare CR is an octet of its line (RFC 5322 section
  2.3 allows CR only before LF), as IMAP reads it (roundtrip/protocols/_mime.py), unless
  ``bare_cr`` is set (below).
- The header block is the run of lines at the start that are each a header field (a name of
  printable ASCII but ``:``, optional space or tab, then ``:``: RFC 5322 section 2.2, with the
  space of section 4.5) or a continuation (starting with a space or tab, section 2.2.3).
- It ends at the first line that is neither: an empty line, which is the separator and not
  part of the body; or any other line, which starts the body with no separator, as the
  email package reads it (email/feedparser.py, ``MissingHeaderBodySeparatorDefect``); or the
  end of the data. An empty line first means no header at all.

So ``hello\\r\\nMessage-ID: <x>\\r\\n\\r\\n`` has no header: its Message-ID line is body text
for every reader here, as for IMAP's BODY[HEADER] and the email package.

Where a caller reads differently, and why (each says so where it calls):

- ``bare_cr=True`` also ends a line at a bare CR, as the email package does
  (email/feedparser.py, ``NLCRE``): roundtrip/message.py hands the body to that package and
  hashes it, so it splits where the package does.
- :func:`first_empty_line` is the wider reading, every line up to the first empty line
  whatever it holds: roundtrip/protocols/smtp.py checks submitted mail over it (From:, bare
  CR, hop count, field size), so that a reader that does not stop at a stray line (older
  software, a later hop that turns a bare CR into a line break) sees no field the checks
  missed.
- roundtrip/protocols/_dkimcore.py keeps its own split: RFC 6376 section 3.4 works on CRLF
  lines only, and its signed fields skip a stray line rather than stop there. For a CRLF
  message of fields it splits where this rule does.

Not followed from the email package: it also takes a ``From `` line and a line starting
with ``:`` for header lines and refuses a space before the colon; RFC 5322 section 2.2 has
none of these (``From `` is the mbox separator).

Both functions search with compiled expressions and ``bytes.find`` from ``start``: the body
past the empty line is never scanned, whatever its size.
"""

from __future__ import annotations

import re

__all__ = ["first_empty_line", "header_bounds"]

# Each line of the header block: a field or a continuation, with its line ending (or the
# end of the data). The two branches start with different octets and each repetition
# consumes at least one, so the match is linear in the header's size.
_LINES = re.compile(rb"(?:(?:[!-9;-~]+[ \t]*:|[ \t])[^\n]*(?:\n|\Z))*")
_LINES_CR = re.compile(rb"(?:(?:[!-9;-~]+[ \t]*:|[ \t])[^\r\n]*(?:\r\n|\r|\n|\Z))*")


def header_bounds(
    raw: bytes, start: int = 0, stop: int | None = None, *, bare_cr: bool = False
) -> tuple[int, int]:
    r"""``(end, body)`` of the message in ``raw[start:stop]``, by the rule above.

    ``raw[start:end]`` is the header block, its last line's ending included;
    ``raw[end:body]`` is the empty line that ends it (CRLF, LF, or with ``bare_cr`` a bare
    CR), empty when there is none (the body then starts with a line that is not a field, or
    the data ends).
    """
    if stop is None:
        stop = len(raw)
    found = (_LINES_CR if bare_cr else _LINES).match(raw, start, stop)
    end = found.end() if found else start
    if raw.startswith(b"\r\n", end, stop):
        return end, end + 2
    if end < stop and (raw[end] == 0x0A or (bare_cr and raw[end] == 0x0D)):
        return end, end + 1
    return end, end


def first_empty_line(raw: bytes) -> tuple[int, int]:
    """``(end, body)`` as :func:`header_bounds` gives them, but with every line up to the
    first empty line (CRLF or LF) counted as header, whether or not it is a field.

    ``end`` is ``len(raw)`` when ``raw`` has no empty line.
    """
    if raw.startswith(b"\n"):
        return 0, 1
    if raw.startswith(b"\r\n"):
        return 0, 2
    # An empty line follows an LF: "\n\n" or "\n\r\n", the earliest one. Searched for first is
    # the kind the first line's ending makes likely, and the other only before it: a big
    # body after the empty line is not scanned.
    first = raw.find(b"\n")
    pairs = (b"\n\r\n", b"\n\n") if first > 0 and raw[first - 1] == 0x0D else (b"\n\n", b"\n\r\n")
    best = -1
    limit = len(raw)
    for pair in pairs:
        at = raw.find(pair, 0, limit)
        if at != -1:
            best, limit = at, at + 1
    if best == -1:
        return len(raw), len(raw)
    return best + 1, best + (2 if raw[best + 1] == 0x0A else 3)
