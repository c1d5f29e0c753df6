"""UDP and TCP listeners on one port, answering with :func:`roundtrip.protocols.dns.respond`.

Both listeners share one ephemeral port so a resolver pointed at ``(host, port)`` can retry a
truncated UDP answer over TCP (RFC 7766). The UDP socket is bound first with port 0; the TCP
listener then binds the same number, and the pair is retried when another process already
holds that TCP port. A dual stack gives more addresses (``extra_hosts``, say ``::1``): each
gets a UDP and a TCP listener on that same port, as every other service of the stack does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from ..errors import ServerStartError
from ..protocols.dns import (
    TCP_PAYLOAD_MAX,
    AnswerCache,
    Record,
    Reply,
    Zone,
    ZoneAnswer,
    build_zone,
    query_name,
    respond,
    udp_max_size,
)
from . import _recording

__all__ = ["DNSServer", "start_dns"]

log = logging.getLogger("roundtrip.servers.dns")

ZoneProvider = Callable[[], Zone]

_BIND_ATTEMPTS = 8
_LENGTH = struct.Struct("!H")


class DNSServer:
    """A running DNS server; build it with :func:`start_dns`.

    Attributes:
        host: the first address the listeners are bound to.
        hosts: every address, ``host`` first; each has a UDP and a TCP listener.
        port: the UDP and TCP port, the same on every address.
        query_log: one ``(qname, qtype, rcode)`` per query answered (or dropped), in order.
    """

    def __init__(
        self,
        zone_provider: ZoneProvider,
        *,
        host: str,
        on_error: Callable[[BaseException], None],
        tcp_idle_timeout: float,
    ) -> None:
        self.host = host
        self.hosts: tuple[str, ...] = (host,)
        self.port = 0
        self.query_log: list[tuple[str, str, str]] = []
        self._zone_provider = zone_provider
        # lookup()'s answers, per zone: the stack's checks ask the same few names per message.
        self._answers = AnswerCache()
        self._on_error = on_error
        self._tcp_idle_timeout = tcp_idle_timeout
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, what a resolver needs."""
        return (self.host, self.port)

    def set_records(self, records: Iterable[Record], *, refuse_outside: bool = False) -> None:
        """Serve ``records`` from now on, replacing the zone provider.

        Names outside every zone get NXDOMAIN and a root SOA, or REFUSED with
        ``refuse_outside=True`` (see :func:`build_zone`).

        Safe to call from the loop thread; from another thread, go through ``LoopThread.call``.

        Raises:
            ConfigError: a record is invalid (see :func:`build_zone`); the old zone stays.
        """
        zone = build_zone(records, refuse_outside=refuse_outside)
        self._zone_provider = lambda: zone

    def set_zone(self, zone: Zone | ZoneProvider) -> None:
        """Serve ``zone`` (or whatever the callable returns per query) from now on."""
        self._zone_provider = _provider(zone)

    def answer(self, query: bytes, *, max_size: int) -> bytes:
        """Answer one query, log it, and record unexpected errors."""
        reply = self._reply(query, max_size=max_size)
        return b"" if reply is None else reply.wire

    def lookup(
        self, name: str, rtype: str, *, max_size: int = TCP_PAYLOAD_MAX, peer: str | None = None
    ) -> ZoneAnswer | None:
        """Answer ``name`` and ``rtype`` as :meth:`answer` answers a query for them, without
        wire format: the records come back as Python values (:class:`ZoneAnswer`).

        The stack's checks at the MX (SPF, DMARC, DKIM and ARC keys) and the relay's MX
        look-ups ask here: encoding the query and decoding the reply cost several times what
        answering does. Answers are kept while the same zone is served
        (:class:`~roundtrip.protocols.dns.AnswerCache`): a new zone is answered from its first
        look-up on. The query log gets the same entry, and unexpected errors are recorded
        the same way. With ``peer`` (who asked, such as ``"relay"``), the look-up is also
        recorded for the stack's transcripts, with transport ``memory``, as a query that
        came over the network is.

        Returns:
            The answer, or None where :meth:`answer` would send nothing (the zone provider
            failed).

        Raises:
            ValueError: no query can carry ``name`` (:func:`query_name`); nothing is logged,
                as no query would have reached the server.
        """
        qname = query_name(name)
        try:
            zone = self._zone_provider()
        except Exception as exc:
            self._on_error(exc)
            return None
        found = self._answers.lookup(zone, qname, rtype, max_size=max_size)
        self.query_log.append((found.qname, found.qtype, found.rcode))
        if found.error is not None:
            self._on_error(found.error)
        if peer is not None:
            recordings = _recording.current()
            if recordings is not None:
                recordings.lookup(
                    peer=peer,
                    qname=found.qname,
                    qtype=found.qtype,
                    rcode=found.rcode,
                    records=tuple(
                        f"{rrset.rdtype.name} {rdata.to_text()}"
                        for rrset in found.answer
                        for rdata in rrset
                    ),
                )
        return found

    def _reply(self, query: bytes, *, max_size: int) -> Reply | None:
        try:
            zone = self._zone_provider()
        except Exception as exc:
            self._on_error(exc)
            return None
        reply: Reply = respond(zone, query, max_size=max_size)
        self.query_log.append((reply.qname, reply.qtype, reply.rcode))
        if reply.error is not None:
            self._on_error(reply.error)
        return reply

    def _served(self, transport: str, peer: object, query: bytes, max_size: int) -> bytes:
        """Answer a query that came over the network, and record it if the stack records."""
        reply = self._reply(query, max_size=max_size)
        wire = b"" if reply is None else reply.wire
        recordings = _recording.current()
        if recordings is not None:
            recordings.dns(
                transport=transport,
                peer=_recording.address(peer),
                query=query,
                reply=wire,
                qname=reply.qname if reply is not None else "",
                qtype=reply.qtype if reply is not None else "",
                rcode=reply.rcode if reply is not None else "",
            )
        return wire

    async def close(self) -> None:
        """Close both listeners and every TCP connection. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for task in list(self._tcp_tasks):
            task.cancel()
        if self._tcp_tasks:
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
        for tcp in self._tcp:
            await tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        try:
            while True:
                # RFC 7766 §6.2.3: a client may send several queries on one connection.
                header = await asyncio.wait_for(reader.readexactly(2), self._tcp_idle_timeout)
                (length,) = _LENGTH.unpack(header)
                query = await asyncio.wait_for(reader.readexactly(length), self._tcp_idle_timeout)
                peer = writer.get_extra_info("peername")
                wire = self._served("tcp", peer, query, TCP_PAYLOAD_MAX)
                if not wire:
                    break
                writer.write(_LENGTH.pack(len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self._on_error(exc)
        finally:
            if task is not None:
                self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport: cast.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            wire = self._server._served("udp", addr, data, udp_max_size(data))
            if wire and self._transport is not None:
                self._transport.sendto(wire, addr)
        except Exception as exc:
            self._server._on_error(exc)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: not our bug.
        log.debug("UDP error: %r", exc)


def _provider(zone: Zone | ZoneProvider) -> ZoneProvider:
    if isinstance(zone, Zone):
        fixed = zone
        return lambda: fixed
    return zone


def _bound_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``(host, port)``, or OSError with nothing left open."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def start_dns(
    zone_provider: ZoneProvider | Zone,
    *,
    host: str,
    port: int = 0,
    on_error: Callable[[BaseException], None],
    tcp_idle_timeout: float = 10.0,
    extra_hosts: Sequence[str] = (),
) -> DNSServer:
    """Start a DNS server on the running loop; return once every listener is bound.

    Args:
        zone_provider: the zone to serve, or a callable returning it for each query (so the
            stack can rebuild zones when domains change).
        host: the address to bind (``127.0.0.1`` or ``::1``).
        port: 0 for an ephemeral port (the default), else a fixed one.
        on_error: records unexpected exceptions (``LoopThread.record_error``).
        tcp_idle_timeout: seconds a TCP connection may wait for its next query.
        extra_hosts: more addresses to listen on, UDP and TCP, on the same port (a dual
            stack's ``::1``).

    Returns:
        The running :class:`DNSServer`; ``await server.close()`` stops it.

    Raises:
        ServerStartError: no port could be bound for UDP and TCP on every address.
    """
    loop = asyncio.get_running_loop()
    hosts = tuple(dict.fromkeys((host, *extra_hosts)))
    server = DNSServer(
        _provider(zone_provider), host=host, on_error=on_error, tcp_idle_timeout=tcp_idle_timeout
    )
    server.hosts = hosts
    last_error: OSError | None = None
    for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
        try:
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(server), local_addr=(host, port)
            )
        except OSError as exc:
            raise ServerStartError(f"DNS: cannot bind UDP {host}:{port}: {exc}") from exc
        bound = udp.get_extra_info("sockname")[1]
        udps: list[asyncio.DatagramTransport] = [udp]
        tcps: list[asyncio.Server] = []
        where = host
        try:
            tcps.append(await asyncio.start_server(server._serve_tcp, host, bound))
            for where in hosts[1:]:
                # Bound here, not by the loop: a bind that fails must leave nothing behind,
                # and uvloop leaves an unclosed transport for a local_addr it cannot bind.
                more, _protocol = await loop.create_datagram_endpoint(
                    lambda: _UDPProtocol(server), sock=_bound_udp(where, bound)
                )
                udps.append(more)
                tcps.append(await asyncio.start_server(server._serve_tcp, where, bound))
        except OSError as exc:
            for transport in udps:
                transport.close()
            for listener in tcps:
                listener.close()
                await listener.wait_closed()
            # A transport's close completes in a callback (uvloop frees the socket there):
            # let it run before this start fails and the caller may stop the loop.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            last_error = exc
            # Only an ephemeral port taken elsewhere is worth another try; a fixed port, or an
            # address that cannot be bound at all, fails now and names the address.
            if exc.errno != errno.EADDRINUSE or port != 0:
                raise ServerStartError(f"DNS: cannot bind {where}:{bound}: {exc}") from exc
            continue
        server._udp, server._tcp, server.port = udps, tcps, bound
        return server
    raise ServerStartError(
        f"DNS: cannot bind UDP and TCP on one port at {', '.join(hosts)} after "
        f"{_BIND_ATTEMPTS} attempts: {last_error}"
    ) from last_error
