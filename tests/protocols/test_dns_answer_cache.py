"""``AnswerCache``: the DNS server's in-memory answers, kept per zone (issue #17).

Every message the stack's MX takes from another domain asks the same few names (SPF, DMARC,
two DKIM keys) and the relay asks MX, A and AAAA: about 85 us each to build. The cache keeps
them while the same (immutable) zone is served. These tests hold it to what an uncached
look-up gives: the same answer for every question of a varied zone, the new zone's records as
soon as it is served, record order still shuffled per look-up, and no keeping of answers that
went through wire format. Twins show that the comparison sees a stale or unshuffled answer.
"""

from __future__ import annotations

import dns.name
import pytest

from roundtrip.protocols.dns import (
    AnswerCache,
    Record,
    Zone,
    ZoneAnswer,
    build_zone,
    default_records,
    lookup,
    query_name,
)
from roundtrip.servers.dns import DNSServer

TYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "SOA")


def _zone(mx_host: str = "mail.example.org.", *, refuse_outside: bool = False) -> Zone:
    records = [
        *default_records("example.com", "127.0.0.1"),
        *[r for r in default_records("example.org", "127.0.0.2") if r.rtype != "MX"],
        Record("example.org", "MX", f"20 {mx_host}"),
        Record("example.com", "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
        Record("_dmarc.example.com", "TXT", "v=DMARC1; p=reject"),
        Record("alias.example.com", "CNAME", "example.org."),
        Record("big.example.com", "TXT", "x" * 400),
        *[Record("many.example.com", "A", f"127.0.1.{i}") for i in range(1, 9)],
    ]
    return build_zone(records, refuse_outside=refuse_outside)


NAMES = (
    "example.com",
    "example.org",
    "EXAMPLE.org",
    "_dmarc.example.com",
    "alias.example.com",
    "big.example.com",
    "many.example.com",
    "mail.example.org",
    "nope.example.com",
    "outside.invalid",
)


def _comparable(found: ZoneAnswer) -> tuple[object, ...]:
    """An answer with the records of each RRset in a fixed order (their order is random)."""
    rrsets = tuple(
        (rrset.name.to_text(), rrset.rdtype, rrset.ttl, tuple(sorted(r.to_text() for r in rrset)))
        for rrset in found.answer
    )
    return (found.qname, found.qtype, found.rcode, found.truncated, rrsets)


@pytest.mark.parametrize("refuse_outside", [False, True])
@pytest.mark.parametrize("max_size", [512, 65535])
def test_cached_answers_equal_fresh_lookups(refuse_outside: bool, max_size: int) -> None:
    zone = _zone(refuse_outside=refuse_outside)
    cache = AnswerCache()
    for _ in range(3):  # the first round fills the cache, the others are served from it
        for name in NAMES:
            for rtype in TYPES:
                qname = query_name(name)
                fresh = lookup(zone, qname, rtype, max_size=max_size)
                kept = cache.lookup(zone, qname, rtype, max_size=max_size)
                assert _comparable(kept) == _comparable(fresh), (name, rtype)


def test_a_kept_answer_is_reused_and_a_new_zone_answers_at_once() -> None:
    cache = AnswerCache()
    first, second = _zone("mail.example.org."), _zone("mx2.example.org.")
    name = query_name("example.org")
    kept = cache.lookup(first, name, "MX")
    assert cache.lookup(first, name, "MX") is kept  # served from the cache
    assert [r.to_text() for r in kept.rdatas("MX")] == ["20 mail.example.org."]
    changed = cache.lookup(second, name, "MX")
    assert [r.to_text() for r in changed.rdatas("MX")] == ["20 mx2.example.org."]
    # Back to the first zone object: its answer is built anew and right again.
    assert [r.to_text() for r in cache.lookup(first, name, "MX").rdatas("MX")] == [
        "20 mail.example.org."
    ]


def test_the_comparison_sees_a_stale_answer() -> None:
    """The twin: an answer kept from the old zone differs from the new zone's."""
    name = query_name("example.org")
    stale = lookup(_zone("mail.example.org."), name, "MX")
    assert _comparable(stale) != _comparable(lookup(_zone("mx2.example.org."), name, "MX"))


def test_records_are_shuffled_on_every_cached_lookup() -> None:
    zone, cache = _zone(), AnswerCache()
    name = query_name("many.example.com")
    orders = set()
    for _ in range(40):
        found = cache.lookup(zone, name, "A")
        addresses = tuple(r.to_text() for r in found.rdatas("A"))
        assert sorted(addresses) == [f"127.0.1.{i}" for i in range(1, 9)]
        orders.add(addresses)
    # Eight records: 40 draws of one order each would all agree with chance 8!**-39.
    assert len(orders) > 1


def test_the_order_check_sees_an_unshuffled_answer() -> None:
    """The twin: the same answer object returned every time gives a single order."""
    kept = lookup(_zone(), query_name("many.example.com"), "A")
    orders = {tuple(r.to_text() for r in kept.rdatas("A")) for _ in range(40)}
    assert len(orders) == 1


@pytest.mark.parametrize(
    ("name", "rtype", "max_size"),
    [
        ("EXAMPLE.org", "MX", 65535),  # a capital letter: read back through wire format
        ("big.example.com", "TXT", 100),  # cut to fit: TC set
    ],
)
def test_answers_through_wire_format_are_not_kept(name: str, rtype: str, max_size: int) -> None:
    zone, cache = _zone(), AnswerCache()
    qname = query_name(name)
    first = cache.lookup(zone, qname, rtype, max_size=max_size)
    again = cache.lookup(zone, qname, rtype, max_size=max_size)
    assert again is not first
    assert _comparable(again) == _comparable(lookup(zone, qname, rtype, max_size=max_size))


def test_case_of_the_question_is_part_of_the_key() -> None:
    zone, cache = _zone(), AnswerCache()
    lower = cache.lookup(zone, query_name("example.org"), "MX")
    upper = cache.lookup(zone, query_name("EXAMPLE.ORG"), "MX")
    assert lower.qname == "example.org." and upper.qname == "EXAMPLE.ORG."
    assert upper.answer[0].name.to_text() == "EXAMPLE.ORG."  # as a parsed reply shows it


def test_a_full_cache_starts_again_and_stays_right() -> None:
    zone, cache = _zone(), AnswerCache(limit=2)
    for _ in range(3):
        for name in ("example.com", "example.org", "mail.example.org", "_dmarc.example.com"):
            qname = query_name(name)
            assert _comparable(cache.lookup(zone, qname, "A")) == _comparable(
                lookup(zone, qname, "A")
            )


def test_server_lookups_are_logged_each_time_and_follow_new_records() -> None:
    errors: list[BaseException] = []
    server = DNSServer(_zone, host="127.0.0.1", on_error=errors.append, tcp_idle_timeout=1.0)
    server.set_zone(_zone("mail.example.org."))
    for _ in range(3):
        found = server.lookup("example.org", "MX")
        assert found is not None and found.rdatas("MX")[0].to_text() == "20 mail.example.org."
    assert server.query_log == [("example.org.", "MX", "NOERROR")] * 3
    server.set_records([*default_records("example.org", "127.0.0.2")])
    found = server.lookup("example.org", "MX")
    assert found is not None and found.rdatas("MX")[0].to_text() == "10 mail.example.org."
    assert errors == []


def test_query_names_are_absolute_and_refused_when_no_query_carries_them() -> None:
    assert query_name("example.org") == dns.name.from_text("example.org.")
    with pytest.raises(ValueError):
        query_name("a..example.org")
    with pytest.raises(ValueError):  # asked again: refused again, not served from a cache
        query_name("a..example.org")
