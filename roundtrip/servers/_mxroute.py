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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import dns.asyncresolver

from ..protocols import delivery
from ..protocols.delivery import Permanent, Route, Temporary
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
    """

    def __init__(
        self,
        *,
        dns_address: tuple[str, int],
        timeout: float,
        zone_version: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns_address[0]]
        resolver.port = dns_address[1]
        resolver.cache = None
        resolver.lifetime = timeout
        resolver.timeout = timeout
        self._resolver = resolver
        self._zone_version = zone_version
        self._clock = clock
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
            with translated():
                answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except StepError as exc:
            if exc.nxdomain:
                return delivery.no_such_domain(domain), 0
            return delivery.lookup_failed(domain, str(exc)), 0
        records = None
        ttls: list[float] = []
        if answer.rrset is not None:
            records = [(r.preference, r.exchange.to_text()) for r in answer.rrset]
            ttls.append(answer.rrset.ttl)
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
            with translated():
                answer = await self._resolver.resolve(host, rdtype, raise_on_no_answer=False)
        except StepError as exc:
            return exc
        return answer.rrset


# More distinct domains than any test routes; past it the cache starts again.
_CACHE_SIZE = 4096
