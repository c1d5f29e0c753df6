"""The pure SMTP policy functions: no sockets, no loop."""

from __future__ import annotations

import email.utils

import pytest

from roundtrip.protocols.smtp import (
    Reply,
    Role,
    TLSInfo,
    add_missing_headers,
    check_from_header,
    check_recipient,
    check_sender,
    count_received,
    domain_of,
    enhanced_status,
    received_header,
    with_protocol,
)

LOCAL = ("example.com", "example.org")
USERS = {"user@example.com", "user@example.org"}
EPOCH_DATE = email.utils.formatdate(0, localtime=False)  # "Thu, 01 Jan 1970 00:00:00 -0000"


def has_user(address: str) -> bool:
    return address.lower() in USERS


def decide(address: str, role: Role, *, count: int = 0, limit: int = 100) -> str | None:
    return check_recipient(
        address,
        role=role,
        local_domains=LOCAL,
        has_user=has_user,
        current_count=count,
        max_recipients=limit,
    )


# check_recipient

ALL_ROLES = list(Role)
SUBMIT_ROLES = [Role.SUBMISSION, Role.SUBMISSIONS]


@pytest.mark.parametrize("role", ALL_ROLES)
@pytest.mark.parametrize("address", ["user@example.com", "USER@Example.ORG"])
def test_check_recipient_accepts_local_user(role: Role, address: str) -> None:
    assert decide(address, role) is None


@pytest.mark.parametrize("role", ALL_ROLES)
def test_check_recipient_refuses_unknown_local_user(role: Role) -> None:
    reply = decide("nobody@example.com", role)
    assert reply == "550 5.1.1 <nobody@example.com>: Recipient address rejected: no such user"


@pytest.mark.parametrize(
    "address",
    ["someone@ext.test", "U@EXT.TEST", "u@[192.0.2.1]", "@example.org:u@ext.test"],
)
def test_check_recipient_mx_refuses_relay(address: str) -> None:
    assert decide(address, Role.SMTP) == Reply.RELAY_DENIED.format(address=address)


@pytest.mark.parametrize(
    "address",
    [
        '"u@ext.test"@example.org',
        "u%ext.test@example.org",
        "ext.test!u@example.org",
        "user@example.com.",
        "user@example.com@ext.test",
    ],
)
def test_check_recipient_mx_refuses_relay_encodings(address: str) -> None:
    reply = decide(address, Role.SMTP)
    assert reply is not None and reply[0] == "5", reply


@pytest.mark.parametrize("role", SUBMIT_ROLES)
@pytest.mark.parametrize("address", ["someone@ext.test", "u@[192.0.2.1]"])
def test_check_recipient_submission_accepts_foreign(role: Role, address: str) -> None:
    assert decide(address, role) is None


@pytest.mark.parametrize("role", ALL_ROLES)
@pytest.mark.parametrize(
    "address",
    [
        "",
        "nobody",
        "@example.com",
        "user@",
        "a b@example.com",
        "a\rb@ext.test",
        "a\nb@ext.test",
        "a\x00b@ext.test",
        "a\x01b@ext.test",
        "a\tb@ext.test",
        "a\x7fb@ext.test",
    ],
    ids=repr,
)
def test_check_recipient_refuses_bad_syntax(role: Role, address: str) -> None:
    assert decide(address, role) == Reply.BAD_ADDRESS


@pytest.mark.parametrize("role", ALL_ROLES)
def test_check_recipient_limit(role: Role) -> None:
    assert decide("user@example.com", role, count=2, limit=3) is None
    assert decide("user@example.com", role, count=3, limit=3) == Reply.TOO_MANY_RECIPIENTS
    assert Reply.TOO_MANY_RECIPIENTS.startswith("452 4.5.3 ")


def test_check_recipient_local_domains_compare_case_insensitively() -> None:
    reply = check_recipient(
        "user@example.com",
        role=Role.SMTP,
        local_domains=("EXAMPLE.COM.",),
        has_user=has_user,
        current_count=0,
        max_recipients=10,
    )
    assert reply is None


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("u@Example.COM", "example.com"),
        ("u@example.com.", "example.com"),
        ("nobody", ""),
        ('"a@b"@c.test', "c.test"),
    ],
)
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


# check_sender


@pytest.mark.parametrize(
    ("mail_from", "user", "enforce", "refused"),
    [
        ("user@example.com", "user@example.com", True, False),
        ("USER@example.COM", "user@example.com", True, False),
        ("user@example.org", "user@example.com", True, True),
        ("", "user@example.com", True, True),
        ("user@example.org", "user@example.com", False, False),
        ("anyone@ext.test", None, True, False),  # the MX: nobody authenticated
    ],
)
def test_check_sender(mail_from: str, user: str | None, enforce: bool, refused: bool) -> None:
    reply = check_sender(mail_from, authenticated_user=user, enforce=enforce)
    if refused:
        assert reply == (
            f"553 5.7.1 <{mail_from}>: Sender address rejected: not owned by user {user}"
        )
    else:
        assert reply is None


@pytest.mark.parametrize("user", [None, "a\rb@ext.test"])
@pytest.mark.parametrize("mail_from", ["a\rb@ext.test", "a\x00b@ext.test", "a\nRSET@x.test"])
def test_check_sender_refuses_control_characters(mail_from: str, user: str | None) -> None:
    for enforce in (True, False):
        reply = check_sender(mail_from, authenticated_user=user, enforce=enforce)
        assert reply == Reply.BAD_SENDER
    assert Reply.BAD_SENDER.startswith("501 5.1.7 ")


# with_protocol: RFC 3848 section 2 and the RFC 5321 base


@pytest.mark.parametrize(
    ("esmtp", "tls", "authenticated", "keyword"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "ESMTPA"),
        (True, True, True, "ESMTPSA"),
    ],
)
def test_with_protocol(esmtp: bool, tls: bool, authenticated: bool, keyword: str) -> None:
    assert with_protocol(esmtp=esmtp, tls=tls, authenticated=authenticated) == keyword


# enhanced_status (RFC 2034, RFC 3463)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("250-SIZE 100", "250-2.0.0 SIZE 100"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        (
            "530 Must issue a STARTTLS command first",
            "530 5.7.0 Must issue a STARTTLS command first",
        ),
        ("552 Error: too big", "552 5.3.4 Error: too big"),
        ("250 ", "250 2.0.0"),
        # already carrying one
        ("250 2.1.5 OK", "250 2.1.5 OK"),
        ("538 5.7.11 Encryption required", "538 5.7.11 Encryption required"),
        ("452 4.5.3 Error: too many recipients", "452 4.5.3 Error: too many recipients"),
        # never touched: greetings, intermediate replies, unknown codes, no text separator
        ("220 mail.example.com roundtrip ESMTP", "220 mail.example.com roundtrip ESMTP"),
        ("220 Ready to start TLS", "220 Ready to start TLS"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 ", "334 "),
        ("599 odd", "599 odd"),
        ("250", "250"),
        ("250OK", "250OK"),
    ],
)
def test_enhanced_status(reply: str, expected: str) -> None:
    assert enhanced_status(reply) == expected


@pytest.mark.parametrize("reply", ["250 OK", "452 x", "535 x", "554 x", "421 x"])
def test_enhanced_status_class_matches_reply_class(reply: str) -> None:
    added = enhanced_status(reply)[4:].split()[0]
    assert added[0] == reply[0]


# received_header (RFC 5321 section 4.4)

TLS13 = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256)


def test_received_header_with_tls_and_one_recipient() -> None:
    header = received_header(
        helo="client.example",
        peer_ip="127.0.0.1",
        by_host="mail.example.com",
        protocol="ESMTPSA",
        queue_id="Q1",
        recipient="user@example.org",
        timestamp=0.0,
        tls=TLS13,
    )
    assert header == (
        b"Received: from client.example ([127.0.0.1])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))\r\n"
        b"\tby mail.example.com (roundtrip) with ESMTPSA id Q1\r\n"
        b"\tfor <user@example.org>; " + EPOCH_DATE.encode() + b"\r\n"
    )


def test_received_header_plain_several_recipients_no_helo() -> None:
    header = received_header(
        helo="",
        peer_ip="::1",
        by_host="mx.example.com",
        protocol="SMTP",
        queue_id="Q2",
        recipient=None,
        timestamp=0.0,
        tls=None,
    )
    assert header == (
        b"Received: from unknown ([IPv6:::1])\r\n"
        b"\tby mx.example.com (roundtrip) with SMTP id Q2; " + EPOCH_DATE.encode() + b"\r\n"
    )


@pytest.mark.parametrize(
    ("helo", "shown"),
    [
        ("evil\rX-Injected: yes", "evil?X-Injected:?yes"),
        ("a\nb", "a?b"),
        ("a\x00b", "a?b"),
        ("bad\udcffbyte", "bad?byte"),
        ("b\u00fccher.example", "b\u00fccher.example"),  # UTF-8 names pass (SMTPUTF8)
    ],
    ids=repr,
)
def test_received_header_neutralises_client_names(helo: str, shown: str) -> None:
    header = received_header(
        helo=helo,
        peer_ip="127.0.0.1",
        by_host="mx.example.com",
        protocol="ESMTP",
        queue_id="Q3",
        recipient="x\ty@example.com",
        timestamp=0.0,
        tls=None,
    )
    first = header.split(b"\r\n")[0]
    assert first == f"Received: from {shown} ([127.0.0.1])".encode()
    assert b"\tfor <x?y@example.com>;" in header
    # every line break is a CRLF followed by a fold, except the last
    body = header[:-2]
    assert body.count(b"\r") == body.count(b"\r\n") == body.count(b"\n")
    assert all(part.startswith(b"\t") for part in body.split(b"\r\n")[1:])


# add_missing_headers (RFC 6409 section 8)

MID = b"Message-ID: <Q9@example.com>"
DATE = b"Date: " + EPOCH_DATE.encode()


def add(raw: bytes) -> bytes:
    return add_missing_headers(raw, domain="example.com", queue_id="Q9", timestamp=0.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # added at the end of the header block, before the empty line
        (
            b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n",
            b"From: a@example.com\r\nSubject: x\r\n" + MID + b"\r\n" + DATE + b"\r\n\r\nbody\r\n",
        ),
        # no body separator at all
        (b"Subject: x\r\n", b"Subject: x\r\n" + MID + b"\r\n" + DATE + b"\r\n"),
        # no separator and no final newline
        (b"Subject: x", b"Subject: x\r\n" + MID + b"\r\n" + DATE + b"\r\n"),
        # bare LF message: the added fields follow its line ending
        (b"Subject: x\n\nbody\n", b"Subject: x\n" + MID + b"\n" + DATE + b"\n\nbody\n"),
        (b"Subject: x\n", b"Subject: x\n" + MID + b"\n" + DATE + b"\n"),
        # bare-LF header block, CRLF body: the first blank line is the separator
        (
            b"Subject: x\n\nbody\r\n\r\nmore\r\n",
            b"Subject: x\n" + MID + b"\n" + DATE + b"\n\nbody\r\n\r\nmore\r\n",
        ),
        # CRLF header block, bare-LF blank line later in the body
        (
            b"Subject: x\r\n\r\nbody\n\nmore\n",
            b"Subject: x\r\n" + MID + b"\r\n" + DATE + b"\r\n\r\nbody\n\nmore\n",
        ),
        # empty header block: the message starts with the separator
        (b"\r\nbody\r\n", MID + b"\r\n" + DATE + b"\r\n\r\nbody\r\n"),
        (b"", MID + b"\r\n" + DATE + b"\r\n"),
        # an LF field and a CRLF empty line: the fields take the block's LF
        (b"Subject: x\n\r\nbody\r\n", b"Subject: x\n" + MID + b"\n" + DATE + b"\n\r\nbody\r\n"),
        # a line that is not a field starts the body: added above it, not after the body
        (
            b"hello\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n",
            MID + b"\r\n" + DATE + b"\r\nhello\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n",
        ),
    ],
    ids=repr,
)
def test_add_missing_headers(raw: bytes, expected: bytes) -> None:
    assert add(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"Message-ID: <a@b>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\nbody\r\n",
        b"message-id : <a@b>\r\nDATE:\r\n Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\nbody\r\n",
        # the twin of the LF-field, CRLF-empty-line case above: its fields are found
        b"Message-ID: <a@b>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\n\r\nbody\r\n",
    ],
)
def test_add_missing_headers_keeps_complete_message(raw: bytes) -> None:
    assert add(raw) is raw


def test_add_missing_headers_adds_only_what_is_missing() -> None:
    raw = b"Subject: x\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\nDate: in body\r\n"
    assert add(raw) == (
        b"Subject: x\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n" + MID + b"\r\n"
        b"\r\nDate: in body\r\n"
    )


def test_add_missing_headers_ignores_look_alikes_in_body() -> None:
    raw = b"Subject: x\r\n\r\nMessage-ID: <fake@x>\r\nDate: never\r\n"
    out = add(raw)
    headers = out.partition(b"\r\n\r\n")[0]
    assert MID in headers and DATE in headers
    assert out.endswith(b"\r\n\r\nMessage-ID: <fake@x>\r\nDate: never\r\n")


# -- header size (docs/security.md A5.6) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "largest"),
    [
        (b"A: 1\r\nBB: 22\r\n\r\nbody that is much longer than any header\r\n", 8),
        (b"A: 1\r\nB: x\r\n y\r\n\tz\r\nC: 3\r\n\r\nbody\r\n", 14),
        (b"A: 1\nB: 2 folded\n more\n\nbody\n", 18),
        (b"Only: headers, no body\r\n", 24),
    ],
)
def test_largest_header_field_counts_folded_lines(raw: bytes, largest: int) -> None:
    from roundtrip.protocols.smtp import largest_header_field

    assert largest_header_field(raw) == largest


def test_check_header_size_refuses_only_past_the_limit() -> None:
    from roundtrip.protocols.smtp import check_header_size

    raw = b"X: " + b"y" * 97 + b"\r\n\r\nbody\r\n"  # a 102-octet field
    assert check_header_size(raw, limit=102) is None
    assert check_header_size(raw, limit=101) == (
        "552 5.3.4 Error: message header field too large (limit 101 octets)"
    )
    assert check_header_size(raw, limit=0) is None


# The submission checks read every line up to the first empty line (roundtrip/_headerblock.py,
# first_empty_line): wider than the header block, so no reader finds a field they missed.


def test_check_from_header_reads_past_a_line_that_is_not_a_field() -> None:
    stray = b"hello\r\nFrom: mallory@example.net\r\n\r\nbody\r\n"
    assert check_from_header(stray, authenticated_user="alice@example.com") is not None
    # The twin: the same line in the body, below the empty line, is not checked.
    body = b"Subject: x\n\r\nFrom: mallory@example.net\r\n"
    assert check_from_header(body, authenticated_user="alice@example.com") is None


def test_count_received_stops_at_an_lf_then_crlf_empty_line() -> None:
    assert count_received(b"Received: a\nReceived: b\n\r\nReceived: c\r\n") == 2
    assert count_received(b"Received: a\r\nnot a field\r\nReceived: b\r\n\r\n") == 2
