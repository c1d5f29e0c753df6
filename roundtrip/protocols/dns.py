"""Authoritative DNS answers for the stack's zones: ``answer(zone, query_bytes) -> bytes``.

Theory of operation
-------------------
The stack serves a handful of domains (``example.org``, ``example.net`` ...) from memory. A
:class:`Zone` is an immutable index of :class:`Record` values grouped under their zone apexes
(every name carrying an SOA record is an apex). :func:`respond` takes one DNS message in wire
format (RFC 1035 §4) and returns one reply; the UDP and TCP adapters in ``servers/dns.py`` only
move bytes. There is no state between queries, so there are no protocol states to name.

Answers (RFC 1034 §4.3.2, RFC 2308):

- The name lies in one of our zones and has records of the asked type: NOERROR, AA set, the
  RRset in the answer section. MX and NS answers carry the A/AAAA records of their targets in the
  additional section when we serve them (RFC 1035 §3.3.9, RFC 5321 §5.1 clients use them).
- A CNAME at the name is returned and followed inside our zones (at most ``_MAX_CNAME_CHAIN``
  hops, which stops loops).
- The name exists (it has records, or names below it do: an "empty non-terminal") but not with
  that type: NOERROR with an empty answer and the zone's SOA in the authority section ("NoAnswer",
  RFC 2308 §2.2).
- The name lies in our zone but does not exist: NXDOMAIN with the SOA in the authority section
  (RFC 2308 §2.1).
- The name lies outside every zone. By default the stack's DNS stands in for the whole DNS of a
  hermetic world in which nothing else exists, and answers as the world's would: NXDOMAIN with
  an SOA of the root zone in the authority section (what a root server says for
  ``no-such-domain.invalid``), so a resolver or MTA treats the name as gone for good and may
  cache that (RFC 2308 §5), where REFUSED would make it retry forever. The root and the names
  above our zones (``org.`` above ``example.org``) exist: NOERROR with no data and the same SOA
  (RFC 8020: an NXDOMAIN there would deny our zones too). A zone built with
  ``refuse_outside=True`` answers REFUSED instead, what an authoritative-only server on the
  real Internet says for names it does not serve.
- Negative answers carry the SOA with the TTL its MINIMUM field allows (RFC 2308 §3: the
  smaller of the SOA's TTL and MINIMUM), which is how long a resolver caches the denial.
- Recursion desired (RD, set by stub resolvers and ``dig``) is copied and otherwise ignored:
  we answer from our zones and never recurse, so RA stays clear.
- A UDP reply larger than the client accepts (512 octets without EDNS, RFC 1035 §4.2.1; the
  EDNS payload size otherwise, RFC 6891 §6.2.5) is cut to its header and question with TC
  set, and the client asks again over TCP (RFC 7766).
- Garbage: FORMERR when at least a header ID can be read, otherwise nothing (``b""``: the
  adapter drops the datagram). Messages with the QR bit set (responses) are never answered,
  so two servers cannot be made to bounce errors at each other. Unknown opcodes get NOTIMP,
  classes other than IN get REFUSED.

In-process callers (the stack's SPF, DMARC and DKIM checks) use :func:`lookup` instead: the
same reply built by the same code (:func:`_build`), handed back as Python values
(:class:`ZoneAnswer`) without encoding a query or a reply, which cost several times what
answering does. It gives what a client parsing :func:`respond`'s reply would read: the reply
is encoded only when it may not fit ``max_size`` (then cut as above) or when name compression
could change the case of the names a reader sees (RFC 1035 §4.1.4), and the records of each
RRset come in the order the encoder's shuffle would write them.

A query dnspython cannot parse gets a FORMERR header built by hand (there is no message to
echo). Every exception raised while answering a parsed query becomes an rcode in exactly one
place, :func:`_rcode_for` (docs/design.md: one error tree, translated at one edge): protocol
violations by the client are FORMERR, anything else SERVFAIL, and the unexpected exception is
handed back in :attr:`Reply.error` so the adapter can record it.

Deliberately unsupported: wildcards (RFC 4592), delegation below our zones (NS records are
answered as data, never as referrals), DNSSEC, zone transfers (AXFR/IXFR get NOTIMP), dynamic
update, classes other than IN. Record types are limited to A, AAAA, MX, TXT, CNAME, NS and SOA.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.mxbase
import dns.rdtypes.nsbase
import dns.rrset

from ..errors import ConfigError

__all__ = [
    "RECORD_TYPES",
    "AnswerCache",
    "Record",
    "Reply",
    "Zone",
    "ZoneAnswer",
    "ZoneSource",
    "answer",
    "build_zone",
    "default_records",
    "lookup",
    "query_name",
    "respond",
    "udp_max_size",
]

#: The record types a :class:`Record` may carry.
RECORD_TYPES = frozenset({"A", "AAAA", "MX", "TXT", "CNAME", "NS", "SOA"})

# A chain longer than this is a loop or a misconfiguration; RFC 1034 §3.6.2 asks resolvers to
# stop following, and an authoritative server may as well.
_MAX_CNAME_CHAIN = 8

# RFC 1035 §2.3.4: a UDP reply without EDNS is at most 512 octets.
UDP_PAYLOAD_DEFAULT = 512

# RFC 1035 §4.2.2: TCP messages carry a two-octet length, so 65535 octets at most.
TCP_PAYLOAD_MAX = 65535

# How long names outside every zone stay denied in a resolver's cache (RFC 2308 §5): the
# stack's zones use the same figure, and a test that adds a domain later should not wait long.
OUTSIDE_NEGATIVE_TTL = 60

# RFC 1035 §3.3.14: one <character-string> in a TXT record is at most 255 octets.
_TXT_CHUNK = 255

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record, as text.

    Args:
        name: owner name, absolute or not (``mail.example.org`` and ``mail.example.org.`` are
            the same name).
        rtype: one of :data:`RECORD_TYPES`.
        value: the RDATA in zone-file syntax: ``"127.0.0.1"``, ``"10 mail.example.org."``,
            ``"0 ."`` (null MX, RFC 7505). TXT values may be given unquoted; they are quoted and
            split into 255-octet strings as needed.
        ttl: time to live in seconds.
    """

    name: str
    rtype: str
    value: str
    ttl: int = 60


@dataclass(frozen=True, slots=True)
class Reply:
    """What :func:`respond` produced for one query.

    Attributes:
        wire: the reply in wire format; ``b""`` means send nothing.
        qname: the question's name as text ("" when the query could not be parsed).
        qtype: the question's type as text ("" when unknown).
        rcode: the reply's rcode as text ("NOERROR", "NXDOMAIN", ...).
        error: an unexpected exception turned into SERVFAIL, for the adapter to record.
    """

    wire: bytes
    qname: str
    qtype: str
    rcode: str
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class ZoneAnswer:
    """What :func:`lookup` found for one name and type, as the records themselves.

    The same reply :func:`respond` would put on the wire for a query of that name and type
    (no EDNS, RD set, as ``dns.message.make_query`` builds it), left as Python values: a
    client that parses that reply sees this rcode and these answer RRsets, in this order.

    Attributes:
        qname: the name as text, as :attr:`Reply.qname` logs it.
        qtype: the type as text.
        rcode: the reply's rcode as text ("NOERROR", "NXDOMAIN", "REFUSED" ...).
        answer: the answer section: the RRset asked for, after the CNAMEs leading to it;
            empty for a negative answer, or when the reply was cut to fit ``max_size``.
        truncated: the reply did not fit ``max_size`` and was cut (TC set, RFC 2181 §9).
        error: an unexpected exception turned into SERVFAIL, for the caller to record.
    """

    qname: str
    qtype: str
    rcode: str
    answer: tuple[dns.rrset.RRset, ...] = ()
    truncated: bool = False
    error: BaseException | None = None

    def rdatas(self, rtype: str) -> list[dns.rdata.Rdata]:
        """The records of type ``rtype`` in the answer section, in order."""
        wanted = dns.rdatatype.from_text(rtype)
        return [rdata for rrset in self.answer if rrset.rdtype == wanted for rdata in rrset]


@runtime_checkable
class ZoneSource(Protocol):
    """Something that answers a look-up from its zone without wire format (the stack's
    ``DNSServer``): ``None`` when it has no answer at all, as ``b""`` is on the wire.

    Raises:
        ValueError: ``name`` cannot be carried by a query (see :func:`query_name`).
    """

    def lookup(self, name: str, rtype: str) -> ZoneAnswer | None: ...


class Zone:
    """An immutable, indexed set of records under one or more zone apexes.

    Build it with :func:`build_zone`. ``apexes`` are the names carrying SOA records;
    ``outside_soa`` is the root-zone SOA sent with answers for names outside them.
    """

    __slots__ = ("_names", "_rrsets", "apexes", "outside_soa", "records", "refuse_outside")

    def __init__(
        self,
        rrsets: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]],
        apexes: tuple[dns.name.Name, ...],
        records: tuple[Record, ...],
        *,
        refuse_outside: bool,
    ) -> None:
        self._rrsets = rrsets
        self.apexes = apexes
        self.records = records
        self.refuse_outside = refuse_outside
        self.outside_soa = _root_soa(rrsets, apexes)
        names: set[dns.name.Name] = set()
        for name in rrsets:
            apex = self.apex_of(name)
            # Every ancestor down to the apex exists too (empty non-terminals, RFC 8020).
            while apex is not None and name != apex and name.is_subdomain(apex):
                names.add(name)
                name = name.parent()
            if apex is not None:
                names.add(apex)
        self._names = frozenset(names)

    def apex_of(self, name: dns.name.Name) -> dns.name.Name | None:
        """The closest enclosing apex of ``name``, or None when we do not serve it."""
        best: dns.name.Name | None = None
        for apex in self.apexes:
            if name.is_subdomain(apex) and (best is None or len(apex) > len(best)):
                best = apex
        return best

    def exists(self, name: dns.name.Name) -> bool:
        return name in self._names

    def above_apex(self, name: dns.name.Name) -> bool:
        """Whether ``name`` is the root or an ancestor of one of our apexes (``org.``)."""
        return any(apex.is_subdomain(name) for apex in self.apexes) or name == dns.name.root

    def rrset(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        return self._rrsets.get(name, {}).get(rdtype)

    def rrsets_at(self, name: dns.name.Name) -> list[dns.rrset.RRset]:
        return list(self._rrsets.get(name, {}).values())

    def __repr__(self) -> str:
        apexes = ", ".join(a.to_text() for a in self.apexes)
        return f"<Zone apexes=[{apexes}] records={len(self.records)}>"


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.strip(), origin=dns.name.root)


def _txt_value(value: str) -> str:
    if value.startswith('"'):
        return value
    data = value.encode("utf-8")
    chunks = [data[i : i + _TXT_CHUNK] for i in range(0, len(data), _TXT_CHUNK)] or [b""]
    quoted = []
    for chunk in chunks:
        text = chunk.decode("utf-8", "surrogateescape")
        quoted.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return " ".join(quoted)


def build_zone(records: Iterable[Record], *, refuse_outside: bool = False) -> Zone:
    """Index ``records`` for :func:`answer`.

    Args:
        records: the records; at least one SOA defines a zone apex, and every record must lie at
            or below an apex.
        refuse_outside: answer names outside every zone with NXDOMAIN and a root SOA (False,
            the default: nothing else exists, as the world's DNS would say) or with REFUSED
            (True: what an authoritative-only server says for names it does not serve).

    Returns:
        An immutable :class:`Zone`.

    Raises:
        ConfigError: an unsupported type, unparsable RDATA, or a record outside every zone.
    """
    records = tuple(records)
    rrsets: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
    apexes: list[dns.name.Name] = []
    for record in records:
        rtype = record.rtype.upper()
        if rtype not in RECORD_TYPES:
            raise ConfigError(
                f"unsupported DNS record type {record.rtype!r} for {record.name!r}; "
                f"expected one of {sorted(RECORD_TYPES)}"
            )
        try:
            name = _absolute(record.name)
            rdtype = dns.rdatatype.from_text(rtype)
            value = _txt_value(record.value) if rtype == "TXT" else record.value
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False
            )
        except dns.exception.DNSException as exc:
            raise ConfigError(f"bad DNS record {record!r}: {exc}") from exc
        by_type = rrsets.setdefault(name, {})
        rrset = by_type.get(rdtype)
        if rrset is None:
            rrset = by_type[rdtype] = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
        rrset.add(rdata, record.ttl)
        if rdtype == dns.rdatatype.SOA and name not in apexes:
            apexes.append(name)
    for name in rrsets:
        if not any(name.is_subdomain(apex) for apex in apexes):
            raise ConfigError(
                f"DNS record owner {name.to_text()!r} lies outside every zone "
                f"(apexes with an SOA record: {[a.to_text() for a in apexes]})"
            )
    return Zone(rrsets, tuple(apexes), records, refuse_outside=refuse_outside)


def default_records(
    domain: str, ip: str, *, mx_host: str | None = None, extra_ips: Iterable[str] = ()
) -> list[Record]:
    """The records a mail domain needs: SOA, NS, MX, the MX host's address, and SPF.

    Args:
        domain: the mail domain (``example.org``).
        ip: the address the domain's MX (and name server) answers on; IPv4 or IPv6.
        mx_host: the MX host name; ``mail.<domain>`` by default. Its address record is added
            only when it lies inside ``domain``.
        extra_ips: more addresses the MX and name server answer on (dual stack: ``::1``
            beside ``127.0.0.1``): one more A or AAAA record each, and one more SPF mechanism.

    Returns:
        Records for :func:`build_zone`: ``SOA``, ``NS ns.<domain>``, its address,
        ``MX 10 <mx_host>``, the MX host's A or AAAA, and ``TXT "v=spf1 ip4:<ip> -all"``.
    """
    apex = domain.rstrip(".").lower()
    addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in (ip, *extra_ips)))
    mx = (mx_host or f"mail.{apex}").rstrip(".").lower()
    ns = f"ns.{apex}"
    hosts = [ns, mx] if mx == apex or mx.endswith("." + apex) else [ns]
    spf = " ".join(f"ip{a.version}:{a}" for a in addresses)
    records = [
        Record(apex, "SOA", f"{ns}. hostmaster.{apex}. 1 3600 600 86400 60"),
        Record(apex, "NS", f"{ns}."),
        Record(apex, "MX", f"10 {mx}."),
        Record(apex, "TXT", f"v=spf1 {spf} -all"),
    ]
    for host in hosts:
        records += [Record(host, "AAAA" if a.version == 6 else "A", str(a)) for a in addresses]
    return records


def answer(zone: Zone, query: bytes, *, max_size: int = TCP_PAYLOAD_MAX) -> bytes:
    """Answer one DNS query in wire format.

    Args:
        zone: the records we serve.
        query: the query message (without the TCP length prefix).
        max_size: the largest reply the transport carries; a larger reply is truncated with
            the TC flag set (UDP: pass :func:`udp_max_size`).

    Returns:
        The reply in wire format, or ``b""`` when the input is too short to answer at all.
    """
    return respond(zone, query, max_size=max_size).wire


def respond(zone: Zone, query: bytes, *, max_size: int = TCP_PAYLOAD_MAX) -> Reply:
    """Like :func:`answer`, with the question and rcode for logging (see :class:`Reply`)."""
    try:
        message = dns.message.from_wire(query)
    except Exception:
        return _unparsable(query)
    qname, qtype = "", ""
    if len(message.question) == 1:
        qname = message.question[0].name.to_text()
        qtype = dns.rdatatype.to_text(message.question[0].rdtype)
    if message.flags & dns.flags.QR:
        # A response sent to us: answering could start a reflection loop, so drop it.
        return Reply(b"", qname, qtype, "FORMERR")
    try:
        response = _build(zone, message)
        wire = _to_wire(response, max_size)
        return Reply(wire, qname, qtype, dns.rcode.to_text(response.rcode()))
    except Exception as exc:
        rcode = _rcode_for(exc)
        response = dns.message.make_response(message)
        response.set_rcode(rcode)
        error = None if rcode == dns.rcode.FORMERR else exc
        return Reply(_to_wire(response, max_size), qname, qtype, dns.rcode.to_text(rcode), error)


@functools.lru_cache(maxsize=1024)
def query_name(name: str) -> dns.name.Name:
    """``name`` as the question name of a query for it (``dns.message.make_query``).

    Raises:
        ValueError: no query can carry ``name`` (an empty or over-long label, a name over
            255 octets, a relative name such as ``@``).
    """
    try:
        qname = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise ValueError(f"not a DNS name: {name!r}: {exc}") from None
    if not qname.is_absolute():  # what to_wire refuses (NeedAbsoluteNameOrOrigin)
        raise ValueError(f"not a DNS name: {name!r}: not absolute")
    return qname


def lookup(
    zone: Zone, name: dns.name.Name, rtype: str, *, max_size: int = TCP_PAYLOAD_MAX
) -> ZoneAnswer:
    """Answer a query for ``name`` and ``rtype`` as :func:`respond` does, without wire format.

    The reply is built by the same code as :func:`respond`'s (:func:`_build`), so CNAMEs,
    NXDOMAIN and NODATA, names outside every zone and ``refuse_outside`` behave alike. It is
    encoded, and read back as a client reads it, only when an upper bound of its size (no
    name compression) exceeds ``max_size`` (the encoder then decides, as for :func:`respond`,
    whether the reply is cut to fit or cannot be encoded at all, an rcode from
    :func:`_rcode_for`), or when an upper-case letter in a name lets compression change the
    case of the names a reader sees. Otherwise the records of each RRset are shuffled as the
    encoder would shuffle them (:func:`_shuffled`).

    Args:
        zone: the records we serve.
        name: the question name (:func:`query_name` makes one from text).
        rtype: the question type as text (``"TXT"``).
        max_size: the largest reply the caller would accept on the wire.

    Returns:
        The rcode and answer section a client parsing :func:`respond`'s reply would see.
    """
    return _lookup(zone, name, rtype, max_size)[0]


def _lookup(zone: Zone, name: dns.name.Name, rtype: str, max_size: int) -> tuple[ZoneAnswer, bool]:
    """:func:`lookup`, and whether the answer may be kept for the next look-up of the same
    name and type in the same zone (built without wire format and without an error; the
    records of each RRset are shuffled again for each use, :class:`AnswerCache`)."""
    rdtype = dns.rdatatype.from_text(rtype)
    qname, qtype = name.to_text(), dns.rdatatype.to_text(rdtype)
    query = dns.message.make_query(name, rdtype, id=0)
    try:
        response = _build(zone, query)
        wire: bytes | None = None
        if _size_bound(response) > max_size:
            wire = _to_wire(response, max_size)  # cuts the reply in place when it is too big
        truncated = bool(response.flags & dns.flags.TC)
        answer = tuple(response.answer)
        if answer and wire is None and _cased(name, answer):
            # Name compression (RFC 1035 §4.1.4) matches names whatever their case, so a
            # reader sees ``mail.EXAMPLE.org`` in an MX answer to ``EXAMPLE.org``.
            wire = response.to_wire(max_size=max_size)
        if answer and wire is not None:
            # Read the reply back, as a client does, to give the same names and order.
            answer = tuple(dns.message.from_wire(wire).answer)
        elif answer:
            answer = _shuffled(answer)
        rcode = dns.rcode.to_text(response.rcode())
        return ZoneAnswer(qname, qtype, rcode, answer, truncated), wire is None
    except Exception as exc:
        # As respond(): one place turns the exception into an rcode (_rcode_for).
        code = _rcode_for(exc)
        error = None if code == dns.rcode.FORMERR else exc
        return ZoneAnswer(qname, qtype, dns.rcode.to_text(code), (), False, error), False


class AnswerCache:
    """:func:`lookup` answers of one zone, kept until another zone is asked.

    A :class:`Zone` never changes, so an answer found in it stays right for as long as the
    same zone object is served; a new zone (``set_records``, ``set_zone``, a provider that
    returns another one) empties the cache on its first look-up. Building an answer costs
    about 85 us (a query message, the zone walk, the size bound); a kept one costs a dict
    look-up, plus a new shuffle of the records of each RRset with more than one, so record
    order varies per look-up as :func:`lookup`'s does. Answers that went through wire format
    (cut to fit ``max_size``, or names whose case compression would change) and errors are
    not kept. At most ``limit`` answers are kept; when full it starts again empty.
    """

    __slots__ = ("_answers", "_limit", "_zone")

    def __init__(self, limit: int = 1024) -> None:
        self._zone: Zone | None = None
        self._answers: dict[tuple[tuple[bytes, ...], str, int], ZoneAnswer] = {}
        self._limit = limit

    def lookup(
        self, zone: Zone, name: dns.name.Name, rtype: str, *, max_size: int = TCP_PAYLOAD_MAX
    ) -> ZoneAnswer:
        """:func:`lookup`, from the cache when this zone answered this question before."""
        if zone is not self._zone:
            self._zone = zone
            self._answers.clear()
        # The labels as they were written: names compare without case, answers do not.
        key = (name.labels, rtype, max_size)
        kept = self._answers.get(key)
        if kept is not None:
            if any(len(rrset) > 1 for rrset in kept.answer):
                return dataclasses.replace(kept, answer=_shuffled(kept.answer))
            return kept
        found, keep = _lookup(zone, name, rtype, max_size)
        if keep:
            if len(self._answers) >= self._limit:
                self._answers.clear()
            self._answers[key] = found
        return found


def _shuffled(answer: tuple[dns.rrset.RRset, ...]) -> tuple[dns.rrset.RRset, ...]:
    """``answer`` with the records of each RRset in the order the encoder would write them.

    dnspython's ``Rdataset.to_wire`` shuffles an RRset's records with :func:`random.shuffle`
    on every reply (RFC 2181 §5: their order carries no meaning); the same call on the same
    list gives a look-up the same order a parsed reply would have, draw for draw.
    """
    out = []
    for rrset in answer:
        if len(rrset) > 1:
            rdatas = list(rrset)
            random.shuffle(rdatas)
            rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, rdatas)
        out.append(rrset)
    return tuple(out)


def _cased(name: dns.name.Name, answer: tuple[dns.rrset.RRset, ...]) -> bool:
    """Whether an upper-case letter occurs in ``name`` or in a name of ``answer`` (owners,
    and the names inside MX, CNAME, NS and SOA records): only then can name compression
    make the names a reader sees differ from ours."""
    names = [name]
    for rrset in answer:
        names.append(rrset.name)
        for rdata in rrset:
            rdtype = rdata.rdtype
            if rdtype == dns.rdatatype.MX:
                names.append(rdata.exchange)
            elif rdtype in (dns.rdatatype.CNAME, dns.rdatatype.NS, dns.rdatatype.PTR):
                names.append(rdata.target)
            elif rdtype == dns.rdatatype.SOA:
                names += [rdata.mname, rdata.rname]
    return any(label != label.lower() for n in names for label in n.labels)


def _name_size(name: dns.name.Name) -> int:
    """Octets of ``name`` in wire format, uncompressed (RFC 1035 §3.1)."""
    return sum(len(label) + 1 for label in name.labels)


def _rdata_size(rdata: dns.rdata.Rdata) -> int:
    """An upper bound of the RDATA's octets in wire format (RFC 1035 §3.3)."""
    rdtype = rdata.rdtype
    if rdtype == dns.rdatatype.A:
        return 4
    if rdtype == dns.rdatatype.AAAA:
        return 16
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
        return sum(len(s) + 1 for s in rdata.strings)
    if isinstance(rdata, dns.rdtypes.mxbase.MXBase):
        return 2 + _name_size(rdata.exchange)
    if isinstance(rdata, dns.rdtypes.nsbase.NSBase):  # CNAME, NS, PTR
        return _name_size(rdata.target)
    if isinstance(rdata, dns.rdtypes.ANY.SOA.SOA):
        return _name_size(rdata.mname) + _name_size(rdata.rname) + 20
    return TCP_PAYLOAD_MAX + 1  # a type we do not size: let the encoder decide


def _size_bound(message: dns.message.Message) -> int:
    """An upper bound of ``message``'s size in wire format: header, question, and every
    record with its owner name uncompressed (RFC 1035 §4.1). No OPT record: the queries
    :func:`lookup` answers carry no EDNS, so neither do the replies."""
    size = 12 + sum(_name_size(q.name) + 4 for q in message.question)
    for section in (message.answer, message.authority, message.additional):
        for rrset in section:
            owner = _name_size(rrset.name) + 10
            size += sum(owner + _rdata_size(rdata) for rdata in rrset)
    return size


def udp_max_size(query: bytes) -> int:
    """The largest UDP reply the sender of ``query`` accepts (EDNS payload, RFC 6891 §6.2.5)."""
    try:
        message = dns.message.from_wire(query)
    except Exception:
        return UDP_PAYLOAD_DEFAULT
    if message.edns >= 0:
        return max(UDP_PAYLOAD_DEFAULT, min(message.payload, TCP_PAYLOAD_MAX))
    return UDP_PAYLOAD_DEFAULT


class _MalformedQuery(dns.exception.FormError):
    """A query dnspython parsed but that breaks the protocol (RFC 9619: one question)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)  # type: ignore[no-untyped-call]


def _rcode_for(exc: BaseException) -> dns.rcode.Rcode:
    """The one place where an exception raised while answering becomes an rcode.

    A query that breaks the protocol is the client's fault (FORMERR); anything else is ours
    (SERVFAIL), and :func:`respond` hands the exception to the adapter to record.
    """
    if isinstance(exc, dns.exception.FormError):
        return dns.rcode.FORMERR
    return dns.rcode.SERVFAIL


def _unparsable(query: bytes) -> Reply:
    """FORMERR built by hand: dnspython could not parse the query, so echo only its ID."""
    if len(query) < 2:
        return Reply(b"", "", "", "FORMERR")
    (qid,) = struct.unpack("!H", query[:2])
    if len(query) >= 4 and query[2] & 0x80:
        # A response (QR set) sent to us: answering it could start a reflection loop.
        return Reply(b"", "", "", "FORMERR")
    # Whatever dnspython raised, input it cannot parse is a format error (RFC 1035 §4.1.1).
    opcode_bits = (query[2] & 0x78) << 8 if len(query) >= 3 else 0
    flags = _QR | opcode_bits | int(dns.rcode.FORMERR)
    return Reply(_HEADER.pack(qid, flags, 0, 0, 0, 0), "", "", "FORMERR")


def _to_wire(response: dns.message.Message, max_size: int) -> bytes:
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        # RFC 2181 §9: set TC and drop what does not fit; the client retries over TCP.
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def _build(zone: Zone, query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags &= ~dns.flags.RA
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        # RFC 9619: a query carries exactly one question.
        raise _MalformedQuery(f"{len(query.question)} questions")
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        response.set_rcode(dns.rcode.REFUSED)
        return response
    if question.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    apex = zone.apex_of(question.name)
    if apex is None:
        if zone.refuse_outside:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        _outside(zone, response, question.name, question.rdtype)
        return response
    response.flags |= dns.flags.AA
    _resolve(zone, response, question.name, question.rdtype, apex)
    return response


def _resolve(
    zone: Zone,
    response: dns.message.Message,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    apex: dns.name.Name,
) -> None:
    seen: set[dns.name.Name] = set()
    for _ in range(_MAX_CNAME_CHAIN):
        seen.add(name)
        if not zone.exists(name):
            # RFC 6604 §2.1: after a CNAME the rcode describes the last name in the chain.
            response.set_rcode(dns.rcode.NXDOMAIN)
            _add_soa(zone, response, apex)
            return
        if rdtype == dns.rdatatype.ANY:
            response.answer.extend(zone.rrsets_at(name))
            return
        found = zone.rrset(name, rdtype)
        if found is not None:
            response.answer.append(found)
            _add_additionals(zone, response, found)
            return
        cname = zone.rrset(name, dns.rdatatype.CNAME)
        if cname is None or rdtype == dns.rdatatype.CNAME:
            _add_soa(zone, response, apex)
            return
        response.answer.append(cname)
        target = cname[0].target
        next_apex = zone.apex_of(target)
        if next_apex is None or target in seen:
            return
        name, apex = target, next_apex


def _outside(
    zone: Zone, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> None:
    """A name in none of our zones, answered as the root zone of a world holding only ours."""
    response.flags |= dns.flags.AA
    soa = zone.outside_soa
    if name == dns.name.root and rdtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
        response.answer.append(soa)
        return
    if not zone.above_apex(name):
        response.set_rcode(dns.rcode.NXDOMAIN)
    response.authority.append(_negative(soa))


def _root_soa(
    rrsets: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]],
    apexes: tuple[dns.name.Name, ...],
) -> dns.rrset.RRset:
    """The root SOA of our world: its server and mailbox are those of the first zone."""
    mname, rname = dns.name.root, dns.name.root
    if apexes:
        first = rrsets[apexes[0]][dns.rdatatype.SOA][0]
        mname, rname = first.mname, first.rname
    ttl = OUTSIDE_NEGATIVE_TTL
    text = f"{mname.to_text()} {rname.to_text()} 1 3600 600 86400 {ttl}"
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, text)
    rrset = dns.rrset.RRset(dns.name.root, dns.rdataclass.IN, dns.rdatatype.SOA)
    rrset.add(rdata, ttl)
    return rrset


def _negative(soa: dns.rrset.RRset) -> dns.rrset.RRset:
    """``soa`` for a negative answer: TTL the smaller of its own and MINIMUM (RFC 2308 §3)."""
    ttl = min(soa.ttl, soa[0].minimum)
    if ttl == soa.ttl:
        return soa
    copy = dns.rrset.RRset(soa.name, soa.rdclass, soa.rdtype)
    copy.add(soa[0], ttl)
    return copy


def _add_soa(zone: Zone, response: dns.message.Message, apex: dns.name.Name) -> None:
    soa = zone.rrset(apex, dns.rdatatype.SOA)
    if soa is not None:
        response.authority.append(_negative(soa))


def _add_additionals(zone: Zone, response: dns.message.Message, rrset: dns.rrset.RRset) -> None:
    if rrset.rdtype == dns.rdatatype.MX:
        targets = [rdata.exchange for rdata in rrset]
    elif rrset.rdtype == dns.rdatatype.NS:
        targets = [rdata.target for rdata in rrset]
    else:
        return
    for target in targets:
        for atype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            extra = zone.rrset(target, atype)
            if extra is not None and extra not in response.additional:
                response.additional.append(extra)
