"""The benchmark's paired section (``benchmarks/sections/paired.py``): its rows.

No figure is asserted; the rows must judge the targets on the default stack's samples and
show the stack without sender checks beside Postfix+Dovecot, unjudged.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks._report import Results, render
from benchmarks.sections import paired


def _rows(got: dict[str, Any]) -> tuple[Results, str]:
    machine = dict.fromkeys(
        ("cpu", "cpus", "memory", "kernel", "python", "openssl", "date", "commit"), "x"
    )
    data = {"machine": machine | {"load_average": "0"}, "plan": {"quick": False}, "paired": got}
    res = Results(raw=data)
    paired.rows(res, data)
    return res, render(res)


def _p(ms: float) -> dict[str, float]:
    return {"p50": ms / 1000, "p95": ms / 1000}


def test_bench_paired_rows_show_the_stack_without_sender_checks_beside_theirs() -> None:
    got = {"n": 30, "floor": _p(2.0), "same": _p(9.0), "cross": _p(12.0)}
    got |= {"postfix_dovecot": _p(15.0), "same_plain": _p(5.0)}
    res, text = _rows(got)
    judged = res.judged["paired.same_vs_postfix_dovecot"]
    assert judged.ratio == pytest.approx(15.0 / 9.0) and judged.met is False
    (plain,) = [r for r in res.rows if "sender checks off" in r.name]
    assert plain.ours == pytest.approx(5.0) and plain.ratio == pytest.approx(3.0)
    assert not plain.target and plain.name in text  # shown, not judged
    assert "dkim=False" in plain.note


def test_bench_paired_rows_without_the_second_stack_or_postfix() -> None:
    got = {"n": 30, "floor": _p(2.0), "same": _p(5.0), "cross": _p(12.0)}
    res, _ = _rows(got)
    assert not [r for r in res.rows if "sender checks off" in r.name]
    assert res.judged["paired.same_vs_postfix_dovecot"].met is None
    res, _ = _rows(got | {"same_plain": _p(4.0)})
    (plain,) = [r for r in res.rows if "sender checks off" in r.name]
    assert plain.postfix_dovecot is None and plain.ratio is None
