"""SPF evaluation (RFC 7208) as a pure machine: a dict of DNS answers in, a result out."""

from __future__ import annotations

import pytest

from roundtrip.message import parse_auth_results
from roundtrip.protocols.dns import Record, answer, build_zone, default_records
from roundtrip.protocols.spf import (
    DNSAnswer,
    RecordType,
    SPFResult,
    check,
    check_host,
    dns_answer,
    dns_query,
    resinfo,
)

IP = "192.0.2.10"


class FakeDNS:
    """Answers from a dict; ``"error"`` for a name means SERVFAIL; records asked are kept."""

    def __init__(self, records: dict[tuple[str, str], list[str] | str]) -> None:
        self.records = records
        self.asked: list[tuple[str, str]] = []

    def __call__(self, name: str, rtype: RecordType) -> DNSAnswer:
        self.asked.append((name, rtype))
        found = self.records.get((name.lower(), rtype))
        if found == "error":
            return DNSAnswer("error")
        if not found:
            return DNSAnswer("missing")
        return DNSAnswer("found", tuple(found))


def spf(txt: str | list[str], more: dict[str, list[str] | str] | None = None) -> FakeDNS:
    """example.org's TXT records, plus ``{"name TYPE": records}``."""
    records: dict[tuple[str, str], list[str] | str] = {
        ("example.org", "TXT"): [txt] if isinstance(txt, str) else txt
    }
    for key, value in (more or {}).items():
        name, rtype = key.split()
        records[(name, rtype)] = value
    return FakeDNS(records)


def result(dns: FakeDNS, ip: str = IP, sender: str = "alice@example.org") -> SPFResult:
    return check_host(ip, "example.org", sender, dns, helo="mta.example.net")


# Results and their twins


def test_spf_ip4_pass_and_fail_twin() -> None:
    assert result(spf("v=spf1 ip4:192.0.2.0/24 -all")).result == "pass"
    failed = result(spf("v=spf1 ip4:198.51.100.0/24 -all"))
    assert failed.result == "fail"
    assert "all" in failed.reason


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=spf1 -all", "fail"),
        ("v=spf1 ~all", "softfail"),
        ("v=spf1 ?all", "neutral"),
        ("v=spf1 +all", "pass"),
        ("v=spf1 all", "pass"),
        ("v=spf1", "neutral"),  # section 4.7: nothing matched, no redirect
        ("v=spf1 ip4:198.51.100.1", "neutral"),
        ("V=SPF1 IP4:192.0.2.10 -ALL", "pass"),  # case-insensitive
    ],
)
def test_spf_qualifiers(record: str, expected: str) -> None:
    assert result(spf(record)).result == expected


def test_spf_none_without_record_and_for_a_non_spf_txt() -> None:
    assert result(FakeDNS({})).result == "none"
    assert result(spf("google-site-verification=abc")).result == "none"
    assert result(spf("v=spf10 -all")).result == "none"  # not "v=spf1" then a space


def test_spf_none_for_a_domain_spf_cannot_apply_to() -> None:
    assert check_host(IP, "localhost", "a@localhost", FakeDNS({})).result == "none"
    assert check_host(IP, "a..b", "a@a..b", FakeDNS({})).result == "none"


def test_spf_two_records_are_a_permerror() -> None:
    out = result(spf(["v=spf1 -all", "v=spf1 +all"]))
    assert (out.result, out.reason) == ("permerror", "2 SPF records for example.org")


def test_spf_dns_failure_is_a_temperror_never_a_pass() -> None:
    assert result(FakeDNS({("example.org", "TXT"): "error"})).result == "temperror"
    inner = spf("v=spf1 include:other.example -all", {"other.example TXT": "error"})
    assert result(inner).result == "temperror"
    a_fails = spf("v=spf1 a:host.example.org -all", {"host.example.org A": "error"})
    assert result(a_fails).result == "temperror"


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ip4:192.0.2.10 foo -all",  # unknown mechanism
        "v=spf1 ip4:192.0.2 -all",  # bad address
        "v=spf1 ip4:192.0.2.0/33 -all",  # prefix too long
        "v=spf1 ip4:192.0.2.0/024 -all",  # leading zero
        "v=spf1 ip6:192.0.2.10 -all",  # an IPv4 address in ip6
        "v=spf1 ip4 -all",
        "v=spf1 include -all",
        "v=spf1 include:nodots -all",
        "v=spf1 a:example.org/24/8 -all",
        "v=spf1 -all/8",
        "v=spf1 ptr/24 -all",
        "v=spf1 redirect=a.example redirect=b.example",
        "v=spf1 exp=a.example exp=b.example -all",
        "v=spf1 include:%{z}.example -all",  # unknown macro letter
        "v=spf1 include:%{d.example -all",  # unterminated macro
        "v=spf1 exists:%x.example -all",  # bad escape
        "v=spf1 +-all",
        "v=spf1 ip4:192.0.2.10 \u00e9 -all",  # non-ASCII
    ],
)
def test_spf_syntax_errors_are_permerrors_before_anything_matches(record: str) -> None:
    """Section 4.6: one syntax error anywhere, even after a matching term, is a permerror."""
    out = result(spf(record))
    assert out.result == "permerror", out


def test_spf_unknown_modifiers_are_ignored() -> None:
    assert result(spf("v=spf1 ip4:192.0.2.10 moo=bar -all")).result == "pass"


# Mechanisms that look things up


def test_spf_a_and_mx_with_cidr() -> None:
    dns = spf(
        "v=spf1 a/24 mx:mx.example.org -all",
        {
            "example.org A": ["192.0.2.1"],
            "mx.example.org MX": ["mail.example.org"],
            "mail.example.org A": ["198.51.100.7"],
        },
    )
    assert result(dns).result == "pass"  # 192.0.2.10 in 192.0.2.1/24
    assert result(dns, ip="198.51.100.7").result == "pass"  # the MX host
    assert result(dns, ip="198.51.100.8").result == "fail"


def test_spf_ip6_and_dual_cidr() -> None:
    dns = spf("v=spf1 ip6:2001:db8::/32 a//64 -all", {"example.org AAAA": ["2001:db9:1:2::1"]})
    assert result(dns, ip="2001:db8::5").result == "pass"
    assert result(dns, ip="2001:db9:1:2::ff").result == "pass"
    assert result(dns, ip="2001:db9:1:3::1").result == "fail"
    # An IPv4-mapped IPv6 client is checked as IPv4 (section 5: ip4 mechanisms apply).
    assert result(spf("v=spf1 ip4:192.0.2.10 -all"), ip="::ffff:192.0.2.10").result == "pass"


def test_spf_include_matches_on_pass_only() -> None:
    dns = spf(
        "v=spf1 include:_spf.partner.example include:_spf.other.example -all",
        {
            "_spf.partner.example TXT": ["v=spf1 ip4:198.51.100.0/24 -all"],
            "_spf.other.example TXT": ["v=spf1 ip4:192.0.2.10 -all"],
        },
    )
    assert result(dns).result == "pass"  # the first include failed: no match, go on
    assert result(dns, ip="203.0.113.1").result == "fail"


def test_spf_include_of_a_domain_without_record_is_a_permerror() -> None:
    out = result(spf("v=spf1 include:nothing.example -all"))
    assert out.result == "permerror" and "no SPF record" in out.reason


def test_spf_include_loop_is_a_permerror() -> None:
    dns = spf("v=spf1 include:example.org -all")
    out = result(dns)
    assert out.result == "permerror" and "DNS look-ups" in out.reason
    assert len(dns.asked) <= 12


def test_spf_more_than_ten_lookups_is_a_permerror_and_ten_pass() -> None:
    chain: dict[str, list[str] | str] = {f"h{i}.example.org A": ["203.0.113.1"] for i in range(11)}
    ten = " ".join(f"a:h{i}.example.org" for i in range(9)) + " ip4:192.0.2.10"
    assert result(spf(f"v=spf1 {ten} exists:h9.example.org -all", chain)).result == "pass"
    eleven = " ".join(f"a:h{i}.example.org" for i in range(11))
    out = result(spf(f"v=spf1 {eleven} ip4:192.0.2.10 -all", chain))
    assert out.result == "permerror" and "more than 10 DNS look-ups" in out.reason


def test_spf_ip4_terms_do_not_count_as_lookups() -> None:
    many = " ".join(f"ip4:198.51.100.{i}" for i in range(30))
    assert result(spf(f"v=spf1 {many} ip4:192.0.2.10 -all")).result == "pass"


def test_spf_more_than_two_void_lookups_is_a_permerror() -> None:
    two = "v=spf1 a:v1.example.org a:v2.example.org ip4:192.0.2.10 -all"
    assert result(spf(two)).result == "pass"
    three = "v=spf1 a:v1.example.org a:v2.example.org a:v3.example.org ip4:192.0.2.10 -all"
    out = result(spf(three))
    assert out.result == "permerror" and "void" in out.reason


def test_spf_mx_with_more_than_ten_hosts_is_a_permerror() -> None:
    hosts = [f"mx{i}.example.org" for i in range(11)]
    addresses: dict[str, list[str] | str] = {f"{h} A": ["203.0.113.1"] for h in hosts}
    out = result(spf("v=spf1 mx -all", {"example.org MX": hosts, **addresses}))
    assert out.result == "permerror" and "MX hosts" in out.reason
    ten = result(spf("v=spf1 mx -all", {"example.org MX": hosts[:10], **addresses}))
    assert ten.result == "fail"


def test_spf_redirect_and_its_twins() -> None:
    dns = spf(
        "v=spf1 redirect=_spf.example.org",
        {"_spf.example.org TXT": ["v=spf1 ip4:192.0.2.10 -all"]},
    )
    assert result(dns).result == "pass"
    assert result(dns, ip="203.0.113.9").result == "fail"
    # Section 6.1: a redirect is ignored when the record has an all mechanism.
    ignored = spf(
        "v=spf1 ?all redirect=_spf.example.org",
        {"_spf.example.org TXT": ["v=spf1 ip4:192.0.2.10 -all"]},
    )
    assert result(ignored).result == "neutral"
    nowhere = result(spf("v=spf1 redirect=nothing.example"))
    assert nowhere.result == "permerror" and "no SPF record" in nowhere.reason
    looping = result(spf("v=spf1 redirect=example.org"))
    assert looping.result == "permerror"


def test_spf_ptr_never_matches_but_counts() -> None:
    """Section 5.5: ptr SHOULD NOT be used; here it never matches (no reverse zones)."""
    assert result(spf("v=spf1 ptr -all")).result == "fail"
    assert result(spf("v=spf1 ptr:example.org ?all")).result == "neutral"


# Macros (section 7)


def test_spf_macros_expand_sender_ip_and_domain() -> None:
    dns = spf(
        "v=spf1 exists:%{l}.%{o}._u.%{d2} exists:%{ir}.%{v}._ip.%{d} -all",
        {"10.2.0.192.in-addr._ip.example.org A": ["127.0.0.2"]},
    )
    assert result(dns, sender="bob@example.org").result == "pass"
    assert ("bob.example.org._u.example.org", "A") in dns.asked
    assert ("10.2.0.192.in-addr._ip.example.org", "A") in dns.asked
    assert result(dns, ip="192.0.2.11").result == "fail"


def test_spf_macros_helo_delimiters_and_escapes() -> None:
    dns = spf("v=spf1 exists:%{h}.%{l-}.x%%%_%-.example.org exists:%{i}.%{s}.example.org -all")
    check_host("2001:db8::1", "example.org", "first-last@example.org", dns, helo="mta.example.net")
    names = [name for name, _ in dns.asked]
    assert "mta.example.net.first.last.x% %20.example.org" in names  # %% %_ %-
    nibbles = "2.0.0.1.0.d.b.8" + ".0" * 23 + ".1"
    assert f"{nibbles}.first-last@example.org.example.org" in names


def test_spf_macro_c_outside_exp_is_a_permerror() -> None:
    assert result(spf("v=spf1 exists:%{c}.example.org -all")).result == "permerror"


def test_spf_long_expansion_is_cut_to_253_octets() -> None:
    dns = spf("v=spf1 exists:%{s}.%{s}.%{s}.%{s}.example.org -all")
    result(dns, sender="a" * 60 + "@" + "b" * 60 + ".example.org")
    name = dns.asked[-1][0]
    assert len(name) <= 253 and name.endswith(".example.org")


# Which identity an MX checks (section 2.4)


def test_spf_check_uses_mail_from_then_helo() -> None:
    dns = FakeDNS(
        {
            ("example.org", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"],
            ("mta.example.net", "TXT"): ["v=spf1 -all"],
        }
    )
    assert check(IP, "alice@example.org", "mta.example.net", dns) == SPFResult(
        "pass", "", "example.org", "mailfrom"
    )
    bounce = check(IP, "<>", "mta.example.net", dns)
    assert (bounce.result, bounce.domain, bounce.scope) == ("fail", "mta.example.net", "helo")
    assert check(IP, "", "[192.0.2.10]", dns).result == "none"
    assert check(IP, "example.org", "x", dns).result == "pass"  # a bare domain


def test_spf_bad_client_address_is_none() -> None:
    assert check("not-an-ip", "a@example.org", "h", spf("v=spf1 +all")).result == "none"


# DNS wire helpers, against the stack's own zone code


def test_spf_dns_helpers_read_the_zone_answers() -> None:
    extra = [Record("example.org", "TXT", "other text"), Record("example.org", "AAAA", "::1")]
    zone = build_zone([*default_records("example.org", "127.0.0.1"), *extra])

    def ask(name: str, rtype: RecordType) -> DNSAnswer:
        return dns_answer(answer(zone, dns_query(name, rtype)), rtype)

    txt = ask("example.org", "TXT")
    assert txt.status == "found"
    assert sorted(txt.records) == ["other text", "v=spf1 ip4:127.0.0.1 -all"]
    assert ask("example.org", "MX") == DNSAnswer("found", ("mail.example.org",))
    assert ask("mail.example.org", "A") == DNSAnswer("found", ("127.0.0.1",))
    assert ask("mail.example.org", "AAAA").status == "missing"  # no data
    assert ask("nowhere.example.org", "TXT").status == "missing"  # NXDOMAIN
    assert check("127.0.0.1", "user@example.org", "h", ask).result == "pass"
    assert check("127.0.0.2", "user@example.org", "h", ask).result == "fail"
    assert dns_answer(b"", "TXT").status == "error"
    assert dns_answer(b"\x00\x01garbage", "TXT").status == "error"
    with pytest.raises(ValueError, match="not a DNS name"):
        dns_query("a" * 64 + ".example.org", "TXT")


def test_spf_resinfo_is_parsable_authentication_results() -> None:
    field = "mx.example.org; " + resinfo(SPFResult("fail", 'odd "reason"; x', "example.org"))
    parsed = parse_auth_results(field)
    assert parsed.error is None
    (spf_result,) = parsed.of("spf")
    assert spf_result.result == "fail"
    assert spf_result.reason == "odd 'reason'; x"
    assert spf_result.properties["smtp.mailfrom"] == "example.org"
    helo = parse_auth_results("mx; " + resinfo(SPFResult("none", "", "h.example", "helo")))
    assert helo.of("spf")[0].properties["smtp.helo"] == "h.example"
