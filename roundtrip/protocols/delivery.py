"""The relay's delivery rules, without I/O: routes, reply outcomes, retries, bounces, framing.

Theory of operation
-------------------
A sending MTA turns what DNS and the remote MX said into one of three outcomes per recipient:
delivered (``None``), :class:`Temporary` (keep it queued, try again later) or
:class:`Permanent` (give up and bounce, with an RFC 3463 status). This module holds every rule
of that decision; ``servers/relay.py`` does the I/O (DNS queries, SMTP over aiosmtplib,
timers, the spool) and hands the results in as plain values. Clocks are passed in.

* Envelope and content (docs/security.md, A2.2, A2.4, A2.5):
  :func:`check_address` refuses CR, LF, NUL and angle brackets in an address (aiosmtplib
  writes addresses into commands verbatim); :func:`normalize_line_endings` makes every stray
  CR or LF a CRLF, so the relay never forwards smuggling material; :func:`dot_stuffed_slices`
  writes the DATA content (RFC 5321 §4.5.2) lazily, in slices.
* Internationalized addresses (RFC 6531): :func:`needs_smtputf8` says when an envelope
  address needs the SMTPUTF8 parameter; towards an MX that does not offer it the recipients
  bounce with :func:`no_smtputf8`'s 5.6.7 (§3.7.5).
* Routing (RFC 5321 §5.1, RFC 7505): :func:`order_mx` sorts MX records by preference; no MX
  record means the domain itself is the MX (implicit MX); a null MX (``0 .``) is a permanent
  5.1.10. :func:`no_such_domain` is NXDOMAIN's 5.1.2. :func:`conclude_route` decides what the
  address lookups of the MX hosts add up to: a route, a deferral (some lookup failed) or a
  bounce (no host has an address: 5.1.2 for an implicit MX, 5.4.4 otherwise).
* Replies (RFC 5321 §4.2.1, §4.5.3.2 for 421): :func:`reply_outcome` makes a 5xx permanent,
  with the enhanced status code of the reply (RFC 2034) forced to class 5, or 5.0.0; every
  other reply is temporary; :func:`rcpt_outcome` makes a 552 to RCPT temporary too
  (RFC 5321 §4.5.3.1.10). :func:`data_reply_outcome` reads the reply to ``DATA`` itself:
  only 354 lets the content go, and a 2xx there is out of step (:func:`out_of_step`), never a
  delivery (RFC 5321 §4.1.1.4). :class:`DomainAttempt` gathers one domain's attempt across its MX
  hosts and addresses: a permanent outcome or a delivery settles a recipient, a temporary one
  (or a host that failed as a whole) moves on to the next address, and a recipient no host
  settled is deferred with every host's reason.
* Retries and expiry (RFC 5321 §4.5.4.1): :class:`RetrySchedule` gives the delay before the
  next attempt (the last delay repeats), never past the queue lifetime, and says when the
  lifetime is over; :func:`expiry` is then the 4.4.7 bounce.
* Bounces (RFC 3464, RFC 5321 §4.5.5): :func:`bounce_message` is the DSN (``protocols/dsn.py``)
  for one recipient with ``Return-Path: <>``, or None for a null sender (a bounce is never
  bounced).
* Outbound TLS (RFC 8461, RFC 7435, result types of RFC 8460): :func:`policy_for` picks the
  policy of a domain, :func:`tls_failure` words a TLS failure and says whether it fails the
  host (``enforce``) or lets the delivery go on (``testing``, ``none``), and
  :func:`handshake_fallback` says how it goes on after a failed STARTTLS handshake: a new
  connection with unverified TLS or in plaintext. The policy itself is
  ``protocols/tlspolicy.py``.

Left out: DSNs for delays (``action=delayed``), per-recipient retry schedules, and routing by
anything but MX and address records (no SRV, no DANE, no source routes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..config import check_envelope_address
from ..errors import ConfigError
from ._lines import DATA_SLICE, dot_stuffed_slices
from .dsn import build_dsn
from .smtp import domain_of
from .tlspolicy import PolicyMode, ResultType, TLSPolicy

__all__ = [
    "DATA_SLICE",
    "FALLBACK_WORDS",
    "NO_POLICY",
    "NULL_MX",
    "REQUIRED",
    "DomainAttempt",
    "HandshakeFallback",
    "Outcome",
    "Permanent",
    "RetrySchedule",
    "Route",
    "TLSFailure",
    "Temporary",
    "bounce_message",
    "check_address",
    "conclude_route",
    "data_reply_outcome",
    "domain_of",
    "dot_stuffed_slices",
    "expiry",
    "handshake_fallback",
    "lookup_failed",
    "mx_mismatch",
    "needs_smtputf8",
    "no_smtputf8",
    "no_such_domain",
    "normalize_domains",
    "normalize_line_endings",
    "order_mx",
    "out_of_step",
    "policy_for",
    "rcpt_outcome",
    "reply_outcome",
    "route_detail",
    "tls_failure",
]


@dataclass(frozen=True, slots=True)
class Permanent:
    """Give up on the recipient: RFC 3463 status and a Diagnostic-Code."""

    status: str
    diagnostic: str
    remote_mta: str = ""


@dataclass(frozen=True, slots=True)
class Temporary:
    """Keep the recipient queued; ``reason`` is the last error, verbatim."""

    reason: str


#: None: delivered.
Outcome = Permanent | Temporary | None

#: MX hosts in preference order, each with its addresses.
Route = list[tuple[str, list[str]]]

# -- envelope and content -----------------------------------------------------------------------

_STRAY_EOL = re.compile(rb"\r\n|\r|\n")


def check_address(address: str, *, what: str) -> str:
    """Reject CR, LF, NUL and angle brackets in an envelope address (docs/security.md A2.5).

    The rule is ``config.check_envelope_address``, which the probe uses too.

    Raises:
        ConfigError: the address could inject SMTP commands.
    """
    return check_envelope_address(address, what=what)


def normalize_domains(domains: Iterable[str]) -> set[str]:
    """Domain names as :func:`domain_of` gives them, for comparing."""
    return {d.lower().rstrip(".") for d in domains}


def normalize_line_endings(raw: bytes) -> bytes:
    """Every CR, LF or CRLF becomes CRLF, and the content ends with CRLF (docs/security.md A2.2)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        data = raw  # no stray CR or LF: a big message is not copied
    else:
        data = _STRAY_EOL.sub(b"\r\n", raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


# -- routing (RFC 5321 §5.1, RFC 7505) -----------------------------------------------------------

#: The exchange of a null MX (RFC 7505 §3), as dnspython writes the root name.
NULL_MX = "."


def order_mx(domain: str, records: Sequence[tuple[int, str]] | None) -> list[str] | Permanent:
    """The MX hosts of ``domain`` to try, in order, or the bounce of a null MX.

    Args:
        domain: the recipient domain (lowercase).
        records: ``(preference, exchange)`` of each MX record, the exchange as absolute
            text (``"mx.example.org."``, ``"."`` for the root); None when the domain has no
            MX record at all (RFC 5321 §5.1: the domain itself is then the MX).

    Returns:
        Host names (lowercase, no trailing dot, each once) by preference, ties by name; or
        :class:`Permanent` 5.1.10 when any record is a null MX (RFC 7505 §3).
    """
    if records is None:
        return [domain]
    ordered = sorted(records)
    if any(exchange == NULL_MX for _, exchange in ordered):
        return Permanent("5.1.10", f"X-Roundtrip; domain {domain} accepts no mail (null MX)")
    hosts = [exchange.removesuffix(".").lower() for _, exchange in ordered]
    return list(dict.fromkeys(hosts))


def no_such_domain(domain: str) -> Permanent:
    """The bounce for a recipient domain that does not exist (NXDOMAIN to MX)."""
    return Permanent("5.1.2", f"X-Roundtrip; domain {domain} does not exist (NXDOMAIN)")


def lookup_failed(domain: str, detail: str) -> Temporary:
    """The deferral for an MX lookup that failed (timeout, SERVFAIL ...)."""
    return Temporary(f"MX lookup for {domain} failed: {detail}")


def conclude_route(
    domain: str,
    hosts: Sequence[str],
    addresses: Mapping[str, Sequence[str]],
    failures: Sequence[str],
    *,
    implicit: bool,
) -> Route | Permanent | Temporary:
    """What the address lookups of the MX hosts add up to.

    Args:
        domain: the recipient domain.
        hosts: the MX hosts from :func:`order_mx`.
        addresses: the A and AAAA addresses found per host (a host may be missing).
        failures: address lookups that failed temporarily, in words.
        implicit: the domain had no MX record (``hosts`` is the domain itself).

    Returns:
        The hosts that have addresses, in order; else a deferral when some lookup failed;
        else a bounce: 5.1.2 for an implicit MX (the domain has no mail host at all), 5.4.4
        when named MX hosts have no address.
    """
    route = [(host, list(addresses[host])) for host in hosts if addresses.get(host)]
    if route:
        return route
    if failures:
        return Temporary("; ".join(failures))
    if implicit:
        return Permanent("5.1.2", f"X-Roundtrip; domain {domain} has no MX and no address")
    return Permanent(
        "5.4.4", f"X-Roundtrip; no address for the MX hosts of {domain}: {', '.join(hosts)}"
    )


def route_detail(route: Route | Permanent | Temporary) -> str:
    """The ``mx-lookup`` event's detail: ``host=ip/ip, ...`` or the outcome in words."""
    if isinstance(route, Permanent):
        return route.diagnostic
    if isinstance(route, Temporary):
        return route.reason
    return ", ".join(f"{host}={'/'.join(ips)}" for host, ips in route)


# -- replies ----------------------------------------------------------------------------------

_ENHANCED_STATUS = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\b")


def reply_outcome(code: int, message: str, host: str) -> Permanent | Temporary:
    """The outcome of an MX's error reply (or any reply that is not the success expected).

    A 5xx is permanent, with the reply's enhanced status code (RFC 3463, RFC 2034) made class
    5, or ``5.0.0`` without one; anything else (4xx, and any reply out of step) is temporary.
    """
    text = " ".join(message.split())
    if 500 <= code < 600:
        match = _ENHANCED_STATUS.match(text)
        status = match.group(1) if match else "5.0.0"
        if not status.startswith("5"):
            status = "5" + status[1:]
        return Permanent(status, f"smtp; {code} {text}", host)
    return Temporary(f"{host}: {code} {text}")


def needs_smtputf8(mail_from: str, rcpts: Sequence[str]) -> bool:
    """Whether an envelope address is not ASCII, so the transaction needs SMTPUTF8 (RFC 6531)."""
    return not (mail_from.isascii() and all(rcpt.isascii() for rcpt in rcpts))


def no_smtputf8(host: str) -> Permanent:
    """The bounce when a non-ASCII address meets an MX that does not offer SMTPUTF8.

    RFC 6531 §3.7.5 (no downgrade is defined): the message cannot be sent to that MX, and
    RFC 5248 / RFC 6531 §3.7.4 give the status 5.6.7 (address not representable).
    """
    return Permanent(
        "5.6.7",
        f"X-Roundtrip; {host} does not offer SMTPUTF8, which a non-ASCII address needs",
        host,
    )


def rcpt_outcome(code: int, message: str, host: str) -> Permanent | Temporary:
    """The outcome of an MX's refusal of ``RCPT TO``: as :func:`reply_outcome`, but for 552.

    RFC 5321 §4.5.3.1.10: a 552 to RCPT means "too many recipients" and is to be treated as
    temporary, like 452: the recipient waits for a later transaction instead of bouncing.
    """
    if code == 552:
        return Temporary(f"{host}: {code} {' '.join(message.split())}")
    return reply_outcome(code, message, host)


def data_reply_outcome(code: int, message: str, host: str) -> Permanent | Temporary | None:
    """What the MX's reply to ``DATA`` (the command, not the final dot) means.

    None for 354: the content may go. A 4xx or 5xx keeps its meaning (:func:`reply_outcome`).
    Any other reply, 250 included, is out of step (RFC 5321 §4.1.1.4, §4.3.2: ``DATA`` is
    answered 354 or an error; only the reply to the final dot completes the transaction): no
    content went out, so nothing was delivered, and the recipients are tried again.
    """
    if code == 354:
        return None
    if 400 <= code < 600:
        return reply_outcome(code, message, host)
    return out_of_step(host, f"DATA answered {code} {' '.join(message.split())}, not 354")


def out_of_step(host: str, detail: str) -> Temporary:
    """A reply that cannot belong to the command sent: the session is out of step.

    The connection is dropped and the transaction's recipients are tried again: a reply
    paired with the wrong command must never count as a delivery (RFC 5321 §4.1.1, §4.2;
    RFC 2920 §3.1).
    """
    return Temporary(f"{host}: reply out of step: {detail}")


@dataclass
class DomainAttempt:
    """One attempt at the recipients of one domain, across its MX hosts and addresses.

    Feed it what each address did, in route order, while :attr:`remaining` is not empty;
    then :meth:`finish` gives every recipient's outcome.
    """

    domain: str
    rcpts: Sequence[str]
    _settled: dict[str, Outcome] = field(default_factory=dict)
    _reasons: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reasons = {rcpt: [] for rcpt in self.rcpts}

    @property
    def remaining(self) -> list[str]:
        """Recipients no address has settled yet."""
        return [rcpt for rcpt in self.rcpts if rcpt not in self._settled]

    def host_failed(self, host: str, ip: str, detail: str) -> str:
        """This address could not take the transaction; returns the reason recorded."""
        reason = f"{host}[{ip}]: {detail}"
        for rcpt in self.remaining:
            self._reasons[rcpt].append(reason)
        return reason

    def host_answered(self, outcomes: Mapping[str, Outcome]) -> None:
        """The address answered: deliveries and bounces settle, 4xx moves on to the next MX."""
        for rcpt, outcome in outcomes.items():
            if isinstance(outcome, Temporary):
                self._reasons[rcpt].append(outcome.reason)
            else:
                self._settled[rcpt] = outcome

    def finish(self) -> dict[str, Outcome]:
        """Every recipient's outcome; an unsettled one is deferred with every host's reason.

        All the reasons, so that a TLS failure on the first MX is not hidden by the next.
        """
        outcomes = dict(self._settled)
        for rcpt in self.remaining:
            text = "; ".join(self._reasons[rcpt]) or f"no MX host of {self.domain} answered"
            outcomes[rcpt] = Temporary(text)
        return outcomes


# -- retries and expiry (RFC 5321 §4.5.4.1) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """When to try again: ``delays`` before the 2nd, 3rd ... attempt, the last one repeating.

    Raises:
        ValueError: no delay.
    """

    delays: tuple[float, ...]
    #: Seconds after which an undelivered recipient bounces with 4.4.7.
    lifetime: float

    def __post_init__(self) -> None:
        if not self.delays:
            raise ConfigError("retry_delays must hold at least one delay")

    def expired(self, waited: float) -> bool:
        """The message has waited its lifetime: bounce what is left (:func:`expiry`)."""
        return waited >= self.lifetime

    def delay(self, attempts: int, waited: float) -> float:
        """Seconds until the next attempt after ``attempts`` attempts and ``waited`` seconds.

        Never past the expiry, so the 4.4.7 bounce is on time.
        """
        index = max(0, min(attempts - 1, len(self.delays) - 1))
        return max(0.0, min(self.delays[index], self.lifetime - waited))


def expiry(last_error: str) -> Permanent:
    """The bounce of a recipient whose queue lifetime is over (RFC 3463 4.4.7)."""
    reason = last_error or "no attempt succeeded"
    return Permanent("4.4.7", f"X-Roundtrip; queue lifetime expired: {reason}")


# -- bounces (RFC 3464) -------------------------------------------------------------------------


def bounce_message(
    *,
    original: bytes,
    mail_from: str,
    recipient: str,
    outcome: Permanent,
    reporting_mta: str,
    arrival_date: float,
    now: float,
    action: str = "failed",
) -> bytes | None:
    """The DSN to send to ``mail_from`` about ``recipient``, or None for a null sender.

    RFC 3464 §2: a bounce is never bounced. The DSN starts with ``Return-Path: <>``: it is
    delivered finally with a null envelope sender (RFC 5321 §4.4, §4.5.5).
    """
    if not mail_from:
        return None
    dsn = build_dsn(
        original=original,
        envelope_from=mail_from,
        recipient=recipient,
        status=outcome.status,
        diagnostic=outcome.diagnostic,
        remote_mta=outcome.remote_mta,
        reporting_mta=reporting_mta,
        action=action,
        arrival_date=arrival_date,
        now=now,
        message_id_domain=domain_of(reporting_mta) or reporting_mta,
    )
    return b"Return-Path: <>\r\n" + dsn


# -- outbound TLS (RFC 8461, RFC 7435; failures named as in RFC 8460) -----------------------------

#: No policy (or mode ``none``): opportunistic TLS, plaintext when STARTTLS is not offered.
NO_POLICY = TLSPolicy(mode="none")
#: ``require_tls`` without a policy hook: enforce, whatever the MX name.
REQUIRED = TLSPolicy(mode="enforce")


def policy_for(found: TLSPolicy | None, *, hooked: bool, require_tls: bool) -> TLSPolicy:
    """The policy a delivery runs under.

    Args:
        found: what the policy hook said for the domain (None: no policy).
        hooked: there is a policy hook; ``require_tls`` then does not count.
        require_tls: without a hook, act as ``enforce`` (True) or as no policy (False).
    """
    if hooked:
        return found if found is not None else NO_POLICY
    return REQUIRED if require_tls else NO_POLICY


@dataclass(frozen=True, slots=True)
class TLSFailure:
    """A TLS failure in words: the ``tls-failure`` event, and the deferral under enforce."""

    #: ``<result type>: <MX>: <detail> (<what the policy made of it>)``.
    event: str
    #: The host's failure reason under ``enforce`` (never a plaintext fallback); None when
    #: the policy lets the delivery go on.
    deferral: str | None


def tls_failure(
    result: ResultType,
    detail: str,
    *,
    where: str,
    policy: TLSPolicy,
    domain: str,
    fallback: str,
) -> TLSFailure:
    """Word a TLS failure by its TLS-RPT result type (RFC 8460 §4.3) under ``policy``.

    ``where`` names the MX (``host[ip]``) in the event; the deferral leaves it out, as the
    relay prefixes a host's reason with the MX already. ``fallback`` says what the delivery
    does instead when the policy allows it ("delivering without TLS").
    """
    if policy.requires_tls:
        outcome = f"TLS policy of {domain}: enforce; deferred, no plaintext"
    else:
        outcome = f"TLS policy of {domain}: {policy.mode}; {fallback}"
    deferral = f"{result}: {detail} ({outcome})" if policy.requires_tls else None
    return TLSFailure(f"{result}: {where}: {detail} ({outcome})", deferral)


def mx_mismatch(policy: TLSPolicy, host: str) -> str:
    """The detail of an MX host that matches none of the policy's patterns (RFC 8461 §4.1)."""
    patterns = ", ".join(policy.mx or ())
    return f"MX host {host} matches no mx pattern of the policy ({patterns})"


#: What a delivery does after its STARTTLS handshake with an MX failed: nothing now (the
#: host failed, the message stays queued), or a new connection with TLS whose certificate is
#: not verified, or a new connection in plaintext.
HandshakeFallback = Literal["defer", "unverified-tls", "plaintext"]

#: How the ``tls-failure`` event words each fallback (the ``fallback`` of :func:`tls_failure`).
FALLBACK_WORDS: Mapping[HandshakeFallback, str] = {
    "defer": "deferred, no plaintext",
    "unverified-tls": "delivering over unverified TLS on a new connection",
    "plaintext": "delivering without TLS on a new connection",
}


def handshake_fallback(mode: PolicyMode, *, certificate_failed: bool) -> HandshakeFallback:
    """What a sender does once the MX said 220 to STARTTLS but no usable TLS came of it.

    A failed handshake leaves no SMTP session to go on with (the peer's state is unknown),
    so every fallback opens a new connection.

    * ``enforce`` defers: RFC 8461 §5 delivers only over validated TLS, never in plaintext.
    * ``testing`` delivers as a domain without a policy would (RFC 8461 §5) and reports the
      failure: a certificate that failed verification still gets encryption, unverified; a
      handshake that failed outright (garbage, a reset, a protocol mismatch) gets plaintext.
    * ``none``, or no policy, is opportunistic security (RFC 7435 §1: encryption when it can
      be negotiated, cleartext otherwise): plaintext, as Postfix's
      ``smtp_tls_security_level = may`` retries after a failed handshake. Nothing is verified
      in this mode, so no certificate can fail.

    Args:
        mode: the recipient domain's policy mode (RFC 8461 §5).
        certificate_failed: the handshake failed only because the certificate did not verify.
    """
    if mode == "enforce":
        return "defer"
    if mode == "testing" and certificate_failed:
        return "unverified-tls"
    return "plaintext"
