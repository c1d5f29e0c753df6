"""The one header-block rule (roundtrip/_headerblock.py) against the email package, and every
reader of raw messages against the rule."""

from __future__ import annotations

import email.parser
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip import testing
from roundtrip._headerblock import first_empty_line, header_bounds
from roundtrip.message import ReceivedMessage
from roundtrip.probes import roundtrip as probe
from roundtrip.protocols import _dkimcore, _mime, filter, smtp
from roundtrip.store import message_id_of


@pytest.mark.parametrize(
    ("raw", "bounds"),
    [
        (b"A: 1\r\n\r\nbody", (6, 8)),
        (b"A: 1\n\nbody", (5, 6)),
        (b"A: 1\n\r\nbody", (5, 7)),  # LF field, CRLF empty line
        (b"A: 1\r\n\tfolded\r\n\r\nb", (15, 17)),
        (b"\r\nA: 1\r\n\r\n", (0, 2)),  # no header at all
        (b"hello\r\nA: 1\r\n\r\n", (0, 0)),  # a line that is not a field starts the body
        (b"A: 1\r\nhello\r\n\r\n", (6, 6)),
        (b"A : 1\r\n\r\n", (7, 9)),  # a space before the colon (RFC 5322 section 4.5)
        (b"A: 1\rB: 2\r\n\r\n", (11, 13)),  # a bare CR is part of its line
        (b"A: 1", (4, 4)),
        (b"", (0, 0)),
    ],
)
def test_headerblock_bounds(raw: bytes, bounds: tuple[int, int]) -> None:
    assert header_bounds(raw) == bounds


def test_headerblock_bare_cr_ends_a_line_only_when_asked() -> None:
    raw = b"A: 1\r\rbody"
    assert header_bounds(raw, bare_cr=True) == (5, 6)
    assert header_bounds(raw) == (len(raw), len(raw))


def test_headerblock_first_empty_line_reads_past_a_line_that_is_not_a_field() -> None:
    raw = b"hello\r\nFrom: x\n\r\nbody\n\n"
    assert first_empty_line(raw) == (15, 17)
    assert header_bounds(raw) == (0, 0)  # the twin: the rule stops at "hello"
    assert first_empty_line(b"A: 1\r\nB: 2") == (10, 10)


def test_headerblock_does_not_scan_the_body() -> None:
    """A body full of lines that are not fields is not read past its first line."""
    body = b"x" * 1_000_000 + b"\n" + b"A: 1\n" * 1000
    raw = b"A: 1\r\n\r\n" + body
    assert header_bounds(raw, 0, 200) == header_bounds(raw)
    assert first_empty_line(raw) == header_bounds(raw)


# -- against the email package -----------------------------------------------------------------

_NAMES = st.sampled_from(["Subject", "Message-ID", "X-A", "To", "Received"])
_TEXT = st.text(alphabet="abc <>@.-", max_size=12)
_LINE = st.one_of(
    st.tuples(st.just("field"), _NAMES, _TEXT),
    st.tuples(st.just("cont"), st.sampled_from([" ", "\t"]), _TEXT),
    # not a field: no colon, not starting with a space or tab (nor "From ", which the email
    # package takes for a header line)
    st.tuples(st.just("stray"), st.just(""), st.text(alphabet="abc", min_size=1, max_size=6)),
    st.tuples(st.just("empty"), st.just(""), st.just("")),
)


def _message(lines: list[tuple[str, str, str]], endings: list[bytes], last: bool) -> bytes:
    out = []
    for (kind, name, value), eol in zip(lines, endings, strict=False):
        text = {"field": f"{name}: {value}", "cont": name + value}.get(kind, value)
        out.append(text.encode() + eol)
    raw = b"".join(out)
    return raw if last else raw.rstrip(b"\r\n")


def _messages(endings: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        _message,
        st.lists(_LINE, max_size=8),
        st.lists(st.sampled_from(endings), min_size=8, max_size=8),
        st.booleans(),
    )


_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def _email_body(raw: bytes) -> bytes:
    payload = _PARSER.parsebytes(raw).get_payload()
    assert isinstance(payload, str)
    return payload.encode("ascii")


@settings(max_examples=400, deadline=None)
@given(_messages([b"\r\n", b"\n", b"\r"]))
def test_headerblock_bare_cr_body_is_the_email_packages(raw: bytes) -> None:
    _, body = header_bounds(raw, bare_cr=True)
    assert raw[body:] == _email_body(raw)
    assert ReceivedMessage(raw).body == raw[body:]  # roundtrip/message.py splits so


@settings(max_examples=400, deadline=None)
@given(_messages([b"\r\n", b"\n"]))
def test_headerblock_every_reader_agrees(raw: bytes) -> None:
    end, body = header_bounds(raw)
    # Without bare CRs the rule is the email package's ...
    assert raw[body:] == _email_body(raw)
    parsed = _PARSER.parsebytes(raw)
    ids = parsed.get_all("Message-ID") or []
    assert message_id_of(raw) == (" ".join(str(ids[0]).split()).lower() if ids else "")
    # ... and IMAP's (BODY[HEADER], SEARCH HEADER) ...
    assert _mime._parse_header(raw, 0, len(raw))[1] == body
    # ... and every other reader's.
    assert ReceivedMessage(raw).body == raw[body:]
    assert filter._header_block(raw) == raw[:end]
    assert smtp._insertion_point(raw)[0] == end
    assert testing._header_block_end(raw) == end
    # The submission checks and the probe's report read the wider block, at least the
    # header block (roundtrip/probes/roundtrip.py reports a mangled line whole).
    wide_end, wide_body = first_empty_line(raw)
    assert wide_end >= end
    assert probe._split(raw) == (raw[:wide_end], raw[wide_body:])


@settings(max_examples=300, deadline=None)
@given(_messages([b"\r\n"]))
def test_headerblock_dkim_split_agrees_on_crlf_fields(raw: bytes) -> None:
    """RFC 6376 keeps its own split (roundtrip/protocols/_dkimcore.py): the same body for a
    CRLF message whose header is all fields; a stray line it skips instead."""
    end, body = header_bounds(raw)
    _, dkim_body = _dkimcore.split_message(raw)
    if first_empty_line(raw)[0] == end:
        assert dkim_body == body
    else:
        assert dkim_body > body
