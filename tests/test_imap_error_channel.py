"""A MIME bug of ours behind an IMAP answer fails the test through ``MailStack.check()``.

The MIME functions stay total (the client always gets a well-formed FETCH or SEARCH answer), but
an exception of ours they caught goes to the stack's error recorder. Hostile input they are
built for (absurd nesting, docs/security.md A5.5) is not a bug and is not reported.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from imapclient import IMAPClient

from roundtrip import MailStack
from roundtrip.protocols import _mime

TIMEOUT = 5.0
MESSAGE = (
    b"From: bob@example.com\r\nSubject: checked\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nfirst part\r\n--b--\r\n"
)


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _client(stack: MailStack, raw: bytes) -> IMAPClient:
    user = stack.user("example.org")
    stack.store.deliver(user.address, raw)
    host, port = stack.endpoints("example.org").address("imaps")
    client = IMAPClient(host, port=port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    client.login(user.address, user.password)
    client.select_folder("INBOX", readonly=True)
    client.use_uid = False  # sequence number 1: UIDs keep growing across resets
    return client


def _boom(*args: object, **kwargs: object) -> object:
    raise ValueError("a bug of ours")


@pytest.mark.parametrize(
    ("helper", "items"),
    [
        ("_parse_entity", ["BODYSTRUCTURE"]),
        ("render_envelope", ["ENVELOPE"]),
        ("extract", ["BODY.PEEK[1]"]),
    ],
)
def test_imap_error_channel_mime_bug_fails_check(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch, helper: str, items: list[str]
) -> None:
    monkeypatch.setattr(_mime, helper, _boom)
    with _client(stack, MESSAGE) as client:
        answer = client.fetch([1], items)[1]  # well-formed: imapclient parses it
        assert set(answer) >= {b"SEQ"}
        assert client.noop()[0].startswith(b"NOOP completed")  # the session goes on
    with pytest.raises(ValueError, match="a bug of ours"):
        stack.check()


def test_imap_error_channel_search_bug_fails_check(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mime, "body_text", _boom)
    with _client(stack, MESSAGE) as client:
        assert client.search(["BODY", "first"]) == []
    with pytest.raises(ValueError, match="a bug of ours"):
        stack.check()


def test_imap_error_channel_no_bug_no_report(stack: MailStack) -> None:
    with _client(stack, MESSAGE) as client:
        answer = client.fetch([1], ["BODYSTRUCTURE", "ENVELOPE", "BODY.PEEK[1]"])[1]
        assert answer[b"BODY[1]"] == b"first part"
        assert client.search(["BODY", "first"]) == [1]
    stack.check()


def test_imap_error_channel_deep_nesting_is_not_a_bug(stack: MailStack) -> None:
    deep = b"Subject: deep\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"x\r\n"
    with _client(stack, deep) as client:
        answer = client.fetch([1], ["BODYSTRUCTURE", "ENVELOPE", "BODY.PEEK[1.1.1]"])[1]
        assert answer[b"ENVELOPE"].subject == b"deep"
        assert client.search(["BODY", "x"]) == []  # past the depth cap: an opaque leaf
    stack.check()
