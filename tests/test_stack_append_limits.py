"""The stack gives IMAP APPEND the limits its SMTP listeners apply to DATA.

StackConfig.max_message_size is the IMAP APPENDLIMIT (RFC 7889), and
SMTPLimits.max_header_size / max_hops hold APPEND as they hold submission.
"""

from __future__ import annotations

import imaplib
from collections.abc import Iterator

import pytest

from roundtrip import MailStack, StackConfig
from roundtrip.config import SMTPLimits

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        domains=("example.com",),
        max_message_size=4096,
        smtp_limits=SMTPLimits(max_header_size=200, max_hops=3),
    )
    with MailStack(config) as running:
        yield running


def _append(stack: MailStack, raw: bytes) -> tuple[str, list[bytes]]:
    user = stack.user()
    host, port = stack.endpoints().address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        client.login(user.address, user.password)
        typ, data = client.append("INBOX", None, None, raw)
        return typ, [d for d in data if isinstance(d, bytes)]
    except imaplib.IMAP4.error as exc:
        return "NO", [str(exc).encode()]
    finally:
        client.shutdown()


def test_append_limits_follow_the_stack_config(stack: MailStack) -> None:
    user = stack.user()
    host, port = stack.endpoints().address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        _, caps = client.capability()
    finally:
        client.shutdown()
    assert b"APPENDLIMIT=4096" in caps[0], caps
    assert _append(stack, b"Subject: " + b"x" * 300 + b"\r\n\r\nbody\r\n")[0] == "NO"
    assert _append(stack, b"Received: by a\r\n" * 4 + b"Subject: hops\r\n\r\nb\r\n")[0] == "NO"
    assert _append(stack, b"Subject: big\r\n\r\n" + b"y" * 5000 + b"\r\n")[0] == "NO"
    assert stack.messages(user.address) == []


def test_append_limits_twin_within_limits_is_stored(stack: MailStack) -> None:
    stack.reset()
    typ, _ = _append(stack, b"Received: by a\r\n" * 3 + b"Subject: fits\r\n\r\nbody\r\n")
    assert typ == "OK"
    assert [m.subject for m in stack.messages(stack.user().address)] == ["fits"]
