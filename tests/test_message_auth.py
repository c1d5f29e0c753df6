"""ReceivedMessage.auth (Authentication-Results parsed with authres) and the auth= criterion."""

from __future__ import annotations

import pytest

from roundtrip.assertions import assert_delivered, assert_not_delivered
from roundtrip.message import AuthResults, ReceivedMessage

TWO = (
    b"Authentication-Results: mx.example.org;\r\n"
    b"\tdkim=pass header.d=example.com header.s=a header.a=ed25519-sha256;\r\n"
    b'\tdkim=fail reason="body hash did not verify" header.d=example.com header.s=b\r\n'
    b"Authentication-Results: older.example.net; dkim=pass header.d=example.com\r\n"
    b"From: a@example.com\r\nSubject: two\r\n\r\nhi\r\n"
)
PASS = b"Authentication-Results: mx.example.org; dkim=pass header.d=example.com\r\n" + (
    b"From: a@example.com\r\nSubject: one\r\n\r\nhi\r\n"
)


def test_message_auth_reads_the_topmost_field() -> None:
    auth = ReceivedMessage(TWO).auth
    assert auth.authserv_id == "mx.example.org"
    assert [(r.result, r.reason) for r in auth.dkim] == [
        ("pass", None),
        ("fail", "body hash did not verify"),
    ]
    assert auth.dkim[0].properties == {
        "header.d": "example.com",
        "header.s": "a",
        "header.a": "ed25519-sha256",
    }
    assert auth.of("SPF") == []


def test_message_auth_absent_or_unparsable_is_empty() -> None:
    assert ReceivedMessage(b"Subject: x\r\n\r\nhi\r\n").auth == AuthResults()
    broken = ReceivedMessage(b"Authentication-Results: ;;; ===\r\n\r\nhi\r\n").auth
    assert broken.results == () and broken.error


def test_message_auth_criterion_needs_every_result_to_match() -> None:
    messages = [ReceivedMessage(TWO), ReceivedMessage(PASS)]
    (only,) = assert_delivered(messages, auth={"dkim": "pass"})
    assert only.subject == "one"
    with pytest.raises(AssertionError, match="with dkim=pass"):
        assert_delivered(messages, subject="two", auth={"dkim": "pass"})


def test_message_auth_criterion_without_the_method_does_not_match() -> None:
    messages = [ReceivedMessage(PASS)]
    assert_not_delivered(messages, auth={"spf": "pass"})
    with pytest.raises(AssertionError, match="expected no message"):
        assert_not_delivered(messages, auth={"DKIM": "PASS".lower()})
