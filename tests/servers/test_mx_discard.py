"""``_mxcache.discard`` drops a relay connection that aiosmtplib already closed gracefully.

aiosmtplib closes its connection itself after QUIT (and when a command fails) and forgets the
transport; over TLS that close waits for the server's close_notify. A server that never sends
it keeps the TCP connection open until the event loop closes, which then warns about it (or,
on uvloop, cannot close). ``discard`` aborts the TCP transport that ``_MXClient`` kept.

The server here is a blocking socket in a thread that speaks just enough SMTP: a greeting,
EHLO with STARTTLS, the handshake, EHLO again, then ``221`` to QUIT, and silence.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import cast

import pytest
import trustme
from _support import mx_starttls

from roundtrip.servers._mxcache import discard
from roundtrip.servers._mxsession import _MXClient
from roundtrip.servers._runner import new_event_loop

TIMEOUT = 5.0
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


class SilentAfterQuitMX:
    """Answers QUIT with 221, then neither reads nor closes until ``release``."""

    def __init__(self, ca: trustme.CA) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("mx.example.org").configure_cert(self.context)
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="silent-mx", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(TIMEOUT)
            with mx_starttls(conn, "mx.example.org", self.context) as tls, tls.makefile("rb") as f:
                assert f.readline().startswith(b"EHLO")
                tls.sendall(b"250 mx.example.org\r\n")
                assert f.readline() == b"QUIT\r\n"
                tls.sendall(b"221 bye\r\n")
                self.release.wait(TIMEOUT)  # no close_notify in return
        except BaseException as exc:  # reported by close() in the test's thread
            self.error = exc

    def close(self) -> None:
        self.release.set()
        self.thread.join(TIMEOUT)
        self.listener.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def mx() -> Iterator[SilentAfterQuitMX]:
    server = SilentAfterQuitMX(trustme.CA())
    yield server
    server.close()


def _quit_then(mx: SilentAfterQuitMX, loop_name: str, *, drop: bool) -> tuple[bool, bool]:
    """QUIT over STARTTLS; with ``drop``, ``discard`` after. Whether the client still holds
    a transport, and whether the TCP transport under it is closing."""
    loop = new_event_loop(loop_name)
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE

    async def run() -> tuple[bool, bool]:
        client = _MXClient(hostname="127.0.0.1", port=mx.port, start_tls=False, timeout=TIMEOUT)
        await client.connect()
        await client.ehlo()
        await client.starttls(server_hostname="mx.example.org", tls_context=unverified)
        await client.ehlo()
        wire = cast(asyncio.Transport, client.wire)
        assert wire is not None
        await client.quit()  # aiosmtplib closes gracefully and forgets the transport
        if drop:
            discard(client)
        closing = wire.is_closing()
        wire.abort()  # either way, before the loop closes
        return client.transport is not None, closing

    try:
        return loop.run_until_complete(asyncio.wait_for(run(), TIMEOUT))
    finally:
        loop.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_discard_aborts_the_tcp_transport_aiosmtplib_forgot(
    mx: SilentAfterQuitMX, loop: str
) -> None:
    assert _quit_then(mx, loop, drop=True) == (False, True)


@pytest.mark.parametrize("loop", LOOPS)
def test_discard_twin_after_quit_alone_the_tls_close_still_waits(
    mx: SilentAfterQuitMX, loop: str
) -> None:
    assert _quit_then(mx, loop, drop=False) == (False, False)
