"""DMARC evaluation (RFC 7489): does the visible From domain authenticate, and what then?

Theory of operation. :func:`evaluate` takes the RFC5322.From domains of a message
(:func:`from_domains`), the SPF result of its MAIL FROM (``roundtrip/protocols/spf.py``)
and its DKIM results (``roundtrip/protocols/dkim.py``), and asks a look-up function the
caller passes for the policy records, so this module does no I/O.

- Policy discovery (section 6.6.3): the TXT record at ``_dmarc.<From domain>``, else at
  ``_dmarc.<organizational domain>``. The organizational domain (section 3.2) is the public
  suffix plus one label, from the Public Suffix List as the ``publicsuffixlist`` package
  ships it. No record: ``none``, no policy.
- Alignment (section 3.1): DMARC passes when a DKIM signature that verified has a ``d=``
  aligned with the From domain, or SPF passed for a MAIL FROM domain aligned with it;
  ``relaxed`` (the default) compares organizational domains, ``strict`` the names.
- Policy (section 6.3, 6.6.4): ``p=`` for the domain that published it, ``sp=`` (default
  ``p=``) for its subdomains; ``pct=`` below 100 applies the next milder policy to the mail
  outside the sample: the caller passes the roll (0 by default, so any ``pct`` above 0 takes
  the whole policy and the hermetic world stays deterministic).
- Errors: a DNS failure is ``temperror``; two DMARC records, or one without a valid ``p=``
  (or with an invalid ``sp=``), or a tag list that does not parse, is ``permerror`` and no
  policy applies (section 6.6.3 says such a record is not used; RFC 8601 section 2.7.1 names
  a malformed record a permerror). Other bad tag values fall back to their defaults
  (section 6.3).
- The From field (section 6.6.1): no From, or none with a domain, is ``permerror`` (the
  message breaks RFC 5322 and there is no domain to apply a policy for). Several From
  fields or addresses are each evaluated, and the strictest failing policy wins, so a
  second From cannot hide a forged one. The field is read strictly
  (``roundtrip/protocols/_author.py``, shared with DKIM signing): the domain evaluated is
  the one a mail user agent shows (section 3.1), never one a lenient parser glued together
  from broken syntax. A From that does not parse (RFC 5322 section 3.6.2) is never a pass:
  ``permerror``, and every candidate domain a reader could take for the author's is
  checked, the strictest policy among those that fail applying (its ``p=reject`` gets the
  message rejected), as section 6.6.1 asks for a From with several domains. The permerror
  follows RFC 8601 section 2.7.1 (the message could not be evaluated as the specification
  requires); the policy is applied because section 6.6.1 leaves such mail to the receiver,
  and a malformed From must not be a way around a policy that a well-formed one obeys.

Deliberately unsupported: aggregate and failure reports (``rua``, ``ruf``, ``fo``, ``rf``,
``ri`` are read past), and the DMARCbis tree walk (the PSL decides the organizational
domain).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ._author import AuthorDomains
from .dkim import DKIMResult, authentication_results, author_domains
from .spf import DNSAnswer, RecordType, SPFResult, quote_value
from .spf import resinfo as spf_resinfo

__all__ = [
    "DMARCRecord",
    "DMARCResult",
    "combined_authentication_results",
    "evaluate",
    "from_domains",
    "organizational_domain",
    "parse_record",
    "resinfo",
]

Policy = Literal["none", "quarantine", "reject"]
Result = Literal["pass", "fail", "none", "temperror", "permerror"]
_POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")
_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    """A parsed ``v=DMARC1`` record (RFC 7489 section 6.3).

    Attributes:
        p: the policy for the domain.
        sp: the policy for its subdomains (``p`` when absent).
        adkim: DKIM alignment, ``r`` (relaxed) or ``s`` (strict).
        aspf: SPF alignment, ``r`` or ``s``.
        pct: the percentage of failing mail the policy applies to.
    """

    p: Policy
    sp: Policy
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    pct: int = 100


@dataclass(frozen=True, slots=True)
class DMARCResult:
    """The DMARC outcome for one message.

    Attributes:
        result: an RFC 8601 section 2.7.1 ``dmarc`` result.
        reason: why, for anything but ``pass`` and ``none``.
        from_domain: the RFC5322.From domain evaluated (the failing one, with several).
        policy: the published policy that applies to that domain (``none`` without one).
        disposition: what the receiver should do: ``reject``, ``quarantine`` or ``none``
            (the policy when DMARC failed and the message falls in ``pct``).
    """

    result: Result
    reason: str = ""
    from_domain: str = ""
    policy: Policy = "none"
    disposition: Policy = "none"


class _UnusableRecordError(Exception):
    """A DMARC record exists but cannot be used (permerror)."""


def parse_record(text: str) -> DMARCRecord:
    """Parse a DMARC record.

    Raises:
        ValueError: not a DMARC record, a tag list that does not parse, a missing or invalid
            ``p=``, or an invalid ``sp=``.
    """
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    if parts and parts[-1] == "":
        parts.pop()  # a trailing semicolon is allowed (section 6.4)
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"malformed tag {part!r}")
        if name in tags:
            raise ValueError(f"tag {name}= given twice")
        tags[name] = value.strip()
    if not tags or next(iter(tags)) != "v" or tags["v"] != "DMARC1":
        raise ValueError("does not start with v=DMARC1")
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        raise ValueError(f"p={tags.get('p')!r}: choose one of none, quarantine, reject")
    sp = tags.get("sp", p).lower()
    if sp not in _POLICIES:
        raise ValueError(f"sp={tags.get('sp')!r}: choose one of none, quarantine, reject")
    adkim: Literal["r", "s"] = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf: Literal["r", "s"] = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if re.fullmatch(r"[0-9]{1,3}", pct_text) else 100
    return DMARCRecord(
        p,
        sp,
        adkim,
        aspf,
        pct if pct <= 100 else 100,
    )


@functools.cache
def _suffix_list() -> object | None:
    try:
        from publicsuffixlist import PublicSuffixList
    except ImportError:  # without the package: two-label organizational domains
        return None
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The organizational domain of ``domain`` (RFC 7489 section 3.2): its public suffix
    plus one label; ``domain`` itself when it is a public suffix."""
    domain = domain.rstrip(".").lower()
    psl = _suffix_list()
    if psl is None:
        labels = domain.split(".")
        return ".".join(labels[-2:])
    private = psl.privatesuffix(domain)  # type: ignore[attr-defined]
    return str(private) if private else domain


def from_domains(raw: bytes) -> AuthorDomains | None:
    """The author domains of ``raw``: ``dkim.author_domains``, the reading DKIM signing
    shares (``roundtrip/protocols/_author.py``); None when the header block cannot be read.
    ``malformed`` set: the From field does not parse, and ``domains`` are the candidates."""
    return author_domains(raw)


def _aligned(mode: str, identifier: str, from_domain: str) -> bool:
    identifier = identifier.rstrip(".").lower()
    if not identifier:
        return False
    if mode == "s" or identifier == from_domain:
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def _discover(
    domain: str, lookup: Callable[[str, RecordType], DNSAnswer]
) -> tuple[DMARCRecord, bool] | None:
    """The record for ``domain`` and whether it came from the organizational domain."""
    # The organizational domain (and so the Public Suffix List) only when the domain itself
    # publishes nothing (RFC 7489 section 6.6.3).
    name: str | None = domain
    inherited = False
    while name is not None:
        answer = lookup(f"_dmarc.{name}", "TXT")
        if answer.status == "error":
            raise _DNSFailureError(f"DNS failure for _dmarc.{name}")
        found = [r for r in answer.records if re.match(r"\s*v\s*=\s*DMARC1\s*(;|\Z)", r)]
        if len(found) > 1:
            raise _UnusableRecordError(f"{len(found)} DMARC records at _dmarc.{name}")
        if found:
            try:
                return parse_record(found[0]), inherited
            except ValueError as exc:
                raise _UnusableRecordError(f"bad record at _dmarc.{name}: {exc}") from None
        if inherited:
            break
        org = organizational_domain(domain)
        name, inherited = (org, True) if org != domain else (None, False)
    return None


class _DNSFailureError(Exception):
    """The policy look-up failed (temperror)."""


def _evaluate_one(
    domain: str,
    spf: SPFResult | None,
    dkim: Sequence[tuple[str, str]],
    lookup: Callable[[str, RecordType], DNSAnswer],
    roll: float,
) -> DMARCResult:
    try:
        found = _discover(domain, lookup)
    except _DNSFailureError as exc:
        return DMARCResult("temperror", str(exc), domain)
    except _UnusableRecordError as exc:
        return DMARCResult("permerror", str(exc), domain)
    if found is None:
        return DMARCResult("none", "", domain)
    record, inherited = found
    policy = record.sp if inherited else record.p
    if any(result == "pass" and _aligned(record.adkim, d, domain) for result, d in dkim) or (
        spf is not None and spf.result == "pass" and _aligned(record.aspf, spf.domain, domain)
    ):
        return DMARCResult("pass", "", domain, policy)
    disposition = policy
    if roll >= record.pct:  # outside the sample: the next milder policy (section 6.6.4)
        disposition = _POLICIES[max(0, _STRICTNESS[policy] - 1)]
    reason = "no aligned DKIM signature or SPF pass"
    return DMARCResult("fail", reason, domain, policy, disposition)


def evaluate(
    domains: AuthorDomains | Iterable[str] | None,
    spf: SPFResult | None,
    dkim: Sequence[tuple[str, str]],
    lookup: Callable[[str, RecordType], DNSAnswer],
    *,
    roll: float = 0.0,
) -> DMARCResult:
    """The DMARC result of a message.

    Args:
        domains: :func:`from_domains` of the message (or the From domains themselves, for a
            well-formed field).
        spf: the SPF result of MAIL FROM (None: SPF was not checked).
        dkim: ``(result, d= domain)`` of every DKIM signature.
        lookup: answers DNS questions (``roundtrip/protocols/spf.py`` :data:`Lookup`).
        roll: where the message falls in ``pct`` (0 to 100; the policy applies below ``pct``).

    Returns:
        One result; with several From domains the strictest failing one, else the first. A
        malformed From field is never a pass: ``permerror``, with the strictest policy of the
        candidate domains that fail (module docstring). Never raises for anything in the DNS
        or the message.
    """
    if domains is None:
        return DMARCResult("permerror", "From field not parsable")
    malformed = ""
    if isinstance(domains, AuthorDomains):
        malformed = domains.malformed
        wanted = list(domains.domains)
    else:
        wanted = list(domains)
    if not wanted:
        return DMARCResult("permerror", malformed or "no RFC5322.From domain")
    results = [_evaluate_one(d, spf, dkim, lookup, roll) for d in wanted]
    failed = [r for r in results if r.result in ("fail", "temperror", "permerror")]
    if malformed:
        return _malformed(malformed, results, failed)
    if not failed:
        return results[0]
    worst = max(failed, key=lambda r: (r.result == "fail", _STRICTNESS[r.disposition]))
    if len(wanted) > 1:
        reason = f"{worst.reason} ({len(wanted)} From domains)"
        return DMARCResult(worst.result, reason, worst.from_domain, worst.policy, worst.disposition)
    return worst


def _malformed(why: str, results: list[DMARCResult], failed: list[DMARCResult]) -> DMARCResult:
    """The result for a From field that does not parse (RFC 5322 section 3.6.2).

    RFC 7489 section 6.6.1 leaves such a message to the receiver, and asks, for a From with
    several domains, to check each and apply the strictest policy among those that fail.
    Readers may disagree on which domain is the author's, so it is never a pass: each
    candidate is checked, the strictest failure's policy and disposition apply, and the
    result is ``permerror`` (RFC 8601 section 2.7.1: the message could not be evaluated as
    the specification requires). A DNS failure with no failing candidate stays
    ``temperror``, so the message is deferred and the policy applied on the retry.
    """
    fails = [r for r in failed if r.result == "fail"]
    if fails:
        worst = max(fails, key=lambda r: _STRICTNESS[r.disposition])
        reason = f"{why}; {worst.reason} for {worst.from_domain}"
        return DMARCResult("permerror", reason, worst.from_domain, worst.policy, worst.disposition)
    errors = [r for r in failed if r.result == "temperror"]
    if errors:
        return DMARCResult("temperror", f"{why}; {errors[0].reason}", errors[0].from_domain)
    first = results[0]
    return DMARCResult("permerror", why, first.from_domain, first.policy)


def resinfo(result: DMARCResult) -> str:
    """The ``dmarc=`` part of Authentication-Results (RFC 7489 section 11.2)."""
    parts = [f"dmarc={result.result}"]
    if result.reason:
        parts.append(f"reason={quote_value(result.reason)}")
    if result.from_domain:
        parts.append(f"header.from={quote_value(result.from_domain)}")
    if result.result in ("pass", "fail") or result.disposition != "none":
        parts.append(f"policy.dmarc={result.policy}")
    return " ".join(parts)


def combined_authentication_results(
    authserv_id: str,
    *,
    dkim: Sequence[DKIMResult] | None,
    spf: SPFResult | None,
    dmarc: DMARCResult | None,
) -> bytes:
    """One Authentication-Results field (with its CRLF) for every check the MX made:
    ``dkim=`` lines first (``roundtrip/protocols/dkim.py``; None: DKIM was not checked),
    then ``spf=`` and ``dmarc=``, each on its own folded line (RFC 8601 section 2.2)."""
    lines: list[str] = []
    if spf is not None:
        lines.append(spf_resinfo(spf))
    if dmarc is not None:
        lines.append(resinfo(dmarc))
    if dkim is not None or not lines:
        head = authentication_results(authserv_id, dkim or []).decode("ascii").rstrip("\r\n")
    else:
        head = f"Authentication-Results: {authserv_id}"
    return (";\r\n\t".join([head, *lines]) + "\r\n").encode("ascii")
