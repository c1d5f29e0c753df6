"""The sending domain's SPF record (RFC 7208): one record, valid syntax (section 12), at most
10 DNS-querying terms counted through include and redirect (sections 4.5, 4.6.4).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ._authdns import MAX_EVIDENCE_CHARS, Lookup, tagged_records
from ._net import FAIL, INFO, WARN
from ._posture import AuthReport

#: RFC 7208 section 4.6.4: at most 10 terms that cause DNS queries.
SPF_LOOKUP_LIMIT = 10

#: DNS queries one SPF evaluation may make here before the count stops (a loop or a huge tree).
_SPF_QUERY_BUDGET = 40


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
    records = tagged_records(answer, "v=spf1")
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


def check_spf(report: AuthReport, lookup: Lookup) -> None:
    domain = report.domain
    answer = lookup.txt(domain)
    evidence = answer.describe(domain, "TXT")
    if answer.failed:
        report.add("dns-error", WARN, f"SPF of {domain} not checked: {answer.rcode}", evidence)
        return
    records = tagged_records(answer, "v=spf1")
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
