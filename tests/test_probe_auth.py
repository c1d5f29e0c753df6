"""The validator's e-mail authentication checks (probes/authcheck.py, docs/auth-checks.md):
``roundtrip probe`` run in-process against a running stack that signs (``dkim=True``), with
``--dns`` pointing at the stack's DNS server; the stack's records changed per test with
``set_dns_records`` and ``publish_dkim_key`` to make each verdict fail on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from roundtrip import MailStack, StackConfig
from roundtrip.cli import main
from roundtrip.errors import ConfigError
from roundtrip.probes.authcheck import (
    Lookup,
    auth_results,
    check_posture,
    parse_dns_server,
    spf_lookup_count,
)
from roundtrip.probes.roundtrip import run_probe
from roundtrip.protocols.dns import Record

SENDER = "example.com"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(dkim=True)) as running:
        yield running


@pytest.fixture
def urls(stack: MailStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    stack.reset()
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", stack.user(SENDER).password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", stack.user("example.org").password)
    src, dst = stack.endpoints(SENDER), stack.endpoints("example.org")
    yield [
        "--smtp",
        f"smtps://user%40example.com@127.0.0.1:{src.ports['submissions']}",
        "--imap",
        f"imaps://user%40example.org@127.0.0.1:{dst.ports['imaps']}",
        "--cafile",
        stack.ca_file,
        "--timeout",
        "10",
    ]
    stack.check()


def _dns(stack: MailStack) -> list[str]:
    assert stack.dns is not None
    return ["--dns", f"{stack.dns.host}:{stack.dns.port}"]


def _lookup(stack: MailStack) -> Lookup:
    assert stack.dns is not None
    return Lookup((stack.dns.host, stack.dns.port), timeout=5.0)


def _probe(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    code = main(["probe", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _findings(doc: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [f for r in doc["results"] for f in r["findings"] if f["code"] == code]


def _serve(
    stack: MailStack, *, drop: Iterable[tuple[str, str]] = (), add: Iterable[Record] = ()
) -> None:
    """The default records without ``drop`` (name, type) and with ``add``."""
    gone = {(name.lower(), rtype) for name, rtype in drop}
    kept = [r for r in stack.default_dns_records() if (r.name.lower(), r.rtype) not in gone]
    stack.set_dns_records([*kept, *add])


# -- the receiver's Authentication-Results ------------------------------------------------------


def test_probe_auth_reports_the_receivers_authentication_results(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0, doc["results"][0]["error"]
    (summary,) = _findings(doc, "auth-results")
    assert summary["server"] == "mail.example.org"
    assert "the field of the receiving host mail.example.org" in summary["message"]
    (spf,) = _findings(doc, "auth-spf")
    assert spf["severity"] == "info" and "spf=pass (smtp.mailfrom=example.com" in spf["message"]
    (dmarc,) = _findings(doc, "auth-dmarc")
    assert dmarc["severity"] == "info" and "dmarc=pass" in dmarc["message"]
    assert "policy.dmarc=reject" in dmarc["message"]
    dkim = _findings(doc, "auth-dkim")
    assert [f["severity"] for f in dkim] == ["info", "info"]
    assert {"header.s=rt-rsa" in f["message"] for f in dkim} == {True, False}


def test_probe_auth_spf_and_dmarc_failures_are_warnings_with_evidence(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # SPF excludes every host, neither DKIM key verifies, DMARC asks for no action.
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    _serve(
        stack,
        drop=[(SENDER, "TXT"), (f"_dmarc.{SENDER}", "TXT")],
        add=[
            Record(SENDER, "TXT", "v=spf1 -all"),
            Record(f"_dmarc.{SENDER}", "TXT", "v=DMARC1; p=none"),
        ],
    )
    stack.publish_dkim_key(SENDER, "rt-rsa", wrong)
    stack.publish_dkim_key(SENDER, "rt-ed25519", "v=DKIM1; k=ed25519; p=")
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0  # warnings only: the round trip itself passed
    (spf,) = _findings(doc, "auth-spf")
    assert spf["severity"] == "warn" and "spf=fail" in spf["message"]
    assert spf["evidence"][0].startswith("Authentication-Results: mail.example.org;")
    (dmarc,) = _findings(doc, "auth-dmarc")
    assert dmarc["severity"] == "warn" and "dmarc=fail" in dmarc["message"]
    assert {f["severity"] for f in _findings(doc, "auth-dkim")} == {"warn"}
    assert doc["verdict"]["worst"] == "warn"


def test_probe_auth_takes_the_receivers_field_not_a_forged_one_above() -> None:
    raw = (
        b"Authentication-Results: forger.example; spf=pass smtp.mailfrom=example.com\r\n"
        b"Authentication-Results: mx.example.org; spf=softfail smtp.mailfrom=example.com\r\n"
        b"Received: from a by mx.example.org with ESMTPS; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"\r\nbody\r\n"
    )
    picked = auth_results(raw, "mx.example.org")
    (spf,) = [f for f in picked if f.code == "auth-spf"]
    assert spf.server == "mx.example.org" and spf.severity == "warn"
    assert "spf=softfail" in spf.message
    # Twin: with the receiving host unknown, the topmost field is the one reported.
    (unknown,) = [f for f in auth_results(raw, "") if f.code == "auth-spf"]
    assert unknown.server == "forger.example" and "spf=pass" in unknown.message


def test_probe_auth_takes_a_field_of_the_receivers_organization() -> None:
    raw = (
        b"Authentication-Results: forger.example; dmarc=pass header.from=example.com\r\n"
        b"Authentication-Results: filter.example.org;\r\n"
        b'\tdmarc=fail reason="p=reject" header.from=example.com\r\n'
        b"\r\nbody\r\n"
    )
    (dmarc,) = [f for f in auth_results(raw, "lmtp.example.org") if f.code == "auth-dmarc"]
    assert dmarc.server == "filter.example.org" and dmarc.severity == "warn"
    assert "reason 'p=reject'" in dmarc.message
    # Twin: a receiver of another organization: the topmost field, and the summary says why.
    picked = auth_results(raw, "mx.other.example.net")
    (summary,) = [f for f in picked if f.code == "auth-results"]
    assert "none names the receiving host mx.other.example.net" in summary.message
    assert summary.server == "forger.example"


@pytest.mark.parametrize(
    ("field", "code", "want"),
    [
        # OpenDMARC puts the policy it applied in a comment.
        (
            "mx.example.org; dmarc=fail (p=reject dis=none) header.from=example.com",
            "auth-dmarc",
            "mx.example.org: dmarc=fail (comment 'p=reject dis=none', header.from=example.com)",
        ),
        # A version after the authserv-id (RFC 8601 section 2.2); a comment holding "x=y"
        # pairs is not read as results.
        (
            "mx.example.org 1; arc=pass (i=1 spf=fail dkim=pass) smtp.remote-ip=192.0.2.1",
            "auth-arc",
            "mx.example.org: arc=pass (comment 'i=1 spf=fail dkim=pass', smtp.remote-ip=192.0.2.1)",
        ),
        # No authserv-id at all, as Microsoft 365 writes the field: still read.
        (
            "spf=softfail (sender IP is 192.0.2.1) smtp.mailfrom=example.com; "
            "dmarc=pass action=none header.from=example.com",
            "auth-spf",
            "(no authserv-id): spf=softfail (comment 'sender IP is 192.0.2.1', "
            "smtp.mailfrom=example.com)",
        ),
    ],
)
def test_probe_auth_reads_the_fields_other_verifiers_write(
    field: str, code: str, want: str
) -> None:
    raw = f"Authentication-Results: {field}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    found = [f for f in auth_results(raw, "mx.example.org") if f.code == code]
    assert [f.message for f in found] == [want]
    verdict = want.split(": ", 1)[1].split()[0]  # "dmarc=fail", "arc=pass", ...
    assert found[0].severity == ("warn" if "fail" in verdict else "info")
    assert not [f for f in auth_results(raw, "") if f.code == "auth-results-unreadable"]


def test_probe_auth_says_when_the_receiver_added_no_field() -> None:
    findings = auth_results(b"Subject: x\r\n\r\nbody\r\n", "mx.example.org")
    assert [(f.code, f.severity) for f in findings] == [("auth-results-missing", "info")]
    broken = auth_results(b"Authentication-Results: ;;;\r\n\r\n", "mx.example.org")
    assert "auth-results-unreadable" in [f.code for f in broken]


@pytest.mark.parametrize("reader", ["imaps", "pop3s"])
def test_probe_auth_run_probe_api_reports_when_asked(stack: MailStack, reader: str) -> None:
    stack.reset()
    assert stack.dns is not None

    def probe(**options: Any) -> list[str]:
        sender, recipient = stack.user(SENDER), stack.user("example.org")
        result = run_probe(
            stack.endpoint("submissions", sender),
            stack.endpoint(reader, recipient),
            context=stack.client_context(),
            mail_from=sender.address,
            rcpt_to=recipient.address,
            timeout=10.0,
            settle=0.05,
            **options,
        )
        assert result.ok, result.error
        return [f.code for f in result.findings]

    codes = probe(auth_checks=True, dns=(stack.dns.host, stack.dns.port))
    assert {"auth-results", "auth-spf", "auth-dmarc", "dkim-verify"} <= set(codes)
    # Twin: by default run_probe adds none of them (API callers see what they saw before).
    assert not [c for c in probe() if c.startswith(("auth-", "dkim-"))]


# -- the delivered copy's DKIM signatures -------------------------------------------------------


def test_probe_auth_verifies_the_delivered_copys_dkim_signatures(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0
    verified = _findings(doc, "dkim-verify")
    assert sorted(f["message"].split(" of ")[0] for f in verified) == [
        "DKIM signature d=example.com s=rt-ed25519 (ed25519-sha256)",
        "DKIM signature d=example.com s=rt-rsa (rsa-sha256)",
    ]
    assert {f["severity"] for f in verified} == {"info"}
    assert not _findings(doc, "dkim-verify-fail")


def test_probe_auth_dkim_with_a_wrong_published_key_fails_verification(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    stack.publish_dkim_key(SENDER, "rt-rsa", wrong)
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0
    (failed,) = _findings(doc, "dkim-verify-fail")
    assert failed["severity"] == "warn" and "d=example.com s=rt-rsa" in failed["message"]
    assert failed["evidence"][0].startswith("DKIM-Signature: v=1; a=rsa-sha256")
    (passed,) = _findings(doc, "dkim-verify")
    assert "s=rt-ed25519" in passed["message"]


def test_probe_auth_loopback_target_without_dns_makes_no_lookups(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _probe(capsys, urls)
    assert code == 0
    (skipped,) = _findings(doc, "dkim-verify-skipped")
    assert "2 DKIM signature(s) not verified" in skipped["message"]
    (posture,) = _findings(doc, "posture-skipped")
    assert "127.0.0.1 is on loopback" in posture["message"]
    assert "auth" not in doc
    assert not _findings(doc, "dkim-verify") and not _findings(doc, "spf-lookups")


# -- the sending domain's posture ---------------------------------------------------------------


def test_probe_auth_posture_of_the_stack_domain(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0
    assert doc["auth"]["domain"] == SENDER
    severities = {f["code"]: f["severity"] for f in doc["auth"]["findings"]}
    assert severities["spf-syntax"] == "info" and severities["spf-lookups"] == "info"
    assert severities["dmarc"] == "info" and severities["mta-sts"] == "info"
    assert severities["tls-rpt-missing"] == "info"
    assert severities["mx"] == "info"
    # The stack's DNS serves no PTR records: reverse DNS of the MX is a warning.
    (ptr,) = _findings(doc, "fcrdns-missing")
    assert ptr["severity"] == "warn"
    assert ptr["evidence"] == ["1.0.0.127.in-addr.arpa PTR: NXDOMAIN"]
    assert doc["results"][0]["checks"]["sending domain's SPF within 10 DNS lookups"] is True


def test_probe_auth_posture_domain_without_dmarc_is_a_warning(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _serve(stack, drop=[(f"_dmarc.{SENDER}", "TXT")])
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0
    (missing,) = _findings(doc, "dmarc-missing")
    assert missing["severity"] == "warn"
    assert missing["evidence"] == ["_dmarc.example.com TXT: NXDOMAIN"]
    assert not _findings(doc, "dmarc")


def _chain(lookups: int) -> list[Record]:
    """An SPF record for the sender whose include chain needs ``lookups`` DNS lookups (and
    which matches the stack's address first, so the MX's own verdict stays pass). Every term
    names a name that answers, so none is a void lookup (RFC 7208 section 4.6.4)."""
    first = ["exists:mail.example.com"] * 5
    second = ["mx:example.com"] * (lookups - 8) + ["exists:%{i}.e.example.com"]
    return [
        Record(SENDER, "TXT", "v=spf1 ip4:127.0.0.1 include:_s1.example.com -all"),
        Record("_s1.example.com", "TXT", f"v=spf1 {' '.join(first)} include:_s2.example.com ~all"),
        Record("_s2.example.com", "TXT", f"v=spf1 {' '.join(second)} ~all"),
    ]


def test_probe_auth_posture_spf_over_ten_lookups_fails_the_probe(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _serve(stack, drop=[(SENDER, "TXT")], add=_chain(11))
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 1
    (over,) = _findings(doc, "spf-lookups")
    assert over["severity"] == "fail"
    assert "needs 11 DNS lookups, above the limit of 10" in over["message"]
    assert over["evidence"][0] == ("example.com: v=spf1 ip4:127.0.0.1 include:_s1.example.com -all")
    result = doc["results"][0]
    assert result["checks"]["sending domain's SPF within 10 DNS lookups"] is False
    assert result["error_step"] == "AUTH" and not result["ok"]


def test_probe_auth_posture_spf_at_ten_lookups_passes(
    stack: MailStack, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _serve(stack, drop=[(SENDER, "TXT")], add=_chain(10))
    code, doc = _probe(capsys, [*urls, *_dns(stack)])
    assert code == 0
    (count,) = _findings(doc, "spf-lookups")
    assert count["severity"] == "info" and "needs 10 DNS lookups (limit 10)" in count["message"]


def test_probe_auth_posture_tls_rpt_present_and_invalid(stack: MailStack) -> None:
    stack.reset()
    name = f"_smtp._tls.{SENDER}"
    _serve(stack, add=[Record(name, "TXT", "v=TLSRPTv1; rua=mailto:tls@example.com")])
    codes = {f.code: f.severity for f in check_posture(SENDER, _lookup(stack)).findings}
    assert codes["tls-rpt"] == "info" and "tls-rpt-missing" not in codes
    _serve(stack, add=[Record(name, "TXT", "v=TLSRPTv1;")])
    codes = {f.code: f.severity for f in check_posture(SENDER, _lookup(stack)).findings}
    assert codes["tls-rpt-invalid"] == "warn"


@pytest.mark.parametrize(
    ("records", "code", "severity"),
    [
        (["v=spf1 ip4:127.0.0.1 -all", "v=spf1 -all"], "spf-multiple", "fail"),
        (["v=spf1 ip4:127.0.0.1 bogus:x -all"], "spf-syntax", "fail"),
        (["v=spf1 ip4:300.1.2.3 -all"], "spf-syntax", "fail"),
        (["v=spf1 +all"], "spf-permissive", "warn"),
        (["not an spf record"], "spf-missing", "warn"),
    ],
)
def test_probe_auth_posture_bad_spf_records(
    stack: MailStack, records: list[str], code: str, severity: str
) -> None:
    stack.reset()
    _serve(stack, drop=[(SENDER, "TXT")], add=[Record(SENDER, "TXT", v) for v in records])
    report = check_posture(SENDER, _lookup(stack))
    found = [f for f in report.findings if f.code == code]
    assert [f.severity for f in found] == [severity], report.findings
    assert found[0].evidence


def test_probe_auth_posture_spf_include_loop_is_reported(stack: MailStack) -> None:
    stack.reset()
    _serve(
        stack,
        drop=[(SENDER, "TXT")],
        add=[
            Record(SENDER, "TXT", "v=spf1 include:_loop.example.com -all"),
            Record("_loop.example.com", "TXT", "v=spf1 include:example.com -all"),
        ],
    )
    lookups, problems, _ = spf_lookup_count(SENDER, _lookup(stack))
    assert lookups == 2
    assert problems == ["loop: example.com -> _loop.example.com -> example.com"]


def test_probe_auth_posture_dmarc_none_and_mx_cname(stack: MailStack) -> None:
    stack.reset()
    _serve(
        stack,
        drop=[(f"_dmarc.{SENDER}", "TXT"), (SENDER, "MX")],
        add=[
            Record(f"_dmarc.{SENDER}", "TXT", "v=DMARC1; p=none; rua=mailto:d@example.com"),
            Record(SENDER, "MX", "10 alias.example.com."),
            Record("alias.example.com", "CNAME", "mail.example.com."),
        ],
    )
    codes = {f.code: f for f in check_posture(SENDER, _lookup(stack)).findings}
    assert codes["dmarc-none"].severity == "warn"
    assert codes["mx-cname"].severity == "warn"
    assert "CNAME to mail.example.com" in codes["mx-cname"].message
    # Twin: the stack's own records have neither problem.
    _serve(stack)
    codes = {f.code: f for f in check_posture(SENDER, _lookup(stack)).findings}
    assert "dmarc-none" not in codes and "mx-cname" not in codes


# -- options ------------------------------------------------------------------------------------


def test_probe_auth_dns_option_is_parsed_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_dns_server("[::1]:53") == ("::1", 53)
    assert parse_dns_server("192.0.2.1") == ("192.0.2.1", 53)
    for bad in ("ns.example.com", "127.0.0.1:0", ":53"):
        with pytest.raises(ConfigError):
            parse_dns_server(bad)
    assert main(["probe", "--dns", "127.0.0.1:53"]) == 2
    assert "--dns needs --smtp" in capsys.readouterr().err
