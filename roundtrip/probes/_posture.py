"""The sending domain's published posture (docs/auth-checks.md, section 3): ``AuthReport``, and
the DMARC (RFC 7489 section 6.6.3), TLS-RPT (RFC 8460 section 3), MX (no CNAME: RFC 2181
section 10.3; no address literal: RFC 5321 section 5.1) and forward-confirmed reverse DNS
checks. SPF is in ``_spfposture``, MTA-STS in ``_posture_mtasts``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import dns.reversename

from ._authdns import Lookup, organizational, tagged_records
from ._net import FAIL, INFO, WARN, Finding, apply_checks

#: MX hosts, and addresses per host, checked for forward-confirmed reverse DNS.
_MX_HOSTS = 5
_ADDRESSES_PER_HOST = 2

#: Failing findings and the check each one fails.
FINDING_CHECKS = {
    "spf-multiple": "sending domain has one SPF record",
    "spf-syntax": "sending domain's SPF record is valid",
    "spf-include-permerror": "sending domain's SPF record is valid",
    "spf-lookups": "sending domain's SPF within 10 DNS lookups",
    "spf-void-lookups": "sending domain's SPF within 2 void DNS lookups",
}


@dataclass
class AuthReport:
    """The posture of one sending domain: findings, and the pass/fail checks their failing
    findings stand for (``check name -> passed``)."""

    domain: str
    findings: list[Finding] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)

    def add(self, code: str, severity: str, message: str, *evidence: str) -> None:
        self.findings.append(
            Finding(code, severity, message, self.domain, tuple(e for e in evidence if e))
        )
        if code in FINDING_CHECKS:  # several codes share a check: one fail fails it
            check = FINDING_CHECKS[code]
            self.checks[check] = self.checks.get(check, True) and severity != FAIL

    def apply(self, result: Any) -> None:
        """Add the findings and checks to a ``ProbeResult``; a failed check fails it (with
        ``error_step`` ``AUTH`` when the round trip itself passed)."""
        apply_checks(result, self.findings, self.checks, what="sending domain", step="AUTH")

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "checks": dict(self.checks),
            "findings": [
                {
                    "code": f.code,
                    "severity": f.severity,
                    "message": f.message,
                    "evidence": list(f.evidence),
                }
                for f in self.findings
            ],
        }


def record_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def check_dmarc(report: AuthReport, lookup: Lookup) -> None:
    domain = report.domain
    org = organizational(domain)
    names = [f"_dmarc.{domain}"] + ([f"_dmarc.{org}"] if org != domain else [])
    tried: list[str] = []
    for name in names:
        answer = lookup.txt(name)
        tried.append(answer.describe(name, "TXT"))
        if answer.failed:
            report.add("dns-error", WARN, f"DMARC of {domain} not checked: {answer.rcode}", *tried)
            return
        records = tagged_records(answer, "v=DMARC1")
        if not records:
            continue
        if len(records) > 1:
            report.add(
                "dmarc-multiple",
                WARN,
                f"{name} holds {len(records)} DMARC records: receivers apply none "
                "(RFC 7489 section 6.6.3)",
                *records,
            )
            return
        own = name == f"_dmarc.{domain}"
        where = "" if own else f" (from the organizational domain {org})"
        tags = record_tags(records[0])
        if _judge_dmarc(report, f"{domain}{where}", tags, records[0], own):
            _check_report_destinations(report, lookup, name.removeprefix("_dmarc."), tags)
        return
    report.add(
        "dmarc-missing",
        WARN,
        f"{domain} publishes no DMARC record: receivers apply no policy to mail forging it",
        *tried,
    )


_DMARC_POLICIES = ("none", "quarantine", "reject")

#: RFC 7489 section 6.6.4: failing mail not selected by pct= gets the next weaker policy.
_WEAKER_POLICY = {"reject": "quarantine", "quarantine": "none"}

#: Known DMARC tags whose value is checked (RFC 7489 section 6.3): a pattern the whole value
#: must match, what it should be, and what receivers use instead of an invalid value.
_DMARC_TAG_VALUES: dict[str, tuple[str, str, str]] = {
    "pct": (r"[0-9]{1,3}", "an integer from 0 to 100", "the default pct=100"),
    "adkim": (r"(?i)[rs]", "r or s", "the default adkim=r (relaxed)"),
    "aspf": (r"(?i)[rs]", "r or s", "the default aspf=r (relaxed)"),
    "fo": (
        r"(?i)[01ds](?:\s*:\s*[01ds])*",
        "0, 1, d or s, separated by ':'",
        "the default fo=0",
    ),
    "ri": (r"[0-9]{1,10}", "a number of seconds", "the default ri=86400"),
}

#: RFC 7489 section 6.4: dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ], with
#: commas and exclamation points inside the URI percent-encoded.
_DMARC_URI = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):(?P<rest>[^\s,!]+)(?:![0-9]+[kmgtKMGT]?)?"
)


def _invalid_dmarc_tags(tags: dict[str, str]) -> list[str]:
    """What is wrong with the values of the known tags other than p= and sp= (RFC 7489
    section 6.3), and what receivers do instead, one sentence each."""
    invalid = []
    for tag, (pattern, should, instead) in _DMARC_TAG_VALUES.items():
        if tag not in tags:
            continue
        value = tags[tag]
        good = re.fullmatch(pattern, value) is not None
        if good and tag in ("pct", "ri"):
            good = int(value) <= (100 if tag == "pct" else 2**32 - 1)
        if not good:
            invalid.append(
                f"{tag}={value!r} is not valid (it must be {should}); receivers ignore it and "
                f"use {instead} (RFC 7489 section 6.3)"
            )
    for tag in ("rua", "ruf"):
        for uri in (u.strip() for u in tags[tag].split(",")) if tag in tags else ():
            match = _DMARC_URI.fullmatch(uri)
            if match is None:
                invalid.append(
                    f"{tag}= holds {uri!r}, which is not a URI: receivers send no reports to it "
                    "(RFC 7489 section 6.4)"
                )
            elif match["scheme"].lower() != "mailto":
                invalid.append(
                    f"{tag}= holds {uri!r}, not a mailto: URI: receivers only have to support "
                    "mailto: and ignore a URI they do not support (RFC 7489 section 6.3)"
                )
            elif "@" not in match["rest"]:
                invalid.append(
                    f"{tag}= holds {uri!r}, a mailto: URI without an address: receivers send "
                    "no reports to it (RFC 7489 section 6.4)"
                )
    return invalid


def _has_valid_rua(tags: dict[str, str]) -> bool:
    """RFC 7489 section 6.6.3: "at least one syntactically valid reporting URI" in rua=."""
    return any(_DMARC_URI.fullmatch(u.strip()) for u in tags.get("rua", "").split(","))


def _judge_dmarc(
    report: AuthReport, who: str, tags: dict[str, str], record: str, own: bool
) -> bool:
    """One DMARC record of ``who`` (the domain, with where the record came from):
    ``own`` is false for a subdomain that inherits the organizational domain's record.
    False when receivers do not act on the record as published (no valid p= or sp=)."""
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() if "sp" in tags else None
    if p not in _DMARC_POLICIES or (sp is not None and sp not in _DMARC_POLICIES):
        # RFC 7489 section 6.6.3: an invalid p= or sp= makes the whole record p=none when rua=
        # holds a valid URI, and no record otherwise.
        what = (
            f"has no valid policy (p={p or 'missing'})"
            if p not in _DMARC_POLICIES
            else f"has an invalid subdomain policy sp={tags['sp']!r} (none, quarantine or reject)"
        )
        applied = (
            "receivers act as if it were p=none (its rua= is valid)"
            if _has_valid_rua(tags)
            else "receivers apply no DMARC policy (it has no valid rua=)"
        )
        report.add(
            "dmarc-invalid",
            WARN,
            f"DMARC record of {who} {what}: {applied}, for the domain and its subdomains "
            "(RFC 7489 section 6.6.3)",
            record,
        )
        return False
    policy = p if own or sp is None else sp  # a subdomain's policy (RFC 7489 section 6.3)
    for problem in _invalid_dmarc_tags(tags):
        report.add("dmarc-invalid", WARN, f"DMARC record of {who}: {problem}", record)
    pct = tags.get("pct", "100")
    pct = pct if re.fullmatch(r"[0-9]{1,3}", pct) and int(pct) <= 100 else "100"
    if policy == "none":
        report.add(
            "dmarc-none",
            WARN,
            f"DMARC policy of {who} is p=none: receivers only monitor, spoofed mail is not refused",
            record,
        )
    elif int(pct) < 100:
        rest = "all of it" if pct == "0" else f"the other {100 - int(pct)}%"
        report.add(
            "dmarc-pct",
            WARN,
            f"DMARC policy of {who}: p={policy} for only {int(pct)}% of failing mail; {rest} "
            f"gets p={_WEAKER_POLICY[policy]} (RFC 7489 section 6.6.4)",
            record,
        )
    else:
        report.add("dmarc", INFO, f"DMARC policy of {who}: p={policy}", record)
    return True


def _check_report_destinations(
    report: AuthReport, lookup: Lookup, policy_domain: str, tags: dict[str, str]
) -> None:
    """RFC 7489 section 7.1: receivers send reports to a mailto: address outside the policy
    domain's organizational domain only when ``<policy domain>._report._dmarc.<destination>``
    holds a TXT record starting ``v=DMARC1``."""
    org = organizational(policy_domain)
    seen: set[str] = set()
    for tag in ("rua", "ruf"):
        for uri in (u.strip() for u in tags.get(tag, "").split(",")):
            match = _DMARC_URI.fullmatch(uri)
            if match is None or match["scheme"].lower() != "mailto" or "@" not in match["rest"]:
                continue  # reported by _invalid_dmarc_tags
            dest = match["rest"].partition("?")[0].rpartition("@")[2].lower().rstrip(".")
            if not dest or dest in seen or organizational(dest) == org:
                continue
            seen.add(dest)
            name = f"{policy_domain}._report._dmarc.{dest}"
            answer = lookup.txt(name)
            if answer.failed:
                report.add(
                    "dns-error",
                    WARN,
                    f"DMARC report destination {dest} of {report.domain} not checked: "
                    f"{answer.rcode}",
                    answer.describe(name, "TXT"),
                )
            elif not tagged_records(answer, "v=DMARC1"):
                report.add(
                    "dmarc-report-unauthorized",
                    WARN,
                    f"DMARC record of {report.domain} sends {tag}= reports to {dest}, which does "
                    f"not accept them: {name} holds no v=DMARC1 record, so receivers send no "
                    "reports there (RFC 7489 section 7.1)",
                    answer.describe(name, "TXT"),
                )


def check_tls_rpt(report: AuthReport, lookup: Lookup) -> None:
    name = f"_smtp._tls.{report.domain}"
    answer = lookup.txt(name)
    evidence = answer.describe(name, "TXT")
    records = tagged_records(answer, "v=TLSRPTv1")
    if answer.failed:
        report.add("dns-error", WARN, f"TLS-RPT of {report.domain} not checked", evidence)
    elif not records:
        report.add(
            "tls-rpt-missing",
            INFO,
            f"{report.domain} publishes no TLS-RPT record: nobody reports TLS failures "
            "delivering to it (RFC 8460)",
            evidence,
        )
    elif len(records) > 1:
        report.add(
            "tls-rpt-invalid",
            WARN,
            f"{name} holds {len(records)} TLS-RPT records (RFC 8460 section 3)",
            *records,
        )
    elif not re.match(r"(?i)(mailto:|https:)", record_tags(records[0]).get("rua", "")):
        report.add(
            "tls-rpt-invalid",
            WARN,
            f"TLS-RPT record of {report.domain} has no rua=mailto: or https: (RFC 8460 3)",
            records[0],
        )
    else:
        report.add("tls-rpt", INFO, f"TLS-RPT record of {report.domain} present", records[0])


def check_mx(report: AuthReport, lookup: Lookup) -> None:
    domain = report.domain
    answer = lookup.query(domain, "MX")
    evidence = answer.describe(domain, "MX")
    if answer.failed:
        report.add("dns-error", WARN, f"MX of {domain} not checked: {answer.rcode}", evidence)
        return
    exchanges: list[tuple[int, str]] = []
    for value in answer.values:
        preference, _, host = value.partition(" ")
        exchanges.append((int(preference) if preference.isdigit() else 0, host.rstrip(".")))
    exchanges.sort()
    if not exchanges:
        report.add(
            "mx-missing",
            WARN,
            f"{domain} has no MX record: bounces to it go to its address record, if any",
            evidence,
        )
        return
    if exchanges == [(0, "")]:
        report.add("mx-null", INFO, f"{domain} has a null MX: it receives no mail (RFC 7505)")
        return
    for _, host in exchanges[:_MX_HOSTS]:
        _check_mx_host(report, lookup, host, evidence)


def _check_mx_host(report: AuthReport, lookup: Lookup, host: str, evidence: str) -> None:
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        report.add(
            "mx-ip-literal",
            WARN,
            f"MX of {report.domain} is the address {host}, not a host name (RFC 5321 5.1)",
            evidence,
        )
        return
    cname = lookup.query(host, "CNAME")
    if cname.values:
        report.add(
            "mx-cname",
            WARN,
            f"MX host {host} is an alias (CNAME to {cname.values[0].rstrip('.')}); an MX must "
            "name a host directly (RFC 2181 section 10.3)",
            cname.describe(host, "CNAME"),
        )
    addresses: list[str] = []
    for rtype in ("A", "AAAA"):
        addresses += lookup.query(host, rtype).values
    if not addresses:
        report.add("mx-no-address", WARN, f"MX host {host} has no address", evidence)
        return
    report.add("mx", INFO, f"MX host {host} of {report.domain}: {', '.join(addresses)}")
    for address in addresses[:_ADDRESSES_PER_HOST]:
        _check_fcrdns(report, lookup, host, address)


def _check_fcrdns(report: AuthReport, lookup: Lookup, host: str, address: str) -> None:
    """Forward-confirmed reverse DNS: a PTR name of ``address`` resolves back to it."""
    reverse = dns.reversename.from_address(address).to_text().rstrip(".")
    ptr = lookup.query(reverse, "PTR")
    names = [v.rstrip(".") for v in ptr.values]
    if not names:
        report.add(
            "fcrdns-missing",
            WARN,
            f"MX host {host}: the address {address} has no PTR record (many receivers distrust "
            "a sender without reverse DNS)",
            ptr.describe(reverse, "PTR"),
        )
        return
    trail = [ptr.describe(reverse, "PTR")]
    for name in names[:3]:
        forward = lookup.query(name, "AAAA" if ":" in address else "A")
        trail.append(forward.describe(name, "AAAA" if ":" in address else "A"))
        if any(ipaddress.ip_address(v) == ipaddress.ip_address(address) for v in forward.values):
            report.add(
                "fcrdns",
                INFO,
                f"MX host {host}: {address} -> {name} -> {address} (forward-confirmed)",
                *trail,
            )
            return
    report.add(
        "fcrdns-mismatch",
        WARN,
        f"MX host {host}: the PTR name(s) of {address} ({', '.join(names)}) do not resolve "
        "back to it",
        *trail,
    )
