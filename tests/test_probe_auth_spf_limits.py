"""The SPF posture limits and macros of ``roundtrip probe`` (roundtrip/probes/_spfposture.py,
docs/auth-checks.md): the void-lookup limit of RFC 7208 section 4.6.4 and the macro-strings of
RFC 7208 section 7, with the records served by the stack's DNS server on loopback and read
through ``--dns`` (or ``Lookup`` pointed at it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from roundtrip import MailStack
from roundtrip.cli import main
from roundtrip.probes._spfposture import spf_walk
from roundtrip.probes._spfposture_macro import (
    MacroError,
    expand_domain,
    parse_domain_spec,
    sender_letters,
)
from roundtrip.probes.authcheck import AuthReport, Lookup, check_posture
from roundtrip.protocols.dns import Record

SENDER = "example.com"
VOID_CHECK = "sending domain's SPF within 2 void DNS lookups"
VALID_CHECK = "sending domain's SPF record is valid"
LOOKUP_CHECK = "sending domain's SPF within 10 DNS lookups"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _lookup(stack: MailStack) -> Lookup:
    assert stack.dns is not None
    return Lookup((stack.dns.host, stack.dns.port), timeout=5.0)


def _serve(stack: MailStack, spf: str, *more: Record) -> None:
    """The stack's records, with ``spf`` as the sender's only SPF record, plus ``more``."""
    stack.reset()
    kept = [r for r in stack.default_dns_records() if (r.name.lower(), r.rtype) != (SENDER, "TXT")]
    stack.set_dns_records([*kept, Record(SENDER, "TXT", spf), *more])


def _posture(stack: MailStack) -> tuple[AuthReport, dict[str, list[Any]]]:
    report = check_posture(SENDER, _lookup(stack))
    codes: dict[str, list[Any]] = {}
    for finding in report.findings:
        codes.setdefault(finding.code, []).append(finding)
    return report, codes


# -- void lookups (RFC 7208 section 4.6.4) -----------------------------------------------------


def test_spf_two_void_lookups_are_within_the_limit(stack: MailStack) -> None:
    _serve(stack, "v=spf1 exists:gone1.example.com exists:gone2.example.com mx -all")
    report, codes = _posture(stack)
    assert "spf-void-lookups" not in codes
    assert report.checks[VOID_CHECK] is True
    (count,) = codes["spf-lookups"]
    assert count.severity == "info"
    assert count.message.endswith(
        "needs 3 DNS lookups (limit 10), 2 of them void for IPv4 and IPv6 clients"
    )


def test_spf_three_void_lookups_are_a_permerror(stack: MailStack) -> None:
    _serve(
        stack,
        "v=spf1 exists:gone1.example.com exists:gone2.example.com exists:gone3.example.com -all",
    )
    report, codes = _posture(stack)
    (void,) = codes["spf-void-lookups"]
    assert void.severity == "fail"
    assert "makes 3 void DNS lookups (NXDOMAIN or no records) for IPv4 and IPv6 clients" in (
        void.message
    )
    assert "above the limit of 2: receivers return permerror" in void.message
    assert void.evidence == (
        "example.com: exists:gone1.example.com (gone1.example.com A: NXDOMAIN)",
        "example.com: exists:gone2.example.com (gone2.example.com A: NXDOMAIN)",
        "example.com: exists:gone3.example.com (gone3.example.com A: NXDOMAIN)",
    )
    assert report.checks[VOID_CHECK] is False


def test_spf_a_terms_are_void_per_client_address_family(stack: MailStack) -> None:
    # A receiver asks A for an IPv4 client and AAAA for an IPv6 one (RFC 7208 section 5.3):
    # three ``a`` terms on an IPv4-only host are three void lookups for IPv6 clients only.
    spf = "v=spf1 a:v4.example.com a:v4.example.com/24 a:v4.example.com//64 -all"
    _serve(stack, spf, Record("v4.example.com", "A", "192.0.2.1"))
    _, codes = _posture(stack)
    (void,) = codes["spf-void-lookups"]
    assert void.severity == "fail" and "for IPv6 clients" in void.message
    assert void.evidence[0] == "example.com: a:v4.example.com (v4.example.com AAAA: no records)"
    # Twin: with an IPv6 address too, no term is void.
    _serve(
        stack,
        spf,
        Record("v4.example.com", "A", "192.0.2.1"),
        Record("v4.example.com", "AAAA", "2001:db8::1"),
    )
    report, codes = _posture(stack)
    assert "spf-void-lookups" not in codes and report.checks[VOID_CHECK] is True


def test_spf_void_lookups_are_counted_through_includes(stack: MailStack) -> None:
    # An include of a name without records is void (and a permerror of its own); a void
    # ``mx`` inside an include counts towards the same limit.
    _serve(
        stack,
        "v=spf1 include:_inc.example.com include:gone.example.com -all",
        Record("_inc.example.com", "TXT", "v=spf1 mx mx:nomx.example.com ~all"),
    )
    _, codes = _posture(stack)
    (void,) = codes["spf-void-lookups"]
    assert void.evidence == (
        "_inc.example.com: mx (_inc.example.com MX: no records)",
        "_inc.example.com: mx:nomx.example.com (nomx.example.com MX: NXDOMAIN)",
        "example.com: include:gone.example.com (gone.example.com TXT: NXDOMAIN)",
    )
    assert [f.message for f in codes["spf-include-permerror"]] == [
        "SPF of example.com: example.com refers to gone.example.com, which has no SPF record: "
        "receivers return permerror for the whole record (RFC 7208 sections 5.2 and 6.1)"
    ]


@pytest.mark.parametrize(("voids", "code"), [(2, 0), (3, 1)])
def test_spf_void_lookups_through_the_cli(
    stack: MailStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    voids: int,
    code: int,
) -> None:
    # ip4:127.0.0.1 first: the stack's MX passes the probe's mail before any lookup.
    terms = " ".join(f"exists:gone{n}.example.com" for n in range(voids))
    _serve(stack, f"v=spf1 ip4:127.0.0.1 {terms} -all")
    assert stack.dns is not None
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", stack.user(SENDER).password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", stack.user("example.org").password)
    src, dst = stack.endpoints(SENDER), stack.endpoints("example.org")
    argv = [
        "probe",
        "--smtp",
        f"smtps://user%40example.com@127.0.0.1:{src.ports['submissions']}",
        "--imap",
        f"imaps://user%40example.org@127.0.0.1:{dst.ports['imaps']}",
        "--cafile",
        stack.ca_file,
        "--timeout",
        "10",
        "--dns",
        f"{stack.dns.host}:{stack.dns.port}",
        "--json",
    ]
    assert main(argv) == code
    doc = json.loads(capsys.readouterr().out)
    result = doc["results"][0]
    assert result["checks"][VOID_CHECK] is (voids <= 2)
    found = [f for f in doc["auth"]["findings"] if f["code"] == "spf-void-lookups"]
    if voids <= 2:
        assert not found and result["ok"]
    else:
        assert [f["severity"] for f in found] == ["fail"]
        assert result["error_step"] == "AUTH"
        assert "sending domain's SPF within 2 void DNS lookups" in result["error"]
    stack.check()


# -- records that let every host pass -------------------------------------------------------


@pytest.mark.parametrize(
    ("spf", "more", "says"),
    [
        (
            "v=spf1 include:_p.example.com -all",
            [Record("_p.example.com", "TXT", "v=spf1 +all")],
            "_p.example.com (reached from example.com by include:_p.example.com): +all lets "
            "every host on the internet pass",
        ),
        (
            "v=spf1 redirect=_p.example.com",
            [Record("_p.example.com", "TXT", "v=spf1 all")],
            "_p.example.com (reached from example.com by redirect=_p.example.com): all lets "
            "every host on the internet pass",
        ),
        ("v=spf1 +ALL", [], "SPF of example.com: +ALL lets every host on the internet pass"),
        ("v=spf1 ip4:0.0.0.0/0 -all", [], "ip4:0.0.0.0/0 lets every IPv4 host pass"),
        ("v=spf1 ip6:::/0 -all", [], "ip6:::/0 lets every IPv6 host pass"),
        (
            "v=spf1 ip4:10.0.0.0/8 -all",
            [],
            "ip4:10.0.0.0/8 lets a /8 of IPv4 addresses (16,777,216) pass",
        ),
        ("v=spf1 a/0 -all", [], "a/0 lets every IPv4 host pass"),
    ],
)
def test_spf_record_that_lets_every_host_pass_is_permissive(
    stack: MailStack, spf: str, more: list[Record], says: str
) -> None:
    _serve(stack, spf, *more)
    _, codes = _posture(stack)
    (wide,) = codes["spf-permissive"]
    assert wide.severity == "warn" and says in wide.message


@pytest.mark.parametrize(
    ("spf", "more"),
    [
        (
            "v=spf1 include:_p.example.com -all",
            [Record("_p.example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        ),
        # A match in an included record with -include is a fail, not a pass (RFC 7208 5.2).
        ("v=spf1 -include:_p.example.com ~all", [Record("_p.example.com", "TXT", "v=spf1 +all")]),
        ("v=spf1 redirect=_p.example.com", [Record("_p.example.com", "TXT", "v=spf1 -all")]),
        # Terms after the first ``all`` are never tested (RFC 7208 section 5.1).
        ("v=spf1 -all +all", []),
        ("v=spf1 ?ip4:0.0.0.0/0 -all", []),
        ("v=spf1 ip4:10.0.0.0/9 ip6:2001:db8::/32 a/24 -all", []),
    ],
)
def test_spf_record_with_a_bounded_pass_is_not_permissive(
    stack: MailStack, spf: str, more: list[Record]
) -> None:
    _serve(stack, spf, *more)
    _, codes = _posture(stack)
    assert "spf-permissive" not in codes


# -- MX hosts of an mx term (RFC 7208 section 4.6.4) -----------------------------------------


def _mx_hosts(count: int) -> list[Record]:
    return [Record("many.example.com", "MX", f"{n} m{n}.example.com.") for n in range(count)] + [
        Record(f"m{n}.example.com", "A", "192.0.2.1") for n in range(count)
    ]


def test_spf_mx_term_with_eleven_mx_hosts_is_a_permerror(stack: MailStack) -> None:
    _serve(stack, "v=spf1 mx:many.example.com -all", *_mx_hosts(11))
    report, codes = _posture(stack)
    (count,) = codes["spf-lookups"]
    assert count.severity == "fail"
    assert "needs 1 DNS lookups (limit 10)" in count.message
    assert "example.com: mx:many.example.com (many.example.com has 11 MX hosts)" in count.message
    assert "more than 10 MX hosts for one mx term, receivers return permerror" in count.message
    assert report.checks[LOOKUP_CHECK] is False


def test_spf_mx_term_with_ten_mx_hosts_passes(stack: MailStack) -> None:
    _serve(stack, "v=spf1 mx:many.example.com -all", *_mx_hosts(10))
    report, codes = _posture(stack)
    (count,) = codes["spf-lookups"]
    assert count.severity == "info" and "MX hosts" not in count.message
    assert report.checks[LOOKUP_CHECK] is True


# -- macros (RFC 7208 section 7) ---------------------------------------------------------------


def test_spf_macros_without_the_sender_are_expanded_and_followed(stack: MailStack) -> None:
    # %{d} is the domain whose record is read (the include's target inside an include),
    # %{o} the sender's domain, which stays the checked domain (RFC 7208 section 7.2).
    _serve(
        stack,
        "v=spf1 include:_spf.%{d} -all",
        Record("_spf.example.com", "TXT", "v=spf1 mx:%{o} include:_x.%{d} ~all"),
        Record("_x._spf.example.com", "TXT", "v=spf1 mx:%{o} mx:%{d2} ~all"),
    )
    walk = spf_walk(SENDER, _lookup(stack))
    assert walk.lookups == 5
    assert [line.split(":")[0] for line in walk.trail] == [
        "example.com",
        "_spf.example.com",
        "_x._spf.example.com",
    ]
    assert walk.void == {"IPv4": [], "IPv6": []}
    assert walk.sender == [] and walk.problems == []
    _, codes = _posture(stack)
    assert "spf-sender-dependent" not in codes and "spf-include" not in codes
    assert codes["spf-lookups"][0].message.endswith("needs 5 DNS lookups (limit 10)")


def test_spf_macros_with_the_sender_are_one_lookup_not_followed(stack: MailStack) -> None:
    # Twin: %{l} (the sender's local part) and %{i} (its address) have no value here: each
    # such term is counted once and reported, and its target is not asked for.
    _serve(
        stack,
        "v=spf1 include:%{l}._spf.%{d} exists:%{ir}.%{v}._rbl.%{d} -all",
        Record("user._spf.example.com", "TXT", "v=spf1 mx mx mx ~all"),
    )
    walk = spf_walk(SENDER, _lookup(stack))
    assert walk.lookups == 2
    assert walk.trail == [
        "example.com: v=spf1 include:%{l}._spf.%{d} exists:%{ir}.%{v}._rbl.%{d} -all"
    ]
    assert walk.sender == [
        "example.com: include:%{l}._spf.%{d} (%{l})",
        "example.com: exists:%{ir}.%{v}._rbl.%{d} (%{i}, %{v})",
    ]
    _, codes = _posture(stack)
    assert [f.severity for f in codes["spf-sender-dependent"]] == ["info", "info"]
    (first, _) = codes["spf-sender-dependent"]
    assert "include:%{l}._spf.%{d} (%{l}) depends on the sender: counted as one" in first.message
    assert codes["spf-syntax"][0].severity == "info"


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ("v=spf1 include:% -all", "a lone '%' at the end"),
        ("v=spf1 exists:%x.example.com -all", "'%x': '%' must be followed by"),
        ("v=spf1 exists:%{i.example.com -all", "'%{' is not closed by '}'"),
        ("v=spf1 exists:%{x}.example.com -all", "unknown macro letter 'x'"),
        ("v=spf1 exists:%{d0}.example.com -all", "the digit transformer must not be zero"),
        ("v=spf1 exists:%{i;}.example.com -all", "is not a macro"),
        ("v=spf1 a:%{c}.example.com -all", "'c' is allowed only in explanation text"),
        ("v=spf1 a:192.0.2.1 -all", "an address belongs in ip4: or ip6:"),
        ("v=spf1 redirect=_spf.%{d}% ", "a lone '%' at the end"),
        ("v=spf1 mx/33 -all", "bad CIDR length"),
    ],
)
def test_spf_macro_syntax_errors_are_permerrors(stack: MailStack, record: str, says: str) -> None:
    _serve(stack, record)
    report, codes = _posture(stack)
    (syntax,) = codes["spf-syntax"]
    assert syntax.severity == "fail"
    assert says in syntax.message and "(permerror, RFC 7208 section 12)" in syntax.message
    assert report.checks["sending domain's SPF record is valid"] is False
    assert "spf-lookups" not in codes  # nothing counted in a record receivers reject


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d} -all",
        "v=spf1 exists:%%.%_.%-.example.com -all",
        "v=spf1 a:%{D}/24//64 mx:%{o2} -all",
        "v=spf1 ip4:127.0.0.1 exp=explain._spf.%{d} note=%{c}%{t} -all",
    ],
)
def test_spf_valid_macros_pass_the_syntax_check(stack: MailStack, record: str) -> None:
    _serve(stack, record)
    report, codes = _posture(stack)
    assert [f.severity for f in codes["spf-syntax"]] == ["info"]
    assert report.checks["sending domain's SPF record is valid"] is True


def test_spf_syntax_error_in_an_included_record_is_reported(stack: MailStack) -> None:
    _serve(
        stack,
        "v=spf1 include:_bad.example.com include:_good.example.com -all",
        Record("_bad.example.com", "TXT", "v=spf1 exists:%{z}.example.com ~all"),
        Record("_good.example.com", "TXT", "v=spf1 exists:%{i}.example.com ~all"),
    )
    report, codes = _posture(stack)
    (problem,) = codes["spf-include-permerror"]
    assert problem.severity == "fail" and "spf-include" not in codes
    assert "_bad.example.com (reached from example.com)" in problem.message
    assert "unknown macro letter 'z'" in problem.message
    assert report.checks[VALID_CHECK] is False
    # Twin: the same includes, both valid.
    _serve(
        stack,
        "v=spf1 include:_bad.example.com include:_good.example.com -all",
        Record("_bad.example.com", "TXT", "v=spf1 exists:%{d}.example.com ~all"),
        Record("_good.example.com", "TXT", "v=spf1 exists:%{i}.example.com ~all"),
    )
    report, codes = _posture(stack)
    assert "spf-include-permerror" not in codes and "spf-include" not in codes
    assert report.checks[VALID_CHECK] is True


# -- include and redirect targets (RFC 7208 sections 5.2 and 6.1) ------------------------------


@pytest.mark.parametrize(
    ("spf", "more", "says"),
    [
        (
            "v=spf1 include:_n.example.com -all",
            [Record("_n.example.com", "TXT", "not spf")],
            "example.com refers to _n.example.com, which has no SPF record",
        ),
        (
            "v=spf1 include:_nx.example.com -all",
            [],
            "example.com refers to _nx.example.com, which has no SPF record",
        ),
        (
            "v=spf1 redirect=_nx.example.com",
            [],
            "example.com refers to _nx.example.com, which has no SPF record",
        ),
        (
            "v=spf1 include:_two.example.com -all",
            [
                Record("_two.example.com", "TXT", "v=spf1 -all"),
                Record("_two.example.com", "TXT", "v=spf1 ~all"),
            ],
            "example.com refers to _two.example.com, which has 2 SPF records",
        ),
        (
            "v=spf1 redirect=_syn.example.com",
            [Record("_syn.example.com", "TXT", "v=spf1 ip4:192.0.2.1 bogus:x -all")],
            "_syn.example.com (reached from example.com): unknown term 'bogus:x'",
        ),
    ],
)
def test_spf_include_or_redirect_to_a_permerror_fails_the_record(
    stack: MailStack, spf: str, more: list[Record], says: str
) -> None:
    _serve(stack, spf, *more)
    report, codes = _posture(stack)
    (problem,) = codes["spf-include-permerror"]
    assert problem.severity == "fail" and says in problem.message
    assert "receivers return permerror for the whole record" in problem.message
    assert [f.severity for f in codes["spf-syntax"]] == ["info"]
    assert report.checks[VALID_CHECK] is False


@pytest.mark.parametrize(
    "spf", ["v=spf1 include:_ok.example.com -all", "v=spf1 redirect=_ok.example.com"]
)
def test_spf_include_or_redirect_to_a_valid_record_passes(stack: MailStack, spf: str) -> None:
    _serve(stack, spf, Record("_ok.example.com", "TXT", "v=spf1 ip4:192.0.2.1 -all"))
    report, codes = _posture(stack)
    assert "spf-include-permerror" not in codes and "spf-include" not in codes
    assert report.checks[VALID_CHECK] is True


def test_spf_include_loop_stays_a_warning(stack: MailStack) -> None:
    _serve(
        stack,
        "v=spf1 include:_loop.example.com -all",
        Record("_loop.example.com", "TXT", "v=spf1 include:example.com -all"),
    )
    report, codes = _posture(stack)
    assert [f.severity for f in codes["spf-include"]] == ["warn"]
    assert "spf-include-permerror" not in codes
    assert report.checks[VALID_CHECK] is True


# -- expansion (RFC 7208 section 7.3, with the examples of section 7.4) --------------------


@pytest.mark.parametrize(
    ("spec", "expanded"),
    [
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{o-}.x.example", "example.com.x.example"),
        ("_spf.%{D}", "_spf.email.example.com"),
        ("%{d}.x", "email.example.com.x"),
    ],
)
def test_spf_macro_expansion(spec: str, expanded: str) -> None:
    tokens = parse_domain_spec(spec)
    assert sender_letters(tokens) == []
    out = expand_domain(tokens, domain="email.example.com", sender_domain="example.com")
    assert out == expanded


def test_spf_macro_expansion_keeps_at_most_253_characters() -> None:
    label = "a" * 60
    tokens = parse_domain_spec(f"{label}.{label}.{label}.{label}.%{{d}}")
    out = expand_domain(tokens, domain="email.example.com", sender_domain="example.com")
    assert out == f"{label}.{label}.{label}.email.example.com" and len(out) <= 253
    # Twin: a sender's letter has no value, and says so instead of expanding to nonsense.
    tokens = parse_domain_spec("%{l}.%{d}")
    assert sender_letters(tokens) == ["l"]
    with pytest.raises(MacroError):
        expand_domain(tokens, domain="email.example.com", sender_domain="example.com")
