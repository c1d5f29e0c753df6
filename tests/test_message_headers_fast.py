"""Header decoding in ``ReceivedMessage`` (roundtrip/message.py): the shortcut for plain
unstructured fields must give exactly what the email package's parse gives."""

from __future__ import annotations

import re
from email import policy

from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.message import _STRUCTURED, ReceivedMessage


def _by_the_email_package(name: str, value: str) -> str:
    decoded = str(policy.default.header_fetch_parse(name, value))
    return re.sub(r"\r?\n(?=[ \t])", "", decoded).replace("\r", "").replace("\n", "").strip()


_NAMES = st.sampled_from(
    ["Subject", "Received", "DKIM-Signature", "X-Mailer", "Authentication-Results", "Comments"]
)
_PIECES = st.sampled_from(
    ["word", " ", "  ", "\t", "\r\n ", "\r\n\t", "a=b;", "(comment)", '"q"', "<x@y>", "=", "?"]
)


@settings(max_examples=400, deadline=None)
@given(name=_NAMES, pieces=st.lists(_PIECES, max_size=12))
def test_plain_unstructured_fields_decode_as_the_email_package_does(
    name: str, pieces: list[str]
) -> None:
    value = "".join(pieces)
    assert ReceivedMessage._decode_header(name, value) == _by_the_email_package(name, value)


def test_encoded_words_and_structured_fields_still_go_through_the_email_package() -> None:
    subject = "=?utf-8?q?caf=C3=A9?= au lait"
    assert ReceivedMessage._decode_header("Subject", subject) == "café au lait"
    # A structured field is rendered from its parse, which is not always its text.
    frm = ' "Alice"   <alice@example.com>'
    assert ReceivedMessage._decode_header("From", frm) == _by_the_email_package("From", frm)
    raw = (
        b"From: =?utf-8?q?Z=C3=BCrich?= <z@example.com>\r\nSubject: =?utf-8?b?w6k=?=\r\n"
        b"X-Plain:  spaced   out \r\n\r\nbody\r\n"
    )
    msg = ReceivedMessage(raw)
    assert msg.subject == "é"
    assert msg.headers.get("From") == "Zürich <z@example.com>"
    assert msg.headers.get("X-Plain") == "spaced   out"
    assert msg.from_ == "z@example.com"


def test_the_structured_names_are_the_email_package_registry() -> None:
    registry = set(policy.default.header_factory.registry)  # what this Python parses
    assert set(_STRUCTURED) == registry - {"subject"}
