"""Sections "round trip: lean client" and "round trip: validator probe".

Round trips against the stack in a server child, from this process: same domain and across
domains (DNS + relay), IMAPS and POP3S, each with the lean client (``benchmarks._lean``,
exactly the issue's round trip) and with the validator's probe (which also verifies, cleans
up and reports). The stack child's CPU per round trip is read from ``/proc``. A second child
with ``relay_connection_cache=0`` gives the cross-domain round trip with a fresh relay
connection per message. Ratios are to the floor (section "floor") times the TLS connections
the round trip needs: 2 for the same domain, 3 across domains.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks._common import DOMAINS, MS, Plan, ratio, server_child, stack_target
from benchmarks._loops import latency, lean_latency
from benchmarks._report import Results

#: The targets on these round trips are judged on the paired rows (section "paired").
METRICS: tuple[str, ...] = ()

LEAN_SECTION = "round trip: lean client (benchmarks/_lean.py)"
PROBE_SECTION = "round trip: validator probe, with verification and clean-up"
LABELS = (
    ("same_imap", "same domain, IMAPS"),
    ("same_pop3", "same domain, POP3S"),
    ("cross_imap", "cross domain (DNS + relay), IMAPS"),
    ("cross_pop3", "cross domain (DNS + relay), POP3S"),
)
#: TLS connections per round trip: 465 + retrieval; across domains also the relay's.
TLS_CONNECTIONS = {"same": 2, "cross": 3}


def measure(plan: Plan, users: list[str], data: dict[str, Any]) -> None:
    """Fill ``data["latency"]``, ``data["probe_latency"]`` and ``data["child_start"]``."""
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        data["child_start"] = start["start_seconds"]
        same = stack_target(start, DOMAINS[0], DOMAINS[0])
        cross = stack_target(start, DOMAINS[0], DOMAINS[1])
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
        cold = stack_target(start, DOMAINS[0], DOMAINS[1])
        data["latency"]["cross_imap_cold"] = lean_latency(
            cold, "imap", plan.latency_n, child.proc.pid
        )


def _floors(data: dict[str, Any]) -> dict[str, float]:
    tls_floor: float = data["floor"]["tls_handshake_rtt_p50"]
    return {kind: conns * tls_floor for kind, conns in TLS_CONNECTIONS.items()}


def _postfix_dovecot(data: dict[str, Any]) -> dict[str, Any] | None:
    """Postfix + Dovecot's figures, or None when they were not measured."""
    pd = data.get("postfix_dovecot") or {}
    return None if "skipped" in pd else pd


def _skipped(data: dict[str, Any]) -> str:
    return str((data.get("postfix_dovecot") or {}).get("skipped", ""))


def steps_note(value: dict[str, Any]) -> str:
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


def _lean_floor_rows(res: Results, data: dict[str, Any]) -> None:
    lat, floors = data["latency"], _floors(data)
    for key, label in LABELS:
        value = lat[key]
        kind = key.split("_")[0]
        res.add(
            LEAN_SECTION,
            f"{label} p50",
            value["p50"] * MS,
            "ms",
            ratio=value["p50"] / floors[kind],
            ratio_of="x its floor",
            note=f"p95 {value['p95'] * MS:.2f} ms; floor {floors[kind] * MS:.2f} ms; "
            + steps_note(value),
        )
    cold = lat.get("cross_imap_cold")
    if cold is not None:
        res.add(
            LEAN_SECTION,
            "cross domain, IMAPS, a fresh relay connection per message p50",
            cold["p50"] * MS,
            "ms",
            ratio=cold["p50"] / floors["cross"],
            ratio_of="x its floor",
            note=f"relay_connection_cache=0 (the row above reuses the relay's MX connection); "
            f"p95 {cold['p95'] * MS:.2f} ms; " + steps_note(cold),
        )
    inproc = data["start"]["in_process_imap"]
    inproc_probe = data["start"].get("in_process_imap_probe") or {}
    res.add(
        LEAN_SECTION,
        "same domain, IMAPS, client in the stack's process p50",
        inproc["p50"] * MS,
        "ms",
        ratio=inproc["p50"] / floors["same"],
        ratio_of="x its floor",
        note=f"p95 {inproc['p95'] * MS:.2f} ms (as a pytest test runs); validator probe p50 "
        f"{inproc_probe.get('p50', float('nan')) * MS:.2f} ms",
    )


def _lean_comparison_rows(res: Results, data: dict[str, Any]) -> None:
    lat, pd = data["latency"], _postfix_dovecot(data)
    for key, label in (("imap", "IMAPS"), ("pop3", "POP3S")):
        ours = lat[f"same_{key}"]["p50"]
        theirs_data = pd[f"latency_{key}"] if pd is not None else None
        theirs = theirs_data["p50"] if theirs_data else None
        res.add(
            LEAN_SECTION,
            f"same domain {label} vs Postfix+Dovecot p50",
            ours * MS,
            "ms",
            postfix_dovecot=theirs * MS if theirs else None,
            ratio=ratio(theirs, ours),
            ratio_of="x faster",
            note=(
                f"Postfix+Dovecot p95 {theirs_data['p95'] * MS:.2f} ms; " + steps_note(theirs_data)
                if theirs_data
                else _skipped(data)
            ),
        )
    for key, label in LABELS:
        value = lat[key]
        if "server_cpu_per_round_trip" not in value:
            continue
        cpu = value["server_cpu_per_round_trip"]
        res.add(
            LEAN_SECTION,
            f"server CPU per round trip, {label.replace(' (DNS + relay)', '')} (stack child)",
            cpu * MS,
            "ms",
            ratio=cpu / value["mean_wall"],
            ratio_of="of the wall time",
            note=f"utime+stime of the stack's process over {value['n']} round trips "
            f"(clock tick {MS / os.sysconf('SC_CLK_TCK'):.0f} ms); mean wall "
            f"{value['mean_wall'] * MS:.2f} ms",
        )


def lean_rows(res: Results, data: dict[str, Any]) -> None:
    """The lean client's rows: against the floor, in-process, against Postfix+Dovecot, CPU."""
    _lean_floor_rows(res, data)
    _lean_comparison_rows(res, data)


def probe_rows(res: Results, data: dict[str, Any]) -> None:
    """The validator's probe, for comparison with earlier runs.

    It also parses and verifies the message, deletes it (STORE, EXPUNGE / DELE), and times its
    own reporting.
    """
    probe, floors, pd = data["probe_latency"], _floors(data), _postfix_dovecot(data)
    for key, label in LABELS:
        value = probe[key]
        cpu = value.get("server_cpu_per_round_trip")
        res.add(
            PROBE_SECTION,
            f"probe: {label} p50",
            value["p50"] * MS,
            "ms",
            ratio=value["p50"] / floors[key.split("_")[0]],
            ratio_of="x its floor",
            note=f"p95 {value['p95'] * MS:.2f} ms"
            + (f"; server CPU {cpu * MS:.2f} ms per round trip" if cpu is not None else ""),
        )
    inproc_probe = data["start"].get("in_process_imap_probe") or {}
    if inproc_probe:
        res.add(
            PROBE_SECTION,
            "probe: same domain, IMAPS, client in the stack's process p50",
            inproc_probe["p50"] * MS,
            "ms",
            ratio=inproc_probe["p50"] / floors["same"],
            ratio_of="x its floor",
            note=f"p95 {inproc_probe['p95'] * MS:.2f} ms",
        )
    for key, label in (("imap", "IMAPS"), ("pop3", "POP3S")):
        ours = probe[f"same_{key}"]["p50"]
        theirs_data = pd.get(f"probe_latency_{key}") if pd is not None else None
        theirs = theirs_data["p50"] if theirs_data else None
        res.add(
            PROBE_SECTION,
            f"probe: same domain {label} vs Postfix+Dovecot p50",
            ours * MS,
            "ms",
            postfix_dovecot=theirs * MS if theirs else None,
            ratio=ratio(theirs, ours),
            ratio_of="x faster",
            note=(
                f"Postfix+Dovecot p95 {theirs_data['p95'] * MS:.2f} ms"
                if theirs_data
                else _skipped(data)
            ),
        )
