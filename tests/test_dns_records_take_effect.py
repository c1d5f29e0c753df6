"""``set_dns_records`` and ``reset()`` change what the DNS server answers before they return.

Scheduling the change on the loop thread without waiting let a query sent right after it be
answered from the old zone (on uvloop, callbacks from other threads run after the I/O that is
already waiting): a test that published a record and asked for it at once got the old one.
"""

from __future__ import annotations

from collections.abc import Iterator

import dns.resolver
import pytest

from roundtrip import MailStack
from roundtrip.protocols.dns import Record

ROUNDS = 300


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _resolver(stack: MailStack) -> dns.resolver.Resolver:
    assert stack.dns is not None
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [stack.dns.host]
    resolver.port = stack.dns.port
    resolver.lifetime = 5.0
    return resolver


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    try:
        answer = resolver.resolve(name, "TXT", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    return sorted(b"".join(r.strings).decode() for r in answer.rrset or ())


def test_set_dns_records_is_answered_by_the_next_query(stack: MailStack) -> None:
    resolver = _resolver(stack)
    defaults = stack.default_dns_records()
    for n in range(ROUNDS):
        stack.set_dns_records([*defaults, Record("probe.example.com", "TXT", f"round {n}")])
        assert _txt(resolver, "probe.example.com") == [f"round {n}"], f"stale at round {n}"


def test_reset_restores_the_default_records_before_it_returns(stack: MailStack) -> None:
    """The twin: reset() drops the record, and the very next query no longer finds it."""
    resolver = _resolver(stack)
    defaults = stack.default_dns_records()
    for n in range(ROUNDS // 3):
        stack.set_dns_records([*defaults, Record("probe.example.com", "TXT", f"round {n}")])
        stack.reset()
        assert _txt(resolver, "probe.example.com") == [], f"stale at round {n}"
