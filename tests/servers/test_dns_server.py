"""The DNS server on real UDP and TCP sockets, queried with dnspython's resolver."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from roundtrip.errors import ConfigError
from roundtrip.protocols.dns import Record, Zone, build_zone, default_records
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.dns import DNSServer, start_dns

TIMEOUT = 5.0


def records() -> list[Record]:
    return [
        *default_records("example.org", "127.0.0.1"),
        Record("example.org", "MX", "20 mx2.example.org."),
        Record("example.org", "MX", "30 mx3.example.org."),
        Record("mx2.example.org", "AAAA", "::1"),
        Record("mx3.example.org", "A", "127.0.0.3"),
        *default_records("example.net", "127.0.0.1"),
    ]


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def server(loop_thread: LoopThread) -> Iterator[DNSServer]:
    srv = loop_thread.run(
        start_dns(build_zone(records()), host="127.0.0.1", on_error=loop_thread.record_error),
        TIMEOUT,
    )
    yield srv
    loop_thread.run(srv.close(), TIMEOUT)
    assert loop_thread.take_errors() == []


def resolver(server: DNSServer) -> dns.resolver.Resolver:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [server.host]
    res.port = server.port
    res.lifetime = TIMEOUT
    res.cache = None
    return res


def query(server: DNSServer, name: str, rdtype: str, *, tcp: bool) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, server.host, port=server.port, timeout=TIMEOUT)
    return dns.query.udp(q, server.host, port=server.port, timeout=TIMEOUT)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_server_mx_in_priority_order(server: DNSServer, tcp: bool) -> None:
    answer = resolver(server).resolve("example.org", "MX", tcp=tcp)
    hosts = [r.exchange.to_text() for r in sorted(answer, key=lambda r: r.preference)]
    assert hosts == ["mail.example.org.", "mx2.example.org.", "mx3.example.org."]
    assert answer.response.flags & dns.flags.AA
    extras = {(rr.name.to_text(), rr[0].address) for rr in answer.response.additional}
    assert extras == {
        ("mail.example.org.", "127.0.0.1"),
        ("mx2.example.org.", "::1"),
        ("mx3.example.org.", "127.0.0.3"),
    }


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_server_a_aaaa_txt(server: DNSServer, tcp: bool) -> None:
    res = resolver(server)
    assert [r.address for r in res.resolve("mail.example.org", "A", tcp=tcp)] == ["127.0.0.1"]
    assert [r.address for r in res.resolve("mx2.example.org", "AAAA", tcp=tcp)] == ["::1"]
    txt = res.resolve("example.org", "TXT", tcp=tcp)
    assert [b"".join(r.strings) for r in txt] == [b"v=spf1 ip4:127.0.0.1 -all"]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_server_nxdomain_and_noanswer(server: DNSServer, tcp: bool) -> None:
    res = resolver(server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("nobody.example.org", "A", tcp=tcp)
    with pytest.raises(dns.resolver.NoAnswer):
        res.resolve("mail.example.org", "MX", tcp=tcp)
    # A name in no zone is gone for good, as the world's DNS says (was REFUSED: retried forever).
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("no-such-domain.invalid", "MX", tcp=tcp)
    reply = query(server, "no-such-domain.invalid", "MX", tcp=tcp)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert [rr.name.to_text() for rr in reply.authority] == ["."]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_server_refuses_outside_when_asked(
    loop_thread: LoopThread, server: DNSServer, tcp: bool
) -> None:
    loop_thread.run(_call(lambda: server.set_records(records(), refuse_outside=True)), TIMEOUT)
    assert query(server, "example.com", "MX", tcp=tcp).rcode() == dns.rcode.REFUSED
    with pytest.raises(dns.resolver.NoNameservers, match="REFUSED"):
        resolver(server).resolve("example.com", "MX", tcp=tcp)
    assert resolver(server).resolve("example.org", "MX", tcp=tcp)


def test_dns_server_udp_garbage_gets_formerr_and_server_keeps_serving(server: DNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(b"\xbe\xef\x01\x00" + b"\xff" * 40, (server.host, server.port))
        reply, _ = sock.recvfrom(4096)
    qid, flags = struct.unpack("!HH", reply[:4])
    assert qid == 0xBEEF
    assert flags & 0xF == dns.rcode.FORMERR
    assert query(server, "example.org", "MX", tcp=False).rcode() == dns.rcode.NOERROR


def test_dns_server_tcp_garbage_gets_formerr_and_server_keeps_serving(server: DNSServer) -> None:
    garbage = b"\xbe\xef\x01\x00" + b"\xff" * 40
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(struct.pack("!H", len(garbage)) + garbage)
        (length,) = struct.unpack("!H", _recv_exactly(sock, 2))
        reply = _recv_exactly(sock, length)
        qid, flags = struct.unpack("!HH", reply[:4])
        assert (qid, flags & 0x8000, flags & 0xF) == (0xBEEF, 0x8000, dns.rcode.FORMERR)
        # The same connection still answers a good query (RFC 7766 §6.2.1).
        good = dns.message.make_query("example.org", "A").to_wire()
        sock.sendall(struct.pack("!H", len(good)) + good)
        (length,) = struct.unpack("!H", _recv_exactly(sock, 2))
        assert dns.message.from_wire(_recv_exactly(sock, length)).rcode() == dns.rcode.NOERROR
    assert query(server, "example.org", "MX", tcp=True).rcode() == dns.rcode.NOERROR


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def test_dns_server_query_log(server: DNSServer) -> None:
    res = resolver(server)
    res.resolve("example.org", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("nobody.example.org", "AAAA", tcp=True)
    assert server.query_log == [
        ("example.org.", "MX", "NOERROR"),
        ("nobody.example.org.", "AAAA", "NXDOMAIN"),
    ]


def test_dns_server_set_records_changes_answers(loop_thread: LoopThread, server: DNSServer) -> None:
    res = resolver(server)
    assert res.resolve("example.org", "MX")[0].preference in (10, 20, 30)
    new = [
        *default_records("example.org", "127.0.0.1"),
        Record("example.org", "MX", "0 ."),
    ]
    new = [r for r in new if not (r.rtype == "MX" and r.value.startswith("10 "))]
    loop_thread.run(_call(server.set_records, new), TIMEOUT)
    mx = list(res.resolve("example.org", "MX"))
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(0, ".")]
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("mx2.example.org", "AAAA")


def test_dns_server_set_records_rejects_bad_records_and_keeps_zone(server: DNSServer) -> None:
    with pytest.raises(ConfigError):
        server.set_records([Record("example.org", "A", "999.1.1.1")])
    assert resolver(server).resolve("mail.example.org", "A")[0].address == "127.0.0.1"


def test_dns_server_zone_provider_is_called_per_query(loop_thread: LoopThread) -> None:
    zones = [build_zone(default_records("example.org", "127.0.0.1"))]

    def provider() -> Zone:
        return zones[-1]

    srv = loop_thread.run(
        start_dns(provider, host="127.0.0.1", on_error=loop_thread.record_error), TIMEOUT
    )
    try:
        res = resolver(srv)
        assert res.resolve("mail.example.org", "A")[0].address == "127.0.0.1"
        zones.append(build_zone(default_records("example.org", "127.0.0.2")))
        assert res.resolve("mail.example.org", "A")[0].address == "127.0.0.2"
    finally:
        loop_thread.run(srv.close(), TIMEOUT)
    assert loop_thread.take_errors() == []


def test_dns_server_provider_crash_is_recorded(loop_thread: LoopThread) -> None:
    def provider() -> Zone:
        raise RuntimeError("zone provider exploded")

    srv = loop_thread.run(
        start_dns(provider, host="127.0.0.1", on_error=loop_thread.record_error), TIMEOUT
    )
    try:
        # Over TCP the server closes the connection instead of answering: no timeout to wait.
        good = dns.message.make_query("example.org", "A").to_wire()
        with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
            sock.sendall(struct.pack("!H", len(good)) + good)
            assert sock.recv(512) == b""
    finally:
        loop_thread.run(srv.close(), TIMEOUT)
    (error,) = loop_thread.take_errors()
    assert "exploded" in str(error)


def test_dns_server_close_releases_port_and_is_idempotent(loop_thread: LoopThread) -> None:
    srv = loop_thread.run(
        start_dns(build_zone(records()), host="127.0.0.1", on_error=loop_thread.record_error),
        TIMEOUT,
    )
    assert srv.address == ("127.0.0.1", srv.port) and srv.port > 0
    loop_thread.run(srv.close(), TIMEOUT)
    loop_thread.run(srv.close(), TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((srv.host, srv.port), timeout=TIMEOUT).close()


def test_dns_server_ipv6(loop_thread: LoopThread) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 cannot be bound here")
    srv = loop_thread.run(
        start_dns(build_zone(records()), host="::1", on_error=loop_thread.record_error), TIMEOUT
    )
    try:
        for tcp in (False, True):
            assert query(srv, "example.org", "MX", tcp=tcp).rcode() == dns.rcode.NOERROR
    finally:
        loop_thread.run(srv.close(), TIMEOUT)


async def _call(fn: object, *args: object) -> None:
    fn(*args)  # type: ignore[operator]
