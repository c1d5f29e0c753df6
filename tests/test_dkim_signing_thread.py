"""Submission signs on the signing thread when other sessions share the loop (``Router.prepare``).

An RSA-2048 DKIM signature costs about 0.8 ms of OpenSSL per message. Made on the loop
thread, it stalls every session of the stack for that long; made on the signing thread, the
loop answers other clients meanwhile, and the submitting client still gets its 250 only once
the message is signed and routed. A session alone on the loop stalls nobody: its message is
signed in place, without the thread hops. The twins: a signer that fails leaves the message
unsigned and delivered (as before), and mail from outside (port 25) is not signed at all.
"""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from roundtrip import MailStack
from roundtrip.message import ReceivedMessage
from roundtrip.protocols import dkim

TIMEOUT = 5.0


@pytest.fixture
def stack(two_domains: MailStack) -> MailStack:
    return two_domains


def _spy(monkeypatch: pytest.MonkeyPatch, before: Callable[[], None] | None = None) -> list[str]:
    """Record the thread every DKIM signature is made on; ``before`` runs first."""
    threads: list[str] = []
    real = dkim.sign

    def sign(*args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.current_thread().name)
        if before is not None:
            before()
        return real(*args, **kwargs)

    monkeypatch.setattr(dkim, "sign", sign)
    return threads


def _submit(stack: MailStack, subject: str) -> None:
    sender = stack.user("example.com")
    rcpt = stack.user("example.org")
    raw = f"From: <{sender.address}>\r\nTo: <{rcpt.address}>\r\nSubject: {subject}\r\n\r\nhi\r\n"
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [rcpt.address], raw.encode())


def _other_client(stack: MailStack) -> smtplib.SMTP:
    """Another SMTP session on the stack's loop, greeted and idle."""
    host, port = stack.endpoints("example.org").address("smtp")
    other = smtplib.SMTP(host, port, timeout=TIMEOUT)
    assert other.ehlo("other.example")[0] == 250
    return other


def _signed_twice(got: ReceivedMessage) -> None:
    assert got.raw.count(b"DKIM-Signature:") == 2  # Ed25519 and RSA
    assert got.auth is not None
    assert [r.result for r in got.auth.dkim] == ["pass", "pass"], got.auth


def test_submission_beside_other_sessions_is_signed_on_the_signing_thread(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = _spy(monkeypatch)
    with _other_client(stack):
        _submit(stack, "signed off the loop")
    got = stack.wait_for(stack.user("example.org").address, subject="signed off the loop")
    assert len(threads) == 1 and threads[0].startswith("roundtrip-sign"), threads
    _signed_twice(got)


def test_twin_a_lone_submission_is_signed_in_place(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = stack.loop_thread
    assert loop_thread is not None
    on_loop: list[bool] = []
    threads = _spy(monkeypatch, lambda: on_loop.append(loop_thread.in_loop_thread))
    _submit(stack, "signed in place")
    got = stack.wait_for(stack.user("example.org").address, subject="signed in place")
    assert on_loop == [True], threads
    _signed_twice(got)


def test_the_loop_serves_others_while_a_message_is_signed(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    signing, release = threading.Event(), threading.Event()

    def hold() -> None:
        signing.set()
        release.wait(TIMEOUT)

    _spy(monkeypatch, hold)
    done = threading.Event()
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            _submit(stack, "held signature")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            done.set()

    sender = threading.Thread(target=submit)
    with _other_client(stack) as other:
        sender.start()
        try:
            assert signing.wait(TIMEOUT), "the message never reached the signer"
            # The signer is busy: the other client is still answered...
            assert other.noop()[0] == 250
            assert other.ehlo("other.example")[0] == 250
            # ...and the submitter has not had its 250: it waits for the signature.
            assert not done.is_set()
        finally:
            release.set()
            sender.join(TIMEOUT)
    assert done.is_set() and not errors, errors
    _signed_twice(stack.wait_for(stack.user("example.org").address, subject="held signature"))


def test_twin_a_failing_signer_leaves_the_message_unsigned_and_delivered(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise ValueError("unreadable header block")

    threads = _spy(monkeypatch, broken)
    with _other_client(stack):
        _submit(stack, "unsigned after all")
    got = stack.wait_for(stack.user("example.org").address, subject="unsigned after all")
    assert len(threads) == 1
    assert b"DKIM-Signature:" not in got.raw
    assert got.auth is not None and [r.result for r in got.auth.dkim] == ["none"], got.auth


def test_twin_mail_from_outside_is_not_signed(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = _spy(monkeypatch)
    rcpt = stack.user("example.org")
    host, port = stack.endpoints("example.org").address("smtp")
    raw = f"From: <x@outside.test>\r\nTo: <{rcpt.address}>\r\nSubject: from outside\r\n\r\nhi\r\n"
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=stack.client_context())
        smtp.sendmail("x@outside.test", [rcpt.address], raw.encode())
    got = stack.wait_for(rcpt.address, subject="from outside")
    assert threads == []
    assert b"DKIM-Signature:" not in got.raw
