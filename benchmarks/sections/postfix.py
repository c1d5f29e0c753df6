"""Postfix + Dovecot: the same figures against ``benchmarks._realstack.RealMailServer``.

The validator's integration harness (implicit-TLS submission with AUTH PLAIN, LMTP into
Maildir, IMAPS/POP3S) with the same lean client, the same probe, the same throughput
clients and the same IMAP costs. Its figures land in the other sections' rows, beside ours;
this section's own row is its start time. It runs only where ``RealMailServer`` can start
(root and the Debian packages); otherwise every comparison says why.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import time
from typing import Any

from benchmarks._common import MS, Plan, real_target
from benchmarks._loops import latency, lean_latency
from benchmarks._report import Results
from benchmarks._server import make_message
from benchmarks.sections.imap_cost import imap_costs, open_imap
from benchmarks.sections.throughput import throughput

#: This section carries no target of its own (its figures are compared in the others).
METRICS: tuple[str, ...] = ()


def _fill_maildir(server: Any, login: str, first: int, count: int, size: int) -> None:
    """Write messages straight into a Dovecot Maildir (``cur/``, seen), owned by nobody."""
    nobody = pwd.getpwnam("nobody")
    local, _, domain = server.mailbox_address(login).partition("@")
    root = os.path.join(server.workdir, "mail")
    path = root
    for part in (domain, local, "Maildir"):
        path = os.path.join(path, part)
        os.makedirs(path, exist_ok=True)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        os.chown(os.path.join(path, sub), nobody.pw_uid, nobody.pw_gid)
    stamp = int(time.time())
    for i in range(first, first + count):
        raw = make_message(i, size)
        name = os.path.join(path, "cur", f"{stamp}.M{i}P{os.getpid()}.bench,S={len(raw)}:2,S")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chown(name, nobody.pw_uid, nobody.pw_gid)


def _versions() -> dict[str, str]:
    found = {}
    for name, cmd in (
        ("postfix", ["/usr/sbin/postconf", "-dh", "mail_version"]),
        ("dovecot", ["/usr/sbin/dovecot", "--version"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found[name] = subprocess.run(
                cmd, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
    return found


def _measure_running(plan: Plan, server: Any, big_pw: str, out: dict[str, Any]) -> None:
    target = real_target(server)
    out["latency_imap"] = lean_latency(target, "imap", plan.latency_n)
    out["latency_pop3"] = lean_latency(target, "pop3", plan.latency_n)
    out["probe_latency_imap"] = latency(target, "imap", plan.latency_n)
    out["probe_latency_pop3"] = latency(target, "pop3", plan.latency_n)
    out["throughput"] = {
        str(c): throughput(target, c, plan.throughput_seconds, plan.throughput_warmup)
        for c in plan.throughput_clients
    }
    out["imap_costs"] = dovecot_imap_costs(plan, server, big_pw)
    out["versions"] = _versions()


def dovecot_imap_costs(plan: Plan, server: Any, big_pw: str) -> dict[str, Any]:
    """The IMAP cost section's figures against Dovecot (user ``big``, Maildir filled here)."""
    user = server.mailbox_address("big")
    return imap_costs(
        lambda: open_imap(
            server.host,
            server.ports["imaps"],
            server.ca.ca_file(),
            server.hostname,
            user,
            big_pw,
        ),
        lambda first, count: _fill_maildir(server, "big", first, count, plan.fill_size),
        plan.imap_sizes,
        plan.imap_repeat,
    )


def measure_imap(plan: Plan) -> dict[str, Any]:
    """Dovecot's IMAP costs alone (``--only imap``), or ``{"skipped": reason}``."""
    from benchmarks._realstack import RealMailServer

    ok, reason = RealMailServer.is_available()
    if not ok:
        return {"skipped": reason}
    big_pw = "big-" + os.urandom(6).hex()
    server = RealMailServer(users={"big": big_pw})
    server.start()
    try:
        return {"imap_costs": dovecot_imap_costs(plan, server, big_pw), "versions": _versions()}
    finally:
        server.stop()


def measure(plan: Plan) -> dict[str, Any]:
    """Every comparison figure, or ``{"skipped": reason}``."""
    from benchmarks._realstack import RealMailServer

    ok, reason = RealMailServer.is_available()
    if not ok:
        return {"skipped": reason}
    big_pw = "big-" + os.urandom(6).hex()
    server = RealMailServer(users={"alice": "alice-" + os.urandom(6).hex(), "big": big_pw})
    started = time.perf_counter()
    server.start()
    out: dict[str, Any] = {"start": time.perf_counter() - started}
    try:
        _measure_running(plan, server, big_pw, out)
    finally:
        server.stop()
    return out


def rows(res: Results, data: dict[str, Any]) -> None:
    pd = data.get("postfix_dovecot") or {}
    if "skipped" not in pd:
        res.add("start", "Postfix+Dovecot start (realstack)", pd["start"] * MS, "ms")
