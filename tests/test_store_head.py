"""A message stored as the fields the MX put on top plus the bytes it received.

``Store.deliver(..., head=...)`` keeps the two apart until ``raw`` is first read, and
``FilterInput`` hands a filter the two parts with ``raw`` joined only on demand: a big
message is not copied while it is delivered (tests/test_memory.py measures the round trip).
Each "no copy" test has a twin that reads ``raw`` and sees the copy with the same measure.
"""

from __future__ import annotations

import contextlib
import imaplib
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import backend_store, peak_growth, run_together

from roundtrip import MailStack, StackConfig
from roundtrip.maildir import MaildirStore
from roundtrip.message import ReceivedMessage
from roundtrip.protocols.filter import FilterInput, Verdict, default_filter
from roundtrip.protocols.pop3 import POP3Connection
from roundtrip.stack import DeliveredMessage
from roundtrip.store import Store

TIMEOUT = 10
ALICE = "alice@example.com"
HEAD = b"Received: from a (a [127.0.0.1]) by mx.example.com; Thu, 3 Dec 2026 10:00:00 +0000\r\n"
BODY = b"From: <bob@example.org>\r\nMessage-ID: <one@example.org>\r\nSubject: one\r\n\r\nbody\r\n"
BIG = 4_000_000


@pytest.fixture(params=["memory", "maildir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with backend_store(request.param, tmp_path / "mail", {ALICE: "secret"}) as s:
        yield s


def _big_body() -> bytes:
    return b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (BIG // 78)


# the store


def test_store_head_is_in_front_of_the_message(store: Store) -> None:
    msg = store.deliver(ALICE, BODY, head=HEAD)
    assert msg.size == len(HEAD) + len(BODY)  # before anything is joined
    assert msg.raw == HEAD + BODY
    assert msg.size == len(HEAD + BODY)
    again = store.messages(ALICE, "INBOX")[0]
    assert again.raw == HEAD + BODY


def test_store_without_head_keeps_the_bytes_as_given(store: Store) -> None:
    msg = store.deliver(ALICE, BODY)
    assert msg.raw == BODY and msg.size == len(BODY)


def test_store_head_survives_a_reopened_maildir(tmp_path: Path) -> None:
    md = MaildirStore(tmp_path / "mail")
    md.add_user(ALICE, "secret")
    md.deliver(ALICE, BODY, head=HEAD)
    md.close()
    again = MaildirStore(tmp_path / "mail")
    try:
        [msg] = again.messages(ALICE, "INBOX")
        assert msg.raw == HEAD + BODY and msg.size == len(HEAD + BODY)
    finally:
        again.close()


def test_store_head_message_id_lookup_without_joining(store: Store) -> None:
    store.deliver(ALICE, BODY, head=HEAD)
    box = store.mailbox(ALICE)
    assert box.uids_with_message_id("<one@example.org>") == [1]
    # A Message-ID in the head is a field of the header block as much as the content's is:
    # SEARCH HEADER finds a message by either (RFC 3501 section 6.4.4).
    store.deliver(ALICE, BODY, head=b"Message-ID: <head@example.org>\r\n" + HEAD)
    assert box.uids_with_message_id("<head@example.org>") == [2]
    assert box.uids_with_message_id("<one@example.org>") == [1, 2]
    assert box.get(2).message_id() == "<head@example.org>"  # the first field is the head's


IN_BODY = b"<in-body@example.org>"


@pytest.mark.parametrize(
    "body",
    [
        b"\r\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n",  # no header of its own
        b"\nMessage-ID: <in-body@example.org>\n\nbody\n",
        b"Subject: lf\n\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n",
        b"Subject: mixed\n\r\nMessage-ID: <in-body@example.org>\n\nbody\n",
        # A line that is not a field ends the header: the body starts with it.
        b"hello\r\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n",
        b"Subject: x\r\nnot a field\r\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n",
    ],
)
@pytest.mark.parametrize("head", [HEAD, b""])
def test_store_message_id_is_not_read_from_the_body(store: Store, head: bytes, body: bytes) -> None:
    """The header block ends at its first empty line (RFC 5322 section 2.1), also when the
    received bytes start with it right after the MX's fields."""
    msg = store.deliver(ALICE, body, head=head)
    assert msg.message_id() == ""
    assert store.mailbox(ALICE).uids_with_message_id(IN_BODY.decode()) == []
    assert msg.raw == head + body and msg.message_id() == ""  # joined: the same answer


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (HEAD, b"Message-ID: <in-body@example.org>\r\n\r\nbody\r\n"),
        (HEAD, b"Subject: lf\nMessage-ID: <in-body@example.org>\n\r\nbody\r\n\r\n"),
        (HEAD + b"Message-ID: <in-body@example.org>\r\n", b"\r\nbody\r\n"),
        (b"", b"Message-ID: <in-body@example.org>\n\nbody\n"),
        # A folded field continues the header; a space before the colon still names a field.
        (b"", b"Subject: x\r\n\tfolded\r\nMessage-ID: <in-body@example.org>\r\n\r\nb\r\n"),
        (HEAD, b"X-A : y\r\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n"),
    ],
)
def test_store_message_id_of_the_header_is_still_found(
    store: Store, head: bytes, body: bytes
) -> None:
    # The twin: a Message-ID field above the empty line is the message's.
    msg = store.deliver(ALICE, body, head=head)
    assert msg.message_id() == IN_BODY.decode()
    assert store.mailbox(ALICE).uids_with_message_id(IN_BODY.decode()) == [msg.uid]


def test_store_head_delivery_does_not_copy_the_message() -> None:
    store = Store()
    store.add_user(ALICE, "secret")
    body = _big_body()
    kept = []
    assert peak_growth(lambda: kept.append(store.deliver(ALICE, body, head=HEAD))) < BIG // 10
    # The twin: the first read of ``raw`` is the one copy, made once.
    assert peak_growth(lambda: kept[0].raw) >= BIG
    assert peak_growth(lambda: kept[0].raw) < BIG // 10
    assert kept[0].raw == HEAD + body


def test_store_head_joined_once_under_concurrent_readers() -> None:
    store = Store()
    store.add_user(ALICE, "secret")
    for _ in range(50):
        msg = store.deliver(ALICE, BODY, head=HEAD)
        assert run_together(lambda msg=msg: msg.raw) == [HEAD + BODY] * 4


# the filter's view


def test_filter_input_raw_joins_head_and_content() -> None:
    message = FilterInput("b@example.org", ("a@example.com",), BODY, True, "h", "mx", head=HEAD)
    assert message.raw == HEAD + BODY
    assert message.header.startswith(HEAD) and message.header.endswith(b"Subject: one\r\n")
    assert message.content is BODY
    plain = FilterInput("b@example.org", ("a@example.com",), BODY, True, "h", "mx")
    assert plain.raw is BODY


def test_filter_default_filter_does_not_copy_the_message() -> None:
    body = _big_body()
    message = FilterInput("b@example.org", ("a@example.com",), body, True, "h", "mx", head=HEAD)
    verdicts: list[Verdict] = []
    assert peak_growth(lambda: verdicts.append(default_filter(message))) < BIG // 10
    assert dict(verdicts[0].headers)["X-Spam-Flag"] == "NO"
    # The twin: a filter that reads ``raw`` pays for the join.
    assert peak_growth(lambda: message.raw) >= BIG


def test_filter_default_filter_finds_gtube_in_the_content() -> None:
    spam = BODY + b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
    for raw, flag in ((spam, "YES"), (BODY, "NO")):
        verdict = default_filter(FilterInput("b@x", ("a@y",), raw, True, "h", "mx", head=HEAD))
        assert dict(verdict.headers)["X-Spam-Flag"] == flag


def test_filter_header_stops_at_the_content_empty_line() -> None:
    """Content that starts with the empty line has no fields of its own: lines below it
    are body, not header (a Message-ID or Date there does not count)."""
    fake = b"\r\nMessage-ID: <in-body@example.org>\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\n"
    for content in (fake + b"\r\nbody\r\n", b"Subject: s\n\n" + fake[2:] + b"\r\nbody\r\n"):
        message = FilterInput("b@x", ("a@y",), content, True, "h", "mx", head=HEAD)
        assert b"in-body" not in message.header
        tests = dict(default_filter(message).headers)["X-Spam-Status"]
        assert "MISSING_MESSAGE_ID" in tests and "MISSING_DATE" in tests
    # The twin: the same fields above the empty line are the header's.
    message = FilterInput("b@x", ("a@y",), fake[2:] + b"\r\nbody\r\n", True, "h", "mx", head=HEAD)
    assert message.header == HEAD + fake[2:]
    tests = dict(default_filter(message).headers)["X-Spam-Status"]
    assert "MISSING_MESSAGE_ID" not in tests and "MISSING_DATE" not in tests


# through the stack


def test_stack_mx_filter_sees_its_received_field_on_top() -> None:
    """A custom filter's ``raw`` is the message as the MX received it, its Received on top;
    the stored copy has the filter's field, then Authentication-Results, then that Received."""
    seen: list[bytes] = []

    def custom(message: FilterInput) -> Verdict:
        seen.append(message.raw)
        return Verdict(headers=(("X-Checked", "yes"),))

    with MailStack(StackConfig()) as stack:
        stack.content_filter = custom
        sender, rcpt = stack.user("example.com"), stack.user("example.org")
        host, port = stack.endpoints("example.com").address("submissions")
        with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
            smtp.login(sender.address, sender.password)
            smtp.sendmail(sender.address, [rcpt.address], b"Subject: head order\r\n\r\nhello\r\n")
        got = stack.wait_for(rcpt.address, subject="head order", timeout=TIMEOUT)
        stack.check()
    assert len(seen) == 1
    assert seen[0].startswith(b"Received: from ")
    first = seen[0].split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert b"by mail.example.org" in first.split(b"\r\n", 1)[0]
    fields = [line.split(b":", 1)[0] for line in got.raw.split(b"\r\n") if line[:1] not in b" \t"]
    assert fields[:3] == [b"X-Checked", b"Authentication-Results", b"Received"]
    assert got.raw.endswith(seen[0])  # stored = the filter's view with the new fields on top


@pytest.mark.parametrize("backend", ["memory", "maildir"])
def test_stack_imap_search_message_id_reads_only_the_header(backend: str, tmp_path: Path) -> None:
    """A message sent straight to the MX with no header fields of its own (it starts with
    the empty line) is stored as the MX's fields plus those bytes: IMAP SEARCH HEADER
    Message-ID does not take a line of its body for a field, and finds a real one (the twin).
    """
    fake = b"\r\nMessage-ID: <in-body@example.org>\r\n\r\nheaderless\r\n"
    real = b"Message-ID: <in-header@example.org>\r\nSubject: real\r\n\r\nbody\r\n"
    with contextlib.ExitStack() as cleanup:
        store = Store() if backend == "memory" else cleanup.enter_context(MaildirStore(tmp_path))
        stack = cleanup.enter_context(MailStack(StackConfig(), store=store))
        rcpt = stack.user("example.org")
        host, port = stack.endpoints("example.org").address("smtp")
        with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
            smtp.starttls(context=stack.client_context())
            assert smtp.sendmail("someone@example.net", [rcpt.address], fake) == {}
            assert smtp.sendmail("someone@example.net", [rcpt.address], real) == {}
        second = stack.wait_for(rcpt.address, subject="real", timeout=TIMEOUT)
        first = stack.wait_for(rcpt.address, match=lambda m: m.message_id is None, timeout=TIMEOUT)
        if backend == "memory":  # kept in two parts (the MX's fields, the bytes sent) until
            assert first.stored.parts()[1] == fake  # ``raw`` is read, after the searches
        assert first.message_id is None and second.message_id == "<in-header@example.org>"
        ep = stack.endpoints("example.org")
        with imaplib.IMAP4_SSL(
            ep.host, ep.ports["imaps"], ssl_context=stack.client_context(), timeout=TIMEOUT
        ) as imap:
            imap.login(rcpt.address, rcpt.password)
            imap.select("INBOX")
            for needle, uids in (
                ("<in-body@example.org>", b""),  # the index
                ("in-body@example.org", b""),  # a scan
                ("<in-header@example.org>", str(second.stored.uid).encode()),
                ("in-header@example.org", str(second.stored.uid).encode()),
            ):
                assert imap.uid("SEARCH", "HEADER", "Message-ID", f'"{needle}"') == ("OK", [uids])
        assert first.raw.endswith(fake)
        stack.check()


# readers of the header block: DeliveredMessage (wait_for, delivery callbacks) and POP3


@pytest.mark.parametrize(
    "body",
    [
        BODY,
        b"Subject: lf\nMessage-ID: <lf@example.org>\n\nbody\n",
        b"\r\nno header of its own\r\n",
        b"\r\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n",
        b"Subject: mixed\n\r\nMessage-ID: <in-body@example.org>\r\n\r\nbody\r\n",
        b"\nbare LF blank line first\n",
        b"Subject: no body",
    ],
)
@pytest.mark.parametrize("head", [HEAD, b""])
def test_delivered_message_from_the_parts_reads_as_from_the_bytes(
    store: Store, head: bytes, body: bytes
) -> None:
    stored = store.deliver(ALICE, body, head=head)
    lazy = DeliveredMessage(None, stored)
    eager = ReceivedMessage(head + body)
    for name in ("subject", "message_id", "from_", "to", "date", "size", "body_sha256"):
        assert getattr(lazy, name) == getattr(eager, name), name
    assert lazy.headers.items() == eager.headers.items()
    assert [h.by for h in lazy.received_chain] == [h.by for h in eager.received_chain]
    assert lazy.raw == head + body and lazy.text == eager.text


def test_delivered_message_headers_without_joining() -> None:
    store = Store()
    store.add_user(ALICE, "secret")
    body = _big_body()
    stored = store.deliver(ALICE, body, head=HEAD)
    made: list[DeliveredMessage] = []

    def headers_and_size() -> None:
        made.append(DeliveredMessage(None, stored))
        assert made[0].subject == "big" and made[0].size == len(HEAD) + len(body)
        assert "big" in made[0].summary()

    assert peak_growth(headers_and_size) < BIG // 10
    # The twin: the first read of ``raw`` joins the parts.
    assert peak_growth(lambda: made[0].raw) >= BIG
    assert made[0].raw == HEAD + body


def test_pop3_login_does_not_join_and_retr_sends_the_whole_message() -> None:
    store = Store()
    store.add_user(ALICE, "secret")
    body = _big_body()
    store.deliver(ALICE, body, head=HEAD)
    conn = POP3Connection(store, hostname="pop.example.test", secure=True, starttls_available=False)
    conn.data_to_send()
    replies: list[bytes] = []

    def login_and_list() -> None:
        for line in (f"USER {ALICE}\r\n", "PASS secret\r\n", "LIST 1\r\n"):
            conn.receive_data(line.encode())
            replies.append(conn.data_to_send())

    assert peak_growth(login_and_list) < BIG // 10
    size = len(HEAD) + len(body)  # CRLF throughout: the wire size is the stored size
    assert replies[1].startswith(b"+OK maildrop has 1 messages")
    assert replies[2] == f"+OK 1 {size}\r\n".encode()
    # The twin: RETR reads the message, whole.
    conn.receive_data(b"RETR 1\r\n")
    sent = conn.data_to_send()
    assert sent.startswith(f"+OK {size} octets\r\n".encode())
    assert sent[len(f"+OK {size} octets\r\n") :] == HEAD + body + b".\r\n"
