"""The performance targets of issue "Performance", each stated once.

Every target names the metric it reads (a row of the table carries that metric: see
``benchmarks._report.Results.add``), a comparison, a bound and a unit. The target column of
the printed table (``PerfTarget.text``) and the yes/NO verdict (``PerfTarget.judge``) are both
derived from this table and nothing else; a section only says which row carries which metric.

A target whose unit starts with ``x`` judges the row's ratio (``1.5x floor``: the round trip
over its floor); any other unit judges the row's figure itself, in that unit (``40 MiB``).
A row whose value is missing (Postfix + Dovecot not installed) shows its target and no verdict.
docs/benchmarks.md ("Targets: met and missed") discusses each target and the latest figures.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TARGETS", "PerfTarget", "is_judged", "target_for"]

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class PerfTarget:
    """One target: ``metric op bound unit``, with where it comes from."""

    #: Short name, unique in ``TARGETS``.
    name: str
    #: The metric it reads, ``<section>.<figure>``; exactly one row carries it.
    metric: str
    #: One of ``<``, ``<=``, ``>``, ``>=``.
    op: str
    bound: float
    #: ``ms``/``MiB`` judge the row's figure; ``x ...`` judges the row's ratio.
    unit: str
    #: Why this bound: the words of the issue it comes from.
    source: str
    #: Shown in parentheses after the bound (what the ratio is taken against).
    detail: str = ""

    def __post_init__(self) -> None:
        if self.op not in _COMPARISONS:
            raise ValueError(f"target {self.name!r}: op {self.op!r}, expected {_COMPARISONS}")

    @property
    def reads_ratio(self) -> bool:
        """True when the target judges the row's ratio rather than its figure."""
        return self.unit.startswith("x")

    @property
    def text(self) -> str:
        """The target column of the table: ``< 50 ms``, ``<= 1.5x floor (2 TLS conns)``."""
        sep = "" if self.reads_ratio else " "
        text = f"{self.op} {self.bound:g}{sep}{self.unit}"
        return f"{text} ({self.detail})" if self.detail else text

    def judge(self, value: float | None) -> bool | None:
        """True if ``value`` meets the target, False if it misses, None if there is no value."""
        if value is None or math.isnan(value):
            return None
        return _COMPARISONS[self.op](value, self.bound)


_ISSUE = 'issue "Performance": '

_LOAD = (
    'issue "Performance, round two": end-to-end throughput, 10,000 messages over 32 '
    "connections across two domains, stored and readable: "
)

TARGETS: tuple[PerfTarget, ...] = (
    PerfTarget(
        "first test",
        "start.first_test",
        "<",
        50,
        "ms",
        _ISSUE + "the first test using mailstack costs under 50 ms over an empty session",
    ),
    PerfTarget(
        "per test after the first",
        "start.per_test_after_first",
        "<",
        1,
        "ms",
        _ISSUE + "every later test pays under 1 ms for the fixture",
    ),
    PerfTarget(
        "same-domain round trip",
        "paired.same_vs_floor",
        "<=",
        1.5,
        "x floor",
        _ISSUE + "a same-domain round trip (465 + IMAPS) within 1.5x the cost of the TLS "
        "connections it needs",
        detail="2 TLS conns",
    ),
    PerfTarget(
        "cross-domain round trip",
        "paired.cross_vs_floor",
        "<=",
        2,
        "x floor",
        _ISSUE + "a cross-domain round trip (DNS + relay) within 2x its TLS connections",
        detail="3 TLS conns",
    ),
    PerfTarget(
        "same-domain round trip in-process",
        "inprocess.same_vs_floor",
        "<=",
        1.5,
        "x floor",
        'issue "Performance, round two": the same-domain round trip within 1.5x its floor '
        "in-process too (the stack on its loop thread, the client in the test's process)",
        detail="2 TLS conns, in-process",
    ),
    PerfTarget(
        "cross-domain round trip in-process",
        "inprocess.cross_vs_floor",
        "<=",
        2,
        "x floor",
        'issue "Performance, round two": the cross-domain round trip within 2x its floor '
        "in-process too",
        detail="3 TLS conns, in-process",
    ),
    PerfTarget(
        "round trip vs Postfix+Dovecot",
        "paired.same_vs_postfix_dovecot",
        ">=",
        3,
        "x faster",
        _ISSUE + "the same round trip at least 3x faster than a loopback Postfix + Dovecot",
    ),
    PerfTarget(
        "throughput at 8 clients",
        "throughput.clients_8_vs_postfix_dovecot",
        ">=",
        1.2,
        "x",
        _ISSUE + "with 8 concurrent clients, at least 1.2x Postfix + Dovecot's round trips/s",
    ),
    PerfTarget(
        "UID FETCH against mailbox size",
        "imap_cost.fetch_largest_vs_smallest",
        "<=",
        1.5,
        "x",
        _ISSUE + "fetching one message from the largest mailbox costs at most 1.5x what it "
        "costs from the smallest",
    ),
    PerfTarget(
        "SEARCH HEADER Message-ID vs Dovecot",
        "imap_cost.search_largest_vs_dovecot",
        ">",
        1,
        "x faster",
        _ISSUE + "UID SEARCH HEADER Message-ID in the largest mailbox faster than Dovecot's",
    ),
    PerfTarget(
        "IMAP at the largest mailbox vs Dovecot",
        "imap_cost.slowest_vs_dovecot",
        ">=",
        1,
        "x faster",
        'issue "Performance, round two": at 100,000 messages in a mailbox, no IMAP operation '
        "slower than Dovecot's (the slowest of the section's operations, p50)",
    ),
    PerfTarget(
        "idle stack RSS",
        "memory.idle_rss",
        "<",
        40,
        "MiB",
        _ISSUE + "a started stack of two domains, idle, under 40 MiB resident",
    ),
    PerfTarget(
        "stored messages RSS",
        "memory.stored_vs_raw",
        "<",
        1.5,
        "x raw",
        _ISSUE + "stored 4 KB messages grow RSS by under 1.5x their raw size",
    ),
    PerfTarget(
        "big message peak RSS",
        "memory.big_peak_vs_size",
        "<",
        3,
        "x size",
        _ISSUE + "a big message's round trip raises peak RSS by under 3x its size",
    ),
    PerfTarget(
        "big message peak RSS across domains",
        "memory.big_cross_peak_vs_size",
        "<",
        3,
        "x size",
        _ISSUE + "the cross-domain big-message round trip (through the relay) under 3x its "
        "size as well",
        detail="across domains",
    ),
    PerfTarget(
        "load end to end vs Postfix+Dovecot",
        "load.end_to_end_vs_postfix_dovecot",
        ">=",
        2,
        "x Postfix+Dovecot",
        _LOAD + ">= 2x Postfix+Dovecot's end-to-end rate measured in the same run",
        detail="end to end",
    ),
    PerfTarget(
        "load end to end without Postfix+Dovecot",
        "load.end_to_end",
        ">=",
        500,
        "/s",
        _LOAD + "at least 500/s where Postfix+Dovecot cannot run",
    ),
    PerfTarget(
        "load: none lost",
        "load.lost",
        "<=",
        0,
        "messages",
        _LOAD + "with zero lost",
        detail="lost",
    ),
    PerfTarget(
        "load: none duplicated",
        "load.duplicated",
        "<=",
        0,
        "messages",
        _LOAD + "with zero duplicated",
        detail="duplicated",
    ),
)

_BY_METRIC = {t.metric: t for t in TARGETS}


def target_for(metric: str) -> PerfTarget:
    """The target that reads ``metric``; KeyError names the known metrics."""
    try:
        return _BY_METRIC[metric]
    except KeyError:
        raise KeyError(f"no target reads metric {metric!r}; known: {sorted(_BY_METRIC)}") from None


def is_judged(metric: str) -> bool:
    """Whether some target reads ``metric`` (a section offers metrics; the table picks)."""
    return metric in _BY_METRIC
