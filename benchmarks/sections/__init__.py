"""The sections of the benchmark, one module each, in the order their rows are printed.

Each module measures (``measure``), turns its figures into rows (``rows``; the latency module
has two sets, ``lean_rows`` and ``probe_rows``), and declares in ``METRICS`` the metrics its
rows can carry, for ``benchmarks.targets`` to judge.
"""

from __future__ import annotations

from types import ModuleType

from benchmarks.sections import (
    auth,
    floor,
    imap_cost,
    inprocess,
    latency,
    load,
    memory,
    paired,
    postfix,
    start,
    startup,
    throughput,
    web,
)

SECTIONS: tuple[ModuleType, ...] = (
    floor,
    start,
    startup,
    inprocess,
    latency,
    paired,
    throughput,
    imap_cost,
    auth,
    web,
    memory,
    postfix,
    load,
)

__all__ = ["SECTIONS"]
