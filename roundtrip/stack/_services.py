"""The listeners of a stack, built from one table of services.

Each domain of a stack gets every service of :data:`SERVICES` on its host: the MX
(``smtp``), submission over implicit TLS (``submissions``, RFC 8314) and with STARTTLS
(``submission``, RFC 6409), POP3 and IMAP each in both TLS flavours. Where each listens
follows ``StackConfig.ports`` (see :func:`port_for`). Everything here runs on the stack's
event loop; ``roundtrip/stack/__init__.py`` wires the listeners to the store and the router.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import PORT_STRIDE, StackConfig
from ..errors import ServerStartError
from ..protocols.smtp import Role
from ..servers._conn import ListenerLimits
from ..servers.imap import start_imap
from ..servers.pop3 import start_pop3
from ..servers.smtp import AuthPenalties, SMTPHandler, start_smtp
from ..store import Store

__all__ = [
    "IMPLICIT_TLS_SERVICES",
    "SERVICES",
    "STANDARD_PORTS",
    "DomainEndpoints",
    "Listeners",
    "dns_hosts",
    "host_for",
    "hosts_for",
    "port_for",
]


@dataclass(frozen=True, slots=True)
class _Service:
    """One row of the service table."""

    #: ``smtp``, ``pop3`` or ``imap``: which server speaks it.
    kind: str
    #: The IANA port (RFC 8314 section 7 for the implicit-TLS ones).
    standard_port: int
    #: TLS from the first byte (else STARTTLS / STLS, or plain for the MX).
    implicit_tls: bool


#: Ephemeral ports tried per service when it must be free on several addresses.
_BIND_ATTEMPTS = 5

#: Every service of a domain, in start order.
_TABLE: Mapping[str, _Service] = {
    "smtp": _Service("smtp", 25, implicit_tls=False),
    "submissions": _Service("smtp", 465, implicit_tls=True),
    "submission": _Service("smtp", 587, implicit_tls=False),
    "pop3s": _Service("pop3", 995, implicit_tls=True),
    "pop3": _Service("pop3", 110, implicit_tls=False),
    "imaps": _Service("imap", 993, implicit_tls=True),
    "imap": _Service("imap", 143, implicit_tls=False),
}

#: Well-known ports used with ``ports="standard"`` (and offset from a base port).
STANDARD_PORTS = {name: row.standard_port for name, row in _TABLE.items()} | {"dns": 53}
SERVICES = ("smtp", "submissions", "submission", "pop3", "pop3s", "imap", "imaps")
IMPLICIT_TLS_SERVICES = tuple(name for name, row in _TABLE.items() if row.implicit_tls)


@dataclass(frozen=True, slots=True)
class DomainEndpoints:
    """Where one domain's services listen."""

    domain: str
    hostname: str
    host: str
    ports: dict[str, int]
    #: More addresses every service listens on, same ports (``StackConfig.extra_hosts``).
    extra_hosts: tuple[str, ...] = ()

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address the services listen on, ``host`` first."""
        return (self.host, *self.extra_hosts)

    def address(self, service: str) -> tuple[str, int]:
        """``(host, port)`` of a service (``smtp``, ``submissions``, ``imaps`` ...)."""
        return self.host, self.ports[service]

    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def endpoint(self, service: str) -> str:
        """``HOST:PORT`` of a service, IPv6 hosts in brackets."""
        return f"{self.url_host()}:{self.ports[service]}"


def host_for(config: StackConfig, index: int) -> str:
    """The address domain number ``index`` listens on: 127.0.0.N with standard ports."""
    return f"127.0.0.{index + 1}" if config.ports == "standard" else config.host


def hosts_for(config: StackConfig, index: int) -> tuple[str, ...]:
    """Every address domain number ``index`` listens on: :func:`host_for` first."""
    return (host_for(config, index), *config.extra_hosts)


def dns_hosts(config: StackConfig) -> tuple[str, ...]:
    """Every address the stack's DNS server listens on, on one port: 127.0.0.1 with standard
    ports (where resolvers look), else the stack's host; then each extra host, as for every
    other service."""
    first = "127.0.0.1" if config.ports == "standard" else config.host
    return tuple(dict.fromkeys((first, *config.extra_hosts)))


def port_for(config: StackConfig, service: str, index: int = 0) -> int:
    """The port to bind: 0 (ephemeral), the standard one, or base + stride + standard."""
    if config.ports == "standard":
        return STANDARD_PORTS[service]
    if isinstance(config.ports, int):  # a base port: see StackConfig.ports
        return config.ports + index * PORT_STRIDE + STANDARD_PORTS[service]
    return 0


@dataclass
class Listeners:
    """Every listener of a stack and the live connections of the line-based ones.

    Args:
        config: what to serve.
        store: the mailboxes POP3 and IMAP serve, and whose users SMTP authenticates.
        accepts_recipient: whether an address may be a recipient at its domain's MX.
        router: what SMTP calls with each accepted message (see ``servers.smtp.Router``).
        on_error: where the servers report exceptions of ours.
        check_token: ``(user, token) -> bool`` for the XOAUTH2 and OAUTHBEARER logins of
            submission, IMAP and POP3 (the stack's issued tokens); None refuses every token.
        prepare: awaited with each accepted message before ``router`` (see
            ``servers.smtp.Prepare``).
    """

    config: StackConfig
    store: Store
    accepts_recipient: Callable[[str], bool]
    router: Callable[[Any], None]
    on_error: Callable[[BaseException], None]
    check_token: Callable[[str, str], bool] | None = None
    prepare: Callable[[Any, bool], Awaitable[Any]] | None = None
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    connections: list[set[Any]] = field(default_factory=list)

    def host(self, index: int) -> str:
        """The address domain number ``index`` listens on (see :func:`host_for`)."""
        return host_for(self.config, index)

    async def start_domain(
        self,
        index: int,
        domain: str,
        tls: ssl.SSLContext,
        penalties: AuthPenalties,
        *,
        tls_by_host: Mapping[str, ssl.SSLContext] | None = None,
    ) -> DomainEndpoints:
        """Bind every service of one domain and return where each listens.

        ``tls_by_host``: the TLS context of a listening address other than the first (whose
        no-SNI leaf names that address, ``CertificateAuthority.server_context``
        ``local_address``); ``tls`` serves the addresses it does not list.
        """
        hosts = hosts_for(self.config, index)
        hostname = f"mail.{domain}"
        ports: dict[str, int] = {}
        by_host = tls_by_host or {}
        for service, row in _TABLE.items():
            port = port_for(self.config, service, index)

            def starting(host: str, port: int, service: str = service) -> Awaitable[Any]:
                row = _TABLE[service]
                ctx = by_host.get(host, tls)
                if row.kind == "smtp":
                    return self._smtp(service, domain, hostname, host, port, ctx, penalties)
                return self._mailbox(row, hostname, host, port, ctx, penalties)

            ports[service] = await self._bind_hosts(service, hosts, port, starting)
        return DomainEndpoints(domain, hostname, hosts[0], ports, hosts[1:])

    async def _bind_hosts(
        self,
        service: str,
        hosts: tuple[str, ...],
        port: int,
        starting: Callable[[str, int], Awaitable[Any]],
    ) -> int:
        """Bind one service on every address, on one port; return that port.

        An ephemeral port free on the first address may be taken on another (say ::1): the
        listeners of that attempt are closed and a fresh port is tried.
        """
        attempts = _BIND_ATTEMPTS if port == 0 and len(hosts) > 1 else 1
        for attempt in range(attempts):
            mark = len(self.servers), len(self.connections)
            bound = _bound_port(await self._bind(service, hosts[0], port, starting(hosts[0], port)))
            try:
                for host in hosts[1:]:
                    await self._bind(service, host, bound, starting(host, bound))
            except ServerStartError as exc:
                cause = exc.__cause__
                in_use = isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
                if not in_use or attempt == attempts - 1:
                    raise
                for server in self.servers[mark[0] :]:
                    server.close()
                del self.servers[mark[0] :], self.connections[mark[1] :]
                continue
            return bound
        raise AssertionError("unreachable")  # pragma: no cover

    def _smtp(
        self,
        service: str,
        domain: str,
        hostname: str,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        penalties: AuthPenalties,
    ) -> Awaitable[Any]:
        config, timeouts = self.config, self.config.timeouts
        handler = SMTPHandler(
            role=Role(service),
            domain=domain,
            hostname=hostname,
            local_domains=lambda: config.domains,
            has_user=self.accepts_recipient,
            check_password=self.store.check_password,
            router=self.router,
            max_recipients=config.max_recipients,
            enforce_sender=True,
            reject_foreign_from=config.from_header_policy == "reject",
            on_error=self.on_error,
            limits=config.smtp_limits,
            check_token=self.check_token,
            prepare=self.prepare,
        )
        return start_smtp(
            handler,
            host=host,
            port=port,
            tls_context=tls,
            max_message_size=config.max_message_size,
            idle_timeout=timeouts.idle_timeout,
            tls_handshake_timeout=timeouts.tls_handshake_timeout,
            auth_penalties=penalties,
        )

    def _mailbox(
        self,
        row: _Service,
        hostname: str,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        penalties: AuthPenalties,
    ) -> Awaitable[Any]:
        timeouts, limits = self.config.timeouts, self.config.smtp_limits
        imap = row.kind == "imap"
        idle = timeouts.imap_idle_timeout if imap else timeouts.pop3_idle_timeout
        budgets = self.config.mailbox_limits
        if imap:
            # APPEND is held to what SMTP DATA accepts: the message size (APPENDLIMIT, RFC
            # 7889), the largest header field and the number of Received fields.
            return start_imap(
                self.store,
                **self._mailbox_common(row, hostname, host, port, tls, penalties, idle),
                command_limits=budgets.imap_command_limits,
                max_literal=self.config.max_message_size,
                max_header_size=limits.max_header_size,
                max_hops=limits.max_hops,
            )
        return start_pop3(
            self.store,
            **self._mailbox_common(row, hostname, host, port, tls, penalties, idle),
            command_limits=budgets.pop3_command_limits,
        )

    def _mailbox_common(
        self,
        row: _Service,
        hostname: str,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        penalties: AuthPenalties,
        idle: float,
    ) -> dict[str, Any]:
        """The arguments POP3 and IMAP listeners share."""
        timeouts, limits = self.config.timeouts, self.config.smtp_limits
        return dict(
            host=host,
            port=port,
            hostname=hostname,
            implicit_tls_context=tls if row.implicit_tls else None,
            starttls_context=None if row.implicit_tls else tls,
            idle_timeout=idle,
            on_error=self.on_error,
            check_token=self.check_token,
            tls_handshake_timeout=timeouts.tls_handshake_timeout,
            limits=ListenerLimits(
                login_timeout=min(timeouts.login_timeout, idle),
                penalties=penalties,
                max_connections=limits.max_connections,
                max_connections_per_ip=limits.max_connections_per_ip,
            ),
        )

    async def _bind(self, service: str, host: str, port: int, starting: Awaitable[Any]) -> Any:
        """Await a listener's start; a bind failure becomes a ServerStartError saying why."""
        try:
            result = await starting
        except OSError as exc:
            where = f"cannot bind {service} on {host}:{port}"
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ServerStartError(
                    f"{where}: permission denied; ports='standard' needs root or"
                    " CAP_NET_BIND_SERVICE (use ports='ephemeral' or a base port such as 10000)"
                ) from exc
            if exc.errno == errno.EADDRINUSE:
                raise ServerStartError(f"{where}: the address is in use") from exc
            raise ServerStartError(f"{where}: {exc}") from exc
        server, conns = result if isinstance(result, tuple) else (result, None)
        self.servers.append(server)
        if conns is not None:
            self.connections.append(conns)
        return server

    async def self_check(self, domains: list[DomainEndpoints], client: ssl.SSLContext) -> None:
        """Connect to every listener; complete a TLS handshake with each TLS context.

        The implicit-TLS listeners of one domain on one address share one server context
        (:meth:`start_domain`): a handshake with the first proves the context, and a TCP
        connection accepted by each of the others proves that listener. A handshake per
        listener cost the start about 10 ms more (issue #17).
        """

        async def probe(ep: DomainEndpoints, host: str, service: str, handshake: bool) -> None:
            tls = client if handshake else None
            _, writer = await asyncio.open_connection(
                host, ep.ports[service], ssl=tls, server_hostname=ep.hostname if tls else None
            )
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

        await asyncio.gather(
            *(
                probe(ep, host, s, s == IMPLICIT_TLS_SERVICES[0])
                for ep in domains
                for host in ep.hosts
                for s in SERVICES
            )
        )

    def close(self) -> None:
        """Abort every open connection and stop every listener (on the loop)."""
        for conns in self.connections:
            for conn in list(conns):
                conn.abort()
        for server in self.servers:
            server.close()


def _bound_port(server: Any) -> int:
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    raise ServerStartError("listener has no bound socket")
