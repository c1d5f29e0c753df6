"""Logins that must not open: the outbound capture, empty passwords, a foreign authzid.

The outbound capture (``outbound@roundtrip.invalid``) is a mailbox the stack fills with mail
for outside domains; tests read it through ``MailStack.outbound``. It is not a login on any
service, and an empty password authenticates nobody (Dovecot refuses empty passwords unless
``nopassword`` is configured on purpose). RFC 4616 section 2: a PLAIN authorization identity
other than the authentication identity fails unless the latter may act as the former.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.config import User
from roundtrip.errors import ConfigError
from roundtrip.maildir import MaildirStore
from roundtrip.stack import OUTBOUND_ADDRESS
from roundtrip.store import Store

TIMEOUT = 5.0


@pytest.fixture(scope="module", params=["memory", "maildir"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MailStack]:
    store = MaildirStore(tmp_path_factory.mktemp("mail")) if request.param == "maildir" else Store()
    config = StackConfig(domains=("example.com", "example.org"))
    with MailStack(config, store=store) as running:
        # Put something in the capture, so a login that opened it would have mail to read.
        user = running.user("example.com")
        raw = make_message(sender=user.address, recipient="carol@outside.test", subject="cap")
        host, port = running.endpoints("example.com").address("submissions")
        with smtplib.SMTP_SSL(
            host, port, context=running.client_context(), timeout=TIMEOUT
        ) as smtp:
            smtp.login(user.address, user.password)
            smtp.sendmail(user.address, ["carol@outside.test"], raw)
        yield running


def _imap_login(stack: MailStack, domain: str, address: str, password: str) -> bool:
    host, port = stack.endpoints(domain).address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        client.login(address, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()
    return True


def _imap_authenticate_plain(stack: MailStack, domain: str, payload: bytes) -> bool:
    host, port = stack.endpoints(domain).address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        client.authenticate("PLAIN", lambda _challenge: payload)
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()
    return True


def _pop3_login(stack: MailStack, domain: str, address: str, password: str) -> bool:
    host, port = stack.endpoints(domain).address("pop3s")
    client = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    try:
        client.user(address)
        client.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        client.close()
    return True


def _smtp_auth_plain(stack: MailStack, domain: str, service: str, payload: bytes) -> int:
    host, port = stack.endpoints(domain).address(service)
    smtp: smtplib.SMTP
    if service == "submissions":
        smtp = smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    else:
        smtp = smtplib.SMTP(host, port, timeout=TIMEOUT)
    with smtp:
        smtp.ehlo()
        if service == "submission":
            smtp.starttls(context=stack.client_context())
            smtp.ehlo()
        code, _ = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(payload).decode("ascii"))
        return code


@pytest.mark.parametrize("domain", ["example.com", "example.org"])
def test_accounts_outbound_capture_is_no_imap_login(stack: MailStack, domain: str) -> None:
    assert stack.outbound, "the capture holds a message a wrongful login could read"
    assert not _imap_login(stack, domain, OUTBOUND_ADDRESS, "")
    assert not _imap_authenticate_plain(stack, domain, f"\0{OUTBOUND_ADDRESS}\0".encode())
    user = stack.user(domain)
    assert _imap_login(stack, domain, user.address, user.password)  # twin: a real login works


@pytest.mark.parametrize("domain", ["example.com", "example.org"])
def test_accounts_outbound_capture_is_no_pop3_login(stack: MailStack, domain: str) -> None:
    assert not _pop3_login(stack, domain, OUTBOUND_ADDRESS, "")
    user = stack.user(domain)
    assert _pop3_login(stack, domain, user.address, user.password)


@pytest.mark.parametrize("service", ["submissions", "submission"])
def test_accounts_outbound_capture_is_no_smtp_login(stack: MailStack, service: str) -> None:
    assert _smtp_auth_plain(stack, "example.com", service, f"\0{OUTBOUND_ADDRESS}\0".encode()) == (
        535
    )
    user = stack.user("example.com")
    payload = f"\0{user.address}\0{user.password}".encode()
    assert _smtp_auth_plain(stack, "example.com", service, payload) == 235


def test_accounts_capture_still_readable_through_the_api(stack: MailStack) -> None:
    assert [m.subject for m in stack.outbound] == ["cap"]


def test_accounts_store_refuses_empty_passwords() -> None:
    store = Store()
    store.add_user("a@example.com", "")
    store.add_user("b@example.com", None)
    store.add_user("c@example.com", "secret")
    assert not store.check_password("a@example.com", "")
    assert not store.check_password("b@example.com", "")
    assert not store.check_password("c@example.com", "")
    assert store.check_password("c@example.com", "secret")
    assert store.has_user("b@example.com")  # a mailbox, just not a login


def test_accounts_maildir_store_refuses_empty_passwords(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail")
    store.add_user("b@example.com", None)
    store.add_user("c@example.com", "secret")
    assert not store.check_password("b@example.com", "")
    assert store.check_password("c@example.com", "secret")


def test_accounts_configured_empty_password_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="password is empty"):
        User("dev@example.com", "")
    assert User("dev@example.com", "x").password == "x"


# RFC 4616 section 2: the authorization identity.


def test_accounts_smtp_plain_foreign_authzid_refused(stack: MailStack) -> None:
    user = stack.user("example.com")
    other = stack.user("example.org")
    payload = f"{other.address}\0{user.address}\0{user.password}".encode()
    assert _smtp_auth_plain(stack, "example.com", "submissions", payload) == 535
    assert _imap_authenticate_plain(stack, "example.com", payload) is False


@pytest.mark.parametrize("authzid", ["", "same", "SAME-CASE"])
def test_accounts_smtp_plain_own_authzid_accepted(stack: MailStack, authzid: str) -> None:
    user = stack.user("example.com")
    zid = {"": "", "same": user.address, "SAME-CASE": user.address.upper()}[authzid]
    payload = f"{zid}\0{user.address}\0{user.password}".encode()
    assert _smtp_auth_plain(stack, "example.com", "submissions", payload) == 235
