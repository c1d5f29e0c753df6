"""The sending server's queue: route by MX in the stack's DNS, deliver over verified STARTTLS.

How a message moves (RFC 5321 §5.1 and §4.5.4, RFC 7505, RFC 3464):

1. ``enqueue()`` (on the loop thread) checks the envelope, re-frames the content (every stray CR
   or LF becomes CRLF, so this hop never forwards smuggling material; docs/security.md A2.2/A2.4),
   and splits the recipients. A recipient whose domain is not one of ``local_domains()`` never
   leaves the machine: it goes to ``capture_outbound`` (a safety net for applications under
   test). The others get a delivery attempt at once: one task per attempt, retries scheduled
   with ``loop.call_later`` (no polling loop).
2. An attempt groups the pending recipients by domain and asks our DNS server for the MX set
   (in memory when it runs in this process, else dnspython's async resolver with
   ``configure=False``: the system resolver is never used; ``servers/_mxroute.py``). MX
   records are tried by preference; no MX means the domain itself is the MX (implicit MX);
   a null MX (``0 .``) bounces with 5.1.10; NXDOMAIN bounces with 5.1.2; a DNS timeout or
   SERVFAIL defers.
3. Each MX host's A/AAAA addresses are dialled in turn with aiosmtplib on port
   ``mx_port(host)``, in plaintext, then upgraded with ``starttls(server_hostname=<MX name>)``:
   the certificate is verified against the MX *name*, never the dialled IP
   (``servers/_mxsession.py``). How much TLS is required is the recipient domain's policy
   (``tls_policy``, MTA-STS modes of RFC 8461): under ``enforce`` an MX that matches no ``mx``
   pattern, a missing STARTTLS or a failed verification is a temporary failure for that host,
   never a plaintext fallback; ``testing`` records the failure and delivers anyway; ``none`` or
   no policy is opportunistic TLS (RFC 7435). A STARTTLS handshake that fails after the MX's
   220 leaves no SMTP session to go on with, so any fallback dials a new connection
   (``protocols/delivery.py`` ``handshake_fallback``): under ``none`` or no policy it carries
   the message in plaintext (as Postfix's ``smtp_tls_security_level = may`` does); under
   ``testing`` it tries unverified TLS when only the certificate failed, and plaintext when the
   handshake itself failed; under ``enforce`` the host is deferred. Failures carry their TLS-RPT
   result type (RFC 8460 §4.3) in the ``tls-failure`` event and the reason.
   Towards an MX whose EHLO reply lists PIPELINING (RFC 2920), ``MAIL FROM``, every ``RCPT TO``
   and ``DATA`` go out in one write and their replies are read in order; then the content and
   its final dot in one more (``protocols/_pipelining.py`` has the grouping rule).
   After a transaction that ended in step, the connection is reset with RSET (not needed, and
   not sent, after a pipelining MX answered the final dot: ``rset_due``) and kept idle for
   ``connection_cache_time`` (2 s; Postfix's SMTP connection cache, ``servers/_mxcache.py``):
   the next message to the same MX host, address, port and HELO name takes it instead of
   dialling, if its TLS meets that message's policy (verified TLS meets every mode; plaintext
   or unverified TLS only the mode that allowed it). The DNS lookups still run for every
   message. A cached connection that turns out dead (EOF, 421 or any failure of MAIL FROM) is
   dropped and a fresh one dialled at once. Messages queued together for one MX go over
   parallel connections: each of the up to ``max_concurrent`` attempts takes an idle one, or
   dials when none is idle (tests/servers/test_relay_concurrency.py).
   Bounds: ``connection_cache_size`` idle connections, 300 s and 100 messages per connection;
   idle ones get QUIT when their time is up, ``clear()`` closes them with QUIT and ``close()``
   drops them. The ``connected`` event says ``(reused)``.
4. Connection failures and 4xx replies move on to the next address/MX, then leave the
   recipient queued for a retry after ``retry_delays[attempt]``; 5xx replies bounce it. When a
   recipient has waited ``queue_lifetime`` seconds it bounces with 4.4.7.
5. A bounce is a DSN (``protocols/dsn.py``) handed to ``deliver_local(sender, dsn, "INBOX")``
   when the sender's domain is local, or to ``capture_outbound("", sender, dsn)`` otherwise. A
   message with a null sender is never bounced.

What lives where: every rule above that needs no I/O (MX order, null and implicit MX, what a
reply means, retry delays and expiry, the DSN, the wording of TLS failures, the dot-stuffing of
the content) is ``protocols/delivery.py``, tested without a loop. This module does the I/O:
the queue, timers, DNS queries, the spool, events. ``servers/_mxsession.py`` is one SMTP
session (connect, STARTTLS, MAIL/RCPT/DATA, the content written under flow control),
``servers/_mxcache.py`` the connection cache, and ``servers/_relayerrors.py`` the one place
where aiosmtplib, ``ssl``, ``OSError``, ``TimeoutError`` and dnspython exceptions become
``StepError``.

Exactly once: a recipient is settled as soon as the ``250`` to the final dot arrives (or its
5xx) and is never attempted again. A ``250`` to the ``DATA`` command itself is out of step, not
a delivery (RFC 5321 §4.1.1.4; ``delivery.data_reply_outcome``): the recipient is deferred and
the connection dropped. A reply lost between the remote's 250 and our reading it can
still cause one duplicate on retry (RFC 1047: a duplicate is better than a loss).

Durability (docs/security.md A9.4): with a ``spool`` (:mod:`roundtrip.spool`; the stack gives one
with the Maildir store) ``enqueue`` writes the message to disk and fsyncs it before returning,
so before the submission server's 250. The recipients still pending are recorded right after
the MX's reply to the final dot (recipients refused at RCPT with it), before RSET or QUIT is
sent (``_conclude``); routing outcomes and deferrals after the domain's attempt. The file goes
when no recipient is left. :meth:`Relay.restore` queues again what a killed process left. Only
a crash between a remote 250 and that record costs one duplicate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError, StorageError
from ..protocols import delivery
from ..protocols.delivery import (
    DomainAttempt,
    Outcome,
    Permanent,
    RetrySchedule,
    Temporary,
    check_address,
    domain_of,
)
from ..protocols.delivery import dot_stuffed_slices as dot_stuffed_slices
from ..protocols.delivery import normalize_line_endings as normalize_line_endings
from ..protocols.tlspolicy import ResultType, TLSPolicy
from ..spool import RelaySpool
from ._mxcache import Connection, ConnectionCache, Endpoint, discard
from ._relayerrors import StepError
from ._relayqueue import STEPS as STEPS
from ._relayqueue import Entry, Prepared, QueuedMessage, RelayEvent

if TYPE_CHECKING:  # the MX client and resolver are imported on first use (issue #17)
    from ..protocols.dns import ZoneAnswer
    from ._mxroute import Router
    from ._mxsession import Dialer, Started

__all__ = ["Prepared", "QueuedMessage", "Relay", "RelayEvent"]

log = logging.getLogger("roundtrip.servers.relay")

_QUEUE_ID = re.compile(r"Q\d{1,9}")


class Relay:
    """The outbound queue of a stack. Construct and use it on the stack's event loop thread.

    Args:
        dns_address: ``(ip, port)`` of the DNS server to ask for MX and address records.
        dns_source: that server's ``lookup`` when it runs in this process: asked directly,
            without a UDP round (``_mxroute``); None asks over the network.
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
        require_tls: without ``tls_policy``: True acts as an ``enforce`` policy without MX
            patterns for every domain (never deliver without verified STARTTLS; defer
            instead); False as no policy (opportunistic TLS, plaintext if not offered).
        tls_policy: the outbound TLS policy of a recipient domain (lowercase), or None for
            none (opportunistic, RFC 7435); see :mod:`roundtrip.protocols.tlspolicy`. When
            given, ``require_tls`` is ignored.
        clock: wall clock for timestamps and the queue lifetime.
        dns_timeout: seconds a whole DNS resolution may take.
        on_event: called with each :class:`RelayEvent` as it is appended to :attr:`events`.
        zone_version: returns a token that changes whenever the DNS server's records change;
            given, MX routes are cached for their TTL until it changes (see ``_mxroute``).
        on_queue_change: called (on the loop thread) after :meth:`queue` changed in a way no
            event announces: a message entered the queue, left it, or got a retry time.
        reporting_mta: the host name that DSNs name as the reporting MTA.
        max_concurrent: delivery attempts running at once; the rest wait their turn (Postfix
            default_destination_concurrency_limit is 20).
        spool: keep the queue on disk too (RFC 5321 §6.1, docs/security.md A9.4): ``enqueue``
            returns only once the message is durable, settled recipients are recorded, and
            :meth:`restore` queues again what a previous process left. None: memory only.
        connection_cache_time: seconds an MX connection stays open after a transaction, for
            the next message to the same MX host, address and port (Postfix
            smtp_connection_cache_time_limit, 2 s); 0 sends QUIT after every message.
        connection_cache_size: idle connections kept at most, in all (and per MX address, at
            most ``max_concurrent``).
        connection_reuse_time: seconds after its opening that a connection is no longer
            cached (Postfix smtp_connection_reuse_time_limit, 300 s).
        connection_reuse_limit: messages per connection (Postfix
            smtp_connection_reuse_count_limit); a session also stays inside the MX's command
            budget (our MX allows 100 RSET, one per message).
    """

    def __init__(
        self,
        *,
        dns_address: tuple[str, int],
        tls_context: ssl.SSLContext,
        dns_source: Callable[..., ZoneAnswer | None] | None = None,
        local_domains: Callable[[], set[str]],
        mx_port: Callable[[str], int],
        deliver_local: Callable[[str, bytes, str], None],
        capture_outbound: Callable[[str, str, bytes], None],
        on_error: Callable[[BaseException], None],
        retry_delays: Sequence[float] = (1, 5, 30, 120),
        queue_lifetime: float = 600.0,
        connect_timeout: float = 10.0,
        require_tls: bool = True,
        tls_policy: Callable[[str], TLSPolicy | None] | None = None,
        clock: Callable[[], float] = time.time,
        dns_timeout: float = 5.0,
        zone_version: Callable[[], object] | None = None,
        on_event: Callable[[RelayEvent], None] | None = None,
        on_queue_change: Callable[[], None] | None = None,
        reporting_mta: str = "localhost",
        max_concurrent: int = 20,
        spool: RelaySpool | None = None,
        connection_cache_time: float = 2.0,
        connection_cache_size: int = 20,
        connection_reuse_time: float = 300.0,
        connection_reuse_limit: int = 100,
    ) -> None:
        self._retry = RetrySchedule(tuple(retry_delays), queue_lifetime)
        if max_concurrent < 1:
            raise ConfigError("max_concurrent must be at least 1")
        self._cache = ConnectionCache(
            cache_time=connection_cache_time,
            cache_size=connection_cache_size,
            per_endpoint=max_concurrent,
            reuse_time=connection_reuse_time,
            reuse_limit=connection_reuse_limit,
            quit_timeout=connect_timeout,
        )
        self._dialer_args = (tls_context, connect_timeout)
        self._dialer_made: Dialer | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._local_domains = local_domains
        self._mx_port = mx_port
        self._deliver_local = deliver_local
        self._capture_outbound = capture_outbound
        self._on_error = on_error
        self._require_tls = require_tls
        self._tls_policy = tls_policy
        self._clock = clock
        self._on_event = on_event
        self._on_queue_change = on_queue_change
        self.reporting_mta = reporting_mta
        self.events: list[RelayEvent] = []
        self._entries: dict[str, Entry] = {}
        # Up-to-date snapshot of each queued entry, refreshed when that entry changes, so that
        # queue() costs one list copy: the stack calls it on every event, and rebuilding every
        # snapshot each time made a backlog of n messages cost O(n^2) (tests/test_load.py).
        self._snapshots: dict[str, QueuedMessage] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self._spool = spool
        self._router_args = (dns_address, dns_timeout, zone_version, dns_source)
        self._router_made: Router | None = None

    @property
    def _dialer(self) -> Dialer:
        # The SMTP client (aiosmtplib) is imported on the first delivery to an MX.
        if self._dialer_made is None:
            from ._mxsession import Dialer

            context, timeout = self._dialer_args
            self._dialer_made = Dialer(tls_context=context, timeout=timeout)
        return self._dialer_made

    @property
    def _router(self) -> Router:
        # The router (and dns.asyncresolver, without a dns_source) comes with the first
        # MX look-up.
        if self._router_made is None:
            from ._mxroute import Router

            address, timeout, version, source = self._router_args
            self._router_made = Router(
                dns_address=address, timeout=timeout, zone_version=version, source=source
            )
        return self._router_made

    # -- public API ---------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        helo: str,
        mail_from: str,
        rcpt_tos: Sequence[str],
        raw: bytes,
        received_at: float,
        origin_id: str = "",
    ) -> QueuedMessage:
        """Queue a message and start its first delivery attempt now. Loop thread only.

        Args:
            helo: the name we announce in EHLO.
            mail_from: the envelope sender; "" or "<>" for a bounce.
            rcpt_tos: envelope recipients.
            raw: the message; stray CR and LF are normalised to CRLF.
            received_at: when the message was accepted (relay clock).
            origin_id: the accepting server's queue id, kept in the spool for diagnostics.

        Returns:
            A snapshot of the new queue entry.

        Raises:
            ValueError: CR, LF, NUL or angle brackets in an address, or no recipients.
            RuntimeError: the relay is closed.
            StorageError: with a spool, the message could not be written durably (nothing
                was queued or captured; the SMTP server answers 451).
        """
        return self.commit(
            self.prepare(
                helo=helo,
                mail_from=mail_from,
                rcpt_tos=rcpt_tos,
                raw=raw,
                received_at=received_at,
                origin_id=origin_id,
            )
        )

    def prepare(
        self,
        *,
        helo: str,
        mail_from: str,
        rcpt_tos: Sequence[str],
        raw: bytes,
        received_at: float,
        origin_id: str = "",
    ) -> Prepared:
        """The first half of :meth:`enqueue`: check the envelope and spool the message.

        Nothing is queued, captured or announced yet: follow with :meth:`commit`, or with
        :meth:`abandon` when the caller cannot accept the message after all (a local copy
        failed to store), so a 451 leaves no trace here either. Loop thread only.

        Raises:
            As :meth:`enqueue`.
        """
        if self._closed:
            raise RuntimeError("relay is closed")
        sender = "" if mail_from == "<>" else check_address(mail_from, what="sender")
        recipients = [check_address(r, what="recipient") for r in rcpt_tos]
        check_address(helo, what="HELO name")
        if not recipients:
            raise ConfigError("a message needs at least one recipient")
        entry = Entry(
            id=f"Q{next(self._ids):06d}",
            helo=helo,
            mail_from=sender,
            raw=normalize_line_endings(raw),
            received_at=received_at,
            pending=[],
        )
        local = delivery.normalize_domains(self._local_domains())
        if self._spool is not None:
            # Durable before anything else happens, so a failure leaves no trace (451).
            remote = [r for r in dict.fromkeys(recipients) if domain_of(r) in local]
            if remote:
                entry.spool_name = self._spool.add(
                    queue_id=entry.id,
                    origin_id=origin_id,
                    helo=helo,
                    mail_from=sender,
                    rcpt=remote,
                    raw=entry.raw,
                    received_at=received_at,
                )
        return Prepared(entry, tuple(dict.fromkeys(recipients)))

    def abandon(self, prepared: Prepared) -> None:
        """Forget a prepared message: its spool file goes, nothing was sent or announced."""
        entry = prepared.entry
        if entry.spool_name and self._spool is not None:
            try:
                self._spool.remove(entry.spool_name)
            except StorageError as exc:  # the caller is already answering 451
                log.error("relay %s: cannot withdraw from the spool: %s", entry.id, exc)
            entry.spool_name = None

    def commit(self, prepared: Prepared) -> QueuedMessage:
        """The second half of :meth:`enqueue`: queue, capture and start the first attempt."""
        entry = prepared.entry
        local = delivery.normalize_domains(self._local_domains())
        sender = entry.mail_from
        remote = [r for r in prepared.recipients if domain_of(r) in local]
        if remote:
            # In the queue before its first event: a listener that sees "queued" must see
            # the message in queue() too, or "wait until the queue is empty" holds at once.
            self._entries[entry.id] = entry
        for rcpt in prepared.recipients:
            if rcpt in remote:
                entry.pending.append(rcpt)
            self._event(entry, rcpt, "queued")
            if rcpt not in remote:
                self._capture(sender, rcpt, entry.raw)
                entry.delivered.append(rcpt)
                self._event(entry, rcpt, "captured")
        if entry.pending:
            self._start(entry)
        return entry.snapshot()

    def queue(self) -> list[QueuedMessage]:
        """Snapshots of the messages still waiting for at least one recipient.

        Meant for the loop thread; from another thread it is a best-effort view.
        """
        return list(self._snapshots.values())

    def restore(self) -> list[QueuedMessage]:
        """Queue again what the spool holds (a previous process's queue); attempt each now.

        Call it on the loop thread before new mail is enqueued (the stack does it at start).
        An entry keeps its old queue id unless that is taken. Unreadable spool files are moved
        aside by the spool and logged here; an entry whose addresses fail
        :func:`check_address` is logged and left in the spool. Without a spool: nothing.

        Returns:
            Snapshots of the restored entries.

        Raises:
            RuntimeError: the relay is closed.
            StorageError: the spool directory cannot be read.
        """
        if self._closed:
            raise RuntimeError("relay is closed")
        if self._spool is None:
            return []
        messages, corrupt = self._spool.load()
        for path in corrupt:
            log.warning("relay spool: unreadable file moved aside as %s", path)
        known = {e.spool_name for e in self._entries.values()}
        messages = [m for m in messages if m.name not in known]
        numbers = [int(m.queue_id[1:]) for m in messages if _QUEUE_ID.fullmatch(m.queue_id)]
        if numbers:
            self._ids = itertools.count(max(next(self._ids), max(numbers) + 1))
        restored: list[Entry] = []
        for message in messages:
            try:
                if message.mail_from:
                    check_address(message.mail_from, what="sender")
                check_address(message.helo, what="HELO name")
                for rcpt in message.rcpt:
                    check_address(rcpt, what="recipient")
            except ValueError as exc:
                log.warning("relay spool: %s not restored: %s", message.name, exc)
                continue
            queue_id = message.queue_id
            if not _QUEUE_ID.fullmatch(queue_id) or queue_id in self._entries:
                queue_id = f"Q{next(self._ids):06d}"
            entry = Entry(
                id=queue_id,
                helo=message.helo,
                mail_from=message.mail_from,
                raw=message.raw,
                received_at=message.received_at,
                pending=list(dict.fromkeys(message.rcpt)),
                attempts=message.attempts,
                spool_name=message.name,
            )
            self._entries[entry.id] = entry
            for rcpt in entry.pending:
                self._event(entry, rcpt, "queued", f"restored from the spool ({message.name})")
            restored.append(entry)
        for entry in restored:
            self._start(entry)
        return [entry.snapshot() for entry in restored]

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

    async def clear(self) -> None:
        """Forget every queued message and event (a test's clean slate); stays open.

        Cached MX connections are closed too (QUIT, at most 2 s, then dropped). They
        hold no message, but they were opened under the previous test's TLS policies, MX
        ports and faults, and a test that counts the connections its MX sees, or arms a fault
        at connect time, must see a fresh dial; one connection setup per test is all that
        closing them costs. Cached MX routes go for the same reason: a test that looks for
        its MX lookups in the DNS server's query log must find them.
        """
        if self._router_made is not None:
            self._router_made.forget()
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._cache.close_idle(graceful=True)
        for entry in self._entries.values():
            self._unspool(entry)
        self._entries.clear()
        self._snapshots.clear()
        self.events.clear()

    async def close(self) -> None:
        """Cancel retries and running attempts. Queued messages stay (and in the spool)."""
        self._closed = True
        self._cache.closed = True
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
        await self._cache.close_idle(graceful=False)

    # -- scheduling ---------------------------------------------------------------------------

    def _touch(self, entry: Entry) -> None:
        """Refresh the snapshot of ``entry`` after it changed (or drop it once dequeued)."""
        if self._entries.get(entry.id) is entry:
            self._snapshots[entry.id] = entry.snapshot()
        else:
            self._snapshots.pop(entry.id, None)

    def _event(self, entry: Entry, rcpt: str, step: str, detail: str = "") -> None:
        self._touch(entry)  # listeners read queue() from inside on_event
        event = RelayEvent(entry.id, rcpt, step, self._clock(), detail)
        self.events.append(event)
        if self._on_event is not None:
            self._guarded(self._on_event, event)

    def _guarded(self, callback: Callable[..., None], *args: object) -> None:
        """Call a hook of the stack; its failure is recorded (``on_error``), never ours."""
        try:
            callback(*args)
        except Exception as exc:
            self._on_error(exc)

    def _capture(self, sender: str, rcpt: str, raw: bytes) -> None:
        self._guarded(self._capture_outbound, sender, rcpt, raw)

    def _start(self, entry: Entry) -> None:
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

    async def _attempt(self, entry: Entry) -> None:
        # At most max_concurrent attempts at once: a burst of thousands of messages must not
        # open thousands of DNS queries and SMTP connections together (the stack's DNS server
        # dropped UDP queries and the MX hit its connection cap; tests/test_load.py).
        async with self._slots:
            await self._attempt_now(entry)

    async def _attempt_now(self, entry: Entry) -> None:
        entry.attempts += 1
        self._touch(entry)
        try:
            by_domain: dict[str, list[str]] = {}
            for rcpt in entry.pending:
                by_domain.setdefault(domain_of(rcpt), []).append(rcpt)
            for domain, rcpts in by_domain.items():
                outcomes = await self._deliver_domain(entry, domain, rcpts)
                # The MX's answers were settled as they came (_session); what is left here is
                # deferrals and routing outcomes (NXDOMAIN, null MX).
                self._conclude(entry, {rcpt: outcomes[rcpt] for rcpt in rcpts})
        except Exception as exc:  # not CancelledError: a cancelled attempt ends here
            # A bug in the relay: record it and keep the message for a retry.
            self._on_error(exc)
            entry.last_error = f"internal error: {exc!r}"
            self._touch(entry)
        self._reschedule(entry)

    def _conclude(self, entry: Entry, outcomes: dict[str, Outcome]) -> None:
        """Settle ``outcomes``; if any recipient is done, record that in the spool at once.

        The one place where outcomes meet the spool: ``_session`` calls it with the MX's final
        answers right after the 250 to the final dot (or the 5xx), before anything else is
        sent on that connection, and ``_attempt_now`` with the rest. Recipients settled
        already are skipped, so each is settled (and bounced) once.
        """
        done = False
        for rcpt, outcome in outcomes.items():
            if rcpt not in entry.pending:
                continue
            self._settle(entry, rcpt, outcome)
            done = done or not isinstance(outcome, Temporary)
        if done:
            self._persist(entry)

    def _settle(self, entry: Entry, rcpt: str, outcome: Outcome) -> None:
        if outcome is None:
            entry.pending.remove(rcpt)
            entry.delivered.append(rcpt)
            self._touch(entry)
        elif isinstance(outcome, Permanent):
            entry.pending.remove(rcpt)
            entry.bounced.append(rcpt)
            self._event(entry, rcpt, "bounced", outcome.diagnostic)
            self._bounce(entry, rcpt, outcome)
        else:
            entry.last_error = outcome.reason
            self._event(entry, rcpt, "deferred", outcome.reason)

    def _reschedule(self, entry: Entry) -> None:
        if self._entries.get(entry.id) is not entry:
            return  # clear() forgot it during the attempt
        if not entry.pending:
            self._dequeue(entry)
            return
        waited = self._clock() - entry.received_at
        if self._retry.expired(waited):
            outcome = delivery.expiry(entry.last_error)
            for rcpt in list(entry.pending):
                entry.pending.remove(rcpt)
                entry.bounced.append(rcpt)
                self._event(entry, rcpt, "expired", entry.last_error or "no attempt succeeded")
                self._bounce(entry, rcpt, outcome)
            self._dequeue(entry)
            return
        if self._closed:
            return
        delay = self._retry.delay(entry.attempts, waited)
        entry.next_attempt = self._clock() + delay
        entry.timer = asyncio.get_running_loop().call_later(delay, self._start, entry)
        self._touch(entry)
        self._queue_changed()

    def _dequeue(self, entry: Entry) -> None:
        self._entries.pop(entry.id, None)
        self._snapshots.pop(entry.id, None)
        self._unspool(entry)
        self._queue_changed()

    def _queue_changed(self) -> None:
        if self._on_queue_change is not None:
            self._guarded(self._on_queue_change)

    def _persist(self, entry: Entry) -> None:
        """Record in the spool the recipients of ``entry`` still pending (after some settled).

        Runs right after the remote's 250 (or the DSN), before the next command on that
        connection, so only a crash in between costs one duplicate.
        A write error cannot be answered with a 4xx any more: the older record stays, which at
        worst sends again after a restart, and the error is logged.
        """
        if self._spool is None or entry.spool_name is None:
            return
        if not entry.pending:
            self._unspool(entry)
            return
        try:
            self._spool.update(entry.spool_name, rcpt=entry.pending, attempts=entry.attempts)
        except StorageError as exc:
            log.warning("relay %s: %s", entry.id, exc)

    def _unspool(self, entry: Entry) -> None:
        """Every recipient of ``entry`` settled (or clear() forgot it): drop its spool file."""
        name, entry.spool_name = entry.spool_name, None
        if self._spool is None or name is None:
            return
        try:
            self._spool.remove(name)
        except StorageError as exc:
            log.warning("relay %s: %s", entry.id, exc)

    def _bounce(self, entry: Entry, rcpt: str, outcome: Permanent) -> None:
        dsn = delivery.bounce_message(
            original=entry.raw,
            mail_from=entry.mail_from,
            recipient=rcpt,
            outcome=outcome,
            reporting_mta=self.reporting_mta,
            arrival_date=entry.received_at,
            now=self._clock(),
        )
        if dsn is None:
            return  # RFC 3464 §2: never bounce a bounce.
        if domain_of(entry.mail_from) in delivery.normalize_domains(self._local_domains()):
            self._guarded(self._deliver_local, entry.mail_from, dsn, "INBOX")
        else:
            self._guarded(self._capture_outbound, "", entry.mail_from, dsn)

    # -- routing ------------------------------------------------------------------------------

    async def _deliver_domain(
        self, entry: Entry, domain: str, rcpts: list[str]
    ) -> dict[str, Outcome]:
        route = await self._router.route(domain)
        for rcpt in rcpts:
            self._event(entry, rcpt, "mx-lookup", delivery.route_detail(route))
        if not isinstance(route, list):
            return dict.fromkeys(rcpts, route)
        attempt = DomainAttempt(domain, rcpts)
        for host, addresses in route:
            for ip in addresses:
                if not attempt.remaining:
                    break
                try:
                    result = await self._session(entry, host, ip, attempt.remaining)
                except StepError as exc:
                    log.info("relay %s: %s", entry.id, attempt.host_failed(host, ip, str(exc)))
                    continue
                attempt.host_answered(result)
        return attempt.finish()

    # -- one MX address -------------------------------------------------------------------------

    def _policy_for(self, domain: str) -> TLSPolicy:
        found = self._tls_policy(domain) if self._tls_policy is not None else None
        return delivery.policy_for(
            found, hooked=self._tls_policy is not None, require_tls=self._require_tls
        )

    def _tls_failure(
        self,
        entry: Entry,
        rcpts: list[str],
        policy: TLSPolicy,
        domain: str,
        failure: tuple[ResultType, str, str],
        *,
        where: str,
    ) -> None:
        """Record a TLS failure ``(result, detail, fallback)``; under enforce, fail the host.

        Raises:
            StepError: the policy is ``enforce``: defer, never fall back.
        """
        result, detail, fallback = failure
        words = delivery.tls_failure(
            result, detail, where=where, policy=policy, domain=domain, fallback=fallback
        )
        log.warning("relay %s: %s", entry.id, words.event)
        for rcpt in rcpts:
            self._event(entry, rcpt, "tls-failure", words.event)
        if words.deferral is not None:
            raise StepError(words.deferral)

    async def _connect(
        self, entry: Entry, endpoint: Endpoint, rcpts: list[str], policy: TLSPolicy, domain: str
    ) -> tuple[Connection, Started | None]:
        """A cached connection to ``endpoint`` that took MAIL FROM, or a new one (no start).

        A cached connection gets ``MAIL FROM`` (with RCPT and DATA when the MX pipelines)
        before anything is announced: one that fails it in any way was stale, and is
        replaced at once, by another cached one or a fresh dial.
        """
        host, ip, port, _ = endpoint
        while (conn := self._cache.take(endpoint, policy.mode)) is not None:
            taken = False
            try:
                started = await self._dialer.start(conn, mail_from=entry.mail_from, rcpts=rcpts)
                if started.mail.code == 250 or started.refused is not None:
                    taken = True
                    return conn, started
                failure = f"{started.mail.code} {started.mail.message}"
            except StepError as exc:
                failure = str(exc)
            finally:
                if not taken:  # also when cancelled mid-command
                    discard(conn.client)
            log.info(
                "relay %s: cached connection to %s[%s] failed MAIL FROM (%s); dialling",
                entry.id,
                host,
                ip,
                failure,
            )

        def on_tls_failure(result: ResultType, detail: str, fallback: str) -> None:
            failure = (result, detail, fallback)
            self._tls_failure(entry, rcpts, policy, domain, failure, where=f"{host}[{ip}]")

        client, security, failures = await self._dialer.open(
            helo=entry.helo,
            host=host,
            ip=ip,
            port=port,
            verify=policy.mode != "none",
            on_tls_failure=on_tls_failure,
        )
        opened = asyncio.get_running_loop().time()
        return Connection(client, endpoint, security, policy.mode, failures, opened), None

    async def _session(
        self, entry: Entry, host: str, ip: str, rcpts: list[str]
    ) -> dict[str, Outcome]:
        """One SMTP transaction with one MX address; ``StepError`` means try the next."""
        port = self._mx_port(host)
        domain = domain_of(rcpts[0])
        policy = self._policy_for(domain)
        where = f"{host}[{ip}]"
        if not policy.mx_allowed(host):
            # RFC 8461 §4.1: not a valid MX under this policy; enforce never dials it.
            failure = (
                ResultType.CERTIFICATE_HOST_MISMATCH,
                delivery.mx_mismatch(policy, host),
                "delivering anyway",
            )
            self._tls_failure(entry, rcpts, policy, domain, failure, where=where)
        conn, started = await self._connect(
            entry, (host, ip, port, entry.helo), rcpts, policy, domain
        )
        reused = started is not None
        reusable = False
        try:
            note = ""
            if reused:
                note = " (reused)"
                # The message travels over what those failures left: say so for it too.
                for failure in conn.failures:
                    self._tls_failure(entry, rcpts, policy, domain, failure, where=where)
            for rcpt in rcpts:
                self._event(entry, rcpt, "connected", f"{where}:{port}{conn.security}{note}")
            outcomes, reusable = await self._dialer.transaction(
                conn,
                mail_from=entry.mail_from,
                raw=entry.raw,
                host=host,
                rcpts=rcpts,
                started=started,
            )
            for rcpt, outcome in outcomes.items():
                if outcome is None:
                    self._event(entry, rcpt, "delivered", host)
            # Recorded (spool included) before RSET or QUIT goes out (docs/security.md A9.4).
            self._conclude(
                entry, {r: o for r, o in outcomes.items() if not isinstance(o, Temporary)}
            )
            if conn.security and any(outcome is None for outcome in outcomes.values()):
                log.warning("relay %s: delivered to %s%s", entry.id, where, conn.security)
            return outcomes
        finally:
            await self._cache.release(conn, reusable=reusable)
