"""``ReceivedMessage`` parses the header block when it is made and the MIME structure on
first use: ``wait_for(subject=...)`` on a message with a big attachment does not decode the
attachment (it allocated 7.7x the message and took 0.8 s for 20 MB before).

Each "not parsed" test has a twin that reads a body attribute and sees the parse with the
same measure.
"""

from __future__ import annotations

import hashlib
from email.message import EmailMessage

import pytest
from _support import peak_growth, run_together

from roundtrip.message import ReceivedMessage

BIG = 4_000_000


def _message(attachment: int = BIG) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "=?utf-8?q?r=C3=A9sum=C3=A9?="
    msg["Message-ID"] = "<lazy@example.com>"
    msg["Date"] = "Thu, 03 Dec 2026 10:00:00 +0000"
    msg.set_content("code 123456, see https://example.com/a\n")
    msg.add_alternative('<p>see <a href="https://example.com/b">b</a></p>', subtype="html")
    msg.add_attachment(
        b"\x01" * attachment, maintype="application", subtype="octet-stream", filename="a.bin"
    )
    return msg.as_bytes().replace(b"\n", b"\r\n")


def test_message_headers_without_parsing_the_parts() -> None:
    raw = _message()
    made: list[ReceivedMessage] = []
    assert peak_growth(lambda: made.append(ReceivedMessage(raw))) < len(raw) // 10
    msg = made[0]
    assert msg.subject == "résumé"
    assert (msg.from_, msg.to, msg.message_id) == (
        "alice@example.com",
        ["bob@example.org"],
        "<lazy@example.com>",
    )
    assert msg.date is not None and msg.date.year == 2026
    assert peak_growth(lambda: msg.body_sha256) < len(raw) // 10  # hashed in place
    # The twin: the first look at the parts parses them, the next ones do not.
    assert peak_growth(lambda: msg.attachments) >= len(raw)
    assert peak_growth(lambda: msg.attachments) < len(raw) // 10


@pytest.mark.parametrize(
    "first", ["text", "html", "attachments", "inline_parts", "links", "parse_error"]
)
def test_message_parts_the_same_whichever_is_read_first(first: str) -> None:
    raw = _message(1000)
    msg = ReceivedMessage(raw)
    getattr(msg, first)
    assert msg.text == "code 123456, see https://example.com/a\n"
    assert msg.html is not None and "example.com/b" in msg.html
    assert [a.filename for a in msg.attachments] == ["a.bin"]
    assert msg.attachments[0].data == b"\x01" * 1000
    assert msg.links == ["https://example.com/a", "https://example.com/b"]
    assert msg.parse_error is None
    assert msg.find_code() == "123456"
    assert msg.find_link("example.com/b") == "https://example.com/b"


def test_message_unparseable_parts_still_reported_on_use() -> None:
    raw = (
        b"From: a@example.com\r\nSubject: odd\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; name*\r\n\r\nx\r\n--b--\r\n"
    )
    msg = ReceivedMessage(raw)
    assert msg.subject == "odd"
    assert msg.parse_error is not None and "IndexError" in msg.parse_error
    assert (msg.text, msg.attachments) == (None, [])
    # The twin: a well-formed message has no parse error.
    assert ReceivedMessage(b"Subject: fine\r\n\r\nbody\r\n").parse_error is None


def test_message_first_use_from_several_threads() -> None:
    raw = _message(200_000)
    for _ in range(20):
        msg = ReceivedMessage(raw)
        seen = run_together(lambda msg=msg: (msg.text, len(msg.attachments)))
        assert seen == [("code 123456, see https://example.com/a\n", 1)] * 4


def test_message_header_of_big_crlf_message_ends_at_its_empty_line() -> None:
    """A big CRLF message whose body has empty lines of every other kind (LF, bare CR,
    LF then CRLF) further down: the header still ends at its own CRLF empty line."""
    head = b"Subject: big\r\nMessage-ID: <big@example.com>\r\n\r\n"
    body = b"x\r\n" * (BIG // 3) + b"a\n\nb\r\rc\n\r\nd\r\n"
    raw = head + body
    made: list[ReceivedMessage] = []
    assert peak_growth(lambda: made.append(ReceivedMessage(raw))) < len(raw) // 10
    msg = made[0]
    assert (msg.subject, msg.message_id) == ("big", "<big@example.com>")
    assert msg.body == body and msg.body_sha256 == hashlib.sha256(body).hexdigest()
    # The twin: the same body under an LF field and a CRLF empty line starts after them.
    mixed = ReceivedMessage(b"Subject: big\n\r\n" + body)
    assert mixed.subject == "big" and mixed.body == body
