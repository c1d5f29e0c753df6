"""The sending server's queue: route by MX in the stack's DNS, deliver over verified STARTTLS.

How a message moves (RFC 5321 §5.1 and §4.5.4, RFC 7505, RFC 3464):

1. ``enqueue()`` (on the loop thread) checks the envelope, re-frames the content (every stray CR
   or LF becomes CRLF, so this hop never forwards smuggling material; SECURITY.md A2.2/A2.4),
   and splits the recipients. A recipient whose domain is not one of ``local_domains()`` never
   leaves the machine: it goes to ``capture_outbound`` (a safety net for applications under
   test). The others get a delivery attempt at once: one task per attempt, retries scheduled
   with ``loop.call_later`` (no polling loop).
2. An attempt groups the pending recipients by domain and asks our DNS server for the MX set
   (dnspython's async resolver, ``configure=False``: the system resolver is never used). MX
   records are tried by preference; no MX means the domain itself is the MX (implicit MX);
   a null MX (``0 .``) bounces with 5.1.10; NXDOMAIN bounces with 5.1.2; a DNS timeout or
   SERVFAIL defers.
3. Each MX host's A/AAAA addresses are dialled in turn with aiosmtplib on port
   ``mx_port(host)``. The connection starts in plaintext and is upgraded with
   ``starttls(server_hostname=<MX name>)``: we dial the IP our DNS gave us but verify the
   certificate against the MX *name* (asyncio's ``server_hostname`` drives both SNI and the
   hostname check). Dialling the name instead would go through ``getaddrinfo`` and the system
   resolver, which knows nothing of our zones. With ``require_tls`` a missing STARTTLS or a
   failed verification is a temporary failure for that host: never a plaintext fallback.
4. Connection failures and 4xx replies move on to the next address/MX, then leave the
   recipient queued for a retry after ``retry_delays[attempt]``; 5xx replies bounce it. When a
   recipient has waited ``queue_lifetime`` seconds it bounces with 4.4.7.
5. A bounce is a DSN (``protocols/dsn.py``) handed to ``deliver_local(sender, dsn, "INBOX")``
   when the sender's domain is local, or to ``capture_outbound("", sender, dsn)`` otherwise. A
   message with a null sender is never bounced.

The message content is written by :meth:`Relay._send_content`, not by aiosmtplib's ``data()``:
that one dot-stuffs into a copy and hands the whole message to the transport at once, so a
40 MB message cost several copies plus its ciphertext. Ours sends ``DATA`` with aiosmtplib,
then writes the stored bytes dot-stuffed (RFC 5321 §4.5.2) in slices produced lazily by
:func:`dot_stuffed_slices`, each written only when the transport has not asked us to pause,
and reads the final reply with aiosmtplib's response reader.

Exactly once: a recipient is marked delivered as soon as the final ``250`` to DATA arrives and
is never attempted again. A reply lost between the remote's 250 and our reading it can still
cause one duplicate on retry (RFC 1047: a duplicate is better than a loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from ..protocols.dsn import build_dsn

__all__ = ["QueuedMessage", "Relay", "RelayEvent"]

log = logging.getLogger("roundtrip.servers.relay")

_STRAY_EOL = re.compile(rb"\r\n|\r|\n")
#: Most bytes of message content handed to the transport in one write (as servers/_conn.py):
#: the transport (and the TLS layer under it) then holds about one slice, not the message.
_DATA_SLICE = 256 * 1024
_FORBIDDEN_IN_ADDRESS = re.compile(r"[\r\n\x00<>]")

#: Steps reported in :attr:`Relay.events`, in the order they happen for one recipient.
STEPS = (
    "queued",
    "captured",
    "mx-lookup",
    "connected",
    "delivered",
    "deferred",
    "bounced",
    "expired",
)


@dataclass(frozen=True, slots=True)
class RelayEvent:
    """One step of one recipient's journey; ``timestamp`` comes from the relay's clock.

    ``step`` is one of :data:`STEPS`; ``detail`` names the MX host or quotes the reply.
    """

    queue_id: str
    recipient: str
    step: str
    timestamp: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A snapshot of one queue entry (see :meth:`Relay.queue`).

    Attributes:
        id: the queue id (also used in events).
        mail_from: the envelope sender ("" for a bounce).
        rcpt: recipients still waiting for delivery.
        attempts: delivery attempts made so far.
        next_attempt: when the next attempt is due (relay clock), None if none is scheduled.
        last_error: the last temporary failure, verbatim.
        received_at: when the message was accepted.
        delivered: recipients delivered so far.
        bounced: recipients given up on.
    """

    id: str
    mail_from: str
    rcpt: tuple[str, ...]
    attempts: int
    next_attempt: float | None
    last_error: str
    received_at: float
    delivered: tuple[str, ...] = ()
    bounced: tuple[str, ...] = ()


@dataclass(eq=False)
class _Entry:
    id: str
    helo: str
    mail_from: str
    raw: bytes
    received_at: float
    pending: list[str]
    delivered: list[str] = field(default_factory=list)
    bounced: list[str] = field(default_factory=list)
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str = ""
    timer: asyncio.TimerHandle | None = None

    def snapshot(self) -> QueuedMessage:
        return QueuedMessage(
            id=self.id,
            mail_from=self.mail_from,
            rcpt=tuple(self.pending),
            attempts=self.attempts,
            next_attempt=self.next_attempt,
            last_error=self.last_error,
            received_at=self.received_at,
            delivered=tuple(self.delivered),
            bounced=tuple(self.bounced),
        )


@dataclass(frozen=True, slots=True)
class _Permanent:
    """Give up on the recipient: RFC 3463 status and a Diagnostic-Code."""

    status: str
    diagnostic: str
    remote_mta: str = ""


@dataclass(frozen=True, slots=True)
class _Temporary:
    reason: str


_Outcome = _Permanent | _Temporary | None  # None: delivered


class _HostFailedError(Exception):
    """This MX host could not take the transaction; try the next one."""


def normalize_line_endings(raw: bytes) -> bytes:
    """Every CR, LF or CRLF becomes CRLF, and the content ends with CRLF (SECURITY.md A2.2)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        data = raw  # no stray CR or LF: a big message is not copied
    else:
        data = _STRAY_EOL.sub(b"\r\n", raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def dot_stuffed_slices(data: bytes, size: int = _DATA_SLICE) -> Iterator[bytes | memoryview]:
    """The DATA content for ``data``, dot-stuffed and terminated, in slices of about ``size``.

    RFC 5321 §4.5.2: a line that starts with "." gets one more "."; the content ends with
    CRLF (added if missing) and then ``.\\r\\n``. ``data`` is expected to be CRLF-normalised
    (:func:`normalize_line_endings`). Nothing is copied whole: a slice without a dot-led line
    is a view of ``data``; a slice with some is joined from views (at most ``size`` plus one
    byte per dot). The joined slices put the stuffing dots in the write that needs them, so
    a message full of dot-led lines is not sent as thousands of tiny TLS records.
    """
    if size < 1:
        raise ValueError("slice size must be at least 1")
    view = memoryview(data)
    length = len(data)
    pos = 0
    # Index of the next "." that starts a line, or -1.
    if data.startswith(b"."):
        dot = 0
    else:
        dot = data.find(b"\r\n.")
        if dot != -1:
            dot += 2
    while pos < length:
        end = min(pos + size, length)
        if dot == -1 or dot >= end:
            yield view[pos:end]
            pos = end
            continue
        parts: list[bytes | memoryview] = []
        while dot != -1 and dot < end:
            parts += (view[pos:dot], b".")
            pos = dot  # the line's own dot starts the next part
            dot = data.find(b"\r\n.", dot + 1)
            if dot != -1:
                dot += 2
        parts.append(view[pos:end])
        pos = end
        yield b"".join(parts)
    if not data.endswith(b"\r\n") and length:
        yield b"\r\n"
    yield b".\r\n"


def check_address(address: str, *, what: str) -> str:
    """Reject CR, LF, NUL and angle brackets in an envelope address (SECURITY.md A2.5).

    aiosmtplib writes addresses into commands verbatim (GHSA-v3q9-hj7j-63hq).

    Raises:
        ValueError: the address could inject SMTP commands.
    """
    if _FORBIDDEN_IN_ADDRESS.search(address):
        raise ValueError(f"{what} {address!r} contains CR, LF, NUL or angle brackets")
    return address


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


class Relay:
    """The outbound queue of a stack. Construct and use it on the stack's event loop thread.

    Args:
        dns_address: ``(ip, port)`` of the DNS server to ask for MX and address records.
        tls_context: client context trusting the stack CA (verifies certificates and names).
        local_domains: domains that live in this hermetic world; mail for any other domain
            goes to ``capture_outbound`` and never to the network.
        mx_port: the SMTP port of an MX host name (lowercase, no trailing dot).
        deliver_local: ``(address, message, mailbox)`` stores a DSN for a local sender.
        capture_outbound: ``(mail_from, rcpt, message)`` receives mail for foreign domains.
        on_error: records an unexpected exception (``LoopThread.record_error``).
        retry_delays: seconds before the 2nd, 3rd ... attempt; the last one repeats.
        queue_lifetime: seconds after which an undelivered recipient bounces (4.4.7).
        connect_timeout: seconds per SMTP connection step (aiosmtplib ``timeout``).
        require_tls: never deliver without verified STARTTLS (defer instead). With False,
            plaintext is used only when the MX does not offer STARTTLS; an offered STARTTLS
            whose certificate fails verification still defers.
        clock: wall clock for timestamps and the queue lifetime.
        dns_timeout: seconds a whole DNS resolution may take.
        on_event: called with each :class:`RelayEvent` as it is appended to :attr:`events`.
        reporting_mta: the host name that DSNs name as the reporting MTA.
        max_concurrent: delivery attempts running at once; the rest wait their turn (Postfix
            default_destination_concurrency_limit is 20).
    """

    def __init__(
        self,
        *,
        dns_address: tuple[str, int],
        tls_context: ssl.SSLContext,
        local_domains: Callable[[], set[str]],
        mx_port: Callable[[str], int],
        deliver_local: Callable[[str, bytes, str], None],
        capture_outbound: Callable[[str, str, bytes], None],
        on_error: Callable[[BaseException], None],
        retry_delays: Sequence[float] = (1, 5, 30, 120),
        queue_lifetime: float = 600.0,
        connect_timeout: float = 10.0,
        require_tls: bool = True,
        clock: Callable[[], float] = time.time,
        dns_timeout: float = 5.0,
        on_event: Callable[[RelayEvent], None] | None = None,
        reporting_mta: str = "localhost",
        max_concurrent: int = 20,
    ) -> None:
        if not retry_delays:
            raise ValueError("retry_delays must hold at least one delay")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tls_context = tls_context
        self._local_domains = local_domains
        self._mx_port = mx_port
        self._deliver_local = deliver_local
        self._capture_outbound = capture_outbound
        self._on_error = on_error
        self._retry_delays = tuple(retry_delays)
        self._queue_lifetime = queue_lifetime
        self._connect_timeout = connect_timeout
        self._require_tls = require_tls
        self._clock = clock
        self._on_event = on_event
        self.reporting_mta = reporting_mta
        self.events: list[RelayEvent] = []
        self._entries: dict[str, _Entry] = {}
        # Up-to-date snapshot of each queued entry, refreshed when that entry changes, so that
        # queue() costs one list copy: the stack calls it on every event, and rebuilding every
        # snapshot each time made a backlog of n messages cost O(n^2) (tests/test_load.py).
        self._snapshots: dict[str, QueuedMessage] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closed = False
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns_address[0]]
        resolver.port = dns_address[1]
        resolver.cache = None
        resolver.lifetime = dns_timeout
        resolver.timeout = dns_timeout
        self._resolver = resolver

    # -- public API ---------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        helo: str,
        mail_from: str,
        rcpt_tos: Sequence[str],
        raw: bytes,
        received_at: float,
    ) -> QueuedMessage:
        """Queue a message and start its first delivery attempt now. Loop thread only.

        Args:
            helo: the name we announce in EHLO.
            mail_from: the envelope sender; "" or "<>" for a bounce.
            rcpt_tos: envelope recipients.
            raw: the message; stray CR and LF are normalised to CRLF.
            received_at: when the message was accepted (relay clock).

        Returns:
            A snapshot of the new queue entry.

        Raises:
            ValueError: CR, LF, NUL or angle brackets in an address, or no recipients.
            RuntimeError: the relay is closed.
        """
        if self._closed:
            raise RuntimeError("relay is closed")
        sender = "" if mail_from == "<>" else check_address(mail_from, what="sender")
        recipients = [check_address(r, what="recipient") for r in rcpt_tos]
        check_address(helo, what="HELO name")
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        entry = _Entry(
            id=f"Q{next(self._ids):06d}",
            helo=helo,
            mail_from=sender,
            raw=normalize_line_endings(raw),
            received_at=received_at,
            pending=[],
        )
        local = {d.lower().rstrip(".") for d in self._local_domains()}
        for rcpt in dict.fromkeys(recipients):
            self._event(entry, rcpt, "queued")
            if _domain_of(rcpt) in local:
                entry.pending.append(rcpt)
            else:
                self._capture(sender, rcpt, entry.raw)
                entry.delivered.append(rcpt)
                self._event(entry, rcpt, "captured")
        if entry.pending:
            self._entries[entry.id] = entry
            self._start(entry)
        return entry.snapshot()

    def queue(self) -> list[QueuedMessage]:
        """Snapshots of the messages still waiting for at least one recipient.

        Meant for the loop thread; from another thread it is a best-effort view.
        """
        return list(self._snapshots.values())

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no attempt is running (the queue is empty or only waits on retries).

        Raises:
            TimeoutError: attempts were still running after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"relay still busy after {timeout:g} s: {self.queue()!r}")
            await asyncio.wait(set(self._tasks), timeout=remaining)

    def retry_now(self) -> None:
        """Run every scheduled retry at once (tests use it to skip the backoff)."""
        for entry in list(self._entries.values()):
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
                self._start(entry)

    async def clear(self) -> None:
        """Forget every queued message and event (a test's clean slate); stays open."""
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        self._snapshots.clear()
        self.events.clear()

    async def close(self) -> None:
        """Cancel retries and running attempts. Queued messages stay in memory."""
        self._closed = True
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
                entry.next_attempt = None
                self._touch(entry)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- scheduling ---------------------------------------------------------------------------

    def _touch(self, entry: _Entry) -> None:
        """Refresh the snapshot of ``entry`` after it changed (or drop it once dequeued)."""
        if self._entries.get(entry.id) is entry:
            self._snapshots[entry.id] = entry.snapshot()
        else:
            self._snapshots.pop(entry.id, None)

    def _event(self, entry: _Entry, rcpt: str, step: str, detail: str = "") -> None:
        self._touch(entry)  # listeners read queue() from inside on_event
        event = RelayEvent(entry.id, rcpt, step, self._clock(), detail)
        self.events.append(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception as exc:
                self._on_error(exc)

    def _capture(self, sender: str, rcpt: str, raw: bytes) -> None:
        try:
            self._capture_outbound(sender, rcpt, raw)
        except Exception as exc:
            self._on_error(exc)

    def _start(self, entry: _Entry) -> None:
        entry.timer = None
        entry.next_attempt = None
        if self._closed or self._entries.get(entry.id) is not entry:
            return  # closed, or forgotten by clear() while a timer or attempt was in flight
        self._touch(entry)
        task = asyncio.get_running_loop().create_task(
            self._attempt(entry), name=f"relay-{entry.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, entry: _Entry) -> None:
        # At most max_concurrent attempts at once: a burst of thousands of messages must not
        # open thousands of DNS queries and SMTP connections together (the stack's DNS server
        # dropped UDP queries and the MX hit its connection cap; tests/test_load.py).
        async with self._slots:
            await self._attempt_now(entry)

    async def _attempt_now(self, entry: _Entry) -> None:
        entry.attempts += 1
        self._touch(entry)
        try:
            by_domain: dict[str, list[str]] = {}
            for rcpt in entry.pending:
                by_domain.setdefault(_domain_of(rcpt), []).append(rcpt)
            for domain, rcpts in by_domain.items():
                outcomes = await self._deliver_domain(entry, domain, rcpts)
                for rcpt in rcpts:
                    self._settle(entry, rcpt, outcomes[rcpt])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in the relay: record it and keep the message for a retry.
            self._on_error(exc)
            entry.last_error = f"internal error: {exc!r}"
            self._touch(entry)
        self._reschedule(entry)

    def _settle(self, entry: _Entry, rcpt: str, outcome: _Outcome) -> None:
        if outcome is None:
            entry.pending.remove(rcpt)
            entry.delivered.append(rcpt)
            self._touch(entry)
        elif isinstance(outcome, _Permanent):
            entry.pending.remove(rcpt)
            entry.bounced.append(rcpt)
            self._event(entry, rcpt, "bounced", outcome.diagnostic)
            self._bounce(entry, rcpt, outcome, action="failed")
        else:
            entry.last_error = outcome.reason
            self._event(entry, rcpt, "deferred", outcome.reason)

    def _reschedule(self, entry: _Entry) -> None:
        if self._entries.get(entry.id) is not entry:
            return  # clear() forgot it during the attempt
        if not entry.pending:
            self._entries.pop(entry.id, None)
            self._snapshots.pop(entry.id, None)
            return
        waited = self._clock() - entry.received_at
        if waited >= self._queue_lifetime:
            for rcpt in list(entry.pending):
                entry.pending.remove(rcpt)
                entry.bounced.append(rcpt)
                reason = entry.last_error or "no attempt succeeded"
                self._event(entry, rcpt, "expired", reason)
                outcome = _Permanent("4.4.7", f"X-Roundtrip; queue lifetime expired: {reason}")
                self._bounce(entry, rcpt, outcome, action="failed")
            self._entries.pop(entry.id, None)
            self._snapshots.pop(entry.id, None)
            return
        if self._closed:
            return
        index = min(entry.attempts - 1, len(self._retry_delays) - 1)
        # Wake up no later than the expiry, so the 4.4.7 bounce is on time.
        delay = max(0.0, min(self._retry_delays[index], self._queue_lifetime - waited))
        entry.next_attempt = self._clock() + delay
        entry.timer = asyncio.get_running_loop().call_later(delay, self._start, entry)
        self._touch(entry)

    def _bounce(self, entry: _Entry, rcpt: str, outcome: _Permanent, *, action: str) -> None:
        if not entry.mail_from:
            return  # RFC 3464 §2: never bounce a bounce.
        dsn = build_dsn(
            original=entry.raw,
            envelope_from=entry.mail_from,
            recipient=rcpt,
            status=outcome.status,
            diagnostic=outcome.diagnostic,
            remote_mta=outcome.remote_mta,
            reporting_mta=self.reporting_mta,
            action=action,
            arrival_date=entry.received_at,
            now=self._clock(),
            message_id_domain=_domain_of(self.reporting_mta) or self.reporting_mta,
        )
        # Final delivery of a DSN: its envelope sender is null (RFC 5321 §4.4, §4.5.5).
        dsn = b"Return-Path: <>\r\n" + dsn
        local = {d.lower().rstrip(".") for d in self._local_domains()}
        try:
            if _domain_of(entry.mail_from) in local:
                self._deliver_local(entry.mail_from, dsn, "INBOX")
            else:
                self._capture_outbound("", entry.mail_from, dsn)
        except Exception as exc:
            self._on_error(exc)

    # -- routing ------------------------------------------------------------------------------

    async def _route(self, domain: str) -> list[tuple[str, list[str]]] | _Permanent | _Temporary:
        """MX hosts in preference order, each with its addresses (RFC 5321 §5.1)."""
        try:
            answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _Permanent("5.1.2", f"X-Roundtrip; domain {domain} does not exist (NXDOMAIN)")
        except dns.exception.DNSException as exc:
            return _Temporary(f"MX lookup for {domain} failed: {exc}")
        implicit = answer.rrset is None
        if answer.rrset is None:
            hosts = [domain]
        else:
            records = sorted(answer.rrset, key=lambda r: (r.preference, r.exchange.to_text()))
            if any(r.exchange == dns.name.root for r in records):
                # RFC 7505 §3: a null MX means the domain accepts no mail.
                return _Permanent(
                    "5.1.10", f"X-Roundtrip; domain {domain} accepts no mail (null MX)"
                )
            hosts = [r.exchange.to_text(omit_final_dot=True).lower() for r in records]
        route: list[tuple[str, list[str]]] = []
        temporary: list[str] = []
        for host in dict.fromkeys(hosts):
            addresses: list[str] = []
            for rdtype in ("A", "AAAA"):
                try:
                    found = await self._resolver.resolve(host, rdtype, raise_on_no_answer=False)
                except dns.resolver.NXDOMAIN:
                    break
                except dns.exception.DNSException as exc:
                    temporary.append(f"{rdtype} lookup for {host} failed: {exc}")
                    continue
                if found.rrset is not None:
                    addresses.extend(r.address for r in found.rrset)
            if addresses:
                route.append((host, addresses))
        if route:
            return route
        if temporary:
            return _Temporary("; ".join(temporary))
        if implicit:
            return _Permanent("5.1.2", f"X-Roundtrip; domain {domain} has no MX and no address")
        return _Permanent(
            "5.4.4", f"X-Roundtrip; no address for the MX hosts of {domain}: {', '.join(hosts)}"
        )

    async def _deliver_domain(
        self, entry: _Entry, domain: str, rcpts: list[str]
    ) -> dict[str, _Outcome]:
        route = await self._route(domain)
        if isinstance(route, list):
            detail = ", ".join(f"{host}={'/'.join(ips)}" for host, ips in route)
        else:
            detail = route.diagnostic if isinstance(route, _Permanent) else route.reason
        for rcpt in rcpts:
            self._event(entry, rcpt, "mx-lookup", detail)
        if not isinstance(route, list):
            return dict.fromkeys(rcpts, route)
        outcomes: dict[str, _Outcome] = {}
        remaining = list(rcpts)
        reasons: dict[str, list[str]] = {rcpt: [] for rcpt in rcpts}
        for host, addresses in route:
            for ip in addresses:
                if not remaining:
                    break
                try:
                    result = await self._session(entry, host, ip, remaining)
                except _HostFailedError as exc:
                    reason = f"{host}[{ip}]: {exc}"
                    log.info("relay %s: %s", entry.id, reason)
                    for rcpt in remaining:
                        reasons[rcpt].append(reason)
                    continue
                for rcpt, outcome in result.items():
                    if isinstance(outcome, _Temporary):
                        reasons[rcpt].append(outcome.reason)  # 4xx: try the next MX
                    else:
                        outcomes[rcpt] = outcome
                remaining = [r for r in remaining if r not in outcomes]
        for rcpt in remaining:
            # Every host's reason, so a TLS failure on the first MX is not hidden by the next.
            text = "; ".join(reasons[rcpt]) or f"no MX host of {domain} answered"
            outcomes[rcpt] = _Temporary(text)
        return outcomes

    async def _session(
        self, entry: _Entry, host: str, ip: str, rcpts: list[str]
    ) -> dict[str, _Outcome]:
        """One SMTP transaction with one MX address; ``_HostFailedError`` means try the next."""
        port = self._mx_port(host)
        client = aiosmtplib.SMTP(
            hostname=ip,
            port=port,
            local_hostname=entry.helo,
            start_tls=False,  # upgraded below, so the certificate is checked against `host`
            validate_certs=True,
            tls_context=self._tls_context,
            timeout=self._connect_timeout,
        )
        try:
            try:
                await client.connect()
                await client.ehlo()
                if client.supports_extension("starttls"):
                    await client.starttls(server_hostname=host, tls_context=self._tls_context)
                    await client.ehlo()
                elif self._require_tls:
                    raise _HostFailedError("STARTTLS not offered (TLS is required, no plaintext)")
            except aiosmtplib.SMTPResponseException as exc:
                raise _HostFailedError(f"{exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _HostFailedError(_describe(exc)) from exc
            for rcpt in rcpts:
                self._event(entry, rcpt, "connected", f"{host}[{ip}]:{port}")
            return await self._transaction(entry, client, host, rcpts)
        finally:
            try:
                with contextlib.suppress(Exception):
                    if client.is_connected:
                        await client.quit()
            finally:
                # Also when the task is cancelled (reset, stop) while QUIT is under way.
                client.close()

    async def _transaction(
        self, entry: _Entry, client: aiosmtplib.SMTP, host: str, rcpts: list[str]
    ) -> dict[str, _Outcome]:
        try:
            await client.mail(entry.mail_from)
        except aiosmtplib.SMTPResponseException as exc:
            outcome = _reply_outcome(exc.code, exc.message, host)
            if isinstance(outcome, _Temporary):
                raise _HostFailedError(f"MAIL FROM: {exc.code} {exc.message}") from exc
            return dict.fromkeys(rcpts, outcome)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise _HostFailedError(_describe(exc)) from exc
        outcomes: dict[str, _Outcome] = {}
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                outcomes[rcpt] = _reply_outcome(exc.code, exc.message, host)
                continue
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _HostFailedError(_describe(exc)) from exc
            accepted.append(rcpt)
        if not accepted:
            return outcomes
        try:
            reply = await client.execute_command(b"DATA")
            if reply.code == 354:
                reply = await self._send_content(client, entry.raw)
        except aiosmtplib.SMTPResponseException as exc:  # a malformed or over-long reply
            outcomes.update(dict.fromkeys(accepted, _reply_outcome(exc.code, exc.message, host)))
            return outcomes
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise _HostFailedError(_describe(exc)) from exc
        if reply.code != 250:  # to DATA (not 354) or to the final dot
            outcomes.update(
                dict.fromkeys(accepted, _reply_outcome(reply.code, reply.message, host))
            )
            return outcomes
        for rcpt in accepted:
            outcomes[rcpt] = None
            self._event(entry, rcpt, "delivered", host)
        return outcomes

    async def _send_content(self, client: aiosmtplib.SMTP, raw: bytes) -> aiosmtplib.SMTPResponse:
        """After ``354``: write the content under flow control and read the final reply.

        Uses aiosmtplib's protocol: its transport, the flow-control wait that its
        ``FlowControlMixin`` offers for ``StreamWriter.drain()`` (``_drain_helper``), and
        ``read_response``. Each wait for the transport to drain, and the final reply, may take
        ``connect_timeout`` seconds (the timeout of every other step).

        Raises:
            aiosmtplib.SMTPException, OSError: the connection broke or timed out; the client
                is closed, because the session is mid-message and cannot be reused.
        """
        protocol = client.protocol
        timeout = self._connect_timeout
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            for piece in dot_stuffed_slices(raw):
                try:
                    # Returns at once unless the transport asked us to pause.
                    await asyncio.wait_for(protocol._drain_helper(), timeout)
                except TimeoutError as exc:
                    raise aiosmtplib.SMTPTimeoutError(
                        f"Timed out writing the message (no progress for {timeout:g} s)"
                    ) from exc
                transport = protocol.transport
                if transport is None or transport.is_closing():
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                cast(asyncio.WriteTransport, transport).write(piece)
            # No await between the last write and this call: read_response arms the reader
            # before any reply can be received. Replies sent before the final dot (RFC 5321
            # forbids them) are discarded by aiosmtplib as unsolicited, never mis-paired.
            return await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPResponseException:
            raise  # a malformed reply: the session is still framed
        except BaseException:
            client.close()  # QUIT now would be read as message content
            raise


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {text}"
    return text


def _reply_outcome(code: int, message: str, host: str) -> _Permanent | _Temporary:
    text = " ".join(message.split())
    if 500 <= code < 600:
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", text)
        status = match.group(1) if match else "5.0.0"
        if not status.startswith("5"):
            status = "5" + status[1:]
        return _Permanent(status, f"smtp; {code} {text}", host)
    return _Temporary(f"{host}: {code} {text}")
