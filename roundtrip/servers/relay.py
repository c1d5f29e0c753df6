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
   resolver, which knows nothing of our zones. How much TLS is required is the recipient
   domain's policy (``tls_policy``, MTA-STS modes of RFC 8461): under ``enforce`` an MX that
   matches no ``mx`` pattern, a missing STARTTLS or a failed verification is a temporary
   failure for that host, never a plaintext fallback; ``testing`` records the failure and
   delivers anyway; ``none`` or no policy is opportunistic TLS (RFC 7435). Failures carry
   their TLS-RPT result type (RFC 8460 §4.3) in the ``tls-failure`` event and the reason.
   After a transaction that ended in step, the connection is reset with RSET and kept idle for
   ``connection_cache_time`` (2 s; Postfix's SMTP connection cache): the next message to the
   same MX host, address, port and HELO name takes it instead of dialling, if its TLS meets
   that message's policy (verified TLS meets every mode; plaintext or unverified TLS only the
   mode that allowed it). The DNS lookups still run for every message. A cached connection
   that turns out dead (EOF, 421 or any failure of MAIL FROM) is dropped and a fresh one
   dialled at once. Bounds: ``connection_cache_size`` idle connections, 300 s and 100
   messages per connection; idle ones get QUIT when their time is up, ``clear()`` closes
   them with QUIT and ``close()`` drops them. The ``connected`` event says ``(reused)``.
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

Exactly once: a recipient is settled as soon as the final ``250`` to DATA arrives (or its 5xx)
and is never attempted again. A reply lost between the remote's 250 and our reading it can
still cause one duplicate on retry (RFC 1047: a duplicate is better than a loss).

Durability (SECURITY.md A9.4): with a ``spool`` (:mod:`roundtrip.spool`; the stack gives one
with the Maildir store) ``enqueue`` writes the message to disk and fsyncs it before returning,
so before the submission server's 250. The recipients still pending are recorded right after
the MX's reply to the final dot (recipients refused at RCPT with it), before RSET or QUIT is
sent (``_conclude``); routing outcomes and deferrals after the domain's attempt. The file goes
when no recipient is left. :meth:`Relay.restore` queues again what a killed process left. Only
a crash between a remote 250 and that record costs one duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from ..errors import StorageError
from ..protocols.dsn import build_dsn
from ..protocols.tlspolicy import ResultType, TLSPolicy, verify_failure_result
from ..spool import RelaySpool

__all__ = ["Prepared", "QueuedMessage", "Relay", "RelayEvent"]

log = logging.getLogger("roundtrip.servers.relay")

_STRAY_EOL = re.compile(rb"\r\n|\r|\n")
#: Most bytes of message content handed to the transport in one write (as servers/_conn.py):
#: the transport (and the TLS layer under it) then holds about one slice, not the message.
_DATA_SLICE = 256 * 1024
_FORBIDDEN_IN_ADDRESS = re.compile(r"[\r\n\x00<>]")
#: Error replies (4xx/5xx) on one connection after which it is not cached again: an MX closes
#: a session with 421 after its error limit (Postfix smtpd_hard_error_limit and our MX's
#: ``SMTPLimits.max_errors`` are 20), which would hit a later message mid-transaction.
_REUSE_ERROR_LIMIT = 10
#: Seconds ``clear()`` waits for the QUITs of the cached connections (sent all at once) before
#: dropping them: well inside the 5 s that ``MailStack.reset()`` gives ``clear()``, and
#: enough for test MXs that take their time (test_catalogue_a's InjectingMX waits 0.5 s for
#: pipelined bytes before each reply).
_CLEAR_QUIT_TIMEOUT = 2.0

#: Steps reported in :attr:`Relay.events`, in the order they happen for one recipient.
STEPS = (
    "queued",
    "captured",
    "mx-lookup",
    "tls-failure",
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
    #: The entry's name in the relay's spool (None without a spool).
    spool_name: str | None = None

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


@dataclass(frozen=True)
class Prepared:
    """A message :meth:`Relay.prepare` checked and spooled, waiting for commit or abandon."""

    entry: _Entry
    recipients: tuple[str, ...]


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

#: What a cached connection is filed under: MX host, IP, port and the HELO name it announced.
_Endpoint = tuple[str, str, int, str]
#: A TLS failure recorded when a connection was opened: result type, detail, what we did.
_Failure = tuple[ResultType, str, str]


@dataclass(eq=False)
class _Connection:
    """One SMTP connection to an MX, used by one delivery at a time, cached between them."""

    client: aiosmtplib.SMTP
    endpoint: _Endpoint
    #: "" for verified TLS, else the note events carry (" without TLS", ...).
    security: str
    #: The policy mode it was opened under: a degraded connection is reused only under it.
    mode: str
    #: TLS failures recorded when it was opened, recorded again for each message it carries.
    failures: tuple[_Failure, ...]
    #: When it was opened (loop clock).
    opened: float
    messages: int = 0
    errors: int = 0
    timer: asyncio.TimerHandle | None = None


#: No policy (or mode ``none``): opportunistic TLS, plaintext when STARTTLS is not offered.
_NO_POLICY = TLSPolicy(mode="none")
#: ``require_tls`` without a policy hook: enforce, whatever the MX name.
_REQUIRED = TLSPolicy(mode="enforce")


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
        require_tls: without ``tls_policy``: True acts as an ``enforce`` policy without MX
            patterns for every domain (never deliver without verified STARTTLS; defer
            instead); False as no policy (opportunistic TLS, plaintext if not offered).
        tls_policy: the outbound TLS policy of a recipient domain (lowercase), or None for
            none (opportunistic, RFC 7435); see :mod:`roundtrip.protocols.tlspolicy`. When
            given, ``require_tls`` is ignored.
        clock: wall clock for timestamps and the queue lifetime.
        dns_timeout: seconds a whole DNS resolution may take.
        on_event: called with each :class:`RelayEvent` as it is appended to :attr:`events`.
        reporting_mta: the host name that DSNs name as the reporting MTA.
        max_concurrent: delivery attempts running at once; the rest wait their turn (Postfix
            default_destination_concurrency_limit is 20).
        spool: keep the queue on disk too (RFC 5321 §6.1, SECURITY.md A9.4): ``enqueue``
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
        on_event: Callable[[RelayEvent], None] | None = None,
        reporting_mta: str = "localhost",
        max_concurrent: int = 20,
        spool: RelaySpool | None = None,
        connection_cache_time: float = 2.0,
        connection_cache_size: int = 20,
        connection_reuse_time: float = 300.0,
        connection_reuse_limit: int = 100,
    ) -> None:
        if not retry_delays:
            raise ValueError("retry_delays must hold at least one delay")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if connection_cache_time < 0 or connection_reuse_time < 0:
            raise ValueError("connection cache and reuse times must not be negative")
        if connection_cache_size < 0 or connection_reuse_limit < 1:
            raise ValueError(
                "connection_cache_size must not be negative, connection_reuse_limit at least 1"
            )
        self._cache_time = connection_cache_time
        self._cache_size = connection_cache_size
        self._cache_per_endpoint = min(connection_cache_size, max_concurrent)
        self._reuse_time = connection_reuse_time
        self._reuse_limit = connection_reuse_limit
        #: Idle connections by endpoint, oldest first; taken newest first.
        self._idle: dict[_Endpoint, list[_Connection]] = {}
        self._idle_count = 0
        #: QUIT of expired idle connections under way.
        self._reaping: set[asyncio.Task[None]] = set()
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
        self._tls_policy = tls_policy
        self._unverified_context: ssl.SSLContext | None = None
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
        self._spool = spool
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
        if self._spool is not None:
            # Durable before anything else happens, so a failure leaves no trace (451).
            remote = [r for r in dict.fromkeys(recipients) if _domain_of(r) in local]
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
        local = {d.lower().rstrip(".") for d in self._local_domains()}
        sender = entry.mail_from
        for rcpt in prepared.recipients:
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
        numbers = [int(m.queue_id[1:]) for m in messages if re.fullmatch(r"Q\d{1,9}", m.queue_id)]
        if numbers:
            self._ids = itertools.count(max(next(self._ids), max(numbers) + 1))
        restored: list[_Entry] = []
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
            if not re.fullmatch(r"Q\d{1,9}", queue_id) or queue_id in self._entries:
                queue_id = f"Q{next(self._ids):06d}"
            entry = _Entry(
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

    def retry_now(self) -> None:
        """Run every scheduled retry at once (tests use it to skip the backoff)."""
        for entry in list(self._entries.values()):
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
                self._start(entry)

    async def clear(self) -> None:
        """Forget every queued message and event (a test's clean slate); stays open.

        Cached MX connections are closed too (QUIT, at most 2 s, then dropped). They
        hold no message, but they were opened under the previous test's TLS policies, MX
        ports and faults, and a test that counts the connections its MX sees, or arms a fault
        at connect time, must see a fresh dial; one connection setup per test is all that
        closing them costs.
        """
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_idle(graceful=True)
        for entry in self._entries.values():
            self._unspool(entry)
        self._entries.clear()
        self._snapshots.clear()
        self.events.clear()

    async def close(self) -> None:
        """Cancel retries and running attempts. Queued messages stay (and in the spool)."""
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
        await self._close_idle(graceful=False)

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
                # The MX's answers were settled as they came (_session); what is left here is
                # deferrals and routing outcomes (NXDOMAIN, null MX).
                self._conclude(entry, {rcpt: outcomes[rcpt] for rcpt in rcpts})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in the relay: record it and keep the message for a retry.
            self._on_error(exc)
            entry.last_error = f"internal error: {exc!r}"
            self._touch(entry)
        self._reschedule(entry)

    def _conclude(self, entry: _Entry, outcomes: dict[str, _Outcome]) -> None:
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
            done = done or not isinstance(outcome, _Temporary)
        if done:
            self._persist(entry)

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
            self._unspool(entry)
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
            self._unspool(entry)
            return
        if self._closed:
            return
        index = min(entry.attempts - 1, len(self._retry_delays) - 1)
        # Wake up no later than the expiry, so the 4.4.7 bounce is on time.
        delay = max(0.0, min(self._retry_delays[index], self._queue_lifetime - waited))
        entry.next_attempt = self._clock() + delay
        entry.timer = asyncio.get_running_loop().call_later(delay, self._start, entry)
        self._touch(entry)

    def _persist(self, entry: _Entry) -> None:
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

    def _unspool(self, entry: _Entry) -> None:
        """Every recipient of ``entry`` settled (or clear() forgot it): drop its spool file."""
        name, entry.spool_name = entry.spool_name, None
        if self._spool is None or name is None:
            return
        try:
            self._spool.remove(name)
        except StorageError as exc:
            log.warning("relay %s: %s", entry.id, exc)

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
        domain = _domain_of(rcpts[0])
        policy = self._policy_for(domain)
        if not policy.mx_allowed(host):
            # RFC 8461 §4.1: not a valid MX under this policy; enforce never dials it.
            patterns = ", ".join(policy.mx or ())
            self._tls_failure(
                entry,
                rcpts,
                policy,
                domain,
                ResultType.CERTIFICATE_HOST_MISMATCH,
                f"MX host {host} matches no mx pattern of the policy ({patterns})",
                where=f"{host}[{ip}]",
                fallback="delivering anyway",
            )
        endpoint = (host, ip, port, entry.helo)
        conn = await self._reuse(entry, endpoint, policy.mode)
        reused = conn is not None
        if conn is None:
            client, security, failures = await self._open(
                entry, host, ip, port, rcpts, policy, domain
            )
            loop = asyncio.get_running_loop()
            conn = _Connection(client, endpoint, security, policy.mode, failures, loop.time())
        reusable = False
        try:
            note = ""
            if reused:
                note = " (reused)"
                # The message travels over what those failures left: say so for it too.
                for result, detail, fallback in conn.failures:
                    self._tls_failure(
                        entry,
                        rcpts,
                        policy,
                        domain,
                        result,
                        detail,
                        where=f"{host}[{ip}]",
                        fallback=fallback,
                    )
            for rcpt in rcpts:
                self._event(entry, rcpt, "connected", f"{host}[{ip}]:{port}{conn.security}{note}")
            outcomes, reusable = await self._transaction(entry, conn, host, rcpts, reused=reused)
            # Recorded (spool included) before RSET or QUIT goes out (SECURITY.md A9.4).
            self._conclude(
                entry, {r: o for r, o in outcomes.items() if not isinstance(o, _Temporary)}
            )
            if conn.security and any(outcome is None for outcome in outcomes.values()):
                log.warning("relay %s: delivered to %s[%s]%s", entry.id, host, ip, conn.security)
            return outcomes
        finally:
            await self._release(conn, reusable=reusable)

    # -- connection cache (Postfix smtp_connection_cache_*, smtp_connection_reuse_*) ---------

    async def _reuse(self, entry: _Entry, endpoint: _Endpoint, mode: str) -> _Connection | None:
        """An idle connection to ``endpoint`` that has accepted MAIL FROM for ``entry``, or None.

        Taken out of the cache (so no other delivery can use it) before anything is sent. A
        connection that is not verified TLS serves only under the policy mode that allowed
        it; verified TLS serves every mode. One that turns out dead (EOF, 421, any failure of
        MAIL FROM) is closed and the next is tried: the caller then dials afresh, so a stale
        connection never costs a deferral or a bounce.
        """
        while True:
            conn = self._take(endpoint, mode)
            if conn is None:
                return None
            if not conn.client.is_connected:  # the MX closed it while it was idle
                _discard(conn.client)
                continue
            try:
                await conn.client.mail(entry.mail_from)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                log.info(
                    "relay %s: cached connection to %s[%s] failed MAIL FROM (%s); dialling",
                    entry.id,
                    endpoint[0],
                    endpoint[1],
                    _describe(exc),
                )
                _discard(conn.client)
                continue
            except BaseException:
                _discard(conn.client)
                raise
            return conn

    def _take(self, endpoint: _Endpoint, mode: str) -> _Connection | None:
        idle = self._idle.get(endpoint)
        if not idle:
            return None
        for index in range(len(idle) - 1, -1, -1):  # newest first: the likeliest alive
            conn = idle[index]
            if conn.security and conn.mode != mode:
                continue
            del idle[index]
            if not idle:
                del self._idle[endpoint]
            self._idle_count -= 1
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            return conn
        return None

    def _cacheable(self, conn: _Connection) -> bool:
        return (
            self._cache_time > 0
            and not self._closed
            and conn.client.is_connected
            and conn.messages < self._reuse_limit
            and conn.errors < _REUSE_ERROR_LIMIT
            and asyncio.get_running_loop().time() - conn.opened < self._reuse_time
            and self._idle_count < self._cache_size
            and len(self._idle.get(conn.endpoint, ())) < self._cache_per_endpoint
        )

    async def _release(self, conn: _Connection, *, reusable: bool) -> None:
        """After a delivery: RSET and cache the connection if it may serve again, else QUIT.

        ``reusable``: the transaction ended in step (the MX answered the final dot, or
        refused MAIL FROM, every RCPT or DATA). An MX that fails the RSET is not cached.
        """
        client = conn.client
        said_goodbye = cached = False
        try:
            if reusable and self._cacheable(conn):
                try:
                    await client.rset()
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    log.info("relay: RSET to %s[%s]: %s", *conn.endpoint[:2], _describe(exc))
                else:
                    cached = self._cache(conn)
                    if cached:
                        return
            with contextlib.suppress(Exception):
                if client.is_connected:
                    await client.quit()
                    said_goodbye = True
        finally:
            # Also when the task is cancelled (reset, stop) while RSET or QUIT is under way.
            if not cached:
                if said_goodbye and not self._closed:
                    client.close()
                else:
                    _discard(client)

    def _cache(self, conn: _Connection) -> bool:
        if not self._cacheable(conn):  # the relay closed or the cache filled during RSET
            return False
        self._idle.setdefault(conn.endpoint, []).append(conn)
        self._idle_count += 1
        conn.timer = asyncio.get_running_loop().call_later(self._cache_time, self._expire, conn)
        return True

    def _expire(self, conn: _Connection) -> None:
        """The idle time is over: take ``conn`` out of the cache and say QUIT."""
        conn.timer = None
        idle = self._idle.get(conn.endpoint, [])
        if conn not in idle:
            return
        idle.remove(conn)
        if not idle:
            del self._idle[conn.endpoint]
        self._idle_count -= 1
        if not conn.client.is_connected:
            _discard(conn.client)
            return
        task = asyncio.get_running_loop().create_task(
            self._goodbye(conn.client), name=f"relay-quit-{conn.endpoint[0]}"
        )
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _goodbye(self, client: aiosmtplib.SMTP, timeout: float | None = None) -> None:
        said_goodbye = False
        try:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit(timeout=self._connect_timeout if timeout is None else timeout)
                said_goodbye = True
        finally:
            if said_goodbye and not self._closed:
                client.close()
            else:
                _discard(client)

    async def _close_idle(self, *, graceful: bool) -> None:
        """Close every cached connection before returning: QUIT first if ``graceful``.

        Without ``graceful`` (the relay closes, the loop is about to stop) nothing is sent:
        the connections are between transactions, so the MX loses nothing.
        """
        conns = [conn for idle in self._idle.values() for conn in idle]
        self._idle.clear()
        self._idle_count = 0
        for conn in conns:
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
        reaping = list(self._reaping)
        if graceful:
            waits: list[Awaitable[object]] = [
                self._goodbye(conn.client, _CLEAR_QUIT_TIMEOUT) for conn in conns
            ]
            if reaping:  # expired ones saying QUIT already: the same bound, at the same time
                waits.append(asyncio.wait(reaping, timeout=_CLEAR_QUIT_TIMEOUT))
            await asyncio.gather(*waits)
        else:
            for conn in conns:
                _discard(conn.client)
        for task in reaping:
            task.cancel()
        if reaping:
            await asyncio.gather(*reaping, return_exceptions=True)

    # -- outbound TLS policy (RFC 8461, RFC 7435; failures named as in RFC 8460) -------------

    def _policy_for(self, domain: str) -> TLSPolicy:
        if self._tls_policy is not None:
            policy = self._tls_policy(domain)
            return policy if policy is not None else _NO_POLICY
        return _REQUIRED if self._require_tls else _NO_POLICY

    def _unverified(self) -> ssl.SSLContext:
        """Encryption without authentication, for opportunistic TLS (RFC 7435 §3)."""
        if self._unverified_context is None:
            # Not create_default_context(): loading the system trust store costs ~70 ms and
            # nothing is verified here anyway.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._unverified_context = context
        return self._unverified_context

    def _client(self, entry: _Entry, ip: str, port: int) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=ip,
            port=port,
            local_hostname=entry.helo,
            start_tls=False,  # upgraded in _open, so the certificate is checked against the MX
            validate_certs=True,
            tls_context=self._tls_context,
            timeout=self._connect_timeout,
        )

    def _tls_failure(
        self,
        entry: _Entry,
        rcpts: list[str],
        policy: TLSPolicy,
        domain: str,
        result: ResultType,
        detail: str,
        *,
        where: str,
        fallback: str,
    ) -> None:
        """Record a TLS failure by its TLS-RPT result type; under ``enforce``, fail the host.

        The event and the log name the MX (``where``); the reason does not, as the caller of
        ``_session`` prefixes it with the MX already.

        Raises:
            _HostFailedError: the policy is ``enforce``: defer, never fall back.
        """
        if policy.requires_tls:
            outcome = f"TLS policy of {domain}: enforce; deferred, no plaintext"
        else:
            outcome = f"TLS policy of {domain}: {policy.mode}; {fallback}"
        text = f"{result}: {where}: {detail} ({outcome})"
        log.warning("relay %s: %s", entry.id, text)
        for rcpt in rcpts:
            self._event(entry, rcpt, "tls-failure", text)
        if policy.requires_tls:
            raise _HostFailedError(f"{result}: {detail} ({outcome})")

    async def _open(
        self,
        entry: _Entry,
        host: str,
        ip: str,
        port: int,
        rcpts: list[str],
        policy: TLSPolicy,
        domain: str,
    ) -> tuple[aiosmtplib.SMTP, str, tuple[_Failure, ...]]:
        """Connect, EHLO and STARTTLS as ``policy`` asks.

        The connection starts in plaintext and is upgraded with ``starttls(server_hostname=
        host)``: we dial the IP our DNS gave us but verify the certificate against the MX
        *name*. Under ``enforce`` every TLS failure raises; under ``testing`` a failed
        verification is recorded and the delivery goes on over a new connection with
        unverified TLS; under ``none`` (or no policy) TLS is not verified at all (RFC 7435).
        aiosmtplib drops bytes the server sent after its ``220`` to STARTTLS (SECURITY.md A3.8).

        Returns:
            The client, ready for MAIL FROM; "" for verified TLS, else a note for events
            (" without TLS", " over unverified TLS"); and the TLS failures recorded.

        Raises:
            _HostFailedError: this host cannot take the message now.
        """
        verify = policy.mode != "none"
        where = f"{host}[{ip}]"
        failures: list[_Failure] = []

        def fail(result: ResultType, detail: str, fallback: str) -> None:
            failures.append((result, detail, fallback))
            self._tls_failure(
                entry, rcpts, policy, domain, result, detail, where=where, fallback=fallback
            )

        client = self._client(entry, ip, port)
        try:
            try:
                await client.connect()
                await client.ehlo()
                if not client.supports_extension("starttls"):
                    fail(
                        ResultType.STARTTLS_NOT_SUPPORTED,
                        "STARTTLS not offered",
                        "delivering without TLS",
                    )
                    return client, " without TLS", tuple(failures)
                context = self._tls_context if verify else self._unverified()
                try:
                    await client.starttls(server_hostname=host, tls_context=context)
                except aiosmtplib.SMTPResponseException as exc:
                    # Still in plaintext and in step: a refusal is as good as no offer.
                    fail(
                        ResultType.STARTTLS_NOT_SUPPORTED,
                        f"STARTTLS refused: {exc.code} {exc.message}",
                        "delivering without TLS",
                    )
                    return client, " without TLS", tuple(failures)
                except ssl.SSLError as exc:
                    if not verify:
                        raise
                    fail(_tls_result(exc), _describe(exc), "delivering over unverified TLS")
                    # testing: the failed handshake left nothing to talk over; start again.
                    _discard(client)
                    client = self._client(entry, ip, port)
                    await client.connect()
                    await client.ehlo()
                    if not client.supports_extension("starttls"):
                        return client, " without TLS", tuple(failures)
                    await client.starttls(server_hostname=host, tls_context=self._unverified())
                    await client.ehlo()
                    return client, " over unverified TLS", tuple(failures)
                await client.ehlo()
                return client, "" if verify else " over unverified TLS", tuple(failures)
            except aiosmtplib.SMTPResponseException as exc:
                raise _HostFailedError(f"{exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _HostFailedError(_describe(exc)) from exc
        except BaseException:
            _discard(client)
            raise

    async def _transaction(
        self, entry: _Entry, conn: _Connection, host: str, rcpts: list[str], *, reused: bool
    ) -> tuple[dict[str, _Outcome], bool]:
        """MAIL (unless ``_reuse`` sent it already), RCPT, DATA over ``conn``.

        Returns:
            The outcome of each recipient, and whether the session ended in step, so that
            the connection may carry another message after RSET.
        """
        client = conn.client
        conn.messages += 1
        if not reused:
            try:
                await client.mail(entry.mail_from)
            except aiosmtplib.SMTPResponseException as exc:
                conn.errors += 1
                outcome = _reply_outcome(exc.code, exc.message, host)
                if isinstance(outcome, _Temporary):
                    raise _HostFailedError(f"MAIL FROM: {exc.code} {exc.message}") from exc
                return dict.fromkeys(rcpts, outcome), True
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _HostFailedError(_describe(exc)) from exc
        outcomes: dict[str, _Outcome] = {}
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                conn.errors += 1
                outcomes[rcpt] = _reply_outcome(exc.code, exc.message, host)
                continue
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _HostFailedError(_describe(exc)) from exc
            accepted.append(rcpt)
        if not accepted:
            return outcomes, True
        try:
            reply = await client.execute_command(b"DATA")
            if reply.code == 354:
                reply = await self._send_content(client, entry.raw)
        except aiosmtplib.SMTPResponseException as exc:  # a malformed or over-long reply
            outcomes.update(dict.fromkeys(accepted, _reply_outcome(exc.code, exc.message, host)))
            return outcomes, False
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise _HostFailedError(_describe(exc)) from exc
        if reply.code != 250:  # to DATA (not 354) or to the final dot
            conn.errors += 1
            outcomes.update(
                dict.fromkeys(accepted, _reply_outcome(reply.code, reply.message, host))
            )
            return outcomes, True
        for rcpt in accepted:
            outcomes[rcpt] = None
            self._event(entry, rcpt, "delivered", host)
        return outcomes, True

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


def _discard(client: aiosmtplib.SMTP) -> None:
    """Drop a connection at once: no QUIT, no TLS close_notify, nothing left to flush.

    A graceful close waits for buffered bytes (or a TLS shutdown) to go out; on a connection
    that failed, or while the loop is being stopped, that wait can outlive the loop and leave
    an unclosed transport behind.
    """
    transport = client.transport
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    client.close()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {text}"
    return text


def _tls_result(exc: ssl.SSLError) -> ResultType:
    """The TLS-RPT result type of a failed TLS handshake (RFC 8460 §4.3)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verify_failure_result(exc.verify_code, exc.verify_message or "")
    return ResultType.VALIDATION_FAILURE


def _reply_outcome(code: int, message: str, host: str) -> _Permanent | _Temporary:
    text = " ".join(message.split())
    if 500 <= code < 600:
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", text)
        status = match.group(1) if match else "5.0.0"
        if not status.startswith("5"):
            status = "5" + status[1:]
        return _Permanent(status, f"smtp; {code} {text}", host)
    return _Temporary(f"{host}: {code} {text}")
