"""Pure tests of protocols.dsn: the DSN parses as an RFC 3464 multipart/report."""

from __future__ import annotations

import email
import email.message
import email.policy
import re

import pytest

from roundtrip.protocols.dsn import build_dsn, original_headers

ORIGINAL = (
    b"From: alice@example.org\n"
    b"To: bob@example.net\n"
    b"Message-ID: <orig-1@example.org>\n"
    b"Subject: hello\n"
    b"\n"
    b"secret body that must not come back\n"
)


def make(**overrides: object) -> bytes:
    kwargs: dict[str, object] = dict(
        original=ORIGINAL,
        envelope_from="alice@example.org",
        recipient="bob@example.net",
        status="5.1.1",
        diagnostic="smtp; 550 5.1.1 no such user",
        remote_mta="mail.example.net",
        reporting_mta="mail.example.org",
        arrival_date=1_700_000_000.0,
        now=1_700_000_060.0,
        message_id_domain="example.org",
    )
    kwargs.update(overrides)
    return build_dsn(**kwargs)  # type: ignore[arg-type]


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_dsn_is_multipart_report_with_three_parts() -> None:
    msg = parse(make())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects


def test_dsn_top_level_headers() -> None:
    msg = parse(make())
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@example.org"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert msg["Message-ID"].endswith("@example.org>")
    assert msg["Date"].datetime.timestamp() == 1_700_000_060.0


def test_dsn_delivery_status_fields() -> None:
    status_part = list(parse(make()).iter_parts())[1]
    per_message, per_recipient = status_part.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == (
        1_700_000_000.0
    )
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mail.example.net"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"


def test_dsn_returns_original_headers_not_body() -> None:
    data = make()
    headers_part = list(parse(data).iter_parts())[2]
    text = headers_part.get_content()
    assert "Subject: hello" in text
    assert "Message-ID: <orig-1@example.org>" in text
    assert b"secret body" not in data


def test_dsn_uses_crlf_only() -> None:
    data = make()
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", data)


def test_dsn_diagnostic_without_type_gets_smtp_prefix_and_no_remote() -> None:
    status_part = list(parse(make(diagnostic="550 nope", remote_mta="")).iter_parts())[1]
    per_recipient = status_part.get_payload()[1]
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 nope"
    assert per_recipient["Remote-MTA"] is None


def test_dsn_remote_text_cannot_inject_headers() -> None:
    data = make(diagnostic="smtp; 550 x\r\nBcc: victim@example.org\r\n", remote_mta="a\nb")
    msg = parse(data)
    assert msg["Bcc"] is None
    status_part = list(msg.iter_parts())[1]
    assert status_part.get_payload()[1]["Bcc"] is None
    assert b"\r\nBcc:" not in data


def test_dsn_expiry_status() -> None:
    per_recipient = list(parse(make(status="4.4.7")).iter_parts())[1].get_payload()[1]
    assert per_recipient["Status"] == "4.4.7"
    assert per_recipient["Action"] == "failed"


@pytest.mark.parametrize("sender", ["", "<>"])
def test_dsn_never_bounces_a_bounce(sender: str) -> None:
    with pytest.raises(ValueError, match="never bounce a bounce"):
        make(envelope_from=sender)


@pytest.mark.parametrize(
    ("field", "value"), [("status", "550"), ("status", "5.1"), ("action", "exploded")]
)
def test_dsn_rejects_bad_status_or_action(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_dsn_original_headers_without_body_separator() -> None:
    assert original_headers(b"Subject: x\nFrom: y") == b"Subject: x\r\nFrom: y\r\n"
    assert original_headers(b"") == b""
