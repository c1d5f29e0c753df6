"""The relay's MX connection cache (Postfix smtp_connection_cache_*, smtp_connection_reuse_*).

After a transaction that ended in step, the relay resets the connection with RSET (unless a
pipelining MX answered the final dot: ``protocols/_pipelining.py`` ``rset_due``) and files it
here for ``cache_time`` seconds under its endpoint (MX host, address, port and the HELO name it
announced): the next message to the same endpoint takes it instead of dialling. A connection
that is not verified TLS serves only under the policy mode that allowed it; verified TLS serves
every mode. One that turns out dead (EOF, 421, any failure of MAIL FROM) is dropped and the
caller dials afresh, so a stale connection never costs a deferral or a bounce.

Bounds: ``cache_size`` idle connections in all (and ``per_endpoint`` per endpoint),
``reuse_time`` seconds and ``reuse_limit`` messages per connection, and
:data:`_REUSE_ERROR_LIMIT` error replies. Idle connections get QUIT when their time is up;
:meth:`ConnectionCache.close_idle` closes them all (QUIT first, or dropped at once when the
loop is about to stop). Lower-level exceptions are translated by ``servers/_relayerrors.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..protocols.tlspolicy import ResultType
from ._relayerrors import StepError, translated

if TYPE_CHECKING:
    import aiosmtplib

__all__ = ["Connection", "ConnectionCache", "Endpoint", "Failure", "discard", "unread"]

# The relay's logger: these lines are part of its story.
log = logging.getLogger("roundtrip.servers.relay")

#: Error replies (4xx/5xx) on one connection after which it is not cached again: an MX closes
#: a session with 421 after its error limit (Postfix smtpd_hard_error_limit and our MX's
#: ``SMTPLimits.max_errors`` are 20), which would hit a later message mid-transaction.
_REUSE_ERROR_LIMIT = 10
#: Seconds ``close_idle(graceful=True)`` waits for the QUITs of the cached connections (sent
#: all at once) before dropping them: well inside the 5 s that ``MailStack.reset()`` gives the
#: relay's ``clear()``, and enough for test MXs that take their time (test_catalogue_a's
#: InjectingMX waits 0.5 s for pipelined bytes before each reply).
_CLEAR_QUIT_TIMEOUT = 2.0

#: What a cached connection is filed under: MX host, IP, port and the HELO name it announced.
Endpoint = tuple[str, str, int, str]
#: A TLS failure recorded when a connection was opened: result type, detail, what we did.
Failure = tuple[ResultType, str, str]


@dataclass(eq=False)
class Connection:
    """One SMTP connection to an MX, used by one delivery at a time, cached between them."""

    client: aiosmtplib.SMTP
    endpoint: Endpoint
    #: "" for verified TLS, else the note events carry (" without TLS", ...).
    security: str
    #: The policy mode it was opened under: a degraded connection is reused only under it.
    mode: str
    #: TLS failures recorded when it was opened, recorded again for each message it carries.
    failures: tuple[Failure, ...]
    #: When it was opened (loop clock).
    opened: float
    messages: int = 0
    errors: int = 0
    timer: asyncio.TimerHandle | None = None
    #: No RSET is due before caching it (``protocols/_pipelining.py`` ``rset_due``): the last
    #: transaction ended with the reply to the final dot, on a connection that pipelines.
    clean: bool = False


def discard(client: aiosmtplib.SMTP) -> None:
    """Drop a connection at once: no QUIT, no TLS close_notify, nothing left to flush.

    A graceful close waits for buffered bytes (or a TLS shutdown) to go out; on a connection
    that failed, or while the loop is being stopped, that wait can outlive the loop and leave
    an unclosed transport behind.
    """
    # The TLS transport if any, then the TCP one under it (``_mxsession._MXClient.wire``):
    # aiosmtplib may have closed the connection gracefully already (after QUIT, or a failed
    # command) and forgotten it, with a TLS close still waiting for the server. Any
    # transport with abort(): uvloop's TCP transport is not an asyncio.Transport subclass.
    for transport in (client.transport, getattr(client, "wire", None)):
        abort = getattr(transport, "abort", None)
        if callable(abort):
            abort()
    client.close()


def unread(client: aiosmtplib.SMTP) -> bool:
    """Whether bytes the MX sent wait unread in the client's buffer.

    After the last reply the relay asked for, nothing may be left: a reply nobody asked for
    would be paired with the next command, shifting every reply after it (RFC 5321 §4.1.1,
    §4.2; RFC 2920 §3.1). Such a connection is out of step: dropped, never cached or reused.
    ``_buffer`` is aiosmtplib private, as in ``servers/_mxsession.py``.
    """
    protocol = client.protocol
    return protocol is not None and bool(protocol._buffer)


class ConnectionCache:
    """Idle MX connections by endpoint. Use it on the relay's event loop thread.

    Args:
        cache_time: seconds a connection stays idle before QUIT; 0 caches nothing.
        cache_size: idle connections kept at most, in all.
        per_endpoint: idle connections kept at most per endpoint.
        reuse_time: seconds after its opening that a connection is no longer cached.
        reuse_limit: messages per connection.
        quit_timeout: seconds a QUIT may take when an idle connection expires.

    Raises:
        ValueError: a negative time or size, or a reuse limit below 1.
    """

    def __init__(
        self,
        *,
        cache_time: float,
        cache_size: int,
        per_endpoint: int,
        reuse_time: float,
        reuse_limit: int,
        quit_timeout: float,
    ) -> None:
        if cache_time < 0 or reuse_time < 0:
            raise ConfigError("connection cache and reuse times must not be negative")
        if cache_size < 0 or reuse_limit < 1:
            raise ConfigError(
                "connection_cache_size must not be negative, connection_reuse_limit at least 1"
            )
        self._cache_time = cache_time
        self._cache_size = cache_size
        self._per_endpoint = min(cache_size, per_endpoint)
        self._reuse_time = reuse_time
        self._reuse_limit = reuse_limit
        self._quit_timeout = quit_timeout
        #: Idle connections by endpoint, oldest first; taken newest first.
        self._idle: dict[Endpoint, list[Connection]] = {}
        self._idle_count = 0
        #: QUIT of expired idle connections under way.
        self._reaping: set[asyncio.Task[None]] = set()
        #: Set when the relay closes: nothing is cached any more, nothing closed gracefully.
        self.closed = False

    def take(self, endpoint: Endpoint, mode: str) -> Connection | None:
        """An idle connection to ``endpoint`` that may serve under ``mode``, or None.

        Taken out of the cache, so no other delivery can use it. One the MX closed while it
        was idle is dropped on the way. The caller then sends ``MAIL FROM``; should that fail
        in any way, the connection was stale: :func:`discard` it and take or dial another.
        """
        while True:
            conn = self._take(endpoint, mode)
            if conn is None or (conn.client.is_connected and not unread(conn.client)):
                return conn
            discard(conn.client)  # the MX closed it while it was idle, or it is out of step

    def _take(self, endpoint: Endpoint, mode: str) -> Connection | None:
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

    def _cacheable(self, conn: Connection) -> bool:
        return (
            self._cache_time > 0
            and not self.closed
            and conn.client.is_connected
            and not unread(conn.client)
            and conn.messages < self._reuse_limit
            and conn.errors < _REUSE_ERROR_LIMIT
            and asyncio.get_running_loop().time() - conn.opened < self._reuse_time
            and self._idle_count < self._cache_size
            and len(self._idle.get(conn.endpoint, ())) < self._per_endpoint
        )

    async def release(self, conn: Connection, *, reusable: bool) -> None:
        """After a delivery: RSET and cache the connection if it may serve again, else QUIT.

        ``reusable``: the transaction ended in step (the MX answered the final dot, or
        refused MAIL FROM, every RCPT or DATA). An MX that fails the RSET is not cached; one
        that sent more than was asked (:func:`unread`) is dropped without a word.
        """
        client = conn.client
        said_goodbye = cached = False
        try:
            if self.closed:  # the stack stops: no QUIT that could hold it up
                return
            if unread(client):
                # Out of step: RSET or QUIT would be answered by the stale reply, or by
                # nothing at all while the MX waits for something else. Dropped.
                return
            if reusable and self._cacheable(conn):
                clean, conn.clean = conn.clean, False
                try:
                    if not clean:
                        with translated():
                            await client.rset()
                except StepError as exc:
                    log.info("relay: RSET to %s[%s]: %s", *conn.endpoint[:2], exc)
                else:
                    cached = self._cache(conn)
                    if cached:
                        return
            said_goodbye = await self._quit(client, None)
        finally:
            # Also when the task is cancelled (reset, stop) while RSET or QUIT is under way.
            if not cached:
                self._close(client, said_goodbye)

    async def _quit(self, client: aiosmtplib.SMTP, timeout: float | None) -> bool:
        """Say QUIT if the connection is still up; whether the MX answered it."""
        if not client.is_connected:
            return False
        try:
            with translated():
                if timeout is None:  # the client's own timeout (None would mean none at all)
                    await client.quit()
                else:
                    await client.quit(timeout=timeout)
        except StepError:
            return False  # going anyway: nothing was in flight
        return True

    def _close(self, client: aiosmtplib.SMTP, said_goodbye: bool) -> None:
        if said_goodbye and not self.closed:
            client.close()
        else:
            discard(client)

    def _cache(self, conn: Connection) -> bool:
        if not self._cacheable(conn):  # the relay closed or the cache filled during RSET
            return False
        self._idle.setdefault(conn.endpoint, []).append(conn)
        self._idle_count += 1
        conn.timer = asyncio.get_running_loop().call_later(self._cache_time, self._expire, conn)
        return True

    def _expire(self, conn: Connection) -> None:
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
            discard(conn.client)
            return
        task = asyncio.get_running_loop().create_task(
            self._goodbye(conn.client, self._quit_timeout), name=f"relay-quit-{conn.endpoint[0]}"
        )
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _goodbye(self, client: aiosmtplib.SMTP, timeout: float) -> None:
        said_goodbye = False
        try:
            said_goodbye = await self._quit(client, timeout)
        finally:
            self._close(client, said_goodbye)

    async def close_idle(self, *, graceful: bool) -> None:
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
                discard(conn.client)
        for task in reaping:
            task.cancel()
        if reaping:
            await asyncio.gather(*reaping, return_exceptions=True)
