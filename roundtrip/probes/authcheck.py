"""E-mail authentication as the probe sees it: the receiver's verdicts, the delivered copy's
DKIM signatures, and the sending domain's published posture (issue #14, docs/auth-checks.md).

Three passes, each turning what it saw into ``Finding`` objects:

1. ``auth_results``: the receiving server's verdicts, read from the Authentication-Results
   field (RFC 8601) of the delivered copy. Only one field counts: the topmost whose
   authserv-id is the receiving host (the ``by`` of the topmost Received field), else one of
   the same organizational domain, else the topmost field (RFC 8601 section 5: fields from
   elsewhere may be forged; the finding says which rule picked it). ``authres`` parses it;
   the comments it drops (where verifiers write the DMARC policy applied) are read here.
2. ``verify_dkim``: every DKIM-Signature of the delivered copy verified by ``dkimpy`` (RFC
   6376, RFC 8463), with the keys looked up in the DNS the probe was given.
3. ``check_posture``: the sending domain's records: SPF (one record, plausible syntax, at most
   10 DNS-querying terms counted through include and redirect, RFC 7208 sections 4.5, 4.6.4
   and 12), DMARC at ``_dmarc.<domain>`` or its organizational domain (RFC 7489 section 6.6.3)
   and its policy, MTA-STS TXT (RFC 8461 section 3.1) and, when asked
   (``--mta-sts-policy``), the HTTPS policy it announces (RFC 8461 section 3.3), TLS-RPT
   (RFC 8460 section 3), MX host names (no CNAME: RFC 2181 section 10.3; no address literal:
   RFC 5321 section 5.1) and forward-confirmed reverse DNS of their addresses.

This module deliberately shares no code with the stack's SPF, DKIM and DMARC evaluation
(roundtrip/protocols/spf.py, dmarc.py): a bug there must not validate itself here. All DNS
goes through ``Lookup``: one given server (``--dns HOST:PORT``) or the system resolver.
A probe of a loopback target without ``--dns`` makes no DNS query at all, since the names of
a test world are not the internet's (``lookup_for``).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import authres  # type: ignore[import-untyped]
import dkim  # type: ignore[import-untyped]
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from ..config import Endpoint, parse_host_port
from ..errors import ConfigError
from ._net import FAIL, INFO, WARN, Finding

__all__ = [
    "AuthReport",
    "Lookup",
    "auth_results",
    "check_posture",
    "delivered_findings",
    "lookup_for",
    "parse_dns_server",
    "posture_skipped",
    "spf_lookup_count",
    "verify_dkim",
]

#: Characters of a header field kept as a finding's evidence.
MAX_EVIDENCE_CHARS = 300

#: RFC 7208 section 4.6.4: at most 10 terms that cause DNS queries.
SPF_LOOKUP_LIMIT = 10

#: DNS queries one SPF evaluation may make here before the count stops (a loop or a huge tree).
_SPF_QUERY_BUDGET = 40

#: MX hosts, and addresses per host, checked for forward-confirmed reverse DNS.
_MX_HOSTS = 5
_ADDRESSES_PER_HOST = 2

#: Results an Authentication-Results method reports that deserve a warning (RFC 8601 2.7).
_BAD_RESULTS = frozenset({"fail", "softfail", "permerror", "temperror", "hardfail"})

#: Bytes of an MTA-STS policy body read at most (RFC 8461 section 3.3: 64 KiB).
MAX_POLICY_BYTES = 64 * 1024

#: RFC 8461 section 3.2: ``max_age`` at most one year, in seconds.
_MAX_POLICY_AGE = 31557600

#: Failing findings and the check each one fails.
FINDING_CHECKS = {
    "spf-multiple": "sending domain has one SPF record",
    "spf-syntax": "sending domain's SPF record is valid",
    "spf-lookups": "sending domain's SPF within 10 DNS lookups",
}


def parse_dns_server(text: str) -> tuple[str, int]:
    """``--dns HOST[:PORT]`` (port 53 when absent; ``[v6]:port`` for IPv6).

    Raises:
        ConfigError: an empty host or a bad port.
    """
    host, port = parse_host_port(text, default_port=53, option="--dns", hint=" (an IP address)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--dns {text!r}: HOST must be an IP address") from None
    return host, port


# -- DNS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One DNS answer: ``rcode`` (``NOERROR``, ``NXDOMAIN``, ``SERVFAIL``, ``TIMEOUT``), the
    values of the asked type (TXT strings joined), and the CNAME target the name had."""

    rcode: str
    values: tuple[str, ...] = ()
    cname: str = ""

    @property
    def failed(self) -> bool:
        """The question was not answered (no answer is not the same as no records)."""
        return self.rcode not in ("NOERROR", "NXDOMAIN")

    def describe(self, name: str, rtype: str) -> str:
        shown = "; ".join(self.values) if self.values else self.rcode
        if self.rcode == "NOERROR" and not self.values:
            shown = "no records"
        return f"{name} {rtype}: {shown}"[:MAX_EVIDENCE_CHARS]


class Lookup:
    """DNS queries for the checks: to ``server`` (host, port) when given, else through the
    system resolver; each with ``timeout`` seconds in all."""

    def __init__(self, server: tuple[str, int] | None = None, *, timeout: float = 5.0) -> None:
        self.server = server
        if server is None:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # No /etc/resolv.conf: every question then fails, as a dns-error finding.
                self._resolver = dns.resolver.Resolver(configure=False)
        else:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [server[0]]
            self._resolver.port = server[1]
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout

    def __str__(self) -> str:
        if self.server is None:
            return "the system resolver"
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def query(self, name: str, rtype: str) -> Answer:
        try:
            answer = self._resolver.resolve(name, rtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer("NXDOMAIN")
        except dns.resolver.NoNameservers:
            return Answer("SERVFAIL")
        except dns.exception.Timeout:
            return Answer("TIMEOUT")
        except (dns.exception.DNSException, OSError) as exc:
            return Answer(type(exc).__name__)
        wanted = dns.rdatatype.from_text(rtype)
        values: list[str] = []
        cname = ""
        for rrset in answer.response.answer:
            if rrset.rdtype == dns.rdatatype.CNAME and not cname:
                cname = str(next(iter(rrset)).target).rstrip(".")
            if rrset.rdtype != wanted:
                continue
            for rdata in rrset:
                if wanted == dns.rdatatype.TXT:
                    values.append(b"".join(rdata.strings).decode("utf-8", "replace"))
                else:
                    values.append(rdata.to_text())
        return Answer("NOERROR", tuple(values), cname)

    def txt(self, name: str) -> Answer:
        return self.query(name, "TXT")

    def dkim_key(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the TXT record at ``name``, or None."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = self.txt(text.rstrip("."))
        if answer.failed:
            raise dkim.DnsTimeoutError(f"{answer.describe(text, 'TXT')} (via {self})")
        return answer.values[0].encode() if answer.values else None


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def lookup_for(
    dns_server: tuple[str, int] | None, target: Endpoint, *, timeout: float = 5.0
) -> Lookup | None:
    """The DNS the checks use: ``dns_server`` when given; else the system resolver, unless
    ``target`` is on loopback (a test world, whose domains are not looked up on the
    internet): then None, and the checks that need DNS say they did not run."""
    if dns_server is not None:
        return Lookup(dns_server, timeout=timeout)
    if _is_loopback(target.host):
        return None
    return Lookup(None, timeout=timeout)


# -- 1. the receiver's Authentication-Results --------------------------------------------------


def _split_head(raw: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = raw.find(sep)
        if idx >= 0:
            return raw[:idx]
    return raw


def _header_fields(raw: bytes, name: str) -> list[str]:
    """The values of every ``name`` field in the head, unfolded, top to bottom."""
    text = _split_head(raw).decode("utf-8", "replace")
    fields: list[str] = []
    current: str | None = None
    for line in re.split(r"\r?\n", text):
        if line[:1] in (" ", "\t") and current is not None:
            current += " " + line.strip()
            continue
        if current is not None:
            fields.append(current)
        key, sep, value = line.partition(":")
        current = value.strip() if sep and key.strip().lower() == name.lower() else None
    if current is not None:
        fields.append(current)
    return fields


@functools.cache
def _suffixes() -> Any:
    """The Public Suffix List, loaded once (about 90 ms), and only when first needed."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def _organizational(domain: str) -> str:
    """The organizational domain (RFC 7489 section 3.2: public suffix plus one label)."""
    name = domain.lower().rstrip(".")
    return str(_suffixes().privatesuffix(name) or name)


def _is_name(host: str) -> bool:
    """A host name (not empty, not an address literal)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return bool(host) and "." in host
    return False


#: The authserv-id put in front of a field that has none (Microsoft 365 writes such fields,
#: against RFC 8601 section 2.2), so that its results can still be read.
NO_AUTHSERV_ID = "(no authserv-id)"


def _parse_field(value: str) -> Any:
    """``authres``'s reading of one field, or the name of the error when it has none."""
    try:
        return authres.AuthenticationResultsHeader.parse_value(value)
    except (authres.AuthResError, ValueError, IndexError) as exc:
        error = type(exc).__name__
    if not re.match(r"\s*[A-Za-z][\w.-]*\s*=", value):
        return error
    try:
        header = authres.AuthenticationResultsHeader.parse_value("missing; " + value)
    except (authres.AuthResError, ValueError, IndexError):
        return error
    header.authserv_id = NO_AUTHSERV_ID
    return header


def _segments(value: str) -> list[str]:
    """``value`` split at the semicolons outside comments and quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted = 0, False
    for char in value:
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == ";" and not depth:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _comments(value: str) -> dict[str, list[str]]:
    """The comment right after each ``method=result`` of a field, per method, in order
    (``authres`` drops comments; OpenDMARC, Rspamd and Gmail put the policy applied in one)."""
    found: dict[str, list[str]] = {}
    for segment in _segments(value):
        match = re.match(r"\s*([A-Za-z][\w-]*)\s*=\s*[A-Za-z]+\s*(\(([^()]*)\))?", segment)
        if match:
            found.setdefault(match.group(1).lower(), []).append(
                " ".join((match.group(3) or "").split())
            )
    return found


def auth_results(raw: bytes, receiver: str) -> list[Finding]:
    """Findings for the receiving server's Authentication-Results in ``raw``.

    Args:
        raw: the delivered copy, as fetched.
        receiver: the receiving host (the ``by`` of the topmost Received field); empty or an
            address literal when unknown.

    Returns:
        An ``auth-results`` summary, then one finding per spf, dkim (each signature), dmarc and
        arc result (``warn`` for fail, softfail, permerror and temperror, with the field as
        evidence); ``auth-results-missing`` when no field was added.
    """
    parsed: list[tuple[str, Any]] = []
    unreadable: list[str] = []
    for value in _header_fields(raw, "Authentication-Results"):
        header = _parse_field(value)
        if isinstance(header, str):
            unreadable.append(f"{value[:MAX_EVIDENCE_CHARS]} ({header})")
        else:
            parsed.append((value, header))
    findings = [
        Finding(
            "auth-results-unreadable",
            WARN,
            "an Authentication-Results field does not parse (RFC 8601 section 2.2)",
            receiver,
            (line,),
        )
        for line in unreadable
    ]
    if not parsed:
        findings.append(
            Finding(
                "auth-results-missing",
                INFO,
                f"the receiving server ({receiver or 'unknown'}) added no Authentication-Results"
                " field: its SPF, DKIM and DMARC verdicts are not known",
                receiver,
            )
        )
        return findings
    known = _is_name(receiver)
    host = receiver.lower().rstrip(".")
    chosen, how = parsed[0], "the topmost field (receiving host unknown)"
    if known:
        exact = [p for p in parsed if str(p[1].authserv_id).lower().rstrip(".") == host]
        if exact:
            chosen, how = exact[0], f"the field of the receiving host {receiver}"
        else:
            org = _organizational(host)
            same_org = [
                p
                for p in parsed
                if _is_name(str(p[1].authserv_id)) and _organizational(str(p[1].authserv_id)) == org
            ]
            if same_org:
                chosen, how = same_org[0], f"the field of the receiving organization {org}"
            else:
                how = f"the topmost field: none names the receiving host {receiver}"
    value, header = chosen
    evidence = (f"Authentication-Results: {value}"[:MAX_EVIDENCE_CHARS],)
    authserv = str(header.authserv_id)
    results = [
        r for r in header.results if str(r.method).lower() in ("spf", "dkim", "dmarc", "arc")
    ]
    summary = ", ".join(f"{r.method}={r.result}" for r in header.results) or "no results"
    findings.append(
        Finding(
            "auth-results",
            INFO,
            f"Authentication-Results by {authserv} ({how}): {summary}",
            authserv,
            evidence,
        )
    )
    comments = _comments(value)
    for result in results:
        method, verdict = str(result.method).lower(), str(result.result).lower()
        details = [f"{p.type}.{p.name}={p.value}" for p in result.properties]
        if result.reason:
            details.insert(0, f"reason {result.reason!r}")
        comment = comments.get(method, [])
        if comment and comment[0]:
            details.insert(0, f"comment {comment[0]!r}")
        del comment[:1]
        text = f"{authserv}: {method}={verdict}" + (f" ({', '.join(details)})" if details else "")
        findings.append(
            Finding(
                f"auth-{method}",
                WARN if verdict in _BAD_RESULTS else INFO,
                text,
                authserv,
                evidence,
            )
        )
    return findings


# -- 2. the delivered copy's DKIM signatures ---------------------------------------------------


class _Notes:
    """A logger for dkimpy that keeps its error lines (why a verification returned False)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, msg: object, *args: object) -> None:
        self.errors.append(str(msg) % args if args else str(msg))

    def debug(self, *args: object) -> None:
        pass

    info = warning = debug


def _tags(signature: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in signature.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), "".join(value.split()))
    return tags


def verify_dkim(raw: bytes, lookup: Lookup | None) -> list[Finding]:
    """Verify every DKIM-Signature of ``raw`` with dkimpy: a ``dkim-verify`` info finding per
    signature that verifies, a ``dkim-verify-fail`` warning (with the reason and the
    signature as evidence) per one that does not; ``dkim-unsigned`` when there is none,
    ``dkim-verify-skipped`` when ``lookup`` is None."""
    signatures = _header_fields(raw, "DKIM-Signature")
    if not signatures:
        return [Finding("dkim-unsigned", INFO, "the delivered copy carries no DKIM signature")]
    if lookup is None:
        return [
            Finding(
                "dkim-verify-skipped",
                INFO,
                f"{len(signatures)} DKIM signature(s) not verified: a loopback target's "
                "domains are not looked up in the public DNS (give --dns HOST:PORT)",
            )
        ]
    findings: list[Finding] = []
    for index, signature in enumerate(signatures):
        tags = _tags(signature)
        label = f"d={tags.get('d', '?')} s={tags.get('s', '?')} ({tags.get('a', '?')})"
        notes = _Notes()
        try:
            verifier = dkim.DKIM(raw, logger=notes)
            ok = bool(verifier.verify(idx=index, dnsfunc=lookup.dkim_key))
            reason = "; ".join(notes.errors) or "the signature does not match"
        except dkim.DKIMException as exc:
            ok, reason = False, str(exc)
        if ok:
            findings.append(
                Finding(
                    "dkim-verify",
                    INFO,
                    f"DKIM signature {label} of the delivered copy verifies (key via {lookup})",
                    tags.get("d", ""),
                )
            )
        else:
            findings.append(
                Finding(
                    "dkim-verify-fail",
                    WARN,
                    f"DKIM signature {label} of the delivered copy does not verify: {reason}",
                    tags.get("d", ""),
                    (f"DKIM-Signature: {signature}"[:MAX_EVIDENCE_CHARS],),
                )
            )
    return findings


def delivered_findings(
    copies: Sequence[bytes],
    hops: Sequence[Any],
    *,
    target: Endpoint,
    dns_server: tuple[str, int] | None,
    timeout: float,
) -> list[Finding]:
    """Passes 1 and 2 for the first delivered copy; ``hops`` are the probe's parsed Received
    fields (oldest first: the last one is the receiving host's)."""
    if not copies:
        return []
    receiver = str(hops[-1].by) if hops else ""
    lookup = lookup_for(dns_server, target, timeout=min(timeout, 10.0))
    return auth_results(copies[0], receiver) + verify_dkim(copies[0], lookup)


# -- 3. the sending domain's posture -----------------------------------------------------------


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
        if code in FINDING_CHECKS:
            self.checks[FINDING_CHECKS[code]] = severity != FAIL

    def apply(self, result: Any) -> None:
        """Add the findings and checks to a ``ProbeResult``; a failed check fails it (with
        ``error_step`` ``AUTH`` when the round trip itself passed)."""
        result.findings.extend(self.findings)
        result.checks.update(self.checks)
        failed = [name for name, ok in self.checks.items() if not ok]
        if failed:
            result.ok = False
            if not result.error:
                failing = [f.message for f in self.findings if f.severity == FAIL]
                result.error = "sending domain checks failed: " + ", ".join(failed)
                if failing:
                    result.error += " (" + "; ".join(failing) + ")"
                result.error_step = "AUTH"

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


def _records(answer: Answer, version: str) -> list[str]:
    """The TXT values that start with the version tag ``version`` (``v=spf1``, ...)."""
    pattern = re.compile(rf"(?i)^\s*{re.escape(version)}(\s*;|\s|$)")
    return [v for v in answer.values if pattern.match(v)]


_SPF_DOMAIN_ARG = r"[^\s/]+"
_SPF_MECHANISM = re.compile(
    rf"(?i)^[+\-~?]?(?:all|include:{_SPF_DOMAIN_ARG}|exists:{_SPF_DOMAIN_ARG}"
    rf"|(?:a|mx)(?::{_SPF_DOMAIN_ARG})?(?:/\d{{1,2}})?(?://\d{{1,3}})?"
    rf"|ptr(?::{_SPF_DOMAIN_ARG})?|ip4:(?P<ip4>\S+)|ip6:(?P<ip6>\S+))$"
)
_SPF_MODIFIER = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)=(?P<value>\S*)$")
#: Terms that cause DNS queries (RFC 7208 section 4.6.4).
_SPF_QUERYING = ("include", "a", "mx", "ptr", "exists")


def _spf_syntax(record: str) -> list[str]:
    """What is wrong with one SPF record (RFC 7208 section 12 grammar, loosely; macros are
    taken as they come)."""
    problems: list[str] = []
    seen: set[str] = set()
    for term in record.split()[1:]:
        mechanism = _SPF_MECHANISM.match(term)
        if mechanism:
            for group, version in (("ip4", 4), ("ip6", 6)):
                network = mechanism.group(group)
                if network is None:
                    continue
                try:
                    parsed = ipaddress.ip_network(network, strict=False)
                except ValueError:
                    parsed = None
                if parsed is None or parsed.version != version:
                    problems.append(f"{term!r}: not an IPv{version} network")
            continue
        modifier = _SPF_MODIFIER.match(term)
        if modifier is None:
            problems.append(f"unknown term {term!r}")
            continue
        name = modifier.group("name").lower()
        if name in ("redirect", "exp"):
            if name in seen:
                problems.append(f"{name}= appears twice (RFC 7208 section 6)")
            if not modifier.group("value"):
                problems.append(f"{name}= has no domain")
            seen.add(name)
    return problems


@dataclass
class _SPFCount:
    lookups: int = 0
    queries: int = 0
    problems: list[str] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)


def spf_lookup_count(domain: str, lookup: Lookup) -> tuple[int, list[str], list[str]]:
    """The DNS-querying terms of ``domain``'s SPF record, counted through include and
    redirect (RFC 7208 section 4.6.4).

    Returns:
        The count (at least that many when the query budget ran out), the problems found on
        the way (an include without an SPF record, a loop), and the records read, as
        ``domain: record`` lines.
    """
    count = _SPFCount()
    _count_spf(domain.lower().rstrip("."), lookup, count, ())
    return count.lookups, count.problems, count.trail


def _count_spf(domain: str, lookup: Lookup, count: _SPFCount, path: tuple[str, ...]) -> None:
    if domain in path:
        count.problems.append(f"loop: {' -> '.join((*path, domain))}")
        return
    if count.queries >= _SPF_QUERY_BUDGET:
        count.problems.append(
            f"stopped counting at {domain}: more than {_SPF_QUERY_BUDGET} queries"
        )
        return
    count.queries += 1
    answer = lookup.txt(domain)
    records = _records(answer, "v=spf1")
    if len(records) != 1:
        if path:  # the top record was judged by the caller
            what = "no SPF record" if not records else f"{len(records)} SPF records"
            count.problems.append(f"{path[-1]} refers to {domain}, which has {what} (permerror)")
        return
    record = records[0]
    count.trail.append(f"{domain}: {record}"[:MAX_EVIDENCE_CHARS])
    terms = [t.lower() for t in record.split()[1:]]
    has_all = any(re.fullmatch(r"[+\-~?]?all", t) for t in terms)
    for term in terms:
        name, _, target = term.lstrip("+-~?").partition(":")
        name = name.split("/")[0]
        if name in _SPF_QUERYING:
            count.lookups += 1
            if name == "include" and target and "%" not in target:
                _count_spf(target.rstrip("."), lookup, count, (*path, domain))
        elif term.startswith("redirect=") and not has_all:  # RFC 7208 section 6.1
            count.lookups += 1
            target = term.partition("=")[2]
            if target and "%" not in target:
                _count_spf(target.rstrip("."), lookup, count, (*path, domain))


def _check_spf(report: AuthReport, lookup: Lookup) -> None:
    domain = report.domain
    answer = lookup.txt(domain)
    evidence = answer.describe(domain, "TXT")
    if answer.failed:
        report.add("dns-error", WARN, f"SPF of {domain} not checked: {answer.rcode}", evidence)
        return
    records = _records(answer, "v=spf1")
    if not records:
        report.add(
            "spf-missing",
            WARN,
            f"{domain} publishes no SPF record: receivers get spf=none for its mail",
            evidence,
        )
        return
    if len(records) > 1:
        report.add(
            "spf-multiple",
            FAIL,
            f"{domain} publishes {len(records)} SPF records: receivers return permerror "
            "(RFC 7208 section 4.5)",
            *records,
        )
        return
    record = records[0]
    problems = _spf_syntax(record)
    report.add(
        "spf-syntax",
        FAIL if problems else INFO,
        f"SPF record of {domain}: "
        + ("; ".join(problems) + " (permerror, RFC 7208 section 12)" if problems else record),
        record,
    )
    if problems:
        return
    if re.search(r"(?i)(^|\s)\+?all(\s|$)", record):
        report.add(
            "spf-permissive",
            WARN,
            f"SPF record of {domain} ends in +all: every host on the internet passes",
            record,
        )
    lookups, trouble, trail = spf_lookup_count(domain, lookup)
    over = lookups > SPF_LOOKUP_LIMIT
    report.add(
        "spf-lookups",
        FAIL if over else INFO,
        f"SPF of {domain} needs {lookups} DNS lookups"
        + (
            f", above the limit of {SPF_LOOKUP_LIMIT}: receivers return permerror "
            "(RFC 7208 section 4.6.4)"
            if over
            else f" (limit {SPF_LOOKUP_LIMIT})"
        ),
        *trail[:8],
    )
    for problem in trouble:
        report.add("spf-include", WARN, f"SPF of {domain}: {problem}", *trail[:4])


def _dmarc_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _check_dmarc(report: AuthReport, lookup: Lookup) -> None:
    domain = report.domain
    org = _organizational(domain)
    names = [f"_dmarc.{domain}"] + ([f"_dmarc.{org}"] if org != domain else [])
    tried: list[str] = []
    for name in names:
        answer = lookup.txt(name)
        tried.append(answer.describe(name, "TXT"))
        if answer.failed:
            report.add("dns-error", WARN, f"DMARC of {domain} not checked: {answer.rcode}", *tried)
            return
        records = _records(answer, "v=DMARC1")
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
        tags = _dmarc_tags(records[0])
        policy = tags.get("p", "").lower()
        if name != f"_dmarc.{domain}" and tags.get("sp"):
            policy = tags["sp"].lower()  # a subdomain's policy (RFC 7489 section 6.3)
        where = "" if name == f"_dmarc.{domain}" else f" (from the organizational domain {org})"
        if policy not in ("none", "quarantine", "reject"):
            report.add(
                "dmarc-invalid",
                WARN,
                f"DMARC record of {domain}{where} has no valid policy (p={policy or 'missing'})",
                records[0],
            )
        elif policy == "none":
            report.add(
                "dmarc-none",
                WARN,
                f"DMARC policy of {domain}{where} is p=none: receivers only monitor, "
                "spoofed mail is not refused",
                records[0],
            )
        else:
            pct = tags.get("pct", "100")
            report.add(
                "dmarc",
                INFO,
                f"DMARC policy of {domain}{where}: p={policy}"
                + ("" if pct == "100" else f" for {pct}% of failing mail"),
                records[0],
            )
        return
    report.add(
        "dmarc-missing",
        WARN,
        f"{domain} publishes no DMARC record: receivers apply no policy to mail forging it",
        *tried,
    )


def _check_mta_sts(
    report: AuthReport,
    lookup: Lookup,
    policy: tuple[ssl.SSLContext, int, float] | None,
) -> None:
    name = f"_mta-sts.{report.domain}"
    answer = lookup.txt(name)
    evidence = answer.describe(name, "TXT")
    records = _records(answer, "v=STSv1")
    if answer.failed:
        report.add("dns-error", WARN, f"MTA-STS of {report.domain} not checked", evidence)
    elif not records:
        report.add(
            "mta-sts-missing",
            INFO,
            f"{report.domain} publishes no MTA-STS record: senders may deliver to it without "
            "TLS (RFC 8461)",
            evidence,
        )
    elif len(records) > 1:
        report.add(
            "mta-sts-invalid",
            WARN,
            f"{name} holds {len(records)} MTA-STS records: senders ignore them (RFC 8461 3.1)",
            *records,
        )
    elif not re.fullmatch(r"[A-Za-z0-9]{1,32}", _dmarc_tags(records[0]).get("id", "")):
        report.add(
            "mta-sts-invalid",
            WARN,
            f"MTA-STS record of {report.domain} has no valid id= (1-32 letters and digits, "
            "RFC 8461 section 3.1)",
            records[0],
        )
    else:
        fetched = "" if policy is not None else " (the HTTPS policy is not fetched)"
        report.add(
            "mta-sts", INFO, f"MTA-STS record of {report.domain} present{fetched}", records[0]
        )
        if policy is not None:
            _check_mta_sts_policy(report, lookup, *policy)


def _fetch_policy(
    host: str, lookup: Lookup, context: ssl.SSLContext, port: int, timeout: float
) -> tuple[str, str]:
    """GET the MTA-STS policy from ``host`` (RFC 8461 section 3.3): (body, "") or
    ("", what went wrong). The address comes from ``lookup``, the certificate must name
    ``host``, redirects are not followed."""
    addresses = [*lookup.query(host, "A").values, *lookup.query(host, "AAAA").values]
    if not addresses:
        return "", f"{host} has no address"
    request = (
        f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: roundtrip-probe\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        with (
            socket.create_connection((addresses[0], port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(request)
            response = http.client.HTTPResponse(tls)
            try:
                response.begin()
                body = response.read(MAX_POLICY_BYTES + 1)
            finally:
                response.close()
    except (OSError, http.client.HTTPException) as exc:
        # ssl.SSLError and TimeoutError are OSErrors: one place for every way a fetch fails.
        return "", f"https://{host}:{port}/.well-known/mta-sts.txt: {type(exc).__name__}: {exc}"
    where = f"https://{host}:{port}/.well-known/mta-sts.txt"
    if response.status != 200:
        return "", f"{where}: HTTP {response.status} {response.reason} (redirects are not followed)"
    kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if kind != "text/plain":
        return "", f"{where}: Content-Type {kind or 'missing'}, expected text/plain"
    if len(body) > MAX_POLICY_BYTES:
        return "", f"{where}: the policy is larger than {MAX_POLICY_BYTES} bytes"
    return body.decode("utf-8", "replace"), ""


def _mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: a ``*.`` pattern matches exactly one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return pattern == host


def _check_mta_sts_policy(
    report: AuthReport, lookup: Lookup, context: ssl.SSLContext, port: int, timeout: float
) -> None:
    host = f"mta-sts.{report.domain}"
    body, error = _fetch_policy(host, lookup, context, port, timeout)
    if error:
        report.add(
            "mta-sts-policy-unreachable",
            WARN,
            f"the MTA-STS policy of {report.domain} cannot be fetched: senders apply none "
            "(RFC 8461 section 3.3)",
            error[:MAX_EVIDENCE_CHARS],
        )
        return
    fields: dict[str, list[str]] = {}
    for line in re.split(r"\r?\n", body):
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    version, mode = fields.get("version", [""])[0], fields.get("mode", [""])[0]
    age, patterns = fields.get("max_age", [""])[0], fields.get("mx", [])
    problems = []
    if version != "STSv1":
        problems.append(f"version {version or 'missing'} (expected STSv1)")
    if mode not in ("enforce", "testing", "none"):
        problems.append(f"mode {mode or 'missing'}")
    if not age.isdigit() or int(age) > _MAX_POLICY_AGE:
        problems.append(f"max_age {age or 'missing'}")
    if mode != "none" and not patterns:
        problems.append("no mx")
    evidence = " | ".join(line for line in re.split(r"\r?\n", body) if line.strip())
    if problems:
        report.add(
            "mta-sts-policy-invalid",
            WARN,
            f"the MTA-STS policy of {report.domain} is invalid: {', '.join(problems)} "
            "(RFC 8461 section 3.2)",
            evidence[:MAX_EVIDENCE_CHARS],
        )
        return
    report.add(
        "mta-sts-policy",
        INFO,
        f"MTA-STS policy of {report.domain}: mode {mode}, max_age {age}, mx {', '.join(patterns)}",
        evidence[:MAX_EVIDENCE_CHARS],
    )
    if mode == "none":
        return
    mx = lookup.query(report.domain, "MX")
    hosts = [v.partition(" ")[2].rstrip(".") for v in mx.values]
    strays = [h for h in hosts if h and not any(_mx_matches(p, h) for p in patterns)]
    if strays:
        report.add(
            "mta-sts-mx-mismatch",
            WARN,
            f"MX host(s) {', '.join(strays)} of {report.domain} match no mx of its MTA-STS "
            f"policy: senders that {'enforce it refuse' if mode == 'enforce' else 'test it report'}"
            " delivery to them (RFC 8461 section 4.1)",
            mx.describe(report.domain, "MX"),
            evidence[:MAX_EVIDENCE_CHARS],
        )


def _check_tls_rpt(report: AuthReport, lookup: Lookup) -> None:
    name = f"_smtp._tls.{report.domain}"
    answer = lookup.txt(name)
    evidence = answer.describe(name, "TXT")
    records = _records(answer, "v=TLSRPTv1")
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
    elif not re.match(r"(?i)(mailto:|https:)", _dmarc_tags(records[0]).get("rua", "")):
        report.add(
            "tls-rpt-invalid",
            WARN,
            f"TLS-RPT record of {report.domain} has no rua=mailto: or https: (RFC 8460 3)",
            records[0],
        )
    else:
        report.add("tls-rpt", INFO, f"TLS-RPT record of {report.domain} present", records[0])


def _check_mx(report: AuthReport, lookup: Lookup) -> None:
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


def check_posture(
    domain: str,
    lookup: Lookup,
    *,
    mta_sts_policy: tuple[ssl.SSLContext, int, float] | None = None,
) -> AuthReport:
    """The sending domain's SPF, DMARC, MTA-STS, TLS-RPT and MX posture (pass 3).

    Args:
        domain: the domain of the probe's sender (From and MAIL FROM).
        lookup: where to ask.
        mta_sts_policy: (TLS context, port, timeout) to also fetch the MTA-STS policy over
            HTTPS (port 443 in the world; another for a test server); None: the TXT only.

    Returns:
        The findings, with a severity each, and the checks failed by SPF permerrors.
    """
    report = AuthReport(domain.lower().rstrip("."))
    _check_spf(report, lookup)
    _check_dmarc(report, lookup)
    _check_mta_sts(report, lookup, mta_sts_policy)
    _check_tls_rpt(report, lookup)
    _check_mx(report, lookup)
    return report


def posture_skipped(domain: str, target: Endpoint) -> Finding:
    """The info finding that says why the posture checks of ``domain`` did not run."""
    why = (
        "the probe's sender has no domain"
        if not domain
        else f"{target.host} is on loopback, and a test world's domains are not looked up in "
        "the public DNS (give --dns HOST:PORT)"
    )
    return Finding(
        "posture-skipped", INFO, f"sending domain checks of {domain or '?'} skipped: {why}"
    )
