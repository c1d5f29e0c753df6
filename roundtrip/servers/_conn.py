"""asyncio adapter between a socket and a sans-IO line machine (POP3, IMAP).

The machine decides everything; this module only moves bytes, upgrades the transport for
STARTTLS/STLS, enforces the idle timeout, forwards store changes (for IMAP IDLE and untagged
updates), and records unexpected exceptions on the stack's loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ..errors import RemoteProtocolError
from ..protocols._limits import AuthPenalties, ConnectionCounts
from ..protocols._lines import (
    AuthenticationFailed,
    AuthenticationSucceeded,
    ConnectionClosed,
    Event,
    StartTLSRequested,
)
from . import _recording

__all__ = [
    "ConnectionInfo",
    "LineServerProtocol",
    "ListenerLimits",
    "Machine",
    "MachineFactory",
    "serve",
]

log = logging.getLogger("roundtrip.servers")

#: Most bytes handed to the transport in one write. Output is written while the transport
#: has not asked us to pause (``pause_writing``), so a 40 MB literal passes through the TLS
#: layer a slice at a time instead of being buffered whole (plus its ciphertext) in asyncio.
_WRITE_SLICE = 256 * 1024

#: Input that re-arms the command deadline without a line end: a literal (an IMAP APPEND) of
#: this many bytes counts as progress, so the deadline is a minimum rate, not a cap on size.
_PROGRESS_BYTES = 64 * 1024
# After our last words (BYE, +OK bye) the transport flushes them and, over TLS, sends
# close_notify and then waits up to asyncio's ssl_shutdown_timeout (30 s) for the peer's; the
# session is over, so drop the socket once the output is gone, after this grace.
_CLOSE_GRACE = 1.0
# ... and however slow the peer reads, never hold a closed session longer than this.
_CLOSE_LIMIT = 30.0


class Machine(Protocol):
    """What the adapter needs of a sans-IO machine."""

    def receive_data(self, data: bytes) -> list[Event]: ...

    def data_to_send(self) -> bytes: ...

    def tls_started(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Abuse limits of one POP3 or IMAP listener (docs/security.md A4.3, A4.8, A8.1, A8.2).

    Attributes:
        login_timeout: deadline per command before login (the idle timeout when None).
        penalties: failed logins per client IP, shared with other listeners; a failure's
            reply waits the client's penalty.
        max_connections, max_connections_per_ip: caps of the listener (0: none).
    """

    login_timeout: float | None = None
    penalties: AuthPenalties | None = None
    max_connections: int = 0
    max_connections_per_ip: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What a machine factory learns about a new connection."""

    peer: str
    secure: bool


MachineFactory = Callable[[ConnectionInfo], Machine]


class LineServerProtocol(asyncio.Protocol):
    """Drives one machine over one connection.

    Args:
        factory: builds the machine for this connection.
        starttls_context: server context for STARTTLS/STLS (None: the machine never asks).
        implicit_tls: True when the listener wraps TLS from the first byte.
        idle_timeout: seconds without input before the connection is closed.
        on_error: records an unexpected exception (the stack re-raises it in the test).
        subscribe: registers a listener for store changes; returns a function that removes it.
        tls_handshake_timeout: seconds a STARTTLS handshake may take.
    """

    def __init__(
        self,
        factory: MachineFactory,
        *,
        starttls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        idle_timeout: float,
        on_error: Callable[[BaseException], None],
        subscribe: Callable[[Callable[[Any], None]], Callable[[], None]] | None = None,
        tls_handshake_timeout: float = 30.0,
        connections: set[LineServerProtocol] | None = None,
        login_timeout: float | None = None,
        penalties: AuthPenalties | None = None,
        counts: ConnectionCounts | None = None,
        busy_reply: Callable[[str], bytes] | None = None,
        service: str = "",
        protocol_name: str = "",
    ) -> None:
        self._factory = factory
        self._service = service
        self._protocol_name = protocol_name
        #: This connection's transcript when the stack records (``_recording``).
        self._rec: _recording.Session | None = None
        self._login_timeout = idle_timeout if login_timeout is None else login_timeout
        self._authenticated = False
        self._penalties = penalties
        self._counts = counts
        self._counted_ip: str | None = None
        self._busy_reply = busy_reply
        self._hold_handle: asyncio.TimerHandle | None = None
        self._progress = 0
        self._ip = ""
        self._starttls_context = starttls_context
        self._implicit_tls = implicit_tls
        self._idle_timeout = idle_timeout
        self._on_error = on_error
        self._subscribe = subscribe
        self._unsubscribe: Callable[[], None] | None = None
        self._tls_handshake_timeout = tls_handshake_timeout
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._machine: Machine | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._upgrading = False
        # Decrypted bytes that arrive between the end of the handshake and tls_started().
        self._held = b""
        # Output not yet given to the transport (it asked us to pause); written in order.
        self._pending: collections.deque[memoryview] = collections.deque()
        self._write_paused = False
        self._closed = False
        self._lost = False
        self._close_deadline = 0.0
        self._loop = asyncio.get_running_loop()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports implement asyncio.Transport's methods
        # without subclassing it (an assert here failed every connection on uvloop).
        transport = cast("asyncio.Transport", transport)
        self._transport = transport
        if self._connections is not None:
            self._connections.add(self)
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        recordings = _recording.current()
        if recordings is not None:
            rec = self._rec = recordings.open(
                self._service,
                self._protocol_name,
                _recording.address(peer),
                _recording.address(transport.get_extra_info("sockname")),
            )
            tls = _recording.tls_note(transport)
            if tls is not None:
                rec.note(tls)
        if self._counts is not None:
            refusal = self._counts.admit(self._ip)
            if refusal is not None:  # over a connection cap (docs/security.md A8.2)
                log.info("refusing %s: %s", self._ip, refusal)
                if self._busy_reply is not None:
                    busy = self._busy_reply(refusal.partition(" ")[2])
                    if self._rec is not None:
                        self._rec.server(busy)
                    transport.write(busy)
                transport.close()
                self._finish()
                return
            self._counted_ip = self._ip
        secure = self._implicit_tls or transport.get_extra_info("ssl_object") is not None
        try:
            self._machine = self._factory(ConnectionInfo(peer=peer_text, secure=secure))
        except Exception as exc:  # a bug in the machine's constructor: report, close
            self._on_error(exc)
            transport.abort()
            return
        if hasattr(self._machine, "flush_hook"):
            self._machine.flush_hook = self._flush_early
        on_change = getattr(self._machine, "on_store_change", None)
        if self._subscribe is not None and on_change is not None:
            self._unsubscribe = self._subscribe(self._store_changed)
        self._flush()
        self._reset_idle()

    def data_received(self, data: bytes) -> None:
        if self._rec is not None:
            self._rec.client(data)
        if self._machine is None or self._closed:
            return
        # The deadline is per command (docs/security.md A8.1): only a line end, or a good run of
        # literal bytes, re-arms it; a client trickling bytes cannot keep a session alive.
        self._progress += len(data)
        if b"\n" in data or self._progress >= _PROGRESS_BYTES:
            self._progress = 0
            self._reset_idle()
        if self._upgrading:
            # The TLS layer may hand us the client's first encrypted command before the
            # start_tls() await resumes: hold it until the machine knows TLS is up.
            self._held += data
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        if self._machine is not None and not self._closed:
            self._feed(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upgrading:
            # start_tls swaps protocols under us; the real loss is reported later.
            return
        self._lost = True
        self._pending.clear()
        self._finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    # internals

    def _feed(self, data: bytes) -> None:
        assert self._machine is not None
        try:
            events = self._machine.receive_data(data)
        except RemoteProtocolError as exc:
            log.info("closing connection: %s", exc)
            self._flush()
            self._close()
            return
        except Exception as exc:
            self._on_error(exc)
            self._close()
            return
        delay = self._account(events)
        if delay > 0:
            # Brute force (docs/security.md A4.3): the failure's reply, and everything after it,
            # waits; no input is read meanwhile. Other clients are not slowed.
            assert self._transport is not None
            self._transport.pause_reading()
            self._hold_handle = self._loop.call_later(delay, self._release, events)
            return
        self._flush()
        self._handle(events)

    def _account(self, events: list[Event]) -> float:
        """Record login outcomes; return how long to hold the replies back."""
        failed = False
        for event in events:
            if isinstance(event, AuthenticationSucceeded):
                self._authenticated = True
                user = getattr(self._machine, "user", None)  # IMAP's; POP3 keeps its own
                if self._rec is not None and user:
                    self._rec.note(f"authenticated as {user}")
                if self._penalties is not None:
                    self._penalties.succeeded(self._ip)
                self._reset_idle()
            elif isinstance(event, AuthenticationFailed):
                failed = True
                if self._penalties is not None:
                    self._penalties.failed(self._ip, self._loop.time())
        if failed and self._penalties is not None:
            return self._penalties.delay(self._ip, self._loop.time())
        return 0.0

    def _release(self, events: list[Event]) -> None:
        self._hold_handle = None
        if self._closed or self._transport is None:
            return
        self._flush()
        self._handle(events)
        if not self._closed and not self._upgrading and not self._transport.is_closing():
            self._transport.resume_reading()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ConnectionClosed):
                self._close()
                return
            if isinstance(event, StartTLSRequested):
                self._start_tls()
                return

    def _flush(self) -> None:
        if self._machine is None or self._transport is None:
            return
        take_chunks = getattr(self._machine, "data_to_send_chunks", None)
        chunks: list[bytes] = (
            take_chunks() if take_chunks is not None else [self._machine.data_to_send()]
        )
        if self._transport.is_closing():
            self._pending.clear()
            return
        rec = self._rec
        if rec is not None:
            for chunk in chunks:
                if chunk:
                    rec.server(chunk)
        self._pending.extend(memoryview(c) for c in chunks if c)
        self._pump()

    def _flush_early(self) -> None:
        """Send what the machine has written so far, while it still answers a command (a
        long FETCH): never while replies are held back (a failed login's delay) or during
        a TLS upgrade."""
        if self._hold_handle is None and not self._closed and not self._upgrading:
            self._flush()

    def _pump(self) -> None:
        """Write pending output until the transport asks us to pause (or nothing is left).

        Small pieces are joined into one write (one TLS record where there used to be one);
        a big piece (a message) goes out in slices of itself, never copied here.
        """
        transport, pending = self._transport, self._pending
        while pending and not self._write_paused:
            if transport is None or transport.is_closing():
                pending.clear()
                return
            first = pending[0]
            if len(first) >= _WRITE_SLICE:
                transport.write(first[:_WRITE_SLICE])
                if len(first) > _WRITE_SLICE:
                    pending[0] = first[_WRITE_SLICE:]
                else:
                    pending.popleft()
                continue
            batch: list[memoryview] = []
            size = 0
            while pending and size + len(pending[0]) <= _WRITE_SLICE:
                piece = pending.popleft()
                batch.append(piece)
                size += len(piece)
            transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _drain_now(self) -> None:
        """Hand every pending byte to the transport at once, ignoring flow control.

        Before a close or a TLS upgrade: the transport then owns the bytes, as it did before
        output was paced (it flushes them before closing, and before the TLS handshake).
        """
        transport, pending = self._transport, self._pending
        if transport is not None and pending and not transport.is_closing():
            transport.write(b"".join(pending) if len(pending) > 1 else pending[0])
        pending.clear()

    def _record_pending(self) -> None:
        """Record what arrived during the STARTTLS handshake, after its outcome's note."""
        if self._rec is not None:
            self._rec.release_client()

    def _start_tls(self) -> None:
        assert self._transport is not None and self._starttls_context is not None
        self._drain_now()
        transport = self._transport
        transport.pause_reading()
        self._upgrading = True
        if self._rec is not None:
            self._rec.hold_client()  # until the handshake's note (_record_pending)
        task = self._loop.create_task(self._upgrade(transport))
        task.add_done_callback(_consume_result)

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        assert self._starttls_context is not None and self._machine is not None
        try:
            new = await self._loop.start_tls(
                transport,
                self,
                self._starttls_context,
                server_side=True,
                ssl_handshake_timeout=self._tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("STARTTLS handshake failed: %r", exc)
            if self._rec is not None:
                self._rec.note(f"TLS handshake failed: {exc!r}")
            self._record_pending()
            self._upgrading = False
            transport.abort()
            self._finish()
            return
        self._upgrading = False
        if new is None:
            self._record_pending()
            self._finish()
            return
        self._transport = new
        self._write_paused = False  # a pause of the plain transport does not carry over
        if self._rec is not None:
            self._rec.note(_recording.tls_note(new) or "TLS")
        self._record_pending()
        try:
            self._machine.tls_started()
        except Exception as exc:
            self._on_error(exc)
            self._close()
            return
        self._flush()
        self._reset_idle()
        held, self._held = self._held, b""
        if held:
            self._feed(held)

    def _store_changed(self, change: Any) -> None:
        # Called on whatever thread changed the store: hop onto our loop.
        if self._loop.is_closed():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # our own session changed it: no wake-up write needed
            self._loop.call_soon(self._deliver_change, change)
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver_change, change)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def _deliver_change(self, change: Any) -> None:
        if self._closed or self._machine is None or self._upgrading:
            return
        try:
            self._machine.on_store_change(change)  # type: ignore[attr-defined]
        except Exception as exc:
            self._on_error(exc)
            self._close()
            return
        self._flush()
        if getattr(self._machine, "ended", False):  # the change ended the session (a BYE)
            self._close()

    def _reset_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        timeout = self._idle_timeout if self._authenticated else self._login_timeout
        self._idle_handle = self._loop.call_later(timeout, self._idle)

    def _idle(self) -> None:
        machine = self._machine
        timed_out = getattr(machine, "timed_out", None)
        if timed_out is not None:
            try:
                timed_out()
            except Exception as exc:
                self._on_error(exc)
            self._flush()
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._drain_now()
            self._transport.close()
            self._close_deadline = self._loop.time() + _CLOSE_LIMIT
            self._loop.call_later(_CLOSE_GRACE, self._abort_lingering)
        self._pending.clear()
        self._finish()

    def _abort_lingering(self) -> None:
        """Drop a closed session's socket once its last output is written (or at the limit)."""
        transport = self._transport
        if self._lost or transport is None:
            return
        unsent = transport.get_write_buffer_size()
        if unsent and self._loop.time() < self._close_deadline:
            self._loop.call_later(_CLOSE_GRACE, self._abort_lingering)
            return
        transport.abort()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._rec is not None:
            self._rec.note("connection closed")
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._hold_handle is not None:
            self._hold_handle.cancel()
            self._hold_handle = None
        if self._counts is not None and self._counted_ip is not None:
            self._counts.release(self._counted_ip)
            self._counted_ip = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._connections is not None:
            self._connections.discard(self)
        if self._machine is not None:
            # EOF lets the machine release what it holds (a POP3 maildrop lock, say).
            try:
                self._machine.receive_data(b"")
            except RemoteProtocolError:
                pass
            except Exception as exc:
                self._on_error(exc)

    def abort(self) -> None:
        self._pending.clear()
        if self._transport is not None:
            self._transport.abort()
        self._finish()


def _consume_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def serve(
    factory: MachineFactory,
    *,
    host: str,
    port: int,
    implicit_tls_context: ssl.SSLContext | None,
    starttls_context: ssl.SSLContext | None,
    idle_timeout: float,
    on_error: Callable[[BaseException], None],
    subscribe: Callable[[Callable[[Any], None]], Callable[[], None]] | None = None,
    tls_handshake_timeout: float = 30.0,
    limits: ListenerLimits | None = None,
    busy_reply: Callable[[str], bytes] | None = None,
    service: str = "",
    protocol_name: str = "",
) -> tuple[asyncio.Server, set[LineServerProtocol]]:
    """Listen on ``host:port`` (0 picks a free port) and drive a machine per connection.

    Args:
        idle_timeout: deadline per command once logged in (input without a line end does
            not extend it).
        limits: connection caps, login deadline and penalties (none by default).
        busy_reply: the protocol's refusal for a client over a cap, given the reason.
        service, protocol_name: the names a transcript of a connection carries (``imaps``,
            ``imap``), when the stack records (``_recording``).

    Returns:
        The asyncio server (read the bound port from ``server.sockets``) and the live set of
        connections, so the caller can abort them on stop.
    """
    loop = asyncio.get_running_loop()
    connections: set[LineServerProtocol] = set()
    limits = limits or ListenerLimits()
    counts = (
        ConnectionCounts(max_total=limits.max_connections, max_per_ip=limits.max_connections_per_ip)
        if limits.max_connections or limits.max_connections_per_ip
        else None
    )

    def protocol() -> LineServerProtocol:
        return LineServerProtocol(
            factory,
            starttls_context=starttls_context,
            implicit_tls=implicit_tls_context is not None,
            idle_timeout=idle_timeout,
            on_error=on_error,
            subscribe=subscribe,
            tls_handshake_timeout=tls_handshake_timeout,
            connections=connections,
            login_timeout=limits.login_timeout,
            penalties=limits.penalties,
            counts=counts,
            busy_reply=busy_reply,
            service=service,
            protocol_name=protocol_name,
        )

    server = await loop.create_server(
        protocol,
        host=host,
        port=port,
        ssl=implicit_tls_context,
        ssl_handshake_timeout=tls_handshake_timeout if implicit_tls_context else None,
        reuse_address=True,
    )
    return server, connections
