"""Helpers shared by tests (imported as _support; tests/ is on sys.path via conftest)."""

from __future__ import annotations

import email.utils
import json
import select
import signal
import ssl
import subprocess
import sys
from pathlib import Path


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

    def __init__(self, handler: object, **smtp_kwargs: object) -> None:
        import asyncio

        from aiosmtpd.smtp import SMTP

        from roundtrip.servers._runner import LoopThread

        self.thread = LoopThread()
        self._sessions: list[SMTP] = []

        async def start() -> asyncio.AbstractServer:
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
                        transport.abort()
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
