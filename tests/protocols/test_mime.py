"""Tests for roundtrip.protocols._mime: pure bytes in, bytes out (no sockets needed).

Normal messages are checked against what CPython's ``email`` package parses, and the serialised
ENVELOPE/BODYSTRUCTURE against what a real IMAP client library (imapclient) parses.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
import time
from collections.abc import Iterator
from email.message import EmailMessage, Message
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response

from roundtrip.protocols import _mime
from roundtrip.protocols._mime import (
    MAX_DEPTH,
    MAX_PARTS,
    Part,
    bodystructure,
    envelope,
    header_date,
    header_values,
    parse,
    quote,
    search_text,
    section,
)

# --------------------------------------------------------------------------- fixtures

NESTED = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: nested\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"Message-ID: <nested@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="mixed"\r\n'
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--mixed\r\n"
    b'Content-Type: multipart/alternative; boundary="alt"\r\n'
    b"\r\n"
    b"--alt\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Caf=C3=A9 au lait\r\n"
    b"--alt\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\n'
    b"\r\n"
    b"<p>Caf&eacute;</p>\r\n"
    b"--alt--\r\n"
    b"\r\n"
    b"--mixed\r\n"
    b'Content-Type: application/pdf; name="report.pdf"\r\n'
    b'Content-Disposition: attachment; filename="report.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-ID: <pdf@example.com>\r\n"
    b"Content-Description: The report\r\n"
    b"Content-Language: en, de\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--mixed--\r\n"
    b"This is the epilogue.\r\n"
)

NESTED_BODYSTRUCTURE = (
    b"("
    b"("
    b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 17 1 NIL NIL NIL NIL)'
    b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 18 1 NIL NIL NIL NIL)'
    b' "ALTERNATIVE" ("BOUNDARY" "alt") NIL NIL NIL)'
    b'("APPLICATION" "PDF" ("NAME" "report.pdf") "<pdf@example.com>" "The report" "BASE64" 12'
    b' NIL ("ATTACHMENT" ("FILENAME" "report.pdf")) ("en" "de") NIL)'
    b' "MIXED" ("BOUNDARY" "mixed") NIL NIL NIL'
    b")"
)

NESTED_BODY = (
    b"("
    b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 17 1)'
    b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 18 1) "ALTERNATIVE")'
    b'("APPLICATION" "PDF" ("NAME" "report.pdf") "<pdf@example.com>" "The report" "BASE64" 12)'
    b' "MIXED")'
)

INNER = (
    b"From: Carol <carol@example.net>\r\n"
    b"Subject: =?utf-8?q?inner_caf=C3=A9?=\r\n"
    b"Date: Tue, 1 Jul 2003 10:52:37 +0200\r\n"
    b"Message-ID: <inner@example.net>\r\n"
    b"\r\n"
    b"inner line 1\r\n"
    b"inner line 2\r\n"
)

FORWARD = (
    b"From: dave@example.com\r\n"
    b"Subject: fwd\r\n"
    b"Content-Type: multipart/mixed; boundary=fw\r\n"
    b"\r\n"
    b"--fw\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"see attached\r\n"
    b"--fw\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n" + INNER + b"--fw--\r\n"
)

SIMPLE = (
    b"From: Joe <joe@example.com>\r\n"
    b"To: Ann <ann@example.com>\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"\r\n"
    b"Hello\r\nworld\r\n"
)

RFC2231 = (
    b"From: e@example.com\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n'
    b"\r\n"
    b"--b\r\n"
    b"Content-Type: application/octet-stream;\r\n"
    b"\tname*0*=utf-8''%E2%82%AC%20rates;\r\n"
    b'\tname*1=".txt"\r\n'
    b"Content-Disposition: attachment;\r\n"
    b" filename*=iso-8859-1'en'%A3%20rates.txt\r\n"
    b"\r\n"
    b"data\r\n"
    b"--b--\r\n"
)


def _generated() -> list[bytes]:
    """Normal messages built by the email package itself (CRLF, as an IMAP store holds them)."""
    out: list[bytes] = []
    plain = EmailMessage()
    plain["From"] = "Fred <fred@example.com>"
    plain["To"] = "a@example.com, B <b@example.com>"
    plain["Subject"] = "Grüße aus Köln"
    plain.set_content("Grüße\nzweite Zeile\n")
    out.append(plain.as_bytes(policy=email.policy.SMTP))

    mixed = EmailMessage()
    mixed["From"] = "x@example.com"
    mixed["Subject"] = "report"
    mixed.set_content("see attachment\n")
    mixed.add_alternative("<p>see attachment</p>\n", subtype="html")
    mixed.add_attachment(
        bytes(range(256)), maintype="application", subtype="octet-stream", filename="blob.bin"
    )
    mixed.add_attachment("a,b\n1,2\n", subtype="csv", filename="t.csv")
    out.append(mixed.as_bytes(policy=email.policy.SMTP))

    wrapper = EmailMessage()
    wrapper["From"] = "y@example.com"
    wrapper.set_content("forwarding\n")
    inner = EmailMessage()
    inner["From"] = "z@example.com"
    inner["Subject"] = "inner"
    inner.set_content("inner body\n")
    wrapper.add_attachment(inner)
    out.append(wrapper.as_bytes(policy=email.policy.SMTP))
    return out


CORPUS = [NESTED, FORWARD, SIMPLE, RFC2231, *_generated()]
CORPUS_IDS = ["nested", "forward", "simple", "rfc2231", "gen-plain", "gen-mixed", "gen-fwd"]

# --------------------------------------------------------------------------- helpers

_LITERAL = re.compile(rb"\{(\d+)\}\r\n")


def read_imap(data: bytes) -> Any:
    """Read one IMAP parenthesised value (lists, quoted, literals, NIL, numbers) or fail."""
    stack: list[list[Any]] = [[]]
    pos = 0
    n = len(data)
    while pos < n:
        c = data[pos : pos + 1]
        if c == b" ":
            pos += 1
        elif c == b"(":
            stack.append([])
            pos += 1
        elif c == b")":
            assert len(stack) > 1, f"unbalanced ')' at {pos}"
            done = stack.pop()
            stack[-1].append(done)
            pos += 1
        elif c == b'"':
            out = bytearray()
            pos += 1
            while True:
                assert pos < n, "unterminated quoted string"
                ch = data[pos]
                if ch == 0x5C:
                    assert data[pos + 1] in b'\\"', "bad escape"
                    out.append(data[pos + 1])
                    pos += 2
                elif ch == 0x22:
                    pos += 1
                    break
                else:
                    assert ch not in b"\r\n" and ch < 0x80, "bad byte in quoted string"
                    out.append(ch)
                    pos += 1
            stack[-1].append(bytes(out))
        elif c == b"{":
            match = _LITERAL.match(data, pos)
            assert match is not None, f"bad literal at {pos}"
            size = int(match.group(1))
            start = match.end()
            assert start + size <= n, "short literal"
            stack[-1].append(data[start : start + size])
            pos = start + size
        else:
            match = re.compile(rb"NIL|[0-9]+").match(data, pos)
            assert match is not None, f"unexpected {data[pos : pos + 20]!r}"
            token = match.group(0)
            stack[-1].append(None if token == b"NIL" else int(token))
            pos = match.end()
    assert len(stack) == 1, "unbalanced '('"
    assert len(stack[0]) == 1, "more than one value"
    return stack[0][0]


def balanced(data: bytes) -> bool:
    """Parentheses balance outside quoted strings and literals."""
    depth = 0
    pos = 0
    n = len(data)
    while pos < n:
        ch = data[pos]
        if ch == 0x22:
            pos += 1
            while pos < n and data[pos] != 0x22:
                pos += 2 if data[pos] == 0x5C else 1
        elif ch == 0x7B and (match := _LITERAL.match(data, pos)):
            pos = match.end() + int(match.group(1)) - 1
        elif ch == 0x28:
            depth += 1
        elif ch == 0x29:
            depth -= 1
            if depth < 0:
                return False
        pos += 1
    return depth == 0


def imapclient_fetch(**items: bytes) -> dict[bytes, Any]:
    """Parse ``* 1 FETCH (ITEM value ...)`` the way imapclient does after imaplib read it."""
    line = b"1 (" + b" ".join(name.encode() + b" " + v for name, v in items.items()) + b")"
    chunks: list[Any] = []
    pos = 0
    for match in _LITERAL.finditer(line):
        if match.start() < pos:
            continue
        size = int(match.group(1))
        chunks.append(
            (line[pos : match.start()] + b"{%d}" % size, line[match.end() : match.end() + size])
        )
        pos = match.end() + size
    chunks.append(line[pos:])
    parsed: dict[bytes, Any] = parse_fetch_response(chunks)[1]
    return parsed


def our_walk(root: Part) -> Iterator[Part]:
    """Pre-order, like Message.walk(): encapsulated messages are subparts."""
    work = [root]
    while work:
        node = work.pop()
        yield node
        if node.message is not None:
            work.append(node.message)
        work.extend(reversed(node.children))


def subparts(message: Message) -> list[Message]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return cast("list[Message]", payload)


def python_leaf_bytes(part: Message) -> bytes:
    """The undecoded payload bytes of a leaf, as the email package holds them."""
    if part.get("content-transfer-encoding", "").lower() in ("base64", "quoted-printable"):
        payload = part.get_payload()
        assert isinstance(payload, str)
        return payload.encode("ascii")
    data = part.get_payload(decode=True)  # 7bit/8bit: the raw bytes, unchanged
    assert isinstance(data, bytes)
    return data


# --------------------------------------------------------------------------- parse vs email


@pytest.mark.parametrize("raw", CORPUS, ids=CORPUS_IDS)
def test_parse_matches_email_package(raw: bytes) -> None:
    ours = list(our_walk(parse(raw)))
    theirs = list(email.message_from_bytes(raw).walk())
    assert [p.content_type for p in ours] == [m.get_content_type() for m in theirs]
    for mine, python in zip(ours, theirs, strict=True):
        if mine.header("content-type") is None:
            assert python.get("content-type") is None
            continue
        for name, _ in mine.params:
            expected = python.get_param(name)
            if isinstance(expected, tuple):
                expected = email.utils.collapse_rfc2231_value(expected)
            assert mine.param(name) == expected
        assert len(mine.children) == (
            len(python.get_payload()) if python.get_content_maintype() == "multipart" else 0
        )


@pytest.mark.parametrize("raw", CORPUS, ids=CORPUS_IDS)
def test_section_payload_matches_email_package(raw: bytes) -> None:
    python = email.message_from_bytes(raw)
    # Depth-first over Python's tree with IMAP part numbers.
    work: list[tuple[tuple[int, ...], Message]] = [((), python)]
    checked = 0
    while work:
        number, msg = work.pop()
        if msg.is_multipart():
            work.extend(((*number, i), sub) for i, sub in enumerate(subparts(msg), 1))
        elif msg.get_content_type() == "message/rfc822":
            inner = subparts(msg)[0]
            if inner.is_multipart():
                work.extend(((*number, i), sub) for i, sub in enumerate(subparts(inner), 1))
            else:
                assert section(raw, (*number, 1)) == python_leaf_bytes(inner)
        else:
            assert section(raw, number or (1,)) == python_leaf_bytes(msg)
            checked += 1
    assert checked >= 1


# --------------------------------------------------------------------------- BODYSTRUCTURE


def test_bodystructure_nested_literal() -> None:
    assert bodystructure(NESTED) == NESTED_BODYSTRUCTURE


def test_bodystructure_body_without_extension_data() -> None:
    assert bodystructure(NESTED, extended=False) == NESTED_BODY


def test_bodystructure_parsed_by_imapclient() -> None:
    fetched = imapclient_fetch(
        BODYSTRUCTURE=bodystructure(NESTED), BODY=bodystructure(NESTED, extended=False)
    )
    structure = fetched[b"BODYSTRUCTURE"]
    assert structure.is_multipart
    alternative, attachment = structure[0]
    assert alternative[1] == b"ALTERNATIVE"
    assert attachment[:2] == (b"APPLICATION", b"PDF")
    assert fetched[b"BODY"][1] == b"MIXED"


def test_bodystructure_simple_message() -> None:
    assert bodystructure(SIMPLE) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 14 2 NIL NIL NIL NIL)'
    )


def test_bodystructure_message_rfc822() -> None:
    value = read_imap(bodystructure(FORWARD))
    text, rfc822 = value[0], value[1]
    assert value[2] == b"MIXED"
    assert text[:2] == [b"TEXT", b"PLAIN"]
    assert rfc822[:2] == [b"MESSAGE", b"RFC822"]
    assert rfc822[6] == len(INNER) - 2  # the CRLF before "--fw--" belongs to the delimiter
    envelope_value, body, lines = rfc822[7], rfc822[8], rfc822[9]
    assert envelope_value[1] == b"=?utf-8?q?inner_caf=C3=A9?="
    assert envelope_value[2] == [[b"Carol", None, b"carol", b"example.net"]]
    assert body[:2] == [b"TEXT", b"PLAIN"]
    assert body[6] == len(b"inner line 1\r\ninner line 2")
    assert lines == INNER.count(b"\n")
    assert rfc822[11] == [b"INLINE", None]


def test_bodystructure_rfc2231_filename() -> None:
    python = subparts(email.message_from_bytes(RFC2231))[0]
    part = parse(RFC2231).children[0]
    assert part.param("name") == "€ rates.txt"
    name = python.get_param("name")
    assert isinstance(name, tuple)
    assert part.param("name") == email.utils.collapse_rfc2231_value(name)
    value = read_imap(bodystructure(RFC2231))[0]
    # Non-ASCII values are sent in RFC 2231 form, keeping the response 7-bit.
    assert value[2] == [b"NAME*", b"utf-8''%E2%82%AC%20rates.txt"]
    assert value[8] == [b"ATTACHMENT", [b"FILENAME*", b"utf-8''%C2%A3%20rates.txt"]]
    assert python.get_filename() == "£ rates.txt"


def test_bodystructure_ascii_rfc2231_value_is_plain() -> None:
    raw = b"Content-Type: text/plain; name*0=a; name*1=b.txt; charset*=us-ascii'en'x\r\n\r\nx"
    assert read_imap(bodystructure(raw))[2] == [b"NAME", b"ab.txt", b"CHARSET", b"x"]


def test_bodystructure_digest_defaults_to_message_rfc822() -> None:
    raw = (
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
        b"Subject: one\r\n\r\nbody one\r\n--d--\r\n"
    )
    value = read_imap(bodystructure(raw))
    assert value[0][:2] == [b"MESSAGE", b"RFC822"]
    assert value[0][7][1] == b"one"


def test_bodystructure_multipart_without_boundary_degrades_to_text() -> None:
    raw = b"Content-Type: multipart/mixed\r\n\r\nno parts here\r\n"
    assert read_imap(bodystructure(raw))[:2] == [b"TEXT", b"PLAIN"]
    twin = b"Content-Type: multipart/mixed; boundary=zz\r\n\r\nno delimiter line\r\n"
    assert read_imap(bodystructure(twin))[:2] == [b"TEXT", b"PLAIN"]


def test_bodystructure_missing_close_delimiter_runs_to_end() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\none\r\n--b\r\n\r\ntwo\r\n"
    assert section(raw, (1,)) == b"one"
    assert section(raw, (2,)) == b"two\r\n"
    assert section(raw, (3,)) == b""


def test_bodystructure_boundary_must_be_alone_on_its_line() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\none --b\r\n--bx\r\n"
        b"--b  \r\n\r\ntwo\n--b--\n"
    )
    assert section(raw, (1,)) == b"one --b\r\n--bx"
    assert section(raw, (2,)) == b"two"


def test_bodystructure_bare_lf_message() -> None:
    raw = NESTED.replace(b"\r\n", b"\n")
    value = read_imap(bodystructure(raw))
    assert value[0][0][6] == len(b"Caf=C3=A9 au lait")
    assert section(raw, (2,), "MIME").endswith(b"de\n\n")


def test_bodystructure_parts_cap() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n\r\nx\r\n" * (
        MAX_PARTS + 50
    )
    tree = parse(raw)
    assert len(tree.children) == MAX_PARTS - 1
    assert balanced(bodystructure(raw, tree=tree))


# --------------------------------------------------------------------------- sections


def test_section_whole_message_and_header_and_text() -> None:
    assert section(NESTED, ()) == NESTED
    header, _, text = NESTED.partition(b"\r\n\r\n")
    assert section(NESTED, (), "HEADER") == header + b"\r\n\r\n"
    assert section(NESTED, (), "TEXT") == text
    assert section(NESTED, (), "MIME") == b""  # MIME needs a part number


def test_section_header_fields() -> None:
    assert section(NESTED, (), "HEADER.FIELDS", ("SUBJECT", "from")) == (
        b"From: Alice <alice@example.com>\r\nSubject: nested\r\n\r\n"
    )
    assert section(NESTED, (), "HEADER.FIELDS", ("X-Absent",)) == b"\r\n"


def test_section_header_fields_not() -> None:
    got = section(NESTED, (), "HEADER.FIELDS.NOT", ("subject", "from", "date", "mime-version"))
    assert got == (
        b"To: bob@example.org\r\nMessage-ID: <nested@example.com>\r\n"
        b'Content-Type: multipart/mixed; boundary="mixed"\r\n\r\n'
    )


def test_section_header_fields_keeps_folding() -> None:
    got = section(RFC2231, (1,), "MIME")
    assert got.startswith(b"Content-Type: application/octet-stream;\r\n\tname*0*")
    inner = section(FORWARD, (2,), "HEADER.FIELDS", ("subject",))
    assert inner == b"Subject: =?utf-8?q?inner_caf=C3=A9?=\r\n\r\n"


def test_section_mime_of_part() -> None:
    assert section(NESTED, (2,), "MIME") == (
        b'Content-Type: application/pdf; name="report.pdf"\r\n'
        b'Content-Disposition: attachment; filename="report.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-ID: <pdf@example.com>\r\n"
        b"Content-Description: The report\r\n"
        b"Content-Language: en, de\r\n\r\n"
    )
    assert section(NESTED, (1, 2), "MIME") == b'Content-Type: text/html; charset="utf-8"\r\n\r\n'


def test_section_parts() -> None:
    assert section(NESTED, (1, 1)) == b"Caf=C3=A9 au lait"
    assert section(NESTED, (1, 2)) == b"<p>Caf&eacute;</p>"
    assert section(NESTED, (2,)) == b"JVBERi0xLjQK"
    assert section(NESTED, (1,)).startswith(b"--alt\r\n")
    assert section(NESTED, (1,)).endswith(b"--alt--\r\n")


def test_section_message_rfc822_part() -> None:
    assert section(FORWARD, (2,)) == INNER[:-2]
    header, _, text = INNER[:-2].partition(b"\r\n\r\n")
    assert section(FORWARD, (2,), "HEADER") == header + b"\r\n\r\n"
    assert section(FORWARD, (2,), "TEXT") == text
    assert section(FORWARD, (2, 1)) == text  # a non-multipart encapsulated body is part 1
    assert section(FORWARD, (2,), "MIME").startswith(b"Content-Type: message/rfc822\r\n")


def test_section_text_of_non_message_part_is_empty() -> None:
    assert section(NESTED, (2,), "TEXT") == b""
    assert section(NESTED, (2,), "HEADER") == b""
    assert section(NESTED, (1, 1), "HEADER.FIELDS", ("content-type",)) == b""


def test_section_non_multipart_message_has_only_part_one() -> None:
    assert section(SIMPLE, (1,)) == b"Hello\r\nworld\r\n"
    assert section(SIMPLE, (1,), "MIME") == section(SIMPLE, (), "HEADER")
    assert section(SIMPLE, (2,)) == b""


@pytest.mark.parametrize("part", [(0,), (3,), (1, 3), (2, 1), (1, 1, 1), (99, 1), (-1,)])
def test_section_missing_part_returns_empty(part: tuple[int, ...]) -> None:
    assert section(NESTED, part) == b""
    assert section(NESTED, part, "MIME") == b""


def test_section_unknown_text_returns_empty() -> None:
    assert section(NESTED, (), "BOGUS") == b""


def test_section_message_without_body() -> None:
    raw = b"Subject: only headers\r\nX: y"
    assert section(raw, (), "HEADER") == raw
    assert section(raw, (), "TEXT") == b""
    assert section(raw, (), "HEADER.FIELDS", ("x",)) == b"X: y\r\n\r\n"


# --------------------------------------------------------------------------- ENVELOPE


def test_envelope_parsed_by_imapclient() -> None:
    env = imapclient_fetch(ENVELOPE=envelope(NESTED))[b"ENVELOPE"]
    assert env.subject == b"nested"
    assert env.message_id == b"<nested@example.com>"
    assert env.date is not None and env.date.year == 1994
    assert [(a.name, a.mailbox, a.host) for a in env.from_] == [
        (b"Alice", b"alice", b"example.com")
    ]
    assert env.sender == env.from_ and env.reply_to == env.from_
    assert [(a.mailbox, a.host) for a in env.to] == [(b"bob", b"example.org")]
    assert env.cc is None and env.bcc is None and env.in_reply_to is None


def test_envelope_literal() -> None:
    assert envelope(SIMPLE) == (
        b'("Mon, 7 Feb 1994 21:52:25 -0800" "hello" (("Joe" NIL "joe" "example.com"))'
        b' (("Joe" NIL "joe" "example.com")) (("Joe" NIL "joe" "example.com"))'
        b' (("Ann" NIL "ann" "example.com")) NIL NIL NIL NIL)'
    )


def test_envelope_missing_headers_are_nil() -> None:
    assert envelope(b"\r\nbody") == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_envelope_explicit_sender_and_reply_to() -> None:
    raw = b"From: a@x.test\r\nSender: s@x.test\r\nReply-To: r@x.test\r\nReply-To: ignored@x\r\n\r\n"
    value = read_imap(envelope(raw))
    assert value[3] == [[None, None, b"s", b"x.test"]]
    assert value[4] == [[None, None, b"r", b"x.test"]]
    empty = read_imap(envelope(b"From: a@x.test\r\nSender:\r\nReply-To: \r\n\r\n"))
    assert empty[3] == empty[4] == empty[2]


def test_envelope_groups() -> None:
    raw = (
        b"From: a@x.test\r\nTo: Team: Ed <ed@x.test>, joe@x.test;, undisclosed-recipients:;\r\n\r\n"
    )
    assert read_imap(envelope(raw))[5] == [
        [None, None, b"Team", None],
        [b"Ed", None, b"ed", b"x.test"],
        [None, None, b"joe", b"x.test"],
        [None, None, None, None],
        [None, None, b"undisclosed-recipients", None],
        [None, None, None, None],
    ]


def test_envelope_raw_encoded_words_and_quoting() -> None:
    raw = (
        b"From: =?utf-8?q?J=C3=B6rg?= <j@x.test>\r\n"
        b'To: "Giant; \\"Big\\" Box" <big@x.test>, plain@x.test (Comment Name)\r\n'
        b"Cc: <@route.test,@r2.test:user@x.test>, nodomain\r\n"
        b"Subject: =?utf-8?b?w6Rx?=\r\n\r\n"
    )
    value = read_imap(envelope(raw))
    assert value[1] == b"=?utf-8?b?w6Rx?="
    assert value[2] == [[b"=?utf-8?q?J=C3=B6rg?=", None, b"j", b"x.test"]]
    assert value[5] == [
        [b'Giant; "Big" Box', None, b"big", b"x.test"],
        [b"Comment Name", None, b"plain", b"x.test"],
    ]
    assert value[6] == [
        [None, b"@route.test,@r2.test", b"user", b"x.test"],
        [None, None, b"nodomain", b"MISSING_DOMAIN"],
    ]


ADDRESS_LISTS = [
    "a@b.test",
    "Mary Smith <mary@x.test>, jdoe@example.org, Who? <one@y.test>",
    '"Joe Q. Public" <john.q.public@example.com>',
    '<boss@nil.test>, "Giant; \\"Big\\" Box" <sysservices@example.net>',
    "Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>",
    "x@[192.0.2.1], Y <y.z@host.test>",
]


@pytest.mark.parametrize("value", ADDRESS_LISTS)
def test_envelope_addresses_match_getaddresses(value: str) -> None:
    ours = read_imap(envelope(b"To: " + value.encode() + b"\r\n\r\n"))[5]
    try:
        # Python 3.13 parses strictly by default and turns a domain literal into ("", "");
        # the comparison is with the classic, lenient parse (what IMAP servers report).
        theirs = email.utils.getaddresses([value], strict=False)  # type: ignore[call-arg]
    except TypeError:  # before the strict parameter existed
        theirs = email.utils.getaddresses([value])
    assert [(m + b"@" + h).decode() for _, _, m, h in ours] == [addr for _, addr in theirs]


def test_envelope_eight_bit_header_is_literal() -> None:
    raw = "Subject: Grüße\r\nFrom: Jörg <j@x.test>\r\n\r\n".encode()
    value = read_imap(envelope(raw))
    assert value[1] == "Grüße".encode()
    assert value[2][0][0] == "Jörg".encode()
    assert b"{7}\r\nGr" in envelope(raw)


# --------------------------------------------------------------------------- SEARCH helpers


def test_header_values_decodes_rfc2047() -> None:
    raw = (
        b"Subject: =?utf-8?q?caf=C3=A9?= =?utf-8?b?IGF1IGxhaXQ=?= and\r\n more\r\n"
        b"X-Multi: one\r\nx-multi: =?iso-8859-1?q?tw=F6?=\r\n\r\n"
    )
    assert header_values(raw, "SUBJECT") == ["café au lait and more"]
    assert header_values(raw, "x-multi") == ["one", "twö"]
    theirs = str(email.message_from_bytes(raw, policy=email.policy.default)["subject"])
    assert header_values(raw, "subject") == [theirs]


def test_header_values_missing_and_broken() -> None:
    raw = b"Subject: =?bogus-charset?q?x?= =?utf-8?b?!!!?=\r\n\r\n"
    assert header_values(raw, "to") == []
    assert header_values(raw, "subject") == ["x"]


def test_header_values_from_body_are_ignored() -> None:
    assert header_values(FORWARD, "subject") == ["fwd"]  # not the encapsulated one


def test_search_text_decodes_bodies() -> None:
    text = search_text(NESTED)
    assert "Café au lait" in text
    assert "<p>Caf&eacute;</p>" in text
    assert "JVBERi0xLjQK" not in text  # attachments are not text
    assert "nested" not in text  # top-level headers are not body


def test_search_text_base64_charset_and_encapsulated_headers() -> None:
    generated = _generated()[1]
    assert "see attachment" in search_text(generated)
    assert "a,b" in search_text(generated)
    latin = (
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nR3L832U=\r\n"
    )
    assert search_text(latin) == "Grüße"
    assert "inner café" in search_text(FORWARD)
    assert "inner line 2" in search_text(FORWARD)


def test_search_text_refuses_non_text_codecs() -> None:
    raw = b"Content-Type: text/plain; charset=zlib_codec\r\n\r\nx\x9c\xcbH\xcd\xc9\xc9\x07\x00"
    assert "hello" not in search_text(raw)


def test_header_date() -> None:
    assert header_date(SIMPLE) == 760686745.0
    assert header_date(b"Date: Thu, 1 Jan 1970 00:00:10 -0000\r\n\r\n") == 10.0


@pytest.mark.parametrize(
    "raw", [b"\r\n", b"Date: not a date\r\n\r\n", b"Date: Mon, 7 Feb 99999 21:52:25\r\n\r\n"]
)
def test_header_date_missing_or_bad(raw: bytes) -> None:
    assert header_date(raw) is None


# --------------------------------------------------------------------------- quote


def test_quote() -> None:
    assert quote(None) == b"NIL"
    assert quote("") == b'""'
    assert quote('a "b" \\c') == b'"a \\"b\\" \\\\c"'
    assert quote(b"x") == b'"x"'


@pytest.mark.parametrize("value", [b"a\r\nb", b"a\nb", "é".encode(), "é", b"x" * 5000, b"\x00"])
def test_quote_literal(value: str | bytes) -> None:
    data = value.encode() if isinstance(value, str) else value
    assert quote(value) == b"{%d}\r\n" % len(data) + data


# --------------------------------------------------------------------------- hostile input


def deep_multipart(depth: int) -> bytes:
    opened = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closed = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"From: a@b.test\r\n" + opened + b"Content-Type: text/plain\r\n\r\nleaf" + closed


def deep_message(depth: int) -> bytes:
    return b"From: a@b.test\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * depth + b"leaf\r\n"


@pytest.mark.parametrize("depth", [300, 1000, 3000])
@pytest.mark.parametrize("build", [deep_multipart, deep_message])
def test_deep_nesting_is_capped(depth: int, build: Any) -> None:
    raw = build(depth)
    started = time.perf_counter()
    tree = parse(raw)
    structure = bodystructure(raw, tree=tree)
    envelope(raw, tree=tree)
    search_text(raw, tree=tree)
    section(raw, (1,) * 100, tree=tree)
    section(raw, (1,) * 10, "MIME", tree=tree)
    assert time.perf_counter() - started < 1.0
    assert balanced(structure)
    read_imap(structure)
    assert max(p.depth for p in our_walk(tree)) == MAX_DEPTH
    assert b'"APPLICATION" "OCTET-STREAM"' in structure


def test_shallow_nesting_is_not_capped() -> None:
    raw = deep_multipart(MAX_DEPTH - 1)
    assert b"OCTET-STREAM" not in bodystructure(raw)
    assert section(raw, (1,) * (MAX_DEPTH - 1)) == b"leaf"


def test_huge_headers_are_linear() -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)) + b"\r\nbody"
    long = b"Subject: " + b"x" * 1_000_000 + b"\r\nTo: " + b"<" * 100_000 + b"\r\n\r\nbody"
    started = time.perf_counter()
    for raw in (many, long):
        tree = parse(raw)
        bodystructure(raw, tree=tree)
        envelope(raw, tree=tree)
        header_values(raw, "subject", tree=tree)
        section(raw, (), "HEADER.FIELDS", ("x-h5",), tree=tree)
    assert time.perf_counter() - started < 5.0


def test_tree_reuse_gives_same_answers() -> None:
    tree = parse(NESTED)
    assert bodystructure(NESTED, tree=tree) == bodystructure(NESTED)
    assert envelope(NESTED, tree=tree) == envelope(NESTED)
    assert section(NESTED, (1, 2), tree=tree) == section(NESTED, (1, 2))
    assert search_text(NESTED, tree=tree) == search_text(NESTED)


def _check_total(raw: bytes) -> None:
    # Any bytes get an answer, and none of them is a bug of ours: on_error hears nothing.
    bugs: list[BaseException] = []
    tree = parse(raw, on_error=bugs.append)
    for extended in (True, False):
        structure = bodystructure(raw, extended=extended, tree=tree, on_error=bugs.append)
        assert balanced(structure), structure
        read_imap(structure)
    env = envelope(raw, tree=tree, on_error=bugs.append)
    assert balanced(env)
    assert len(read_imap(env)) == 10
    for part in [(), (1,), (2,), (1, 1), (1, 2, 1)]:
        for text in (None, "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            fields = ("subject", "content-type")
            got = section(raw, part, text, fields, tree=tree, on_error=bugs.append)
            assert isinstance(got, bytes)
            if text is None and part == ():
                assert got == raw
    assert isinstance(search_text(raw, tree=tree, on_error=bugs.append), str)
    assert isinstance(header_values(raw, "subject", tree=tree, on_error=bugs.append), list)
    date = header_date(raw, tree=tree, on_error=bugs.append)
    assert date is None or isinstance(date, float)
    assert not bugs, bugs


FUZZ = settings(
    max_examples=300,
    deadline=1000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=4000))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _check_total(raw)


_ALPHABET = [
    b"\r\n",
    b"\n",
    b"\r",
    b"--",
    b"--b",
    b"--mixed",
    b":",
    b";",
    b"=",
    b'"',
    b"\\",
    b"(",
    b")",
    b"<",
    b">",
    b"@",
    b",",
    b" ",
    b"\t",
    b"=?",
    b"?=",
    b"*0*=",
    b"'",
    b"%",
    b"\x00",
    b"\xff",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"{5}\r\n",
    b"boundary=",
    b"\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            data[at:at] = draw(st.sampled_from(_ALPHABET) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            data[at : at + draw(st.integers(1, 64))] = b""
        else:
            data[at : at + 1] = draw(st.sampled_from(_ALPHABET))
    return bytes(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_messages(raw: bytes) -> None:
    _check_total(raw)


def test_parse_never_raises_even_on_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(_mime, "_parse_entity", broken)
    tree = parse(NESTED)
    assert (tree.start, tree.end) == (0, len(NESTED))
    assert bodystructure(NESTED, tree=tree).startswith(b'("TEXT" "PLAIN"')


# --------------------------------------------------------------------------- error channel


def _boom(*args: object, **kwargs: object) -> Any:
    raise ValueError("a bug of ours")


def test_parse_reports_internal_error_through_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_mime, "_parse_entity", _boom)
    bugs: list[BaseException] = []
    tree = parse(NESTED, on_error=bugs.append)
    assert (tree.start, tree.end, tree.content_type) == (0, len(NESTED), "text/plain")
    assert [str(b) for b in bugs] == ["a bug of ours"]
    assert isinstance(bugs[0], ValueError)


# (the helper the public function calls, the call, its fallback answer)
FALLBACKS = [
    ("render_envelope", lambda raw, cb: envelope(raw, on_error=cb), b"(NIL" + b" NIL" * 9 + b")"),
    (
        "render_body",
        lambda raw, cb: bodystructure(raw, extended=False, on_error=cb),
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d)'
        % (len(NESTED), NESTED.count(b"\n") + (not NESTED.endswith(b"\n"))),
    ),
    ("extract", lambda raw, cb: section(raw, (1, 1), on_error=cb), b""),
    ("decode_words", lambda raw, cb: header_values(raw, "subject", on_error=cb), []),
    ("body_text", lambda raw, cb: search_text(raw, on_error=cb), ""),
    ("as_text", lambda raw, cb: header_date(raw, on_error=cb), None),
]


@pytest.mark.parametrize(("helper", "call", "fallback"), FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_public_function_reports_internal_error_and_still_answers(
    monkeypatch: pytest.MonkeyPatch, helper: str, call: Any, fallback: object
) -> None:
    assert call(NESTED, None) != fallback  # the real answer differs from the fallback
    monkeypatch.setattr(_mime, helper, _boom)
    bugs: list[BaseException] = []
    assert call(NESTED, bugs.append) == fallback
    assert [type(b) for b in bugs] == [ValueError]
    assert call(NESTED, None) == fallback  # without a channel: the same answer, silently


HOSTILE = [
    pytest.param(deep_multipart(3000), id="deep-multipart"),
    pytest.param(deep_message(3000), id="deep-message"),
    pytest.param(
        b"Date: Mon, 99 Foo 99999 25:61:61 +9999\r\nSubject: =?x-nope?B?!!!?=\r\n"
        b"Content-Type: text/plain; charset=zlib\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n%%%not base64%%%\r\n",
        id="bad-date-charset-base64",
    ),
    pytest.param(
        b"Content-Type: multipart/mixed; boundary*0*=utf-7''+2D0-\r\n\r\n--x\r\n",
        id="boundary-with-lone-surrogate",
    ),
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_input_is_answered_without_a_bug_report(raw: bytes) -> None:
    _check_total(raw)
    assert header_date(raw) is None  # none of them has a readable Date
