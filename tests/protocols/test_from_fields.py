"""The From fields of a header section (``roundtrip/protocols/dkim.py``), read directly
when the section is plain: exactly what the email package's compat32 header parser gives,
which still reads every other section (DKIM signing and DMARC both ask)."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.protocols._author import AuthorDomains
from roundtrip.protocols._lines import header_section
from roundtrip.protocols.dkim import _plain_from_values, from_domain, from_field_values
from roundtrip.protocols.dmarc import from_domains


def _by_the_email_package(head: bytes) -> list[str]:
    return [
        str(f) for f in BytesHeaderParser(policy=compat32).parsebytes(head).get_all("From") or []
    ]


_LINES = st.sampled_from(
    [
        b"From: a@example.com",
        b"FROM:b@example.org",
        b"from:\t  Name <c@example.net>",
        b"From:",
        b" d@example.com",
        b"\tfolded, e@example.com",
        b"To: x@example.com",
        b"Subject: hi: there",
        b"X-Odd!: #$%",
        b"From : spaced@example.com",
        b"no colon here",
        b":empty name",
        b"From caf\xc3\xa9@example.com",
        b"From: caf\xc3\xa9 <u@example.com>",
        b"From: bare\nlf@example.com",
        b"From: bare\rcr@example.com",
        b"",
    ]
)


@settings(max_examples=600, deadline=None)
@given(lines=st.lists(_LINES, max_size=8), end=st.sampled_from([b"\r\n\r\n", b"\r\n", b""]))
def test_from_fields_match_the_email_package(lines: list[bytes], end: bytes) -> None:
    head = header_section(b"\r\n".join(lines) + end + b"body\r\n")
    assert from_field_values(head) == _by_the_email_package(head)


def test_plain_sections_are_read_directly_and_odd_ones_are_not() -> None:
    plain = b"From: A <a@example.com>\r\n\tand B <b@example.com>\r\nTo: t@example.com\r\n\r\n"
    assert _plain_from_values(plain) == ["A <a@example.com>\r\n\tand B <b@example.com>"]
    for odd in (
        b"From: a@example.com\r\nno colon\r\n\r\n",  # the parser ends the section there
        b" continued@example.com\r\nFrom: a@example.com\r\n\r\n",
        b"From: caf\xc3\xa9 <a@example.com>\r\n\r\n",
        b"From: a@example.com\nTo: b@example.com\r\n\r\n",
        b"From: a@example.com\r\n",  # no empty line: the whole message is header
    ):
        assert _plain_from_values(odd) is None, odd
        assert from_field_values(odd) == _by_the_email_package(odd)


def test_dkim_and_dmarc_read_the_same_from_domains() -> None:
    raw = b"From: A <a@Example.COM>, b@example.org\r\nTo: t@example.net\r\n\r\nbody\r\n"
    assert from_domain(raw) == "example.com"
    assert from_domains(raw) == AuthorDomains(("example.com", "example.org"))
    hidden = b"Subject: x\r\nnot a field\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    assert from_domain(hidden) is None
    assert from_domains(hidden) == AuthorDomains((), "no From field")
    glued = b"From: alice@example.com (,) x.example.net\r\n\r\nbody\r\n"
    assert from_domain(glued) is None
    assert from_domains(glued) == AuthorDomains(
        ("example.com",), "malformed From field: more text after an address"
    )
