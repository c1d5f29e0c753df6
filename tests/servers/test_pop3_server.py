"""The POP3 listeners over real loopback sockets, driven by poplib and raw sockets."""

from __future__ import annotations

import asyncio
import poplib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass

import pytest
from _support import listener_port, shutdown_line_listeners

from roundtrip.certs import CertificateAuthority
from roundtrip.servers._conn import LineServerProtocol
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.pop3 import start_pop3
from roundtrip.store import Store

HOST = "127.0.0.1"
USER = "alice@example.test"
PASSWORD = "correct horse"
TIMEOUT = 5.0

# Lines starting with ".", a lone ".", CRLF endings: what dot-stuffing must carry unchanged.
DOTTED = (
    b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
)
OTHER = b"Subject: second\r\n\r\nhello\r\n"


class WatchedStore(Store):
    """A real Store that also signals when a maildrop lock is given back."""

    def __init__(self) -> None:
        super().__init__()
        self.unlocked = threading.Event()

    def unlock_maildrop(self, address: str) -> None:
        super().unlock_maildrop(address)
        self.unlocked.set()


@dataclass
class POP3Servers:
    store: WatchedStore
    thread: LoopThread
    pop3s_port: int
    pop3_port: int


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def store() -> WatchedStore:
    store = WatchedStore()
    store.add_user(USER, PASSWORD)
    store.deliver(USER, DOTTED)
    store.deliver(USER, OTHER)
    return store


def _start(ca: CertificateAuthority, store: Store, idle_timeout: float) -> Iterator[POP3Servers]:
    assert isinstance(store, WatchedStore)
    thread = LoopThread(name="pop3-test-loop")
    listeners: list[tuple[asyncio.Server, set[LineServerProtocol]]] = []
    try:
        ctx = ca.server_context(["pop.example.test"])
        for implicit in (ctx, None):
            listeners.append(
                thread.run(
                    start_pop3(
                        store,
                        host=HOST,
                        port=0,
                        hostname="pop.example.test",
                        implicit_tls_context=implicit,
                        starttls_context=ctx,
                        idle_timeout=idle_timeout,
                        on_error=thread.record_error,
                    ),
                    timeout=TIMEOUT,
                )
            )
        yield POP3Servers(
            store, thread, listener_port(listeners[0][0]), listener_port(listeners[1][0])
        )
    finally:
        thread.run(shutdown_line_listeners(listeners), timeout=TIMEOUT)
        thread.stop()
    assert thread.errors() == []


@pytest.fixture
def servers(ca: CertificateAuthority, store: WatchedStore) -> Iterator[POP3Servers]:
    yield from _start(ca, store, idle_timeout=30.0)


@pytest.fixture
def impatient(ca: CertificateAuthority, store: WatchedStore) -> Iterator[POP3Servers]:
    yield from _start(ca, store, idle_timeout=0.5)


def pop3s(servers: POP3Servers, ca: CertificateAuthority) -> poplib.POP3_SSL:
    return poplib.POP3_SSL(HOST, servers.pop3s_port, context=ca.client_context(), timeout=TIMEOUT)


def pop3_stls(servers: POP3Servers, ca: CertificateAuthority) -> poplib.POP3:
    client = poplib.POP3(HOST, servers.pop3_port, timeout=TIMEOUT)
    try:
        client.stls(context=ca.client_context())
    except BaseException:
        client.close()
        raise
    return client


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
    return sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset counts as closed)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# Implicit TLS (pop3s)


def test_pop3s_login_stat_list_uidl_retr(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(pop3s(servers, ca)) as client:
        assert client.getwelcome().startswith(b"+OK pop.example.test")
        assert client.user(USER).startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        assert client.stat() == (2, len(DOTTED) + len(OTHER))
        _, listing, _ = client.list()
        assert listing == [f"1 {len(DOTTED)}".encode(), f"2 {len(OTHER)}".encode()]
        _, uids, _ = client.uidl()
        assert len({line.split()[1] for line in uids}) == 2
        _, lines, octets = client.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == DOTTED
        assert octets == len(DOTTED)
        _, top, _ = client.top(1, 1)
        assert top[-1] == b".leading dot"
        assert client.quit().startswith(b"+OK")
    assert len(servers.store.mailbox(USER)) == 2


def test_pop3s_uidl_stable_across_sessions(servers: POP3Servers, ca: CertificateAuthority) -> None:
    seen = []
    for _ in range(2):
        servers.store.unlocked.clear()
        with closing(pop3s(servers, ca)) as client:
            client.user(USER)
            client.pass_(PASSWORD)
            seen.append(client.uidl()[1])
            client.quit()
    assert seen[0] == seen[1]


def test_pop3s_other_ca_fails_verification(servers: POP3Servers, ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority()
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(HOST, servers.pop3s_port, context=stranger.client_context(), timeout=5)
    # The listener survives the failed handshake.
    with closing(pop3s(servers, ca)) as client:
        assert "USER" in client.capa()
        client.quit()


def test_pop3s_offers_no_stls(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(pop3s(servers, ca)) as client:
        caps = client.capa()
        assert "STLS" not in caps and "USER" in caps
        client.quit()


# Plaintext with STLS (pop3)


def test_pop3_stls_login(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(pop3_stls(servers, ca)) as client:
        assert "STLS" not in client.capa()
        client.user(USER)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 2
        _, lines, _ = client.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == DOTTED
        client.quit()


def test_pop3_plaintext_offers_stls_not_user(servers: POP3Servers) -> None:
    with closing(poplib.POP3(HOST, servers.pop3_port, timeout=TIMEOUT)) as client:
        caps = client.capa()
        assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
        client.quit()


def test_pop3_user_before_stls_refused(servers: POP3Servers) -> None:
    with closing(poplib.POP3(HOST, servers.pop3_port, timeout=TIMEOUT)) as client:
        with pytest.raises(poplib.error_proto) as info:
            client.user(USER)
        assert info.value.args[0].startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
        client.quit()


def test_pop3_stls_wrong_ca_fails(servers: POP3Servers) -> None:
    client = poplib.POP3(HOST, servers.pop3_port, timeout=TIMEOUT)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.stls(context=CertificateAuthority().client_context())
    finally:
        # The failed wrap already closed the socket; poplib's shutdown() then reports EBADF.
        with suppress(OSError):
            client.close()


# Authentication failures


@pytest.mark.parametrize("tls", ["implicit", "stls"])
def test_pop3_wrong_password_and_unknown_user_same_reply(
    servers: POP3Servers, ca: CertificateAuthority, tls: str
) -> None:
    replies = []
    for user, password in [(USER, "wrong"), ("nobody@example.test", PASSWORD)]:
        opener = pop3s if tls == "implicit" else pop3_stls
        with closing(opener(servers, ca)) as client:
            assert client.user(user).startswith(b"+OK")
            with pytest.raises(poplib.error_proto) as info:
                client.pass_(password)
            replies.append(info.value.args[0])
            client.quit()
    assert replies[0] == replies[1] == b"-ERR [AUTH] Authentication failed"


def test_pop3_second_session_in_use(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(pop3s(servers, ca)) as first, closing(pop3s(servers, ca)) as second:
        first.user(USER)
        first.pass_(PASSWORD)
        second.user(USER)
        with pytest.raises(poplib.error_proto) as info:
            second.pass_(PASSWORD)
        assert info.value.args[0].startswith(b"-ERR [IN-USE]")
        first.quit()
        second.user(USER)
        assert second.pass_(PASSWORD).startswith(b"+OK")  # free once the first said QUIT
        second.quit()


# Deletion semantics (RFC 1939 section 6)


def _login(servers: POP3Servers, ca: CertificateAuthority) -> poplib.POP3_SSL:
    client = pop3s(servers, ca)
    client.user(USER)
    client.pass_(PASSWORD)
    return client


def test_pop3_dele_quit_removes(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(_login(servers, ca)) as client:
        client.dele(1)
        client.quit()
    assert [m.raw for m in servers.store.mailbox(USER)] == [OTHER]


def test_pop3_dele_abort_keeps(servers: POP3Servers, ca: CertificateAuthority) -> None:
    client = _login(servers, ca)
    client.dele(1)
    servers.store.unlocked.clear()
    # SO_LINGER 0: close with a reset, no QUIT and no TLS close_notify.
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    assert servers.store.unlocked.wait(TIMEOUT), "the server never released the maildrop"
    assert len(servers.store.mailbox(USER)) == 2
    with closing(_login(servers, ca)) as again:
        assert again.stat()[0] == 2
        again.quit()


def test_pop3_dele_rset_quit_keeps(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(_login(servers, ca)) as client:
        client.dele(1)
        client.rset()
        client.quit()
    assert len(servers.store.mailbox(USER)) == 2


# STLS command injection (docs/security.md A3.1)


def test_pop3_stls_injection_same_segment(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with raw_connect(servers.pop3_port) as sock:
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"STLS\r\nCAPA\r\n")
        assert b"+OK" not in read_to_eof(sock)
    # The listener still serves a fresh connection.
    with closing(pop3_stls(servers, ca)) as client:
        client.user(USER)
        assert client.pass_(PASSWORD).startswith(b"+OK")
        client.quit()


def test_pop3_stls_injection_second_segment(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with raw_connect(servers.pop3_port) as sock:
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"STLS\r\n")
        assert read_line(sock) == b"+OK Begin TLS negotiation\r\n"
        sock.sendall(b"CAPA\r\n")  # plaintext where the ClientHello belongs
        assert b"+OK" not in read_to_eof(sock)
    with closing(pop3_stls(servers, ca)) as client:
        client.quit()


def test_pop3_stls_alone_is_answered(servers: POP3Servers, ca: CertificateAuthority) -> None:
    with raw_connect(servers.pop3_port) as sock:
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"STLS\r\n")
        assert read_line(sock) == b"+OK Begin TLS negotiation\r\n"
        with ca.client_context().wrap_socket(sock, server_hostname=HOST) as tls:
            tls.sendall(b"CAPA\r\n")
            caps = b""
            while not caps.endswith(b"\r\n.\r\n"):
                chunk = tls.recv(4096)
                assert chunk
                caps += chunk
            assert caps.startswith(b"+OK") and b"\r\nUSER\r\n" in caps


# Limits (RFC 2449 section 4, docs/security.md A7.1, A7.6)


@pytest.mark.parametrize(("length", "ok"), [(255, True), (300, False)])
def test_pop3_line_limit(servers: POP3Servers, length: int, ok: bool) -> None:
    with raw_connect(servers.pop3_port) as sock:
        read_line(sock)
        sock.sendall(b"CAPA " + b"x" * (length - 7) + b"\r\n")
        reply = read_line(sock)
        assert reply.startswith(b"+OK") if ok else reply == b"-ERR line too long\r\n"


@pytest.mark.parametrize(("bad", "closed"), [(3, False), (4, True)])
def test_pop3_bad_command_limit(servers: POP3Servers, bad: int, closed: bool) -> None:
    with raw_connect(servers.pop3_port) as sock:
        read_line(sock)
        sock.sendall(b"".join(b"JUNK%d\r\n" % i for i in range(bad)))
        replies = [read_line(sock) for _ in range(bad)]
        if closed:
            assert replies[-1] == b"-ERR too many bad commands\r\n"
            assert read_to_eof(sock) == b""
        else:
            assert all(r.startswith(b"-ERR ") for r in replies)
            sock.sendall(b"CAPA\r\n")
            assert read_line(sock).startswith(b"+OK")


def test_pop3_idle_timeout_closes(impatient: POP3Servers) -> None:
    with raw_connect(impatient.pop3_port) as sock:
        assert read_line(sock).startswith(b"+OK")
        assert read_to_eof(sock) == b"-ERR autologout\r\n"


def test_pop3_idle_timeout_releases_lock(impatient: POP3Servers, ca: CertificateAuthority) -> None:
    with closing(_login(impatient, ca)) as client:
        client.dele(1)
        assert impatient.store.unlocked.wait(TIMEOUT)
        with pytest.raises((poplib.error_proto, OSError)):
            client.stat()
    assert len(impatient.store.mailbox(USER)) == 2


def test_pop3_active_connection_not_timed_out(impatient: POP3Servers) -> None:
    with raw_connect(impatient.pop3_port) as sock:
        read_line(sock)
        sock.sendall(b"CAPA\r\n")
        assert read_line(sock).startswith(b"+OK")
