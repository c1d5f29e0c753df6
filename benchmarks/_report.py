"""The table: rows, their targets and verdicts (from ``benchmarks.targets``), text and JSON.

A section adds rows with ``Results.add``; a row that carries a metric gets the target column
and the yes/NO verdict from the one target that reads that metric, never from the section.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import ssl
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._common import REPO
from benchmarks.targets import target_for


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
    #: The row that carries each judged metric.
    judged: dict[str, Row] = field(default_factory=dict)

    def add(
        self,
        section: str,
        name: str,
        ours: float | None,
        unit: str,
        *,
        postfix_dovecot: float | None = None,
        ratio: float | None = None,
        ratio_of: str = "",
        note: str = "",
        metric: str = "",
    ) -> Row:
        """Add a row; with ``metric``, its target and verdict come from ``benchmarks.targets``."""
        row = Row(section, name, ours, unit, postfix_dovecot, ratio, ratio_of, note=note)
        if metric:
            target = target_for(metric)
            if metric in self.judged:
                raise ValueError(f"metric {metric!r} carried by two rows: {name!r}")
            if not target.reads_ratio and target.unit != unit:
                raise ValueError(
                    f"row {name!r} is in {unit!r}, target {metric!r} in {target.unit!r}"
                )
            row.target = target.text
            row.met = target.judge(ratio if target.reads_ratio else ours)
            self.judged[metric] = row
        self.rows.append(row)
        return row


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("/s", "messages"):
        return f"{value:.0f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


_HEADER = ("figure", "ours", "unit", "Postfix+Dovecot", "ratio", "target", "met")


def _cells(res: Results) -> list[tuple[str, ...]]:
    """One tuple per table line: a ``[section]`` line whenever the section changes, then rows."""
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
                fmt(row.ours, row.unit),
                row.unit,
                fmt(row.postfix_dovecot, row.unit),
                ratio,
                row.target,
                met,
            )
        )
    return table


def render(res: Results) -> str:
    table = _cells(res)
    widths = [max(len(r[i]) for r in [_HEADER, *table]) for i in range(len(_HEADER))]
    widths[0] = min(widths[0], 72)

    def line(cells: tuple[str, ...]) -> str:
        parts = [cells[0][:72].ljust(widths[0])]
        parts += [
            c.rjust(widths[i]) if i in (1, 3) else c.ljust(widths[i])
            for i, c in enumerate(cells)
            if i
        ]
        return "  ".join(parts).rstrip()

    lines = [line(_HEADER), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in table]
    m = res.raw["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['cpu']} x{m['cpus']}, {m['memory']}, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['openssl']}; {m['date']}; commit {m['commit']}; "
        f"load average {m['load_average']} at start, {m.get('load_average_end', '?')} "
        f"at end; stack children's event loop: {m.get('loop', '?')}"
    )
    judged = [r for r in res.rows if r.met is not None]
    lines.append(f"targets met: {sum(bool(r.met) for r in judged)} of {len(judged)}")
    lines.append("notes:")
    lines += [f"  {r.name}: {r.note}" for r in res.rows if r.note]
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


def machine() -> dict[str, Any]:
    """CPU, memory, kernel, Python, OpenSSL, date, commit and load average of this run."""
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
        "loop": _loop(),
    }


def _loop() -> str:
    """The loop a stack child runs on: ``ROUNDTRIP_LOOP`` as the children inherit it, and
    what ``auto`` (the default) finds installed. The in-process section measures both."""
    import importlib.util

    from roundtrip.config import loop_choice

    choice = loop_choice()
    if choice == "auto":
        found = importlib.util.find_spec("uvloop") is not None
        return (
            f"auto ({'uvloop' if found else 'asyncio'}: uvloop {'' if found else 'not '}installed)"
        )
    return choice
