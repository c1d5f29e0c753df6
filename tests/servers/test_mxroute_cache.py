"""The relay's MX routes are kept for their TTL, and never past a change of the zone."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from roundtrip import MailStack
from roundtrip.protocols.dns import Record, build_zone, default_records
from roundtrip.servers._mxroute import Router
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.dns import DNSServer, start_dns

TIMEOUT = 10.0
# The zone's SOA and NS, from the stack's own defaults.
SOA = [r for r in default_records("example.org", "127.0.0.1") if r.rtype in ("SOA", "NS")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DNSWorld:
    def __init__(self) -> None:
        self.lt = LoopThread()
        self.zone = build_zone(self.records(ttl=60))
        self.dns: DNSServer = self.lt.run(
            start_dns(self.zone, host="127.0.0.1", on_error=self.lt.record_error), TIMEOUT
        )
        self.clock = Clock()
        self.router = Router(
            dns_address=(self.dns.host, self.dns.port),
            timeout=5.0,
            zone_version=lambda: self.zone,
            clock=self.clock,
        )

    @staticmethod
    def records(*, ttl: int, mx: str = "mail.example.org") -> list[Record]:
        return [
            *SOA,
            Record("example.org", "MX", f"10 {mx}.", ttl=ttl),
            Record("mail.example.org", "A", "127.0.0.1", ttl=ttl),
            Record("other.example.org", "A", "127.0.0.2", ttl=ttl),
        ]

    def serve(self, records: list[Record]) -> None:
        self.zone = build_zone(records)

        async def swap() -> None:
            self.dns.set_zone(self.zone)

        self.lt.run(swap(), TIMEOUT)

    def route(self, domain: str = "example.org") -> object:
        return self.lt.run(self.router.route(domain), TIMEOUT)

    def mx_queries(self) -> int:
        return sum(1 for name, rtype, _ in self.dns.query_log if rtype == "MX")

    def close(self) -> None:
        self.lt.run(self.dns.close(), TIMEOUT)
        self.lt.stop()


@pytest.fixture
def world() -> Iterator[DNSWorld]:
    w = DNSWorld()
    yield w
    w.close()
    assert w.lt.take_errors() == []


def test_a_route_is_asked_once_within_its_ttl(world: DNSWorld) -> None:
    first = world.route()
    world.clock.now += 59
    again = world.route()
    assert first == again == [("mail.example.org", ["127.0.0.1"])]
    assert world.mx_queries() == 1
    # The address lookups of the host: A and AAAA, each asked once.
    rtypes = sorted(rtype for name, rtype, _ in world.dns.query_log if name.startswith("mail."))
    assert rtypes == ["A", "AAAA"]


def test_a_route_is_asked_again_once_its_ttl_has_passed(world: DNSWorld) -> None:
    """The twin: at the TTL the cached route is dropped."""
    world.route()
    world.clock.now += 60
    world.route()
    assert world.mx_queries() == 2


def test_a_changed_zone_is_seen_at_once(world: DNSWorld) -> None:
    assert world.route() == [("mail.example.org", ["127.0.0.1"])]
    world.serve(world.records(ttl=60, mx="other.example.org"))
    assert world.route() == [("other.example.org", ["127.0.0.2"])]
    assert world.mx_queries() == 2


def test_without_a_zone_version_nothing_is_cached(world: DNSWorld) -> None:
    plain = Router(dns_address=(world.dns.host, world.dns.port), timeout=5.0)
    world.lt.run(plain.route("example.org"), TIMEOUT)
    world.lt.run(plain.route("example.org"), TIMEOUT)
    assert world.mx_queries() == 2


def test_a_failed_address_lookup_is_not_cached(world: DNSWorld) -> None:
    """A route built while a lookup failed is not kept: the next message asks again."""
    records = [
        *SOA,
        Record("example.org", "MX", "10 mail.example.org.", ttl=60),
        Record("example.org", "MX", "20 elsewhere.example.", ttl=60),
        Record("mail.example.org", "A", "127.0.0.1", ttl=60),
    ]
    # elsewhere.example is outside the zone and refuse_outside answers REFUSED for it: a
    # temporary failure of that host's lookups.
    world.zone = build_zone(records, refuse_outside=True)

    async def swap() -> None:
        world.dns.set_zone(world.zone)

    world.lt.run(swap(), TIMEOUT)
    assert world.route() == [("mail.example.org", ["127.0.0.1"])]
    world.route()
    assert world.mx_queries() == 2


def _cross_domain(stack: MailStack, subject: str) -> None:
    sender = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(
            sender.address,
            ["user@example.org"],
            f"From: {sender.address}\r\nTo: user@example.org\r\nSubject: {subject}\r\n\r\nhi\r\n",
        )
    stack.wait_for("user@example.org", subject=subject, timeout=TIMEOUT)


def test_stack_relay_asks_dns_once_for_two_messages_and_again_after_set_dns_records() -> None:
    with MailStack() as stack:
        assert stack.dns is not None
        _cross_domain(stack, "one")
        _cross_domain(stack, "two")
        mx = [q for q in stack.dns.query_log if q[:2] == ("example.org.", "MX")]
        assert len(mx) == 1
        # The twin: new records take effect for the very next message.
        stack.set_dns_records(stack.default_dns_records())
        _cross_domain(stack, "three")
        mx = [q for q in stack.dns.query_log if q[:2] == ("example.org.", "MX")]
        assert len(mx) == 2
        # reset() forgets the routes too: the next test finds its lookups in the log.
        stack.reset()
        _cross_domain(stack, "four")
        assert ("example.org.", "MX", "NOERROR") in stack.dns.query_log
