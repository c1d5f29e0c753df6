"""DATA is gathered without a second copy of the message (``SMTPSession._read_data``).

A big message reaches the handler as one ``bytes`` whose buffer is the one the lines were
gathered in: ``BytesIO.getvalue()`` hands its buffer over, where ``bytes(bytearray)`` copied
it, so the session's peak while a message arrives is about the message once, not twice
(cross-domain, the MX holds it while the relay holds the sender's copy: tests/test_memory.py).

The peak is tracemalloc's, in this process, while a client in a child process sends; only the
server side runs here. The twin: a handler that copies what it gets reads as two copies.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from roundtrip.config import SMTPLimits
from roundtrip.protocols._limits import AuthPenalties, ConnectionCounts
from roundtrip.servers._runner import LoopThread
from roundtrip.servers._smtpsession import SMTPSession

TIMEOUT = 30.0
SIZE = 8_000_000

_CLIENT = r"""
import json, smtplib, sys
job = json.loads(sys.argv[1])
line = b"y" * 76 + b"\r\n"
msg = b"Subject: big\r\n\r\n.dot-led\r\n" + line * (job["size"] // len(line))
with smtplib.SMTP("127.0.0.1", job["port"], timeout=30) as smtp:
    smtp.sendmail("a@example.com", ["b@example.com"], msg)
print(json.dumps({"sent": len(msg)}))
"""


class _Keep:
    """An aiosmtpd handler that keeps what DATA gave it (and, for the twin, a copy)."""

    def __init__(self, *, copy: bool) -> None:
        self.copy = copy
        self.kept: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.content
        envelope.content = envelope.original_content = None
        self.kept.append(content)
        if self.copy:
            self.kept.append(bytes(bytearray(content)))
        return "250 OK"


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread("data-copies")
    yield thread
    thread.stop()


def _peak_ratio(loop_thread: LoopThread, handler: _Keep) -> tuple[float, int]:
    limits = SMTPLimits()

    async def listen() -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> SMTPSession:
            return SMTPSession(
                handler,  # type: ignore[arg-type]
                limits=limits,
                connections=ConnectionCounts(max_total=10, max_per_ip=10),
                auth_penalties=AuthPenalties(initial=0.0, maximum=0.0, timeout=1.0),
                idle_timeout=TIMEOUT,
                hostname="mx.example.test",
                data_size_limit=4 * SIZE,
                auth_required=False,
                auth_require_tls=True,
                loop=loop,
            )

        return await loop.create_server(factory, host="127.0.0.1", port=0)

    server = loop_thread.run(listen(), timeout=TIMEOUT)
    port = server.sockets[0].getsockname()[1]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        proc = subprocess.run(
            [sys.executable, "-c", _CLIENT, json.dumps({"port": port, "size": SIZE})],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
            check=False,
        )
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()

        async def close() -> None:
            server.close()
            await server.wait_closed()

        loop_thread.run(close(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sent = json.loads(proc.stdout.strip().splitlines()[-1])["sent"]
    return peak / sent, sent


def test_data_arrives_as_one_copy(loop_thread: LoopThread) -> None:
    handler = _Keep(copy=False)
    ratio, sent = _peak_ratio(loop_thread, handler)
    (content,) = handler.kept
    # smtplib doubles the leading dot on the wire; the session takes it off again.
    assert len(content) == sent and content.startswith(b"Subject: big\r\n\r\n.dot-led\r\n")
    assert ratio < 1.5, f"DATA peaked at {ratio:.2f}x the message"


def test_data_copies_twin_a_copy_shows(loop_thread: LoopThread) -> None:
    handler = _Keep(copy=True)
    ratio, _ = _peak_ratio(loop_thread, handler)
    assert len(handler.kept) == 2 and handler.kept[0] == handler.kept[1]
    assert ratio >= 2.0, f"a handler's copy should read as two copies, got {ratio:.2f}x"
