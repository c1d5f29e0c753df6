"""DNS for the probe's e-mail authentication checks (docs/auth-checks.md): ``Lookup`` asks one
given server (``--dns HOST:PORT``) or the system resolver, ``lookup_for`` decides which (none
for a loopback target without ``--dns``), plus the organizational domain (RFC 7489 section
3.2) and the version-tagged TXT records (``v=spf1``, ``v=DMARC1`` ...) the checks read.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import dkim  # type: ignore[import-untyped]
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from ..config import Endpoint, parse_host_port
from ..errors import ConfigError

#: Characters of a header field kept as a finding's evidence.
MAX_EVIDENCE_CHARS = 300


def parse_dns_server(text: str) -> tuple[str, int]:
    """``--dns HOST[:PORT]`` (port 53 when absent; ``[v6]:port`` for IPv6).

    Raises:
        ConfigError: an empty host or a bad port.
    """
    host, port = parse_host_port(text, default_port=53, option="--dns", hint=" (an IP address)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--dns {text!r}: HOST must be an IP address") from None
    return host, port


# -- DNS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One DNS answer: ``rcode`` (``NOERROR``, ``NXDOMAIN``, ``SERVFAIL``, ``TIMEOUT``), the
    values of the asked type (TXT strings joined), and the CNAME target the name had."""

    rcode: str
    values: tuple[str, ...] = ()
    cname: str = ""

    @property
    def failed(self) -> bool:
        """The question was not answered (no answer is not the same as no records)."""
        return self.rcode not in ("NOERROR", "NXDOMAIN")

    def describe(self, name: str, rtype: str) -> str:
        shown = "; ".join(self.values) if self.values else self.rcode
        if self.rcode == "NOERROR" and not self.values:
            shown = "no records"
        return f"{name} {rtype}: {shown}"[:MAX_EVIDENCE_CHARS]


class Lookup:
    """DNS queries for the checks: to ``server`` (host, port) when given, else through the
    system resolver; each with ``timeout`` seconds in all."""

    def __init__(self, server: tuple[str, int] | None = None, *, timeout: float = 5.0) -> None:
        self.server = server
        if server is None:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # No /etc/resolv.conf: every question then fails, as a dns-error finding.
                self._resolver = dns.resolver.Resolver(configure=False)
        else:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [server[0]]
            self._resolver.port = server[1]
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout

    def __str__(self) -> str:
        if self.server is None:
            return "the system resolver"
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def query(self, name: str, rtype: str) -> Answer:
        try:
            answer = self._resolver.resolve(name, rtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer("NXDOMAIN")
        except dns.resolver.NoNameservers:
            return Answer("SERVFAIL")
        except dns.exception.Timeout:
            return Answer("TIMEOUT")
        except (dns.exception.DNSException, OSError) as exc:
            return Answer(type(exc).__name__)
        wanted = dns.rdatatype.from_text(rtype)
        values: list[str] = []
        cname = ""
        for rrset in answer.response.answer:
            if rrset.rdtype == dns.rdatatype.CNAME and not cname:
                cname = str(next(iter(rrset)).target).rstrip(".")
            if rrset.rdtype != wanted:
                continue
            for rdata in rrset:
                if wanted == dns.rdatatype.TXT:
                    values.append(b"".join(rdata.strings).decode("utf-8", "replace"))
                else:
                    values.append(rdata.to_text())
        return Answer("NOERROR", tuple(values), cname)

    def txt(self, name: str) -> Answer:
        return self.query(name, "TXT")

    def dkim_key(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the TXT record at ``name``, or None."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = self.txt(text.rstrip("."))
        if answer.failed:
            raise dkim.DnsTimeoutError(f"{answer.describe(text, 'TXT')} (via {self})")
        return answer.values[0].encode() if answer.values else None


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def lookup_for(
    dns_server: tuple[str, int] | None, target: Endpoint, *, timeout: float = 5.0
) -> Lookup | None:
    """The DNS the checks use: ``dns_server`` when given; else the system resolver, unless
    ``target`` is on loopback (a test world, whose domains are not looked up on the
    internet): then None, and the checks that need DNS say they did not run."""
    if dns_server is not None:
        return Lookup(dns_server, timeout=timeout)
    if _is_loopback(target.host):
        return None
    return Lookup(None, timeout=timeout)


@functools.cache
def _suffixes() -> Any:
    """The Public Suffix List, loaded once (about 90 ms), and only when first needed."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organizational(domain: str) -> str:
    """The organizational domain (RFC 7489 section 3.2: public suffix plus one label)."""
    name = domain.lower().rstrip(".")
    return str(_suffixes().privatesuffix(name) or name)


def is_name(host: str) -> bool:
    """A host name (not empty, not an address literal)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return bool(host) and "." in host
    return False


def tagged_records(answer: Answer, version: str) -> list[str]:
    """The TXT values that start with the version tag ``version`` (``v=spf1``, ...)."""
    pattern = re.compile(rf"(?i)^\s*{re.escape(version)}(\s*;|\s|$)")
    return [v for v in answer.values if pattern.match(v)]
