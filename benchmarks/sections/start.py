"""Section "start": the stack's start in-process, and what the pytest fixture costs.

The stack starts in this process (new CA, leaf certificates, every listener of two domains),
because that is how a pytest session uses it; its first start also times a round trip with
client and stack in one process, as a test runs it. The fixture's cost comes from pytest
subprocesses of N tests with and without ``mailstack``: a small plugin times
``pytest_sessionstart`` to ``pytest_sessionfinish``, so interpreter start-up is not in it.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks._common import DOMAINS, MS, Plan, Target, child_env
from benchmarks._loops import latency, lean_latency
from benchmarks._report import Results
from roundtrip.config import Endpoint

METRICS = ("start.first_test", "start.per_test_after_first")


def _in_process_target(stack: Any) -> Target:
    """Two users of the first domain of a running ``MailStack``, over implicit TLS."""
    a, b = stack.user(DOMAINS[0]), stack.user(DOMAINS[0])
    ea = stack.endpoints(DOMAINS[0])

    def ep(proto: str, service: str, user: Any) -> Endpoint:
        return Endpoint(
            proto, "implicit", ea.host, ea.ports[service], user.address, user.password, ea.hostname
        )

    return Target(
        ep("smtp", "submissions", a),
        ep("imap", "imaps", b),
        ep("pop3", "pop3s", b),
        stack.ca_file,
        a.address,
        b.address,
    )


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
            target = _in_process_target(stack)
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
    env = child_env()
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


def _best_sessions(plan: Plan) -> dict[tuple[int, bool], dict[str, Any]]:
    """The fastest of ``pytest_repeat`` sessions per (tests, with mailstack)."""
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
    return best


def fixture_overhead(plan: Plan) -> dict[str, Any]:
    """pytest sessions of N tests with and without ``mailstack``; best of ``pytest_repeat``."""
    best = _best_sessions(plan)
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


def rows(res: Results, data: dict[str, Any]) -> None:
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
        metric="start.first_test",
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
        note=f"setup+teardown p50 {fx['per_test_setup_teardown_p50'] * MS:.3f} ms/test",
        metric="start.per_test_after_first",
    )
