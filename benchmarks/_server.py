"""Benchmark server child: a MailStack (or the TLS/TCP echo floor) in its own process.

The parent drives it with one JSON object per line on stdin and reads one JSON reply per
line on stdout, so client and server never share a GIL and the RSS figures are the
server's alone (``/proc/self/status``). Commands:

    {"op": "start", "domains": [...], "users": [...]}   start a MailStack -> describe()
        (optional "relay_connection_cache": seconds; 0 = a fresh relay connection each time)
    {"op": "echo"}                                       start TCP + TLS echo servers
    {"op": "rss"}                                        VmRSS / VmHWM in bytes
    {"op": "reset_peak"}                                 reset VmHWM (clear_refs 5)
    {"op": "fill", "user": U, "count": N, "size": S}     store N messages of S bytes directly
    {"op": "clear"}                                      empty every mailbox
    {"op": "quit"}

Run as ``python -m benchmarks._server`` (from the repository root).
"""

from __future__ import annotations

import os


def _status() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


# Before any import of ours: what the interpreter alone costs.
_BARE = _status()

import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402


def make_message(index: int, size: int, tag: str = "bench") -> bytes:
    """A text message of about ``size`` bytes with a unique Message-ID."""
    head = (
        f"From: <sender@example.com>\r\nTo: <user@example.com>\r\n"
        f"Subject: benchmark message {index}\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{tag}-{index}@roundtrip.bench>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode("ascii")
    line = (f"line of message {index} " + "x" * 76)[:76].encode("ascii") + b"\r\n"
    body_size = max(size - len(head), len(line))
    body = line * (body_size // len(line))
    body += b"y" * max(0, body_size - len(body) - 2) + b"\r\n"
    return head + body


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _State:
    """What the child holds between commands: the stack, or the echo servers."""

    def __init__(self) -> None:
        from roundtrip.certs import CertificateAuthority
        from roundtrip.servers._runner import LoopThread
        from roundtrip.stack import MailStack

        self.stack: MailStack | None = None
        self.loop_thread: LoopThread | None = None
        self.ca: CertificateAuthority | None = None
        self.servers: list[asyncio.AbstractServer] = []

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        if self.loop_thread is not None:
            for server in self.servers:
                self.loop_thread.call(server.close)
            self.loop_thread.stop()
        if self.ca is not None:
            self.ca.cleanup()


def _op_start(state: _State, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    from roundtrip.config import StackConfig
    from roundtrip.stack import MailStack

    started = time.perf_counter()
    if state.stack is not None:  # a restart with other settings
        state.stack.stop()
    config = StackConfig(
        domains=tuple(cmd["domains"]),
        users=tuple(cmd["users"]),
        relay_connection_cache=float(cmd.get("relay_connection_cache", 2.0)),
        # The sender checks, on by default; off to do the same work as Postfix + Dovecot as
        # the harness configures them (no DKIM, SPF or DMARC).
        dkim=bool(cmd.get("dkim", True)),
        sender_auth=bool(cmd.get("sender_auth", True)),
    )
    stack = state.stack = MailStack(config)
    stack.start()
    reply["start_seconds"] = time.perf_counter() - started
    reply["describe"] = stack.describe()
    reply["endpoints"] = {
        d: {"host": ep.host, "hostname": ep.hostname, "ports": ep.ports}
        for d, ep in stack.domains.items()
    }


def _op_echo(state: _State, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    from roundtrip.certs import CertificateAuthority
    from roundtrip.servers._runner import LoopThread

    ca = state.ca = CertificateAuthority()
    tls = ca.server_context(["echo.bench"])
    loop_thread = state.loop_thread = LoopThread(name="bench-echo")

    async def listen() -> list[int]:
        loop = asyncio.get_running_loop()
        plain = await loop.create_server(_Echo, "127.0.0.1", 0)
        secure = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=tls)
        state.servers.extend([plain, secure])
        return [s.sockets[0].getsockname()[1] for s in (plain, secure)]

    tcp, tls_port = loop_thread.run(listen(), timeout=10)
    reply.update(tcp_port=tcp, tls_port=tls_port, ca_file=ca.ca_file(), name="echo.bench")


def _op_rss(state: _State, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    gc.collect()
    reply.update(_status())
    reply["bare"] = _BARE


def _op_reset_peak(state: _State, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        reply["reset"] = True
    except OSError as exc:
        reply["reset"] = False
        reply["error"] = str(exc)
    reply.update(_status())


def _op_fill(state: _State, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    assert state.stack is not None
    started = time.perf_counter()
    first = int(cmd.get("first", 0))
    for i in range(first, first + int(cmd["count"])):
        state.stack.store.deliver(cmd["user"], make_message(i, int(cmd["size"])))
    reply["seconds"] = time.perf_counter() - started


def _op_clear(state: _State, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    assert state.stack is not None
    state.stack.store.clear()
    gc.collect()


_OPS: dict[str, Callable[[_State, dict[str, Any], dict[str, Any]], None]] = {
    "start": _op_start,
    "echo": _op_echo,
    "rss": _op_rss,
    "reset_peak": _op_reset_peak,
    "fill": _op_fill,
    "clear": _op_clear,
}


def main() -> None:
    state = _State()
    out = sys.stdout
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                break
            reply: dict[str, Any] = {"ok": True}
            handler = _OPS.get(op)
            if handler is None:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            else:
                handler(state, cmd, reply)
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        state.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
