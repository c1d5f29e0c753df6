"""The running stack's DNS answers as the world's would, asked by dnspython and by ``dig``.

Issue "DNS that behaves as the world's": a real MTA or resolver pointed at the stack's DNS
treats REFUSED as temporary and retries forever, so a name in no zone must be NXDOMAIN with an
SOA (a cacheable denial, RFC 2308); a known name without the asked type is NODATA; queries with
recursion desired (what stub resolvers and ``dig`` send) are answered; a UDP answer too big for
the client comes back truncated (TC) and the client gets it over TCP.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from roundtrip.protocols.dns import Record
from roundtrip.stack import MailStack

TIMEOUT = 10.0

# Five TXT strings of 152 octets: about 860 octets in all, more than 512 (no EDNS) and less than
# the 1232 that dig advertises with EDNS.
BIG_TXT = [Record("big.example.org", "TXT", f"{i:02d}" + "y" * 150) for i in range(5)]


@pytest.fixture(scope="module")
def running() -> Iterator[MailStack]:
    with MailStack() as stack:
        yield stack


@pytest.fixture
def stack(running: MailStack) -> Iterator[MailStack]:
    running.reset()  # the default records again
    yield running
    running.check()


def dns_address(stack: MailStack) -> tuple[str, int]:
    assert stack.dns is not None
    return stack.dns.address


def resolver(stack: MailStack) -> dns.resolver.Resolver:
    res = dns.resolver.Resolver(configure=False)
    host, port = dns_address(stack)
    res.nameservers = [host]
    res.port = port
    res.lifetime = TIMEOUT
    res.cache = None
    return res


def dig(stack: MailStack, *args: str) -> str:
    path = shutil.which("dig")
    if path is None:
        pytest.skip("dig not installed (Debian package dnsutils)")
    host, port = dns_address(stack)
    proc = subprocess.run(
        [path, f"@{host}", "-p", str(port), "+time=2", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def status(out: str) -> str:
    match = re.search(r"status: (\w+)", out)
    assert match is not None, out
    return match.group(1)


def flags(out: str) -> set[str]:
    match = re.search(r";; flags: ([a-z ]*);", out)
    assert match is not None, out
    return set(match.group(1).split())


def section(out: str, name: str) -> list[list[str]]:
    """The records of one section of dig's output, each split into fields."""
    match = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
    if match is None:
        return []
    return [line.split(None, 4) for line in match.group(1).splitlines()]


# names in no zone


def test_dns_world_unknown_domain_is_nxdomain_with_soa_dnspython(stack: MailStack) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(stack).resolve("no-such-domain.invalid", "MX")
    host, port = dns_address(stack)
    query = dns.message.make_query("no-such-domain.invalid", "MX")
    reply = dns.query.udp(query, host, port=port, timeout=TIMEOUT)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    [soa] = reply.authority
    assert soa.name.to_text() == "."
    assert soa.ttl == soa[0].minimum


def test_dns_world_unknown_domain_is_nxdomain_with_soa_dig(stack: MailStack) -> None:
    # Before: status REFUSED and no authority section.
    out = dig(stack, "no-such-domain.invalid", "MX")

    assert status(out) == "NXDOMAIN", out
    assert "rd" in flags(out)  # dig asks for recursion; the question is answered all the same
    [[owner, ttl, _, rtype, _]] = section(out, "AUTHORITY")
    assert (owner, rtype, ttl) == (".", "SOA", "60")


def test_dns_world_refused_only_when_asked_for(stack: MailStack) -> None:
    stack.set_dns_records(stack.default_dns_records(), refuse_outside=True)

    out = dig(stack, "no-such-domain.invalid", "MX")

    assert status(out) == "REFUSED", out
    assert section(out, "AUTHORITY") == []


# names in our zones


def test_dns_world_known_name_without_the_type_is_nodata(stack: MailStack) -> None:
    out = dig(stack, "mail.example.org", "MX")

    assert status(out) == "NOERROR", out
    assert section(out, "ANSWER") == []
    [[owner, ttl, _, rtype, _]] = section(out, "AUTHORITY")
    assert (owner, rtype, ttl) == ("example.org.", "SOA", "60")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver(stack).resolve("mail.example.org", "MX")


def test_dns_world_mx_answer_with_recursion_desired(stack: MailStack) -> None:
    out = dig(stack, "+recurse", "example.org", "MX")

    assert status(out) == "NOERROR", out
    assert {"qr", "aa", "rd"} <= flags(out)
    assert "ra" not in flags(out)  # authoritative only: we never recurse
    [[owner, ttl, _, rtype, value]] = section(out, "ANSWER")
    assert (owner, ttl, rtype, value) == ("example.org.", "60", "MX", "10 mail.example.org.")
    [[owner, _, _, rtype, value]] = section(out, "ADDITIONAL")[-1:]
    assert (owner, rtype) == ("mail.example.org.", "A")


# truncation and TCP


def test_dns_world_big_answer_truncated_on_udp_then_tcp(stack: MailStack) -> None:
    stack.set_dns_records([*stack.default_dns_records(), *BIG_TXT])

    truncated = dig(stack, "+noedns", "+ignore", "big.example.org", "TXT")
    full = dig(stack, "+noedns", "big.example.org", "TXT")

    assert "tc" in flags(truncated), truncated
    assert section(truncated, "ANSWER") == []
    assert "Truncated, retrying in TCP mode" in full, full
    assert len(section(full, "ANSWER")) == 5
    answer = resolver(stack).resolve("big.example.org", "TXT")  # dnspython retries over TCP too
    assert len(answer) == 5


def test_dns_world_big_answer_fits_the_edns_payload(stack: MailStack) -> None:
    stack.set_dns_records([*stack.default_dns_records(), *BIG_TXT])

    out = dig(stack, "+edns=0", "+bufsize=1232", "+ignore", "big.example.org", "TXT")

    assert "tc" not in flags(out), out
    assert len(section(out, "ANSWER")) == 5
    host, port = dns_address(stack)
    query = dns.message.make_query("big.example.org", "TXT", use_edns=0, payload=1232)
    reply = dns.query.udp(query, host, port=port, timeout=TIMEOUT)
    assert not reply.flags & dns.flags.TC
    query = dns.message.make_query("big.example.org", "TXT", use_edns=0, payload=512)
    reply = dns.query.udp(query, host, port=port, timeout=TIMEOUT)
    assert reply.flags & dns.flags.TC
