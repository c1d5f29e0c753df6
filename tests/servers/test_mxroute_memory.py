"""The relay's MX look-ups asked of the DNS server in memory give what asking over UDP gives.

The stack's relay puts its MX, A and AAAA questions to its own DNS server directly
(``Router(source=server.lookup)``, ``servers/_mxroute.py``). Each case below routes one domain
both ways against the same server and zone and compares: the route or the failure, and the
entries the server's query log got. The twins show the comparison can fail: a zone change is
seen by the memory path, and a server with no answer makes both paths defer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from roundtrip.protocols.delivery import Permanent, Temporary
from roundtrip.protocols.dns import Record, Zone, build_zone, default_records
from roundtrip.servers._mxroute import Router
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.dns import DNSServer, start_dns

TIMEOUT = 10.0
SOA = [r for r in default_records("example.org", "127.0.0.1") if r.rtype in ("SOA", "NS")]


def _zone(*records: Record, refuse_outside: bool = False) -> Zone:
    return build_zone([*SOA, *records], refuse_outside=refuse_outside)


# domain -> (zone, what to route); each a case RFC 5321 §5.1 routes differently.
CASES: dict[str, tuple[Zone, str]] = {
    "one MX": (
        _zone(
            Record("example.org", "MX", "10 mail.example.org."),
            Record("mail.example.org", "A", "127.0.0.1"),
        ),
        "example.org",
    ),
    "two MX in order": (
        _zone(
            Record("example.org", "MX", "20 backup.example.org."),
            Record("example.org", "MX", "10 mail.example.org."),
            Record("mail.example.org", "A", "127.0.0.1"),
            Record("backup.example.org", "A", "127.0.0.2"),
        ),
        "example.org",
    ),
    "A and AAAA": (
        _zone(
            Record("example.org", "MX", "10 mail.example.org."),
            Record("mail.example.org", "A", "127.0.0.1"),
            Record("mail.example.org", "AAAA", "::1"),
        ),
        "example.org",
    ),
    "AAAA only": (
        _zone(
            Record("example.org", "MX", "10 mail.example.org."),
            Record("mail.example.org", "AAAA", "::1"),
        ),
        "example.org",
    ),
    "implicit MX": (_zone(Record("example.org", "A", "127.0.0.3")), "example.org"),
    "null MX": (_zone(Record("example.org", "MX", "0 .")), "example.org"),
    "no such domain": (_zone(Record("example.org", "A", "127.0.0.1")), "nowhere.example.org"),
    "MX host missing": (
        _zone(Record("example.org", "MX", "10 gone.example.org.")),
        "example.org",
    ),
    "MX host is a CNAME": (
        _zone(
            Record("example.org", "MX", "10 alias.example.org."),
            Record("alias.example.org", "CNAME", "mail.example.org."),
            Record("mail.example.org", "A", "127.0.0.4"),
        ),
        "example.org",
    ),
    "an MX host outside the zone is refused": (
        _zone(
            Record("example.org", "MX", "10 mail.example.org."),
            Record("example.org", "MX", "20 elsewhere.example."),
            Record("mail.example.org", "A", "127.0.0.1"),
            refuse_outside=True,
        ),
        "example.org",
    ),
    "a domain outside the zone is refused": (
        _zone(Record("example.org", "A", "127.0.0.1"), refuse_outside=True),
        "elsewhere.example",
    ),
    "upper case": (
        _zone(
            Record("example.org", "MX", "10 mail.example.org."),
            Record("mail.example.org", "A", "127.0.0.1"),
        ),
        "EXAMPLE.org",
    ),
}


class Server:
    def __init__(self) -> None:
        self.lt = LoopThread()
        self.dns: DNSServer = self.lt.run(
            start_dns(_zone(), host="127.0.0.1", on_error=self.lt.record_error), TIMEOUT
        )

    def serve(self, zone: Zone) -> None:
        async def swap() -> None:
            self.dns.set_zone(zone)

        self.lt.run(swap(), TIMEOUT)

    def route(self, domain: str, *, memory: bool, timeout: float = 5.0) -> object:
        router = Router(
            dns_address=(self.dns.host, self.dns.port),
            timeout=timeout,
            source=self.dns.lookup if memory else None,
        )
        self.dns.query_log.clear()
        return self.lt.run(router.route(domain), TIMEOUT)

    def log(self) -> list[tuple[str, str, str]]:
        return sorted(self.dns.query_log)

    def close(self) -> None:
        self.lt.run(self.dns.close(), TIMEOUT)
        self.lt.stop()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()
    assert s.lt.take_errors() == []


def _comparable(route: object) -> object:
    """A route with the order that carries no meaning taken out; failures by kind and rcode."""
    if isinstance(route, list):
        return [(host, sorted(addresses)) for host, addresses in route]
    if isinstance(route, Temporary):
        rcodes = re.findall(r"\b(REFUSED|SERVFAIL|NXDOMAIN|timed out)\b", route.reason)
        return ("temporary", sorted(set(rcodes)))
    assert isinstance(route, Permanent)
    return route


@pytest.mark.parametrize("case", list(CASES))
def test_memory_and_udp_routes_are_the_same(server: Server, case: str) -> None:
    zone, domain = CASES[case]
    server.serve(zone)
    over_udp = server.route(domain, memory=False)
    udp_log = server.log()
    in_memory = server.route(domain, memory=True)
    assert _comparable(in_memory) == _comparable(over_udp)
    assert server.log() == udp_log
    assert udp_log  # the server was asked, both ways


def test_memory_routes_follow_a_zone_change(server: Server) -> None:
    """The twin: the memory path reads the zone served now, not a copy."""
    first, _ = CASES["one MX"]
    server.serve(first)
    assert server.route("example.org", memory=True) == [("mail.example.org", ["127.0.0.1"])]
    server.serve(_zone(Record("example.org", "A", "127.0.0.9")))
    assert server.route("example.org", memory=True) == [("example.org", ["127.0.0.9"])]


def test_a_server_with_no_answer_defers_both_ways(server: Server) -> None:
    """A zone provider that fails makes the server send nothing: the UDP path times out, the
    memory path says so at once, and both keep the message queued (never a bounce)."""

    def broken() -> Zone:
        raise RuntimeError("zone provider failed")

    async def swap() -> None:
        server.dns.set_zone(broken)

    server.lt.run(swap(), TIMEOUT)
    over_udp = server.route("example.org", memory=False, timeout=0.3)
    in_memory = server.route("example.org", memory=True)
    assert isinstance(over_udp, Temporary) and isinstance(in_memory, Temporary)
    assert "timed out" in in_memory.reason
    errors = server.lt.take_errors()
    assert errors and all("zone provider failed" in str(e) for e in errors)


def test_a_name_no_query_can_carry_defers(server: Server) -> None:
    """A 64-octet label cannot be asked over UDP either: a temporary failure, logged nowhere."""
    server.serve(CASES["one MX"][0])
    domain = "x" * 64 + ".example.org"
    over_udp = server.route(domain, memory=False)
    in_memory = server.route(domain, memory=True)
    assert isinstance(over_udp, Temporary) and isinstance(in_memory, Temporary)
    assert server.log() == []
