"""Section "memory": the stack's resident size idle, filled, and around one big message.

Fresh stack children each time; ``VmRSS``/``VmHWM`` come from the child's
``/proc/self/status`` after ``gc.collect()``. Idle is right after start. Stored messages:
RSS growth after ``store.deliver`` of the plan's count, and separately the same kind of
messages submitted over 465 (50 per connection). Big message: ``VmHWM`` is reset
(``/proc/self/clear_refs`` 5), the message is submitted over 465, fetched over IMAPS and
deleted; the figure is the peak minus the RSS before. Twice: to the sender's own domain, and
to the other domain through the relay, which holds its copy until the MX has stored the
message.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
import time
from typing import Any

from benchmarks._common import (
    DOMAINS,
    MIB,
    TIMEOUT,
    Plan,
    Target,
    server_child,
    stack_target,
    tune,
)
from benchmarks._report import Results
from benchmarks._server import make_message
from benchmarks.sections.imap_cost import check_ok, open_imap

METRICS = (
    "memory.idle_rss",
    "memory.stored_vs_raw",
    "memory.big_peak_vs_size",
    "memory.big_cross_peak_vs_size",
)

#: The listener caps commands per connection (abuse limits), so 50 messages each.
_PER_CONNECTION = 50


def _smtps(target: Target, ctx: ssl.SSLContext) -> smtplib.SMTP:
    client = smtplib.SMTP_SSL(target.smtp.host, target.smtp.port, context=ctx, timeout=TIMEOUT)
    assert client.sock is not None
    tune(client.sock)
    client.login(target.smtp.user, target.smtp.password)
    return client


def _idle_and_stored(plan: Plan, users: list[str], out: dict[str, Any]) -> None:
    """Idle, then messages stored directly in the store."""
    with server_child() as child:
        child.call("start", domains=list(DOMAINS), users=users)
        idle = child.call("rss")
        out["bare_interpreter"] = idle["bare"]["VmRSS"]
        out["idle"] = idle["VmRSS"]
        fill = child.call("fill", user=users[0], count=plan.fill_count, size=plan.fill_size)
        filled = child.call("rss")
        raw_size = plan.fill_count * len(make_message(plan.fill_count // 2, plan.fill_size))
        out["fill"] = {
            "count": plan.fill_count,
            "raw_bytes": raw_size,
            "rss_after": filled["VmRSS"],
            "delta": filled["VmRSS"] - idle["VmRSS"],
            "seconds": fill["seconds"],
        }


def _smtp_fill(plan: Plan, users: list[str]) -> dict[str, Any]:
    """The same kind of messages through SMTP (465, AUTH)."""
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        target = stack_target(start, DOMAINS[0], DOMAINS[0])
        before = child.call("rss")
        ctx = target.context()
        started = time.perf_counter()
        for first in range(0, plan.smtp_fill_count, _PER_CONNECTION):
            with _smtps(target, ctx) as client:
                for i in range(first, min(first + _PER_CONNECTION, plan.smtp_fill_count)):
                    client.sendmail(
                        target.mail_from, [target.rcpt_to], make_message(i, plan.fill_size)
                    )
        seconds = time.perf_counter() - started
        after = child.call("rss")
    return {
        "count": plan.smtp_fill_count,
        "raw_bytes": plan.smtp_fill_count * len(make_message(0, plan.fill_size)),
        "delta": after["VmRSS"] - before["VmRSS"],
        "seconds": seconds,
    }


def _fetch_and_delete(target: Target, message_id: str) -> bytes:
    imap = open_imap(
        target.imap.host,
        target.imap.port,
        target.ca_file,
        target.imap.server_name,
        target.imap.user,
        target.imap.password,
    )
    try:
        check_ok(imap.select("INBOX"))
        deadline = time.monotonic() + TIMEOUT
        while True:  # across domains the relay may still be delivering it
            _, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{message_id}"')
            if data[0].split() or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # sleep-ok: the client polls to a deadline, as the load section
        uid = data[0].split()[0].decode()
        _, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        got: bytes = data[0][1]
        imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
        imap.expunge()
        imap.logout()
    finally:
        with contextlib.suppress(OSError):
            imap.sock.close()
    return got


def _big_message(plan: Plan, users: list[str], *, cross: bool = False) -> dict[str, Any]:
    """Peak while one big message goes through (submit on 465, fetch over IMAPS, delete),
    to the sender's own domain or (``cross``) through the relay to the other domain's MX."""
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        target = stack_target(start, DOMAINS[0], DOMAINS[1] if cross else DOMAINS[0])
        base = child.call("reset_peak")
        big = make_message(0, plan.big_size, tag="big")
        started = time.perf_counter()
        ctx = target.context()
        with _smtps(target, ctx) as client:
            client.sendmail(target.mail_from, [target.rcpt_to], big)
        got = _fetch_and_delete(target, "<big-0@roundtrip.bench>")
        seconds = time.perf_counter() - started
        if len(got) < len(big):
            raise RuntimeError(f"big message came back short: {len(got)} of {len(big)} bytes")
        peak = child.call("rss")
    return {
        "bytes": len(big),
        "baseline": base["VmRSS"],
        "reset": base["reset"],
        "peak": peak["VmHWM"],
        "delta": peak["VmHWM"] - base["VmRSS"],
        "seconds": seconds,
    }


def measure(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    users = [f"user@{d}" for d in DOMAINS]
    _idle_and_stored(plan, users, out)
    out["smtp_fill"] = _smtp_fill(plan, users)
    out["big"] = _big_message(plan, users)
    out["big_cross"] = _big_message(plan, users, cross=True)
    return out


def rows(res: Results, data: dict[str, Any]) -> None:
    mem = data["memory"]
    res.add(
        "memory",
        "stack idle RSS (2 domains, every listener)",
        mem["idle"] / MIB,
        "MiB",
        note=f"bare interpreter {mem['bare_interpreter'] / MIB:.1f} MiB",
        metric="memory.idle_rss",
    )
    fill = mem["fill"]
    res.add(
        "memory",
        f"RSS growth for {fill['count']:,} stored 4 KB messages (store.deliver)",
        fill["delta"] / MIB,
        "MiB",
        ratio=fill["delta"] / fill["raw_bytes"],
        ratio_of="x raw size",
        note=f"raw {fill['raw_bytes'] / MIB:.1f} MiB; filled in {fill['seconds']:.2f} s",
        metric="memory.stored_vs_raw",
    )
    sf = mem["smtp_fill"]
    res.add(
        "memory",
        f"RSS growth for {sf['count']:,} 4 KB messages through SMTP 465",
        sf["delta"] / MIB,
        "MiB",
        ratio=sf["delta"] / sf["raw_bytes"],
        ratio_of="x raw size",
        note=f"{_PER_CONNECTION} per connection, {sf['count'] / sf['seconds']:.0f} msg/s",
    )
    for key, route, metric in (
        ("big", "", "memory.big_peak_vs_size"),
        ("big_cross", " across domains (relay hop)", "memory.big_cross_peak_vs_size"),
    ):
        if key not in mem:  # a results file written before the row existed
            continue
        bg = mem[key]
        res.add(
            "memory",
            f"peak RSS growth, {bg['bytes'] / 1e6:.0f} MB message round trip{route}",
            bg["delta"] / MIB,
            "MiB",
            ratio=bg["delta"] / bg["bytes"],
            ratio_of="x its size",
            note=f"peak {bg['peak'] / MIB:.1f} MiB from {bg['baseline'] / MIB:.1f} MiB; "
            f"{bg['seconds']:.2f} s" + ("" if bg["reset"] else "; VmHWM not reset"),
            metric=metric,
        )
