"""Helpers shared by tests (imported as _support; tests/ is on sys.path via conftest)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from roundtrip.maildir import MaildirStore
from roundtrip.protocols.imap import IMAPConnection
from roundtrip.store import Store

if TYPE_CHECKING:
    import asyncio

    from roundtrip.certs import CertificateAuthority
    from roundtrip.config import SMTPLimits
    from roundtrip.protocols.smtp import Role
    from roundtrip.servers._conn import LineServerProtocol
    from roundtrip.servers._runner import LoopThread
    from roundtrip.servers.smtp import Accepted, Router

#: Where the test listeners bind and clients connect.
LOOPBACK = "127.0.0.1"
#: The name in the SMTP test listeners' certificate, banner and EHLO reply.
SMTP_HOSTNAME = "mail.example.com"
#: The timeout of every blocking call in the SMTP helpers below.
SMTP_TIMEOUT = 5.0


def make_message(
    *, sender: str, recipient: str, subject: str, body: str = "hello\r\n", extra: str = ""
) -> bytes:
    """A small CRLF message, with a dot-led line to exercise dot transparency."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain=sender.rpartition('@')[2])}\r\n"
        f"Date: {email.utils.formatdate()}\r\n{extra}"
    )
    return (head + "\r\n" + body).encode("utf-8")


class AiosmtpdServer:
    """A bare aiosmtpd server on its own loop thread, closed cleanly (connections included).

    Tests use it as a "remote" peer that is not part of the stack (an MX with a foreign
    certificate, a server without STARTTLS).
    """

    def __init__(self, handler: object, **smtp_kwargs: Any) -> None:
        import asyncio

        from aiosmtpd.smtp import SMTP

        from roundtrip.servers._runner import LoopThread

        self.thread = LoopThread()
        self._sessions: list[SMTP] = []

        async def start() -> asyncio.Server:
            loop = asyncio.get_running_loop()

            def factory() -> SMTP:
                session = SMTP(handler, loop=loop, **smtp_kwargs)
                self._sessions.append(session)
                return session

            return await loop.create_server(factory, host="127.0.0.1", port=0)

        self.server = self.thread.run(start(), timeout=5)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        import asyncio

        async def close() -> None:
            self.server.close()
            # Let accepts already under way finish creating their sessions, so that the
            # loop below closes them too.
            for _ in range(3):
                await asyncio.sleep(0)  # sleep-ok: yields to the loop, waits for nothing
            for session in self._sessions:
                # After STARTTLS the session's transport is the TLS layer, whose close()
                # finishes later; abort the socket transport underneath as well.
                for transport in (session.transport, session._original_transport):
                    if transport is not None:
                        cast("asyncio.Transport", transport).abort()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.wait_closed()
            # Transports closed above (or by cancelled accepts) release their sockets in
            # callbacks scheduled with call_soon: let those run before the loop stops.
            for _ in range(3):
                await asyncio.sleep(0)  # sleep-ok: yields to the loop, waits for nothing

        self.thread.run(close(), timeout=5)
        self.thread.stop()


class ServerProcess:
    """A mail server in a subprocess (``python -c script *args``) for crash tests.

    The script prints one JSON line first: ``host``, ``submissions`` and ``imaps`` ports and
    ``ca`` (PEM); later lines answer whatever the test writes to its stdin. ``kill()`` is
    SIGKILL, never a clean stop; stderr goes to ``log``.
    """

    def __init__(self, script: str, args: list[str], log: Path, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        try:
            info = json.loads(self.read_line())
        except BaseException:
            self.kill()
            raise
        self.host: str = info["host"]
        self.ports: dict[str, int] = {k: info[k] for k in ("submissions", "imaps")}
        self.context = ssl.create_default_context(cadata=info["ca"])

    def read_line(self, timeout: float | None = None) -> bytes:
        """The next line the server prints, within ``timeout`` (default: the start timeout)."""
        assert self.proc.stdout is not None
        wait = self.timeout if timeout is None else timeout
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"the server did not answer; see {self._log.name}")
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(self.timeout)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


def listener_port(server: asyncio.Server) -> int:
    """The port a listener bound (they all bind port 0)."""
    return int(server.sockets[0].getsockname()[1])


async def shutdown_line_listeners(
    listeners: list[tuple[asyncio.Server, set[LineServerProtocol]]],
) -> None:
    """Close ``start_imap``/``start_pop3`` listeners and abort their sessions."""
    for server, connections in listeners:
        server.close()
        for conn in list(connections):
            conn.abort()
    for server, _ in listeners:
        await server.wait_closed()


async def close_smtp_servers(servers: list[asyncio.Server]) -> None:
    """Close ``start_smtp`` listeners, waiting at most a second for each."""
    import asyncio
    import contextlib

    for server in servers:
        server.close()
    for server in servers:
        with contextlib.suppress(TimeoutError):
            # From 3.12 wait_closed() also waits for open connections.
            await asyncio.wait_for(server.wait_closed(), 1.0)


class SMTPListeners:
    """SMTP listeners (``start_smtp``), one per role, on their own loop thread.

    ``start`` may be called once or more; ``close`` closes every listener, stops the thread and
    returns the errors the thread captured.
    """

    def __init__(self, ca: CertificateAuthority, *, thread_name: str) -> None:
        from roundtrip.servers._runner import LoopThread

        self.ca = ca
        self.thread = LoopThread(name=thread_name)
        self.servers: list[asyncio.Server] = []

    def start(
        self,
        roles: Iterable[Role],
        *,
        store: Store,
        router: Router,
        local_domains: tuple[str, ...],
        max_recipients: int,
        max_message_size: int,
        idle_timeout: float,
        tls_handshake_timeout: float,
        limits: SMTPLimits | None = None,
        domain: str = "example.com",
        hostname: str = SMTP_HOSTNAME,
        host: str = LOOPBACK,
        timeout: float = SMTP_TIMEOUT,
    ) -> dict[Role, int]:
        """Start one listener per role on port 0; returns each role's bound port."""
        from roundtrip.servers.smtp import SMTPHandler, start_smtp

        ports: dict[Role, int] = {}
        tls_context = self.ca.server_context([hostname])
        for role in roles:
            handler = SMTPHandler(
                role=role,
                domain=domain,
                hostname=hostname,
                local_domains=lambda: local_domains,
                has_user=store.has_user,
                check_password=store.check_password,
                router=router,
                max_recipients=max_recipients,
                enforce_sender=True,
                limits=limits,
            )
            server = self.thread.run(
                start_smtp(
                    handler,
                    host=host,
                    port=0,
                    tls_context=tls_context,
                    max_message_size=max_message_size,
                    idle_timeout=idle_timeout,
                    tls_handshake_timeout=tls_handshake_timeout,
                ),
                timeout=timeout,
            )
            self.servers.append(server)
            ports[role] = listener_port(server)
        return ports

    def close(self, timeout: float = SMTP_TIMEOUT) -> list[BaseException]:
        self.thread.run(close_smtp_servers(self.servers), timeout=timeout)
        self.thread.stop()
        return self.thread.errors()


@dataclass
class SMTPWorld:
    """A store and the ports of SMTP listeners on one loop thread; test files subclass it."""

    ca: CertificateAuthority
    store: Store
    thread: LoopThread
    ports: dict[Role, int] = field(default_factory=dict)
    #: Every message the router was handed.
    routed: list[Accepted] = field(default_factory=list)


def mx_starttls(conn: socket.socket, name: str, context: ssl.SSLContext) -> ssl.SSLSocket:
    """The server's side of an SMTP session up to TLS, on a blocking socket: the greeting,
    EHLO answered with STARTTLS (and nothing else), ``220``, and the handshake."""
    with conn.makefile("rb") as plain:
        conn.sendall(f"220 {name} ESMTP\r\n".encode())
        assert plain.readline().startswith(b"EHLO")
        conn.sendall(f"250-{name}\r\n250 STARTTLS\r\n".encode())
        assert plain.readline() == b"STARTTLS\r\n"
        conn.sendall(b"220 go ahead\r\n")
    return context.wrap_socket(conn, server_side=True)


class RawSMTPClient:
    """A blocking SMTP client on a plain (or implicitly TLS) socket: bytes go out as given.

    ``decode_errors`` is how reply lines are decoded (``"strict"`` raises on bytes that are
    not UTF-8); with ``reset_is_eof`` a connection reset ends ``read_to_eof`` like an EOF.
    ``source`` binds the client to another local address (``127.0.0.2``: another client IP).
    """

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext | None = None,
        *,
        source: str | None = None,
        decode_errors: str = "strict",
        reset_is_eof: bool = False,
        host: str = LOOPBACK,
        server_name: str = SMTP_HOSTNAME,
        timeout: float = SMTP_TIMEOUT,
    ) -> None:
        address = (source, 0) if source else None
        sock = socket.create_connection((host, port), timeout=timeout, source_address=address)
        self.server_name = server_name
        self.timeout = timeout
        self.decode_errors = decode_errors
        self.reset_is_eof = reset_is_eof
        self.sock: socket.socket = (
            ctx.wrap_socket(sock, server_hostname=server_name) if ctx is not None else sock
        )
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection; unread {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8", self.decode_errors)

    def reply(self) -> list[str]:
        """One (possibly multi-line) reply."""
        lines = [self.line()]
        while lines[-1][3:4] == "-":
            lines.append(self.line())
        return lines

    def cmd(self, command: str | bytes) -> list[str]:
        data = command if isinstance(command, bytes) else command.encode("utf-8")
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b"", f"unread plaintext before TLS: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.server_name)

    def silent_for(self, seconds: float) -> bytes:
        """What arrives within ``seconds`` (b"" when nothing did)."""
        if self.buf:
            return self.buf
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return b""
        finally:
            self.sock.settimeout(self.timeout)

    def read_to_eof(self) -> bytes:
        data, self.buf = self.buf, b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            if not self.reset_is_eof:
                raise
        return data

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): an abrupt disconnect."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@contextlib.contextmanager
def backend_store(kind: str, path: Path, users: dict[str, str]) -> Iterator[Store]:
    """A store of either backend (``"memory"`` or ``"maildir"`` under ``path``) with
    ``users``; a Maildir store is closed afterwards. For tests that hold both to one rule."""
    store: Store = Store() if kind == "memory" else MaildirStore(path)
    for address, password in users.items():
        store.add_user(address, password)
    try:
        yield store
    finally:
        if isinstance(store, MaildirStore):
            store.close()


def imap_session(
    store: Store, address: str, password: str, *, login: bool = True
) -> IMAPConnection:
    """An ``IMAPConnection`` over ``store`` (sans-IO), greeted and logged in as ``address``
    (``login=False``: greeted only), hearing the store's changes as a served session does."""
    conn = IMAPConnection(
        store,
        hostname="imap.example.test",
        secure=True,
        starttls_available=False,
        clock=lambda: 1_700_000_000.0,
    )
    store.add_listener(conn.on_store_change)
    conn.data_to_send()
    if not login:
        return conn
    list(conn.receive_data(f'a LOGIN {address} "{password}"\r\n'.encode()))
    reply = conn.data_to_send()
    assert b"a OK" in reply, reply
    return conn


def peak_growth(action: Callable[[], object]) -> int:
    """Peak bytes allocated (``tracemalloc``) while ``action`` runs, above what was traced
    before."""
    owner = not tracemalloc.is_tracing()
    if owner:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if owner:
            tracemalloc.stop()


_T = TypeVar("_T")


def run_together(action: Callable[[], _T], count: int = 4, timeout: float = 10) -> list[_T]:
    """``action``'s results from ``count`` threads released at once (a barrier), so that
    first uses race."""
    start = threading.Barrier(count)
    results: list[_T] = []
    lock = threading.Lock()

    def run() -> None:
        start.wait(timeout=timeout)
        got = action()
        with lock:
            results.append(got)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return results
