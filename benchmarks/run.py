"""roundtrip benchmark suite (issue "Performance").

Usage (from the repository root)::

    python -m benchmarks.run [--quick] [--json FILE] [--no-postfix]

Prints one table with every figure of the issue and its ratio or target, and writes the same
figures as JSON. ``--quick`` is the CI smoke version: the same rows with smaller counts and
sizes (its figures are not meant to be compared with targets).

How each figure is taken (docs/benchmarks.md says more):

- Servers run in a child process (``benchmarks._server``), the client in this one, so the two
  use the machine's two cores and the server's RSS is its own. Exceptions: "stack start" and
  "in-process round trip" run in this process, because that is how a pytest session uses it.
- Throughput clients are separate processes (``benchmarks._client``), each with threads.
- Round-trip latency rows with targets use ``benchmarks._lean`` (exactly the issue's round
  trip, raw sockets); the validator's probe (``run_probe``: verification, clean-up, reporting)
  is measured beside it in rows of its own, and drives the throughput clients.
- Postfix + Dovecot is ``roundtrip.realstack.RealMailServer``, the validator's integration
  harness, with the same lean client, the same probe and the same throughput clients.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import imaplib
import inspect
import json
import os
import platform
import pwd
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # ``python benchmarks/run.py``
    sys.path.insert(0, REPO)

from benchmarks._lean import lean_round_trip, pop3_pipelining  # noqa: E402
from benchmarks._server import make_message  # noqa: E402
from roundtrip.config import Endpoint  # noqa: E402
from roundtrip.probes.roundtrip import ProbeResult, run_probe  # noqa: E402

MS = 1000.0
MIB = 1024 * 1024
DOMAINS = ("example.com", "example.org")
IMAP_USER = "big@example.com"
_TIMEOUT = 30.0
#: The probe may look again after the message shows ("settle", for duplicates); that is a
#: deliberate wait, not delivery time, so the benchmark turns it off where it exists.
PROBE_OPTIONS: dict[str, Any] = (
    {"settle": 0.0} if "settle" in inspect.signature(run_probe).parameters else {}
)


# ---------------------------------------------------------------------------------------------
# plan


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
            (10, 1000, 10000),
            25,
            10000,
            4096,
            40 * 1000 * 1000,
            10000,
        )


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Row:
    section: str
    name: str
    ours: float | None
    unit: str
    postfix_dovecot: float | None = None
    ratio: float | None = None
    ratio_of: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, name: str, ours: float | None, unit: str, **kw: Any) -> Row:
        row = Row(section, name, ours, unit, **kw)
        self.rows.append(row)
        return row


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# child processes


def _env() -> dict[str, str]:
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
            env=_env(),
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


def _stack_target(start: dict[str, Any], src: str, dst: str) -> Target:
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


def _real_target(server: Any) -> Target:
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


def _probe(target: Target, retrieve: str, ctx: ssl.SSLContext) -> ProbeResult:
    result = run_probe(
        target.smtp,
        target.imap if retrieve == "imap" else target.pop3,
        context=ctx,
        mail_from=target.mail_from,
        rcpt_to=target.rcpt_to,
        timeout=_TIMEOUT,
        **PROBE_OPTIONS,
    )
    if not result.ok:
        raise RuntimeError(f"round trip failed at {result.error_step}: {result.error}")
    return result


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``, all its threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed_loop(
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
        result = _probe(target, retrieve, ctx)
        steps: dict[str, float] = {}
        for step in result.steps:
            steps[step.name] = steps.get(step.name, 0.0) + step.seconds
        return result.total_seconds, steps

    return _timed_loop(once, n, cpu_pid)


def lean_latency(
    target: Target, retrieve: str, n: int, cpu_pid: int | None = None
) -> dict[str, Any]:
    """``benchmarks._lean``: exactly the issue's round trip (clean-up not in the total)."""
    ctx = target.context()
    pipelining = retrieve == "pop3" and pop3_pipelining(target.pop3, ctx, _TIMEOUT)

    def once() -> tuple[float, dict[str, float]]:
        steps = lean_round_trip(target, ctx, retrieve, _TIMEOUT, pop3_pipelining=pipelining)
        return steps["total"], steps

    out = _timed_loop(once, n, cpu_pid)
    out["client"] = "lean"
    out["pop3_pipelining"] = pipelining
    return out


def throughput(target: Target, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Full round trips per second with ``clients`` concurrent probe loops (IMAPS)."""
    procs = min(clients, 4)
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
    children = []
    try:
        for threads in per:
            child = subprocess.Popen(
                [sys.executable, "-m", "benchmarks._client"],
                cwd=REPO,
                env=_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(child)
            assert child.stdin is not None
            child.stdin.write(json.dumps({**job, "threads": threads}) + "\n")
            child.stdin.flush()
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("throughput client did not start")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        done, errors, lat = 0, 0, []
        messages: list[str] = []
        for child in children:
            out, _ = child.communicate(timeout=warmup + seconds + 60)
            data = json.loads(out.strip().splitlines()[-1])
            done += data["done"]
            errors += data["n_errors"]
            lat += data["latencies"]
            messages += data["errors"]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(5)
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
    return {
        "clients": clients,
        "processes": procs,
        "seconds": seconds,
        "done": done,
        "errors": errors,
        "error_samples": messages[:3],
        "per_second": done / seconds,
        "latency_p50": pct(lat, 50) if lat else None,
    }


# ---------------------------------------------------------------------------------------------
# floor


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("echo server closed")
        data += chunk
    return data


def floor(plan: Plan) -> dict[str, Any]:
    payload = b"x" * 64
    with server_child() as child:
        info = child.call("echo")
        ctx = ssl.create_default_context(cafile=info["ca_file"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        addr_tcp = ("127.0.0.1", info["tcp_port"])
        addr_tls = ("127.0.0.1", info["tls_port"])
        tls_times, tcp_conn_times, rtt_times = [], [], []
        version = ""
        for i in range(plan.floor_n + 10):
            started = time.perf_counter()
            with socket.create_connection(addr_tls, timeout=10) as raw:
                _tune(raw)
                with ctx.wrap_socket(raw, server_hostname=info["name"]) as tls:
                    tls.sendall(payload)
                    _recv_exact(tls, len(payload))
                    elapsed = time.perf_counter() - started
                    version = tls.version() or ""
            if i >= 10:
                tls_times.append(elapsed)
        for i in range(plan.floor_n + 10):
            started = time.perf_counter()
            with socket.create_connection(addr_tcp, timeout=10) as sock:
                _tune(sock)
                sock.sendall(payload)
                _recv_exact(sock, len(payload))
                elapsed = time.perf_counter() - started
            if i >= 10:
                tcp_conn_times.append(elapsed)
        with socket.create_connection(addr_tcp, timeout=10) as sock:
            _tune(sock)
            for i in range(plan.floor_n * 3 + 10):
                started = time.perf_counter()
                sock.sendall(payload)
                _recv_exact(sock, len(payload))
                if i >= 10:
                    rtt_times.append(time.perf_counter() - started)
    return {
        "tls_version": version,
        "tls_handshake_rtt_p50": pct(tls_times, 50),
        "tls_handshake_rtt_p95": pct(tls_times, 95),
        "tcp_connect_rtt_p50": pct(tcp_conn_times, 50),
        "tcp_rtt_p50": pct(rtt_times, 50),
        "tcp_rtt_p95": pct(rtt_times, 95),
    }


# ---------------------------------------------------------------------------------------------
# stack start and the pytest fixture


def stack_start(plan: Plan, latency_n: int) -> dict[str, Any]:
    """In-process start (CA, leaf certificates, every listener of two domains) and stop."""
    from roundtrip.certs import CertificateAuthority
    from roundtrip.config import StackConfig
    from roundtrip.stack import MailStack

    starts, stops = [], []
    in_process: dict[str, Any] = {}
    in_process_probe: dict[str, Any] = {}
    for i in range(plan.start_n):
        started = time.perf_counter()
        stack = MailStack(StackConfig(domains=DOMAINS), ca=CertificateAuthority())
        stack.start()
        starts.append(time.perf_counter() - started)
        if i == 0:
            # A round trip with client and stack in one process, as a pytest test runs it.
            a, b = stack.user(DOMAINS[0]), stack.user(DOMAINS[0])
            ea = stack.endpoints(DOMAINS[0])
            target = Target(
                Endpoint(
                    "smtp",
                    "implicit",
                    ea.host,
                    ea.ports["submissions"],
                    a.address,
                    a.password,
                    ea.hostname,
                ),
                Endpoint(
                    "imap",
                    "implicit",
                    ea.host,
                    ea.ports["imaps"],
                    b.address,
                    b.password,
                    ea.hostname,
                ),
                Endpoint(
                    "pop3",
                    "implicit",
                    ea.host,
                    ea.ports["pop3s"],
                    b.address,
                    b.password,
                    ea.hostname,
                ),
                stack.ca_file,
                a.address,
                b.address,
            )
            in_process = lean_latency(target, "imap", latency_n)
            in_process_probe = latency(target, "imap", latency_n)
        started = time.perf_counter()
        stack.stop()
        stops.append(time.perf_counter() - started)
        gc.collect()
    return {
        "start_p50": statistics.median(starts),
        "start_max": max(starts),
        "stop_p50": statistics.median(stops),
        "starts": starts,
        "in_process_imap": in_process,
        "in_process_imap_probe": in_process_probe,
    }


_TIMER_PLUGIN = """
import json, os, time
_T = {"phases": {}}
def pytest_sessionstart(session):
    _T["start"] = time.perf_counter()
def pytest_runtest_logreport(report):
    _T["phases"].setdefault(report.nodeid, {})[report.when] = report.duration
def pytest_sessionfinish(session, exitstatus):
    _T["end"] = time.perf_counter()
    _T["exitstatus"] = int(exitstatus)
    with open(os.environ["BENCH_TIMER_OUT"], "w") as fh:
        json.dump(_T, fh)
"""


def _pytest_session(workdir: str, n: int, fixture: bool) -> dict[str, Any]:
    name = f"test_{'stack' if fixture else 'empty'}_{n}.py"
    arg = "mailstack" if fixture else ""
    body = (
        "import pytest\n\n\n"
        f"@pytest.mark.parametrize('i', range({n}))\n"
        f"def test_it(i{', ' + arg if arg else ''}):\n"
        "    assert i >= 0\n"
    )
    with open(os.path.join(workdir, name), "w", encoding="ascii") as fh:
        fh.write(body)
    out = os.path.join(workdir, "timer.json")
    env = _env()
    env["PYTHONPATH"] = workdir + os.pathsep + env["PYTHONPATH"]
    env["BENCH_TIMER_OUT"] = out
    # As in a user's project: bytecode (and pytest's rewritten bytecode of plugin modules)
    # is cached after the first session, so the best of the repeats is not compile time.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "_bench_timer",
            "-p",
            "no:randomly",
            name,
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pytest session {name} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(out, encoding="ascii") as fh:
        data: dict[str, Any] = json.load(fh)
    phases = list(data["phases"].values())
    return {
        "session": data["end"] - data["start"],
        "setup_teardown": [p.get("setup", 0) + p.get("teardown", 0) for p in phases],
    }


def fixture_overhead(plan: Plan) -> dict[str, Any]:
    """pytest sessions of N tests with and without ``mailstack``; best of ``pytest_repeat``."""
    with tempfile.TemporaryDirectory(prefix="rt-bench-") as workdir:
        with open(os.path.join(workdir, "_bench_timer.py"), "w", encoding="ascii") as fh:
            fh.write(_TIMER_PLUGIN)
        with open(os.path.join(workdir, "pytest.ini"), "w", encoding="ascii") as fh:
            fh.write("[pytest]\n")
        best: dict[tuple[int, bool], dict[str, Any]] = {}
        _pytest_session(workdir, plan.pytest_sizes[0], True)  # warm the bytecode caches
        for _ in range(plan.pytest_repeat):
            for n in plan.pytest_sizes:
                for fixture in (False, True):
                    got = _pytest_session(workdir, n, fixture)
                    key = (n, fixture)
                    if key not in best or got["session"] < best[key]["session"]:
                        best[key] = got
    small, mid, big = plan.pytest_sizes
    s = {k: v["session"] for k, v in best.items()}
    first = s[(small, True)] - s[(small, False)]
    second = (s[(mid, True)] - s[(small, True)]) - (s[(mid, False)] - s[(small, False)])
    per_test = ((s[(big, True)] - s[(small, True)]) - (s[(big, False)] - s[(small, False)])) / (
        big - small
    )
    fixture_later = best[(big, True)]["setup_teardown"][1:]
    empty_later = best[(big, False)]["setup_teardown"][1:]
    return {
        "sessions": {f"{n}{'+mailstack' if f else ''}": v for (n, f), v in s.items()},
        "first_test": first,
        "second_test": second,
        "per_test_after_first": per_test,
        "per_test_setup_teardown_p50": statistics.median(fixture_later)
        - statistics.median(empty_later),
        "first_test_setup_teardown": best[(small, True)]["setup_teardown"][0]
        - best[(small, False)]["setup_teardown"][0],
        "sizes": list(plan.pytest_sizes),
    }


# ---------------------------------------------------------------------------------------------
# IMAP cost against mailbox size


def _imap(host: str, port: int, ca_file: str, hostname: str, user: str, pw: str) -> Any:
    ctx = ssl.create_default_context(cafile=ca_file)
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=120)
    # imaplib verifies against the host it dials; our certificates name 127.0.0.1 as well.
    _tune(imap.sock)
    imap.login(user, pw)
    return imap


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(first call, p50 of the following ``repeat`` calls)."""
    started = time.perf_counter()
    fn()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return first, pct(times, 50)


def imap_costs(
    imap_factory: Callable[[], Any],
    fill: Callable[[int, int], Any],
    sizes: tuple[int, ...],
    repeat: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    have = 0
    for size in sizes:
        fill(have, size - have)
        have = size
        imap = imap_factory()
        try:

            def select(i: Any = imap) -> None:
                _ok(i.select("INBOX"))

            select_first, select_p50 = _timed(select, repeat)
            target = f"<bench-{size // 2}@roundtrip.bench>"
            found: list[bytes] = []

            def search(target: str = target, found: list[bytes] = found, i: Any = imap) -> None:
                typ, data = i.uid("SEARCH", "HEADER", "Message-ID", f'"{target}"')
                _ok((typ, data))
                found[:] = data[0].split()

            search_first, search_p50 = _timed(search, repeat)
            if len(found) != 1:
                raise RuntimeError(f"SEARCH at {size} found {found!r}, expected one message")
            uid = found[0].decode()

            def fetch(uid: str = uid, i: Any = imap) -> None:
                typ, data = i.uid("FETCH", uid, "(BODY.PEEK[])")
                _ok((typ, data))
                if not isinstance(data[0], tuple) or len(data[0][1]) < 4000:
                    raise RuntimeError(f"UID FETCH {uid} returned {str(data)[:200]}")

            fetch_first, fetch_p50 = _timed(fetch, repeat)
            imap.logout()
        finally:
            with contextlib.suppress(OSError):
                imap.sock.close()
        out[str(size)] = {
            "select_first": select_first,
            "select_p50": select_p50,
            "search_first": search_first,
            "search_p50": search_p50,
            "fetch_first": fetch_first,
            "fetch_p50": fetch_p50,
        }
    return out


def _ok(reply: tuple[str, Any]) -> None:
    if reply[0] != "OK":
        raise RuntimeError(f"IMAP command failed: {reply!r}")


# ---------------------------------------------------------------------------------------------
# memory


def memory(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    users = [f"user@{d}" for d in DOMAINS]
    # 1. idle, then messages stored directly in the store.
    with server_child() as child:
        child.call("start", domains=list(DOMAINS), users=users)
        idle = child.call("rss")
        out["bare_interpreter"] = idle["bare"]["VmRSS"]
        out["idle"] = idle["VmRSS"]
        fill = child.call("fill", user=users[0], count=plan.fill_count, size=plan.fill_size)
        filled = child.call("rss")
        raw_size = plan.fill_count * len(make_message(plan.fill_count // 2, plan.fill_size))
        out["fill"] = {
            "count": plan.fill_count,
            "raw_bytes": raw_size,
            "rss_after": filled["VmRSS"],
            "delta": filled["VmRSS"] - idle["VmRSS"],
            "seconds": fill["seconds"],
        }
    # 2. the same count through SMTP (465, AUTH), 50 messages per connection.
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        target = _stack_target(start, DOMAINS[0], DOMAINS[0])
        before = child.call("rss")
        ctx = target.context()
        started = time.perf_counter()
        # The listener caps commands per connection (abuse limits), so 50 messages each.
        for first in range(0, plan.smtp_fill_count, 50):
            with _smtps(target, ctx) as client:
                for i in range(first, min(first + 50, plan.smtp_fill_count)):
                    client.sendmail(
                        target.mail_from, [target.rcpt_to], make_message(i, plan.fill_size)
                    )
        seconds = time.perf_counter() - started
        after = child.call("rss")
        out["smtp_fill"] = {
            "count": plan.smtp_fill_count,
            "raw_bytes": plan.smtp_fill_count * len(make_message(0, plan.fill_size)),
            "delta": after["VmRSS"] - before["VmRSS"],
            "seconds": seconds,
        }
    # 3. peak while one big message goes through (submit on 465, fetch over IMAPS, delete).
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        target = _stack_target(start, DOMAINS[0], DOMAINS[0])
        base = child.call("reset_peak")
        big = make_message(0, plan.big_size, tag="big")
        started = time.perf_counter()
        ctx = target.context()
        with _smtps(target, ctx) as client:
            client.sendmail(target.mail_from, [target.rcpt_to], big)
        imap = _imap(
            target.imap.host,
            target.imap.port,
            target.ca_file,
            target.imap.server_name,
            target.imap.user,
            target.imap.password,
        )
        try:
            _ok(imap.select("INBOX"))
            _, data = imap.uid("SEARCH", "HEADER", "Message-ID", '"<big-0@roundtrip.bench>"')
            uid = data[0].split()[0].decode()
            _, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            got = data[0][1]
            imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
            imap.expunge()
            imap.logout()
        finally:
            with contextlib.suppress(OSError):
                imap.sock.close()
        seconds = time.perf_counter() - started
        if len(got) < len(big):
            raise RuntimeError(f"big message came back short: {len(got)} of {len(big)} bytes")
        peak = child.call("rss")
        out["big"] = {
            "bytes": len(big),
            "baseline": base["VmRSS"],
            "reset": base["reset"],
            "peak": peak["VmHWM"],
            "delta": peak["VmHWM"] - base["VmRSS"],
            "seconds": seconds,
        }
    return out


def _smtps(target: Target, ctx: ssl.SSLContext) -> smtplib.SMTP:
    client = smtplib.SMTP_SSL(target.smtp.host, target.smtp.port, context=ctx, timeout=_TIMEOUT)
    assert client.sock is not None
    _tune(client.sock)
    client.login(target.smtp.user, target.smtp.password)
    return client


# ---------------------------------------------------------------------------------------------
# Postfix + Dovecot


def _fill_maildir(server: Any, login: str, first: int, count: int, size: int) -> None:
    """Write messages straight into a Dovecot Maildir (``cur/``, seen), owned by nobody."""
    nobody = pwd.getpwnam("nobody")
    local, _, domain = server.mailbox_address(login).partition("@")
    root = os.path.join(server.workdir, "mail")
    path = root
    for part in (domain, local, "Maildir"):
        path = os.path.join(path, part)
        os.makedirs(path, exist_ok=True)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        os.chown(os.path.join(path, sub), nobody.pw_uid, nobody.pw_gid)
    stamp = int(time.time())
    for i in range(first, first + count):
        raw = make_message(i, size)
        name = os.path.join(path, "cur", f"{stamp}.M{i}P{os.getpid()}.bench,S={len(raw)}:2,S")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chown(name, nobody.pw_uid, nobody.pw_gid)


def _tls_floor_once(addr: tuple[str, int], ctx: ssl.SSLContext, name: str) -> float:
    """One floor sample: connect, TLS handshake, 64 bytes there and back, close."""
    payload = b"x" * 64
    started = time.perf_counter()
    with socket.create_connection(addr, timeout=10) as raw:
        _tune(raw)
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(payload)
            _recv_exact(tls, len(payload))
            return time.perf_counter() - started


def paired(plan: Plan, users: list[str], with_postfix: bool) -> dict[str, Any]:
    """The target ratios from interleaved samples: floor, ours, (Postfix+Dovecot), repeated.

    On a shared machine the speed drifts within seconds; figures taken one after the other
    (floor first, Postfix+Dovecot a minute later) carry that drift into their ratios. Here
    every round takes a short block of samples of each, in a rotating order, so all of them
    see the same machine; the ratios are of the medians.
    """
    from roundtrip.realstack import RealMailServer

    out: dict[str, Any] = {"n": plan.latency_n}
    server = None
    if with_postfix and RealMailServer.is_available()[0]:
        server = RealMailServer(users={"alice": "alice-" + os.urandom(6).hex()})
        server.start()
    try:
        # The floor's echo server in a child of its own, as in floor(): never sharing a
        # process (or a GIL) with the stack.
        with server_child() as child, server_child() as echo_child:
            start = child.call("start", domains=list(DOMAINS), users=users)
            echo = echo_child.call("echo")
            floor_ctx = ssl.create_default_context(cafile=echo["ca_file"])
            floor_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            floor_addr = ("127.0.0.1", echo["tls_port"])
            same = _stack_target(start, DOMAINS[0], DOMAINS[0])
            cross = _stack_target(start, DOMAINS[0], DOMAINS[1])
            ours_ctx = same.context()
            theirs = _real_target(server) if server is not None else None
            theirs_ctx = theirs.context() if theirs is not None else None
            jobs: dict[str, Callable[[], float]] = {
                "floor": lambda: _tls_floor_once(floor_addr, floor_ctx, echo["name"]),
                "same": lambda: lean_round_trip(same, ours_ctx, "imap", _TIMEOUT)["total"],
                "cross": lambda: lean_round_trip(cross, ours_ctx, "imap", _TIMEOUT)["total"],
            }
            if theirs is not None and theirs_ctx is not None:
                jobs["postfix_dovecot"] = lambda: lean_round_trip(
                    theirs, theirs_ctx, "imap", _TIMEOUT
                )["total"]
            names = list(jobs)
            for name in names:  # warm-up
                for _ in range(3):
                    jobs[name]()
            samples: dict[str, list[float]] = {name: [] for name in names}
            # Blocks, not single samples: whatever a server still does after its round trips
            # (closing connections, the relay's cached connection; Postfix's queue manager,
            # Dovecot's processes) slows the next ~10 ms of anything else: measured, the
            # first 5-8 floor samples after a block of our round trips are 10-25 % slower.
            # The first samples of each block absorb that and are dropped.
            drop, keep = (10, 30) if plan.latency_n >= 100 else (3, 5)
            rounds = max(1, -(-plan.latency_n // keep))
            for i in range(rounds):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    got = [jobs[name]() for _ in range(drop + keep)]
                    samples[name].extend(got[drop:])
    finally:
        if server is not None:
            server.stop()
    for name, values in samples.items():
        out[name] = {"p50": pct(values, 50), "p95": pct(values, 95)}
    out["n"] = len(samples["floor"])
    return out


def postfix_dovecot(plan: Plan, results: dict[str, Any]) -> dict[str, Any] | None:
    from roundtrip.realstack import RealMailServer

    ok, reason = RealMailServer.is_available()
    if not ok:
        return {"skipped": reason}
    big_pw = "big-" + os.urandom(6).hex()
    server = RealMailServer(users={"alice": "alice-" + os.urandom(6).hex(), "big": big_pw})
    started = time.perf_counter()
    server.start()
    out: dict[str, Any] = {"start": time.perf_counter() - started}
    try:
        target = _real_target(server)
        out["latency_imap"] = lean_latency(target, "imap", plan.latency_n)
        out["latency_pop3"] = lean_latency(target, "pop3", plan.latency_n)
        out["probe_latency_imap"] = latency(target, "imap", plan.latency_n)
        out["probe_latency_pop3"] = latency(target, "pop3", plan.latency_n)
        out["throughput"] = {
            str(c): throughput(target, c, plan.throughput_seconds, plan.throughput_warmup)
            for c in plan.throughput_clients
        }
        user = server.mailbox_address("big")
        out["imap_costs"] = imap_costs(
            lambda: _imap(
                server.host,
                server.ports["imaps"],
                server.ca.ca_file(),
                server.hostname,
                user,
                big_pw,
            ),
            lambda first, count: _fill_maildir(server, "big", first, count, plan.fill_size),
            plan.imap_sizes,
            plan.imap_repeat,
        )
        out["versions"] = _versions()
    finally:
        server.stop()
    return out


def _versions() -> dict[str, str]:
    found = {}
    for name, cmd in (
        ("postfix", ["/usr/sbin/postconf", "-dh", "mail_version"]),
        ("dovecot", ["/usr/sbin/dovecot", "--version"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found[name] = subprocess.run(
                cmd, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
    return found


# ---------------------------------------------------------------------------------------------
# the run


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as fh:
        mem = fh.readline().split(":", 1)[1].strip()
    load = ""
    with contextlib.suppress(OSError), open("/proc/loadavg", encoding="ascii") as fh:
        load = " ".join(fh.read().split()[:3])
    return {
        "load_average": load,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "commit": commit,
    }


def collect(plan: Plan, *, with_postfix: bool, log: Callable[[str], None]) -> dict[str, Any]:
    data: dict[str, Any] = {"plan": asdict(plan), "machine": machine()}
    log("floor: TLS 1.3 handshake + round trip, TCP round trip")
    data["floor"] = floor(plan)
    log("stack start (in-process) and an in-process round trip")
    data["start"] = stack_start(plan, plan.latency_n)
    log("pytest sessions (fixture overhead)")
    data["fixture"] = fixture_overhead(plan)
    log("round trips against the stack in a child process")
    users = [f"user@{d}" for d in DOMAINS] + [IMAP_USER]
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        data["child_start"] = start["start_seconds"]
        same = _stack_target(start, DOMAINS[0], DOMAINS[0])
        cross = _stack_target(start, DOMAINS[0], DOMAINS[1])
        pid = child.proc.pid
        kinds = {
            "same_imap": (same, "imap"),
            "same_pop3": (same, "pop3"),
            "cross_imap": (cross, "imap"),
            "cross_pop3": (cross, "pop3"),
        }
        # The lean client carries the targets; the probe's figures are kept beside them.
        data["latency"] = {
            k: lean_latency(t, r, plan.latency_n, pid) for k, (t, r) in kinds.items()
        }
        data["probe_latency"] = {
            k: latency(t, r, plan.latency_n, pid) for k, (t, r) in kinds.items()
        }
    # The relay keeps its MX connection for the next message (2 s, as Postfix's connection
    # cache), so back-to-back cross-domain round trips ride a warm relay connection: the
    # cold figure, one fresh relay connection (and TLS handshake) per message, beside it.
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users, relay_connection_cache=0)
        cold = _stack_target(start, DOMAINS[0], DOMAINS[1])
        data["latency"]["cross_imap_cold"] = lean_latency(
            cold, "imap", plan.latency_n, child.proc.pid
        )
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        log("IMAP cost against mailbox size")
        users_pw = {u["address"]: u["password"] for u in start["describe"]["users"]}
        ep = start["endpoints"][DOMAINS[0]]
        data["imap_costs"] = imap_costs(
            lambda: _imap(
                ep["host"],
                ep["ports"]["imaps"],
                start["describe"]["ca_file"],
                ep["hostname"],
                IMAP_USER,
                users_pw[IMAP_USER],
            ),
            lambda first, count: (
                None
                if count <= 0
                else child.call(
                    "fill", user=IMAP_USER, first=first, count=count, size=plan.fill_size
                )
            ),
            plan.imap_sizes,
            plan.imap_repeat,
        )
    log("throughput (client processes against a fresh stack child)")
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        same = _stack_target(start, DOMAINS[0], DOMAINS[0])
        data["throughput"] = {
            str(c): throughput(same, c, plan.throughput_seconds, plan.throughput_warmup)
            for c in plan.throughput_clients
        }
    log("memory (fresh stack children)")
    data["memory"] = memory(plan)
    log("paired samples: floor, same and cross domain, Postfix+Dovecot, interleaved")
    data["paired"] = paired(plan, users, with_postfix)
    if with_postfix:
        log("Postfix + Dovecot (roundtrip.realstack)")
        data["postfix_dovecot"] = postfix_dovecot(plan, data)
    else:
        data["postfix_dovecot"] = {"skipped": "--no-postfix"}
    return data


def paired_rows(res: Results, got: dict[str, Any] | None) -> None:
    """The rows that carry the round-trip targets, from the interleaved samples."""
    if not got:
        return
    section = "round trip targets: floor and servers sampled in turn (paired)"
    floor = got["floor"]["p50"]
    res.add(
        section,
        "TLS 1.3 handshake + 1 round trip p50 (floor, paired)",
        floor * MS,
        "ms",
        note=f"p95 {got['floor']['p95'] * MS:.2f} ms; {got['n']} samples of each, in blocks",
    )
    for key, label, conns, limit in (
        ("same", "same domain, IMAPS", 2, 1.5),
        ("cross", "cross domain (DNS + relay), IMAPS", 3, 2.0),
    ):
        ratio = got[key]["p50"] / (conns * floor)
        res.add(
            section,
            f"{label} p50 (paired)",
            got[key]["p50"] * MS,
            "ms",
            ratio=ratio,
            ratio_of="x its floor",
            target=f"<= {limit:g}x floor ({conns} TLS conns)",
            met=ratio <= limit,
            note=f"p95 {got[key]['p95'] * MS:.2f} ms"
            + ("; the relay's MX connection is reused (2 s cache)" if key == "cross" else ""),
        )
    theirs = got.get("postfix_dovecot")
    ratio = _ratio(theirs["p50"], got["same"]["p50"]) if theirs else None
    res.add(
        section,
        "same domain IMAPS vs Postfix+Dovecot p50 (paired)",
        got["same"]["p50"] * MS,
        "ms",
        postfix_dovecot=theirs["p50"] * MS if theirs else None,
        ratio=ratio,
        ratio_of="x faster",
        target=">= 3x faster",
        met=(ratio >= 3) if ratio is not None else None,
        note=f"Postfix+Dovecot p95 {theirs['p95'] * MS:.2f} ms" if theirs else "not installed",
    )


def build_rows(data: dict[str, Any]) -> Results:
    """Turn the measurements into table rows with ratios and targets."""
    res = Results(raw=data)
    plan = data["plan"]
    fl = data["floor"]
    pd = data.get("postfix_dovecot") or {}
    has_pd = "skipped" not in pd
    tls_floor = fl["tls_handshake_rtt_p50"]
    res.add(
        "floor",
        f"TLS 1.3 handshake + 1 round trip p50 ({fl['tls_version']})",
        tls_floor * MS,
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

    st = data["start"]
    res.add(
        "start",
        "stack start in-process (2 domains, 15 listeners + DNS, new CA) p50",
        st["start_p50"] * MS,
        "ms",
        note=f"max {st['start_max'] * MS:.1f} ms, stop p50 {st['stop_p50'] * MS:.1f} ms",
    )
    fx = data["fixture"]
    small, mid, big = fx["sizes"]
    res.add(
        "start",
        f"pytest: first test using mailstack, minus an empty session ({small} test)",
        fx["first_test"] * MS,
        "ms",
        target="< 50 ms",
        met=fx["first_test"] * MS < 50,
    )
    res.add(
        "start",
        f"pytest: second test ({mid}-test session, same subtraction)",
        fx["second_test"] * MS,
        "ms",
    )
    res.add(
        "start",
        f"pytest: per test after the first ({big}-test session)",
        fx["per_test_after_first"] * MS,
        "ms",
        target="< 1 ms",
        met=fx["per_test_after_first"] * MS < 1,
        note=f"setup+teardown p50 {fx['per_test_setup_teardown_p50'] * MS:.3f} ms/test",
    )

    lat = data["latency"]
    probe = data["probe_latency"]
    floors = {"same": 2 * tls_floor, "cross": 3 * tls_floor}
    labels = (
        ("same_imap", "same domain, IMAPS"),
        ("same_pop3", "same domain, POP3S"),
        ("cross_imap", "cross domain (DNS + relay), IMAPS"),
        ("cross_pop3", "cross domain (DNS + relay), POP3S"),
    )
    # The rows with targets: benchmarks._lean, exactly the round trip.
    lean_section = "round trip: lean client (benchmarks/_lean.py)"
    for key, label in labels:
        value = lat[key]
        kind = key.split("_")[0]
        ratio = value["p50"] / floors[kind]
        res.add(
            lean_section,
            f"{label} p50",
            value["p50"] * MS,
            "ms",
            ratio=ratio,
            ratio_of="x its floor",
            note=f"p95 {value['p95'] * MS:.2f} ms; floor {floors[kind] * MS:.2f} ms; "
            + _steps_note(value),
        )
    cold = lat.get("cross_imap_cold")
    if cold is not None:
        res.add(
            lean_section,
            "cross domain, IMAPS, a fresh relay connection per message p50",
            cold["p50"] * MS,
            "ms",
            ratio=cold["p50"] / floors["cross"],
            ratio_of="x its floor",
            note=f"relay_connection_cache=0 (the row above reuses the relay's MX connection); "
            f"p95 {cold['p95'] * MS:.2f} ms; " + _steps_note(cold),
        )
    inproc = st["in_process_imap"]
    inproc_probe = st.get("in_process_imap_probe") or {}
    res.add(
        lean_section,
        "same domain, IMAPS, client in the stack's process p50",
        inproc["p50"] * MS,
        "ms",
        ratio=inproc["p50"] / floors["same"],
        ratio_of="x its floor",
        note=f"p95 {inproc['p95'] * MS:.2f} ms (as a pytest test runs); validator probe p50 "
        f"{inproc_probe.get('p50', float('nan')) * MS:.2f} ms",
    )
    for key, label in (("imap", "IMAPS"), ("pop3", "POP3S")):
        ours = lat[f"same_{key}"]["p50"]
        theirs = pd[f"latency_{key}"]["p50"] if has_pd else None
        ratio = _ratio(theirs, ours)
        res.add(
            lean_section,
            f"same domain {label} vs Postfix+Dovecot p50",
            ours * MS,
            "ms",
            postfix_dovecot=theirs * MS if theirs else None,
            ratio=ratio,
            ratio_of="x faster",
            note=(
                f"Postfix+Dovecot p95 {pd[f'latency_{key}']['p95'] * MS:.2f} ms; "
                + _steps_note(pd[f"latency_{key}"])
                if has_pd
                else pd.get("skipped", "")
            ),
        )
    for key, label in labels:
        value = lat[key]
        if "server_cpu_per_round_trip" not in value:
            continue
        cpu = value["server_cpu_per_round_trip"]
        res.add(
            lean_section,
            f"server CPU per round trip, {label.replace(' (DNS + relay)', '')} (stack child)",
            cpu * MS,
            "ms",
            ratio=cpu / value["mean_wall"],
            ratio_of="of the wall time",
            note=f"utime+stime of the stack's process over {value['n']} round trips "
            f"(clock tick {MS / os.sysconf('SC_CLK_TCK'):.0f} ms); mean wall "
            f"{value['mean_wall'] * MS:.2f} ms",
        )

    # The validator's probe, for comparison with earlier runs: it also parses and verifies
    # the message, deletes it (STORE, EXPUNGE / DELE), and times its own reporting.
    paired_rows(res, data.get("paired"))
    probe_section = "round trip: validator probe, with verification and clean-up"
    for key, label in labels:
        value = probe[key]
        kind = key.split("_")[0]
        cpu = value.get("server_cpu_per_round_trip")
        res.add(
            probe_section,
            f"probe: {label} p50",
            value["p50"] * MS,
            "ms",
            ratio=value["p50"] / floors[kind],
            ratio_of="x its floor",
            note=f"p95 {value['p95'] * MS:.2f} ms"
            + (f"; server CPU {cpu * MS:.2f} ms per round trip" if cpu is not None else ""),
        )
    if inproc_probe:
        res.add(
            probe_section,
            "probe: same domain, IMAPS, client in the stack's process p50",
            inproc_probe["p50"] * MS,
            "ms",
            ratio=inproc_probe["p50"] / floors["same"],
            ratio_of="x its floor",
            note=f"p95 {inproc_probe['p95'] * MS:.2f} ms",
        )
    for key, label in (("imap", "IMAPS"), ("pop3", "POP3S")):
        ours = probe[f"same_{key}"]["p50"]
        theirs_data = pd.get(f"probe_latency_{key}") if has_pd else None
        theirs = theirs_data["p50"] if theirs_data else None
        res.add(
            probe_section,
            f"probe: same domain {label} vs Postfix+Dovecot p50",
            ours * MS,
            "ms",
            postfix_dovecot=theirs * MS if theirs else None,
            ratio=_ratio(theirs, ours),
            ratio_of="x faster",
            note=(
                f"Postfix+Dovecot p95 {theirs_data['p95'] * MS:.2f} ms"
                if theirs_data
                else pd.get("skipped", "")
            ),
        )

    for clients, value in data["throughput"].items():
        theirs = pd["throughput"][clients]["per_second"] if has_pd else None
        ratio = _ratio(value["per_second"], theirs)
        errors = value["errors"] + (pd["throughput"][clients]["errors"] if has_pd else 0)
        res.add(
            "throughput",
            f"full round trips/s, {clients} concurrent clients",
            value["per_second"],
            "/s",
            postfix_dovecot=theirs,
            ratio=ratio,
            ratio_of="x theirs",
            target=">= 1.2x" if clients == "8" else "",
            met=(ratio >= 1.2) if clients == "8" and ratio is not None else None,
            note=f"{value['processes']} client processes; errors {errors}",
        )

    costs = data["imap_costs"]
    pd_costs = pd.get("imap_costs", {}) if has_pd else {}
    sizes = [str(s) for s in plan["imap_sizes"]]
    for op, label in (
        ("select", "SELECT"),
        ("search", "UID SEARCH HEADER Message-ID"),
        ("fetch", "UID FETCH one message BODY.PEEK[]"),
    ):
        for size in sizes:
            ours = costs[size][f"{op}_p50"]
            theirs = pd_costs[size][f"{op}_p50"] if size in pd_costs else None
            target, met, ratio, ratio_of = "", None, _ratio(theirs, ours), "x faster"
            if op == "fetch" and size == sizes[-1]:
                ratio = ours / costs[sizes[0]]["fetch_p50"]
                ratio_of = f"x the {sizes[0]}-message cost"
                target, met = "<= 1.5x", ratio <= 1.5
            if op == "search" and size == sizes[-1] and theirs is not None:
                target, met = "faster than Dovecot", ours < theirs
            note = f"first {costs[size][f'{op}_first'] * MS:.2f} ms"
            if theirs is not None:
                note += f"; Dovecot first {pd_costs[size][f'{op}_first'] * MS:.2f} ms"
            res.add(
                "IMAP cost",
                f"{label} at {int(size):,} messages",
                ours * MS,
                "ms",
                postfix_dovecot=theirs * MS if theirs is not None else None,
                ratio=ratio,
                ratio_of=ratio_of,
                target=target,
                met=met,
                note=note,
            )

    mem = data["memory"]
    res.add(
        "memory",
        "stack idle RSS (2 domains, every listener)",
        mem["idle"] / MIB,
        "MiB",
        target="< 40 MiB",
        met=mem["idle"] / MIB < 40,
        note=f"bare interpreter {mem['bare_interpreter'] / MIB:.1f} MiB",
    )
    fill = mem["fill"]
    ratio = fill["delta"] / fill["raw_bytes"]
    res.add(
        "memory",
        f"RSS growth for {fill['count']:,} stored 4 KB messages (store.deliver)",
        fill["delta"] / MIB,
        "MiB",
        ratio=ratio,
        ratio_of="x raw size",
        target="< 1.5x raw",
        met=ratio < 1.5,
        note=f"raw {fill['raw_bytes'] / MIB:.1f} MiB; filled in {fill['seconds']:.2f} s",
    )
    sf = mem["smtp_fill"]
    res.add(
        "memory",
        f"RSS growth for {sf['count']:,} 4 KB messages through SMTP 465",
        sf["delta"] / MIB,
        "MiB",
        ratio=sf["delta"] / sf["raw_bytes"],
        ratio_of="x raw size",
        note=f"50 per connection, {sf['count'] / sf['seconds']:.0f} msg/s",
    )
    bg = mem["big"]
    ratio = bg["delta"] / bg["bytes"]
    res.add(
        "memory",
        f"peak RSS growth, {bg['bytes'] / 1e6:.0f} MB message round trip",
        bg["delta"] / MIB,
        "MiB",
        ratio=ratio,
        ratio_of="x its size",
        target="< 3x size",
        met=ratio < 3,
        note=f"peak {bg['peak'] / MIB:.1f} MiB from {bg['baseline'] / MIB:.1f} MiB; "
        f"{bg['seconds']:.2f} s" + ("" if bg["reset"] else "; VmHWM not reset"),
    )
    if has_pd:
        res.add("start", "Postfix+Dovecot start (realstack)", pd["start"] * MS, "ms")
    return res


def _steps_note(value: dict[str, Any]) -> str:
    """Per-step p50s of a lean round trip, in ms, for the notes."""
    steps = value.get("steps_p50", {})
    names = (
        ("smtp_connect", "465 TCP+TLS"),
        ("smtp_session", "SMTP"),
        ("retrieve_connect", "retrieval TCP+TLS"),
        ("retrieve_first_look", "login+first look"),
        ("wait", "wait"),
        ("fetch", "fetch"),
        ("cleanup", "clean-up (not in total)"),
    )
    parts = [f"{label} {steps[k] * MS:.2f}" for k, label in names if k in steps]
    if "looks" in value.get("steps_max", {}):
        parts.append(f"looks p50 {steps['looks']:.0f} max {value['steps_max']['looks']:.0f}")
    return "steps p50 (ms): " + ", ".join(parts)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "/s":
        return f"{value:.0f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def render(res: Results) -> str:
    header = ("figure", "ours", "unit", "Postfix+Dovecot", "ratio", "target", "met")
    lines = []
    table: list[tuple[str, ...]] = []
    section = ""
    for row in res.rows:
        if row.section != section:
            section = row.section
            table.append((f"[{section}]", "", "", "", "", "", ""))
        ratio = f"{row.ratio:.2f} {row.ratio_of}" if row.ratio is not None else ""
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.append(
            (
                row.name,
                _fmt(row.ours, row.unit),
                row.unit,
                _fmt(row.postfix_dovecot, row.unit),
                ratio,
                row.target,
                met,
            )
        )
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    widths[0] = min(widths[0], 72)

    def line(cells: tuple[str, ...]) -> str:
        parts = [cells[0][:72].ljust(widths[0])]
        parts += [
            c.rjust(widths[i]) if i in (1, 3) else c.ljust(widths[i])
            for i, c in enumerate(cells)
            if i
        ]
        return "  ".join(parts).rstrip()

    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [line(r) for r in table]
    notes = [f"  {r.name}: {r.note}" for r in res.rows if r.note]
    m = res.raw["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['cpu']} x{m['cpus']}, {m['memory']}, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['openssl']}; {m['date']}; commit {m['commit']}; "
        f"load average {m['load_average']} at start, {m.get('load_average_end', '?')} "
        "at end"
    )
    judged = [r for r in res.rows if r.met is not None]
    lines.append(f"targets met: {sum(bool(r.met) for r in judged)} of {len(judged)}")
    lines.append("notes:")
    lines += notes
    return "\n".join(lines)


def to_json(res: Results) -> dict[str, Any]:
    return {
        "machine": res.raw["machine"],
        "plan": res.raw["plan"],
        "rows": [asdict(r) for r in res.rows],
        "targets": [
            {
                "name": r.name,
                "target": r.target,
                "met": r.met,
                "ours": r.ours,
                "unit": r.unit,
                "ratio": r.ratio,
            }
            for r in res.rows
            if r.met is not None
        ],
        "raw": res.raw,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure roundtrip against the loopback floor and Postfix + Dovecot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            Results and how each figure is taken: docs/benchmarks.md.
            Postfix + Dovecot run only where roundtrip.realstack can start them (root and the
            Debian packages postfix dovecot-imapd dovecot-pop3d dovecot-lmtpd)."""),
    )
    parser.add_argument("--quick", action="store_true", help="smoke version: small counts")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--no-postfix", action="store_true", help="skip Postfix + Dovecot")
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    began = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    data = collect(plan, with_postfix=not args.no_postfix, log=log)
    data["elapsed"] = time.perf_counter() - began
    data["machine"]["load_average_end"] = machine()["load_average"]
    res = build_rows(data)
    print(render(res))
    print(f"elapsed: {data['elapsed']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(res), fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
