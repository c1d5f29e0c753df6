"""The start-up self-check: every listener accepts a connection, every TLS context handshakes.

``MailStack.start()`` returns only after ``Listeners.self_check`` has connected to each
listener and completed one TLS handshake per domain and address (the implicit-TLS listeners of
a domain share one server context, ``stack/_services.py``). The twins show it fails when it
should: a client that does not trust the stack CA fails the handshake, and a listener that is
gone fails the connection, even an implicit-TLS one that gets no handshake.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator

import pytest

from roundtrip import MailStack, StackConfig
from roundtrip.certs import CertificateAuthority

TIMEOUT = 10.0


@pytest.fixture
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig()) as running:
        yield running


def _self_check(stack: MailStack, client: ssl.SSLContext) -> None:
    assert stack._thread is not None and stack._listeners is not None
    listeners, domains = stack._listeners, list(stack.domains.values())
    stack._thread.run(listeners.self_check(domains, client), timeout=TIMEOUT)


def test_self_check_passes_on_a_running_stack(stack: MailStack) -> None:
    _self_check(stack, stack.client_context())


def test_self_check_fails_when_the_handshake_fails(stack: MailStack) -> None:
    stranger = CertificateAuthority().client_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        _self_check(stack, stranger)


@pytest.mark.parametrize("service", ["imaps", "pop3s", "smtp"])
def test_self_check_fails_when_a_listener_is_gone(stack: MailStack, service: str) -> None:
    assert stack._thread is not None and stack._listeners is not None
    port = stack.endpoints("example.org").ports[service]
    [server] = [
        s for s in stack._listeners.servers if s.sockets and s.sockets[0].getsockname()[1] == port
    ]

    async def close() -> None:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)

    stack._thread.run(close(), timeout=TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        _self_check(stack, stack.client_context())
