"""Every corpus message survives the full cycle byte for byte (issue "Regression testing").

465 with AUTH at example.com -> relay -> DNS MX -> example.org's MX over STARTTLS -> store,
then IMAP ``BODY[]`` and POP3 ``RETR``. The receiving side prepends its ``Received`` line, its
``Authentication-Results`` and the default filter's ``X-Spam-*`` fields; everything after them
must equal the submitted bytes. IMAP BODYSTRUCTURE, ENVELOPE and partial fetches must agree
with what the ``email`` package parses from the same bytes.

One stack serves the whole module (reset between tests) and one authenticated SMTP session
submits every message.
"""

from __future__ import annotations

import base64
import hashlib
import quopri
import resource
import smtplib
import time
from collections.abc import Iterator
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from typing import Any

import pytest
from imapclient import IMAPClient

from roundtrip.certs import CertificateAuthority
from roundtrip.config import StackConfig
from roundtrip.corpus import CorpusMessage, corpus_params, large_message, large_payload
from roundtrip.stack import DeliveredMessage, MailStack
from roundtrip.testing import (
    RoundtripOutcome,
    download_pop3,
    relayed_form,
    roundtrip_eml,
    smtp_options,
)

SENDER = "user@example.com"
RECIPIENT = "user@example.org"
TIMEOUT = 10.0
ADDED = [
    "X-Spam-Checker-Version",
    "X-Spam-Flag",
    "X-Spam-Score",
    "X-Spam-Status",
    "Authentication-Results",  # the recipient's MX: DKIM, SPF and DMARC verdicts
    "Received",  # the recipient's MX (mail.example.org), ESMTPS from the relay
    "DKIM-Signature",  # the submission server signs: Ed25519 (RFC 8463) ...
    "DKIM-Signature",  # ... and RSA, above its own Received as a signing milter writes
    "Received",  # the submission server (mail.example.com), ESMTPSA from the client
]
FETCH_ITEMS = [
    "BODY.PEEK[]",
    "BODYSTRUCTURE",
    "ENVELOPE",
    "BODY.PEEK[]<0.100>",
    "BODY.PEEK[1]",
    "BODY.PEEK[HEADER.FIELDS (SUBJECT)]",
]


class Submitter:
    """One authenticated SMTP_SSL session, reused; reconnects if the server dropped it."""

    def __init__(self, stack: MailStack) -> None:
        self.stack = stack
        self.client: smtplib.SMTP_SSL | None = None

    def _connect(self) -> smtplib.SMTP_SSL:
        ep = self.stack.endpoints("example.com")
        client = smtplib.SMTP_SSL(
            ep.host,
            ep.ports["submissions"],
            local_hostname="client.example.com",
            context=self.stack.client_context(),
            timeout=TIMEOUT,
        )
        client.login(SENDER, self.stack.user("example.com").password)
        return client

    def send(self, raw: bytes, options: list[str]) -> None:
        for attempt in (1, 2):
            if self.client is None:
                self.client = self._connect()
            try:
                self.client.rset()
                self.client.sendmail(SENDER, [RECIPIENT], raw, mail_options=options)
                return
            except smtplib.SMTPServerDisconnected:
                self.close()
                if attempt == 2:
                    raise

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.quit()
            except (smtplib.SMTPException, OSError):
                self.client.close()
            self.client = None


@pytest.fixture(scope="module")
def module_stack(mailstack_ca: CertificateAuthority) -> Iterator[MailStack]:
    with MailStack(StackConfig(), ca=mailstack_ca) as stack:
        yield stack


@pytest.fixture(scope="module")
def submitter(module_stack: MailStack) -> Iterator[Submitter]:
    sub = Submitter(module_stack)
    yield sub
    sub.close()


@pytest.fixture
def stack(module_stack: MailStack) -> Iterator[MailStack]:
    module_stack.reset()
    yield module_stack
    module_stack.check()


def _options(message: CorpusMessage) -> list[str]:
    if "smtputf8" in message.flags:
        return ["SMTPUTF8", "BODY=8BITMIME"]
    if "8bitmime" in message.flags:
        return ["BODY=8BITMIME"]
    return []


def _deliver(
    stack: MailStack, submitter: Submitter, raw: bytes, options: list[str]
) -> DeliveredMessage:
    before = stack.store.mailbox(RECIPIENT).uidnext
    submitter.send(raw, options)
    return stack.wait_for(RECIPIENT, match=lambda m: m.stored.uid >= before, timeout=TIMEOUT)


def _imap_fetch(stack: MailStack, uid: int) -> dict[bytes, Any]:
    ep = stack.endpoints("example.org")
    with IMAPClient(
        ep.host, ep.ports["imaps"], ssl=True, ssl_context=stack.client_context(), timeout=TIMEOUT
    ) as client:
        client.login(RECIPIENT, stack.user("example.org").password)
        client.select_folder("INBOX", readonly=True)
        response: dict[bytes, Any] = client.fetch([uid], FETCH_ITEMS)[uid]
        client.logout()
    return response


# -- what the email package sees -----------------------------------------------------------


def _unsurrogate(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _flat(text: str | None) -> str | None:
    return None if text is None else " ".join(_unsurrogate(text).split())


def _email_types(msg: Message) -> list[str]:
    return [part.get_content_type() for part in msg.walk()]


def _email_leaves(msg: Message) -> int:
    return sum(
        1
        for part in msg.walk()
        if not part.is_multipart() and part.get_content_type() != "message/rfc822"
    )


def _bs_split(node: Any) -> tuple[list[Any], bytes] | None:
    """(children, subtype) of a multipart BODYSTRUCTURE node, None for a leaf."""
    if isinstance(node[0], list):
        return node[0], node[1]
    if not isinstance(node[0], tuple):
        return None
    children: list[Any] = []
    for item in node:
        if isinstance(item, bytes):
            return children, item
        children.append(item)
    raise AssertionError(f"multipart BODYSTRUCTURE without a subtype: {node!r}")


def _bs_types(root: Any) -> tuple[list[str], int]:
    """Pre-order content types of every entity, and the number of leaves."""
    types: list[str] = []
    leaves = 0
    stack = [root]
    while stack:
        node = stack.pop()
        split = _bs_split(node)
        if split is not None:
            children, subtype = split
            types.append(f"multipart/{subtype.decode().lower()}")
            stack.extend(reversed(children))
            continue
        ctype = f"{node[0].decode().lower()}/{node[1].decode().lower()}"
        types.append(ctype)
        if ctype == "message/rfc822":
            stack.append(node[8])
        else:
            leaves += 1
    return types, leaves


def _envelope_addresses(addresses: Any) -> list[str]:
    return [
        f"{a.mailbox.decode('utf-8')}@{a.host.decode('utf-8')}".lower()
        for a in addresses or ()
        if a.host is not None  # group start and end markers have no host (RFC 3501 7.4.2)
    ]


def _email_addresses(msg: Message, name: str) -> list[str]:
    header: Any = msg[name]
    if header is None:
        return []
    return [_unsurrogate(a.addr_spec).lower() for a in header.addresses]


def _decode_envelope_subject(value: bytes | None) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8", "replace")
    return _flat(str(make_header(decode_header(text))))


def _transfer_decode(data: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.b64decode(b"".join(data.split()))
    if encoding == "quoted-printable":
        return quopri.decodestring(data)
    return data


def _check_imap_agrees_with_email(stored: bytes, fetched: dict[bytes, Any]) -> None:
    parsed = BytesParser(policy=policy.default).parsebytes(stored)
    # BODYSTRUCTURE: same entities, same order, same content types.
    types, leaves = _bs_types(fetched[b"BODYSTRUCTURE"])
    assert types == _email_types(parsed)
    assert leaves == _email_leaves(parsed)
    # ENVELOPE: subject, from, to, cc.
    envelope = fetched[b"ENVELOPE"]
    assert _decode_envelope_subject(envelope.subject) == _flat(parsed["subject"])
    assert _envelope_addresses(envelope.from_) == _email_addresses(parsed, "from")
    assert _envelope_addresses(envelope.to) == _email_addresses(parsed, "to")
    assert _envelope_addresses(envelope.cc) == _email_addresses(parsed, "cc")
    # Partial fetches are exact slices.
    assert fetched[b"BODY[]<0>"] == stored[:100]
    fields = fetched[b"BODY[HEADER.FIELDS (SUBJECT)]"]
    assert fields.endswith(b"\r\n")
    if parsed["subject"] is None:
        assert fields == b"\r\n"
    else:
        assert fields[:-2] in stored[: stored.find(b"\r\n\r\n") + 2]
        only = BytesParser(policy=policy.default).parsebytes(fields)
        assert _flat(only["subject"]) == _flat(parsed["subject"])
    # BODY[1]: the first part's content (the whole body of a single-part message).
    part = parsed.get_payload(0) if parsed.is_multipart() else parsed
    assert isinstance(part, Message)
    body1 = fetched[b"BODY[1]"]
    if part.is_multipart():
        assert f"--{part.get_boundary()}".encode() in body1
    elif part.get_content_type() != "message/rfc822":
        encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        assert _transfer_decode(body1, encoding) == part.get_payload(decode=True)


# -- the corpus ------------------------------------------------------------------------------


@pytest.mark.parametrize("message", corpus_params(), ids=str)
def test_corpus_roundtrip_message(
    stack: MailStack, submitter: Submitter, message: CorpusMessage
) -> None:
    delivered = _deliver(stack, submitter, message.raw, _options(message))
    stored = delivered.raw
    imap = _imap_fetch(stack, delivered.stored.uid)
    pop3 = download_pop3(stack, RECIPIENT, delivered.stored.uid, timeout=TIMEOUT)
    outcome = RoundtripOutcome.build(
        message.raw, stored, {"imap": imap[b"BODY[]"], "pop3": pop3}, message=delivered
    )

    assert outcome.downloads_match, outcome.diff()
    assert outcome.added_fields == ADDED, outcome.added_headers
    mx, submission = delivered.received_chain[:2]
    assert (mx.by, mx.with_, mx.tls) == ("mail.example.org", "ESMTPS", True)
    assert (submission.by, submission.with_, submission.tls) == (
        "mail.example.com",
        "ESMTPSA",
        True,
    )
    if message.byte_identical:
        assert outcome.identical, outcome.diff()
    else:
        # The documented normalisation: SMTP appends the final CRLF and the relay turns
        # every stray CR or LF into CRLF (fixtures/README.md, docs/security.md A2.2).
        assert not outcome.identical
        assert outcome.equivalent, outcome.diff()
        assert outcome.delivered == relayed_form(message.raw)
        if message.flags == {"no-final-newline"}:
            assert outcome.delivered == message.expected_delivery
    _check_imap_agrees_with_email(stored, imap)


def test_corpus_roundtrip_detects_an_altered_body(stack: MailStack, submitter: Submitter) -> None:
    """The twin: a stack that changes one byte in transit is caught, with a readable diff."""
    message = corpus_params()[0]
    stack.faults.alter_body = True
    delivered = _deliver(stack, submitter, message.raw, [])
    pop3 = download_pop3(stack, RECIPIENT, delivered.stored.uid, timeout=TIMEOUT)
    outcome = RoundtripOutcome.build(message.raw, delivered.raw, {"pop3": pop3})
    assert outcome.downloads_match
    assert not outcome.identical
    assert not outcome.equivalent
    text = outcome.diff()
    assert "first difference at byte" in text
    assert "vs submitted" in text


def test_corpus_roundtrip_detects_a_header_added_by_a_filter(
    stack: MailStack, submitter: Submitter
) -> None:
    """A non-trace field prepended by the receiving side is a change, and is named."""
    from roundtrip.protocols.filter import Verdict

    stack.content_filter = lambda _msg: Verdict(headers=(("X-Rewritten", "yes"),))
    message = corpus_params()[0]
    delivered = _deliver(stack, submitter, message.raw, [])
    outcome = RoundtripOutcome.build(message.raw, delivered.raw, {"store": delivered.raw})
    assert outcome.unexpected_added == ["X-Rewritten"]
    assert not outcome.identical
    assert "X-Rewritten" in outcome.diff()


# -- large messages --------------------------------------------------------------------------

MiB = 1024 * 1024
# A 40 MiB attachment is about 57.4 MB as base64 in 76-character lines, above the stack's
# default SIZE limit of 50 MiB, so these tests get a stack that takes 64 MiB.
LARGE_LIMIT = 64 * MiB


@pytest.fixture(scope="module")
def large_stack(mailstack_ca: CertificateAuthority) -> Iterator[MailStack]:
    with MailStack(StackConfig(max_message_size=LARGE_LIMIT), ca=mailstack_ca) as stack:
        yield stack
        stack.check()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [10 * MiB, 40 * MiB], ids=["10MiB", "40MiB"])
def test_corpus_roundtrip_large_attachment(
    large_stack: MailStack, size: int, capsys: pytest.CaptureFixture[str]
) -> None:
    large_stack.reset()
    raw = large_message(size, sender=SENDER, recipient=RECIPIENT)
    assert len(raw) > 50 * MiB if size == 40 * MiB else len(raw) < 50 * MiB
    peak_before = _peak_rss_mib()
    started = time.perf_counter()
    outcome = roundtrip_eml(large_stack, raw, retrieve="both", timeout=60)
    elapsed = time.perf_counter() - started
    growth = _peak_rss_mib() - peak_before

    digest = hashlib.sha256(raw).hexdigest()
    for method, data in outcome.fetched_by.items():
        tail = data[len(outcome.added_headers) :]
        assert hashlib.sha256(tail).hexdigest() == digest, method
    assert outcome.identical, outcome.diff()
    assert outcome.message is not None
    (attachment,) = outcome.message.attachments
    assert hashlib.sha256(attachment.data).digest() == hashlib.sha256(large_payload(size)).digest()
    with capsys.disabled():
        print(
            f"\n[large {size // MiB} MiB attachment, {len(raw) / 1e6:.1f} MB message] "
            f"round trip (465 -> relay -> MX -> IMAP + POP3) {elapsed:.1f} s, "
            f"peak RSS growth {growth:.0f} MiB"
        )


def test_corpus_roundtrip_oversize_is_refused_by_the_default_limit(
    stack: MailStack, submitter: Submitter
) -> None:
    """The twin of the 40 MiB case: the default 50 MiB SIZE limit refuses it, nothing stored."""
    raw = large_message(40 * MiB, sender=SENDER, recipient=RECIPIENT)
    assert smtp_options(raw) == []
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        submitter.send(raw, [])
    assert info.value.smtp_code == 552
    assert stack.messages() == []
    submitter.close()  # the server may drop the session after a refusal
