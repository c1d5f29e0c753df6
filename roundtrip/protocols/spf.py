"""SPF evaluation (RFC 7208): may this address send mail for this domain?

Theory of operation. :func:`check_host` is the RFC's function of the same name (section 4):
it takes the connecting address, the domain to check and the sender, and asks a look-up
function the caller passes (:data:`Lookup`) for every DNS answer it needs, so this module
does no I/O; the stack answers from its own DNS zone in memory (``roundtrip/stack/_auth.py``),
and a caller with a resolver could answer from the world. :func:`check` picks the identity
the way an MX does (section 2.4): the MAIL FROM domain, or ``postmaster@<HELO>`` when MAIL
FROM is empty.

What is evaluated, in order (section 4.4 to 4.6): the TXT records starting ``v=spf1`` (none:
``none``; two: ``permerror``), the whole record parsed before anything is looked up (one
syntax error anywhere is ``permerror``), then each directive left to right with its
qualifier (``+`` pass, ``-`` fail, ``~`` softfail, ``?`` neutral), then ``redirect=`` if no
``all`` is in the record, else ``neutral``. Macros (section 7) expand the letters s l o d i
h v p, with digit and ``r`` transformers and delimiters; c, r and t belong to ``exp=`` only.

Limits (section 4.6.4): at most 10 terms that query the DNS (include, a, mx, ptr, exists,
redirect) across the whole evaluation, includes and redirects counted in, and at most 2
"void" look-ups (NXDOMAIN or no answer); each ``mx`` may name at most 10 hosts. Past a
limit the result is ``permerror``; an include loop ends there too. A DNS failure is
``temperror``.

Deliberately unsupported: ``ptr`` never matches (section 5.5: it SHOULD NOT be used, and the
stack serves no reverse zones; it still counts as a look-up), ``exp=`` is parsed and ignored
(the explanation only ever feeds a rejection text), and no HELO check is made when MAIL FROM
is present (section 2.3 leaves it optional). pyspf, the usual Python implementation, has had
no release since 2020 and does its own DNS I/O, hence this module.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

__all__ = [
    "DNS_LOOKUP_LIMIT",
    "VOID_LOOKUP_LIMIT",
    "DNSAnswer",
    "Lookup",
    "SPFResult",
    "check",
    "check_host",
    "dns_answer",
    "dns_query",
    "quote_value",
    "resinfo",
]

#: RFC 7208 section 4.6.4: terms that cause DNS queries, per evaluation.
DNS_LOOKUP_LIMIT = 10
#: RFC 7208 section 4.6.4: look-ups that return no answer or NXDOMAIN, per evaluation.
VOID_LOOKUP_LIMIT = 2
#: RFC 7208 section 4.6.4: host names one ``mx`` mechanism may name (and address look-ups).
MX_NAME_LIMIT = 10

Result = Literal["none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"]
RecordType = Literal["A", "AAAA", "MX", "TXT", "PTR"]


@dataclass(frozen=True, slots=True)
class DNSAnswer:
    """What the DNS said for one name and type.

    Attributes:
        status: ``found`` (``records`` holds at least one), ``missing`` (NXDOMAIN, or no
            record of that type: both "void" in RFC 7208 section 4.6.4), ``error`` (any other
            rcode, or no reply).
        records: the records as text: an address (A, AAAA), an exchange name without the
            trailing dot (MX), the strings of one TXT record joined.
    """

    status: Literal["found", "missing", "error"]
    records: tuple[str, ...] = ()


#: Answers ``(name, type)``; never raises.
Lookup = Callable[[str, RecordType], DNSAnswer]


@dataclass(frozen=True, slots=True)
class SPFResult:
    """The outcome of one SPF check.

    Attributes:
        result: an RFC 7208 section 2.6 result.
        reason: why, for anything but ``pass`` (the mechanism, the record error, the limit).
        domain: the domain checked (the MAIL FROM or HELO domain; ``""`` if there was none).
        scope: ``mailfrom`` or ``helo``: which identity ``domain`` came from.
    """

    result: Result
    reason: str = ""
    domain: str = ""
    scope: Literal["mailfrom", "helo"] = "mailfrom"


class _StopError(Exception):
    """Ends the evaluation with ``result`` (permerror, temperror)."""

    def __init__(self, result: Result, reason: str) -> None:
        super().__init__(reason)
        self.result: Result = result
        self.reason = reason


# Record grammar (RFC 7208 section 12)

_QUALIFIERS: dict[str, Result] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_LOOKUP_TERMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)\Z", re.DOTALL)
_DIRECTIVE = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9\-_.]*)(.*)\Z", re.DOTALL)
_CIDR4 = r"(?:/(0|[1-9][0-9]?))"
_CIDR6 = r"(?://(0|[1-9][0-9]{0,2}))"
_DUAL_CIDR = re.compile(rf"{_CIDR4}?{_CIDR6}?\Z")
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)(r?)([.\-+,/_=]*)\}|(.)|\Z)")


@dataclass(frozen=True, slots=True)
class _Directive:
    qualifier: Result
    name: str
    domain_spec: str = ""  # include, a, mx, ptr, exists
    network: str = ""  # ip4, ip6
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True, slots=True)
class _Record:
    directives: tuple[_Directive, ...]
    redirect: str | None


def _parse(text: str) -> _Record:
    """Parse a whole ``v=spf1`` record; any syntax error raises permerror (section 4.6)."""
    terms = text.split(" ")[1:]
    directives: list[_Directive] = []
    redirect: str | None = None
    exp_seen = False
    for term in terms:
        if not term:
            continue
        modifier = _MODIFIER.match(term)
        if modifier and modifier.group(1).lower() not in _MECHANISMS:
            name, value = modifier.group(1).lower(), modifier.group(2)
            _check_macro_string(value, term)
            if name == "redirect":
                if redirect is not None:
                    raise _StopError("permerror", "two redirect= modifiers")
                _check_domain_spec(value, term)
                redirect = value
            elif name == "exp":
                if exp_seen:
                    raise _StopError("permerror", "two exp= modifiers")
                exp_seen = True
            continue  # section 6: unknown modifiers are ignored
        directives.append(_directive(term))
    return _Record(tuple(directives), redirect)


def _directive(term: str) -> _Directive:
    match = _DIRECTIVE.match(term)
    if match is None:
        raise _StopError("permerror", f"unknown term {term!r}")
    qualifier = _QUALIFIERS[match.group(1) or "+"]
    name, rest = match.group(2).lower(), match.group(3)
    if name not in _MECHANISMS:
        raise _StopError("permerror", f"unknown mechanism {term!r}")
    if name == "all":
        if rest:
            raise _StopError("permerror", f"bad term {term!r}")
        return _Directive(qualifier, name)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _StopError("permerror", f"{name} without a network in {term!r}")
        return _network(qualifier, name, rest[1:], term)
    if name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise _StopError("permerror", f"{name} without a domain in {term!r}")
        _check_domain_spec(rest[1:], term)
        return _Directive(qualifier, name, domain_spec=rest[1:])
    # a, mx, ptr: [":" domain-spec] [dual-cidr] (ptr takes no cidr)
    domain_spec = ""
    cidr_text = rest
    if rest.startswith(":"):
        split = re.search(rf"{_CIDR4}?{_CIDR6}?\Z", rest)
        start = split.start() if split else len(rest)
        domain_spec, cidr_text = rest[1:start], rest[start:]
        if not domain_spec:
            raise _StopError("permerror", f"empty domain in {term!r}")
        _check_domain_spec(domain_spec, term)
    cidr = _DUAL_CIDR.match(cidr_text)
    if cidr is None or (name == "ptr" and cidr_text):
        raise _StopError("permerror", f"bad term {term!r}")
    cidr4 = int(cidr.group(1)) if cidr.group(1) else 32
    cidr6 = int(cidr.group(2)) if cidr.group(2) else 128
    if cidr4 > 32 or cidr6 > 128:
        raise _StopError("permerror", f"prefix length out of range in {term!r}")
    return _Directive(qualifier, name, domain_spec=domain_spec, cidr4=cidr4, cidr6=cidr6)


def _network(qualifier: Result, name: str, value: str, term: str) -> _Directive:
    address, _, length = value.partition("/")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise _StopError("permerror", f"bad address in {term!r}") from None
    limit = 32 if name == "ip4" else 128
    if parsed.version != (4 if name == "ip4" else 6):
        raise _StopError("permerror", f"bad address in {term!r}")
    if "/" in value and not re.fullmatch(r"0|[1-9][0-9]{0,2}", length):
        raise _StopError("permerror", f"bad prefix length in {term!r}")
    prefix = int(length) if length else limit
    if prefix > limit:
        raise _StopError("permerror", f"prefix length out of range in {term!r}")
    return _Directive(qualifier, name, network=f"{parsed}/{prefix}")


def _check_macro_string(text: str, term: str) -> None:
    for match in _MACRO.finditer(text):
        if match.group(0) == "%" or (match.group(5) and match.group(5) not in "%_-"):
            raise _StopError("permerror", f"bad macro in {term!r}")
        letter = match.group(1)
        if letter and letter.lower() not in "slodiphcrtv":
            raise _StopError("permerror", f"unknown macro letter in {term!r}")
    if any(c <= " " or c > "~" for c in text):
        raise _StopError("permerror", f"bad character in {term!r}")


def _check_domain_spec(text: str, term: str) -> None:
    _check_macro_string(text, term)
    if "%" in text:
        return  # section 7.1: a domain-spec ending in a macro-expand needs no toplabel
    toplabel = text.rstrip(".").rpartition(".")[2]
    if (
        "." not in text.rstrip(".")
        or not re.fullmatch(
            r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9]", toplabel
        )
        or toplabel.isdigit()
    ):
        raise _StopError("permerror", f"bad domain in {term!r}")


# Evaluation (RFC 7208 section 4 and 5)


class _Evaluation:
    """One check_host() with its look-up counters, shared by nested includes."""

    def __init__(
        self,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        sender: str,
        helo: str,
        lookup: Lookup,
    ) -> None:
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self._lookup = lookup
        self.lookups = 0
        self.voids = 0

    def count_term(self, what: str) -> None:
        self.lookups += 1
        if self.lookups > DNS_LOOKUP_LIMIT:
            raise _StopError("permerror", f"more than {DNS_LOOKUP_LIMIT} DNS look-ups ({what})")

    def query(self, name: str, rtype: RecordType) -> DNSAnswer:
        answer = self._lookup(name, rtype)
        if answer.status == "error":
            raise _StopError("temperror", f"DNS failure for {name} {rtype}")
        if answer.status == "missing" or not answer.records:
            self.voids += 1
            if self.voids > VOID_LOOKUP_LIMIT:
                raise _StopError("permerror", f"more than {VOID_LOOKUP_LIMIT} void look-ups")
            return DNSAnswer("missing")
        return answer

    def record(self, domain: str) -> _Record | None:
        """The domain's SPF record, None when it has none (section 4.5)."""
        answer = self._lookup(domain, "TXT")
        if answer.status == "error":
            raise _StopError("temperror", f"DNS failure for {domain} TXT")
        spf = [r for r in answer.records if re.match(r"(?i)v=spf1(?: |\Z)", r)]
        if not spf:
            return None
        if len(spf) > 1:
            raise _StopError("permerror", f"{len(spf)} SPF records for {domain}")
        return _parse(spf[0])

    def check_host(self, domain: str) -> tuple[Result, str]:
        record = self.record(domain)
        if record is None:
            return "none", f"no SPF record for {domain}"
        for directive in record.directives:
            if directive.name in _LOOKUP_TERMS:
                self.count_term(directive.name)
            if self.matches(directive, domain):
                return directive.qualifier, f"matched {directive.name} in {domain}"
        has_all = any(d.name == "all" for d in record.directives)
        if record.redirect is not None and not has_all:
            self.count_term("redirect")
            target = self.expand(record.redirect, domain)
            result, reason = self.check_host(target)
            if result == "none":  # section 6.1
                return "permerror", f"redirect to {target}, which has no SPF record"
            return result, reason
        return "neutral", f"nothing matched in {domain}"

    def matches(self, directive: _Directive, domain: str) -> bool:
        name = directive.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            return self.ip in ipaddress.ip_network(directive.network, strict=False)
        target = self.expand(directive.domain_spec, domain) if directive.domain_spec else domain
        if name == "include":
            result, reason = self.check_host(target)
            if result in ("temperror", "permerror"):
                raise _StopError(result, reason)
            if result == "none":  # section 5.2
                raise _StopError("permerror", f"include of {target}, which has no SPF record")
            return result == "pass"
        if name == "exists":
            return self.query(target, "A").status == "found"
        if name == "ptr":
            return False  # section 5.5: SHOULD NOT be used; no reverse zones here
        if name == "a":
            return self.address_match(target, directive)
        # mx (section 5.4)
        exchanges = self.query(target, "MX").records
        if len(exchanges) > MX_NAME_LIMIT:
            raise _StopError("permerror", f"{target} names more than {MX_NAME_LIMIT} MX hosts")
        return any(self.address_match(host, directive) for host in exchanges)

    def address_match(self, host: str, directive: _Directive) -> bool:
        rtype: RecordType = "A" if self.ip.version == 4 else "AAAA"
        prefix = directive.cidr4 if self.ip.version == 4 else directive.cidr6
        for address in self.query(host, rtype).records:
            try:
                network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            except ValueError:
                continue
            if self.ip in network:
                return True
        return False

    def expand(self, spec: str, domain: str) -> str:
        """A domain-spec with its macros expanded (section 7), cut to 253 octets."""
        local, _, sender_domain = self.sender.rpartition("@")

        def letter_value(letter: str) -> str:
            letter = letter.lower()
            if letter == "s":
                return self.sender
            if letter == "l":
                return local or "postmaster"
            if letter == "o":
                return sender_domain
            if letter == "d":
                return domain
            if letter == "i":
                if self.ip.version == 4:
                    return str(self.ip)
                return ".".join(self.ip.exploded.replace(":", ""))
            if letter == "h":
                return self.helo
            if letter == "v":
                return "in-addr" if self.ip.version == 4 else "ip6"
            if letter == "p":
                return "unknown"  # section 7.3: validating ptr is discouraged
            raise _StopError("permerror", f"macro %{{{letter}}} outside exp=")

        def replace(match: re.Match[str]) -> str:
            if match.group(5) is not None:
                return {"%": "%", "_": " ", "-": "%20"}[match.group(5)]
            if match.group(1) is None:
                raise _StopError("permerror", f"bad macro in {spec!r}")
            value = letter_value(match.group(1))
            delimiters = match.group(4) or "."
            parts = re.split("[" + re.escape(delimiters) + "]", value)
            if match.group(3):
                parts.reverse()
            if match.group(2):
                keep = int(match.group(2))
                if keep == 0:
                    raise _StopError("permerror", f"macro keeps zero labels in {spec!r}")
                parts = parts[-keep:]
            out = ".".join(parts)
            if match.group(1).isupper():
                out = urllib.parse.quote(out, safe="")
            return out

        expanded = _MACRO.sub(replace, spec).rstrip(".")
        while len(expanded) > 253 and "." in expanded:  # section 7.3
            expanded = expanded.partition(".")[2]
        return expanded


def _valid_domain(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    return len(labels) > 1 and len(domain) <= 253 and all(0 < len(label) <= 63 for label in labels)


def check_host(ip: str, domain: str, sender: str, lookup: Lookup, *, helo: str = "") -> SPFResult:
    """RFC 7208's check_host(): may ``ip`` send for ``domain``?

    Args:
        ip: the connecting address (IPv4, IPv6, or IPv4-mapped IPv6).
        domain: the domain whose record is evaluated.
        sender: the MAIL FROM address (``postmaster@<helo>`` when it was empty).
        lookup: answers DNS questions; see :data:`Lookup`.
        helo: the HELO name, for the ``%{h}`` macro.

    Returns:
        The result; never raises for anything in the DNS.
    """
    domain = domain.rstrip(".").lower()
    try:
        address = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return SPFResult("none", f"not an address: {ip!r}", domain)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not _valid_domain(domain):  # section 4.3
        return SPFResult("none", f"not a domain SPF applies to: {domain!r}", domain)
    if "@" not in sender:
        sender = f"postmaster@{sender or domain}"
    try:
        result, reason = _Evaluation(address, sender, helo, lookup).check_host(domain)
    except _StopError as stop:
        return SPFResult(stop.result, stop.reason, domain)
    except RecursionError:  # cannot happen within the look-up limit; never crash on it
        return SPFResult("permerror", "records nest too deep", domain)
    return SPFResult(result, "" if result == "pass" else reason, domain)


def check(ip: str, mail_from: str, helo: str, lookup: Lookup) -> SPFResult:
    """The SPF result an MX records: the MAIL FROM identity, or HELO's when MAIL FROM is
    empty (RFC 7208 section 2.4).

    Args:
        ip: the connecting address.
        mail_from: the reverse-path without angle brackets (``""`` or ``"<>"``: empty).
        helo: the EHLO/HELO name.
        lookup: answers DNS questions.
    """
    mail_from = mail_from.strip().strip("<>")
    if mail_from:
        local, at, domain = mail_from.rpartition("@")
        if not at:
            domain, mail_from = mail_from, f"postmaster@{mail_from}"
        elif not local:
            mail_from = f"postmaster@{domain}"
        return check_host(ip, domain, mail_from, lookup, helo=helo)
    helo = helo.strip().rstrip(".")
    if not helo or helo.startswith("["):
        return SPFResult("none", "no MAIL FROM and no HELO name", "", "helo")
    result = check_host(ip, helo, f"postmaster@{helo}", lookup, helo=helo)
    return SPFResult(result.result, result.reason, result.domain, "helo")


def resinfo(result: SPFResult) -> str:
    """The ``spf=`` part of Authentication-Results (RFC 8601 section 2.7.2)."""
    parts = [f"spf={result.result}"]
    if result.reason and result.result != "pass":
        parts.append(f"reason={quote_value(result.reason)}")
    if result.domain:
        parts.append(f"smtp.{result.scope}={quote_value(result.domain)}")
    return " ".join(parts)


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-./^_`{|}~]+")


def quote_value(text: str) -> str:
    """An Authentication-Results ``value`` (RFC 2045 token) or quoted-string. Control and
    non-ASCII characters become ``?``; quotes and backslashes become ``'`` and ``/`` (authres
    keeps quoted-pair backslashes in what it returns)."""
    clean = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    clean = clean.replace('"', "'").replace("\\", "/")
    if clean and _TOKEN.fullmatch(clean):
        return clean
    return f'"{clean}"'


# DNS wire format, for a look-up function answering from a zone or a server


def dns_query(name: str, rtype: RecordType) -> bytes:
    """A query for ``name`` and ``rtype`` in wire format.

    Raises:
        ValueError: ``name`` cannot be a DNS name (an empty or over-long label).
    """
    try:
        return dns.message.make_query(name, rtype).to_wire()
    except dns.exception.DNSException as exc:
        raise ValueError(f"not a DNS name: {name!r}: {exc}") from None


def dns_answer(reply: bytes, rtype: RecordType) -> DNSAnswer:
    """Read a reply to :func:`dns_query` (``b""``: no reply at all)."""
    if not reply:
        return DNSAnswer("error")
    try:
        message = dns.message.from_wire(reply)
    except Exception:  # an unparsable reply: a temporary failure, as a resolver reports it
        return DNSAnswer("error")
    rcode = message.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return DNSAnswer("missing")
    if rcode != dns.rcode.NOERROR:
        return DNSAnswer("error")
    wanted = dns.rdatatype.from_text(rtype)
    records: list[str] = []
    for rrset in message.answer:
        if rrset.rdtype != wanted:
            continue
        for rdata in rrset:
            if rtype == "TXT":
                strings: list[bytes] = list(rdata.strings)
                records.append(b"".join(strings).decode("utf-8", "replace"))
            elif rtype == "MX":
                records.append(rdata.exchange.to_text().rstrip("."))
            elif rtype == "PTR":
                records.append(rdata.target.to_text().rstrip("."))
            else:
                records.append(rdata.address)
    return DNSAnswer("found", tuple(records)) if records else DNSAnswer("missing")
