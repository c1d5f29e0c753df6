"""Section "throughput": full round trips per second with 1, 8 and 32 concurrent clients.

Client processes (``benchmarks._client``, at most 4, threads inside) loop the validator's
probe over IMAPS against a fresh stack child (or Postfix + Dovecot); after a warm-up, the
round trips finished inside the window are counted. Server and clients share the cores, so
the figure is the machine's, not the server's alone.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import asdict
from typing import Any

from benchmarks._common import (
    DOMAINS,
    REPO,
    Plan,
    Target,
    child_env,
    pct,
    ratio,
    server_child,
    stack_target,
)
from benchmarks._report import Results
from benchmarks.targets import is_judged

#: The metrics these rows offer (one per client count of either plan); a target picks.
METRICS = tuple(
    f"throughput.clients_{c}_vs_postfix_dovecot"
    for c in sorted({*Plan.make(False).throughput_clients, *Plan.make(True).throughput_clients})
)

_MAX_PROCESSES = 4


def _spawn(job: dict[str, Any], threads: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._client"],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    child.stdin.write(json.dumps({**job, "threads": threads}) + "\n")
    child.stdin.flush()
    return child


def _reap(children: list[subprocess.Popen[str]]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


def _run_clients(job: dict[str, Any], per: list[int], timeout: float) -> dict[str, Any]:
    """Start one client process per entry of ``per`` (its threads), go, and sum their counts."""
    children: list[subprocess.Popen[str]] = []
    try:
        for threads in per:
            children.append(_spawn(job, threads))
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("throughput client did not start")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        total: dict[str, Any] = {"done": 0, "errors": 0, "latencies": [], "messages": []}
        for child in children:
            out, _ = child.communicate(timeout=timeout)
            data = json.loads(out.strip().splitlines()[-1])
            total["done"] += data["done"]
            total["errors"] += data["n_errors"]
            total["latencies"] += data["latencies"]
            total["messages"] += data["errors"]
    finally:
        _reap(children)
    return total


def throughput(target: Target, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Full round trips per second with ``clients`` concurrent probe loops (IMAPS)."""
    procs = min(clients, _MAX_PROCESSES)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    job = {
        "smtp": asdict(target.smtp),
        "retrieve": asdict(target.imap),
        "ca_file": target.ca_file,
        "mail_from": target.mail_from,
        "rcpt_to": target.rcpt_to,
        "duration": seconds,
        "warmup": warmup,
    }
    got = _run_clients(job, per, warmup + seconds + 60)
    lat = got["latencies"]
    return {
        "clients": clients,
        "processes": procs,
        "seconds": seconds,
        "done": got["done"],
        "errors": got["errors"],
        "error_samples": got["messages"][:3],
        "per_second": got["done"] / seconds,
        "latency_p50": pct(lat, 50) if lat else None,
    }


def measure(plan: Plan, users: list[str]) -> dict[str, Any]:
    """Every client count of the plan against one fresh stack child."""
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        same = stack_target(start, DOMAINS[0], DOMAINS[0])
        return {
            str(c): throughput(same, c, plan.throughput_seconds, plan.throughput_warmup)
            for c in plan.throughput_clients
        }


def rows(res: Results, data: dict[str, Any]) -> None:
    pd = data.get("postfix_dovecot") or {}
    has_pd = "skipped" not in pd
    for clients, value in data["throughput"].items():
        # The client count a target is set for is the target table's business.
        metric = f"throughput.clients_{clients}_vs_postfix_dovecot"
        theirs = pd["throughput"][clients]["per_second"] if has_pd else None
        errors = value["errors"] + (pd["throughput"][clients]["errors"] if has_pd else 0)
        res.add(
            "throughput",
            f"full round trips/s, {clients} concurrent clients",
            value["per_second"],
            "/s",
            postfix_dovecot=theirs,
            ratio=ratio(value["per_second"], theirs),
            ratio_of="x theirs",
            note=f"{value['processes']} client processes; errors {errors}",
            metric=metric if is_judged(metric) else "",
        )
