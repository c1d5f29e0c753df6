"""MailStack: the store, the certificates and every server, started, checked and stopped together.

A stack serves several mail domains on loopback. Each domain has an MX (``smtp``), submission
over implicit TLS (``submissions``) and with STARTTLS (``submission``), POP3 (``pop3s``,
``pop3``) and IMAP (``imaps``, ``imap``); one DNS server answers for every domain. All servers
run on one event loop in one background thread (``roundtrip/servers/_runner.py``; docs/design.md
says why). ``MailStack`` is a facade over the parts in this package:

- ``_services.py``: the listeners, built from one table of services;
- ``_delivery.py``: what happens to an accepted message (store here, relay, capture);
- ``_journeys.py``: per-hop timings;
- ``roundtrip/assertions.py``: waiting for and matching what arrived.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..assertions import (
    MAX_SHOWN,
    Criteria,
    TextPattern,
    check_delivered,
    check_not_delivered,
    wait_for_matches,
)
from ..certs import CertificateAuthority
from ..config import Endpoint, StackConfig, User, cert_cache_dir
from ..errors import ConfigError, NotDeliveredError, RoundtripError, ServerStartError
from ..maildir import MaildirStore
from ..message import (
    AuthResults,
    Headers,
    ReceivedMessage,
    header_block,
    parse_auth_results,
    parse_received,
)
from ..protocols._oauth import TokenTable
from ..protocols.dkim import SigningKey
from ..protocols.dns import Record, Zone, build_zone, default_records
from ..protocols.filter import ContentFilter, default_filter
from ..protocols.tlspolicy import TLSPolicy, parse_policy, sts_record
from ..servers._recording import Recordings
from ..servers._recording import install as _record_on_loop
from ..servers._runner import LoopThread
from ..servers._smtpsession import abort_sessions
from ..servers.dns import DNSServer, start_dns
from ..servers.relay import QueuedMessage, Relay, RelayEvent
from ..servers.smtp import AuthPenalties
from ..spool import MAILDIR_SPOOL_NAME, RelaySpool
from ..store import Store, StoredMessage, address_key, validate_mailbox_name
from ._auth import sender_auth_records
from ._auth import zone_lookup as sender_zone_lookup
from ._certcache import cached_authority
from ._delivery import Faults, Router, catch_all_owner
from ._dkim import mint_in_background, public_record, zone_lookup
from ._journeys import HopTiming, Journeys
from ._services import (
    IMPLICIT_TLS_SERVICES,
    SERVICES,
    STANDARD_PORTS,
    DomainEndpoints,
    Listeners,
    dns_hosts,
    hosts_for,
    port_for,
)
from ._transcripts import Transcript, collect

__all__ = [
    "IMPLICIT_TLS_SERVICES",
    "OUTBOUND_ADDRESS",
    "SERVICES",
    "STANDARD_PORTS",
    "DeliveredMessage",
    "DomainEndpoints",
    "Faults",
    "HopTiming",
    "MailStack",
    "Transcript",
]

#: Mail to domains outside the stack is captured in this mailbox, never sent anywhere.
OUTBOUND_ADDRESS = "outbound@roundtrip.invalid"


class MailStack:
    """A hermetic mail world on loopback.

    Args:
        config: domains, users, addresses and limits (``StackConfig()`` by default).
        ca: the certificate authority to issue from (a new one by default; the pytest plugin
            shares one per session).
        store: the mailbox store (a new in-memory one by default).

    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        config: StackConfig | None = None,
        *,
        ca: CertificateAuthority | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config if config is not None else StackConfig()
        cache = self.config.cert_cache or cert_cache_dir()
        if ca is None and cache is not None:  # CA and leaves kept across sessions (issue #17)
            ca = cached_authority(cache)
        self.ca = ca if ca is not None else CertificateAuthority()
        self.store = store if store is not None else Store()
        self.domains: dict[str, DomainEndpoints] = {}
        self._thread: LoopThread | None = None
        self._listeners: Listeners | None = None
        self.dns: DNSServer | None = None
        self.relay: Relay | None = None
        #: SMTP port of each MX host name, for the relay: with ephemeral ports every MX lives
        #: on one address, so DNS alone cannot say which port; names absent here use 25.
        self.mx_ports: dict[str, int] = {}
        #: The relay's outbound TLS policy of each recipient domain (StackConfig.relay_tls);
        #: a domain absent here has none (opportunistic TLS). reset() restores the default.
        self.tls_policies: dict[str, TLSPolicy] = {}
        self._default_zone: Zone | None = None
        self._zone: Zone | None = None  # what the DNS serves now
        #: DKIM signing keys per domain, minted at start (StackConfig.dkim_unsigned_domains).
        self.dkim_keys: dict[str, tuple[SigningKey, ...]] = {}
        self._dkim_minted: Callable[[], dict[str, tuple[SigningKey, ...]]] = dict
        self._dns_changed = False
        self._journeys = Journeys()
        #: The latest connections of every server, for transcripts() (issue #15).
        self._recordings = Recordings(self.config.transcript_connections)
        self._tokens = TokenTable(time.time)  # oauth_token(): XOAUTH2 / OAUTHBEARER logins
        self._relay_changed = threading.Condition()
        # The relay queue as of its last change, taken only while someone waits on it (None:
        # take it when asked); the version counts changes (both under _relay_changed).
        self._relay_queue: list[QueuedMessage] | None = []
        self._relay_version = 0
        self._relay_waiters = 0
        self._delivery_callbacks: list[Callable[[DeliveredMessage], None]] = []
        self._router = Router(
            config=self.config,
            store=self.store,
            journeys=self._journeys,
            relay=lambda: self.relay,
            authserv_ids=lambda: [ep.hostname for ep in self.domains.values()],
            announce=self._announce,
        )
        self._started = False
        self._stopped = False
        self._start_lock = threading.Lock()
        for user in self.config.users:
            self.store.add_user(user.address, user.password)
        # The capture of mail for outside domains: a mailbox, never a login (no password
        # opens it on any service); tests read it through ``outbound``.
        self.store.add_user(OUTBOUND_ADDRESS, None)

    @property
    def faults(self) -> Faults:
        """Test-only misbehaviour switches (see :class:`Faults`); reset() turns them off."""
        return self._router.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._router.faults = value

    @property
    def content_filter(self) -> ContentFilter | None:
        """The receiving MX's content filter (see roundtrip.protocols.filter); a test may
        replace it, and reset() restores the default, which only adds X-Spam headers."""
        return self._router.content_filter

    @content_filter.setter
    def content_filter(self, value: ContentFilter | None) -> None:
        self._router.content_filter = value

    # lifecycle

    def __enter__(self) -> MailStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def started(self) -> bool:
        return self._started and not self._stopped

    @property
    def loop_thread(self) -> LoopThread | None:
        """The event-loop thread all the stack's servers run on (None before ``start()``).

        An add-on server runs its listener there too (the web view, roundtrip/web), on the
        loop the stack's own servers use, for as long as the stack runs.
        """
        return self._thread

    def start(self) -> MailStack:
        """Bind every listener and return once each accepts connections (TLS included).

        Raises:
            ServerStartError: a port could not be bound, or a listener was not ready within
                ``config.timeouts.start_timeout`` seconds.
        """
        with self._start_lock:
            if self._started:
                return self
            self._started = True
        # DKIM keys are minted on worker threads while the listeners bind (stack/_dkim.py).
        unsigned = self.config.dkim_unsigned_domains
        signing = [d for d in self.config.domains if d not in unsigned and "*" not in unsigned]
        self._dkim_minted = mint_in_background(
            signing if self.config.dkim else (), self.config.cert_cache or cert_cache_dir()
        )
        self._thread = LoopThread(name=f"roundtrip-{'-'.join(self.config.domains)}")
        self.store.on_listener_error = self._thread.record_error
        timeout = self.config.timeouts.start_timeout
        try:
            self._thread.run(self._start_all(), timeout=timeout)
            self._thread.run(self._self_check(), timeout=timeout)
            self._recordings.clear()  # the self-check's connections are nobody's business
        except TimeoutError:
            self.stop()
            raise ServerStartError(
                f"the stack was not ready within {timeout:g} s; raise start_timeout "
                "(roundtrip_timeout in pytest ini) if the machine is slow"
            ) from None
        except BaseException:
            self.stop()
            raise
        return self

    async def _start_all(self) -> None:
        assert self._thread is not None
        _record_on_loop(self._recordings)
        limits = self.config.smtp_limits
        # One penalty table for every listener: a client guessing passwords on one port is
        # slowed on all of them (docs/security.md, A4.3).
        penalties = AuthPenalties(
            initial=limits.auth_penalty_initial,
            maximum=limits.auth_penalty_max,
            timeout=limits.auth_penalty_timeout,
        )
        self._listeners = Listeners(
            config=self.config,
            store=self.store,
            accepts_recipient=self._router.accepts,
            router=self._router.route,
            prepare=self._router.prepare,
            on_error=self._thread.record_error,
            check_token=self._tokens.check,
        )
        for index, domain in enumerate(self.config.domains):
            # The leaf names the address too: clients dial what `serve` prints (127.0.0.N).
            hosts = hosts_for(self.config, index)
            tls = self.ca.server_context([f"mail.{domain}", domain, *hosts])
            # A client without SNI (mbsync, offlineimap3) on an extra host (::1) gets a leaf
            # whose CN is the address it dialled: one context per extra host.
            tls_by_host = {
                host: self.ca.server_context([f"mail.{domain}", domain, *hosts], local_address=host)
                for host in hosts[1:]
            }
            endpoints = await self._listeners.start_domain(
                index, domain, tls, penalties, tls_by_host=tls_by_host
            )
            self.domains[domain] = endpoints
        await self._start_routing()

    async def _start_routing(self) -> None:
        """The DNS zone of every domain, and the relay that routes by it."""
        assert self._thread is not None
        self.dkim_keys = self._dkim_minted()
        self._router.dkim_keys = lambda domain: self.dkim_keys.get(domain, ())
        self._zone = self._default_zone = build_zone(self.default_dns_records())
        dns_host, *dns_extra = dns_hosts(self.config)
        try:
            self.dns = await start_dns(
                self._default_zone,
                host=dns_host,
                port=port_for(self.config, "dns"),
                on_error=self._thread.record_error,
                extra_hosts=dns_extra,
            )
        except OSError as exc:
            raise ServerStartError(f"cannot bind dns on {dns_host}: {exc}") from exc
        self.mx_ports.update({ep.hostname: ep.ports["smtp"] for ep in self.domains.values()})
        self.tls_policies = self.default_tls_policies()
        # A durable store gets a durable relay queue in its (locked) tree (docs/security.md A9.4).
        spool = None
        if isinstance(self.store, MaildirStore):
            spool = RelaySpool(self.store.root / MAILDIR_SPOOL_NAME)
        self.relay = Relay(
            dns_address=self.dns.address,
            # The MX look-ups ask the DNS server in this process, without a UDP round.
            dns_source=self.dns.lookup,
            tls_context=self.ca.client_context(),
            # Routed domains are delivered over SMTP like the stack's own, never captured.
            local_domains=lambda: {*self.config.domains, *self.config.routed_domains},
            mx_port=lambda host: self.mx_ports.get(host.rstrip(".").lower(), 25),
            tls_policy=lambda domain: self.tls_policies.get(domain),
            deliver_local=lambda address, raw, mailbox: self._deliver(address, raw, mailbox),
            capture_outbound=self._capture,
            on_error=self._thread.record_error,
            retry_delays=self.config.retry_delays,
            queue_lifetime=self.config.queue_lifetime,
            connection_cache_time=self.config.relay_connection_cache,
            connect_timeout=self.config.timeouts.start_timeout,
            reporting_mta=next(iter(self.domains.values())).hostname,
            on_event=self._relay_event,
            on_queue_change=self._relay_queue_changed,
            # Every change of the served records builds a new zone: routes cached by the relay
            # for their TTL are dropped at once (set_dns_records, reset).
            zone_version=lambda: self._zone,
            spool=spool,
        )
        dns_server = self.dns
        assert dns_server is not None
        if self.config.dkim:
            self._router.dkim_lookup = zone_lookup(dns_server)
        if self.config.sender_auth:  # SPF and DMARC (roundtrip/stack/_auth.py)
            self._router.sender_lookup = sender_zone_lookup(dns_server)
        # What a previous process left queued gets its attempt now, before start() returns.
        self.relay.restore()

    async def _self_check(self) -> None:
        assert self._listeners is not None
        await self._listeners.self_check(list(self.domains.values()), self.ca.client_context())

    def stop(self) -> None:
        """Close every listener and connection and stop the loop. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is None:
            return
        if thread.loop.is_running():
            try:
                thread.run(self._close_all(), timeout=5)
            except TimeoutError:
                pass
        thread.stop()
        self.ca.cleanup()
        close = getattr(self.store, "close", None)
        if close is not None:  # a durable store releases its directory
            close()

    async def _close_all(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        if self.dns is not None:
            await self.dns.close()
        if self._listeners is not None:
            self._listeners.close()
        # Abort the SMTP sessions' connections before their tasks are cancelled: a cancelled
        # aiosmtpd session closes its transport, and a TLS transport closed a second time
        # cannot be aborted any more (abort_sessions).
        loop = asyncio.get_running_loop()
        abort_sessions(loop)
        await asyncio.sleep(0)  # a yield: the aborts' connection_lost callbacks run
        # Cancel sessions still running (aiosmtpd handlers) so nothing outlives the loop.
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # And the connections a cancelled handler left open.
        abort_sessions(loop)
        await asyncio.sleep(0)

    def check(self) -> None:
        """Re-raise the first exception any server or :meth:`on_delivery` callback raised
        since the last check (the others are named in its notes).

        It first lets the event loop finish the step it is running: a delivery stores the
        message, which wakes :meth:`wait_for`, and then runs the callbacks in the same step
        (``Router._store_here`` in roundtrip/stack/_delivery.py), so a thread that saw the
        message may ask before a callback raised.

        Raises:
            TimeoutError: the loop did not get to it within ``timeouts.wait_timeout``
                seconds (a callback or server code blocks it).
        """
        __tracebackhide__ = True  # the report shows the test's line, not ours
        if self._thread is None:
            return
        self._settle_loop()
        _raise_first(self._thread.take_errors(), "")

    def _settle_loop(self) -> None:
        """Return once the loop has run what it was running and what was scheduled on it."""
        thread = self._thread
        if thread is None or not self.started or thread.in_loop_thread:
            return
        if not thread.loop.is_running():
            return
        limit = self.config.timeouts.wait_timeout
        try:
            thread.call_wait(_nothing, timeout=limit)
        except TimeoutError:
            raise TimeoutError(
                f"the stack's event loop did not answer within {limit:g} s: a delivery "
                "callback or server code blocks it"
            ) from None

    def reset(self) -> None:
        """Empty every mailbox and the relay queue; forget DNS queries, transcripts, OAuth
        tokens and the :meth:`on_delivery` callbacks; restore the default faults, content
        filter, DNS records, MX ports and relay TLS policies.

        The servers keep running. An error a server or callback recorded since the last
        :meth:`check` is not forgotten: once the stack is reset, it is raised (the first
        one, the others named in its notes), as :meth:`check` would.
        """
        if self._thread is not None and self.relay is not None:
            relay, dns = self.relay, self.dns
            # Every relay activity leaves an event: with none, there is nothing to cancel and
            # the hop to the loop thread (the costliest part of a reset) is skipped.
            if relay.events:
                self._thread.run(relay.clear(), timeout=5)
                with self._relay_changed:
                    self._relay_queue = []
            if dns is not None:
                dns.query_log.clear()
                if self._dns_changed:
                    self._thread.call_wait(dns.set_zone, self._default_zone)
                    self._zone = self._default_zone
                    self._dns_changed = False
            self.mx_ports = {ep.hostname: ep.ports["smtp"] for ep in self.domains.values()}
            self.tls_policies = self.default_tls_policies()
        self.store.clear()
        self._recordings.clear()
        self._tokens.clear()
        self.faults = Faults()
        self.content_filter = default_filter
        self._delivery_callbacks = []
        if self._thread is not None:
            _raise_first(
                self._thread.take_errors(),
                "recorded by the stack before reset(), which raised it once the stack was reset",
            )

    # the relay queue

    def _relay_event(self, event: RelayEvent) -> None:
        self._journeys.record_relay(event.queue_id, event.step, event.detail, time.monotonic())
        self._relay_queue_changed()

    def _relay_queue_changed(self) -> None:
        """On the loop thread, after every relay event: copying the whole queue costs in
        proportion to its length (3.9 % of the loop under a 10,000-message load, issue #17),
        so it is copied here only while a thread waits in wait_relay(); relay_queue() asks
        the loop for a copy otherwise."""
        if self.relay is not None:
            with self._relay_changed:
                self._relay_version += 1
                self._relay_queue = self.relay.queue() if self._relay_waiters else None
                self._relay_changed.notify_all()

    def _relay_snapshot(self) -> tuple[int, list[QueuedMessage]]:
        """``(version, queue)`` read together on the loop thread, where the queue is
        consistent; directly when the loop is not running (the stack stopped)."""
        relay, thread = self.relay, self._thread
        if relay is None:
            return self._relay_version, []

        def read() -> tuple[int, list[QueuedMessage]]:
            return self._relay_version, relay.queue()

        if thread is None or thread.in_loop_thread or not thread.loop.is_running():
            return read()
        return thread.call_wait(read)

    def relay_queue(self) -> list[QueuedMessage]:
        """The relay queue as of its last change: messages waiting for some recipient."""
        with self._relay_changed:
            kept = self._relay_queue
        if kept is None:
            kept = self._relay_snapshot()[1]
        return list(kept)

    def wait_relay(
        self, predicate: Callable[[list[QueuedMessage]], bool], timeout: float
    ) -> list[QueuedMessage]:
        """Block until ``predicate(queue)`` holds after a relay event, or the timeout passes.

        Returns:
            The queue snapshot that satisfied the predicate.

        Raises:
            TimeoutError: it never held.
        """
        deadline = time.monotonic() + timeout
        with self._relay_changed:
            self._relay_waiters += 1  # from here on every change is copied for us
        try:
            version, queue = self._relay_snapshot()
            with self._relay_changed:
                if self._relay_version != version and self._relay_queue is not None:
                    queue = self._relay_queue  # a change after our read: copied for us
                while not predicate(queue):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"relay queue did not reach the expected state in {timeout:g} s: "
                            f"{queue!r}"
                        )
                    self._relay_changed.wait(remaining)
                    if self._relay_queue is not None:
                        queue = self._relay_queue
                return list(queue)
        finally:
            with self._relay_changed:
                self._relay_waiters -= 1

    def relay_idle(self, timeout: float = 10.0) -> None:
        """Wait until no relay attempt is running (retries may still be scheduled)."""
        self._require_started()
        assert self._thread is not None and self.relay is not None
        self._thread.run(self.relay.wait_idle(timeout), timeout=timeout + 1)

    def journey(self, message_id: str) -> list[HopTiming]:
        """Per-hop timings of a message stored by this stack, found by its Message-ID.

        Steps: ``submissions accepted`` (or ``submission``/``smtp``), ``relay queued``,
        ``relay mx-lookup``, ``relay connected``, ``smtp accepted`` (the recipient's MX),
        ``relay delivered``, ``stored``; ``at`` counts seconds from the first step. The MX's
        ``smtp accepted`` step carries its sender verdicts in ``auth`` (``spf``, ``dkim`` per
        signature, ``dmarc``), as its Authentication-Results field reports them.
        """
        return self._journeys.journey(message_id)

    def transcripts(
        self,
        address: str | None = None,
        message_id: str | None = None,
        service: str | None = None,
        *,
        since: float | None = None,
    ) -> list[Transcript]:
        """What went over each connection of the stack's servers, oldest first.

        Every connection of every listener, of the relay to an MX, and every DNS query is
        recorded (the latest ``config.transcript_connections`` of each; ``reset()`` forgets
        them). Credentials are redacted and message content is shown as its size and sha256;
        ``str(transcript)`` reads like swaks (``->`` the client, ``<-`` the server).

        Args:
            address: only connections that named it (MAIL FROM, RCPT TO, a login).
            message_id: only connections that carried the message with this Message-ID.
            service: only this listener's: ``smtp``, ``submission``, ``submissions``, ``imap``,
                ``imaps``, ``pop3``, ``pop3s``, ``relay`` or ``dns``.
            since: only connections that began at or after this ``time.time()``.

        Returns:
            One ``Transcript`` per connection (per query for DNS).
        """
        return collect(
            self._recordings,
            address=address,
            message_id=message_id,
            service=service,
            since=since,
        )

    def default_dns_records(self) -> list[Record]:
        """The records the stack serves by default: SOA, NS, MX, A/AAAA, SPF and DMARC
        (``_dmarc.<domain>``, ``StackConfig.dmarc_policy``) per domain.

        Plus ``_mta-sts.<domain>`` TXT (RFC 8461 §3.1) for a domain whose relay TLS policy is
        not ``none`` (the policy itself is not served over HTTPS).
        """
        records: list[Record] = []
        policies = self.default_tls_policies()
        for ep in self.domains.values():
            records += default_records(
                ep.domain, ep.host, mx_host=ep.hostname, extra_ips=ep.extra_hosts
            )
            policy = policies.get(ep.domain)
            if policy is not None and policy.mode != "none":
                records.append(Record(f"_mta-sts.{ep.domain}", "TXT", sts_record(policy)))
            for key in self.dkim_keys.get(ep.domain, ()):  # RFC 6376 section 3.6.2.1
                records.append(Record(f"{key.selector}._domainkey.{ep.domain}", "TXT", key.record))
        return sender_auth_records(self.config, records)  # DMARC records, SPF for the relay

    def default_tls_policies(self) -> dict[str, TLSPolicy]:
        """The relay's outbound TLS policy per recipient domain (docs/security.md A3.7).

        Every stack domain acts as if it published an MTA-STS ``enforce`` policy listing its
        MX hosts, whichever the stack's DNS serves (so an MX a test points elsewhere with
        :meth:`set_dns_records` still needs STARTTLS and a certificate for its name from the
        stack CA): ``mx=None``. ``StackConfig.relay_tls`` overrides that per domain.

        Raises:
            ConfigError: a ``relay_tls`` policy file is invalid.
        """
        policies = {ep.domain: TLSPolicy(mode="enforce") for ep in self.domains.values()}
        for domain, value in self.config.relay_tls:
            if value in ("enforce", "testing", "none"):
                policies[domain] = TLSPolicy(mode=value)  # type: ignore[arg-type]
                continue
            try:
                policies[domain] = parse_policy(value)
            except RoundtripError as exc:
                raise ConfigError(f"relay_tls[{domain!r}]: {exc}") from None
        return policies

    def set_dns_records(self, records: list[Record], *, refuse_outside: bool = False) -> None:
        """Serve other DNS records (a null MX, a second MX, a missing domain ...).

        A name in no zone gets NXDOMAIN with an SOA, as the default zone answers and the
        world's DNS does; ``refuse_outside=True`` answers REFUSED instead (which resolvers and
        MTAs treat as a temporary failure). ``reset()`` restores the default records.
        """
        self._require_started()
        assert self._thread is not None and self.dns is not None
        zone = build_zone(records, refuse_outside=refuse_outside)
        self._dns_changed = True
        # Served before this returns: the caller's next query must get these records.
        self._thread.call_wait(self.dns.set_zone, zone)
        self._zone = zone

    def publish_dkim_key(self, domain: str, selector: str, public_key: str | bytes | object) -> str:
        """Serve ``public_key`` at ``<selector>._domainkey.<domain>`` until :meth:`reset`, so
        mail an application signs with its own key verifies at the MX.

        Args:
            public_key: a PEM public key (RSA or Ed25519), a ``cryptography`` public key, or a
                whole record (``v=DKIM1; k=rsa; p=...``) given as is (``p=`` empty: revoked).

        Returns:
            The TXT value now served.

        Raises:
            ConfigError: not a public key, or a name outside the stack's zones.
        """
        self._require_started()
        assert self._zone is not None
        try:
            value = public_record(public_key)
        except ValueError as exc:
            raise ConfigError(f"publish_dkim_key: {exc}") from None
        name = f"{selector}._domainkey.{domain}".lower().rstrip(".")
        kept = [
            r for r in self._zone.records if (r.name.lower().rstrip("."), r.rtype) != (name, "TXT")
        ]
        records = [*kept, Record(name, "TXT", value)]
        self.set_dns_records(records, refuse_outside=self._zone.refuse_outside)
        return value

    def _deliver(self, address: str, raw: bytes, mailbox: str) -> None:
        self.store.deliver(address, raw, mailbox=mailbox, envelope_to=(address,))

    def _capture(self, mail_from: str, rcpt: str, raw: bytes) -> None:
        stored = self.store.deliver(
            OUTBOUND_ADDRESS, raw, envelope_from=mail_from, envelope_to=(rcpt,)
        )
        self._announce(stored)

    # catch-all domains (StackConfig.catch_all)

    # delivery announcements (``roundtrip serve`` prints one line per message)

    def on_delivery(self, callback: Callable[[DeliveredMessage], None]) -> None:
        """Call ``callback`` with each message the stack stores for a recipient.

        That is every copy in a user's mailbox (from the MX, or from submission for the
        same domain) and every copy captured for an outside domain; not APPENDs. The callback
        runs on the stack's event-loop thread: keep it short and never block there. An
        exception it raises is recorded and re-raised by :meth:`check` (which
        :meth:`wait_for` and the assertions call once they have looked), or by
        :meth:`reset`. :meth:`reset` forgets every callback: the ``mailstack`` fixture
        resets the stack for each test, so a callback lives as long as the test that
        registered it.
        """
        self._delivery_callbacks.append(callback)

    def _announce(self, stored: StoredMessage) -> None:
        if not self._delivery_callbacks:
            return
        message = DeliveredMessage.of(stored)
        for callback in tuple(self._delivery_callbacks):  # reset() may replace the list
            try:
                callback(message)
            except Exception as exc:  # reported to the test through check()
                if self._thread is None:
                    raise
                self._thread.record_error(exc)

    # facts for clients

    @property
    def users(self) -> tuple[User, ...]:
        return self.config.users

    def user(self, domain: str | None = None) -> User:
        """The first user of ``domain`` (the first domain by default), or the user whose
        address is given (``user("noreply@example.com")``).

        Raises:
            ConfigError: no such domain or user.
        """
        return self.config.user(domain)

    def oauth_token(self, user: User | str, *, lifetime: float = 3600.0) -> str:
        """A new OAuth 2.0 bearer token for ``user``'s XOAUTH2 and OAUTHBEARER logins (RFC
        7628) on submission, IMAP and POP3. It is random, opens only ``user``'s mailbox,
        expires after ``lifetime`` seconds (0 or less: already expired) and is forgotten by
        :meth:`reset`.

        Raises:
            ConfigError: ``user`` is not a user of this stack.
        """
        address = self.config.user(user if isinstance(user, str) else user.address).address
        token = secrets.token_urlsafe(32)
        self._tokens.issue(address, token, lifetime=lifetime)
        return token

    def endpoints(self, domain: str | None = None) -> DomainEndpoints:
        """The endpoints of ``domain`` (the first domain by default)."""
        self._require_started()
        name = (domain or self.config.domains[0]).lower()
        try:
            return self.domains[name]
        except KeyError:
            raise ConfigError(
                f"{domain!r} is not a domain of this stack ({', '.join(self.domains)})"
            ) from None

    def endpoint(self, service: str, user: User | None = None) -> Endpoint:
        """A probe ``Endpoint`` for ``service`` of ``user``'s domain, with its credentials.

        Args:
            service: ``submissions``, ``submission``, ``imaps``, ``imap``, ``pop3s``, ``pop3``.
            user: whose credentials and domain (the first domain's user by default).
        """
        protocols = {
            "submissions": ("smtp", "implicit"),
            "submission": ("smtp", "starttls"),
            "imaps": ("imap", "implicit"),
            "imap": ("imap", "starttls"),
            "pop3s": ("pop3", "implicit"),
            "pop3": ("pop3", "starttls"),
        }
        if service not in protocols:
            raise ConfigError(
                f"no probe endpoint for {service!r}; use one of {', '.join(protocols)}"
            )
        owner = user if user is not None else self.user()
        ep = self.endpoints(owner.domain)
        protocol, tls = protocols[service]
        return Endpoint(
            protocol, tls, ep.host, ep.ports[service], owner.address, owner.password, ep.hostname
        )

    def client_context(self) -> ssl.SSLContext:
        """A client SSLContext that trusts this stack's CA (and verifies host names)."""
        return self.ca.client_context()

    @property
    def ca_file(self) -> str:
        """Path of a PEM file holding the CA certificate, for external programs."""
        return self.ca.ca_file()

    def describe(self, *, include_passwords: bool = True) -> dict[str, Any]:
        """The ``roundtrip serve --json`` document.

        With ``StackConfig.extra_hosts`` it has one more key, ``extra_hosts``: the other
        addresses every listed endpoint answers on, on the same port.
        """
        self._require_started()
        assert self.dns is not None
        dns_host = f"[{self.dns.host}]" if ":" in self.dns.host else self.dns.host
        doc: dict[str, Any] = {
            "ca_file": self.ca_file,
            "dns": f"{dns_host}:{self.dns.port}",
            "domains": {
                d: {service: ep.endpoint(service) for service in SERVICES}
                for d, ep in self.domains.items()
            },
            "users": [
                {"address": u.address, "password": u.password if include_passwords else "***"}
                for u in self.config.users
            ],
        }
        if self.config.extra_hosts:
            # Dual stack: every endpoint above answers on these addresses too, same port.
            doc["extra_hosts"] = list(self.config.extra_hosts)
        return doc

    def _require_started(self) -> None:
        if not self.started:
            raise ServerStartError("the stack is not running: call start() first")

    # reading what arrived

    def messages(
        self, to: str | None = None, *, mailbox: str | None = None
    ) -> list[DeliveredMessage]:
        """Messages stored so far, oldest first.

        Args:
            to: one recipient: a user of the stack, or an address of an outside domain (its
                copies in the outbound capture). All users' mailboxes when None (the
                capture is listed apart, in :attr:`outbound`).
            mailbox: only this folder (every folder by default).
        """
        if to is not None and self._is_outside(to):
            return self._outbound_for(to)
        if to is not None and not self.store.has_user(to):
            owner = catch_all_owner(self.config, to)
            if owner is not None:
                wanted = address_key(to)
                return [
                    m
                    for m in self.messages(owner, mailbox=mailbox)
                    if wanted in (address_key(a) for a in m.envelope_to)
                ]
        stored = (
            self.store.messages(to, mailbox)
            if to
            else [
                m
                for u in self.store.users()
                if u != OUTBOUND_ADDRESS
                for m in self.store.messages(u, mailbox)
            ]
        )
        stored.sort(key=lambda m: m.stored_monotonic)
        return [DeliveredMessage.of(m) for m in stored]

    @property
    def outbound(self) -> list[DeliveredMessage]:
        """Messages addressed to domains outside the stack, captured instead of sent.

        One copy per outside recipient (its ``envelope_to``). ``assert_delivered``,
        ``assert_not_delivered`` and ``wait_for`` look here too: mail to ``carol@gmail.com``
        counts as delivered to her, and fails ``assert_not_delivered()``.
        """
        return [DeliveredMessage.of(m) for m in self.store.messages(OUTBOUND_ADDRESS)]

    def _is_outside(self, address: str) -> bool:
        """True for an address of a domain the stack does not serve (mail to it is captured)."""
        if self.store.has_user(address):
            return False
        domain = address_key(address).rpartition("@")[2].rstrip(".")
        return bool(domain) and domain not in {d.lower() for d in self.config.domains}

    def _outbound_for(self, address: str) -> list[DeliveredMessage]:
        wanted = address_key(address)
        return [m for m in self.outbound if wanted in (address_key(a) for a in m.envelope_to)]

    def _all_messages(self, mailbox: str | None) -> list[DeliveredMessage]:
        """What the assertions search: every user's mailboxes, then the outbound capture."""
        captured = self.outbound if mailbox is None or mailbox.upper() == "INBOX" else []
        return self.messages(mailbox=mailbox) + captured

    def wait_for(
        self,
        to: str | None = None,
        *,
        subject: str | None = None,
        sender: str | None = None,
        match: Callable[[DeliveredMessage], bool] | None = None,
        mailbox: str = "INBOX",
        timeout: float | None = None,
    ) -> DeliveredMessage:
        """Wait until a matching message is stored, and return it.

        Args:
            to: recipient: a user (its mailbox), an address of a catch-all domain (its
                owner's mailbox), or an address of an outside domain (the outbound capture);
                any of them when None.
            subject: the exact decoded Subject.
            sender: the From address (case-insensitive; the Sender field and the envelope
                sender count too, as in :func:`roundtrip.assertions.assert_delivered`).
            match: any other predicate on the parsed message.
            mailbox: the folder to look in (``INBOX`` in any case, other names exactly).
            timeout: seconds to wait (``config.timeouts.wait_timeout`` by default).

        Raises:
            NotDeliveredError: nothing matched in time; the message lists what did arrive.
            ConfigError: ``to`` is in a domain of the stack but is not a user of it; no user
                ``to`` names (any user without ``to``) has a folder ``mailbox``.
            Exception: what a server or an :meth:`on_delivery` callback raised, the found
                message's callbacks included (:meth:`check`).
        """
        __tracebackhide__ = True  # the report shows the test's line, not ours
        limit = self.config.timeouts.wait_timeout if timeout is None else timeout
        snapshot = self._mailboxes_of(to, mailbox)
        # A misspelt folder would wait the whole timeout for nothing: refused at once, as by
        # the assertions, naming the folders there are.
        self._check_mailbox(None if to is None else address_key(to), mailbox)
        criteria = Criteria(subject=subject, sender=sender, match=match)  # type: ignore[arg-type]
        found = wait_for_matches(
            snapshot, criteria, count=1, wait_until=self.store.wait_until, timeout=limit
        )
        if not found:
            raise NotDeliveredError(
                _not_delivered_text(
                    self,
                    to=to,
                    subject=subject,
                    sender=sender,
                    mailbox=mailbox,
                    waited=limit,
                    custom=match is not None,
                ),
                step="WAIT",
            )
        self.check()
        return found[0]

    def _mailboxes_of(self, to: str | None, mailbox: str) -> Callable[[], list[DeliveredMessage]]:
        """What ``wait_for(to, mailbox=...)`` searches, as a function that reads it anew.

        Mail for an outside domain is in the outbound capture (its INBOX), mail for a
        catch-all address in its owner's mailbox: both are told apart by envelope recipient.
        """
        outside = to is not None and self._is_outside(to)
        owner = None if to is None or outside else catch_all_owner(self.config, to)
        if to is None:
            addresses = [u for u in self.store.users() if u != OUTBOUND_ADDRESS]
            addresses.append(OUTBOUND_ADDRESS)
        elif outside:
            addresses = [OUTBOUND_ADDRESS]
        elif self.store.has_user(to):
            addresses, owner = [to], None
        elif owner is not None:
            addresses = [owner]
        else:
            users = ", ".join(u for u in self.store.users() if u != OUTBOUND_ADDRESS)
            raise ConfigError(
                f"{to!r} is not a user of this stack, though its domain is served by it;"
                f" the users: {users}"
            )
        rcpt = address_key(to) if to is not None and (outside or owner) else None

        def snapshot() -> list[DeliveredMessage]:
            found = []
            for address in addresses:
                if address == OUTBOUND_ADDRESS and mailbox.upper() != "INBOX":
                    continue
                try:
                    stored = self.store.messages(address, mailbox)
                except RoundtripError:  # the folder does not exist (yet)
                    continue
                for message in map(DeliveredMessage.of, stored):
                    if rcpt is None or rcpt in (address_key(a) for a in message.envelope_to):
                        found.append(message)
            return found

        return snapshot

    def assert_delivered(
        self,
        to: str | None = None,
        *,
        subject: TextPattern | None = None,
        sender: str | None = None,
        count: int | None = 1,
        match: Callable[[ReceivedMessage], bool] | None = None,
        headers: Mapping[str, TextPattern] | None = None,
        body_contains: str | None = None,
        mailbox: str | None = None,
        timeout: float | None = None,
        auth: Mapping[str, str] | None = None,
    ) -> list[DeliveredMessage]:
        """Wait until ``count`` matching messages are stored and the relay has settled, then
        assert exactly that many.

        Args:
            to, subject, sender, match, headers, body_contains, auth: as for
                :func:`roundtrip.assertions.assert_delivered`.
            count: how many must match exactly, ``0`` included: it waits until that many
                are stored, then, as :meth:`assert_not_delivered` does, until no relay
                attempt is running and no message is queued for a matching recipient (any
                recipient without ``to``), so a copy still on its way counts. A message
                still queued when ``timeout`` passes (the next attempt is later) fails the
                assertion: the count is not final. ``None``: at least one; it returns as
                soon as one is stored.
            mailbox: only this folder (every folder by default, so quarantined mail shows);
                ``INBOX`` in any case, other names exactly (RFC 3501 section 5.1). A
                failure lists what arrived in the other folders.
            timeout: seconds to wait in all (``config.timeouts.wait_timeout`` by default).

        Raises:
            AssertionError: a different number matched, or mail for a matching recipient is
                still queued; lists what arrived, with a diff of a near miss, and what is
                queued with its next attempt.
            ConfigError: no user of the stack (no user ``to`` names) has a folder
                ``mailbox``; the message names the folders there are.
        """
        __tracebackhide__ = True  # the report shows the test's line, not ours
        criteria = Criteria(to, subject, sender, match, headers, body_contains, auth=auth)
        limit = self.config.timeouts.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._check_mailbox(criteria.to, mailbox)
        wait_for_matches(
            lambda: self._all_messages(mailbox),
            criteria,
            count=1 if count is None else count,
            wait_until=self.store.wait_until,
            timeout=limit,
        )
        pending = [] if count is None else self._settle_relay(criteria.to, deadline)
        self.check()
        return check_delivered(
            self._all_messages(mailbox),
            criteria,
            count,
            pending=_queued_text(pending, criteria.to),
            elsewhere=lambda: self._other_folders(criteria.to, mailbox),
            where=mailbox,
        )

    def assert_not_delivered(
        self,
        to: str | None = None,
        *,
        subject: TextPattern | None = None,
        sender: str | None = None,
        match: Callable[[ReceivedMessage], bool] | None = None,
        headers: Mapping[str, TextPattern] | None = None,
        body_contains: str | None = None,
        mailbox: str | None = None,
        timeout: float | None = None,
        auth: Mapping[str, str] | None = None,
    ) -> None:
        """Wait until the relay has settled, then assert that no stored message matches.

        Settled: no relay attempt is running and no message is queued for a matching
        recipient (any recipient without ``to``; its subject and other fields are not
        looked at, since they may change on the way, as a list alias's subject prefix
        does). A retry due within ``timeout`` is waited for; a message still queued when it
        passes fails the assertion, since it may yet be delivered: the failure says for
        whom it is queued, why, and when the next attempt is.

        Args:
            mailbox: as for :meth:`assert_delivered` (an unknown folder is an error, not a
                pass).

        Raises:
            AssertionError: something matched, or is still queued; the message lists what.
            ConfigError: no user of the stack (no user ``to`` names) has a folder
                ``mailbox``.
        """
        __tracebackhide__ = True  # the report shows the test's line, not ours
        criteria = Criteria(to, subject, sender, match, headers, body_contains, auth=auth)
        limit = self.config.timeouts.wait_timeout if timeout is None else timeout
        self._check_mailbox(criteria.to, mailbox)
        pending = self._settle_relay(criteria.to, time.monotonic() + limit)
        self.check()
        check_not_delivered(
            self._all_messages(mailbox), criteria, pending=_queued_text(pending, criteria.to)
        )

    def _check_mailbox(self, to: str | None, mailbox: str | None) -> None:
        """Refuse a folder that no user the assertion looks at has: it would search nothing,
        and pass as not delivered whatever arrived. ``INBOX`` is case-insensitive, other
        names are not (RFC 3501 section 5.1, ``store.validate_mailbox_name``).

        Raises:
            ConfigError: the name is not acceptable, or no such folder; the message names
                the folders there are.
        """
        if mailbox is None:
            return
        try:
            canonical = validate_mailbox_name(mailbox)
        except RoundtripError as exc:
            raise ConfigError(f"mailbox={mailbox!r}: {exc}") from None
        if to is not None and self._is_outside(to):
            if canonical != "INBOX":
                raise ConfigError(
                    f"mailbox={mailbox!r}: mail for {to} (an outside domain) is captured in "
                    "the outbound capture's INBOX, which has no other folder"
                )
            return
        owner = None if to is None else (to if self.store.has_user(to) else None)
        if to is not None and owner is None:
            owner = catch_all_owner(self.config, to)
        users = [owner] if owner is not None else self._users()
        names: list[str] = []
        for user in users:
            for box in self.store.mailboxes(user):
                if box.name == canonical:
                    return
                if box.name not in names:
                    names.append(box.name)
        whose = f"{owner}'s folders" if owner is not None else "the users' folders"
        raise ConfigError(
            f"mailbox={mailbox!r}: no such folder; {whose}: {', '.join(names)} (INBOX in any "
            "case, other names exactly as listed)"
        )

    def _users(self) -> list[str]:
        return [u for u in self.store.users() if u != OUTBOUND_ADDRESS]

    def _other_folders(self, to: str | None, mailbox: str | None) -> list[DeliveredMessage]:
        """What arrived for ``to`` (anyone: None) in the folders other than ``mailbox``."""
        if mailbox is None:
            return []
        canonical = validate_mailbox_name(mailbox)
        found = [m for m in self._all_messages(None) if m.stored.mailbox != canonical]
        return found if to is None else Criteria(to=to).select(found)

    def _settle_relay(self, to: str | None, deadline: float) -> list[QueuedMessage]:
        """Wait, until ``deadline`` (``time.monotonic()``), for the relay attempts under way
        and for every queued message a recipient matching ``to`` may get (any without
        ``to``) to leave the queue; return those still queued.

        ``Relay.wait_idle`` alone waits for running attempts only: a message whose attempt
        got a 4xx waits for its retry in the queue (roundtrip/servers/relay.py).
        """
        thread, relay = self._thread, self.relay
        if thread is None or relay is None or not self.started:
            return []

        def waiting(queue: list[QueuedMessage]) -> list[QueuedMessage]:
            return [q for q in queue if any(self._may_reach(rcpt, to) for rcpt in q.rcpt)]

        try:
            remaining = max(0.0, deadline - time.monotonic())
            thread.run(relay.wait_idle(remaining), timeout=remaining + 1)
            self.wait_relay(lambda q: not waiting(q), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return waiting(self.relay_queue())
        return []

    def _may_reach(self, rcpt: str, to: str | None) -> bool:
        """Whether mail queued for ``rcpt`` may end up as a copy delivered to ``to``: ``to``
        itself, the catch-all owner who receives it, or any address the alias it names
        forwards to, followed through further aliases and catch-all owners (an alias may
        forward to another domain's alias: ``StackConfig.forwards``). A visited set ends
        a loop of aliases."""
        if to is None:
            return True
        seen: set[str] = set()
        todo = [rcpt]
        while todo:
            address = todo.pop()
            key = address_key(address)
            if key in seen:
                continue
            seen.add(key)
            if key == to:
                return True
            owner = catch_all_owner(self.config, address)
            if owner is not None:
                todo.append(owner)
            forward = self._router.forward(address)
            if forward is not None:
                todo.extend(forward.to)
        return False


def _nothing() -> None:
    """What check() runs on the loop to know it has finished the step it was running."""


def _raise_first(errors: list[BaseException], note: str) -> None:
    """Raise the first of ``errors`` (if any), with ``note`` and the others named in its
    notes (PEP 678)."""
    __tracebackhide__ = True
    if not errors:
        return
    first = errors[0]
    if note:
        first.add_note(note)
    for other in errors[1:]:
        first.add_note(f"also recorded: {other!r}")
    raise first


class DeliveredMessage(ReceivedMessage):
    """A message as the stack stored it: parsed, plus where and when it was stored.

    Made from the store's record alone (``raw`` None), it reads the header block without
    joining a message the MX keeps in two parts (``StoredMessage.parts``), and ``raw`` on
    first use: waiting for a big message by its headers leaves it uncopied.

    What the stack wrote is told apart from what the sender wrote: :attr:`stack_headers`
    are the fields the stack put on top when it stored the copy, and :attr:`auth` reads
    only an Authentication-Results field among them.

    Attributes:
        stored: the store's record (user, mailbox, uid, flags, internal date, envelope).
    """

    __slots__ = ("_raw", "_stack_headers", "stored")

    def __init__(self, raw: bytes | None, stored: StoredMessage) -> None:
        self.stored = stored
        self._raw: bytes | None = None
        self._stack_headers: Headers | None = None
        if raw is not None:
            super().__init__(raw)
            return
        head, rest = stored.parts()
        if not head:
            self._raw = rest  # the whole message (a Maildir record reads its file once)
        self._read_header(header_block(head, rest))

    @property
    def raw(self) -> bytes:
        raw = self._raw
        if raw is None:
            raw = self._raw = self.stored.raw
        return raw

    @raw.setter
    def raw(self, value: bytes) -> None:
        self._raw = value

    @property
    def size(self) -> int:
        raw = self._raw
        return self.stored.size if raw is None else len(raw)

    @property
    def envelope_from(self) -> str:
        return self.stored.envelope_from

    @property
    def envelope_to(self) -> tuple[str, ...]:
        return self.stored.envelope_to

    @property
    def captured(self) -> bool:
        """True for a copy in the outbound capture (mail for a domain outside the stack)."""
        return self.stored.user == OUTBOUND_ADDRESS

    @property
    def delivered(self) -> bool:
        """True for a copy the stack delivered to a recipient (it has an envelope
        recipient), False for one a client only APPENDed over IMAP (a draft, a copy of its
        own sent mail), which no server of the stack received."""
        return bool(self.stored.envelope_to)

    @property
    def stack_headers(self) -> Headers:
        """The header fields the stack put on top of this copy when it stored it.

        Every hop prepends its fields (RFC 5321 section 4.4, RFC 8601 section 5), so they
        are the fields above the topmost ``Received`` field, that field included: the
        receiving MX's content-filter fields (``X-Spam-*``), its Authentication-Results
        and its Received; on mail submission stored for its own domain, its DKIM
        signatures and its Received. A delivery without a Received field was written by
        the stack whole (a bounce, RFC 3464): all its fields. A copy a client APPENDed
        (not :attr:`delivered`): none.
        """
        found = self._stack_headers
        if found is None:
            items = self.headers.items() if self.delivered else []
            for index, (name, _) in enumerate(items):
                if name.lower() == "received":
                    items = items[: index + 1]
                    break
            found = self._stack_headers = Headers(items)
        return found

    @property
    def auth(self) -> AuthResults:
        """The Authentication-Results field the stack's receiving MX added, parsed; empty
        (``authserv_id`` ``""``) when no MX of the stack checked this copy.

        Only a field among :attr:`stack_headers` whose authserv-id is the host named in
        their Received field counts (the topmost such, RFC 8601 section 5): one the sender
        wrote lies below, and every server of the stack drops a field in its name that
        arrives with a message (``roundtrip/protocols/smtp.py``,
        ``drop_forged_auth_results``). Mail submission stores for its own domain passes no
        MX, so it has none; :meth:`ReceivedMessage.auth` semantics (the topmost field,
        whoever wrote it) are ``ReceivedMessage(msg.raw).auth``.
        """
        added = self.stack_headers
        received = added.get_all("Received")
        if not received:
            return AuthResults()
        host = (parse_received(received[-1]).by or "").rstrip(".").lower()
        for value in added.get_all("Authentication-Results"):
            parsed = parse_auth_results(value)
            if host and parsed.authserv_id.rstrip(".").lower() == host:
                return parsed
        return AuthResults()

    @classmethod
    def of(cls, stored: StoredMessage) -> DeliveredMessage:
        """``stored`` parsed once: the same object for every reader of the record
        (``MailStack.messages``, ``wait_for``, the web view), kept in its per-message cache."""
        parsed = stored.cache.get("received")
        if not isinstance(parsed, DeliveredMessage):
            parsed = stored.cache["received"] = cls(None, stored)
        return parsed


def _not_delivered_text(
    stack: MailStack,
    *,
    to: str | None,
    subject: str | None,
    sender: str | None,
    mailbox: str,
    waited: float,
    custom: bool,
) -> str:
    wanted = [f"to {to}" if to else "to any user", f"in {mailbox}"]
    if to is not None and stack._is_outside(to):
        wanted = [f"to {to}", "(an outside domain: looked in the outbound capture)"]
    if subject is not None:
        wanted.append(f"with subject {subject!r}")
    if sender is not None:
        wanted.append(f"from {sender}")
    if custom:
        wanted.append("matching the given predicate")
    arrived = stack.messages()
    lines = [f"no message {' '.join(wanted)} arrived within {waited:g} s."]
    if not arrived:
        lines.append("No message arrived in any mailbox.")
    else:
        lines.append(f"What did arrive ({len(arrived)}):")
        for msg in arrived[-20:]:
            lines.append(f"  - {_arrival_line(msg)}")
    outbound = stack.outbound
    if outbound:
        lines.append(f"Captured for outside domains ({len(outbound)}):")
        for msg in outbound[-5:]:
            lines.append(f"  - {_arrival_line(msg)}")
    return "\n".join(lines)


def _arrival_line(msg: DeliveredMessage) -> str:
    stored = msg.stored
    where = f"{stored.user} {stored.mailbox}: "
    stamp = time.strftime("%H:%M:%S", time.localtime(stored.internal_date))
    return f"{where}from {msg.from_ or '?'} subject {msg.subject!r} at {stamp}"


def _queued_text(queued: list[QueuedMessage], to: str | None) -> list[str]:
    """Failure lines for messages the relay still holds for a matching recipient."""
    if not queued:
        return []
    whom = f"for {to}" if to is not None else "for a recipient"
    lines = [f"Still in the relay queue {whom} ({len(queued)}), so it may yet be delivered:"]
    now = time.time()  # the relay's clock (roundtrip/servers/relay.py)
    for entry in queued[-MAX_SHOWN:]:
        if entry.next_attempt is None:
            when = "an attempt is under way"
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(entry.next_attempt))
            when = f"next attempt in {max(0.0, entry.next_attempt - now):.1f} s (at {stamp})"
        error = f", last error: {entry.last_error}" if entry.last_error else ""
        lines.append(
            f"  - {entry.id} from {entry.mail_from or '<>'} to {', '.join(entry.rcpt)}: "
            f"{_plural_attempts(entry.attempts)}, {when}{error}"
        )
    return lines


def _plural_attempts(n: int) -> str:
    return "1 attempt made" if n == 1 else f"{n} attempts made"
