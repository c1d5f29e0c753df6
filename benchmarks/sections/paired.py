"""Section "round trip targets": floor and servers sampled in turn (paired).

On a shared machine the speed drifts within seconds; figures taken one after the other
(floor first, Postfix+Dovecot a minute later) carry that drift into their ratios. Here every
round takes a short block of samples of each kind (the floor, our same-domain and
cross-domain round trips, Postfix+Dovecot's), in a rotating order, so all of them see the
same machine; the ratios are of the medians, and the round-trip targets are judged on them.
A second stack with the sender checks off (no DKIM signature at submission) is sampled too:
the work the harness's Postfix+Dovecot do, shown beside the target's row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks._common import (
    DOMAINS,
    MS,
    TIMEOUT,
    Plan,
    pct,
    ratio,
    real_target,
    server_child,
    stack_target,
)
from benchmarks._lean import lean_round_trip
from benchmarks._report import Results
from benchmarks.sections.floor import tls_context, tls_sample
from benchmarks.sections.latency import TLS_CONNECTIONS

METRICS = ("paired.same_vs_floor", "paired.cross_vs_floor", "paired.same_vs_postfix_dovecot")

SECTION = "round trip targets: floor and servers sampled in turn (paired)"


@contextmanager
def _real_server(with_postfix: bool) -> Iterator[Any]:
    """A started ``RealMailServer``, or None where it cannot run (or is not wanted)."""
    from benchmarks._realstack import RealMailServer

    if not (with_postfix and RealMailServer.is_available()[0]):
        yield None
        return
    server = RealMailServer(users={"alice": "alice-" + os.urandom(6).hex()})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _sample(jobs: dict[str, Callable[[], float]], latency_n: int) -> dict[str, list[float]]:
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
    drop, keep = (10, 30) if latency_n >= 100 else (3, 5)
    rounds = max(1, -(-latency_n // keep))
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            got = [jobs[name]() for _ in range(drop + keep)]
            samples[name].extend(got[drop:])
    return samples


def measure(plan: Plan, users: list[str], with_postfix: bool) -> dict[str, Any]:
    """The target ratios from interleaved samples: floor, ours, (Postfix+Dovecot), repeated."""
    out: dict[str, Any] = {"n": plan.latency_n}
    # The floor's echo server in a child of its own, as in section "floor": never sharing a
    # process (or a GIL) with the stack.
    with (
        _real_server(with_postfix) as server,
        server_child() as child,
        server_child() as plain_child,
        server_child() as echo,
    ):
        start = child.call("start", domains=list(DOMAINS), users=users)
        # The same work as Postfix+Dovecot here (the harness gives them no DKIM, SPF or DMARC).
        plain_start = plain_child.call(
            "start", domains=list(DOMAINS), users=users, dkim=False, sender_auth=False
        )
        info = echo.call("echo")
        floor_ctx = tls_context(info["ca_file"])
        floor_addr = ("127.0.0.1", info["tls_port"])
        same = stack_target(start, DOMAINS[0], DOMAINS[0])
        cross = stack_target(start, DOMAINS[0], DOMAINS[1])
        ours_ctx = same.context()
        plain = stack_target(plain_start, DOMAINS[0], DOMAINS[0])
        plain_ctx = plain.context()
        jobs: dict[str, Callable[[], float]] = {
            "floor": lambda: tls_sample(floor_addr, floor_ctx, info["name"])[0],
            "same": lambda: lean_round_trip(same, ours_ctx, "imap", TIMEOUT)["total"],
            "cross": lambda: lean_round_trip(cross, ours_ctx, "imap", TIMEOUT)["total"],
            "same_plain": lambda: lean_round_trip(plain, plain_ctx, "imap", TIMEOUT)["total"],
        }
        if server is not None:
            theirs = real_target(server)
            theirs_ctx = theirs.context()
            jobs["postfix_dovecot"] = lambda: lean_round_trip(theirs, theirs_ctx, "imap", TIMEOUT)[
                "total"
            ]
        samples = _sample(jobs, plan.latency_n)
    for name, values in samples.items():
        out[name] = {"p50": pct(values, 50), "p95": pct(values, 95)}
    out["n"] = len(samples["floor"])
    return out


def rows(res: Results, data: dict[str, Any]) -> None:
    """The rows that carry the round-trip targets, from the interleaved samples."""
    got = data.get("paired")
    if not got:
        return
    floor = got["floor"]["p50"]
    res.add(
        SECTION,
        "TLS 1.3 handshake + 1 round trip p50 (floor, paired)",
        floor * MS,
        "ms",
        note=f"p95 {got['floor']['p95'] * MS:.2f} ms; {got['n']} samples of each, in blocks",
    )
    for key, label in (
        ("same", "same domain, IMAPS"),
        ("cross", "cross domain (DNS + relay), IMAPS"),
    ):
        res.add(
            SECTION,
            f"{label} p50 (paired)",
            got[key]["p50"] * MS,
            "ms",
            ratio=got[key]["p50"] / (TLS_CONNECTIONS[key] * floor),
            ratio_of="x its floor",
            note=f"p95 {got[key]['p95'] * MS:.2f} ms"
            + ("; the relay's MX connection is reused (2 s cache)" if key == "cross" else ""),
            metric=f"paired.{key}_vs_floor",
        )
    theirs = got.get("postfix_dovecot")
    res.add(
        SECTION,
        "same domain IMAPS vs Postfix+Dovecot p50 (paired)",
        got["same"]["p50"] * MS,
        "ms",
        postfix_dovecot=theirs["p50"] * MS if theirs else None,
        ratio=ratio(theirs["p50"], got["same"]["p50"]) if theirs else None,
        ratio_of="x faster",
        note=f"Postfix+Dovecot p95 {theirs['p95'] * MS:.2f} ms" if theirs else "not installed",
        metric="paired.same_vs_postfix_dovecot",
    )
    plain = got.get("same_plain")
    if plain:
        res.add(
            SECTION,
            "same domain IMAPS, sender checks off, vs Postfix+Dovecot p50 (paired)",
            plain["p50"] * MS,
            "ms",
            postfix_dovecot=theirs["p50"] * MS if theirs else None,
            ratio=ratio(theirs["p50"], plain["p50"]) if theirs else None,
            ratio_of="x faster",
            note=f"p95 {plain['p95'] * MS:.2f} ms; a second stack with StackConfig(dkim=False, "
            "sender_auth=False): no DKIM signature at submission, the work the harness's "
            "Postfix+Dovecot do",
        )
