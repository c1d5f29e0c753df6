"""The relay's MX lookup: ask the stack's DNS server, never the system resolver.

dnspython's async resolver with ``configure=False`` (no ``/etc/resolv.conf``), no cache (the
zones change between tests) and one lifetime for a whole resolution. What the answers mean (MX
order, null and implicit MX, which failures bounce and which defer) is decided by
``protocols/delivery.py``; this module only asks the questions. Exceptions are translated by
``servers/_relayerrors.py``.
"""

from __future__ import annotations

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
    """

    def __init__(self, *, dns_address: tuple[str, int], timeout: float) -> None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns_address[0]]
        resolver.port = dns_address[1]
        resolver.cache = None
        resolver.lifetime = timeout
        resolver.timeout = timeout
        self._resolver = resolver

    async def route(self, domain: str) -> Route | Permanent | Temporary:
        """MX hosts in preference order, each with its addresses; or why there is no route."""
        try:
            with translated():
                answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except StepError as exc:
            if exc.nxdomain:
                return delivery.no_such_domain(domain)
            return delivery.lookup_failed(domain, str(exc))
        records = None
        if answer.rrset is not None:
            records = [(r.preference, r.exchange.to_text()) for r in answer.rrset]
        hosts = delivery.order_mx(domain, records)
        if isinstance(hosts, Permanent):
            return hosts
        addresses: dict[str, list[str]] = {}
        failures: list[str] = []
        for host in hosts:
            addresses[host] = await self._addresses(host, failures)
        return delivery.conclude_route(domain, hosts, addresses, failures, implicit=records is None)

    async def _addresses(self, host: str, failures: list[str]) -> list[str]:
        """The A and AAAA addresses of ``host``; a lookup that failed goes to ``failures``."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                with translated():
                    answer = await self._resolver.resolve(host, rdtype, raise_on_no_answer=False)
            except StepError as exc:
                if exc.nxdomain:
                    break  # no such host: its other family cannot exist either
                failures.append(f"{rdtype} lookup for {host} failed: {exc}")
                continue
            if answer.rrset is not None:
                found.extend(r.address for r in answer.rrset)
        return found
