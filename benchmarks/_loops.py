"""Timed round-trip loops: the lean client and the validator's probe, with server CPU.

``lean_latency`` runs ``benchmarks._lean`` (exactly the issue's round trip, raw sockets);
``latency`` runs the validator's ``run_probe`` (verification, clean-up, its own reporting).
Both warm up, then time ``n`` round trips and report p50/p95, per-step p50s and, given the
server's pid, its CPU seconds per round trip.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import PROBE_OPTIONS, TIMEOUT, Target, pct
from benchmarks._lean import lean_round_trip, pop3_pipelining
from roundtrip.probes.roundtrip import ProbeResult, run_probe


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``, all its threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe(target: Target, retrieve: str, ctx: ssl.SSLContext) -> ProbeResult:
    """One validator round trip; a failed one stops the benchmark."""
    result = run_probe(
        target.smtp,
        target.imap if retrieve == "imap" else target.pop3,
        context=ctx,
        mail_from=target.mail_from,
        rcpt_to=target.rcpt_to,
        timeout=TIMEOUT,
        **PROBE_OPTIONS,
    )
    if not result.ok:
        raise RuntimeError(f"round trip failed at {result.error_step}: {result.error}")
    return result


def timed_loop(
    once: Callable[[], tuple[float, dict[str, float]]], n: int, cpu_pid: int | None
) -> dict[str, Any]:
    """``min(5, n)`` warm-up round trips, then ``n`` timed: p50/p95, step p50s, server CPU."""
    for _ in range(min(5, n)):
        once()
    times: list[float] = []
    steps: dict[str, list[float]] = {}
    cpu_before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    began = time.perf_counter()
    for _ in range(n):
        total, got = once()
        times.append(total)
        for name, seconds in got.items():
            steps.setdefault(name, []).append(seconds)
    wall = time.perf_counter() - began
    out: dict[str, Any] = {
        "n": n,
        "p50": pct(times, 50),
        "p95": pct(times, 95),
        "mean_wall": wall / n,
        "steps_p50": {k: pct(v, 50) for k, v in steps.items()},
        "steps_max": {k: max(v) for k, v in steps.items()},
    }
    if cpu_pid:
        out["server_cpu_per_round_trip"] = (cpu_seconds(cpu_pid) - cpu_before) / n
    return out


def latency(target: Target, retrieve: str, n: int, cpu_pid: int | None = None) -> dict[str, Any]:
    """The validator's probe (verifies, deletes; its timings include its own reporting)."""
    ctx = target.context()

    def once() -> tuple[float, dict[str, float]]:
        result = probe(target, retrieve, ctx)
        steps: dict[str, float] = {}
        for step in result.steps:
            steps[step.name] = steps.get(step.name, 0.0) + step.seconds
        return result.total_seconds, steps

    return timed_loop(once, n, cpu_pid)


def lean_latency(
    target: Target, retrieve: str, n: int, cpu_pid: int | None = None
) -> dict[str, Any]:
    """``benchmarks._lean``: exactly the issue's round trip (clean-up not in the total)."""
    ctx = target.context()
    pipelining = retrieve == "pop3" and pop3_pipelining(target.pop3, ctx, TIMEOUT)

    def once() -> tuple[float, dict[str, float]]:
        steps = lean_round_trip(target, ctx, retrieve, TIMEOUT, pop3_pipelining=pipelining)
        return steps["total"], steps

    out = timed_loop(once, n, cpu_pid)
    out["client"] = "lean"
    out["pop3_pipelining"] = pipelining
    return out
