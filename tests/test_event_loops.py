"""``ROUNDTRIP_LOOP``: the stack on asyncio's own loop or on uvloop, with the same behaviour.

The end-to-end tests run a whole stack on each loop explicitly (whatever ``ROUNDTRIP_LOOP``
says for the rest of the suite) and talk to it with stdlib clients: AUTH on implicit TLS (465)
and an IMAP session (993) are the two that broke on uvloop when the servers read asyncio's
private transport attributes.
"""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import sys
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack
from roundtrip.errors import ConfigError, ServerStartError
from roundtrip.servers._runner import LOOP_CHOICES, LoopThread, loop_choice

TIMEOUT = 5.0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(not _has_uvloop(), reason="uvloop not installed (tox -e uvloop)"),
    ),
]


def test_loop_choice_defaults_to_auto() -> None:
    assert loop_choice({}) == "auto"
    assert loop_choice({"ROUNDTRIP_LOOP": ""}) == "auto"
    assert loop_choice({"ROUNDTRIP_LOOP": "asyncio"}) == "asyncio"
    assert loop_choice({"ROUNDTRIP_LOOP": " UVLoop "}) == "uvloop"


def test_loop_choice_refuses_an_unknown_loop_listing_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        loop_choice({"ROUNDTRIP_LOOP": "trio"})
    message = str(info.value)
    assert "ROUNDTRIP_LOOP='trio'" in message
    assert all(choice in message for choice in LOOP_CHOICES)


def test_loop_thread_unknown_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        LoopThread(loop="trio")


@pytest.mark.parametrize("loop", LOOPS)
def test_loop_thread_runs_the_loop_asked_for(loop: str) -> None:
    thread = LoopThread(loop=loop)
    try:

        async def module_of_running_loop() -> str:
            return type(asyncio.get_running_loop()).__module__

        module = thread.run(module_of_running_loop(), timeout=TIMEOUT)
    finally:
        thread.stop()
    assert module.split(".")[0] == loop


def test_loop_thread_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTRIP_LOOP", "asyncio")
    thread = LoopThread()
    try:
        assert isinstance(thread.loop, asyncio.BaseEventLoop)
    finally:
        thread.stop()


def test_loop_thread_without_uvloop_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes "import uvloop" raise ImportError, as when it is absent.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ServerStartError, match="pip install uvloop"):
        LoopThread(loop="uvloop")


@pytest.fixture(params=LOOPS)
def stack_on(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MailStack]:
    """A stack whose loop thread runs the loop named by the parameter."""
    monkeypatch.setenv("ROUNDTRIP_LOOP", request.param)
    with MailStack() as stack:
        yield stack
        stack.check()


def test_stack_465_offers_auth_and_takes_mail_on_every_loop(stack_on: MailStack) -> None:
    sender, rcpt = stack_on.user("example.com"), stack_on.user("example.org")
    host, port = stack_on.endpoints("example.com").address("submissions")
    raw = make_message(sender=sender.address, recipient=rcpt.address, subject="loop 465")
    with smtplib.SMTP_SSL(host, port, context=stack_on.client_context(), timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("auth")
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [rcpt.address], raw)
    stack_on.wait_for(rcpt.address, subject="loop 465", timeout=TIMEOUT)


def test_stack_465_refuses_a_wrong_password_on_every_loop(stack_on: MailStack) -> None:
    sender = stack_on.user("example.com")
    host, port = stack_on.endpoints("example.com").address("submissions")
    context = stack_on.client_context()
    with (
        smtplib.SMTP_SSL(host, port, context=context, timeout=TIMEOUT) as smtp,
        pytest.raises(smtplib.SMTPAuthenticationError) as info,
    ):
        smtp.login(sender.address, "not the password")
    assert info.value.smtp_code == 535


def test_stack_imaps_session_on_every_loop(stack_on: MailStack) -> None:
    user = stack_on.user("example.org")
    raw = make_message(sender="a@example.com", recipient=user.address, subject="loop imap")
    stack_on.store.deliver(user.address, raw, envelope_from="a@example.com")
    host, port = stack_on.endpoints("example.org").address("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=stack_on.client_context(), timeout=TIMEOUT)
    try:
        imap.login(user.address, user.password)
        status, data = imap.select("INBOX")
        assert status == "OK" and data == [b"1"]
        with pytest.raises(imaplib.IMAP4.error):  # the twin: a bad command is refused
            imap.uid("FETCH", "1:*", "(NOSUCHITEM)")
    finally:
        imap.logout()
