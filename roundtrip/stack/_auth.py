"""Sender authentication at the stack's MX: SPF, DKIM and DMARC, one Authentication-Results.

The rules are pure (``roundtrip/protocols/spf.py``, ``dmarc.py``, ``dkim.py``); this module
gives them the three things only the stack has:

- DNS answers. :func:`zone_lookup` asks the stack's own DNS server in memory (its
  ``answer``, the code its UDP and TCP listeners run, query log included), so the checks see
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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import StackConfig
from ..errors import MailboxError
from ..protocols import dmarc as _dmarc
from ..protocols import spf as _spf
from ..protocols.dkim import DKIMResult
from ..protocols.dns import Record
from ..store import Store

__all__ = [
    "JUNK",
    "REJECT_REPLY",
    "SenderVerdict",
    "check_sender",
    "dmarc_record",
    "junk_folder",
    "peer_address",
    "sender_auth_records",
    "zone_lookup",
]

#: The reply to mail whose From domain publishes p=reject and fails DMARC (RFC 7489
#: section 6.6.4, RFC 7372 section 3.2's 5.7.1 code).
REJECT_REPLY = "550 5.7.1 Rejected by DMARC policy of {domain}"
#: The folder quarantined mail goes to when the user has none marked \Junk.
JUNK = "Junk"

#: Where a connection to any 127/8 address leaves from (the kernel picks the primary loopback
#: address): the relay's source when it delivers to a domain listening on 127.0.0.N.
_LOOPBACK_SOURCE = "127.0.0.1"

#: ``from <helo> ([192.0.2.1])`` or, for an IPv6 peer, ``([IPv6:2001:db8::1])`` (RFC 5321
#: section 4.1.3; the tag is case-insensitive, and an untagged IPv6 literal as earlier
#: versions wrote it is still read).
_RECEIVED_PEER = re.compile(rb"\AReceived: from \S+ \(\[(?:(?i:IPv6):)?([0-9A-Fa-f:.]+)\]\)")


def zone_lookup(answer: Callable[[bytes], bytes]) -> _spf.Lookup:
    """A DNS look-up over ``answer`` (query wire -> reply wire, ``b""`` for no reply)."""

    def lookup(name: str, rtype: _spf.RecordType) -> _spf.DNSAnswer:
        try:
            query = _spf.dns_query(name, rtype)
        except ValueError:  # a name no query can carry: nothing exists there
            return _spf.DNSAnswer("missing")
        return _spf.dns_answer(answer(query), rtype)

    return lookup


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
        dmarc: the DMARC result (None: not checked).
    """

    field: bytes
    spf: _spf.SPFResult | None
    dmarc: _dmarc.DMARCResult | None

    @property
    def reject_reply(self) -> str | None:
        """The SMTP reply refusing the message, when DMARC says reject."""
        if self.dmarc is None or self.dmarc.disposition != "reject":
            return None
        # The domain comes from the message: nothing but name characters reach the reply line.
        domain = re.sub(r"[^A-Za-z0-9.\-_]", "?", self.dmarc.from_domain)[:253]
        return REJECT_REPLY.format(domain=domain)

    @property
    def quarantine(self) -> bool:
        """Whether the message goes to the Junk folder."""
        return self.dmarc is not None and self.dmarc.disposition == "quarantine"


def check_sender(
    raw: bytes,
    *,
    authserv_id: str,
    mail_from: str,
    helo: str,
    dkim: Sequence[DKIMResult] | None,
    lookup: _spf.Lookup | None,
) -> SenderVerdict:
    """SPF for the connecting address and MAIL FROM (or HELO), then DMARC.

    Args:
        raw: the message as received, this hop's Received field on top.
        authserv_id: the MX host name.
        mail_from: the envelope sender (``""`` for a bounce).
        helo: the client's EHLO/HELO name.
        dkim: the DKIM results (None: DKIM is not checked here).
        lookup: the DNS (None: SPF and DMARC are not checked).
    """
    spf = dmarc = None
    if lookup is not None:
        ip = peer_address(raw)
        if ip is None:  # no trace field of ours: nothing to check the address against
            spf = _spf.SPFResult("none", "client address unknown")
        else:
            spf = _spf.check(ip, mail_from, helo, lookup)
        dkim_pairs = [(r.result, r.domain) for r in dkim or ()]
        dmarc = _dmarc.evaluate(_dmarc.from_domains(raw), spf, dkim_pairs, lookup)
    field = _dmarc.combined_authentication_results(authserv_id, dkim=dkim, spf=spf, dmarc=dmarc)
    return SenderVerdict(field, spf, dmarc)


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
