"""Section "floor": what the wire alone costs on this machine.

An asyncio echo server (the same machinery and an ECDSA trustme leaf as the stack) runs in a
server child; the client here times a TLS 1.3 connect + handshake + 64 bytes there and back,
a plain TCP connect + round trip, and a round trip on an open TCP connection. The TLS figure,
times the number of TLS connections a round trip needs, is the floor its ratio is taken against.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from benchmarks._common import MS, Plan, pct, recv_exact, server_child, tune
from benchmarks._report import Results

#: This section carries no target.
METRICS: tuple[str, ...] = ()

_PAYLOAD = b"x" * 64
_WARMUP = 10


def tls_sample(addr: tuple[str, int], ctx: ssl.SSLContext, name: str) -> tuple[float, str]:
    """One floor sample: connect, TLS handshake, 64 bytes there and back; (seconds, version)."""
    started = time.perf_counter()
    with socket.create_connection(addr, timeout=10) as raw:
        tune(raw)
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(_PAYLOAD)
            recv_exact(tls, len(_PAYLOAD))
            return time.perf_counter() - started, tls.version() or ""


def tls_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _tcp_connect_sample(addr: tuple[str, int]) -> float:
    started = time.perf_counter()
    with socket.create_connection(addr, timeout=10) as sock:
        tune(sock)
        sock.sendall(_PAYLOAD)
        recv_exact(sock, len(_PAYLOAD))
        return time.perf_counter() - started


def _open_connection_samples(addr: tuple[str, int], n: int) -> list[float]:
    times = []
    with socket.create_connection(addr, timeout=10) as sock:
        tune(sock)
        for i in range(n + _WARMUP):
            started = time.perf_counter()
            sock.sendall(_PAYLOAD)
            recv_exact(sock, len(_PAYLOAD))
            if i >= _WARMUP:
                times.append(time.perf_counter() - started)
    return times


def measure(plan: Plan) -> dict[str, Any]:
    with server_child() as child:
        info = child.call("echo")
        ctx = tls_context(info["ca_file"])
        addr_tcp = ("127.0.0.1", info["tcp_port"])
        addr_tls = ("127.0.0.1", info["tls_port"])
        tls = [tls_sample(addr_tls, ctx, info["name"]) for _ in range(plan.floor_n + _WARMUP)]
        tcp_conn = [_tcp_connect_sample(addr_tcp) for _ in range(plan.floor_n + _WARMUP)]
        rtt = _open_connection_samples(addr_tcp, plan.floor_n * 3)
    tls_times = [seconds for seconds, _ in tls[_WARMUP:]]
    return {
        "tls_version": tls[-1][1],
        "tls_handshake_rtt_p50": pct(tls_times, 50),
        "tls_handshake_rtt_p95": pct(tls_times, 95),
        "tcp_connect_rtt_p50": pct(tcp_conn[_WARMUP:], 50),
        "tcp_rtt_p50": pct(rtt, 50),
        "tcp_rtt_p95": pct(rtt, 95),
    }


def rows(res: Results, data: dict[str, Any]) -> None:
    fl = data["floor"]
    res.add(
        "floor",
        f"TLS 1.3 handshake + 1 round trip p50 ({fl['tls_version']})",
        fl["tls_handshake_rtt_p50"] * MS,
        "ms",
        note=f"p95 {fl['tls_handshake_rtt_p95'] * MS:.2f} ms",
    )
    res.add("floor", "TCP connect + 1 round trip p50", fl["tcp_connect_rtt_p50"] * MS, "ms")
    res.add(
        "floor",
        "TCP round trip on an open connection p50",
        fl["tcp_rtt_p50"] * MS,
        "ms",
        note=f"p95 {fl['tcp_rtt_p95'] * MS:.3f} ms",
    )
