"""Shared test helpers. The roundtrip plugin itself is loaded through its entry point."""

from __future__ import annotations

import email.utils

import pytest


def make_message(
    *, sender: str, recipient: str, subject: str, body: str = "hello\r\n", extra: str = ""
) -> bytes:
    """A small CRLF message, with a dot-led line to exercise dot transparency."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain=sender.rpartition('@')[2])}\r\n"
        f"Date: {email.utils.formatdate()}\r\n{extra}"
    )
    return (head + "\r\n" + body).encode("utf-8")


@pytest.fixture
def message_factory():  # type: ignore[no-untyped-def]
    return make_message
