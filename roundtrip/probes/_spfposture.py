"""The sending domain's SPF record (RFC 7208): one record (section 4.5), valid syntax
(section 12, macro-strings by section 7.1), at most 10 DNS-querying terms and at most 2 void
lookups counted through include and redirect (section 4.6.4), with the macros that do not
depend on the sender expanded (``_spfposture_macro``).

The walk is static: every term is counted, as the records publish them, where a receiver
stops at the first match (docs/auth-checks.md, section 3).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ._authdns import MAX_EVIDENCE_CHARS, Answer, Lookup, tagged_records
from ._net import FAIL, INFO, WARN
from ._posture import FINDING_CHECKS, AuthReport
from ._spfposture_macro import (
    MacroError,
    expand_domain,
    parse_domain_spec,
    parse_macro_string,
    sender_letters,
)

#: RFC 7208 section 4.6.4: at most 10 terms that cause DNS queries.
SPF_LOOKUP_LIMIT = 10

#: RFC 7208 section 4.6.4: an ``mx`` term whose domain has more MX hosts is a permerror.
SPF_MX_LIMIT = 10

#: RFC 7208 section 4.6.4: at most 2 "void lookups" (NXDOMAIN, or an answer without records).
SPF_VOID_LIMIT = 2

#: TXT queries one SPF walk may make here before the count stops (a loop or a huge tree).
_SPF_QUERY_BUDGET = 40

#: Queries for void lookups (A, AAAA, MX of the terms) one walk may make.
_VOID_QUERY_BUDGET = 60

#: RFC 7208 section 5: the mechanisms; those that cause DNS queries (section 4.6.4).
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_QUERYING = frozenset({"include", "a", "mx", "ptr", "exists"})

_TERM = re.compile(r"(?P<qualifier>[+\-~?]?)(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)(?P<rest>.*)")
_CIDR = re.compile(r"(?P<spec>.*?)(?:/(?P<four>0|[1-9]\d?))?(?://(?P<six>0|[1-9]\d{0,2}))?")

#: Networks at least this wide (prefix lengths at most these) in a term that passes are
#: reported as permissive, like ``+all``: an IPv4 /8 is 16,777,216 addresses, an IPv6 /16
#: 2**112; no domain sends mail from networks that wide.
_WIDE_PREFIX = {4: 8, 6: 16}

#: The client address families a receiver may evaluate the record for.
_FAMILIES = ("IPv4", "IPv6")


@dataclass(frozen=True)
class Term:
    """One term of an SPF record: a mechanism (``name`` lower case, ``arg`` its domain-spec
    or network, empty when absent) or a modifier (``name=arg``)."""

    text: str
    name: str
    arg: str
    modifier: bool


def parse_record(record: str) -> tuple[list[Term], list[str]]:
    """The terms of one SPF record and what is wrong with it (RFC 7208 section 12 grammar,
    with macro-strings checked by RFC 7208 section 7.1)."""
    terms: list[Term] = []
    problems: list[str] = []
    seen: set[str] = set()
    for text in record.split()[1:]:
        term, problem = _parse_term(text)
        if problem:
            problems.append(problem)
            continue
        assert term is not None
        terms.append(term)
        if term.modifier and term.name in ("redirect", "exp"):
            if term.name in seen:
                problems.append(f"{term.name}= appears twice (RFC 7208 section 6)")
            seen.add(term.name)
    return terms, problems


def _parse_term(text: str) -> tuple[Term | None, str]:
    match = _TERM.fullmatch(text)
    if match is None:
        return None, f"unknown term {text!r}"
    qualifier, name, rest = match.group("qualifier", "name", "rest")
    name = name.lower()
    if rest.startswith("=") and not qualifier:
        value = rest[1:]
        if name in ("redirect", "exp"):
            if not value:
                return None, f"{name}= has no domain"
            problem = _macro_problem(text, value, domain=True)
        else:  # unknown modifiers are ignored, but their value is a macro-string (section 6)
            problem = _macro_problem(text, value, domain=False)
        return (None, problem) if problem else (Term(text, name, value, True), "")
    if name not in _MECHANISMS or not (rest == "" or rest[0] in ":/"):
        return None, f"unknown term {text!r}"
    arg = rest[1:] if rest.startswith(":") else ""
    if name in ("ip4", "ip6"):
        version = 4 if name == "ip4" else 6
        try:
            network = ipaddress.ip_network(arg, strict=False) if arg else None
        except ValueError:
            network = None
        if network is None or network.version != version:
            return None, f"{text!r}: not an IPv{version} network"
        return Term(text, name, arg, False), ""
    if name == "all":
        return (Term(text, name, "", False), "") if not rest else (None, f"unknown term {text!r}")
    if name in ("a", "mx"):
        cidr = _CIDR.fullmatch(rest[1:] if rest.startswith(":") else rest)
        assert cidr is not None  # the lazy ``spec`` matches anything
        spec, four, six = cidr.group("spec", "four", "six")
        if (four and int(four) > 32) or (six and int(six) > 128) or (spec and "//" in spec):
            return None, f"{text!r}: bad CIDR length"
        if rest.startswith("/") and spec:
            return None, f"unknown term {text!r}"
        arg = spec
    elif rest.startswith("/"):
        return None, f"unknown term {text!r}"
    if rest.startswith(":") and not arg:
        return None, f"{text!r}: no domain after ':'"
    if name in ("include", "exists") and not arg:
        return None, f"{text!r} needs a domain (RFC 7208 section 5)"
    problem = _macro_problem(text, arg, domain=True) if arg else ""
    return (None, problem) if problem else (Term(text, name, arg, False), "")


def _macro_problem(text: str, value: str, *, domain: bool) -> str:
    try:
        parse_domain_spec(value) if domain else parse_macro_string(value, explain=True)
    except MacroError as exc:
        return f"{text!r}: {exc} (RFC 7208 section 7.1)"
    return ""


@dataclass
class SPFWalk:
    """What a walk through a domain's SPF record and everything it includes found.

    Attributes:
        lookups: DNS-querying terms (at least that many when the query budget ran out).
        void: per client address family, the terms whose query got NXDOMAIN or no records.
        permerrors: includes or redirects whose target has no SPF record (or several), and
            syntax errors in an included or redirected record: receivers return permerror
            for the whole record (RFC 7208 sections 5.2 and 6.1).
        problems: loops, queries that failed (receivers: temperror), a budget that ran out.
        permissive: terms reached with a pass result that let every host pass (``+all``) or
            a network of ``_WIDE_PREFIX`` or wider, through includes that pass and redirects.
        many_mx: ``mx`` terms whose domain has more than ``SPF_MX_LIMIT`` MX hosts.
        sender: terms whose target depends on the sender (counted as one lookup each).
        trail: the records read, as ``domain: record`` lines.
    """

    lookups: int = 0
    void: dict[str, list[str]] = field(default_factory=lambda: {f: [] for f in _FAMILIES})
    permerrors: list[str] = field(default_factory=list)
    many_mx: list[str] = field(default_factory=list)
    permissive: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sender: list[str] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)
    queries: int = 0
    void_queries: int = 0

    def worst_void(self) -> tuple[int, str]:
        """The most void lookups of one address family, and the families with that many
        (``IPv4``, ``IPv6``, ``IPv4 and IPv6``)."""
        most = max(len(terms) for terms in self.void.values())
        return most, " and ".join(f for f in _FAMILIES if len(self.void[f]) == most)


def spf_walk(domain: str, lookup: Lookup) -> SPFWalk:
    """Walk ``domain``'s SPF record through include and redirect (RFC 7208 section 4.6.4),
    counting the DNS-querying terms and the void lookups, expanding the macros that do not
    depend on the sender (``%{d}``, ``%{o}``)."""
    walk = SPFWalk()
    name = domain.lower().rstrip(".")
    _walk(name, lookup, walk, (), origin=name, via="", passes=True)
    return walk


def spf_lookup_count(domain: str, lookup: Lookup) -> tuple[int, list[str], list[str]]:
    """The DNS-querying terms of ``domain``'s SPF record, counted through include and
    redirect (RFC 7208 section 4.6.4).

    Returns:
        The count (at least that many when the query budget ran out), the problems found on
        the way (the permerrors first: an include without an SPF record; then the others: a
        loop), and the records read, as ``domain: record`` lines.
    """
    walk = spf_walk(domain, lookup)
    return walk.lookups, [*walk.permerrors, *walk.problems], walk.trail


def _void(answer: Answer) -> bool:
    """RFC 7208 section 4.6.4: a "void lookup" got NXDOMAIN or an answer without records."""
    return answer.rcode == "NXDOMAIN" or (answer.rcode == "NOERROR" and not answer.values)


def _walk(
    domain: str,
    lookup: Lookup,
    walk: SPFWalk,
    path: tuple[str, ...],
    *,
    origin: str,
    via: str,
    passes: bool,
) -> None:
    """Walk one record. ``passes``: a match in this record makes the top record pass (the
    top record itself, an include with a pass qualifier, a redirect: RFC 7208 sections 5.2
    and 6.1)."""
    if domain in path:
        walk.problems.append(f"loop: {' -> '.join((*path, domain))}")
        return
    if walk.queries >= _SPF_QUERY_BUDGET:
        walk.problems.append(f"stopped counting at {domain}: more than {_SPF_QUERY_BUDGET} queries")
        return
    walk.queries += 1
    answer = lookup.txt(domain)
    found = tagged_records(answer, "v=spf1")
    if path:  # the top record is judged by the caller
        if _void(answer):
            for family in _FAMILIES:
                walk.void[family].append(f"{path[-1]}: {via} ({answer.describe(domain, 'TXT')})")
        if answer.failed:
            walk.problems.append(f"{path[-1]}: {via}: {answer.rcode} (receivers: temperror)")
        elif len(found) != 1:
            what = "no SPF record" if not found else f"{len(found)} SPF records"
            walk.permerrors.append(f"{path[-1]} refers to {domain}, which has {what}")
    if len(found) != 1:
        return
    record = found[0]
    walk.trail.append(f"{domain}: {record}"[:MAX_EVIDENCE_CHARS])
    terms, problems = parse_record(record)
    if problems and path:
        walk.permerrors.append(
            f"{domain} (reached from {path[-1]}): {'; '.join(problems)} (RFC 7208 section 12)"
        )
    first_all = next(
        (n for n, t in enumerate(terms) if t.name == "all" and not t.modifier), len(terms)
    )
    has_all = first_all < len(terms)
    if passes:  # terms after the first ``all`` are never tested (RFC 7208 section 5.1)
        where = f"{domain} (reached from {path[-1]} by {via}): " if path else ""
        for term in terms[: first_all + 1]:
            wide = _permissive(term)
            if wide and where + wide not in walk.permissive:
                walk.permissive.append(where + wide)
    for index, term in enumerate(terms):
        if term.modifier:
            if term.name != "redirect" or has_all:  # RFC 7208 section 6.1
                continue
        elif term.name not in _QUERYING:
            continue
        walk.lookups += 1
        if term.name == "ptr":
            continue  # its queries depend on the client's address
        target = _target(term, domain, origin, walk)
        if not target:
            continue
        if term.name in ("include", "redirect"):
            follows = passes and (
                term.name == "redirect" or (index < first_all and _qualifier(term) == "+")
            )
            _walk(
                target, lookup, walk, (*path, domain), origin=origin, via=term.text, passes=follows
            )
        else:
            _void_check(term, target, domain, lookup, walk)


def _qualifier(term: Term) -> str:
    return term.text[0] if term.text[0] in "+-~?" else "+"


def _permissive(term: Term) -> str:
    """What a mechanism with a pass qualifier lets pass when that is every host or a network
    of ``_WIDE_PREFIX`` or wider (``ip4``, ``ip6``, and the CIDR lengths of ``a`` and ``mx``,
    RFC 7208 section 5.6); "" otherwise."""
    if term.modifier or _qualifier(term) != "+":
        return ""
    if term.name == "all":
        return f"{term.text} lets every host on the internet pass"
    if term.name in ("ip4", "ip6"):
        network = ipaddress.ip_network(term.arg, strict=False)
        lengths = {network.version: network.prefixlen}
    elif term.name in ("a", "mx"):
        cidr = _CIDR.fullmatch(term.text)
        assert cidr is not None
        four, six = cidr.group("four", "six")
        lengths = {4: int(four) if four else 32, 6: int(six) if six else 128}
    else:
        return ""
    wide = [
        f"every IPv{v} host"
        if n == 0
        else f"a /{n} of IPv{v} addresses ({2 ** ((32 if v == 4 else 128) - n):,})"
        for v, n in lengths.items()
        if n <= _WIDE_PREFIX[v]
    ]
    return f"{term.text} lets {' and '.join(wide)} pass" if wide else ""


def _target(term: Term, domain: str, origin: str, walk: SPFWalk) -> str:
    """The name ``term`` queries, or "" when it depends on the sender (noted in ``walk``)."""
    if not term.arg:
        return domain
    try:
        tokens = parse_domain_spec(term.arg)
    except MacroError:  # parse_record already reported it
        return ""
    letters = sender_letters(tokens)
    if letters:
        macros = ", ".join(f"%{{{letter}}}" for letter in letters)
        walk.sender.append(f"{domain}: {term.text} ({macros})")
        return ""
    return expand_domain(tokens, domain=domain, sender_domain=origin)


def _void_check(term: Term, target: str, domain: str, lookup: Lookup, walk: SPFWalk) -> None:
    """Ask what a receiver asks for an ``a``, ``mx`` or ``exists`` term (RFC 7208 sections
    5.3, 5.4, 5.7: ``a`` the address type of the client, ``exists`` always A)."""
    questions: list[tuple[str, tuple[str, ...]]]
    if term.name == "a":
        questions = [("A", ("IPv4",)), ("AAAA", ("IPv6",))]
    elif term.name == "mx":
        questions = [("MX", _FAMILIES)]
    else:
        questions = [("A", _FAMILIES)]
    for rtype, families in questions:
        if walk.void_queries >= _VOID_QUERY_BUDGET:
            if not any(p.startswith("void lookups") for p in walk.problems):
                walk.problems.append(
                    f"void lookups counted up to {_VOID_QUERY_BUDGET} queries, not beyond"
                )
            return
        walk.void_queries += 1
        answer = lookup.query(target, rtype)
        if answer.failed:
            walk.problems.append(f"{domain}: {term.text}: {target} {rtype}: {answer.rcode}")
        elif rtype == "MX" and len(answer.values) > SPF_MX_LIMIT:
            walk.many_mx.append(
                f"{domain}: {term.text} ({target} has {len(answer.values)} MX hosts)"
            )
        elif _void(answer):
            for family in families:
                walk.void[family].append(
                    f"{domain}: {term.text} ({answer.describe(target, rtype)})"
                )


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
    problems = parse_record(record)[1]
    report.add(
        "spf-syntax",
        FAIL if problems else INFO,
        f"SPF record of {domain}: "
        + ("; ".join(problems) + " (permerror, RFC 7208 section 12)" if problems else record),
        record,
    )
    if problems:
        return
    walk = spf_walk(domain, lookup)
    for wide in walk.permissive:
        report.add("spf-permissive", WARN, f"SPF of {domain}: {wide}", *walk.trail[:4])
    over = walk.lookups > SPF_LOOKUP_LIMIT
    void, family = walk.worst_void()
    report.add(
        "spf-lookups",
        FAIL if over or walk.many_mx else INFO,
        f"SPF of {domain} needs {walk.lookups} DNS lookups"
        + (
            f", above the limit of {SPF_LOOKUP_LIMIT}: receivers return permerror "
            "(RFC 7208 section 4.6.4)"
            if over
            else f" (limit {SPF_LOOKUP_LIMIT})"
        )
        + (f", {void} of them void for {family} clients" if void else "")
        + (
            f"; {', '.join(walk.many_mx)}: more than {SPF_MX_LIMIT} MX hosts for one mx term, "
            "receivers return permerror (RFC 7208 section 4.6.4)"
            if walk.many_mx
            else ""
        ),
        *walk.trail[:8],
    )
    _report_void(report, walk)
    for term in walk.sender:
        report.add(
            "spf-sender-dependent",
            INFO,
            f"SPF of {domain}: {term} depends on the sender: counted as one lookup, its "
            "target not followed (RFC 7208 section 7)",
            *walk.trail[:4],
        )
    for problem in walk.permerrors:
        report.add(
            "spf-include-permerror",
            FAIL,
            f"SPF of {domain}: {problem}: receivers return permerror for the whole record "
            "(RFC 7208 sections 5.2 and 6.1)",
            *walk.trail[:4],
        )
    for problem in walk.problems:
        report.add("spf-include", WARN, f"SPF of {domain}: {problem}", *walk.trail[:4])


def _report_void(report: AuthReport, walk: SPFWalk) -> None:
    """A failing ``spf-void-lookups`` above the limit; the check passes silently otherwise."""
    void, _ = walk.worst_void()
    if void <= SPF_VOID_LIMIT:
        report.checks[FINDING_CHECKS["spf-void-lookups"]] = True
        return
    over = [f for f in _FAMILIES if len(walk.void[f]) > SPF_VOID_LIMIT]
    worst = max(over, key=lambda f: len(walk.void[f]))
    report.add(
        "spf-void-lookups",
        FAIL,
        f"SPF of {report.domain} makes {void} void DNS lookups (NXDOMAIN or no records) for "
        f"{' and '.join(over)} clients, above the limit of {SPF_VOID_LIMIT}: receivers return "
        "permerror (RFC 7208 section 4.6.4)",
        *walk.void[worst][:8],
    )
