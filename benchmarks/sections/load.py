"""Section "load": many messages over 32 connections across two domains, ours and theirs.

Issue "Performance, round two" asks for end-to-end throughput (10,000 messages over 32
connections across two domains, stored and readable) of at least 2x Postfix + Dovecot's
end-to-end rate in the same run, or at least 500/s where Postfix + Dovecot cannot run, with
nothing lost and nothing duplicated. Both servers are measured here, one after the other,
with the same client in this process:

- Two domains, example.com and example.org, one user each. ``plan.load_messages`` messages,
  half example.com -> example.org and half the other way, so every message crosses the hop
  between the two domains' servers (SMTP with STARTTLS). They are submitted over 32
  concurrent implicit-TLS (465) connections with AUTH, each connection sending one domain's
  messages and reconnecting every 100 (the client shape of ``tests/test_load.py``).
- Every message carries a unique ``X-Load-Token`` header. From the last submission on, both
  recipient mailboxes are watched over IMAPS (``STATUS INBOX (MESSAGES)``) until every
  message is stored or the deadline passes. The rates count from the first connection: to
  the last 250 (submitted) and to the look that found everything stored (end to end).
- After a settle pause (outside the clock), every message's token header is fetched over
  IMAPS (``UID FETCH 1:* BODY.PEEK[HEADER.FIELDS (X-Load-Token)]``): each token accepted at
  submission must appear exactly once, in its recipient's mailbox.
- Ours: a MailStack of the two domains, default settings, in a server child
  (``benchmarks._server``), as in the other sections. Postfix + Dovecot: two
  ``benchmarks._realstack.RealMailServer`` instances, one per domain, each relaying the other
  domain's mail to the other's MX listener (``relay_to``, STARTTLS required); their
  configuration is the harness's own (``benchmarks/_realstack_config.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import imaplib
import os
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiosmtplib

from benchmarks._common import DOMAINS, Plan, ratio, server_child
from benchmarks._report import Results

METRICS = (
    "load.end_to_end_vs_postfix_dovecot",
    "load.end_to_end",
    "load.lost",
    "load.duplicated",
)

SECTION = "load: two domains, 32 connections, every message relayed"
CONNECTIONS = 32
#: Messages per SMTP session before reconnecting (as tests/test_load.py): inside the stack's
#: per-session command budget (``SMTPLimits.command_limits``, 1000 commands).
PER_SESSION = 100
TIMEOUT = 60.0
#: How often the recipient mailboxes are looked at while waiting for delivery.
_POLL = 0.05
#: Pause between "all stored" and the read-back, for a late duplicate to land (not timed).
_SETTLE = 1.0
_TOKEN = re.compile(rb"X-Load-Token: (\S+)")


@dataclass(frozen=True)
class Side:
    """One domain's server as the client sees it: its user and its listeners."""

    domain: str
    user: str
    password: str
    host: str
    submissions: int
    imaps: int


@dataclass(frozen=True)
class World:
    """Both domains' servers and the CA that issued their certificates."""

    sides: dict[str, Side]
    ca_file: str

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def _jobs(count: int) -> list[tuple[str, str, str]]:
    """``(sender domain, recipient domain, token)``, alternating directions."""
    first, second = DOMAINS
    return [
        (first, second, f"{i:06d}-{uuid.uuid4().hex[:12]}")
        if i % 2 == 0
        else (second, first, f"{i:06d}-{uuid.uuid4().hex[:12]}")
        for i in range(count)
    ]


def _message(sender: str, rcpt: str, token: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: load {token}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{token}@roundtrip.bench>\r\n"
        f"X-Load-Token: {token}\r\n\r\nbody {token}\r\n"
    ).encode("ascii")


class _Tally:
    """What the submitting workers share: accepted tokens and errors."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.errors: list[str] = []


async def _connect(side: Side, ctx: ssl.SSLContext) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname=side.host, port=side.submissions, use_tls=True, tls_context=ctx, timeout=TIMEOUT
    )
    await client.connect()
    await client.login(side.user, side.password)
    return client


async def _quit(client: aiosmtplib.SMTP) -> None:
    """QUIT; a connection that fails to close cleanly still delivered what it accepted."""
    try:
        await client.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        client.close()


async def _worker(
    world: World, mine: list[tuple[str, str, str]], ctx: ssl.SSLContext, tally: _Tally
) -> None:
    """Send ``mine`` over one connection at a time, a new one every ``PER_SESSION``."""
    client: aiosmtplib.SMTP | None = None
    current, sent = "", 0
    try:
        for src, dst, token in mine:
            sender, rcpt = world.sides[src], world.sides[dst]
            try:
                if client is None or sent >= PER_SESSION or src != current:
                    if client is not None:
                        await _quit(client)
                    client = None
                    client = await _connect(sender, ctx)
                    current, sent = src, 0
                await client.sendmail(
                    sender.user, [rcpt.user], _message(sender.user, rcpt.user, token)
                )
                sent += 1
                tally.accepted.append(token)
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                tally.errors.append(f"{token}: {exc!r}")
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            await _quit(client)
    finally:
        if client is not None and client.is_connected:
            client.close()


def _submit(world: World, jobs: list[tuple[str, str, str]]) -> _Tally:
    tally = _Tally()
    ctx = world.context()

    async def run() -> None:
        await asyncio.gather(
            *(_worker(world, jobs[k::CONNECTIONS], ctx, tally) for k in range(CONNECTIONS))
        )

    asyncio.run(run())
    return tally


@contextlib.contextmanager
def _imap(world: World, side: Side) -> Iterator[imaplib.IMAP4_SSL]:
    imap = imaplib.IMAP4_SSL(side.host, side.imaps, ssl_context=world.context(), timeout=TIMEOUT)
    try:
        imap.login(side.user, side.password)
        yield imap
        imap.logout()
    finally:
        with contextlib.suppress(OSError):
            imap.shutdown()


def _stored(imap: imaplib.IMAP4_SSL) -> int:
    typ, data = imap.status("INBOX", "(MESSAGES)")
    found = re.search(rb"MESSAGES (\d+)", data[0] if data and isinstance(data[0], bytes) else b"")
    if typ != "OK" or found is None:
        raise RuntimeError(f"IMAP STATUS: {typ} {data!r}")
    return int(found.group(1))


def _wait_stored(world: World, expected: int, deadline: float) -> tuple[float | None, int]:
    """Look at both mailboxes until ``expected`` messages are stored: (when, how many)."""
    with contextlib.ExitStack() as stack:
        boxes = [stack.enter_context(_imap(world, side)) for side in world.sides.values()]
        while True:
            count = sum(_stored(imap) for imap in boxes)
            now = time.perf_counter()
            if count >= expected:
                return now, count
            if now >= deadline:
                return None, count
            time.sleep(_POLL)


def _read_tokens(world: World, side: Side) -> list[str]:
    with _imap(world, side) as imap:
        typ, _ = imap.select("INBOX", readonly=True)
        if typ != "OK":
            raise RuntimeError(f"IMAP SELECT {side.user}: {typ}")
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-Load-Token)])")
        if typ != "OK":
            raise RuntimeError(f"IMAP UID FETCH {side.user}: {typ}")
    return [
        m.group(1).decode("ascii")
        for item in data
        if isinstance(item, tuple)
        for m in [_TOKEN.search(item[1])]
        if m
    ]


def _check(
    jobs: list[tuple[str, str, str]], accepted: list[str], found: dict[str, list[str]]
) -> dict[str, int]:
    """Lost (accepted, not in its recipient's mailbox), duplicated (extra copies), and more."""
    where = {token: dst for _, dst, token in jobs}
    accepted_set = set(accepted)
    seen: collections.Counter[str] = collections.Counter()
    misplaced = unaccepted = 0
    for domain, tokens in found.items():
        for token in tokens:
            if token not in accepted_set:
                unaccepted += 1
            elif where[token] != domain:
                misplaced += 1
            else:
                seen[token] += 1
    return {
        "lost": sum(1 for token in accepted_set if seen[token] == 0),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "misplaced": misplaced,
        "unaccepted_but_stored": unaccepted,
    }


def _loadavg() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg", encoding="ascii") as fh:
        return " ".join(fh.read().split()[:3])
    return ""


def run_load(world: World, count: int) -> dict[str, Any]:
    """Submit ``count`` messages, wait until all are stored, read every one back."""
    jobs = _jobs(count)
    out: dict[str, Any] = {"messages": count, "load_average_before": _loadavg()}
    began = time.perf_counter()
    tally = _submit(world, jobs)
    submitted = time.perf_counter()
    deadline = submitted + max(120.0, count / 20)
    stored_at, stored = _wait_stored(world, len(tally.accepted), deadline)
    time.sleep(_SETTLE)
    found = {domain: _read_tokens(world, side) for domain, side in world.sides.items()}
    out.update(
        accepted=len(tally.accepted),
        submit_errors=len(tally.errors),
        error_samples=tally.errors[:3],
        submit_seconds=submitted - began,
        submitted_per_second=len(tally.accepted) / (submitted - began),
        stored_seconds=None if stored_at is None else stored_at - began,
        end_to_end_per_second=None
        if stored_at is None
        else len(tally.accepted) / (stored_at - began),
        stored_when_done=stored,
        read_back={domain: len(tokens) for domain, tokens in found.items()},
        **_check(jobs, tally.accepted, found),
    )
    return out


# ---------------------------------------------------------------------------------------------
# the two servers


def _ours(count: int, *, sender_checks: bool = True) -> dict[str, Any]:
    """A fresh stack child with both domains; the client in this process.

    ``sender_checks`` False turns DKIM signing and verification and the SPF and DMARC checks
    off (``StackConfig(dkim=False, sender_auth=False)``): the work Postfix + Dovecot do here.
    """
    users = [f"user@{d}" for d in DOMAINS]
    with server_child() as child:
        start = child.call(
            "start",
            domains=list(DOMAINS),
            users=users,
            dkim=sender_checks,
            sender_auth=sender_checks,
        )
        passwords = {u["address"]: u["password"] for u in start["describe"]["users"]}
        sides = {}
        for domain in DOMAINS:
            ep = start["endpoints"][domain]
            user = f"user@{domain}"
            sides[domain] = Side(
                domain,
                user,
                passwords[user],
                ep["host"],
                ep["ports"]["submissions"],
                ep["ports"]["imaps"],
            )
        return run_load(World(sides, start["describe"]["ca_file"]), count)


def _postfix_log_counts(server: Any) -> dict[str, int]:
    """Delivery outcomes and warnings in one instance's Postfix log."""
    counts = {"sent": 0, "deferred": 0, "bounced": 0, "warnings": 0}
    path = os.path.join(server.workdir, "log", "postfix.log")
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            for status in ("sent", "deferred", "bounced"):
                if f"status={status}" in line:
                    counts[status] += 1
            if " warning: " in line:
                counts["warnings"] += 1
    return counts


def _theirs(count: int) -> dict[str, Any]:
    """Two RealMailServer instances, one per domain, relaying to each other's MX."""
    from benchmarks._realstack import RealMailServer, _free_ports
    from roundtrip.certs import CertificateAuthority

    ca = CertificateAuthority()
    host = "127.0.0.1"
    mx_ports = dict(zip(DOMAINS, _free_ports(host, len(DOMAINS)), strict=True))
    passwords = {d: "user-" + os.urandom(6).hex() for d in DOMAINS}
    servers = {
        d: RealMailServer(
            domain=d,
            host=host,
            users={"user": passwords[d]},
            ca=ca,
            mx=True,
            mx_port=mx_ports[d],
            relay_to={other: (host, mx_ports[other]) for other in DOMAINS if other != d},
        )
        for d in DOMAINS
    }
    try:
        for server in servers.values():
            server.start()
        sides = {
            d: Side(d, f"user@{d}", passwords[d], s.host, s.ports["submissions"], s.ports["imaps"])
            for d, s in servers.items()
        }
        out = run_load(World(sides, ca.ca_file()), count)
        out["postfix_log"] = {d: _postfix_log_counts(s) for d, s in servers.items()}
        return out
    finally:
        for server in servers.values():
            server.stop()
        ca.cleanup()


def measure(plan: Plan, with_postfix: bool) -> dict[str, Any]:
    """Ours, then Postfix + Dovecot (or why not), with the same client and count."""
    from benchmarks._realstack import RealMailServer
    from benchmarks.sections.postfix import _versions

    out: dict[str, Any] = {"messages": plan.load_messages, "connections": CONNECTIONS}
    out["ours"] = _ours(plan.load_messages)
    # The same work as Postfix + Dovecot here: the harness configures no DKIM, SPF or DMARC.
    out["ours_same_work"] = _ours(plan.load_messages, sender_checks=False)
    ok, reason = RealMailServer.is_available()
    if not with_postfix:
        out["postfix_dovecot"] = {"skipped": "--no-postfix"}
    elif not ok:
        out["postfix_dovecot"] = {"skipped": reason}
    else:
        out["postfix_dovecot"] = _theirs(plan.load_messages)
        out["postfix_dovecot"]["versions"] = _versions()
    return out


# ---------------------------------------------------------------------------------------------
# rows


def _outcome(run: dict[str, Any]) -> str:
    text = (
        f"{run['accepted']:,} accepted, {run['submit_errors']} submission errors, "
        f"{run['stored_when_done']:,} stored when the wait ended"
    )
    if run["misplaced"] or run["unaccepted_but_stored"]:
        text += f", {run['misplaced']} in the wrong mailbox, "
        text += f"{run['unaccepted_but_stored']} stored though not accepted"
    return text + f"; load average {run['load_average_before']} before"


def _rate_row(
    res: Results, name: str, ours: float | None, theirs: float | None, note: str, metric: str = ""
) -> None:
    """A rate of ours beside theirs, with the ratio (none when either is missing)."""
    res.add(
        SECTION,
        name,
        ours,
        "/s",
        postfix_dovecot=theirs,
        ratio=ratio(ours, theirs),
        ratio_of="x theirs",
        note=note,
        metric=metric,
    )


def _not_stored(run: dict[str, Any]) -> str:
    return "" if run["end_to_end_per_second"] else "; ours: NOT all stored by the deadline"


def rows(res: Results, data: dict[str, Any]) -> None:
    load = data["load"]
    ours, theirs = load["ours"], load["postfix_dovecot"]
    has_pd = "skipped" not in theirs
    n = f"{load['messages']:,} msgs, {load['connections']} conns"
    quick = ""
    if data["plan"]["quick"]:
        quick = "quick run: far fewer messages than the issue's 10,000, not comparable; "
    why = "" if has_pd else f"Postfix+Dovecot not run: {theirs['skipped']}; "
    their_rate = theirs.get("submitted_per_second") if has_pd else None
    _rate_row(
        res,
        f"submitted/s ({n}, 465 + AUTH)",
        ours["submitted_per_second"],
        their_rate,
        quick
        + why
        + f"ours: {_outcome(ours)}"
        + (f"; Postfix+Dovecot: {_outcome(theirs)}" if has_pd else ""),
    )
    their_e2e = theirs.get("end_to_end_per_second") if has_pd else None
    _rate_row(
        res,
        f"end to end/s, all stored ({n}, relay hop)",
        ours["end_to_end_per_second"],
        their_e2e,
        quick
        + why
        + "from the first connection to the IMAP look that found all stored"
        + _not_stored(ours)
        + ("" if not has_pd or their_e2e else "; theirs: NOT all stored by the deadline"),
        metric="load.end_to_end_vs_postfix_dovecot",
    )
    same = load.get("ours_same_work")
    if same is not None:
        _rate_row(
            res,
            f"end to end/s, sender checks off, as theirs ({n})",
            same["end_to_end_per_second"],
            their_e2e,
            quick
            + why
            + "StackConfig(dkim=False, sender_auth=False): no DKIM signing at submission, no "
            + "DKIM, SPF or DMARC check at the MX, the work the harness's Postfix+Dovecot do; "
            + f"submitted {same['submitted_per_second']:.0f}/s; ours: {_outcome(same)}"
            + _not_stored(same),
        )
    if not has_pd:
        # The fallback where Postfix + Dovecot cannot run: an absolute rate.
        res.add(
            SECTION,
            "end to end/s without Postfix+Dovecot to compare",
            ours["end_to_end_per_second"],
            "/s",
            note=quick + why + "the issue's fallback target",
            metric="load.end_to_end",
        )
    runs = [ours] if same is None else [ours, same]
    for key, what in (("lost", "accepted, not in its mailbox"), ("duplicated", "extra copies")):
        res.add(
            SECTION,
            f"{key} ({what}; read back over IMAPS)",
            float(sum(run[key] for run in runs)),
            "messages",
            postfix_dovecot=float(theirs[key]) if has_pd else None,
            note=quick
            + "every token fetched after a 1 s settle"
            + ("; ours: both runs, sender checks on and off" if same is not None else ""),
            metric=f"load.{key}",
        )
