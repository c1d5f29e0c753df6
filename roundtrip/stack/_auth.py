"""Sender authentication at the stack's MX: SPF, DKIM and DMARC, one Authentication-Results.

The rules are pure (``roundtrip/protocols/spf.py``, ``dmarc.py``, ``dkim.py``); this module
gives them the three things only the stack has:

- DNS answers. :func:`zone_lookup` asks the stack's own DNS server in memory (its
  ``lookup``: the reply its UDP and TCP listeners would send, as Python values rather than
  wire format, query log included; tests/test_dns_structured_lookup.py holds the two paths
  equal), so the checks see
  exactly what the DNS serves, records set by a test included. The router runs inside the
  aiosmtpd handler on the loop thread and is synchronous: a resolver over the socket would
  need a coroutine there, and a blocking one would deadlock against the server on the same
  loop. The DKIM key look-ups (``_dkim.zone_lookup``) work the same way.
- The connecting address. The router receives the message with this hop's ``Received``
  field on top, written by the listener from the peer address (``protocols/smtp.py``
  ``received_header``: ``from <helo> ([<ip>])``, ``([IPv6:<ip>])`` for IPv6);
  :func:`peer_address` reads it back.
- Where quarantined mail goes: the recipient's ``\\Junk`` folder (RFC 6154), by
  :func:`junk_folder`.

Two receiver decisions RFC 7489 leaves to local policy are made here too:

- ARC (RFC 8617 section 7.2, RFC 7489 section 6.7): a message that fails DMARC under
  ``p=reject`` or ``quarantine`` is let in when its ARC chain validates, the newest seal is
  by a trusted sealer (``StackConfig.arc_trusted_sealers``: the stack's own domains unless
  set) and that sealer's ARC-Authentication-Results says the From domain passed DMARC, or
  passed DKIM with an aligned ``d=``. The ``dmarc=fail`` stays in Authentication-Results with
  a comment naming the override, as OpenDMARC's ``(p=reject dis=none)`` and RFC 7489
  appendix C's ``local_policy`` override reason do.
- DNS trouble (RFC 7489 section 6.6.3 leaves it to the receiver): no verdict is a temporary
  failure, ``451 4.4.3`` at the end of DATA, so the sending MTA retries. That is when the
  From domain's DMARC record could not be fetched (``dmarc=temperror``), and when DMARC
  failed under ``p=reject`` or ``quarantine`` while the SPF or DKIM check of an identifier
  aligned with the From domain hit a DNS error (it might have passed). OpenDMARC with
  ``RejectFailures`` temp-fails both (opendmarc.conf(5): "temp-failed if evaluation could
  not be completed"; Postfix then says ``451 4.7.1``); X.4.3 is RFC 3463 section 3.5's
  directory server failure, the code RFC 7208 section 8.6 gives an SPF ``temperror``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import StackConfig
from ..errors import MailboxError
from ..protocols import dmarc as _dmarc
from ..protocols import spf as _spf
from ..protocols.dkim import DKIMResult
from ..protocols.dns import Record
from ..store import Store

if TYPE_CHECKING:
    from ..protocols.arc import ARCResult
    from ..protocols.dns import ZoneSource

__all__ = [
    "JUNK",
    "MALFORMED_FROM_REPLY",
    "REJECT_REPLY",
    "TEMPFAIL_REPLY",
    "SenderVerdict",
    "arc_override",
    "check_sender",
    "dmarc_record",
    "junk_folder",
    "peer_address",
    "sender_auth_records",
    "trusted_sealers",
    "zone_lookup",
]

#: The reply to mail whose From domain publishes p=reject and fails DMARC (RFC 7489
#: section 6.6.4, RFC 7372 section 3.2's 5.7.1 code).
REJECT_REPLY = "550 5.7.1 Rejected by DMARC policy of {domain}"
#: The reply when the From field does not parse and one candidate author domain's p=reject
#: applies (``roundtrip/protocols/dmarc.py``, RFC 7489 section 6.6.1).
MALFORMED_FROM_REPLY = (
    "550 5.7.1 Rejected by DMARC policy of {domain}: malformed From field (RFC 5322 3.6.2)"
)
#: The reply to mail whose DMARC verdict a DNS failure left open (module docstring).
TEMPFAIL_REPLY = (
    "451 4.4.3 DMARC policy of {domain} could not be evaluated (DNS failure), try again later"
)
#: The folder quarantined mail goes to when the user has none marked \Junk.
JUNK = "Junk"

#: Where a connection to any 127/8 address leaves from (the kernel picks the primary loopback
#: address): the relay's source when it delivers to a domain listening on 127.0.0.N.
_LOOPBACK_SOURCE = "127.0.0.1"

#: ``from <helo> ([192.0.2.1])`` or, for an IPv6 peer, ``([IPv6:2001:db8::1])`` (RFC 5321
#: section 4.1.3; the tag is case-insensitive, and an untagged IPv6 literal as earlier
#: versions wrote it is still read).
_RECEIVED_PEER = re.compile(rb"\AReceived: from \S+ \(\[(?:(?i:IPv6):)?([0-9A-Fa-f:.]+)\]\)")


def zone_lookup(answer: Callable[[bytes], bytes] | ZoneSource) -> _spf.Lookup:
    """A DNS look-up over ``answer``.

    Args:
        answer: the stack's DNS server, or anything with its ``lookup`` (a
            :class:`~roundtrip.protocols.dns.ZoneSource`): asked for the records as Python
            values, with no wire format to build and parse; or a function from query wire to
            reply wire (``b""`` for no reply). Both give the same :class:`~_spf.DNSAnswer`
            (tests/test_dns_structured_lookup.py).
    """
    from ..protocols.dns import ZoneSource

    if not isinstance(answer, ZoneSource):
        wire = answer

        def lookup(name: str, rtype: _spf.RecordType) -> _spf.DNSAnswer:
            try:
                query = _spf.dns_query(name, rtype)
            except ValueError:  # a name no query can carry: nothing exists there
                return _spf.DNSAnswer("missing")
            return _spf.dns_answer(wire(query), rtype)

        return lookup

    import dns.rdtypes.ANY.TXT
    import dns.rdtypes.IN.A
    import dns.rdtypes.IN.AAAA
    import dns.rdtypes.mxbase
    import dns.rdtypes.nsbase

    source = answer

    def structured(name: str, rtype: _spf.RecordType) -> _spf.DNSAnswer:
        # What _spf.dns_answer reads from the reply to _spf.dns_query, read from the records.
        try:
            found = source.lookup(name, rtype)
        except ValueError:  # a name no query can carry: nothing exists there
            return _spf.DNSAnswer("missing")
        if found is None:
            return _spf.DNSAnswer("error")
        if found.rcode == "NXDOMAIN":
            return _spf.DNSAnswer("missing")
        if found.rcode != "NOERROR":
            return _spf.DNSAnswer("error")
        records: list[str] = []
        for rdata in found.rdatas(rtype):
            if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
                records.append(b"".join(rdata.strings).decode("utf-8", "replace"))
            elif isinstance(rdata, dns.rdtypes.mxbase.MXBase):
                records.append(rdata.exchange.to_text().rstrip("."))
            elif isinstance(rdata, dns.rdtypes.nsbase.NSBase):  # PTR
                records.append(rdata.target.to_text().rstrip("."))
            elif isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                records.append(rdata.address)
        return _spf.DNSAnswer("found", tuple(records)) if records else _spf.DNSAnswer("missing")

    return structured


def peer_address(raw: bytes) -> str | None:
    """The client address in the topmost ``Received`` field, which this hop wrote."""
    match = _RECEIVED_PEER.match(raw)
    return match.group(1).decode("ascii") if match else None


@dataclass(frozen=True, slots=True)
class SenderVerdict:
    """What the MX found about a message's sender.

    Attributes:
        field: the Authentication-Results field to prepend (with CRLF).
        spf: the SPF result (None: not checked).
        dmarc: the DMARC result (None: not checked); ``temperror`` when a DNS failure left
            the verdict open (:attr:`deferred`).
        arc: the ARC chain's validation (None: the message carries no ARC set, or ARC was not
            checked).
        override: the trusted ARC sealer whose results let in mail DMARC would have refused
            or quarantined (``""``: no override).
    """

    field: bytes
    spf: _spf.SPFResult | None
    dmarc: _dmarc.DMARCResult | None
    arc: ARCResult | None = None
    override: str = ""

    @property
    def deferred(self) -> bool:
        """Whether the message gets a temporary failure: DMARC could not be evaluated."""
        return self.dmarc is not None and self.dmarc.result == "temperror"

    @property
    def reject_reply(self) -> str | None:
        """The SMTP reply refusing the message: DMARC says reject, or could not decide."""
        if self.dmarc is None or self.override:
            return None
        if not self.deferred and self.dmarc.disposition != "reject":
            return None
        # The domain comes from the message: nothing but name characters reach the reply line.
        domain = _name(self.dmarc.from_domain)
        if self.deferred:
            return TEMPFAIL_REPLY.format(domain=domain)
        if self.dmarc.result == "permerror":
            return MALFORMED_FROM_REPLY.format(domain=domain)
        return REJECT_REPLY.format(domain=domain)

    @property
    def quarantine(self) -> bool:
        """Whether the message goes to the Junk folder."""
        return (
            self.dmarc is not None and self.dmarc.disposition == "quarantine" and not self.override
        )


def _name(text: str) -> str:
    """``text`` with anything but domain name characters replaced, at most 253 of them."""
    return re.sub(r"[^A-Za-z0-9.\-_]", "?", text)[:253]


def _relaxed(identifier: str, from_domain: str) -> bool:
    """Whether ``identifier`` is aligned with ``from_domain`` in relaxed mode (RFC 7489
    section 3.1): the laxer mode, so an identifier that might have aligned counts."""
    identifier = identifier.rstrip(".").lower()
    if not identifier or not from_domain:
        return False
    org = _dmarc.organizational_domain
    return identifier == from_domain or org(identifier) == org(from_domain)


def _undecided(
    dmarc: _dmarc.DMARCResult, spf: _spf.SPFResult | None, dkim: Sequence[DKIMResult] | None
) -> _dmarc.DMARCResult:
    """``dmarc`` as ``temperror`` when it failed under a policy that acts while an aligned
    identifier's check hit a DNS error (module docstring); else ``dmarc`` as it is."""
    if dmarc.result != "fail" or dmarc.disposition == "none":
        return dmarc
    domain = dmarc.from_domain
    if spf is not None and spf.result == "temperror" and _relaxed(spf.domain, domain):
        why = f"SPF temperror for aligned {spf.domain}"
    else:
        errors = [r.domain for r in dkim or () if r.result == "temperror"]
        aligned = [d for d in errors if _relaxed(d, domain)]
        if not aligned:
            return dmarc
        why = f"DKIM temperror for aligned d={aligned[0]}"
    return replace(dmarc, result="temperror", reason=f"{why}: the verdict is unknown")


def arc_override(dmarc: _dmarc.DMARCResult, arc: ARCResult | None, trusted: Sequence[str]) -> str:
    """The trusted sealer whose ARC results override a DMARC failure, or ``""``.

    RFC 8617 section 7.2: a receiver may use a validated chain to let in mail whose DMARC
    failure an intermediary caused. Here the chain must pass, its newest ARC-Seal's ``d=``
    must be (or lie under) a ``trusted`` domain, and that hop's ARC-Authentication-Results
    must say ``dmarc=pass`` for the From domain, or ``dkim=pass`` with a ``header.d``
    aligned with it (relaxed). Only a policy that acts (reject, quarantine) is overridden.
    """
    if arc is None or arc.result != "pass" or dmarc.result != "fail":
        return ""
    if dmarc.disposition == "none":
        return ""
    sealer = arc.sealer.rstrip(".").lower()
    if not any(sealer == t or sealer.endswith("." + t) for t in trusted):
        return ""
    from ..message import parse_auth_results

    found = parse_auth_results(arc.results)
    domain = dmarc.from_domain
    for result in found.results:
        if result.result != "pass":
            continue
        if result.method == "dmarc" and result.properties.get("header.from", "").lower() == domain:
            return sealer
        if result.method == "dkim" and _relaxed(result.properties.get("header.d", ""), domain):
            return sealer
    return ""


def _override_resinfo(dmarc: _dmarc.DMARCResult, sealer: str, arc: ARCResult) -> str:
    """The ``dmarc=fail`` resinfo with a comment saying the policy was overridden by ARC:
    OpenDMARC's ``(p=reject dis=none)`` plus RFC 7489 appendix C's ``local_policy`` reason
    and the chain that justified it."""
    plain = _dmarc.resinfo(dmarc)
    comment = (
        f"(p={dmarc.policy} dis=none; override local_policy: arc=pass"
        f" i={arc.instance} d={_name(sealer)})"
    )
    return plain.replace("dmarc=fail", f"dmarc=fail {comment}", 1)


def check_sender(
    raw: bytes,
    *,
    trace: bytes = b"",
    authserv_id: str,
    mail_from: str,
    helo: str,
    dkim: Sequence[DKIMResult] | None,
    lookup: _spf.Lookup | None,
    arc: ARCResult | None = None,
    trusted_sealers: Sequence[str] = (),
) -> SenderVerdict:
    """SPF for the connecting address and MAIL FROM (or HELO), then DMARC, then the ARC
    override and the DNS-failure deferral (module docstring).

    Args:
        raw: the message as received, this hop's Received field on top (or in ``trace``).
        trace: this hop's Received field when the MX keeps it apart from ``raw``
            (``Accepted.head``).
        authserv_id: the MX host name.
        mail_from: the envelope sender (``""`` for a bounce).
        helo: the client's EHLO/HELO name.
        dkim: the DKIM results (None: DKIM is not checked here).
        lookup: the DNS (None: SPF and DMARC are not checked).
        arc: the ARC chain's validation (None: no ARC set, or ARC is not checked).
        trusted_sealers: the ARC sealer domains whose results may override DMARC.
    """
    spf = dmarc = None
    override = ""
    if lookup is not None:
        ip = peer_address(trace or raw)
        if ip is None:  # no trace field of ours: nothing to check the address against
            spf = _spf.SPFResult("none", "client address unknown")
        else:
            spf = _spf.check(ip, mail_from, helo, lookup)
        dkim_pairs = [(r.result, r.domain) for r in dkim or ()]
        dmarc = _dmarc.evaluate(_dmarc.from_domains(raw), spf, dkim_pairs, lookup)
        override = arc_override(dmarc, arc, trusted_sealers)
        if not override:
            dmarc = _undecided(dmarc, spf, dkim)
    extra: list[str] = []
    if override and dmarc is not None and arc is not None:
        extra.append(_override_resinfo(dmarc, override, arc))
        shown = None
    else:
        shown = dmarc
    if arc is not None:
        from ..protocols.arc import resinfo as arc_resinfo

        # d= comes from the message: nothing but name characters reach our field's comment.
        extra.append(arc_resinfo(replace(arc, sealer=_name(arc.sealer))))
    field = _dmarc.combined_authentication_results(authserv_id, dkim=dkim, spf=spf, dmarc=shown)
    if extra:
        field = field.rstrip(b"\r\n") + "".join(f";\r\n\t{x}" for x in extra).encode() + b"\r\n"
    return SenderVerdict(field, spf, dmarc, arc, override)


def trusted_sealers(config: StackConfig) -> tuple[str, ...]:
    """The ARC sealers whose results may override DMARC (``StackConfig.arc_trusted_sealers``,
    the stack's domains when unset)."""
    if config.arc_trusted_sealers is None:
        return config.domains
    return config.arc_trusted_sealers


def junk_folder(store: Store, address: str) -> str:
    """The folder of ``address`` marked ``\\Junk``, else ``Junk``, created if missing."""
    try:
        boxes = store.mailboxes(address)
    except MailboxError:
        return JUNK  # no such user: delivering says so
    for box in boxes:
        if getattr(box, "special_use", None) == "\\Junk":
            return str(box.name)
    try:
        store.create_mailbox(address, JUNK)
    except MailboxError:  # already there, or the backend refused: delivering says so
        pass
    return JUNK


def dmarc_record(config: StackConfig, domain: str) -> str:
    """The DMARC record ``domain`` publishes (``StackConfig.dmarc_policy``)."""
    policies = dict(config.dmarc_policy)
    value = policies.get(domain, policies.get("*", "reject"))
    return value if value.startswith("v=DMARC1") else f"v=DMARC1; p={value}"


def sender_auth_records(config: StackConfig, records: list[Record]) -> list[Record]:
    """``records`` plus ``_dmarc.<domain>`` for every stack domain, with each stack domain's
    SPF record naming the address the relay sends from when it only names 127.0.0.N, so
    mail between stack domains passes SPF (and so DMARC) in every port mode. Without
    ``StackConfig.sender_auth``: ``records`` as they are."""
    if not config.sender_auth:
        return records
    out: list[Record] = []
    for record in records:
        name = record.name.rstrip(".").lower()
        text = record.value
        if (
            record.rtype == "TXT"
            and name in config.domains
            and text.startswith("v=spf1 ")
            and "ip4:127." in text
            and f"ip4:{_LOOPBACK_SOURCE} " not in text + " "
        ):
            text = text.replace("v=spf1 ", f"v=spf1 ip4:{_LOOPBACK_SOURCE} ", 1)
            record = Record(record.name, record.rtype, text, record.ttl)
        out.append(record)
    out += [Record(f"_dmarc.{d}", "TXT", dmarc_record(config, d)) for d in config.domains]
    return out
