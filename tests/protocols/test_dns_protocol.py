"""Pure tests of protocols.dns: query bytes in, reply bytes out, no sockets."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from roundtrip.errors import ConfigError
from roundtrip.protocols.dns import (
    Record,
    Zone,
    answer,
    build_zone,
    default_records,
    respond,
    udp_max_size,
)


@pytest.fixture
def zone() -> Zone:
    return build_zone(
        [
            *default_records("example.org", "127.0.0.1"),
            Record("example.org", "MX", "20 backup.example.org."),
            Record("backup.example.org", "AAAA", "::1"),
            Record("www.example.org", "CNAME", "mail.example.org."),
            Record("a.b.example.org", "A", "127.0.0.9"),
            *default_records("example.net", "::1"),
        ]
    )


def ask(zone: Zone, name: str, rdtype: str, **kw: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    reply = dns.message.from_wire(answer(zone, query.to_wire()))
    assert reply.id == query.id
    assert reply.flags & dns.flags.QR
    return reply


def test_dns_mx_answer_has_priorities_and_address_additionals(zone: Zone) -> None:
    reply = ask(zone, "example.org", "MX")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert not reply.flags & dns.flags.RA
    (mx,) = reply.answer
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mail.example.org."),
        (20, "backup.example.org."),
    ]
    extras = {(rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype)) for rr in reply.additional}
    assert extras == {("mail.example.org.", "A"), ("backup.example.org.", "AAAA")}


def test_dns_a_and_aaaa_answers(zone: Zone) -> None:
    assert ask(zone, "mail.example.org", "A").answer[0][0].address == "127.0.0.1"
    assert ask(zone, "mail.example.net", "AAAA").answer[0][0].address == "::1"


def test_dns_names_are_case_insensitive(zone: Zone) -> None:
    assert ask(zone, "MAIL.Example.ORG", "A").answer[0][0].address == "127.0.0.1"


def test_dns_txt_spf(zone: Zone) -> None:
    (txt,) = ask(zone, "example.org", "TXT").answer
    assert b"".join(txt[0].strings) == b"v=spf1 ip4:127.0.0.1 -all"
    (txt6,) = ask(zone, "example.net", "TXT").answer
    assert b"".join(txt6[0].strings) == b"v=spf1 ip6:::1 -all"


def test_dns_long_txt_is_split_into_255_octet_strings() -> None:
    text = "x" * 600
    zone = build_zone(
        [*default_records("example.org", "127.0.0.1"), Record("k.example.org", "TXT", text)]
    )
    (txt,) = ask(zone, "k.example.org", "TXT").answer
    assert [len(s) for s in txt[0].strings] == [255, 255, 90]


def test_dns_nxdomain_in_our_zone_carries_soa(zone: Zone) -> None:
    reply = ask(zone, "nobody.example.org", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.AA
    assert not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert reply.authority[0].name.to_text() == "example.org."


def test_dns_noanswer_when_name_exists_without_type(zone: Zone) -> None:
    reply = ask(zone, "mail.example.org", "MX")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA


def test_dns_empty_non_terminal_is_noanswer_not_nxdomain(zone: Zone) -> None:
    reply = ask(zone, "b.example.org", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer


def test_dns_cname_is_followed_inside_our_zones(zone: Zone) -> None:
    reply = ask(zone, "www.example.org", "A")
    types = [dns.rdatatype.to_text(rr.rdtype) for rr in reply.answer]
    assert types == ["CNAME", "A"]


def test_dns_outside_every_zone_is_nxdomain_with_a_root_soa(zone: Zone) -> None:
    # Before: REFUSED, which resolvers and MTAs treat as temporary and retry forever.
    reply = ask(zone, "no-such-domain.invalid", "MX")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.AA
    assert not reply.answer
    [soa] = reply.authority
    assert (soa.name.to_text(), dns.rdatatype.to_text(soa.rdtype)) == (".", "SOA")
    # The negative-caching TTL (RFC 2308 section 5), and the first zone's server named.
    assert soa.ttl == soa[0].minimum == 60
    assert soa[0].mname.to_text() == "ns.example.org."


def test_dns_outside_every_zone_is_refused_when_asked() -> None:
    zone = build_zone(default_records("example.org", "127.0.0.1"), refuse_outside=True)
    reply = ask(zone, "no-such-domain.invalid", "MX")
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.flags & dns.flags.AA
    assert not reply.authority


@pytest.mark.parametrize("name", ["org", "."])
def test_dns_names_above_our_zones_exist_without_data(zone: Zone, name: str) -> None:
    # An NXDOMAIN for org. would deny example.org too (RFC 8020).
    reply = ask(zone, name, "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    [soa] = reply.authority
    assert soa.name.to_text() == "."


def test_dns_root_soa_is_answered(zone: Zone) -> None:
    reply = ask(zone, ".", "SOA")
    assert reply.rcode() == dns.rcode.NOERROR
    [soa] = reply.answer
    assert soa.name.to_text() == "."


def test_dns_negative_answers_carry_the_soa_with_its_minimum_ttl() -> None:
    # RFC 2308 section 3: the SOA's TTL in a negative answer is min(TTL, MINIMUM).
    zone = build_zone(
        [
            Record("example.org", "SOA", "ns.example.org. h.example.org. 1 3600 600 86400 30", 900),
            Record("example.org", "MX", "10 mail.example.org.", 300),
            Record("mail.example.org", "A", "127.0.0.1", 120),
        ]
    )
    assert ask(zone, "nobody.example.org", "A").authority[0].ttl == 30
    assert ask(zone, "mail.example.org", "MX").authority[0].ttl == 30
    # A positive SOA answer keeps the record's own TTL; data keeps theirs.
    assert ask(zone, "example.org", "SOA").answer[0].ttl == 900
    reply = ask(zone, "example.org", "MX")
    assert (reply.answer[0].ttl, reply.additional[0].ttl) == (300, 120)


@pytest.mark.parametrize("rd", [True, False], ids=["rd", "no-rd"])
def test_dns_recursion_desired_is_answered_not_refused(zone: Zone, rd: bool) -> None:
    query = dns.message.make_query("example.org", "MX")
    if not rd:
        query.flags &= ~dns.flags.RD
    reply = dns.message.from_wire(answer(zone, query.to_wire()))
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer
    assert bool(reply.flags & dns.flags.RD) == rd  # copied from the query (RFC 1035 4.1.1)
    assert not reply.flags & dns.flags.RA  # we never recurse


def test_dns_null_mx_is_served() -> None:
    zone = build_zone(
        [
            Record("example.org", "SOA", "ns.example.org. h.example.org. 1 3600 600 86400 60"),
            Record("example.org", "MX", "0 ."),
        ]
    )
    (mx,) = ask(zone, "example.org", "MX").answer
    assert (mx[0].preference, mx[0].exchange.to_text()) == (0, ".")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x12\x34",
        b"\x12\x34\x01\x00" + b"\xff" * 30,
        b"\xab\xcd\x01\x00\x00\x01" + b"\x00" * 6 + b"\x07",
    ],
)
def test_dns_garbage_gets_formerr_with_its_id(zone: Zone, garbage: bytes) -> None:
    reply = respond(zone, garbage)
    assert reply.rcode == "FORMERR"
    qid, flags = struct.unpack("!HH", reply.wire[:4])
    assert qid == struct.unpack("!H", garbage[:2])[0]
    assert flags & 0x8000
    assert flags & 0xF == dns.rcode.FORMERR


def test_dns_too_short_to_answer_gets_nothing(zone: Zone) -> None:
    assert answer(zone, b"\x01") == b""


def test_dns_a_response_sent_to_us_is_not_answered(zone: Zone) -> None:
    query = dns.message.make_query("example.org", "A")
    response = dns.message.make_response(query).to_wire()
    assert respond(zone, response).wire == b""
    assert respond(zone, b"\x12\x34\x80\x00" + b"\xff" * 30).wire == b""


def test_dns_two_questions_are_formerr(zone: Zone) -> None:
    query = dns.message.make_query("example.org", "A")
    query.question.append(dns.message.make_query("example.net", "A").question[0])
    reply = dns.message.from_wire(answer(zone, query.to_wire()))
    assert reply.rcode() == dns.rcode.FORMERR


def test_dns_other_opcode_is_notimp(zone: Zone) -> None:
    query = dns.message.make_query("example.org", "A")
    query.set_opcode(dns.opcode.STATUS)
    reply = dns.message.from_wire(answer(zone, query.to_wire()))
    assert reply.rcode() == dns.rcode.NOTIMP


def test_dns_udp_truncates_with_tc() -> None:
    records = [Record("example.org", "TXT", f"{i:03d}" + "y" * 200) for i in range(10)]
    zone = build_zone([*default_records("example.org", "127.0.0.1"), *records])
    query = dns.message.make_query("example.org", "TXT").to_wire()
    assert udp_max_size(query) == 512
    reply = dns.message.from_wire(answer(zone, query, max_size=udp_max_size(query)))
    assert reply.flags & dns.flags.TC
    assert not reply.answer
    full = dns.message.from_wire(answer(zone, query))
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 11


def test_dns_query_info_is_reported(zone: Zone) -> None:
    query = dns.message.make_query("nobody.example.org", "AAAA").to_wire()
    reply = respond(zone, query)
    assert (reply.qname, reply.qtype, reply.rcode, reply.error) == (
        "nobody.example.org.",
        "AAAA",
        "NXDOMAIN",
        None,
    )


def test_dns_default_records_ipv6_and_custom_mx() -> None:
    records = default_records("example.org", "::1", mx_host="mx.example.org")
    assert Record("mx.example.org", "AAAA", "::1") in records
    assert Record("example.org", "MX", "10 mx.example.org.") in records
    assert not any(r.rtype == "A" for r in records)
    foreign = default_records("example.org", "127.0.0.1", mx_host="mx.elsewhere.test")
    assert not any(r.name == "mx.elsewhere.test" for r in foreign)


def test_dns_build_zone_rejects_bad_records() -> None:
    with pytest.raises(ConfigError, match="SRV"):
        build_zone([Record("example.org", "SRV", "0 0 25 mail.example.org.")])
    with pytest.raises(ConfigError, match="bad DNS record"):
        build_zone(
            [
                *default_records("example.org", "127.0.0.1"),
                Record("x.example.org", "A", "not-an-ip"),
            ]
        )
    with pytest.raises(ConfigError, match="outside every zone"):
        build_zone(
            [
                *default_records("example.org", "127.0.0.1"),
                Record("mail.example.com", "A", "127.0.0.1"),
            ]
        )
