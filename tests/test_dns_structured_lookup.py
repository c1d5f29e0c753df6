"""The MX's look-ups without wire format give what the wire path gives, name for name.

The stack's SPF, DMARC, DKIM and ARC checks ask its DNS server in memory. They used to build a
query in wire format, have ``DNSServer.answer`` parse it and encode a reply, and parse that
reply (roundtrip/stack/_auth.py and _dkim.py ``zone_lookup`` over a function of bytes); they
now ask ``DNSServer.lookup`` for the records as Python values. These tests run both paths
over many names, types and zones (CNAME chains and loops, NXDOMAIN, NODATA, names outside
every zone with and without ``refuse_outside``, names no query can carry, TXT records too big
for a reply) and compare what the checks see, the query log and the errors recorded. The
twins feed the same comparison a structured path that differs in one way and show it is
caught.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from roundtrip.config import StackConfig
from roundtrip.protocols.dns import (
    TCP_PAYLOAD_MAX,
    Record,
    Zone,
    ZoneAnswer,
    ZoneSource,
    build_zone,
    default_records,
    lookup,
    query_name,
    respond,
)
from roundtrip.servers.dns import DNSServer
from roundtrip.stack._auth import sender_auth_records
from roundtrip.stack._auth import zone_lookup as sender_zone_lookup
from roundtrip.stack._dkim import zone_lookup as key_zone_lookup

TYPES = ("A", "AAAA", "MX", "TXT", "PTR")

# One TXT record as long as a key record may get (three 255-octet strings and a tail), one
# whose RDATA alone passes 65535 octets (no reply can carry it), and 250 records of 240
# octets under a long owner: 87 kB uncompressed, under 64 kB once the owner is a pointer.
_LONG = "k=rsa; p=" + "A" * 800
_HUGE = "x" * 70_000
_MANY_OWNER = "many-strings-under-a-rather-long-owner-name." + "l" * 40 + ".example.com"


def _records() -> list[Record]:
    config = StackConfig(domains=("example.com", "example.org"))
    records = [r for d in config.domains for r in default_records(d, "127.0.0.1")]
    records = sender_auth_records(config, records)
    records += [
        *default_records("example.net", "::1", extra_ips=("127.0.0.9",)),
        Record("example.org", "MX", "20 mx2.example.org."),
        Record("mx2.example.org", "AAAA", "::1"),
        Record("mx2.example.org", "A", "127.0.0.2"),
        Record("nullmx.example.org", "MX", "0 ."),
        Record("rt-rsa._domainkey.example.com", "TXT", _LONG),
        Record("rt-ed._domainkey.example.com", "TXT", "v=DKIM1; k=ed25519; p=AAAA"),
        # Two records at one name: SPF sees both, DKIM takes the first.
        Record("two.example.com", "TXT", "v=spf1 -all"),
        Record("two.example.com", "TXT", "v=spf1 +all"),
        # Strings given as such, and octets that are not UTF-8.
        Record("quoted.example.com", "TXT", '"v=spf1 " "ip4:127.0.0.1" " -all"'),
        Record("octets.example.com", "TXT", '"caf\\233 \\255\\000"'),
        Record("utf8.example.com", "TXT", "v=DMARC1; p=none; rua=mailto:ünï@example.com"),
        Record("empty.example.com", "TXT", '""'),
        # CNAMEs: a chain across zones, one to a missing name, one leaving our zones, a loop,
        # one longer than the server follows, and one to a name without the type asked.
        Record("alias.example.com", "CNAME", "hop.example.org."),
        Record("hop.example.org", "CNAME", "example.org."),
        Record("dangling.example.com", "CNAME", "nowhere.example.org."),
        Record("leaving.example.com", "CNAME", "elsewhere.invalid."),
        Record("loop-a.example.com", "CNAME", "loop-b.example.com."),
        Record("loop-b.example.com", "CNAME", "loop-a.example.com."),
        *[Record(f"c{i}.example.net", "CNAME", f"c{i + 1}.example.net.") for i in range(10)],
        Record("c10.example.net", "TXT", "end of a long chain"),
        Record("to-mx.example.com", "CNAME", "mail.example.org."),
        Record("_dmarc.alias2.example.com", "CNAME", "_dmarc.example.org."),
        # An empty non-terminal (deep.example.com exists only through a name below it).
        Record("a.b.deep.example.com", "TXT", "leaf"),
        Record("huge.example.com", "TXT", _HUGE),
        *[Record(_MANY_OWNER, "TXT", f"{i:03d}" + "m" * 237) for i in range(250)],
        # Three records of 25 kB: too big for one reply even with compression.
        *[Record("toobig.example.com", "TXT", f"{i}" + "t" * 25_000) for i in range(3)],
    ]
    return records


NAMES = (
    "example.com",
    "example.org",
    "example.net",
    "EXAMPLE.Com",
    "example.org.",
    "_dmarc.example.com",
    "_dmarc.example.org",
    "_dmarc.example.net",
    "_dmarc.alias2.example.com",
    "mail.example.com",
    "mail.example.org",
    "mx2.example.org",
    "ns.example.net",
    "nullmx.example.org",
    "rt-rsa._domainkey.example.com",
    "rt-ed._domainkey.example.com",
    "absent._domainkey.example.com",
    "two.example.com",
    "quoted.example.com",
    "octets.example.com",
    "utf8.example.com",
    "empty.example.com",
    "alias.example.com",
    "hop.example.org",
    "dangling.example.com",
    "leaving.example.com",
    "loop-a.example.com",
    "c0.example.net",
    "c3.example.net",
    "to-mx.example.com",
    "deep.example.com",
    "b.deep.example.com",
    "a.b.deep.example.com",
    "nope.example.com",
    "huge.example.com",
    _MANY_OWNER,
    "toobig.example.com",
    # Outside every zone, above our zones, and the root.
    "example.invalid",
    "gmail.com",
    "com",
    "org.",
    ".",
    # Labels a query can carry only escaped, or not at all.
    "under_score.example.com",
    "-lead.example.com",
    "*.example.com",
    "sp ace.example.com",
    "a\\.b.example.com",
    "\\000.example.com",
    "ünïcode.example.com",
    "xn--nxasmq6b.example.com",
    "a..b.example.com",
    "x" * 64 + ".example.com",
    ".".join(["y" * 60] * 5),
    "",
    "@",
    "trailing\\",
    "\udcff.example.com",
    "a\u200db.example.com",
)


def _zones() -> dict[str, Zone]:
    records = _records()
    return {
        "nxdomain outside": build_zone(records),
        "refused outside": build_zone(records, refuse_outside=True),
        "one zone": build_zone(default_records("example.org", "127.0.0.1")),
    }


ZONES = _zones()


@pytest.fixture(autouse=True)
def _random_state() -> Iterator[None]:
    """The tests seed the random module: leave it as it was for the tests after them."""
    state = random.getstate()
    yield
    random.setstate(state)


def _failing() -> Zone:
    raise RuntimeError("the zone provider failed")


def _servers(provider: Callable[[], Zone]) -> tuple[DNSServer, list[BaseException]]:
    errors: list[BaseException] = []
    server = DNSServer(provider, host="127.0.0.1", on_error=errors.append, tcp_idle_timeout=1.0)
    return server, errors


def _call(check: Callable[[], object]) -> object:
    """What ``check`` returns, or the exception it raises, by type and text."""
    try:
        return check()
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def _outcomes(
    provider: Callable[[], Zone],
    structured: Callable[[DNSServer], ZoneSource] | None,
    names: Iterable[str] = NAMES,
) -> list[tuple[str, str, object, object, object]]:
    """For each name and type: what SPF/DMARC sees, what DKIM sees (TXT only), and the query
    log entries and errors that produced them. ``structured``: None for the wire path (the
    adapters over ``DNSServer.answer``), else a function giving the source the adapters ask."""
    server, errors = _servers(provider)

    def wire(query: bytes) -> bytes:  # what the stack passed before DNSServer.lookup existed
        return server.answer(query, max_size=TCP_PAYLOAD_MAX)

    source = wire if structured is None else structured(server)
    sender, keys = sender_zone_lookup(source), key_zone_lookup(source)
    out: list[tuple[str, str, object, object, object]] = []
    for i, name in enumerate(names):
        for j, rtype in enumerate(TYPES):
            start_log, start_errors = len(server.query_log), len(errors)
            # The encoder shuffles each RRset's records with the random module; both paths
            # draw from it alike, so the same seed gives the same order (protocols/dns.py).
            random.seed(i * 10 + j)
            seen = _call(lambda: sender(name, rtype))  # noqa: B023 - called at once
            key = None
            if rtype == "TXT":
                random.seed(-(i * 10 + j))
                key = _call(lambda: keys(name))  # noqa: B023 - called at once
            log = tuple(server.query_log[start_log:])
            raised = tuple(f"{type(e).__name__}: {e}" for e in errors[start_errors:])
            out.append((name, rtype, (seen, key), log, raised))
    return out


def _differences(
    provider: Callable[[], Zone],
    structured: Callable[[DNSServer], ZoneSource],
    names: Iterable[str] = NAMES,
) -> list[str]:
    names = tuple(names)
    wire = _outcomes(provider, None, names)
    other = _outcomes(provider, structured, names)
    return [
        f"{w[0]!r} {w[1]}: wire {w[2:]} structured {o[2:]}"
        for w, o in zip(wire, other, strict=True)
        if w != o
    ]


def _same_server(server: DNSServer) -> ZoneSource:
    return server


@pytest.mark.parametrize("zone_name", sorted(ZONES))
def test_both_paths_see_the_same_answers_logs_and_errors(zone_name: str) -> None:
    zone = ZONES[zone_name]
    assert _differences(lambda: zone, _same_server) == []

    # The comparison covered what it claims: every kind of answer and rcode occurred.
    outcomes = _outcomes(lambda: zone, _same_server)
    rcodes = {entry[2] for o in outcomes for entry in o[3]}  # type: ignore[index]
    statuses = {getattr(o[2][0], "status", None) for o in outcomes}  # type: ignore[index]
    raised = [o for o in outcomes if isinstance(o[2][0], tuple)]  # type: ignore[index]
    assert {"found", "missing"} <= statuses
    assert "NOERROR" in rcodes
    if zone_name == "refused outside":
        assert "REFUSED" in rcodes and "NXDOMAIN" in rcodes
    else:
        assert "REFUSED" not in rcodes and "NXDOMAIN" in rcodes
    if zone_name != "one zone":
        # The TXT record no reply can carry: dnspython's encoder raises FormError, which
        # respond() turns into FORMERR (its _rcode_for), and the checks into "error".
        assert "FORMERR" in rcodes
        assert "error" in statuses
    # A name no query can carry reaches no server: nothing logged, "missing" on both paths.
    assert any(o[3] == () for o in outcomes)
    assert not raised


def test_a_failing_zone_provider_gives_the_same_error_on_both_paths() -> None:
    assert _differences(_failing, _same_server, ["example.com", "nope.example.org"]) == []
    outcomes = _outcomes(_failing, _same_server, ["example.com"])
    assert all(
        o[3] == ()
        and o[4] == ("RuntimeError: the zone provider failed",) * (2 if o[1] == "TXT" else 1)
        for o in outcomes
    )


def test_the_stacks_entries_are_logged_as_tests_expect_them() -> None:
    server, errors = _servers(lambda: ZONES["nxdomain outside"])
    sender, keys = sender_zone_lookup(server), key_zone_lookup(server)
    assert sender("_dmarc.example.com", "TXT").records == ("v=DMARC1; p=reject",)
    mxs = sender("alias.example.com", "MX").records  # shuffled, as on the wire
    assert sorted(mxs) == ["mail.example.org", "mx2.example.org"]
    assert keys("rt-rsa._domainkey.example.com").text == _LONG.encode()
    assert keys("huge.example.com").status == "error"
    assert sender("x" * 64 + ".example.com", "TXT").status == "missing"
    assert server.lookup("gmail.com", "TXT") == ZoneAnswer("gmail.com.", "TXT", "NXDOMAIN")
    assert server.query_log == [
        ("_dmarc.example.com.", "TXT", "NOERROR"),
        ("alias.example.com.", "MX", "NOERROR"),
        ("rt-rsa._domainkey.example.com.", "TXT", "NOERROR"),
        ("huge.example.com.", "TXT", "FORMERR"),
        ("gmail.com.", "TXT", "NXDOMAIN"),
    ]
    assert errors == []
    with pytest.raises(ValueError, match="not a DNS name"):
        server.lookup("a..b.example.com", "TXT")
    assert len(server.query_log) == 5


# The protocol layer: the pure look-up against respond()'s reply, parsed.


def _parsed(zone: Zone, name: str, rtype: str, max_size: int) -> tuple[object, ...]:
    query = dns.message.make_query(name, rtype)
    random.seed(f"{name!r}/{rtype}")
    reply = respond(zone, query.to_wire(), max_size=max_size)
    message = dns.message.from_wire(reply.wire)
    rrsets = tuple(_rrset_text(r) for r in message.answer)
    truncated = bool(message.flags & dns.flags.TC)
    rcode = dns.rcode.to_text(message.rcode())
    return (reply.qname, reply.qtype, reply.rcode, rcode, rrsets, truncated, _err(reply.error))


def _structured(zone: Zone, name: str, rtype: str, max_size: int) -> tuple[object, ...]:
    random.seed(f"{name!r}/{rtype}")
    found = lookup(zone, query_name(name), rtype, max_size=max_size)
    rrsets = tuple(_rrset_text(r) for r in found.answer)
    return (
        found.qname,
        found.qtype,
        found.rcode,
        found.rcode,
        rrsets,
        found.truncated,
        _err(found.error),
    )


def _rrset_text(rrset: dns.rrset.RRset) -> tuple[str, str, tuple[str, ...]]:
    return (rrset.name.to_text(), str(rrset.rdtype), tuple(r.to_text() for r in rrset))


def _err(error: BaseException | None) -> str:
    return "" if error is None else type(error).__name__


def _encodable(names: Iterable[str]) -> Iterator[str]:
    for name in names:
        try:
            query_name(name)
        except (ValueError, UnicodeError):
            continue
        yield name


@pytest.mark.parametrize("max_size", [TCP_PAYLOAD_MAX, 512, 1232, 4096])
@pytest.mark.parametrize("zone_name", sorted(ZONES))
def test_the_pure_lookup_matches_the_parsed_reply(zone_name: str, max_size: int) -> None:
    zone = ZONES[zone_name]
    cases = [(n, t) for n in _encodable(NAMES) for t in (*TYPES, "CNAME", "NS", "SOA")]
    wrong = [
        (n, t, _parsed(zone, n, t, max_size), _structured(zone, n, t, max_size))
        for n, t in cases
        if _parsed(zone, n, t, max_size) != _structured(zone, n, t, max_size)
    ]
    assert wrong == []
    truncated = [c for c in cases if _structured(zone, *c, max_size)[5]]
    if zone_name != "one zone":
        # Cut replies occurred, and a reply over the uncompressed bound still fit in 64 kB.
        assert truncated
        many = _structured(zone, _MANY_OWNER, "TXT", max_size)
        assert many[5] is (max_size != TCP_PAYLOAD_MAX)
        assert len(many[4]) == (1 if max_size == TCP_PAYLOAD_MAX else 0)


# The twins: a structured path that differs in one way is caught.


@dataclasses.dataclass
class _Skewed:
    """A source answering through ``server.lookup``, with ``change`` applied to each answer
    (and ``log`` to each query log entry it adds)."""

    server: DNSServer
    change: Callable[[ZoneAnswer], ZoneAnswer] = lambda found: found
    log: Callable[[tuple[str, str, str]], tuple[str, str, str]] = lambda entry: entry

    def lookup(self, name: str, rtype: str) -> ZoneAnswer | None:
        found = self.server.lookup(name, rtype)
        if self.server.query_log:
            self.server.query_log[-1] = self.log(self.server.query_log[-1])
        return None if found is None else self.change(found)


def _no_cname_following(found: ZoneAnswer) -> ZoneAnswer:
    return dataclasses.replace(found, answer=found.answer[:1])


def _nodata_as_servfail(found: ZoneAnswer) -> ZoneAnswer:
    if found.rcode == "NOERROR" and not found.answer:
        return dataclasses.replace(found, rcode="SERVFAIL")
    return found


def _refused_as_servfail(entry: tuple[str, str, str]) -> tuple[str, str, str]:
    return (entry[0], entry[1], "SERVFAIL" if entry[2] == "REFUSED" else entry[2])


def _lowercase_names(entry: tuple[str, str, str]) -> tuple[str, str, str]:
    return (entry[0].lower(), entry[1], entry[2])


def _records_reversed(found: ZoneAnswer) -> ZoneAnswer:
    answer = []
    for rrset in found.answer:
        turned = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype)
        for rdata in reversed(list(rrset)):
            turned.add(rdata, rrset.ttl)
        answer.append(turned)
    return dataclasses.replace(found, answer=tuple(answer))


@pytest.mark.parametrize(
    ("zone_name", "skew", "caught"),
    [
        ("nxdomain outside", {"change": _no_cname_following}, "'alias.example.com' MX"),
        ("nxdomain outside", {"change": _nodata_as_servfail}, "'deep.example.com' TXT"),
        ("refused outside", {"log": _refused_as_servfail}, "'gmail.com' TXT"),
        ("nxdomain outside", {"log": _lowercase_names}, "'EXAMPLE.Com' A"),
        ("nxdomain outside", {"change": _records_reversed}, "'two.example.com' TXT"),
    ],
)
def test_the_comparison_catches_a_structured_path_that_differs(
    zone_name: str, skew: dict[str, object], caught: str
) -> None:
    zone = ZONES[zone_name]
    differences = _differences(
        lambda: zone,
        lambda server: _Skewed(server, **skew),  # type: ignore[arg-type]
    )
    assert differences, "the comparison saw no difference"
    assert any(d.startswith(caught) for d in differences), differences[:3]


def test_the_protocol_comparison_catches_a_difference() -> None:
    zone = ZONES["nxdomain outside"]
    # What the pure look-up would give if it ignored max_size: the parsed reply is cut.
    assert _parsed(zone, _MANY_OWNER, "TXT", 512) != _structured(
        zone, _MANY_OWNER, "TXT", TCP_PAYLOAD_MAX
    )
    assert _parsed(zone, _MANY_OWNER, "TXT", 512) == _structured(zone, _MANY_OWNER, "TXT", 512)
