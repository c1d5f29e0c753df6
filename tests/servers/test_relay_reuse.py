"""The relay's MX connection cache, and the spool record written right after the MX's reply.

Real aiosmtpd MXs on loopback, found through our DNS server (the ``World`` of test_relay.py).
The MX side counts what it sees: connections opened and closed, RSET and QUIT, and it can
close a connection, refuse MAIL FROM on a reused session, or hold a reply until released.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from test_relay import SENDER, TIMEOUT, Recorder, World, _call

from roundtrip.protocols.tlspolicy import TLSPolicy
from roundtrip.servers.relay import Relay
from roundtrip.spool import RelaySpool

MX = "mail.example.org"


@dataclass
class Counting(Recorder):
    """A Recorder that also counts RSET/QUIT, refuses chosen MAILs and holds chosen replies."""

    rsets: int = 0
    quits: int = 0
    #: Reply to every MAIL FROM (None: accept it).
    mail_reply: str | None = None
    #: Reply to every MAIL FROM after the first one of a session (None: accept it).
    later_mail_reply: str | None = None
    #: Commands ("DATA", "RSET", "QUIT") whose reply waits until ``release`` is set.
    hold: set[str] = field(default_factory=set)
    held: threading.Event = field(default_factory=threading.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _mails: dict[int, int] = field(default_factory=dict)

    async def _maybe_hold(self, command: str) -> None:
        if command in self.hold:
            self.held.set()
            await self.release.wait()

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        seen = self._mails[id(session)] = self._mails.get(id(session), 0) + 1
        if self.mail_reply is not None:
            return self.mail_reply
        if seen > 1 and self.later_mail_reply is not None:
            return self.later_mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await self._maybe_hold("DATA")
        return await super().handle_DATA(server, session, envelope)

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.rsets += 1
        await self._maybe_hold("RSET")
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        await self._maybe_hold("QUIT")
        return "221 Bye"


class ReuseWorld(World):
    def __init__(self) -> None:
        super().__init__()
        #: Server-side sessions of each MX still connected.
        self.open: dict[str, set[SMTP]] = {}

    def start_counting_mx(self, name: str, *, tls: bool = True) -> Counting:
        recorder = Counting()
        context = self.ca.server_context([name]) if tls else None
        sessions = self.open.setdefault(name, set())

        class Tracked(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                sessions.add(self)

            def connection_lost(self, error: Exception | None) -> None:
                sessions.discard(self)
                super().connection_lost(error)

        def factory() -> SMTP:
            recorder.connections += 1
            return Tracked(recorder, hostname=name, tls_context=context, require_starttls=tls)

        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)

        server = self.lt.run(start(), TIMEOUT)
        self.servers.append(server)
        self.ports[name] = server.sockets[0].getsockname()[1]
        return recorder

    def open_at(self, name: str) -> int:
        return len(self.open.get(name, ()))

    def drop_connections(self, name: str) -> None:
        """Close every connection of MX ``name`` from the server side."""

        async def drop() -> None:
            for session in list(self.open.get(name, ())):
                assert session.transport is not None
                session.transport.close()

        self.lt.run(drop(), TIMEOUT)

    def release(self, mx: Counting) -> None:
        self.lt.run(_call(mx.release.set), TIMEOUT)

    def run_on_relay(self, action: Callable[[Relay], Any]) -> None:
        relay = self.relay
        assert relay is not None
        self.lt.run(action(relay), TIMEOUT)

    def deliver(self, rcpt: str) -> None:
        self.enqueue([rcpt])
        self.wait_step(rcpt, "delivered")
        self.idle()

    def connected(self, rcpt: str) -> list[str]:
        return [e.detail for e in self.events if e.recipient == rcpt and e.step == "connected"]


def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"not within {TIMEOUT} s: {what}"
        time.sleep(0.005)  # sleep-ok: polling a condition with a deadline


@pytest.fixture
def world() -> Iterator[ReuseWorld]:
    w = ReuseWorld()
    yield w
    w.close()
    assert w.lt.take_errors() == []


@pytest.fixture
def mx(world: ReuseWorld) -> Counting:
    world.down_mx("backup.example.org")
    return world.start_counting_mx(MX)


def _mx_queries(world: World) -> int:
    return sum(1 for name, rdtype, _ in world.dns.query_log if rdtype == "MX")


# -- reuse ----------------------------------------------------------------------------------


def test_relay_reuse_second_message_rides_the_first_connection(
    world: ReuseWorld, mx: Counting
) -> None:
    world.make_relay()
    world.deliver("bob@example.org")
    world.deliver("carol@example.org")
    assert mx.connections == 1
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"], ["carol@example.org"]]
    port = world.ports[MX]
    assert world.connected("bob@example.org") == [f"{MX}[127.0.0.1]:{port}"]
    assert world.connected("carol@example.org") == [f"{MX}[127.0.0.1]:{port} (reused)"]
    assert mx.rsets >= 1 and mx.quits == 0
    assert all(m.tls for m in mx.messages)
    assert _mx_queries(world) == 2  # DNS is asked for every message, never cached


def test_relay_reuse_cache_time_zero_dials_every_message(world: ReuseWorld, mx: Counting) -> None:
    world.make_relay(connection_cache_time=0)
    world.deliver("bob@example.org")
    world.deliver("carol@example.org")
    assert mx.connections == 2 and mx.quits == 2 and mx.rsets == 0
    assert len(mx.messages) == 2
    assert not any(d.endswith("(reused)") for d in world.connected("carol@example.org"))


def test_relay_reuse_connection_the_mx_closed_is_replaced_at_once(
    world: ReuseWorld, mx: Counting
) -> None:
    world.make_relay(connection_cache_time=30)
    world.deliver("bob@example.org")
    assert world.open_at(MX) == 1
    world.drop_connections(MX)
    until(lambda: world.open_at(MX) == 0, "the MX closed its connection")
    world.deliver("carol@example.org")
    assert world.steps("carol@example.org") == ["queued", "mx-lookup", "connected", "delivered"]
    assert mx.connections == 2
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"], ["carol@example.org"]]
    assert not world.connected("carol@example.org")[0].endswith("(reused)")


def test_relay_reuse_421_to_mail_from_falls_back_to_a_fresh_connection(
    world: ReuseWorld, mx: Counting
) -> None:
    mx.later_mail_reply = "421 4.3.2 Service shutting down"
    world.make_relay(connection_cache_time=30)
    world.deliver("bob@example.org")
    world.deliver("carol@example.org")
    assert "deferred" not in world.steps("carol@example.org")
    assert mx.connections == 2
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"], ["carol@example.org"]]
    assert world.relay is not None and world.relay.queue() == []


def test_relay_reuse_same_421_on_a_fresh_connection_defers(world: ReuseWorld, mx: Counting) -> None:
    """Twin: the fallback is for stale connections only; an MX that says 421 still defers."""
    world.make_relay(connection_cache_time=30)
    world.deliver("bob@example.org")
    mx.mail_reply = "421 4.3.2 Service shutting down"
    world.enqueue(["carol@example.org"])
    (deferred,) = world.wait_step("carol@example.org", "deferred")
    assert "421" in deferred.detail
    assert mx.connections == 2  # the cached one, then a fresh one: both refused
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"]]


def test_relay_reuse_idle_connection_expires_with_quit(world: ReuseWorld, mx: Counting) -> None:
    world.make_relay(connection_cache_time=0.2)
    world.deliver("bob@example.org")
    until(lambda: world.open_at(MX) == 0, "the idle connection was closed")
    assert (mx.connections, mx.rsets, mx.quits) == (1, 1, 1)


def test_relay_reuse_idle_connection_stays_open_within_the_cache_time(
    world: ReuseWorld, mx: Counting
) -> None:
    """Twin: with a long cache time the connection is still there; clear() then closes it."""
    world.make_relay(connection_cache_time=60)
    world.deliver("bob@example.org")
    assert world.open_at(MX) == 1 and mx.quits == 0
    world.run_on_relay(lambda relay: relay.clear())
    # clear() returns once the relay's side is closed; the MX notices a moment later.
    until(lambda: world.open_at(MX) == 0, "clear() closed the cached connection")
    assert mx.quits == 1


def test_relay_reuse_close_leaves_no_connection_at_the_mx(world: ReuseWorld, mx: Counting) -> None:
    world.make_relay(connection_cache_time=60)
    world.deliver("bob@example.org")
    assert world.open_at(MX) == 1
    world.run_on_relay(lambda relay: relay.close())
    until(lambda: world.open_at(MX) == 0, "close() dropped the cached connection")
    assert mx.quits == 0  # dropped, not a QUIT: the loop may stop right after close()


def test_relay_reuse_messages_per_connection_are_bounded(world: ReuseWorld, mx: Counting) -> None:
    world.make_relay(connection_reuse_limit=2)
    for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
        world.deliver(rcpt)
    assert mx.connections == 2  # a and b share one; after b it says QUIT
    assert mx.quits == 1
    assert world.connected("c@example.org")[0] == f"{MX}[127.0.0.1]:{world.ports[MX]}"


# -- TLS policy -------------------------------------------------------------------------------


def _plaintext_world(world: ReuseWorld, second_mode: str) -> tuple[Counting, dict[str, TLSPolicy]]:
    mx = world.start_counting_mx(MX, tls=False)
    world.down_mx("backup.example.org")
    policies = {"example.org": TLSPolicy(mode="none")}
    world.make_relay(connection_cache_time=30, tls_policy=policies.get)
    world.deliver("bob@example.org")
    policies["example.org"] = TLSPolicy(mode=second_mode)  # type: ignore[arg-type]
    return mx, policies


def test_relay_reuse_plaintext_connection_is_not_reused_under_enforce(world: ReuseWorld) -> None:
    mx, _ = _plaintext_world(world, "enforce")
    world.enqueue(["carol@example.org"])
    (deferred,) = world.wait_step("carol@example.org", "deferred")
    assert "starttls-not-supported" in deferred.detail
    assert world.connected("carol@example.org") == []
    assert mx.connections == 2  # a fresh dial, which found no STARTTLS
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"]]


def test_relay_reuse_plaintext_connection_is_reused_under_the_same_policy(
    world: ReuseWorld,
) -> None:
    mx, _ = _plaintext_world(world, "none")
    world.deliver("carol@example.org")
    assert mx.connections == 1
    (connected,) = world.connected("carol@example.org")
    assert connected.endswith(" without TLS (reused)")
    # The message went without TLS: its record says why, as the first message's does.
    failures = [e.detail for e in world.events if e.step == "tls-failure"]
    assert len(failures) == 2 and all("starttls-not-supported" in f for f in failures)


def test_relay_reuse_verified_connection_serves_every_policy(world: ReuseWorld) -> None:
    mx = world.start_counting_mx(MX)
    world.down_mx("backup.example.org")
    policies = {"example.org": TLSPolicy(mode="testing")}
    world.make_relay(connection_cache_time=30, tls_policy=policies.get)
    world.deliver("bob@example.org")
    policies["example.org"] = TLSPolicy(mode="enforce")
    world.deliver("carol@example.org")
    assert mx.connections == 1
    assert world.connected("carol@example.org")[0].endswith(
        ":" + str(world.ports[MX]) + " (reused)"
    )


# -- concurrency ------------------------------------------------------------------------------


def test_relay_reuse_concurrent_deliveries_never_share_a_connection(
    world: ReuseWorld, mx: Counting
) -> None:
    world.make_relay(max_concurrent=4, connection_cache_time=30)
    rcpts = [f"user{i}@example.org" for i in range(24)]
    for rcpt in rcpts:  # each its own message: up to 4 in flight at once
        world.enqueue([rcpt])
    for rcpt in rcpts:
        world.wait_step(rcpt, "delivered")
    world.idle()
    assert sorted(r for m in mx.messages for r in m.rcpt_tos) == sorted(rcpts)
    assert not any(e.step in ("deferred", "bounced") for e in world.events)
    assert 1 <= mx.connections <= 4
    assert any(d.endswith("(reused)") for r in rcpts for d in world.connected(r))


# -- spool: the remote's answer is recorded before the next command ---------------------------


@pytest.mark.parametrize(("cache_time", "next_command"), [(0, "QUIT"), (30, "RSET")])
def test_relay_spool_records_the_250_before_the_next_command(
    world: ReuseWorld, mx: Counting, tmp_path: Path, cache_time: float, next_command: str
) -> None:
    mx.rcpt_replies["nobody@example.org"] = ["550 5.1.1 No such user"]
    mx.hold = {next_command}
    world.make_relay(spool=RelaySpool(tmp_path), connection_cache_time=cache_time)
    world.enqueue(["bob@example.org", "nobody@example.org"])
    try:
        assert mx.held.wait(TIMEOUT), f"the relay never sent {next_command}"
        # The MX has not answered: the relay is still in the session, yet both recipients
        # (250 and 550) are on record as settled, the spool file is gone, the DSN is out.
        assert RelaySpool(tmp_path).load() == ([], [])
        assert len(world.local) == 1 and world.local[0][0] == SENDER
        assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"]]
    finally:
        world.release(mx)
    world.idle()


def test_relay_spool_recipients_stay_pending_until_the_final_reply(
    world: ReuseWorld, mx: Counting, tmp_path: Path
) -> None:
    """Twin: while the MX holds its reply to the final dot, both recipients are still due."""
    mx.rcpt_replies["nobody@example.org"] = ["550 5.1.1 No such user"]
    mx.hold = {"DATA"}
    world.make_relay(spool=RelaySpool(tmp_path))
    world.enqueue(["bob@example.org", "nobody@example.org"])
    try:
        assert mx.held.wait(TIMEOUT), "the relay never finished DATA"
        (message,), corrupt = RelaySpool(tmp_path).load()
        assert corrupt == []
        assert message.rcpt == ("bob@example.org", "nobody@example.org")
        assert world.local == []
    finally:
        world.release(mx)
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    assert RelaySpool(tmp_path).load() == ([], [])
