"""XOAUTH2 and OAUTHBEARER (RFC 7628) on submission, IMAP and POP3, with real clients.

Every accepted token has refused twins: an expired token, another user's token, a random
token, and the right token sent with another ``user=``. Each refusal goes through RFC 7628
section 3.2.2's error flow (the JSON status in a continuation, then the failure reply), and the
session keeps working: a PLAIN login on the same connection still succeeds.
"""

from __future__ import annotations

import base64
import imaplib
import json
import logging
import poplib
import secrets
import smtplib
from collections.abc import Callable, Iterator

import imapclient
import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.config import SMTPLimits

TIMEOUT = 5.0
STATUS = {"status": "invalid_token", "schemes": "bearer", "scope": "mail"}


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    # No penalty delays: each test makes several failed logins from 127.0.0.1 on purpose.
    limits = SMTPLimits(auth_penalty_initial=0, auth_penalty_max=0)
    config = StackConfig(domains=("example.com", "example.org"), smtp_limits=limits)
    with MailStack(config) as running:
        yield running


def xoauth2(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def oauthbearer(user: str, token: str) -> str:
    name = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={name},\x01host=mail.example.com\x01port=465\x01auth=Bearer {token}\x01\x01"


Bad = Callable[[MailStack], tuple[str, str]]


def _expired(s: MailStack) -> tuple[str, str]:
    user = s.user("example.com").address
    return user, s.oauth_token(user, lifetime=0)


def _foreign(s: MailStack) -> tuple[str, str]:
    return s.user("example.com").address, s.oauth_token(s.user("example.org"))


def _random(s: MailStack) -> tuple[str, str]:
    return s.user("example.com").address, secrets.token_urlsafe(32)


def _wrong_user(s: MailStack) -> tuple[str, str]:
    return s.user("example.org").address, s.oauth_token(s.user("example.com"))


BAD: dict[str, Bad] = {
    "expired": _expired,
    "foreign": _foreign,
    "random": _random,
    "wrong-user": _wrong_user,
}
MECHS = {"XOAUTH2": xoauth2, "OAUTHBEARER": oauthbearer}


# SMTP submission (465, and 587 after STARTTLS)


def _smtps(stack: MailStack) -> smtplib.SMTP_SSL:
    host, port = stack.endpoints("example.com").address("submissions")
    smtp = smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    smtp.ehlo()
    return smtp


@pytest.mark.parametrize("mech", MECHS)
def test_smtp_oauth_token_logs_in_and_sends(stack: MailStack, mech: str) -> None:
    user = stack.user("example.com")
    token = stack.oauth_token(user)
    with _smtps(stack) as smtp:
        assert mech in smtp.esmtp_features["auth"].split()
        code, _ = smtp.auth(mech, lambda challenge=None: MECHS[mech](user.address, token))
        assert code == 235
        raw = make_message(sender=user.address, recipient=user.address, subject="oauth " + mech)
        smtp.sendmail(user.address, [user.address], raw)
    got = stack.wait_for(to=user.address, subject="oauth " + mech, timeout=TIMEOUT)
    assert token.encode() not in got.raw


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("mech", MECHS)
def test_smtp_oauth_bad_token_gets_the_error_status(stack: MailStack, mech: str, bad: str) -> None:
    user, token = BAD[bad](stack)
    seen: list[bytes | None] = []

    def answer(challenge: bytes | None = None) -> str:
        seen.append(challenge)
        return MECHS[mech](user, token) if challenge is None else "\x01"

    with _smtps(stack) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            smtp.auth(mech, answer)
        assert info.value.smtp_code == 535
        assert json.loads(seen[-1] or b"") == STATUS
        # The session goes on: a password login still works on this connection.
        me = stack.user("example.com")
        assert smtp.login(me.address, me.password)[0] == 235


def test_smtp_oauth_after_starttls_only(stack: MailStack) -> None:
    host, port = stack.endpoints("example.com").address("submission")
    user = stack.user("example.com")
    token = stack.oauth_token(user)
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        blob = base64.b64encode(xoauth2(user.address, token).encode()).decode()
        assert smtp.docmd("AUTH", "XOAUTH2 " + blob)[0] == 538
        smtp.starttls(context=stack.client_context())
        smtp.ehlo()
        assert "XOAUTH2" in smtp.esmtp_features["auth"].split()
        assert smtp.docmd("AUTH", "XOAUTH2 " + blob)[0] == 235


def test_smtp_mx_offers_no_oauth(stack: MailStack) -> None:
    host, port = stack.endpoints("example.com").address("smtp")
    user = stack.user("example.com")
    blob = base64.b64encode(xoauth2(user.address, stack.oauth_token(user)).encode()).decode()
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=stack.client_context())
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "XOAUTH2 " + blob)[0] == 502


# IMAP


def _imapclient(stack: MailStack) -> imapclient.IMAPClient:
    host, port = stack.endpoints("example.com").address("imaps")
    return imapclient.IMAPClient(
        host, port, ssl=True, ssl_context=stack.client_context(), timeout=TIMEOUT
    )


def test_imap_oauth2_login_with_imapclient(stack: MailStack) -> None:
    user = stack.user("example.com")
    with _imapclient(stack) as client:
        assert b"AUTH=XOAUTH2" in client.capabilities()
        assert b"AUTH=OAUTHBEARER" in client.capabilities()
        client.oauth2_login(user.address, stack.oauth_token(user))
        assert client.select_folder("INBOX")[b"EXISTS"] >= 0
    with _imapclient(stack) as client:
        client.oauthbearer_login(user.address, stack.oauth_token(user))
        client.select_folder("INBOX")


@pytest.mark.parametrize("bad", BAD)
def test_imap_oauth2_login_refuses_bad_tokens(stack: MailStack, bad: str) -> None:
    user, token = BAD[bad](stack)
    with _imapclient(stack) as client:
        with pytest.raises(imapclient.exceptions.LoginError, match="AUTHENTICATIONFAILED"):
            client.oauth2_login(user, token)
        with pytest.raises(imapclient.exceptions.LoginError, match="AUTHENTICATIONFAILED"):
            client.oauthbearer_login(user, token)
        me = stack.user("example.com")
        client.login(me.address, me.password)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("mech", MECHS)
def test_imap_authenticate_bad_token_error_flow(stack: MailStack, mech: str, bad: str) -> None:
    user, token = BAD[bad](stack)
    host, port = stack.endpoints("example.com").address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        seen: list[bytes] = []

        def answer(challenge: bytes) -> bytes | None:
            seen.append(challenge)
            return MECHS[mech](user, token).encode() if len(seen) == 1 else None  # None: "*"

        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.authenticate(mech, answer)
        assert json.loads(seen[-1]) == STATUS
        me = stack.user("example.com")
        assert client.login(me.address, me.password)[0] == "OK"
    finally:
        client.shutdown()


def test_imap_authenticate_good_token_with_imaplib(stack: MailStack) -> None:
    user = stack.user("example.com")
    token = stack.oauth_token(user)
    host, port = stack.endpoints("example.com").address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        typ, _ = client.authenticate("XOAUTH2", lambda _: xoauth2(user.address, token).encode())
        assert typ == "OK"
    finally:
        client.shutdown()


# POP3 (RFC 5034 AUTH, raw commands through poplib)


def _pop3(stack: MailStack) -> poplib.POP3_SSL:
    host, port = stack.endpoints("example.com").address("pop3s")
    return poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)


@pytest.mark.parametrize("mech", MECHS)
def test_pop3_auth_oauth_token(stack: MailStack, mech: str) -> None:
    user = stack.user("example.com")
    token = stack.oauth_token(user)
    pop = _pop3(stack)
    try:
        assert mech in pop.capa()["SASL"]
        blob = base64.b64encode(MECHS[mech](user.address, token).encode()).decode()
        assert pop._shortcmd(f"AUTH {mech} {blob}").startswith(b"+OK")
        pop.stat()
    finally:
        pop.close()


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("mech", MECHS)
def test_pop3_auth_bad_token_error_flow(stack: MailStack, mech: str, bad: str) -> None:
    user, token = BAD[bad](stack)
    pop = _pop3(stack)
    try:
        blob = base64.b64encode(MECHS[mech](user, token).encode()).decode()
        pop._putcmd(f"AUTH {mech} {blob}")
        line = pop._getline()[0]
        assert line.startswith(b"+ ")
        assert json.loads(base64.b64decode(line[2:])) == STATUS
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop._shortcmd("AQ==")
        me = stack.user("example.com")
        pop.user(me.address)
        assert pop.pass_(me.password).startswith(b"+OK")
    finally:
        pop.close()


# Tokens stay secret


def test_oauth_tokens_not_logged(stack: MailStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    user = stack.user("example.com")
    good, bad = stack.oauth_token(user), stack.oauth_token(user, lifetime=0)
    with _smtps(stack) as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
        smtp.auth("XOAUTH2", lambda c=None: xoauth2(user.address, bad) if c is None else "")
    with _smtps(stack) as smtp:
        smtp.auth("XOAUTH2", lambda c=None: xoauth2(user.address, good))
    with _imapclient(stack) as client:
        client.oauth2_login(user.address, good)
    text = caplog.text
    for token in (good, bad):
        assert token not in text
        assert base64.b64encode(xoauth2(user.address, token).encode()).decode() not in text


def test_oauth_token_unknown_user_refused(stack: MailStack) -> None:
    from roundtrip.errors import ConfigError

    with pytest.raises(ConfigError):
        stack.oauth_token("nobody@example.com")
