"""Per-session command budgets of IMAP and POP3 (docs/security.md A8.3: endless sessions, floods).

A session past its budget gets ``* BYE [LIMIT] ...`` or ``-ERR too many ... commands`` and is
closed; the listener keeps serving everyone else. The machines count; these tests drive them
over real TLS sockets (raw where the exact bytes matter, imaplib and poplib otherwise), and
also bytes in and bytes out with no socket at all.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _support import listener_port, shutdown_line_listeners

from roundtrip.certs import CertificateAuthority
from roundtrip.config import MailboxLimits, StackConfig
from roundtrip.errors import ConfigError
from roundtrip.protocols._lines import ConnectionClosed
from roundtrip.protocols.imap import IMAPConnection, IMAPState
from roundtrip.protocols.pop3 import POP3Connection, POP3State
from roundtrip.servers._conn import LineServerProtocol
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.imap import start_imap
from roundtrip.servers.pop3 import start_pop3
from roundtrip.store import Store

HOST = "127.0.0.1"
NAME = "mail.example.test"
USER = "alice@example.test"
PASSWORD = "secret"
TIMEOUT = 5.0
MESSAGE = b"From: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"

# Small budgets so the tests run fast: the session total, then per verb.
IMAP_BUDGET = (("*", 20), ("NOOP", 5), ("CHECK", 5))
POP3_BUDGET = (("*", 12), ("NOOP", 3), ("LIST", 2), ("STAT", 0))
IMAP_NOOP_BYE = b"* BYE [LIMIT] Too many NOOP commands\r\n"
IMAP_TOTAL_BYE = b"* BYE [LIMIT] Too many commands\r\n"


# Servers and clients


@dataclass
class Servers:
    store: Store
    ca: CertificateAuthority
    imaps_port: int
    pop3s_port: int

    def connect(self, port: int) -> ssl.SSLSocket:
        raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
        try:
            return self.ca.client_context().wrap_socket(raw, server_hostname=NAME)
        except BaseException:
            raw.close()
            raise

    def imaplib(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL(
            HOST, self.imaps_port, ssl_context=self.ca.client_context(), timeout=TIMEOUT
        )

    def poplib(self) -> poplib.POP3_SSL:
        return poplib.POP3_SSL(
            HOST, self.pop3s_port, context=self.ca.client_context(), timeout=TIMEOUT
        )


class Raw:
    """A TLS socket read line by line, for tests where the exact bytes matter."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        """One CRLF line, or what was left before EOF (b"" at EOF)."""
        deadline = time.monotonic() + TIMEOUT
        while b"\r\n" not in self.buf:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = self.sock.recv(65536)
            if not chunk:
                data, self.buf = self.buf, b""
                return data
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.line()

    def imap(self, tag: str, command: str) -> list[bytes]:
        """Send a tagged IMAP command; the lines up to its tagged reply (or BYE and EOF)."""
        self.sock.sendall(f"{tag} {command}\r\n".encode())
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(tag.encode() + b" "):
                return lines

    def read_to_eof(self) -> bytes:
        out = b""
        while line := self.line():
            out += line
        return out


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def servers(ca: CertificateAuthority) -> Iterator[Servers]:
    store = Store()
    store.add_user(USER, PASSWORD)
    store.deliver(USER, MESSAGE)
    store.deliver(USER, MESSAGE)
    ctx = ca.server_context([NAME])
    thread = LoopThread(name="budget-test-loop")
    listeners: list[tuple[asyncio.Server, set[LineServerProtocol]]] = []
    try:
        listeners.append(
            thread.run(
                start_imap(
                    store,
                    host=HOST,
                    port=0,
                    hostname=NAME,
                    implicit_tls_context=ctx,
                    starttls_context=None,
                    idle_timeout=30.0,
                    on_error=thread.record_error,
                    command_limits=IMAP_BUDGET,
                ),
                timeout=TIMEOUT,
            )
        )
        listeners.append(
            thread.run(
                start_pop3(
                    store,
                    host=HOST,
                    port=0,
                    hostname=NAME,
                    implicit_tls_context=ctx,
                    starttls_context=None,
                    idle_timeout=30.0,
                    on_error=thread.record_error,
                    command_limits=POP3_BUDGET,
                ),
                timeout=TIMEOUT,
            )
        )
        yield Servers(store, ca, listener_port(listeners[0][0]), listener_port(listeners[1][0]))
    finally:
        thread.run(shutdown_line_listeners(listeners), timeout=TIMEOUT)
        thread.stop()
    assert thread.errors() == []


def imap_raw(servers: Servers) -> Raw:
    raw = Raw(servers.connect(servers.imaps_port))
    assert raw.line().startswith(b"* OK ")
    assert raw.imap("a", f"LOGIN {USER} {PASSWORD}")[-1].startswith(b"a OK ")
    return raw


def pop3_raw(servers: Servers) -> Raw:
    raw = Raw(servers.connect(servers.pop3s_port))
    assert raw.line().startswith(b"+OK ")
    assert raw.cmd(f"USER {USER}") == b"+OK\r\n"
    assert raw.cmd(f"PASS {PASSWORD}").startswith(b"+OK ")
    return raw


def assert_imap_serves(servers: Servers) -> None:
    """A new client still completes a normal session: login, select, fetch, logout."""
    client = servers.imaplib()
    try:
        assert client.login(USER, PASSWORD)[0] == "OK"
        assert client.select("INBOX") == ("OK", [b"2"])
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(data[0], tuple) and data[0][1] == MESSAGE
        assert client.logout()[0] == "BYE"
    finally:
        if client.state != "LOGOUT":
            client.shutdown()


def assert_pop3_serves(servers: Servers) -> None:
    """A new client still logs in (the maildrop lock was given back) and reads the drop."""
    client = servers.poplib()
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        assert client.stat() == (2, 2 * len(MESSAGE))
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()


# IMAP over the listener


def test_imap_noop_budget_gets_bye_and_close(servers: Servers) -> None:
    with imap_raw(servers).sock as sock:
        raw = Raw(sock)
        for i in range(5):
            assert raw.imap(f"n{i}", "NOOP") == [f"n{i} OK NOOP completed\r\n".encode()]
        assert raw.imap("n5", "NOOP") == [IMAP_NOOP_BYE, b""]
    assert_imap_serves(servers)


def test_imap_session_under_budget_is_never_cut(servers: Servers) -> None:
    # imaplib: LOGIN, SELECT, 5 NOOPs (the verb's whole budget), 5 CHECKs, FETCH, LOGOUT = 14
    # of 20 commands (imaplib also sends CAPABILITY on connect: 15).
    client = servers.imaplib()
    try:
        assert client.login(USER, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        for _ in range(5):
            assert client.noop()[0] == "OK"
            assert client.check()[0] == "OK"
        assert client.fetch("1:*", "(FLAGS)")[0] == "OK"
        assert client.logout() == ("BYE", [b"Logging out"])
    finally:
        if client.state != "LOGOUT":
            client.shutdown()


def test_imap_verb_budget_hits_only_that_verb(servers: Servers) -> None:
    raw = imap_raw(servers)  # LOGIN: 1 command
    with raw.sock:
        for i in range(5):
            assert raw.imap(f"n{i}", "NOOP")[-1].startswith(f"n{i} OK".encode())
        # CAPABILITY has no budget of its own here: it runs past NOOP's 5 and counts only
        # towards the total of 20 (LOGIN + 5 NOOP + 14 CAPABILITY).
        for i in range(14):
            assert (
                raw.imap(f"c{i}", "CAPABILITY")[-1] == f"c{i} OK CAPABILITY completed\r\n".encode()
            )
        assert raw.imap("c14", "CAPABILITY") == [IMAP_TOTAL_BYE, b""]
    assert_imap_serves(servers)


def test_imap_pipelined_commands_after_bye_do_not_run(servers: Servers) -> None:
    raw = imap_raw(servers)
    with raw.sock:
        raw.sock.sendall(
            b"".join(f"n{i} NOOP\r\n".encode() for i in range(6)) + b"s SELECT INBOX\r\n"
        )
        data = raw.read_to_eof()
    ok = b"".join(f"n{i} OK NOOP completed\r\n".encode() for i in range(5))
    assert data == ok + IMAP_NOOP_BYE


# POP3 over the listener


def test_pop3_noop_budget_gets_err_and_close(servers: Servers) -> None:
    with pop3_raw(servers).sock as sock:
        raw = Raw(sock)
        for _ in range(3):
            assert raw.cmd("NOOP") == b"+OK\r\n"
        assert raw.cmd("NOOP") == b"-ERR too many NOOP commands\r\n"
        assert raw.read_to_eof() == b""
    assert_pop3_serves(servers)
    assert len(servers.store.mailbox(USER, "INBOX").uids()) == 2  # no UPDATE happened


def test_pop3_session_under_budget_is_never_cut(servers: Servers) -> None:
    # USER, PASS, STAT, LIST, UIDL, RETR 1, DELE 1, NOOP x3, QUIT: 11 of 12 commands.
    client = servers.poplib()
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 2
        assert len(client.list()[1]) == 2
        assert len(client.uidl()[1]) == 2
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGE
        assert client.dele(1).startswith(b"+OK")
        for _ in range(3):
            assert client.noop().startswith(b"+OK")
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    assert len(servers.store.mailbox(USER, "INBOX").uids()) == 1  # QUIT applied DELE


def test_pop3_list_with_argument_counts_only_towards_the_total(servers: Servers) -> None:
    raw = pop3_raw(servers)  # USER, PASS: 2 commands
    with raw.sock:
        assert raw.cmd("LIST").startswith(b"+OK 2 messages")
        while raw.line() != b".\r\n":
            pass
        for _ in range(3):
            assert raw.cmd("LIST 1") == f"+OK 1 {len(MESSAGE)}\r\n".encode()
        assert raw.cmd("LIST").startswith(b"+OK")  # the second scan listing: still allowed
        while raw.line() != b".\r\n":
            pass
        assert raw.cmd("LIST") == b"-ERR too many LIST commands\r\n"
        assert raw.read_to_eof() == b""
    assert_pop3_serves(servers)


def test_pop3_total_budget_gets_err_and_close(servers: Servers) -> None:
    raw = pop3_raw(servers)  # 2 commands
    with raw.sock:
        # STAT's count is 0 (off): only the total of 12 limits it.
        for _ in range(10):
            assert raw.cmd("STAT") == f"+OK 2 {2 * len(MESSAGE)}\r\n".encode()
        assert raw.cmd("STAT") == b"-ERR too many commands\r\n"
        assert raw.read_to_eof() == b""
    assert_pop3_serves(servers)


# The machines, bytes in and bytes out


def _imap_machine(budget: tuple[tuple[str, int], ...] | None) -> IMAPConnection:
    store = Store()
    store.add_user(USER, PASSWORD)
    conn = IMAPConnection(
        store,
        hostname=NAME,
        secure=True,
        starttls_available=False,
        clock=lambda: 1_700_000_000.0,
        command_limits=budget,
    )
    assert conn.data_to_send().startswith(b"* OK ")
    return conn


def test_imap_machine_counts_commands_before_and_after_login() -> None:
    conn = _imap_machine((("*", 4), ("NOOP", 0)))  # NOOP 0: no budget of its own
    assert conn.receive_data(b"a NOOP\r\nb NOOP\r\n") == []
    assert ConnectionClosed() not in conn.receive_data(f"c LOGIN {USER} {PASSWORD}\r\n".encode())
    assert conn.receive_data(b"d NOOP\r\n") == []
    assert conn.data_to_send().endswith(b"d OK NOOP completed\r\n")
    events = conn.receive_data(b"e LOGOUT\r\n")
    assert events == [ConnectionClosed()]
    assert conn.data_to_send() == IMAP_TOTAL_BYE  # LOGOUT itself did not run
    assert conn.state is IMAPState.LOGOUT
    assert conn.receive_data(b"f NOOP\r\n") == [] and conn.data_to_send() == b""


def test_imap_machine_unknown_verbs_are_bad_not_budgeted() -> None:
    conn = _imap_machine((("*", 1),))
    conn.receive_data(b"a FROB\r\nb FROB\r\n")  # bad commands, counted by max_bad_commands
    assert conn.data_to_send().count(b" BAD ") == 2
    assert conn.receive_data(b"c NOOP\r\n") == []
    assert conn.data_to_send() == b"c OK NOOP completed\r\n"


def test_imap_machine_default_budget_fits_a_long_session() -> None:
    # A day of one NOOP a minute and a sync of 2,000 messages: never cut by the defaults.
    conn = _imap_machine(None)
    assert conn.command_limits == dict(MailboxLimits().imap_command_limits)
    conn.receive_data(f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\n".encode())
    conn.data_to_send()
    for _ in range(24 * 60):
        assert conn.receive_data(b"n NOOP\r\n") == []
    for uid in range(2000):
        assert conn.receive_data(f"f UID FETCH {uid + 1} (FLAGS)\r\n".encode()) == []
    assert conn.state is IMAPState.SELECTED
    assert b"BYE" not in conn.data_to_send()
    # The twin: a NOOP flood meets the default NOOP budget.
    flood = b"n NOOP\r\n" * (conn.command_limits["NOOP"] - 24 * 60 + 1)
    assert conn.receive_data(flood) == [ConnectionClosed()]
    assert conn.data_to_send().endswith(IMAP_NOOP_BYE)


def _pop3_machine(
    budget: tuple[tuple[str, int], ...] | None, store: Store | None = None, *, tls: bool = True
) -> POP3Connection:
    if store is None:
        store = Store()
        store.add_user(USER, PASSWORD)
        store.deliver(USER, MESSAGE)
    conn = POP3Connection(
        store, hostname=NAME, secure=tls, starttls_available=not tls, command_limits=budget
    )
    assert conn.data_to_send().startswith(b"+OK ")
    return conn


def test_pop3_machine_budget_survives_stls() -> None:
    conn = _pop3_machine((("*", 4), ("CAPA", 2)), tls=False)
    conn.receive_data(b"CAPA\r\n")
    conn.data_to_send()
    assert conn.receive_data(b"STLS\r\n") != [ConnectionClosed()]
    assert conn.data_to_send().startswith(b"+OK")
    conn.tls_started()  # a fresh AUTHORIZATION state, but the same budget
    conn.receive_data(b"CAPA\r\n")
    assert conn.data_to_send().startswith(b"+OK")
    assert conn.receive_data(b"CAPA\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == b"-ERR too many CAPA commands\r\n"


@pytest.mark.parametrize(("total", "deleted"), [(5, True), (4, False)])
def test_pop3_machine_cut_session_deletes_nothing(total: int, deleted: bool) -> None:
    # USER, PASS, DELE 1, NOOP, QUIT: with a total of 5 QUIT runs UPDATE; with 4 it is the
    # command too many, and the session ends as on EOF, without UPDATE (RFC 1939 section 6).
    store = Store()
    store.add_user(USER, PASSWORD)
    store.deliver(USER, MESSAGE)
    conn = _pop3_machine((("*", total),), store)
    events = conn.receive_data(f"USER {USER}\r\nPASS {PASSWORD}\r\nDELE 1\r\nNOOP\r\n".encode())
    assert ConnectionClosed() not in events and conn.state is POP3State.TRANSACTION
    conn.data_to_send()
    assert conn.receive_data(b"QUIT\r\n") == [ConnectionClosed()]
    reply = conn.data_to_send()
    assert reply.startswith(b"+OK") if deleted else reply == b"-ERR too many commands\r\n"
    assert store.mailbox(USER, "INBOX").uids() == ([] if deleted else [1])
    assert store.lock_maildrop(USER)  # the lock was given back either way


def test_pop3_machine_default_budget() -> None:
    conn = _pop3_machine(None)
    assert conn.command_limits == dict(MailboxLimits().pop3_command_limits)
    conn.receive_data(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    conn.data_to_send()
    assert conn.receive_data(b"NOOP\r\n" * 1000) == []
    assert conn.data_to_send() == b"+OK\r\n" * 1000
    assert conn.receive_data(b"NOOP\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == b"-ERR too many NOOP commands\r\n"


# Configuration


def test_mailbox_limits_normalise_and_reach_the_stack_config() -> None:
    limits = MailboxLimits(imap_command_limits=(("noop", 3),), pop3_command_limits=((" stat ", 2),))
    assert limits.imap_command_limits == (("NOOP", 3),)
    assert limits.pop3_command_limits == (("STAT", 2),)
    assert StackConfig().replace(mailbox_limits=limits).mailbox_limits is limits


@pytest.mark.parametrize("budget", [(("NOOP", -1),), (("", 3),)])
def test_mailbox_limits_refuse_bad_budgets(budget: tuple[tuple[str, int], ...]) -> None:
    with pytest.raises(ConfigError, match="imap_command_limits"):
        MailboxLimits(imap_command_limits=budget)


# Through the stack: StackConfig.mailbox_limits reaches both listeners


@pytest.mark.parametrize("budget", [3, 0], ids=["budget-3", "no-budget"])
def test_stack_passes_mailbox_limits_to_imap_and_pop3(budget: int) -> None:
    from roundtrip.stack import MailStack

    config = StackConfig(
        mailbox_limits=MailboxLimits(
            imap_command_limits=(("NOOP", budget),), pop3_command_limits=(("NOOP", budget),)
        )
    )
    with MailStack(config) as stack:
        user = stack.user()
        ep = stack.endpoints()
        ctx = stack.client_context()
        with imaplib.IMAP4_SSL(
            ep.host, ep.ports["imaps"], ssl_context=ctx, timeout=TIMEOUT
        ) as imap:
            for _ in range(3):
                assert imap.noop()[0] == "OK"
            if budget:
                with pytest.raises(imaplib.IMAP4.abort, match="Too many NOOP commands"):
                    imap.noop()
            else:
                assert imap.noop()[0] == "OK"
                imap.logout()
        pop = poplib.POP3_SSL(ep.host, ep.ports["pop3s"], context=ctx, timeout=TIMEOUT)
        try:
            pop.user(user.address)
            pop.pass_(user.password)
            for _ in range(3):
                assert pop.noop().startswith(b"+OK")
            if budget:
                with pytest.raises(poplib.error_proto, match="too many NOOP commands"):
                    pop.noop()
            else:
                assert pop.noop().startswith(b"+OK")
                pop.quit()
        finally:
            pop.close()
