"""The relay's MX lookup: ask the stack's DNS server, never the system resolver.

dnspython's async resolver with ``configure=False`` (no ``/etc/resolv.conf``) and one lifetime
for a whole resolution. What the answers mean (MX order, null and implicit MX, which failures
bounce and which defer) is decided by ``protocols/delivery.py``; this module only asks the
questions. Exceptions are translated by ``servers/_relayerrors.py``.

A route is kept for the smallest TTL of the answers it was built from, as an MTA's resolver
keeps them (Postfix asks the system's caching resolver), but only when the caller can say which
zone is being served (``zone_version``): the stack's zones change between tests, and an answer
from before a change is never used after it. The address lookups of every MX host (A and AAAA)
go out together.

When the DNS server runs in this process (the stack's own), the questions are put to it
directly (``source``, its ``lookup``): the same answers, the same query-log entries and a
transcript entry, without encoding a query, a UDP round through the event loop and decoding
the reply for each of MX, A and AAAA. A failure reads as the resolver's would: NXDOMAIN as
NXDOMAIN, another rcode as a failed server, no answer at all as a time-out
(tests/servers/test_mxroute_memory.py compares both paths).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import dns.rdatatype
import dns.rrset

from ..protocols import delivery
from ..protocols.delivery import Permanent, Route, Temporary
from ..protocols.dns import ZoneAnswer
from ._relayerrors import StepError, translated

__all__ = ["Router"]


class Router:
    """Routes a recipient domain to its MX hosts and their addresses (RFC 5321 §5.1).

    Args:
        dns_address: ``(ip, port)`` of the DNS server to ask for MX and address records.
        timeout: seconds a whole DNS resolution may take.
        zone_version: returns a token that changes whenever the served records change; routes
            are cached for their TTL while it stays the same. None: no cache.
        clock: monotonic seconds, for TTLs.
        source: the DNS server at ``dns_address`` when it runs in this process: asked
            directly (its ``lookup(name, rtype, peer=...)``) rather than over UDP.
    """

    def __init__(
        self,
        *,
        dns_address: tuple[str, int],
        timeout: float,
        zone_version: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        source: Callable[..., ZoneAnswer | None] | None = None,
    ) -> None:
        self._resolver: Any = None
        if source is None:
            import dns.asyncresolver  # here: a router with a source never needs it

            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns_address[0]]
            resolver.port = dns_address[1]
            resolver.cache = None
            resolver.lifetime = timeout
            resolver.timeout = timeout
            self._resolver = resolver
        self._zone_version = zone_version
        self._clock = clock
        self._source = source
        self._server = f"{dns_address[0]}@{dns_address[1]}"
        # domain -> (zone token, expiry, route); only complete answers are kept.
        self._cache: dict[str, tuple[object, float, Route | Permanent]] = {}

    def forget(self) -> None:
        """Drop every cached route."""
        self._cache.clear()

    async def route(self, domain: str) -> Route | Permanent | Temporary:
        """MX hosts in preference order, each with its addresses; or why there is no route."""
        if self._zone_version is None:
            route, _ = await self._lookup(domain)
            return route
        key = domain.lower().rstrip(".")
        token = self._zone_version()  # read before asking: a change meanwhile means a miss
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] is token and hit[1] > now:
            return hit[2]
        route, ttl = await self._lookup(domain)
        if ttl > 0 and not isinstance(route, Temporary):
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()  # a test that routes thousands of domains: start again
            self._cache[key] = (token, now + ttl, route)
        else:
            self._cache.pop(key, None)
        return route

    async def _lookup(self, domain: str) -> tuple[Route | Permanent | Temporary, float]:
        """The route and how long it may be kept (0: not at all)."""
        try:
            rrset = await self._ask(domain, "MX")
        except StepError as exc:
            if exc.nxdomain:
                return delivery.no_such_domain(domain), 0
            return delivery.lookup_failed(domain, str(exc)), 0
        records = None
        ttls: list[float] = []
        if rrset is not None:
            records = [(r.preference, r.exchange.to_text()) for r in rrset]
            ttls.append(rrset.ttl)
        hosts = delivery.order_mx(domain, records)
        if isinstance(hosts, Permanent):
            return hosts, min(ttls, default=0)
        failures: list[str] = []
        found = await asyncio.gather(*(self._addresses(host, failures, ttls) for host in hosts))
        addresses = dict(zip(hosts, found, strict=True))
        route = delivery.conclude_route(
            domain, hosts, addresses, sorted(failures), implicit=records is None
        )
        # An implicit MX (no MX record) is kept for its address records' TTL alone.
        return route, (0 if failures or not ttls else min(ttls))

    async def _addresses(self, host: str, failures: list[str], ttls: list[float]) -> list[str]:
        """The A and AAAA addresses of ``host`` (asked together); failures go to ``failures``."""
        answers = await asyncio.gather(
            self._resolve_address(host, "A"), self._resolve_address(host, "AAAA")
        )
        found: list[str] = []
        for rdtype, answer in zip(("A", "AAAA"), answers, strict=True):
            if isinstance(answer, StepError):
                if answer.nxdomain:
                    return found  # no such host: its other family cannot exist either
                failures.append(f"{rdtype} lookup for {host} failed: {answer}")
            elif answer is not None:
                found.extend(r.address for r in answer)
                ttls.append(answer.ttl)
        return found

    async def _resolve_address(self, host: str, rdtype: str) -> Any:
        """The rrset for ``rdtype`` (None: no such records), or the StepError it failed with."""
        try:
            return await self._ask(host, rdtype)
        except StepError as exc:
            return exc

    async def _ask(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        """The answer's RRset of ``rdtype`` for ``name`` (None: no such records).

        Raises:
            StepError: the name does not exist (``nxdomain``), or the look-up failed.
        """
        if self._source is not None:
            return self._ask_source(name, rdtype)
        with translated():
            answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        rrset: dns.rrset.RRset | None = answer.rrset
        return rrset

    def _ask_source(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        """:meth:`_ask` of the server in this process, failing as the resolver fails."""
        assert self._source is not None
        try:
            found = self._source(name, rdtype, peer="relay")
        except ValueError as exc:  # no query can carry the name (dnspython: a DNSException)
            raise StepError(f"{name}: {exc}") from exc
        if found is None:  # the server would send nothing: the resolver times out
            raise StepError(
                f"The DNS operation timed out: server {self._server} sent no answer "
                f"to {name} {rdtype}"
            )
        if found.rcode == "NXDOMAIN":
            raise StepError(f"The DNS query name does not exist: {found.qname}", nxdomain=True)
        if found.rcode != "NOERROR":
            raise StepError(
                f"All nameservers failed to answer the query {found.qname} IN {found.qtype}: "
                f"Server {self._server} answered {found.rcode}"
            )
        wanted = dns.rdatatype.from_text(rdtype)
        # The answer section is the CNAME chain (if any), then the RRset asked for.
        for rrset in reversed(found.answer):
            if rrset.rdtype == wanted:
                return rrset
        return None


# More distinct domains than any test routes; past it the cache starts again.
_CACHE_SIZE = 4096
