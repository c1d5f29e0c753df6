"""STARTTLS on our SMTP listeners runs through ``loop.start_tls`` (``SMTPSession.smtp_STARTTLS``).

aiosmtpd's own STARTTLS builds asyncio's pure-Python ``SSLProtocol``, so on uvloop every MX
and 587 session ran its TLS records through Python. Ours asks the loop: on uvloop the
session's transport is uvloop's own, on asyncio's loop asyncio's. Either way the session after
the handshake is what aiosmtpd's STARTTLS gives: AUTH offered and accepted, the TLS facts in
the session, ``ESMTPSA`` in the trace. The twin: a client that breaks the handshake loses its
connection, and the listener goes on serving.
"""

from __future__ import annotations

import importlib.util
import smtplib
import socket
from collections.abc import Iterator

import pytest
from _support import RawSMTPClient

from roundtrip import MailStack, StackConfig
from roundtrip.servers._smtpsession import _LIVE, SMTPSession

TIMEOUT = 5.0
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


@pytest.fixture(params=LOOPS)
def stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[MailStack]:
    monkeypatch.setenv("ROUNDTRIP_LOOP", request.param)
    with MailStack(StackConfig(domains=("example.com",))) as running:
        yield running


def _session_of(stack: MailStack, client: socket.socket) -> SMTPSession:
    """The server's session for ``client``, read on the stack's loop thread."""
    local = client.getsockname()[:2]

    def find() -> list[SMTPSession]:
        return [
            s for s in _LIVE if s.session is not None and tuple(s.session.peer or ())[:2] == local
        ]

    thread = stack.loop_thread
    assert thread is not None
    (session,) = thread.call_wait(find, timeout=TIMEOUT)
    return session


def test_starttls_runs_on_the_loops_own_tls(stack: MailStack) -> None:
    user = stack.user()
    host, port = stack.endpoints().address("submission")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.example")
        assert not smtp.has_extn("auth")  # not before TLS
        smtp.starttls(context=stack.client_context())
        smtp.ehlo("client.example")
        assert smtp.has_extn("auth")
        smtp.login(user.address, user.password)
        session = _session_of(stack, smtp.sock)
        kind = type(session.transport).__module__
        loop = type(stack.loop_thread.loop).__module__ if stack.loop_thread else ""
        if loop.startswith("uvloop"):
            assert kind.startswith("uvloop"), kind
        else:
            assert kind == "asyncio.sslproto", kind
        assert session.session is not None and session.session.ssl is not None
        assert session.session.ssl["cipher"][0] == smtp.sock.cipher()[0]  # type: ignore[union-attr]
        smtp.sendmail(user.address, [user.address], b"Subject: over starttls\r\n\r\nhi\r\n")
    got = stack.wait_for(user.address, subject="over starttls", timeout=TIMEOUT)
    assert b"with ESMTPSA" in got.raw


def test_starttls_twin_a_broken_handshake_ends_only_that_connection(stack: MailStack) -> None:
    host, port = stack.endpoints().address("submission")
    with RawSMTPClient(port, host=host, reset_is_eof=True, timeout=TIMEOUT) as client:
        assert client.reply()[0].startswith("220")
        assert client.cmd("EHLO client.example")[-1].startswith("250 ")
        assert client.cmd("STARTTLS")[0].startswith("220")
        client.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert client.read_to_eof() == b""  # the server closed the connection
    user = stack.user()
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:  # and still serves
        smtp.starttls(context=stack.client_context())
        smtp.login(user.address, user.password)
        assert smtp.noop()[0] == 250
