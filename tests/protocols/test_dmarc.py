"""DMARC evaluation (RFC 7489) as a pure machine: From domains, SPF and DKIM results and a
dict of DNS answers in, a result and a disposition out."""

from __future__ import annotations

import time

import pytest

from roundtrip.message import parse_auth_results
from roundtrip.protocols._author import AuthorDomains, read_from_fields
from roundtrip.protocols.dkim import DKIMResult
from roundtrip.protocols.dmarc import (
    DMARCRecord,
    DMARCResult,
    combined_authentication_results,
    evaluate,
    from_domains,
    organizational_domain,
    parse_record,
    resinfo,
)
from roundtrip.protocols.spf import DNSAnswer, RecordType, SPFResult


class FakeDNS:
    def __init__(self, records: dict[str, list[str] | str]) -> None:
        self.records = records
        self.asked: list[str] = []

    def __call__(self, name: str, rtype: RecordType) -> DNSAnswer:
        assert rtype == "TXT"
        self.asked.append(name)
        found = self.records.get(name)
        if found == "error":
            return DNSAnswer("error")
        if not found:
            return DNSAnswer("missing")
        return DNSAnswer("found", tuple(found))


REJECT = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject"]})
SPF_PASS = SPFResult("pass", "", "example.org")
SPF_OTHER = SPFResult("pass", "", "elsewhere.example")


def message(*froms: str) -> bytes:
    head = "".join(f"From: {f}\r\n" for f in froms)
    return f"{head}Subject: s\r\n\r\nbody\r\n".encode()


# Records


def test_dmarc_record_parses_with_defaults() -> None:
    assert parse_record("v=DMARC1; p=reject") == DMARCRecord("reject", "reject")
    assert parse_record("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20;rua=mailto:a@b;") == (
        DMARCRecord("quarantine", "none", "s", "s", 20)
    )
    # Section 6.3: other bad values fall back to their defaults.
    assert parse_record("v=DMARC1; p=none; adkim=x; pct=abc") == DMARCRecord("none", "none")


@pytest.mark.parametrize(
    "text",
    [
        "v=DMARC1",  # no p=
        "v=DMARC1; p=bogus",
        "v=DMARC1; p=reject; sp=bogus",
        "p=reject; v=DMARC1",  # v= must come first
        "v=DMARC2; p=reject",
        "v=DMARC1; p=reject; junk",  # not a tag=value
        "v=DMARC1; p=reject; p=none",
        "",
    ],
)
def test_dmarc_record_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_record(text)


def test_dmarc_organizational_domain_uses_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.org") == "example.org"
    assert organizational_domain("example.org.") == "example.org"
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("MAIL.Example.TEST") == "example.test"
    assert organizational_domain("co.uk") == "co.uk"  # a public suffix is its own


def test_dmarc_from_domains() -> None:
    assert from_domains(message("Alice <alice@Example.ORG>")) == AuthorDomains(("example.org",))
    assert from_domains(message("a@example.org, b@example.net")) == AuthorDomains(
        ("example.org", "example.net")
    )
    assert from_domains(message("a@example.org", "b@example.org")) == AuthorDomains(
        ("example.org",)
    )
    assert from_domains(b"Subject: no from\r\n\r\nbody\r\n") == AuthorDomains((), "no From field")
    assert from_domains(message("undisclosed-recipients:;")).domains == ()  # type: ignore[union-attr]
    assert from_domains(message("no-at-sign")).domains == ()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        "Alice (work) <alice@example.com>",
        "alice@example.com (Alice)",
        '"Doe, John" <john@example.com>',
        "=?utf-8?q?Caf=C3=A9?= <cafe@example.com>",
        "Dr. Alice <alice@example.com>",  # obs-phrase (RFC 5322 section 4.1)
        "<@route.example:alice@example.com>",  # obs-route (section 4.4)
        "alice @ example . com",  # CFWS around the dots (section 4.4)
        '"alice smith"@example.com',
        "alice@example.com,",  # obs-mbox-list: an empty element
        "Alice\r\n (folded) <alice@example.com>",
    ],
)
def test_dmarc_from_well_formed_reads_the_one_domain(value: str) -> None:
    assert read_from_fields([value]) == AuthorDomains(("example.com",))


@pytest.mark.parametrize(
    ("value", "candidates"),
    [
        # email.utils.getaddresses made these example.comx.example.net and nothing.
        ("alice@example.com (,) x.example.net", ("example.com",)),
        ("alice@example.com (,) bob@evil.example", ("example.com", "evil.example")),
        ('"a" <bob@evil.example>, "b\\" <alice@example.com>', ("evil.example", "example.com")),
        ("Alice <alice@example.com", ("example.com",)),
        ("Alice <alice@example.com> <bob@evil.example>", ("example.com", "evil.example")),
        ("alice@example.com.", ("example.com",)),
        ("a..b@example.com", ("example.com",)),
        ("alice@example.com (unclosed", ("example.com",)),
        ("Group: alice@example.com;", ("example.com",)),  # From is a mailbox-list
        ("no-at-sign", ()),
        ("", ()),
    ],
)
def test_dmarc_from_malformed_gives_every_candidate(value: str, candidates: tuple[str]) -> None:
    found = read_from_fields([value])
    assert found.malformed.startswith("malformed From field: ")
    assert found.domains == candidates


def test_dmarc_from_reading_is_linear() -> None:
    """docs/security.md: no backtracking on client input; 100 kB of each shape at once."""
    for shape in ("(", "<", '"', "a@", "a.", "(\\", "a ", ")", "a@b, ", "@ "):
        value = shape * (100_000 // len(shape))
        started = time.perf_counter()
        read_from_fields([value])
        assert time.perf_counter() - started < 1.0, shape


# Results and their twins


def test_dmarc_pass_by_aligned_spf_and_fail_twin() -> None:
    passed = evaluate(["example.org"], SPF_PASS, [], REJECT)
    assert passed == DMARCResult("pass", "", "example.org", "reject", "none")
    failed = evaluate(["example.org"], SPF_OTHER, [], REJECT)
    assert (failed.result, failed.policy, failed.disposition) == ("fail", "reject", "reject")
    assert failed.reason == "no aligned DKIM signature or SPF pass"


def test_dmarc_spf_must_pass_not_just_align() -> None:
    softfail = SPFResult("softfail", "", "example.org")
    assert evaluate(["example.org"], softfail, [], REJECT).result == "fail"
    assert evaluate(["example.org"], None, [], REJECT).result == "fail"


def test_dmarc_pass_by_aligned_dkim_and_fail_twins() -> None:
    assert evaluate(["example.org"], SPF_OTHER, [("pass", "example.org")], REJECT).result == "pass"
    # Signed by another domain, or failed: not aligned.
    assert evaluate(["example.org"], None, [("pass", "example.net")], REJECT).result == "fail"
    assert evaluate(["example.org"], None, [("fail", "example.org")], REJECT).result == "fail"


def test_dmarc_relaxed_and_strict_alignment() -> None:
    relaxed = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject"]})
    strict = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject; adkim=s; aspf=s"]})
    sub_spf = SPFResult("pass", "", "bounces.example.org")
    assert evaluate(["example.org"], sub_spf, [], relaxed).result == "pass"
    assert evaluate(["example.org"], sub_spf, [], strict).result == "fail"
    sub_dkim = [("pass", "mail.example.org")]
    assert evaluate(["example.org"], None, sub_dkim, relaxed).result == "pass"
    assert evaluate(["example.org"], None, sub_dkim, strict).result == "fail"


def test_dmarc_none_without_record_even_when_unauthenticated() -> None:
    out = evaluate(["elsewhere.example"], None, [], REJECT)
    assert (out.result, out.disposition) == ("none", "none")


def test_dmarc_subdomain_takes_sp_from_the_organizational_domain() -> None:
    dns = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject; sp=quarantine"]})
    out = evaluate(["news.example.org"], None, [], dns)
    assert (out.result, out.policy, out.disposition) == ("fail", "quarantine", "quarantine")
    assert dns.asked == ["_dmarc.news.example.org", "_dmarc.example.org"]
    # A record at the subdomain itself wins, with its p=.
    own = FakeDNS(
        {
            "_dmarc.news.example.org": ["v=DMARC1; p=none"],
            "_dmarc.example.org": ["v=DMARC1; p=reject"],
        }
    )
    assert evaluate(["news.example.org"], None, [], own).policy == "none"


def test_dmarc_pct_sampling_gives_the_next_milder_policy() -> None:
    dns = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject; pct=50"]})
    assert evaluate(["example.org"], None, [], dns).disposition == "reject"  # roll 0
    assert evaluate(["example.org"], None, [], dns, roll=75).disposition == "quarantine"
    zero = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=quarantine; pct=0"]})
    assert evaluate(["example.org"], None, [], zero).disposition == "none"


def test_dmarc_dns_failure_is_a_temperror_without_policy() -> None:
    out = evaluate(["example.org"], None, [], FakeDNS({"_dmarc.example.org": "error"}))
    assert (out.result, out.disposition) == ("temperror", "none")


@pytest.mark.parametrize(
    "records",
    [
        ["v=DMARC1; p=reject", "v=DMARC1; p=none"],  # two records
        ["v=DMARC1; p=bogus"],
        ["v=DMARC1"],
        ["v=DMARC1; p=reject; what"],
    ],
)
def test_dmarc_unusable_records_are_permerrors_never_a_pass(records: list[str]) -> None:
    dns = FakeDNS({"_dmarc.example.org": records})
    out = evaluate(["example.org"], SPF_PASS, [("pass", "example.org")], dns)
    assert (out.result, out.disposition) == ("permerror", "none")
    assert "_dmarc.example.org" in out.reason


def test_dmarc_other_txt_records_are_ignored() -> None:
    dns = FakeDNS({"_dmarc.example.org": ["something else", "v=DMARC1; p=reject"]})
    assert evaluate(["example.org"], None, [], dns).disposition == "reject"


def test_dmarc_no_from_domain_is_a_permerror() -> None:
    out = evaluate(from_domains(b"Subject: s\r\n\r\nb\r\n"), SPF_PASS, [], REJECT)
    assert (out.result, out.disposition) == ("permerror", "none")
    assert evaluate(None, SPF_PASS, [], REJECT).result == "permerror"


def test_dmarc_malformed_from_applies_the_candidates_policy_and_never_passes() -> None:
    """RFC 7489 sections 3.1 and 6.6.1: SPF passes for example.net, which a lenient parser
    read into the glued example.comx.example.net; the reader's example.org has p=reject."""
    dns = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject"]})
    spf = SPFResult("pass", "", "example.net")
    out = evaluate(from_domains(message("alice@example.org (,) x.example.net")), spf, [], dns)
    assert (out.result, out.from_domain, out.policy, out.disposition) == (
        "permerror",
        "example.org",
        "reject",
        "reject",
    )
    assert out.reason.startswith("malformed From field")
    assert "policy.dmarc=reject" in resinfo(out)
    # Every candidate authenticates: still no pass, and no policy to apply.
    signed = evaluate(
        from_domains(message("a@example.org (,) x")), None, [("pass", "example.org")], dns
    )
    assert (signed.result, signed.disposition) == ("permerror", "none")


def test_dmarc_well_formed_from_with_a_comment_passes_twin() -> None:
    dns = FakeDNS({"_dmarc.example.org": ["v=DMARC1; p=reject"]})
    out = evaluate(from_domains(message("Alice (work) <alice@example.org>")), SPF_PASS, [], dns)
    assert (out.result, out.from_domain, out.disposition) == ("pass", "example.org", "none")
    failed = evaluate(from_domains(message("Alice (work) <alice@example.org>")), SPF_OTHER, [], dns)
    assert (failed.result, failed.disposition) == ("fail", "reject")


def test_dmarc_a_second_from_cannot_hide_a_forged_one() -> None:
    """Section 6.6.1: each From domain is evaluated and the strictest failure wins."""
    domains = from_domains(message("me@elsewhere.example", "ceo@example.org"))
    out = evaluate(domains, SPFResult("pass", "", "elsewhere.example"), [], REJECT)
    assert (out.result, out.from_domain, out.disposition) == ("fail", "example.org", "reject")
    assert "2 From domains" in out.reason
    # The twin: both From domains authenticated.
    both = evaluate(["example.org", "example.org"], SPF_PASS, [], REJECT)
    assert both.result == "pass"


# Authentication-Results


def test_dmarc_combined_authentication_results_is_one_parsable_field() -> None:
    field = combined_authentication_results(
        "mail.example.org",
        dkim=[DKIMResult("pass", domain="example.org", selector="s", algorithm="rsa-sha256")],
        spf=SPFResult("fail", "matched all in example.org", "example.org"),
        dmarc=DMARCResult("pass", "", "example.org", "reject"),
    )
    text = field.decode()
    assert text.count("Authentication-Results:") == 1 and text.endswith("\r\n")
    parsed = parse_auth_results(text.partition(":")[2])
    assert parsed.error is None and parsed.authserv_id == "mail.example.org"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("dkim", "pass"),
        ("spf", "fail"),
        ("dmarc", "pass"),
    ]
    assert parsed.dmarc[0].properties == {"header.from": "example.org", "policy.dmarc": "reject"}
    assert parsed.spf[0].reason == "matched all in example.org"


def test_dmarc_combined_field_without_dkim_check_names_no_dkim() -> None:
    field = combined_authentication_results(
        "mx", dkim=None, spf=SPFResult("none", "", "x.example"), dmarc=DMARCResult("none")
    )
    parsed = parse_auth_results(field.decode().partition(":")[2])
    assert [r.method for r in parsed.results] == ["spf", "dmarc"]
    empty = combined_authentication_results("mx", dkim=None, spf=None, dmarc=None)
    assert parse_auth_results(empty.decode().partition(":")[2]).dkim[0].result == "none"
