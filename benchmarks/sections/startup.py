"""Section "startup": what a pytest session pays before and for its first test, and idle RSS.

Run alone with ``python -m benchmarks.run --only startup``. Every figure comes from fresh
interpreters running a copy of the package (``inprocess._package_copy``), first on their path:

- phases: ``import pytest`` and the plugin (what every session pays when the plugin is
  installed, before ``pytest_sessionstart``), ``import roundtrip.stack``, a new CA, then
  ``MailStack(config, ca=ca).start()``; wall and CPU time of each, the number of modules
  loaded, and ``VmRSS``/``VmHWM`` from ``/proc/self/status`` once the stack idles
  (``gc.collect()`` first), in an interpreter that imported pytest (as a session does) and in
  one that did not (as section "memory" counts a stack);
- first test: pytest sessions of one test using ``mailstack`` and one not; a small plugin
  takes the time from ``pytest_sessionstart`` to the first test's body. The figure is the
  difference, with the package's bytecode cached ("on": ``__pycache__`` written by a warm-up
  session) and not ("off": ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__``);
- per test: sessions of 1 and ``1 + K`` tests, each with and without ``mailstack``; the
  fixture's cost per later test is ``((with K+1 - with 1) - (without K+1 - without 1)) / K``.

``BENCH_PACKAGE=DIR`` measures the ``roundtrip`` package under ``DIR`` instead of this
checkout's (say, ``git archive`` of another commit), for before/after comparisons.

Each figure is the best of ``repeat`` sessions or interpreters: on a shared machine the
fastest run is the one least disturbed by others; CPU time is reported beside wall time for
the same reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks._common import DOMAINS, MIB, MS, REPO, Plan, child_env
from benchmarks._report import Results
from benchmarks.sections.inprocess import _drop_bytecode
from benchmarks.targets import target_for

#: No metric: the judged rows of these figures are in sections "start" and "memory".
METRICS: tuple[str, ...] = ()

SECTION = "startup: fresh interpreters, the package's own copy"

#: Modules a test that only submits and reads mail should not need loaded when the stack idles.
HEAVY = (
    "aiosmtplib",
    "dns.resolver",
    "email.headerregistry",
    "imapclient",
    "roundtrip.probes.roundtrip",
    "roundtrip.servers.relay",
    "roundtrip.protocols._mime",
    "roundtrip.protocols.dkim",
    "roundtrip.protocols.dmarc",
    "trustme",
    "cryptography.x509",
)

_PHASES_CHILD = """
import gc, json, sys, time
def now():
    return time.perf_counter(), time.process_time()
def status():
    with open("/proc/self/status", encoding="ascii") as fh:
        got = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) * 1024 for k, v in got.items()}
marks = {"begin": now()}
bare = status()
if sys.argv[1] == "pytest":
    import pytest, roundtrip.pytest_plugin
marks["plugin"] = now()
plugin_modules = len(sys.modules)
from roundtrip.config import StackConfig
from roundtrip.stack import MailStack
marks["stack_import"] = now()
from roundtrip.certs import CertificateAuthority
ca = CertificateAuthority()
marks["ca"] = now()
stack = MailStack(StackConfig(domains=tuple(sys.argv[2:])), ca=ca).start()
marks["start"] = now()
stack.reset()
marks["reset"] = now()
gc.collect()
idle = status()
heavy = [m for m in json.loads(sys.stdin.read()) if m in sys.modules]
stack.stop()
import roundtrip
print(json.dumps({"marks": marks, "bare": bare, "idle": idle, "modules": len(sys.modules),
                  "plugin_modules": plugin_modules, "heavy": heavy, "file": roundtrip.__file__}))
"""

_TIMER = """
import json, os, time
_T = {"first_body": None}
def _now():
    return [time.perf_counter(), time.process_time()]
def pytest_sessionstart(session):
    _T["start"] = _now()
def pytest_runtest_call(item):
    if _T["first_body"] is None:
        _T["first_body"] = _now()
def pytest_sessionfinish(session, exitstatus):
    _T["end"] = _now()
    with open(os.environ["BENCH_TIMER_OUT"], "w") as fh:
        json.dump(_T, fh)
"""


def _package_copy(workdir: str) -> str:
    """A copy of the package (this checkout's, or ``$BENCH_PACKAGE``'s) without bytecode."""
    src = os.path.join(workdir, "src")
    shutil.copytree(
        os.path.join(os.environ.get("BENCH_PACKAGE") or REPO, "roundtrip"),
        os.path.join(src, "roundtrip"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return src


def _env(src: str, workdir: str, bytecode: bool) -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([src, workdir, env["PYTHONPATH"]])
    env.pop("ROUNDTRIP_LOOP", None)
    env.pop("ROUNDTRIP_CERT_CACHE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)  # bytecode next to the copy's sources, or none
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def phases(workdir: str, src: str, with_pytest: bool, repeat: int) -> dict[str, Any]:
    """The fastest of ``repeat`` fresh interpreters: import, CA, start, idle RSS."""
    best: dict[str, Any] | None = None
    for _ in range(repeat):
        proc = subprocess.run(
            [sys.executable, "-c", _PHASES_CHILD, "pytest" if with_pytest else "bare", *DOMAINS],
            input=json.dumps(HEAVY),
            cwd=workdir,
            env=_env(src, workdir, bytecode=True),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if not got["file"].startswith(src):
            raise RuntimeError(f"measured {got['file']}, not the copy in {src}")
        marks = got["marks"]
        total = marks["start"][0] - marks["plugin"][0]
        got["steps"] = {
            name: [marks[name][i] - marks[prev][i] for i in (0, 1)]
            for prev, name in zip(
                ("begin", "plugin", "stack_import", "ca", "start"),
                ("plugin", "stack_import", "ca", "start", "reset"),
                strict=True,
            )
        }
        if best is None or total < best["total"]:
            best = {**got, "total": total}
    assert best is not None
    return best


def _session(workdir: str, src: str, tests: int, fixture: bool, bytecode: bool) -> dict[str, Any]:
    name = f"test_{tests}_{'stack' if fixture else 'empty'}.py"
    with open(os.path.join(workdir, name), "w", encoding="ascii") as fh:
        fh.write(
            "import pytest\n\n\n"
            f"@pytest.mark.parametrize('i', range({tests}))\n"
            f"def test_it(i{', mailstack' if fixture else ''}):\n"
            "    assert i >= 0\n"
        )
    out = os.path.join(workdir, "timer.json")
    env = _env(src, workdir, bytecode)
    env["BENCH_TIMER_OUT"] = out
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_startup_timer"]
    proc = subprocess.run(
        [*cmd, "-p", "no:randomly", name],
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
        data = json.load(fh)
    start, body, end = data["start"], data["first_body"], data["end"]
    return {
        "to_body": body[0] - start[0],
        "to_body_cpu": body[1] - start[1],
        "session": end[0] - start[0],
    }


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return min(runs, key=lambda r: r[key])


def first_test(workdir: str, src: str, repeat: int) -> dict[str, Any]:
    """Session start to the first test's body, with ``mailstack`` minus without; per mode."""
    out: dict[str, Any] = {}
    for bytecode in (False, True):  # cached last: later figures reuse the caches
        _drop_bytecode(src)
        if bytecode:
            _session(workdir, src, 1, True, True)  # warm-up: writes the caches
        runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for _ in range(repeat):
            for fixture in (False, True):
                runs[fixture].append(_session(workdir, src, 1, fixture, bytecode))
        with_, without = _best(runs[True], "to_body"), _best(runs[False], "to_body")
        cpu_with, cpu_without = _best(runs[True], "to_body_cpu"), _best(runs[False], "to_body_cpu")
        out["on" if bytecode else "off"] = {
            "first_test": with_["to_body"] - without["to_body"],
            "first_test_cpu": cpu_with["to_body_cpu"] - cpu_without["to_body_cpu"],
            "empty": without["to_body"],
        }
    return out


def per_test(workdir: str, src: str, repeat: int, later: int) -> dict[str, Any]:
    """The fixture's cost per test after the first, bytecode cached."""
    best: dict[tuple[int, bool], float] = {}
    for _ in range(repeat):
        for tests in (1, 1 + later):
            for fixture in (False, True):
                got = _session(workdir, src, tests, fixture, True)["session"]
                best[tests, fixture] = min(got, best.get((tests, fixture), got))
    with_ = best[1 + later, True] - best[1, True]
    without = best[1 + later, False] - best[1, False]
    return {"per_test": (with_ - without) / later, "later": later}


def measure(plan: Plan) -> dict[str, Any]:
    repeat = 2 if plan.quick else 5
    with tempfile.TemporaryDirectory(prefix="rt-bench-startup-") as workdir:
        with open(os.path.join(workdir, "_startup_timer.py"), "w", encoding="ascii") as fh:
            fh.write(_TIMER)
        with open(os.path.join(workdir, "pytest.ini"), "w", encoding="ascii") as fh:
            fh.write("[pytest]\n")
        src = _package_copy(workdir)
        out = {"first_test": first_test(workdir, src, repeat)}
        out["per_test"] = per_test(workdir, src, repeat, 20 if plan.quick else 100)
        out["phases"] = phases(workdir, src, True, repeat)
        out["phases_bare"] = phases(workdir, src, False, repeat)
    return out


def rows(res: Results, data: dict[str, Any]) -> None:
    got = data.get("startup")
    if not got:
        return
    first_bound = target_for("start.first_test").text
    for mode, label in (("on", "bytecode cached"), ("off", "not cached")):
        f = got["first_test"][mode]
        res.add(
            SECTION,
            f"first test: start to its body, mailstack minus none ({label})",
            f["first_test"] * MS,
            "ms",
            note=f"CPU {f['first_test_cpu'] * MS:.0f} ms; empty session to body "
            f"{f['empty'] * MS:.1f} ms; issue bound {first_bound} (cached)",
        )
    pt = got["per_test"]
    res.add(
        SECTION,
        f"per test after the first ({pt['later']} more tests, bytecode cached)",
        pt["per_test"] * MS,
        "ms",
        note=f"issue bound {target_for('start.per_test_after_first').text}",
    )
    ph = got["phases"]
    labels = {
        "plugin": "import pytest + roundtrip.pytest_plugin",
        "stack_import": "import roundtrip.stack",
        "ca": "CertificateAuthority()",
        "start": "MailStack().start() (2 domains, every listener, self-check)",
        "reset": "first reset()",
    }
    for step, label in labels.items():
        wall, cpu = ph["steps"][step]
        note = f"CPU {cpu * MS:.1f} ms"
        if step == "plugin":
            note += f"; {ph['plugin_modules']} modules loaded"
        if step == "start":
            note += f"; {ph['modules']} modules loaded; heavy: {', '.join(ph['heavy']) or 'none'}"
        res.add(SECTION, f"phase: {label}", wall * MS, "ms", note=note)
    idle_bound = target_for("memory.idle_rss").text
    for key, label in (("phases", "with pytest imported"), ("phases_bare", "no pytest")):
        p = got[key]
        res.add(
            SECTION,
            f"idle RSS of a started stack ({label})",
            p["idle"]["VmRSS"] / MIB,
            "MiB",
            note=f"VmHWM {p['idle']['VmHWM'] / MIB:.1f} MiB; bare interpreter "
            f"{p['bare']['VmRSS'] / MIB:.1f} MiB; issue bound {idle_bound}",
        )
