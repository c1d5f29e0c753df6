"""IPv6: a stack on ::1 alone, and a dual-stack one on 127.0.0.1 and ::1 (issue #13, item 6).

Clients verify the stack's certificates over both families (smtplib on 465, imapclient on 993,
poplib on 995), the stack's DNS serves AAAA records for the hosts listening on ::1, and the
relay carries cross-domain mail to an MX that listens on ::1 only. Skipped where ::1 cannot be
bound (a container without IPv6).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import poplib
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Iterator

import dns.message
import dns.query
import dns.rdatatype
import pytest
import trustme
from _support import make_message
from imapclient import IMAPClient

from roundtrip import MailStack, StackConfig
from roundtrip.errors import ConfigError, ServerStartError
from roundtrip.protocols.dns import Record
from roundtrip.stack import SERVICES
from roundtrip.stack._services import Listeners
from roundtrip.store import Store

TIMEOUT = 10.0


def _ipv6_loopback() -> str | None:
    """Why ::1 is unusable here, or None when a socket can bind it."""
    if not socket.has_ipv6:
        return "this Python has no IPv6 support (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1 on this machine: {exc}"
    return None


_NO_IPV6 = _ipv6_loopback()
pytestmark = pytest.mark.skipif(_NO_IPV6 is not None, reason=_NO_IPV6 or "")


@pytest.fixture(scope="module")
def v6_stack() -> Iterator[MailStack]:
    """Every listener (and the DNS) on ::1 only."""
    with MailStack(StackConfig(host="::1")) as stack:
        yield stack


@pytest.fixture(scope="module")
def dual_stack() -> Iterator[MailStack]:
    """Every listener on 127.0.0.1 and on ::1, one port per service."""
    with MailStack(StackConfig(extra_hosts=("::1",))) as stack:
        yield stack


def _submit(stack: MailStack, host: str, *, sender: str, rcpt: str, subject: str) -> None:
    port = stack.domains[sender.rpartition("@")[2]].ports["submissions"]
    user = stack.user(sender)
    raw = make_message(sender=sender, recipient=rcpt, subject=subject)
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(sender, [rcpt], raw)


def _imap_subjects(stack: MailStack, host: str, address: str, context: ssl.SSLContext) -> list[str]:
    port = stack.domains[address.rpartition("@")[2]].ports["imaps"]
    user = stack.user(address)
    with IMAPClient(host, port=port, ssl=True, ssl_context=context, timeout=TIMEOUT) as client:
        client.login(user.address, user.password)
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        return [
            data[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode().strip().removeprefix("Subject: ")
            for data in fetched.values()
        ]


def _pop3_count(stack: MailStack, host: str, address: str, context: ssl.SSLContext) -> int:
    port = stack.domains[address.rpartition("@")[2]].ports["pop3s"]
    user = stack.user(address)
    pop = poplib.POP3_SSL(host, port, context=context, timeout=TIMEOUT)
    try:
        pop.user(user.address)
        pop.pass_(user.password)
        return int(pop.stat()[0])
    finally:
        pop.quit()


def _ask(stack: MailStack, name: str, rdtype: str) -> list[str]:
    assert stack.dns is not None
    query = dns.message.make_query(name, rdtype)
    reply = dns.query.udp(query, stack.dns.host, port=stack.dns.port, timeout=TIMEOUT)
    wanted = dns.rdatatype.from_text(rdtype)
    return [rdata.to_text() for rrset in reply.answer if rrset.rdtype == wanted for rdata in rrset]


def _other_ca_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    trustme.CA().configure_trust(context)
    return context


# -- a stack on ::1 only ----------------------------------------------------------------------


def test_ipv6_stack_serves_verified_clients_on_loopback_v6(v6_stack: MailStack) -> None:
    """smtplib 465, imapclient 993 and poplib 995 verify the leaf against the address ::1."""
    v6_stack.reset()
    sender, rcpt = v6_stack.user("example.com"), v6_stack.user("example.org")
    _submit(v6_stack, "::1", sender=sender.address, rcpt=sender.address, subject="v6 local")
    v6_stack.wait_for(sender.address, subject="v6 local", timeout=TIMEOUT)
    context = v6_stack.client_context()
    assert _imap_subjects(v6_stack, "::1", sender.address, context) == ["v6 local"]
    assert _pop3_count(v6_stack, "::1", sender.address, context) == 1
    assert _pop3_count(v6_stack, "::1", rcpt.address, context) == 0


def test_ipv6_stack_refuses_a_client_that_trusts_another_ca(v6_stack: MailStack) -> None:
    """The twin: verification stays on over IPv6; a foreign CA fails on every implicit port."""
    address = v6_stack.user("example.com").address
    port = v6_stack.domains["example.com"].ports["submissions"]
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL("::1", port, context=_other_ca_context(), timeout=TIMEOUT)
    with pytest.raises(ssl.SSLCertVerificationError):
        _imap_subjects(v6_stack, "::1", address, _other_ca_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        _pop3_count(v6_stack, "::1", address, _other_ca_context())


def test_ipv6_stack_listens_on_v6_only(v6_stack: MailStack) -> None:
    """``host="::1"`` binds nothing on IPv4: the same port on 127.0.0.1 is refused."""
    port = v6_stack.domains["example.com"].ports["imaps"]
    assert v6_stack.domains["example.com"].endpoint("imaps") == f"[::1]:{port}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_ipv6_stack_dns_gives_the_mx_an_aaaa_record(v6_stack: MailStack) -> None:
    assert _ask(v6_stack, "mail.example.org", "AAAA") == ["::1"]
    assert _ask(v6_stack, "mail.example.org", "A") == []


def test_ipv6_relay_delivers_cross_domain_mail_over_v6(v6_stack: MailStack) -> None:
    """example.org's MX listens on ::1 only: the relay finds its AAAA and dials it.

    The Received line the MX writes names the peer's address, ::1, which only a connection
    over IPv6 can give.
    """
    v6_stack.reset()
    sender, rcpt = v6_stack.user("example.com"), v6_stack.user("example.org")
    _submit(v6_stack, "::1", sender=sender.address, rcpt=rcpt.address, subject="over v6")
    got = v6_stack.wait_for(rcpt.address, subject="over v6", timeout=TIMEOUT)
    received = got.headers.get_all("Received")
    mx_hop = [line for line in received if "by mail.example.org" in " ".join(line.split())]
    assert mx_hop, received
    assert "[::1]" in mx_hop[0] or "[IPv6:::1]" in mx_hop[0], mx_hop[0]
    connected = [e.detail for e in v6_stack.relay.events if e.step == "connected"]
    assert any(detail.startswith("mail.example.org[::1]:") for detail in connected), connected


def test_ipv6_relay_defers_when_dns_gives_only_an_ipv4_address(v6_stack: MailStack) -> None:
    """The twin: with only an A record for the MX (nothing listens on 127.0.0.1), the message
    stays queued with a connection failure; so the delivery above did travel over IPv6."""
    v6_stack.reset()
    records = [r for r in v6_stack.default_dns_records() if r.rtype != "AAAA"]
    records += [
        Record("mail.example.org", "A", "127.0.0.1"),
        Record("ns.example.org", "A", "127.0.0.1"),
    ]
    v6_stack.set_dns_records(records)
    try:
        sender, rcpt = v6_stack.user("example.com"), v6_stack.user("example.org")
        _submit(v6_stack, "::1", sender=sender.address, rcpt=rcpt.address, subject="v4 only")
        queue = v6_stack.wait_relay(lambda q: any(e.last_error for e in q), timeout=TIMEOUT)
        (entry,) = queue
        assert "127.0.0.1" in entry.last_error, entry.last_error
        assert v6_stack.messages(rcpt.address) == []
    finally:
        v6_stack.reset()


# -- dual stack: 127.0.0.1 and ::1 ------------------------------------------------------------


def test_ipv6_dual_stack_binds_each_service_on_both_families_on_one_port(
    dual_stack: MailStack,
) -> None:
    for endpoints in dual_stack.domains.values():
        assert endpoints.hosts == ("127.0.0.1", "::1")
        for service in SERVICES:
            port = endpoints.ports[service]
            for host in endpoints.hosts:
                socket.create_connection((host, port), timeout=TIMEOUT).close()


def test_ipv6_dual_stack_serves_verified_clients_over_both_families(
    dual_stack: MailStack,
) -> None:
    dual_stack.reset()
    sender, rcpt = dual_stack.user("example.com"), dual_stack.user("example.org")
    context = dual_stack.client_context()
    _submit(dual_stack, "127.0.0.1", sender=sender.address, rcpt=rcpt.address, subject="via v4")
    _submit(dual_stack, "::1", sender=sender.address, rcpt=rcpt.address, subject="via v6")
    dual_stack.wait_for(rcpt.address, subject="via v4", timeout=TIMEOUT)
    dual_stack.wait_for(rcpt.address, subject="via v6", timeout=TIMEOUT)
    for host in ("127.0.0.1", "::1"):
        assert sorted(_imap_subjects(dual_stack, host, rcpt.address, context)) == [
            "via v4",
            "via v6",
        ]
        assert _pop3_count(dual_stack, host, rcpt.address, context) == 2
        with pytest.raises(ssl.SSLCertVerificationError):
            _pop3_count(dual_stack, host, rcpt.address, _other_ca_context())


def test_ipv6_dual_stack_dns_has_a_and_aaaa_for_each_host(dual_stack: MailStack) -> None:
    for name in ("mail.example.org", "ns.example.org"):
        assert _ask(dual_stack, name, "A") == ["127.0.0.1"]
        assert _ask(dual_stack, name, "AAAA") == ["::1"]
    (spf,) = _ask(dual_stack, "example.org", "TXT")
    assert "ip4:127.0.0.1" in spf and "ip6:::1" in spf


def test_ipv6_dual_stack_describe_adds_one_key(dual_stack: MailStack) -> None:
    doc = dual_stack.describe()
    assert set(doc) == {"ca_file", "dns", "domains", "users", "extra_hosts"}
    assert doc["extra_hosts"] == ["::1"]
    assert doc["domains"]["example.com"]["imaps"].startswith("127.0.0.1:")


def test_ipv6_single_family_stack_keeps_its_json_and_dns(v6_stack: MailStack) -> None:
    """The twin: without extra_hosts, no new key, and no A record beside the AAAA."""
    assert set(v6_stack.describe()) == {"ca_file", "dns", "domains", "users"}
    assert _ask(v6_stack, "ns.example.org", "A") == []


def test_ipv6_extra_hosts_config() -> None:
    config = StackConfig(extra_hosts=("[::1]", "127.0.0.1", "0:0::1"))
    assert config.extra_hosts == ("::1",)  # canonical, without host or duplicates
    assert StackConfig.from_strings({"extra_hosts": "::1"}).extra_hosts == ("::1",)
    assert StackConfig(ports=10000, extra_hosts=("::1",)).extra_hosts == ("::1",)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"extra_hosts": ("localhost6",)}, "not an IP address"),
        ({"extra_hosts": ("::1",), "ports": "standard"}, "ports='ephemeral' or a base port"),
    ],
)
def test_ipv6_extra_hosts_config_errors(overrides: dict[str, object], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        StackConfig(**overrides)  # type: ignore[arg-type]


def test_ipv6_cli_serve_with_two_hosts_listens_on_both() -> None:
    """``roundtrip serve --host 127.0.0.1 --host ::1 --json``: the JSON line keeps its keys
    (endpoints on the first host) and adds ``extra_hosts``; each port answers on ::1 too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "roundtrip", "serve", "--json", "--quiet"]
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--host", "::1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready, "serve printed no ready line"
        doc = json.loads(proc.stdout.readline())
        assert doc["extra_hosts"] == ["::1"]
        host, _, port = doc["domains"]["example.com"]["submissions"].rpartition(":")
        assert host == "127.0.0.1"
        context = ssl.create_default_context(cafile=doc["ca_file"])
        for dial in ("127.0.0.1", "::1"):
            with smtplib.SMTP_SSL(dial, int(port), context=context, timeout=TIMEOUT) as smtp:
                assert smtp.noop()[0] == 250
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "warning" not in err


# -- one port on every address ------------------------------------------------------------------


def _listeners() -> Listeners:
    return Listeners(
        config=StackConfig(extra_hosts=("::1",)),
        store=Store(),
        accepts_recipient=lambda address: True,
        router=lambda message: None,
        on_error=lambda exc: None,
    )


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


def test_ipv6_dual_stack_port_taken_on_v6_moves_to_another_port() -> None:
    """An ephemeral port free on 127.0.0.1 may be held on ::1 by another program: the
    listeners of that attempt are closed and the service gets a port free on both."""
    blockers: list[socket.socket] = []
    blocked_ports: list[int] = []

    def starting(host: str, port: int) -> Awaitable[asyncio.Server]:
        if host == "::1" and not blocked_ports:
            blocked_ports.append(port)
            blocker = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                blocker.bind(("::1", port))  # someone else holds this port on IPv6 only
                blocker.listen()
                blockers.append(blocker)
            except OSError as exc:
                # Another program on this machine already holds it on ::1: the very case.
                blocker.close()
                assert exc.errno == errno.EADDRINUSE, exc
        return asyncio.start_server(_echo, host, port)

    async def run() -> tuple[int, int, list[int]]:
        listeners = _listeners()
        try:
            port = await listeners._bind_hosts("imaps", ("127.0.0.1", "::1"), 0, starting)
            bound = [s.sockets[0].getsockname()[1] for s in listeners.servers]
            return port, blocked_ports[0], bound
        finally:
            listeners.close()

    try:
        port, blocked, bound = asyncio.run(run())
    finally:
        for blocker in blockers:
            blocker.close()
    assert port != blocked
    assert bound == [port, port]  # the first attempt's IPv4 listener is gone


def test_ipv6_dual_stack_fixed_port_taken_on_v6_is_a_start_error() -> None:
    """The twin: a fixed port (ports=BASE) is not moved; the error names service and host."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as blocker:
        blocker.bind(("::1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]

        async def run() -> None:
            listeners = _listeners()
            try:
                await listeners._bind_hosts(
                    "imaps",
                    ("127.0.0.1", "::1"),
                    taken,
                    lambda host, port: asyncio.start_server(_echo, host, port),
                )
            finally:
                listeners.close()

        with pytest.raises(ServerStartError, match=rf"cannot bind imaps on ::1:{taken}: .*in use"):
            asyncio.run(run())
