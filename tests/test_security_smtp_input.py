"""SMTP input that must be refused: a bare CR in a submitted header, a bad EHLO/HELO name.

A bare CR hid a forged From: from the submission check (which splits lines on LF) while the
relay turned it into a line break on the next hop (RFC 5322 section 2.3, RFC 5321 section
2.3.8). An EHLO name with a Unicode line separator went verbatim into ``Received:`` (RFC 5321
section 4.1.1.1 asks for a domain or an address literal).
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from _support import RawSMTPClient

from roundtrip import MailStack, StackConfig
from roundtrip.protocols.smtp import check_bare_cr_in_header, check_helo_name

TIMEOUT = 5.0


@pytest.fixture(scope="module", params=["accept", "reject"])
def stack(request: pytest.FixtureRequest) -> Iterator[MailStack]:
    config = StackConfig(domains=("example.com", "example.org"), from_header_policy=request.param)
    with MailStack(config) as running:
        yield running


def _submit(stack: MailStack, raw: bytes) -> None:
    user = stack.user("example.com")
    to = stack.user("example.org").address
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [to], raw)  # bytes: smtplib keeps a bare CR as it is


def test_bare_cr_hidden_forged_from_is_refused(stack: MailStack) -> None:
    stack.reset()
    raw = b"Subject: hidden\rFrom: CEO <ceo@example.org>\r\n\r\nbody\r\n"
    with pytest.raises(smtplib.SMTPDataError) as info:
        _submit(stack, raw)
    assert info.value.smtp_code == 554
    assert b"5.6.0 Bare CR in the message header section" in info.value.smtp_error
    stack.assert_not_delivered(timeout=0.5)


def test_bare_cr_pair_in_header_is_refused(stack: MailStack) -> None:
    stack.reset()
    with pytest.raises(smtplib.SMTPDataError) as info:
        _submit(stack, b"Subject: pair\r\nX-A: a\r\rX-B: b\r\n\r\nbody\r\n")
    assert info.value.smtp_code == 554
    stack.assert_not_delivered(timeout=0.5)


def test_bare_cr_twin_forged_from_on_its_own_line(stack: MailStack) -> None:
    """The same forgery in plain CRLF lines: the From: policy decides, as before.

    The From names a domain outside the stack: a stack domain's DMARC policy (p=reject) would
    have the recipient's MX refuse the forgery, which is another test's subject
    (tests/test_auth_spf_dmarc.py)."""
    stack.reset()
    raw = b"Subject: plain\r\nFrom: CEO <ceo@partner.example>\r\n\r\nbody\r\n"
    if stack.config.from_header_policy == "reject":
        with pytest.raises(smtplib.SMTPDataError) as info:
            _submit(stack, raw)
        assert info.value.smtp_code == 553
        return
    _submit(stack, raw)
    stack.assert_delivered(subject="plain", timeout=TIMEOUT)


def test_bare_cr_in_the_body_is_still_accepted(stack: MailStack) -> None:
    stack.reset()
    user = stack.user("example.com").address
    _submit(stack, f"From: <{user}>\r\nSubject: body-cr\r\n\r\na\rb\r\n".encode())
    stack.assert_delivered(subject="body-cr", timeout=TIMEOUT)


def test_bare_cr_check_pure() -> None:
    assert check_bare_cr_in_header(b"A: b\rC: d\r\n\r\nx") is not None
    assert check_bare_cr_in_header(b"A: b\r\r\n\r\nx") is not None
    assert check_bare_cr_in_header(b"A: b\r\nC: d\r\n\r\nx\ry\r\n") is None
    assert check_bare_cr_in_header(b"A: b\nC: d\n\nx") is None  # LF: a line break everywhere


def _greeted(stack: MailStack, service: str = "smtp") -> RawSMTPClient:
    ep = stack.endpoints("example.com")
    client = RawSMTPClient(ep.ports[service], host=ep.host, server_name=ep.hostname)
    assert client.reply()[0].startswith("220")
    return client


@pytest.mark.parametrize("name", ["e\u2028X-Inj:1", "e\u2029X-Inj:1", "e\x85X-Inj:1", "a b"])
@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
def test_helo_name_with_separator_is_refused(stack: MailStack, verb: str, name: str) -> None:
    with _greeted(stack) as client:
        reply = client.cmd(f"{verb} {name}")
        assert reply[-1].startswith("501 5.5.4 Invalid"), reply
        # The session goes on: a valid name is then accepted, and the name was not kept.
        assert client.cmd("EHLO client.example")[-1].startswith("250 ")
        assert client.cmd("QUIT")[0].startswith("221")


def test_helo_name_refused_name_never_reaches_received(stack: MailStack) -> None:
    stack.reset()
    to = stack.user("example.com").address
    with _greeted(stack) as client:
        assert client.cmd("EHLO e\u2028X-Inj:1")[0].startswith("501")
        assert client.cmd("EHLO [127.0.0.1]")[-1].startswith("250 ")
        assert client.cmd("MAIL FROM:<a@outside.test>")[0].startswith("250")
        assert client.cmd(f"RCPT TO:<{to}>")[0].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        assert client.cmd(b"Subject: helo\r\n\r\nx\r\n.")[0].startswith("250")
    [message] = stack.assert_delivered(subject="helo", timeout=TIMEOUT)
    assert b"from [127.0.0.1]" in message.raw
    assert "\u2028".encode() not in message.raw


@pytest.mark.parametrize(
    "name",
    ["client.example", "localhost", "host_1.example", "[127.0.0.1]", "[IPv6:::1]", "bücher.de"],
)
def test_helo_name_valid_forms_are_accepted(name: str) -> None:
    assert check_helo_name(name) is None


@pytest.mark.parametrize("name", ["", ".", "a..b", "[a]b", "[]", "[a b]", "x\x00y", "x\ty"])
def test_helo_name_invalid_forms_are_refused(name: str) -> None:
    assert check_helo_name(name) is not None
