"""What every benchmark section shares: units, the plan, percentiles, and the server child.

The server child is ``benchmarks._server`` in a subprocess (one JSON line per command), so
the client and the stack use the machine's two cores and the stack's RSS is its own. A
``Target`` says where a round trip goes; ``stack_target`` builds one from the child's
``start`` reply, ``real_target`` from a ``benchmarks._realstack.RealMailServer``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from roundtrip.config import Endpoint
from roundtrip.probes.roundtrip import run_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MS = 1000.0
MIB = 1024 * 1024
DOMAINS = ("example.com", "example.org")
IMAP_USER = "big@example.com"
TIMEOUT = 30.0
#: The probe may look again after the message shows ("settle", for duplicates); that is a
#: deliberate wait, not delivery time, so the benchmark turns it off where it exists.
PROBE_OPTIONS: dict[str, Any] = (
    {"settle": 0.0} if "settle" in inspect.signature(run_probe).parameters else {}
)


@dataclass(frozen=True)
class Plan:
    """Counts and sizes; ``quick`` shrinks everything for the CI smoke run."""

    quick: bool
    floor_n: int
    start_n: int
    pytest_sizes: tuple[int, ...]
    pytest_repeat: int
    latency_n: int
    throughput_clients: tuple[int, ...]
    throughput_seconds: float
    throughput_warmup: float
    imap_sizes: tuple[int, ...]
    imap_repeat: int
    fill_count: int
    fill_size: int
    big_size: int
    smtp_fill_count: int
    #: Messages of the load section (the issue's 10,000; the quick run fits the CI budget).
    load_messages: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                True,
                30,
                2,
                (1, 2, 10),
                1,
                10,
                (1, 8, 32),
                1.0,
                0.5,
                (10, 100, 1000),
                3,
                1000,
                4096,
                4 * 1000 * 1000,
                200,
                500,
            )
        return cls(
            False,
            300,
            5,
            (1, 2, 100),
            3,
            200,
            (1, 8, 32),
            5.0,
            1.0,
            (10, 1000, 10000, 100000),
            25,
            10000,
            4096,
            40 * 1000 * 1000,
            10000,
            10000,
        )


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY, and TCP_QUICKACK where Linux has it, as the lean client does."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("echo server closed")
        data += chunk
    return data


# ---------------------------------------------------------------------------------------------
# child processes


def child_env() -> dict[str, str]:
    """The environment of a benchmark child: this checkout first on the path, no bytecode."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class ServerChild:
    """``benchmarks._server`` in a subprocess, driven by JSON lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._server"],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark server child died during {op!r}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"benchmark server child: {reply}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def server_child() -> Iterator[ServerChild]:
    child = ServerChild()
    try:
        yield child
    finally:
        child.close()


# ---------------------------------------------------------------------------------------------
# where a round trip goes


@dataclass
class Target:
    """Where a round trip goes: submission endpoint, retrieval endpoints, trust."""

    smtp: Endpoint
    imap: Endpoint
    pop3: Endpoint
    ca_file: str
    mail_from: str
    rcpt_to: str

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def stack_target(start: dict[str, Any], src: str, dst: str) -> Target:
    """From the server child's ``start`` reply: ``user@src`` sends to ``user@dst``."""
    users = {u["address"]: u["password"] for u in start["describe"]["users"]}
    eps = start["endpoints"]
    sender, rcpt = f"user@{src}", f"user@{dst}"

    def ep(proto: str, domain: str, service: str, user: str) -> Endpoint:
        e = eps[domain]
        return Endpoint(
            proto, "implicit", e["host"], e["ports"][service], user, users[user], e["hostname"]
        )

    return Target(
        ep("smtp", src, "submissions", sender),
        ep("imap", dst, "imaps", rcpt),
        ep("pop3", dst, "pop3s", rcpt),
        start["describe"]["ca_file"],
        sender,
        rcpt,
    )


def real_target(server: Any) -> Target:
    """Alice sends to herself on a ``RealMailServer`` (Postfix + Dovecot)."""
    user = server.mailbox_address("alice")
    pw = server.users[user]

    def ep(proto: str, service: str) -> Endpoint:
        return Endpoint(
            proto, "implicit", server.host, server.ports[service], user, pw, server.hostname
        )

    return Target(
        ep("smtp", "submissions"),
        ep("imap", "imaps"),
        ep("pop3", "pop3s"),
        server.ca.ca_file(),
        user,
        user,
    )
