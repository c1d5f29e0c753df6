"""roundtrip benchmark suite (issue "Performance").

Usage (from the repository root)::

    python -m benchmarks.run [--quick] [--json FILE] [--no-postfix]
        [--only inprocess|startup|auth|imap|memory|paired|load]

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
- Postfix + Dovecot is ``benchmarks._realstack.RealMailServer``, the validator's integration
  harness, with the same lean client, the same probe and the same throughput clients.
- The load section (``benchmarks/sections/load.py``) submits many messages across two domains
  to our stack and then to two relaying Postfix + Dovecot instances, with the same client.

Where the code is: each section measures and builds its rows in ``benchmarks/sections/``;
every target (bound, comparison, unit, why) is in ``benchmarks/targets.py``, the only place
a verdict comes from; ``benchmarks/_report.py`` prints the table and the JSON. This module
only runs the sections in order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # ``python benchmarks/run.py``
    sys.path.insert(0, REPO)

from benchmarks._common import DOMAINS, IMAP_USER, Plan  # noqa: E402
from benchmarks._report import Results, machine, render, to_json  # noqa: E402
from benchmarks.sections import (  # noqa: E402
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

_LOAD_LOG = "load: {n:,} messages over 32 connections, two domains, ours then Postfix+Dovecot"


def collect(
    plan: Plan, *, with_postfix: bool, log: Callable[[str], None], only: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {"plan": asdict(plan), "machine": machine()}
    if only == "inprocess":
        log("in-process round trips per loop, first test, idle RSS")
        data["inprocess"] = inprocess.measure(plan)
        return data
    if only == "startup":
        log("start-up: first test, per test, import/start phases, idle RSS (fresh interpreters)")
        data["startup"] = startup.measure(plan)
        return data
    if only == "auth":
        log("sender authentication per message: DKIM, ARC, SPF + DMARC (in-process)")
        data["auth"] = auth.measure(plan)
        return data
    if only == "imap":
        log("IMAP cost against mailbox size, ours then Dovecot's")
        data["imap_costs"] = imap_cost.measure(plan, [IMAP_USER])
        data["postfix_dovecot"] = (
            postfix.measure_imap(plan) if with_postfix else {"skipped": "--no-postfix"}
        )
        return data
    if only == "memory":
        log("memory (fresh stack children)")
        data["memory"] = memory.measure(plan)
        return data
    if only == "paired":
        log("paired samples: floor, same and cross domain, Postfix+Dovecot, interleaved")
        users = [f"user@{d}" for d in DOMAINS] + [IMAP_USER]
        data["paired"] = paired.measure(plan, users, with_postfix)
        return data
    if only == "load":
        log(_LOAD_LOG.format(n=plan.load_messages))
        data["load"] = load.measure(plan, with_postfix)
        return data
    log("floor: TLS 1.3 handshake + round trip, TCP round trip")
    data["floor"] = floor.measure(plan)
    log("stack start (in-process) and an in-process round trip")
    data["start"] = start.stack_start(plan, plan.latency_n)
    log("pytest sessions (fixture overhead)")
    data["fixture"] = start.fixture_overhead(plan)
    log("in-process round trips per loop (pytest's use), first test, idle RSS")
    data["inprocess"] = inprocess.measure(plan)
    log("round trips against the stack in a child process")
    users = [f"user@{d}" for d in DOMAINS] + [IMAP_USER]
    latency.measure(plan, users, data)
    log("IMAP cost against mailbox size")
    data["imap_costs"] = imap_cost.measure(plan, users)
    log("throughput (client processes against a fresh stack child)")
    data["throughput"] = throughput.measure(plan, users)
    log("sender authentication per message: DKIM sign/verify, SPF + DMARC (in-process)")
    data["auth"] = auth.measure(plan)
    log("web view: a mailbox of 10,000 messages over loopback (benchmarks.web)")
    data["web"] = web.measure(plan)
    log("memory (fresh stack children)")
    data["memory"] = memory.measure(plan)
    log("paired samples: floor, same and cross domain, Postfix+Dovecot, interleaved")
    data["paired"] = paired.measure(plan, users, with_postfix)
    if with_postfix:
        log("Postfix + Dovecot (benchmarks._realstack)")
        data["postfix_dovecot"] = postfix.measure(plan)
    else:
        data["postfix_dovecot"] = {"skipped": "--no-postfix"}
    log(_LOAD_LOG.format(n=plan.load_messages))
    data["load"] = load.measure(plan, with_postfix)
    return data


#: The row builders, in the order the table prints them.
ROW_BUILDERS: tuple[Callable[[Results, dict[str, Any]], None], ...] = (
    floor.rows,
    start.rows,
    inprocess.rows,
    latency.lean_rows,
    paired.rows,
    latency.probe_rows,
    throughput.rows,
    imap_cost.rows,
    auth.rows,
    web.rows,
    memory.rows,
    postfix.rows,
    load.rows,
)


def build_rows(data: dict[str, Any]) -> Results:
    """Turn the measurements into table rows with ratios, targets and verdicts."""
    res = Results(raw=data)
    builders: tuple[Callable[[Results, dict[str, Any]], None], ...] = ROW_BUILDERS
    if "floor" not in data:  # --only SECTION
        sections = (
            ("inprocess", inprocess.rows),
            ("startup", startup.rows),
            ("auth", auth.rows),
            ("imap_costs", imap_cost.rows),
            ("memory", memory.rows),
            ("paired", paired.rows),
            ("load", load.rows),
        )
        builders = tuple(build for key, build in sections if key in data)
    for build in builders:
        build(res, data)
    return res


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure roundtrip against the loopback floor and Postfix + Dovecot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            Results and how each figure is taken: docs/benchmarks.md.
            Postfix + Dovecot run only where benchmarks._realstack can start them (root and the
            Debian packages postfix dovecot-imapd dovecot-pop3d dovecot-lmtpd)."""),
    )
    parser.add_argument("--quick", action="store_true", help="smoke version: small counts")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--no-postfix", action="store_true", help="skip Postfix + Dovecot")
    parser.add_argument(
        "--only",
        choices=("inprocess", "startup", "auth", "imap", "memory", "paired", "load"),
        help="run one section: inprocess = the stack in this process on each event loop "
        "(round trips with wait_for and IMAPS, after reset() and not), first test, idle RSS; "
        "startup = first test and per-test cost with bytecode cached and not, the import and "
        "start phases, idle RSS (fresh interpreters); auth = DKIM sign/verify, ARC "
        "seal/validate, SPF + DMARC per message; imap = SELECT, SEARCH, FETCH against "
        "mailbox size up to 100,000 messages, ours and Dovecot's; paired = the round-trip "
        "targets: the floor, our same- and cross-domain round trips (and with the sender "
        "checks off) and Postfix+Dovecot's, sampled in turn; load = 10,000 messages "
        "(--quick: 500) over 32 connections across two domains, ours and then two relaying "
        "Postfix + Dovecot "
        "instances, submitted and end-to-end rates, lost and duplicated",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = Plan.make(args.quick)
    began = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    data = collect(plan, with_postfix=not args.no_postfix, log=log, only=args.only)
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
