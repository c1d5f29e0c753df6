"""Section "in-process": the stack as a pytest session runs it, on each event loop.

The stack runs on its loop thread in this process and the client (the lean client of
``benchmarks/_lean.py``) in the main thread, as a test's ``smtplib`` runs beside the
``mailstack`` fixture: one process, one GIL, two threads. Each round trip submits on 465
with AUTH and then either waits in ``MailStack.wait_for`` (what most tests do) or fetches over
IMAPS (the lean client's search, IDLE and fetch); to a user of the same domain and of the
other one (DNS + relay); after a ``reset()`` (what the ``mailstack`` fixture does before
every test; the reset itself is not timed, its own p50 is in the note) and without one (the
relay's cached MX connection and DNS answers stay warm; the store is emptied after each
sample, untimed, so mailboxes do not grow). One stack per event loop (asyncio's, and
uvloop's when it is installed), all started before sampling; the floor's echo server runs in
a child process as in section "floor". Every kind is sampled in blocks in a rotating order,
the first samples of each block dropped (as section "paired"), so the loops and the floor see
the same machine and their ratios can be compared.

The section also times: ``MailStack().start()`` on each loop (new CA and leaves); the first
test of a pytest session (one test using ``mailstack`` minus one test without it, as section
"start", with the package's bytecode cached and not); and the idle RSS of a started stack in a
fresh interpreter, per loop.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks._common import DOMAINS, MIB, MS, REPO, TIMEOUT, Plan, Target, child_env, pct
from benchmarks._lean import lean_round_trip, lean_submit
from benchmarks._report import Results
from benchmarks.sections.floor import tls_context, tls_sample
from benchmarks.sections.paired import _sample
from benchmarks.sections.start import _TIMER_PLUGIN
from roundtrip.config import Endpoint

METRICS = ("inprocess.same_vs_floor", "inprocess.cross_vs_floor")

SECTION = "in-process (pytest's use): stack on its loop thread, client in the same process"

#: TLS connections a round trip needs, for its floor: wait_for needs only the 465 one.
_TLS = {("same", "imaps"): 2, ("cross", "imaps"): 3, ("same", "wait_for"): 1}
_TLS[("cross", "wait_for")] = 2


def loops() -> list[str]:
    """The event loops this machine can run the stack on: asyncio's, and uvloop if installed."""
    found = ["asyncio"]
    if importlib.util.find_spec("uvloop") is not None:
        found.append("uvloop")
    return found


@contextlib.contextmanager
def _loop_env(loop: str) -> Iterator[None]:
    """``ROUNDTRIP_LOOP=loop`` while a stack starts (its ``LoopThread`` reads it)."""
    before = os.environ.get("ROUNDTRIP_LOOP")
    os.environ["ROUNDTRIP_LOOP"] = loop
    try:
        yield
    finally:
        if before is None:
            del os.environ["ROUNDTRIP_LOOP"]
        else:
            os.environ["ROUNDTRIP_LOOP"] = before


def _start(loop: str) -> tuple[Any, float]:
    from roundtrip.config import StackConfig
    from roundtrip.stack import MailStack

    with _loop_env(loop):
        began = time.perf_counter()
        stack = MailStack(StackConfig(domains=DOMAINS))
        stack.start()
        return stack, time.perf_counter() - began


def _target(stack: Any, src: str, dst: str) -> Target:
    """``user@src`` submits on its domain's 465; ``user@dst`` reads over its domain's IMAPS."""
    sender, rcpt = stack.user(src), stack.user(dst)
    es, ed = stack.endpoints(src), stack.endpoints(dst)

    def ep(e: Any, proto: str, service: str, user: Any) -> Endpoint:
        return Endpoint(
            proto, "implicit", e.host, e.ports[service], user.address, user.password, e.hostname
        )

    return Target(
        ep(es, "smtp", "submissions", sender),
        ep(ed, "imap", "imaps", rcpt),
        ep(ed, "pop3", "pop3s", rcpt),
        stack.ca_file,
        sender.address,
        rcpt.address,
    )


def _job(
    stack: Any, target: Target, fetch: str, reset: bool, resets: list[float]
) -> Callable[[], float]:
    ctx = stack.client_context()

    def once() -> float:
        if reset:
            began = time.perf_counter()
            stack.reset()
            resets.append(time.perf_counter() - began)
        if fetch == "imaps":
            total = lean_round_trip(target, ctx, "imap", TIMEOUT)["total"]
        else:
            began = time.perf_counter()
            subject, _ = lean_submit(target, ctx, TIMEOUT)
            stack.wait_for(to=target.rcpt_to, subject=subject, timeout=TIMEOUT)
            total = time.perf_counter() - began
        if not reset:
            stack.store.clear()  # untimed: mailboxes must not grow from sample to sample
        return total

    return once


def round_trips(plan: Plan) -> dict[str, Any]:
    """Every kind of in-process round trip on every loop, and the floor, in rotating blocks."""
    from benchmarks._common import server_child

    stacks: dict[str, Any] = {}
    starts: dict[str, list[float]] = {loop: [] for loop in loops()}
    resets: dict[str, list[float]] = {}
    try:
        # Start times first, alternating loops (a stack per start, stopped again).
        for _ in range(plan.start_n):
            for loop in loops():
                stack, seconds = _start(loop)
                starts[loop].append(seconds)
                stack.stop()
                gc.collect()
        for loop in loops():
            stacks[loop] = _start(loop)[0]
        with server_child() as echo:
            info = echo.call("echo")
            floor_ctx = tls_context(info["ca_file"])
            floor_addr = ("127.0.0.1", info["tls_port"])
            jobs: dict[str, Callable[[], float]] = {
                "floor": lambda: tls_sample(floor_addr, floor_ctx, info["name"])[0]
            }
            for loop, stack in stacks.items():
                for dest, dst in (("same", DOMAINS[0]), ("cross", DOMAINS[1])):
                    target = _target(stack, DOMAINS[0], dst)
                    for fetch in ("wait_for", "imaps"):
                        for mode in ("reset", "kept"):
                            key = f"{loop}/{dest}/{fetch}/{mode}"
                            resets[key] = []
                            jobs[key] = _job(stack, target, fetch, mode == "reset", resets[key])
            samples = _sample(jobs, plan.latency_n)
    finally:
        for stack in stacks.values():
            stack.stop()
    out: dict[str, Any] = {"loops": loops(), "n": len(samples["floor"])}
    out["start"] = {
        loop: {"p50": statistics.median(v), "max": max(v)} for loop, v in starts.items()
    }
    out["samples"] = {name: {"p50": pct(v, 50), "p95": pct(v, 95)} for name, v in samples.items()}
    out["reset_p50"] = {name: pct(v, 50) for name, v in resets.items() if v}
    return out


# --- first test of a pytest session -----------------------------------------------------------


def _package_copy(workdir: str) -> str:
    """A copy of the package without bytecode, first on the sessions' path.

    With it the "bytecode off" sessions compile the package from source every time (as a
    fresh checkout under ``PYTHONDONTWRITEBYTECODE=1`` does) while the standard library and
    the dependencies keep their installed bytecode; the "on" sessions cache into it.
    """
    src = os.path.join(workdir, "src")
    shutil.copytree(
        os.path.join(REPO, "roundtrip"),
        os.path.join(src, "roundtrip"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return src


def _session(workdir: str, src: str, fixture: bool, bytecode: bool) -> dict[str, float]:
    name = f"test_first_{'stack' if fixture else 'empty'}.py"
    body = (
        "import roundtrip\n\n\n"
        f"def test_it({'mailstack' if fixture else ''}):\n"
        f"    assert roundtrip.__file__.startswith({src!r})\n"
    )
    with open(os.path.join(workdir, name), "w", encoding="ascii") as fh:
        fh.write(body)
    out = os.path.join(workdir, "timer.json")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([src, workdir, env["PYTHONPATH"]])
    env["BENCH_TIMER_OUT"] = out
    env.pop("ROUNDTRIP_LOOP", None)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_bench_timer"]
    began = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "-p", "no:randomly", name],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"pytest session {name} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(out, encoding="ascii") as fh:
        data = json.load(fh)
    return {"session": data["end"] - data["start"], "wall": wall}


def _drop_bytecode(src: str) -> None:
    for root, dirs, _files in os.walk(src):
        for d in dirs:
            if d == "__pycache__":
                shutil.rmtree(os.path.join(root, d))


def first_test(plan: Plan) -> dict[str, Any]:
    """One test with ``mailstack`` minus one without, bytecode cached and not; best of N."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rt-bench-first-") as workdir:
        with open(os.path.join(workdir, "_bench_timer.py"), "w", encoding="ascii") as fh:
            fh.write(_TIMER_PLUGIN)
        with open(os.path.join(workdir, "pytest.ini"), "w", encoding="ascii") as fh:
            fh.write("[pytest]\n")
        src = _package_copy(workdir)
        # The quick (CI smoke) run keeps to the cached case: each session costs seconds.
        for bytecode in (True,) if plan.quick else (False, True):
            _drop_bytecode(src)
            if bytecode:
                _session(workdir, src, True, True)  # warm: writes the caches
            best: dict[bool, dict[str, float]] = {}
            for _ in range(plan.pytest_repeat):
                for fixture in (False, True):
                    got = _session(workdir, src, fixture, bytecode)
                    if fixture not in best or got["session"] < best[fixture]["session"]:
                        best[fixture] = got
            out["on" if bytecode else "off"] = {
                "first_test": best[True]["session"] - best[False]["session"],
                "session_with": best[True]["session"],
                "session_without": best[False]["session"],
                "wall_with": best[True]["wall"],
                "wall_without": best[False]["wall"],
            }
    return out


# --- idle RSS -----------------------------------------------------------------------------------

_RSS_CHILD = """
import gc, json, sys, time
began = time.perf_counter()
from roundtrip.config import StackConfig
from roundtrip.stack import MailStack
imported = time.perf_counter()
stack = MailStack(StackConfig(domains=tuple(sys.argv[1:])))
stack.start()
started = time.perf_counter()
gc.collect()
with open("/proc/self/status", encoding="ascii") as fh:
    rss = [int(line.split()[1]) for line in fh if line.startswith("VmRSS:")][0]
stack.stop()
print(json.dumps({"rss_kib": rss, "import": imported - began, "start": started - imported}))
"""


def idle(plan: Plan) -> dict[str, Any]:
    """A fresh interpreter per sample: import, start, ``gc.collect()``, VmRSS; per loop."""
    out: dict[str, Any] = {}
    repeat = 1 if plan.quick else 3
    for loop in loops()[:1] if plan.quick else loops():
        got = []
        for _ in range(repeat):
            env = child_env()
            env["ROUNDTRIP_LOOP"] = loop
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # the package's bytecode cached
            proc = subprocess.run(
                [sys.executable, "-c", _RSS_CHILD, *DOMAINS],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out[loop] = {
            "rss_mib": statistics.median(g["rss_kib"] for g in got) * 1024 / MIB,
            "import": statistics.median(g["import"] for g in got),
            "start": statistics.median(g["start"] for g in got),
        }
    return out


def measure(plan: Plan) -> dict[str, Any]:
    return {"round_trips": round_trips(plan), "first_test": first_test(plan), "idle": idle(plan)}


# --- rows -----------------------------------------------------------------------------------------


def rows(res: Results, data: dict[str, Any]) -> None:
    got = data.get("inprocess")
    if not got:
        return
    rt = got["round_trips"]
    s = rt["samples"]
    floor = s["floor"]["p50"]
    res.add(
        SECTION,
        "TLS 1.3 handshake + 1 round trip p50 (floor, sampled in turn)",
        floor * MS,
        "ms",
        note=f"{rt['n']} samples of each kind below, in blocks, first of each block dropped",
    )
    default = rt["loops"][0]
    for loop in rt["loops"]:
        st = rt["start"][loop]
        res.add(
            SECTION,
            f"[{loop}] MailStack().start() p50 (new CA, 2 domains)",
            st["p50"] * MS,
            "ms",
            note=f"max {st['max'] * MS:.1f} ms",
        )
        for dest, dest_label in (("same", "same domain"), ("cross", "cross domain")):
            for fetch, fetch_label in (("wait_for", "wait_for"), ("imaps", "IMAPS fetch")):
                for mode, mode_label in (("reset", "after reset()"), ("kept", "no reset")):
                    key = f"{loop}/{dest}/{fetch}/{mode}"
                    fig = s[key]
                    note = f"p95 {fig['p95'] * MS:.2f} ms"
                    if key in rt["reset_p50"]:
                        note += f"; reset() itself p50 {rt['reset_p50'][key] * MS:.3f} ms"
                    if loop != default:
                        base = s[key.replace(loop, default, 1)]["p50"]
                        note += f"; {fig['p50'] / base:.2f}x {default}"
                    metric = ""
                    if loop == default and fetch == "imaps" and mode == "reset":
                        metric = f"inprocess.{dest}_vs_floor"
                    tls = _TLS[(dest, fetch)]
                    res.add(
                        SECTION,
                        f"[{loop}] {dest_label}, 465 + {fetch_label}, {mode_label} p50",
                        fig["p50"] * MS,
                        "ms",
                        ratio=fig["p50"] / (tls * floor),
                        ratio_of=f"x floor ({tls} TLS)",
                        note=note,
                        metric=metric,
                    )
    ft = got["first_test"]
    for mode, label in (("on", "bytecode cached"), ("off", "package not compiled")):
        if mode not in ft:
            continue
        f = ft[mode]
        res.add(
            SECTION,
            f"pytest: first test minus an empty session ({label})",
            f["first_test"] * MS,
            "ms",
            note=f"1 test using mailstack vs 1 without; whole process {f['wall_with'] * MS:.0f} "
            f"ms vs {f['wall_without'] * MS:.0f} ms",
        )
    for loop, fig in got["idle"].items():
        res.add(
            SECTION,
            f"[{loop}] idle RSS of a started MailStack (fresh interpreter)",
            fig["rss_mib"],
            "MiB",
            note=f"import {fig['import'] * MS:.0f} ms, start {fig['start'] * MS:.0f} ms",
        )
