"""roundtrip.testing.download_imap / download_pop3: one known message's exact octets (twins).

The messages are put into the store directly, so what is compared is exactly what the store
holds against what each client reads back over a real IMAPS or POP3S connection.
"""

from __future__ import annotations

import pytest
from imapclient import IMAPClient

import roundtrip.probes.fetch
import roundtrip.testing
from roundtrip.stack import MailStack
from roundtrip.testing import download_imap, download_pop3

USER = "user@example.org"
TIMEOUT = 10.0

#: Bytes a careless client would change: dot-stuffing candidates (a lone ".", leading dots),
#: 8-bit UTF-8 in header and body, trailing spaces and a tab, an empty body line, a long line.
AWKWARD = (
    b"From: <user@example.com>\r\nTo: <user@example.org>\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe \r\n\r\n"
    b".\r\n..two dots\r\n.one dot\r\n\r\ntrailing  \r\n\ttab\r\n" + b"x" * 990 + b"\r\n"
)


def test_download_imap_returns_the_stored_octets(mailstack: MailStack) -> None:
    stored = mailstack.store.deliver(USER, AWKWARD)
    assert download_imap(mailstack, USER, stored.uid, timeout=TIMEOUT) == AWKWARD


def test_download_imap_leaves_the_message_unseen(mailstack: MailStack) -> None:
    stored = mailstack.store.deliver(USER, AWKWARD)
    download_imap(mailstack, USER, stored.uid, timeout=TIMEOUT)
    message = mailstack.store.mailbox(USER).get(stored.uid)
    assert message is not None
    assert "\\Seen" not in message.flags


def test_download_imap_reads_another_folder(mailstack: MailStack) -> None:
    mailstack.store.create_mailbox(USER, "Sent Items")
    mailstack.store.deliver(USER, b"Subject: inbox\r\n\r\nnot this one\r\n")
    stored = mailstack.store.deliver(USER, AWKWARD, mailbox="Sent Items")
    got = download_imap(mailstack, USER, stored.uid, mailbox="Sent Items", timeout=TIMEOUT)
    assert got == AWKWARD


def test_download_imap_unknown_uid_raises_lookup_error(mailstack: MailStack) -> None:
    stored = mailstack.store.deliver(USER, AWKWARD)
    with pytest.raises(LookupError, match=rf"no message with UID {stored.uid + 1} in 'INBOX'"):
        download_imap(mailstack, USER, stored.uid + 1, timeout=TIMEOUT)


def test_download_imap_unknown_mailbox_raises_lookup_error(mailstack: MailStack) -> None:
    with pytest.raises(LookupError, match=r"cannot select 'Nowhere' of user@example\.org"):
        download_imap(mailstack, USER, 1, mailbox="Nowhere", timeout=TIMEOUT)


def test_download_imap_unknown_user_raises_value_error(mailstack: MailStack) -> None:
    with pytest.raises(ValueError, match=r"'nobody@example\.org' is not a user"):
        download_imap(mailstack, "nobody@example.org", 1, timeout=TIMEOUT)


def test_download_imap_agrees_with_a_plain_imapclient_fetch(mailstack: MailStack) -> None:
    """The helper's bytes are what any IMAP client reads for ``BODY[]``."""
    stored = mailstack.store.deliver(USER, AWKWARD)
    ep = mailstack.endpoints("example.org")
    password = next(u.password for u in mailstack.users if u.address == USER)
    with IMAPClient(
        ep.host,
        port=ep.ports["imaps"],
        ssl_context=mailstack.client_context(),
        timeout=TIMEOUT,
    ) as client:
        client.login(USER, password)
        client.select_folder("INBOX", readonly=True)
        direct = client.fetch([stored.uid], ["BODY.PEEK[]"])[stored.uid][b"BODY[]"]
    assert download_imap(mailstack, USER, stored.uid, timeout=TIMEOUT) == direct


def test_download_pop3_returns_the_stored_octets(mailstack: MailStack) -> None:
    mailstack.store.deliver(USER, b"Subject: first\r\n\r\nfirst\r\n")
    stored = mailstack.store.deliver(USER, AWKWARD)
    assert download_pop3(mailstack, USER, stored.uid, timeout=TIMEOUT) == AWKWARD


def test_download_pop3_unknown_uid_raises_lookup_error(mailstack: MailStack) -> None:
    stored = mailstack.store.deliver(USER, AWKWARD)
    with pytest.raises(LookupError, match=rf"no message with UID {stored.uid + 1} in the INBOX"):
        download_pop3(mailstack, USER, stored.uid + 1, timeout=TIMEOUT)


def test_download_pop3_unknown_user_raises_value_error(mailstack: MailStack) -> None:
    with pytest.raises(ValueError, match=r"'nobody@example\.org' is not a user"):
        download_pop3(mailstack, "nobody@example.org", 1, timeout=TIMEOUT)


def test_testing_helpers_do_not_share_names_with_the_probe() -> None:
    """One name, one behaviour: the probe's deadline-bound search and the tests' download of
    a known UID are different functions, so they must not be called the same."""
    assert not set(roundtrip.testing.__all__) & set(roundtrip.probes.fetch.__all__)
    assert not hasattr(roundtrip.testing, "fetch_imap")
    assert not hasattr(roundtrip.testing, "fetch_pop3")
