"""SMTP abuse limits over loopback (docs/security.md catalogue A: A1, A2.3, A3.4, A4.3, A4.4, A5.1,
A5.4, A8).

Raw sockets, because exact bytes and the timing of replies matter; smtplib only where a real
client is the point. Every test asserts the exact reply and that a fresh client is still
served. Limits are configured small so the suite runs in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import ssl
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from _support import RawSMTPClient, SMTPListeners, SMTPWorld

from roundtrip.certs import CertificateAuthority
from roundtrip.config import SMTPLimits
from roundtrip.protocols.smtp import (
    AuthPenalties,
    ConnectionCounts,
    Role,
    auth_penalty,
    check_address_encoding,
    check_hops,
    count_received,
    extend_data_deadline,
)
from roundtrip.servers.smtp import Accepted
from roundtrip.store import Store

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"  # a second loopback source address: "another client IP"
SERVER_NAME = "mail.example.com"
TIMEOUT = 5.0
QUIET = 0.5  # how long "no reply yet" is watched for
LOCAL_DOMAINS = ("example.com", "example.org")
USER = "user@example.com"
PASSWORD = "correct horse battery"
OTHER = "user@example.org"
STRANGER = "someone@ext.test"
BANNER = f"220 {SERVER_NAME} roundtrip ESMTP"


def raw_client(
    port: int, ctx: ssl.SSLContext | None = None, *, source: str | None = None
) -> RawSMTPClient:
    """Non-UTF-8 reply bytes are shown escaped; a reset ends ``read_to_eof`` like an EOF."""
    return RawSMTPClient(
        port, ctx, source=source, decode_errors="backslashreplace", reset_is_eof=True
    )


@dataclass
class World(SMTPWorld):
    def raw(self, role: Role = Role.SMTP, *, source: str | None = None) -> RawSMTPClient:
        ctx = self.ca.client_context() if role is Role.SUBMISSIONS else None
        return raw_client(self.ports[role], ctx, source=source)

    def tasks(self) -> int:
        """Tasks alive on the server loop (the probe itself excluded)."""
        return self.thread.run(_count_tasks(), timeout=TIMEOUT)

    def wait_tasks(self, baseline: int) -> int:
        """The task count once it is back at ``baseline``, or what it is at the deadline."""
        return self.thread.run(_wait_tasks(baseline, TIMEOUT), timeout=TIMEOUT + 1)


async def _count_tasks() -> int:
    return len(asyncio.all_tasks()) - 1


async def _wait_tasks(baseline: int, timeout: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (count := len(asyncio.all_tasks()) - 1) > baseline and loop.time() < deadline:
        await asyncio.sleep(0.01)  # sleep-ok: polls a condition under a deadline, on the loop
    return count


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


MakeWorld = Callable[..., World]


@pytest.fixture
def make_world(ca: CertificateAuthority) -> Iterator[MakeWorld]:
    """Builds a private store and the three listeners with the given limits."""
    started: list[SMTPListeners] = []

    def build(
        limits: SMTPLimits | None = None,
        *,
        idle_timeout: float = TIMEOUT,
        tls_handshake_timeout: float = TIMEOUT,
        max_recipients: int = 1000,
    ) -> World:
        store = Store()
        store.add_user(USER, PASSWORD)
        store.add_user(OTHER, "other password")
        listeners = SMTPListeners(ca, thread_name="smtp-hardening-loop")
        started.append(listeners)
        world = World(ca=ca, store=store, thread=listeners.thread)

        def router(accepted: Accepted) -> None:
            world.routed.append(accepted)
            for rcpt in accepted.rcpt_tos:
                store.deliver(
                    rcpt, accepted.raw, envelope_from=accepted.mail_from, head=accepted.head
                )

        world.ports.update(
            listeners.start(
                Role,
                store=store,
                router=router,
                local_domains=LOCAL_DOMAINS,
                max_recipients=max_recipients,
                limits=limits,
                max_message_size=1_000_000,
                idle_timeout=idle_timeout,
                tls_handshake_timeout=tls_handshake_timeout,
            )
        )
        return world

    yield build
    errors: list[BaseException] = []
    for listeners in started:
        errors.extend(listeners.close())
    assert errors == []


@pytest.fixture
def world(make_world: MakeWorld) -> World:
    return make_world()


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def assert_serves(world: World, role: Role = Role.SMTP) -> None:
    """A fresh client gets the banner and a full transaction goes through."""
    before = len(world.routed)
    with world.raw(role) as client:
        assert client.reply() == [BANNER]
        client.cmd("EHLO client.example")
        if role is not Role.SMTP:
            assert client.cmd(auth_plain(USER, PASSWORD))[0].startswith("235 ")
        assert client.cmd(f"MAIL FROM:<{USER if role is not Role.SMTP else STRANGER}>") == [
            "250 2.1.0 OK"
        ]
        assert client.cmd(f"RCPT TO:<{USER}>") == ["250 2.1.5 OK"]
        assert client.cmd("DATA")[0].startswith("354 ")
        client.send(b"Subject: alive\r\n\r\nstill serving\r\n.\r\n")
        assert client.reply()[0].startswith("250 2.0.0 OK: queued as ")
        assert client.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert len(world.routed) == before + 1


def open_session(client: RawSMTPClient) -> None:
    assert client.reply() == [BANNER]
    assert client.cmd("EHLO client.example")[0] == f"250-{SERVER_NAME}"


def start_data(client: RawSMTPClient, rcpt: str = USER) -> None:
    assert client.cmd(f"MAIL FROM:<{STRANGER}>") == ["250 2.1.0 OK"]
    assert client.cmd(f"RCPT TO:<{rcpt}>") == ["250 2.1.5 OK"]
    assert client.cmd("DATA")[0].startswith("354 ")


def trickle_until_closed(client: RawSMTPClient, payload: bytes, *, give_up: float) -> bytes:
    """Send ``payload`` one byte at a time, about 10 per second, until the server hangs up.

    Returns what the server sent meanwhile; fails if it is still open after ``give_up`` s.
    """
    deadline = time.monotonic() + give_up
    received = b""
    client.sock.settimeout(0.1)  # the pacing: each byte waits on recv, not on a sleep
    try:
        for byte in payload:
            assert time.monotonic() < deadline, f"still open after {give_up} s: {received!r}"
            try:
                client.sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = client.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            pytest.fail(f"payload exhausted before the server closed: {received!r}")
    finally:
        client.sock.settimeout(TIMEOUT)
    return received + client.read_to_eof()


# A1.1 command line length (RFC 5321 4.5.3.1.4)


def test_command_line_limit_512_octets(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        at_limit = "NOOP " + "x" * (512 - len("NOOP ") - 2)  # 512 octets with CRLF
        assert client.cmd(at_limit) == ["250 2.0.0 OK"]
        over = at_limit + "x"
        assert client.cmd(over) == ["500 5.5.2 Command line too long"]
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]  # the session goes on
    assert_serves(world)


def test_command_line_limit_is_configurable(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(max_command_line=100))
    with world.raw() as client:
        open_session(client)
        assert client.cmd("NOOP " + "x" * 93) == ["250 2.0.0 OK"]  # 100 with CRLF
        assert client.cmd("NOOP " + "x" * 94) == ["500 5.5.2 Command line too long"]
    assert_serves(world)


def test_megabytes_without_crlf_keep_memory_bounded(world: World) -> None:
    flood = b"A" * 5_000_000  # five times the "1 MB without CRLF" case
    with world.raw() as client:
        open_session(client)
        tracemalloc.start()
        try:
            client.send(flood)
            client.send(b"\r\nNOOP\r\n")
            first = client.reply()
            second = client.reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert first == ["500 5.5.2 Command line too long"]
        assert second == ["250 2.0.0 OK"]
    # the server holds at most a few reader limits, never the megabyte
    assert peak < 2_000_000, peak
    assert_serves(world)


# A1.2 text line length (RFC 5321 4.5.3.1.6)


def test_long_text_line_refused_after_final_dot_only(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        start_data(client)
        client.send(b"Subject: long\r\n\r\n" + (b"y" * 5555 + b"\r\n") * 3)
        assert client.silent_for(QUIET) == b""  # RFC 5321 4.2.5: no reply before the dot
        client.send(b".\r\n")
        assert client.reply() == ["500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"]
        # the twin on the same session: a 1000-octet line is within the limit
        start_data(client)
        longest = b"z" * 998 + b"\r\n"
        client.send(b"Subject: fits\r\n\r\n" + longest + b".\r\n")
        assert client.reply()[0].startswith("250 2.0.0 OK: queued as ")
    (accepted,) = world.routed
    assert accepted.raw.endswith(b"\r\n\r\n" + longest)
    assert_serves(world)


# A1.3 recipients


def test_at_least_100_recipients_then_452(make_world: MakeWorld) -> None:
    world = make_world(max_recipients=100)
    with world.raw() as client:
        open_session(client)
        assert client.cmd(f"MAIL FROM:<{STRANGER}>") == ["250 2.1.0 OK"]
        for _ in range(100):
            assert client.cmd(f"RCPT TO:<{USER}>") == ["250 2.1.5 OK"]
        assert client.cmd(f"RCPT TO:<{USER}>") == ["452 4.5.3 Error: too many recipients"]
        assert client.cmd("DATA")[0].startswith("354 ")
        client.send(b"Subject: many\r\n\r\nx\r\n.\r\n")
        assert client.reply()[0].startswith("250 ")
    assert len(world.routed[0].rcpt_tos) == 100
    assert_serves(world)


def test_default_recipient_limit_is_1000() -> None:
    from roundtrip.config import StackConfig

    assert StackConfig().max_recipients == 1000  # Postfix smtpd_recipient_limit


# A1.6 error flood, A8.3 command budget


def test_junk_flood_gets_421_at_the_error_limit(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        client.send(b"".join(b"GARBAGE%d\r\n" % i for i in range(25)))
        data = client.read_to_eof()  # the server hangs up by itself
    lines = data.decode().split("\r\n")
    assert lines[:20] == ["500 5.5.2 Error: command not recognized"] * 20
    assert lines[20:] == ["421 4.7.0 Error: too many errors", ""]
    assert_serves(world)


def test_errors_below_the_limit_do_not_close(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        for i in range(19):
            assert client.cmd(f"GARBAGE{i}") == ["500 5.5.2 Error: command not recognized"]
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]
        # rejected commands of any kind count: the 20th error closes
        assert client.cmd(f"RCPT TO:<{USER}>") == ["503 5.5.1 Error: need MAIL command"]
        assert client.reply() == ["421 4.7.0 Error: too many errors"]
        assert client.read_to_eof() == b""


def test_nul_and_8bit_command_bytes_are_errors(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        assert client.cmd(b"NO\x00OP")[0].startswith("500 ")
        assert client.cmd(b"\xff\xfe")[0].startswith("500 ")
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]


def test_command_budget_gets_421(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(command_limits=(("*", 1000), ("NOOP", 5))))
    with world.raw() as client:
        open_session(client)
        for _ in range(5):
            assert client.cmd("NOOP") == ["250 2.0.0 OK"]
        assert client.cmd("NOOP") == ["421 4.7.0 NOOP sent too many times"]
        assert client.read_to_eof() == b""
    assert_serves(world)


def test_command_budget_pipelined_after_421_runs_nothing(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(command_limits=(("*", 1000), ("NOOP", 1))))
    with world.raw() as client:
        open_session(client)
        client.send(
            f"NOOP\r\nNOOP\r\nMAIL FROM:<{STRANGER}>\r\nRCPT TO:<{USER}>\r\nDATA\r\n"
            "Subject: after\r\n\r\nx\r\n.\r\n".encode()
        )
        data = client.read_to_eof()
    assert data == b"250 2.0.0 OK\r\n421 4.7.0 NOOP sent too many times\r\n"
    assert world.routed == []
    assert_serves(world)


# A8.2 connection caps


def test_per_ip_connection_cap(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(max_connections_per_ip=2))
    with world.raw() as first, world.raw() as second:
        assert first.reply() == [BANNER]
        assert second.reply() == [BANNER]
        with world.raw() as third:
            assert (
                third.read_to_eof() == b"421 4.7.0 Error: too many connections from 127.0.0.1\r\n"
            )
        # another client IP is not affected
        with world.raw(source=OTHER_HOST) as other:
            assert other.reply() == [BANNER]
        # the capped connections still work
        assert first.cmd("NOOP") == ["250 OK"]
        assert second.cmd("QUIT") == ["221 Bye"]
        assert second.read_to_eof() == b""
        # closing one lets a new one in (the server frees the slot when it sees the close)
        deadline = time.monotonic() + TIMEOUT
        while True:
            with world.raw() as again:
                greeting = again.reply()
            if greeting == [BANNER] or time.monotonic() > deadline:
                break
        assert greeting == [BANNER]


def test_total_connection_cap(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(max_connections=2, max_connections_per_ip=0))
    with world.raw() as first, world.raw(source=OTHER_HOST) as second:
        assert first.reply() == [BANNER]
        assert second.reply() == [BANNER]
        with world.raw(source=OTHER_HOST) as third:
            assert third.read_to_eof() == b"421 4.7.0 Error: too many connections\r\n"
    assert_serves(world)


def test_idle_socket_flood_from_one_ip_does_not_lock_out_others(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(max_connections_per_ip=50))
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(world.raw()) for _ in range(60)]
        greetings = [client.reply() for client in idle]
        assert greetings.count([BANNER]) == 50
        refused = [g for g in greetings if g != [BANNER]]
        assert refused == [["421 4.7.0 Error: too many connections from 127.0.0.1"]] * 10
        before = len(world.routed)
        with world.raw(source=OTHER_HOST) as client:
            open_session(client)
            start_data(client)
            client.send(b"Subject: legit\r\n\r\nx\r\n.\r\n")
            assert client.reply()[0].startswith("250 2.0.0 OK: queued as ")
        assert len(world.routed) == before + 1


# A4.3 AUTH brute force

FAST_PENALTY = SMTPLimits(auth_penalty_initial=0.3, auth_penalty_max=0.6, max_auth_failures=3)


def _timed(client: RawSMTPClient, command: str) -> tuple[list[str], float]:
    started = time.monotonic()
    reply = client.cmd(command)
    return reply, time.monotonic() - started


def test_auth_failures_delay_grows_then_421(make_world: MakeWorld) -> None:
    world = make_world(FAST_PENALTY)
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        r1, t1 = _timed(client, auth_plain(USER, "wrong 1"))
        r2, t2 = _timed(client, auth_plain("nobody@example.com", "wrong 2"))
        r3, t3 = _timed(client, auth_plain(USER, "wrong 3"))
        assert r1 == r2 == r3 == ["535 5.7.8 Authentication credentials invalid"]
        assert client.reply() == ["421 4.7.0 Error: too many failed authentications"]
        assert client.read_to_eof() == b""
    assert t1 < 0.25, t1
    assert 0.3 <= t2 < 0.3 + 1.0, t2
    assert 0.6 <= t3 < 0.6 + 1.0, t3  # doubled, and capped at auth_penalty_max
    # another client IP is not delayed: the penalty is per source
    with world.raw(Role.SUBMISSIONS, source=OTHER_HOST) as other:
        open_session(other)
        reply, elapsed = _timed(other, auth_plain(USER, "wrong"))
        assert reply == ["535 5.7.8 Authentication credentials invalid"]
        assert elapsed < 0.25, elapsed
    # no lockout: the right password from a new connection still works (after the delay)
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        reply, elapsed = _timed(client, auth_plain(USER, PASSWORD))
        assert reply == ["235 2.7.0 Authentication successful"]
        assert elapsed >= 0.6
    # ...and success cleared the penalty
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        reply, elapsed = _timed(client, auth_plain(USER, "wrong again"))
        assert reply == ["535 5.7.8 Authentication credentials invalid"]
        assert elapsed < 0.25, elapsed
    assert_serves(world, Role.SUBMISSIONS)


def test_auth_below_the_failure_cap_keeps_the_session(make_world: MakeWorld) -> None:
    world = make_world(replace(FAST_PENALTY, auth_penalty_initial=0.0))
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        for _ in range(2):
            assert client.cmd(auth_plain(USER, "wrong")) == [
                "535 5.7.8 Authentication credentials invalid"
            ]
        assert client.cmd(auth_plain(USER, PASSWORD)) == ["235 2.7.0 Authentication successful"]
        assert client.cmd(f"MAIL FROM:<{USER}>") == ["250 2.1.0 OK"]


# A4.4 AUTH protocol abuse


def _login_exchange(client: RawSMTPClient, *answers: str) -> list[str]:
    reply = client.cmd("AUTH LOGIN")
    for answer in answers:
        assert reply[0].startswith("334 "), reply
        reply = client.cmd(answer)
    return reply


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(["AUTH PLAIN !!notbase64!!"], "501 5.5.2 Can't decode base64", id="plain-b64"),
        pytest.param(["AUTH PLAIN", "%%%"], "501 5.5.2 Can't decode base64", id="plain-chal-b64"),
        pytest.param(["AUTH LOGIN", "@@@"], "501 5.5.2 Can't decode base64", id="login-b64"),
        pytest.param(["AUTH PLAIN", "*"], "501 5.7.0 Auth aborted", id="plain-abort"),
        pytest.param(["AUTH LOGIN", b64(USER), "*"], "501 5.7.0 Auth aborted", id="login-abort"),
        pytest.param(
            ["AUTH PLAIN AAA="], "535 5.7.8 Authentication credentials invalid", id="plain-empty"
        ),
        pytest.param(
            ["AUTH LOGIN", "", ""], "535 5.7.8 Authentication credentials invalid", id="login-empty"
        ),
        pytest.param(
            ["AUTH PLAIN", "A" * 5000],
            "500 5.5.6 Authentication exchange line is too long",
            id="long-sasl-line",
        ),
    ],
)
def test_auth_abuse(world: World, steps: list[str], expected: str) -> None:
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        reply = client.cmd(steps[0])
        for step in steps[1:]:
            assert reply[0].startswith("334 "), reply
            reply = client.cmd(step)
        assert reply == [expected]
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]  # nothing of the exchange ran as commands
        # the twin: the session can still authenticate
        assert client.cmd(auth_plain(USER, PASSWORD)) == ["235 2.7.0 Authentication successful"]


def test_second_auth_and_auth_in_transaction_get_503(world: World) -> None:
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        assert client.cmd(auth_plain(USER, PASSWORD)) == ["235 2.7.0 Authentication successful"]
        assert client.cmd(auth_plain(USER, PASSWORD)) == ["503 5.5.1 Already authenticated"]
        assert client.cmd(f"MAIL FROM:<{USER}>") == ["250 2.1.0 OK"]
        assert client.cmd(auth_plain(USER, PASSWORD)) == [
            "503 5.5.1 Error: MAIL transaction in progress"
        ]
        assert client.cmd(f"RCPT TO:<{OTHER}>") == ["250 2.1.5 OK"]  # the transaction survives


def test_passwords_never_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mail.log")
    caplog.set_level(logging.DEBUG, logger="roundtrip")
    secret = "s3cret-Pa55word"
    plain_blob = base64.b64encode(f"\0{USER}\0{secret}".encode()).decode()
    with world.raw(Role.SUBMISSIONS) as client:
        open_session(client)
        assert client.cmd(f"AUTH PLAIN {plain_blob}")[0].startswith("535 ")
        assert _login_exchange(client, b64(USER), b64(secret))[0].startswith("535 ")
        reply = client.cmd("AUTH PLAIN")
        assert reply[0].startswith("334 ")
        assert client.cmd(f"{secret}!")[0].startswith("501 ")  # undecodable: echoed nowhere
        assert client.cmd(auth_plain(USER, PASSWORD))[0].startswith("235 ")
        assert client.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert any(r.name == "mail.log" for r in caplog.records)  # logging did happen
    text = caplog.text
    for leaked in (secret, plain_blob, b64(secret), PASSWORD, b64(PASSWORD)):
        assert leaked not in text
    assert base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode() not in text


# A8.1 slowloris


def test_trickled_command_hits_the_command_deadline(make_world: MakeWorld) -> None:
    world = make_world(idle_timeout=1.0)
    with world.raw() as client:
        open_session(client)
        started = time.monotonic()
        data = trickle_until_closed(client, b"NOOP " + b"x" * 200 + b"\r\n", give_up=3.0)
        elapsed = time.monotonic() - started
    assert data == b"421 4.4.2 Error: timeout exceeded\r\n"
    assert 0.9 <= elapsed < 2.0, elapsed
    assert_serves(world)


def test_trickled_data_hits_the_data_deadline(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(data_timeout=1.0, min_data_rate=500), idle_timeout=TIMEOUT)
    with world.raw() as client:
        open_session(client)
        start_data(client)
        started = time.monotonic()
        data = trickle_until_closed(client, b"Subject: slow\r\n\r\n" + b"y" * 200, give_up=3.0)
        elapsed = time.monotonic() - started
    assert data == b"421 4.4.2 Error: timeout exceeded\r\n"
    assert 0.9 <= elapsed < 2.0, elapsed
    assert world.routed == []
    assert_serves(world)


def test_fast_data_is_not_cut_by_the_data_deadline(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(data_timeout=1.0, min_data_rate=500), idle_timeout=TIMEOUT)
    body = b"Subject: fast\r\n\r\n" + (b"f" * 98 + b"\r\n") * 5000  # 500 kB
    with world.raw() as client:
        open_session(client)
        start_data(client)
        client.send(body + b".\r\n")
        assert client.reply()[0].startswith("250 2.0.0 OK: queued as ")
    assert world.routed[0].raw.endswith(body)


def test_idle_client_dropped_silently_at_the_command_deadline(make_world: MakeWorld) -> None:
    world = make_world(idle_timeout=0.5)
    with world.raw() as client:
        open_session(client)
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]
        started = time.monotonic()
        assert client.read_to_eof() == b""
        assert time.monotonic() - started < 1.5
    assert_serves(world)


# A3.4 implicit TLS: silent client


def test_implicit_tls_silent_client_dropped_at_handshake_timeout(make_world: MakeWorld) -> None:
    world = make_world(tls_handshake_timeout=0.5)
    port = world.ports[Role.SUBMISSIONS]
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(4096) == b""
        assert time.monotonic() - started < 0.5 + 1.0
    assert_serves(world, Role.SUBMISSIONS)


# VRFY/EXPN (A4.7)


def test_vrfy_expn_reveal_nothing(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        for address in (USER, "nobody@example.com"):
            reply = client.cmd(f"VRFY <{address}>")
            assert reply == [
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
            ]
        assert client.cmd("EXPN staff") == ["502 5.5.1 EXPN not implemented"]


# A5.1 8-bit and invalid UTF-8 in the envelope


def test_8bit_sender_without_smtputf8_refused(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        reply = client.cmd(b"MAIL FROM:<anne\xff@example.com>")
        assert reply == ["553 5.6.7 Non-ASCII addresses not permitted for that sender"]
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]
        reply = client.cmd("MAIL FROM:<anné@example.com>".encode())
        assert reply == ["553 5.6.7 Non-ASCII addresses not permitted for that sender"]
        # the twin: ASCII is fine, and an 8-bit recipient gets its own refusal
        assert client.cmd(f"MAIL FROM:<{STRANGER}>") == ["250 2.1.0 OK"]
        reply = client.cmd("RCPT TO:<usér@example.com>".encode())
        assert reply == ["553 5.6.7 Non-ASCII addresses not permitted for that recipient"]
    assert_serves(world)


def test_smtputf8_accepts_utf8_and_refuses_invalid_utf8(world: World) -> None:
    with world.raw() as client:
        open_session(client)
        assert client.cmd("MAIL FROM:<anné@ext.test> SMTPUTF8".encode()) == ["250 2.1.0 OK"]
        assert client.cmd("RSET") == ["250 2.0.0 OK"]
        reply = client.cmd(b"MAIL FROM:<anne\xc3\x41@ext.test> SMTPUTF8")  # a cut sequence
        assert reply == ["553 5.1.7 Error: malformed UTF-8 in sender address"]
        assert client.cmd(f"MAIL FROM:<{STRANGER}> SMTPUTF8") == ["250 2.1.0 OK"]
        reply = client.cmd(b"RCPT TO:<u\xed\xa0\x80@example.com>")  # an encoded surrogate
        assert reply == ["553 5.1.3 Error: malformed UTF-8 in recipient address"]
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]
    assert_serves(world)


# A5.4 mail loops


@pytest.mark.parametrize(("hops", "accepted"), [(50, True), (51, False)])
def test_hop_limit(world: World, hops: int, accepted: bool) -> None:
    trace = b"".join(
        b"Received: from hop%d.example (hop%d.example [192.0.2.1])\r\n\tby x; "
        b"Thu, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i)
        for i in range(hops)
    )
    with world.raw() as client:
        open_session(client)
        start_data(client)
        client.send(trace + b"Subject: loop\r\n\r\nReceived: in the body does not count\r\n.\r\n")
        reply = client.reply()
    if accepted:
        assert reply[0].startswith("250 2.0.0 OK: queued as ")
        assert len(world.routed) == 1
    else:
        assert reply == ["554 5.4.6 Error: too many hops"]
        assert world.routed == []
    assert_serves(world)


# A2.3 pregreet


def test_pregreet_client_is_dropped(make_world: MakeWorld) -> None:
    world = make_world(SMTPLimits(greet_pause=0.3))
    with world.raw() as client:
        client.send(b"EHLO eager.example\r\n")
        data = client.read_to_eof()
    assert data == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    # the twin: a client that waits for the banner is served after the pause
    with world.raw() as client:
        started = time.monotonic()
        assert client.reply() == [BANNER]
        assert time.monotonic() - started >= 0.25
        assert client.cmd("EHLO client.example")[0] == f"250-{SERVER_NAME}"
    assert world.routed == []
    assert_serves(world)


# A8.4 abrupt disconnects


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_reset_mid_data_leaves_nothing(world: World) -> None:
    assert_serves(world)  # warm up: lazily created objects exist before the baseline
    world.routed.clear()
    stored = len(world.store.messages(USER, "INBOX"))
    tasks, fds = world.tasks(), _fd_count()
    client = world.raw()
    open_session(client)
    start_data(client)
    client.send(b"Subject: half\r\n\r\nhalf a body\r\n")
    client.reset()
    assert world.wait_tasks(tasks) == tasks
    assert _fd_count() == fds
    assert world.routed == []
    assert len(world.store.messages(USER, "INBOX")) == stored
    assert_serves(world)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("where", ["implicit-tls", "starttls"])
def test_reset_mid_handshake_leaves_nothing(world: World, where: str) -> None:
    assert_serves(world, Role.SUBMISSIONS)
    tasks, fds = world.tasks(), _fd_count()
    if where == "implicit-tls":
        client = raw_client(world.ports[Role.SUBMISSIONS])  # plain socket: no handshake yet
    else:
        client = world.raw(Role.SUBMISSION)
        open_session(client)
        assert client.cmd("STARTTLS") == ["220 Ready to start TLS"]
    client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    client.reset()
    assert world.wait_tasks(tasks) == tasks
    assert _fd_count() == fds
    assert world.routed[1:] == []
    assert_serves(world, Role.SUBMISSIONS)


# The pure policy behind the limits (protocols/smtp.py), with an injected clock


def test_auth_penalty_doubles_and_caps() -> None:
    delays = [auth_penalty(n, initial=0.5, maximum=2.0) for n in range(6)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert auth_penalty(3, initial=0.0, maximum=2.0) == 0.0  # turned off


def test_auth_penalties_expire_and_clear_on_success() -> None:
    penalties = AuthPenalties(initial=1.0, maximum=8.0, timeout=60.0)
    penalties.failed("192.0.2.1", now=0.0)
    penalties.failed("192.0.2.1", now=1.0)
    assert penalties.delay("192.0.2.1", now=2.0) == 2.0
    assert penalties.delay("192.0.2.2", now=2.0) == 0.0  # per IP
    assert penalties.delay("192.0.2.1", now=61.5) == 0.0  # forgotten after the timeout
    penalties.failed("192.0.2.1", now=100.0)
    penalties.succeeded("192.0.2.1")
    assert penalties.delay("192.0.2.1", now=100.0) == 0.0


def test_connection_counts_refuse_and_release() -> None:
    counts = ConnectionCounts(max_total=3, max_per_ip=2)
    assert counts.admit("a") is None and counts.admit("a") is None
    assert counts.admit("a") == "421 4.7.0 Error: too many connections from a"
    assert counts.admit("b") is None
    assert counts.admit("c") == "421 4.7.0 Error: too many connections"
    counts.release("a")
    assert counts.admit("c") is None
    assert counts.total == 3


def test_data_deadline_only_a_fast_sender_extends() -> None:
    # 1 byte per 0.2 s at a 500 B/s floor: each byte buys 2 ms, time runs out
    deadline = 10.0
    now = 0.0
    while now < deadline:
        now += 0.2
        deadline = extend_data_deadline(deadline, now=now, received=1, min_rate=500, timeout=10.0)
    assert 10.0 < now < 10.5
    # a fast sender is held at "timeout from now", never beyond
    assert extend_data_deadline(10.0, now=5.0, received=10**9, min_rate=500, timeout=10.0) == 15.0


def test_count_received_ignores_the_body() -> None:
    raw = b"Received: a\r\n\tfolded\r\nreceived : b\r\nSubject: x\r\n\r\nReceived: body\r\n"
    assert count_received(raw) == 2
    assert check_hops(raw, max_hops=2) is None
    assert check_hops(raw, max_hops=1) == "554 5.4.6 Error: too many hops"
    assert check_hops(raw, max_hops=0) is None  # turned off


@pytest.mark.parametrize(
    ("address", "smtputf8", "expected"),
    [
        ("plain@example.com", False, None),
        ("anné@example.com", True, None),
        ("anné@example.com", False, "553 5.6.7 Non-ASCII addresses not permitted for that sender"),
        ("anne\udcff@example.com", True, "553 5.1.7 Error: malformed UTF-8 in sender address"),
    ],
)
def test_check_address_encoding(address: str, smtputf8: bool, expected: str | None) -> None:
    assert check_address_encoding(address, smtputf8=smtputf8, sender=True) == expected
