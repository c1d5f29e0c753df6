"""The relay pipelines MAIL, RCPT and DATA towards an MX that offers PIPELINING (RFC 2920).

The MX here is a small SMTP server of our own on a loopback port (``ChunkMX``): it records every
chunk of bytes it reads, so a group written at once shows up as one chunk, and it answers the
commands of a chunk in one write, as Postfix does. It can leave PIPELINING out of its EHLO
reply; then every command must arrive on its own, after the reply to the one before.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
import aiosmtplib.protocol
import pytest
from test_relay import SENDER, TIMEOUT, World, status_fields

from roundtrip.protocols._pipelining import first_write, path, rset_due

MX = "mail.example.org"


@dataclass
class Session:
    """What one connection to the MX carried."""

    chunks: list[bytes] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    messages: list[tuple[bytes, list[bytes], bytes]] = field(default_factory=list)
    closed: bool = False


@dataclass
class ChunkMX:
    """A plaintext SMTP server that records what each read brought, per connection."""

    name: str = MX
    pipelining: bool = True
    #: Recipients (as written in RCPT TO, e.g. b"<x@example.org>") refused with 550.
    refused: set[bytes] = field(default_factory=set)
    #: Reply to every MAIL FROM after the first of a session (None: accept it).
    later_mail_reply: bytes | None = None
    #: Reply to every MAIL FROM (None: as above).
    mail_reply: bytes | None = None
    #: Reply to DATA instead of 354 (None: 354, then the content).
    data_reply: bytes | None = None
    #: A reply nobody asked for, written with the reply to the first final dot of a session.
    dot_extra: bytes | None = None
    #: Recipients per transaction; later ones get 552 (RFC 5321 §4.5.3.1.10). None: no limit.
    rcpt_limit: int | None = None
    #: Offer SMTPUTF8 (RFC 6531) in the EHLO reply.
    smtputf8: bool = False
    sessions: list[Session] = field(default_factory=list)
    #: The banner waits until this many connections are open (then every later one gets it at
    #: once): dials that overlap are then seen to overlap, however fast each one would be.
    banner_after: int = 1
    #: Connections open right now, and the most open at once.
    open_now: int = 0
    open_most: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    protocols: list[_ChunkProtocol] = field(default_factory=list)
    _ungreeted: list[_ChunkProtocol] = field(default_factory=list)

    def protocol(self) -> asyncio.Protocol:
        proto = _ChunkProtocol(self)
        self.protocols.append(proto)
        return proto

    async def close_all(self) -> None:
        """Close every open connection from the server side (on the loop)."""
        for proto in self.protocols:
            if proto.transport is not None:
                proto.transport.close()

    def delivered(self) -> list[list[bytes]]:
        with self.lock:
            return [rcpts for s in self.sessions for _, rcpts, _ in s.messages]


class _ChunkProtocol(asyncio.Protocol):
    def __init__(self, mx: ChunkMX) -> None:
        self.mx = mx
        self.session = Session()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.mail: bytes | None = None
        self.rcpts: list[bytes] = []
        self.in_data = False
        self.mails = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass: same methods.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        with self.mx.lock:
            self.mx.sessions.append(self.session)
            self.mx.open_now += 1
            self.mx.open_most = max(self.mx.open_most, self.mx.open_now)
            waiting = self.mx._ungreeted
            waiting.append(self)
            if len(self.mx.protocols) < self.mx.banner_after:
                return
            greet, waiting[:] = list(waiting), []
        for proto in greet:
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.write(f"220 {self.mx.name} ESMTP\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        with self.mx.lock:
            self.mx.open_now -= 1
            self.session.closed = True

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        with self.mx.lock:
            self.session.chunks.append(data)
        self.buffer += data
        replies: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end == -1:
                    break
                content, self.buffer = self.buffer[: end + 2], self.buffer[end + 5 :]
                with self.mx.lock:
                    self.session.messages.append((self.mail or b"", self.rcpts, content))
                self.in_data, self.mail, self.rcpts = False, None, []
                replies.append(b"250 2.0.0 queued")
                if self.mx.dot_extra is not None and len(self.session.messages) == 1:
                    replies.append(self.mx.dot_extra)
                continue
            line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                break
            self.buffer = rest
            with self.mx.lock:
                self.session.commands.append(line)
            replies.append(self._reply(line))
        if replies:
            self.transport.write(b"".join(r + b"\r\n" for r in replies))
        if replies and replies[-1].startswith(b"221"):
            self.transport.close()

    def _reply(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            extensions = [b"250-PIPELINING"] if self.mx.pipelining else []
            if self.mx.smtputf8:
                extensions.append(b"250-SMTPUTF8")
            return b"\r\n".join([f"250-{self.mx.name}".encode(), *extensions, b"250 8BITMIME"])
        if verb == b"MAIL":
            self.mails += 1
            if self.mx.mail_reply is not None:
                return self.mx.mail_reply
            if self.mails > 1 and self.mx.later_mail_reply is not None:
                return self.mx.later_mail_reply
            self.mail, self.rcpts = line[10:], []
            return b"250 2.1.0 OK"
        if verb == b"RCPT":
            rcpt = line[8:]
            if self.mail is None:
                return b"503 5.5.1 MAIL first"
            if rcpt in self.mx.refused:
                return b"550 5.1.1 No such user"
            if self.mx.rcpt_limit is not None and len(self.rcpts) >= self.mx.rcpt_limit:
                return b"552 5.5.3 Too many recipients"
            self.rcpts.append(rcpt)
            return b"250 2.1.5 OK"
        if verb == b"DATA":
            if not self.rcpts:
                return b"554 5.5.1 No valid recipients"
            if self.mx.data_reply is not None:
                return self.mx.data_reply
            self.in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>"
        if verb == b"RSET":
            self.mail, self.rcpts = None, []
            return b"250 2.0.0 OK"
        if verb == b"QUIT":
            return b"221 2.0.0 Bye"
        return b"502 5.5.2 Unknown command"


class PipeWorld(World):
    def start_chunk_mx(self, mx: ChunkMX) -> ChunkMX:
        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(mx.protocol, "127.0.0.1", 0)

        server = self.lt.run(start(), TIMEOUT)
        self.servers.append(server)
        self.ports[mx.name] = server.sockets[0].getsockname()[1]
        return mx

    def enqueue_together(self, rcpts: list[str]) -> None:
        """One message per recipient, all queued in one go on the loop (a burst)."""
        relay = self.relay
        assert relay is not None

        async def go() -> None:
            for rcpt in rcpts:
                relay.enqueue(
                    helo="relay.example.net",
                    mail_from=SENDER,
                    rcpt_tos=[rcpt],
                    raw=b"Subject: burst\r\n\r\nhello\r\n",
                    received_at=time.time(),
                )

        self.lt.run(go(), TIMEOUT)

    def connected_details(self, rcpt: str) -> list[str]:
        return [e.detail for e in self.events if e.recipient == rcpt and e.step == "connected"]

    def deliver(self, rcpts: list[str]) -> None:
        self.enqueue(rcpts)
        for rcpt in rcpts:
            self.wait_step(rcpt, "delivered")
        self.idle()


@pytest.fixture
def world() -> Iterator[PipeWorld]:
    w = PipeWorld()
    yield w
    w.close()
    assert w.lt.take_errors() == []


def _world(world: PipeWorld, *, pipelining: bool, **relay: object) -> ChunkMX:
    world.down_mx("backup.example.org")
    mx = world.start_chunk_mx(ChunkMX(pipelining=pipelining))
    # No STARTTLS at this MX: opportunistic TLS delivers in plaintext (RFC 7435).
    world.make_relay(require_tls=False, connection_cache_time=30, **relay)
    return mx


def _transaction_chunks(mx: ChunkMX) -> list[bytes]:
    """The chunks that carried a MAIL FROM."""
    return [c for s in mx.sessions for c in s.chunks if b"MAIL FROM:" in c]


# -- the rule, without I/O --------------------------------------------------------------------


def test_first_write_groups_mail_rcpt_and_data_only_with_pipelining() -> None:
    grouped = first_write(SENDER, ["a@example.org", "b@example.org"], pipelining=True)
    assert grouped == [
        b"MAIL FROM:<alice@example.net>",
        b"RCPT TO:<a@example.org>",
        b"RCPT TO:<b@example.org>",
        b"DATA",
    ]
    assert first_write(SENDER, ["a@example.org"], pipelining=False) == [
        b"MAIL FROM:<alice@example.net>"
    ]
    assert path("") == b"<>"


def test_rset_is_due_unless_a_pipelining_mx_answered_the_dot() -> None:
    assert not rset_due(pipelining=True, dot_answered=True)
    assert rset_due(pipelining=True, dot_answered=False)
    assert rset_due(pipelining=False, dot_answered=True)
    assert rset_due(pipelining=False, dot_answered=False)


# -- on the wire --------------------------------------------------------------------------------


def test_relay_pipelines_mail_rcpt_and_data_when_offered(world: PipeWorld) -> None:
    mx = _world(world, pipelining=True)
    world.deliver(["bob@example.org", "carol@example.org"])
    assert _transaction_chunks(mx) == [
        b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"RCPT TO:<carol@example.org>\r\nDATA\r\n"
    ]
    assert mx.delivered() == [[b"<bob@example.org>", b"<carol@example.org>"]]
    (session,) = mx.sessions
    # The content and its final dot go out in one write, right after the 354.
    assert session.chunks[-1].endswith(b"\r\nhello\r\n.\r\n")
    assert session.chunks[-1].startswith(b"Subject: hi\r\n")


def test_relay_does_not_pipeline_when_not_offered(world: PipeWorld) -> None:
    """Twin: without PIPELINING each command waits for the reply to the one before."""
    mx = _world(world, pipelining=False)
    world.deliver(["bob@example.org", "carol@example.org"])
    (session,) = mx.sessions
    commands = [c for c in session.chunks if not c.startswith(b"Subject:")]
    assert all(c.count(b"\r\n") == 1 for c in commands), commands
    assert commands[-5:] == [
        b"MAIL FROM:<alice@example.net>\r\n",
        b"RCPT TO:<bob@example.org>\r\n",
        b"RCPT TO:<carol@example.org>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
    ]
    assert mx.delivered() == [[b"<bob@example.org>", b"<carol@example.org>"]]


def test_relay_pipelined_refusals_settle_each_recipient(world: PipeWorld) -> None:
    mx = _world(world, pipelining=True)
    mx.refused.add(b"<nobody@example.org>")
    world.enqueue(["nobody@example.org", "bob@example.org"])
    world.wait_step("bob@example.org", "delivered")
    (bounced,) = world.wait_step("nobody@example.org", "bounced")
    world.idle()
    assert "550" in bounced.detail
    assert mx.delivered() == [[b"<bob@example.org>"]]
    assert world.relay is not None and world.relay.queue() == []


def test_relay_pipelined_all_refused_sends_no_content_and_keeps_the_connection(
    world: PipeWorld,
) -> None:
    mx = _world(world, pipelining=True)
    mx.refused.add(b"<nobody@example.org>")
    world.enqueue(["nobody@example.org"])
    world.wait_step("nobody@example.org", "bounced")
    world.idle()
    world.deliver(["bob@example.org"])
    (session,) = mx.sessions  # the 554 to DATA left the session in step: reused
    verbs = [c.split(b" ")[0].split(b":")[0] for c in session.commands]
    # The first transaction ended before any content: RSET before caching; the second ended
    # with the reply to the dot: none.
    assert verbs[1:] == [b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"]
    assert mx.delivered() == [[b"<bob@example.org>"]]
    assert world.connected_details("bob@example.org")[0].endswith("(reused)")


def test_relay_pipelining_mx_gets_no_rset_after_the_dot(world: PipeWorld) -> None:
    mx = _world(world, pipelining=True)
    world.deliver(["bob@example.org"])
    world.deliver(["carol@example.org"])
    (session,) = mx.sessions
    verbs = [c.split(b" ")[0].split(b":")[0] for c in session.commands]
    assert verbs[1:] == [b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"]
    assert mx.delivered() == [[b"<bob@example.org>"], [b"<carol@example.org>"]]


def test_relay_other_mx_gets_rset_after_the_dot(world: PipeWorld) -> None:
    """Twin: an MX that does not pipeline is reset before its connection is cached."""
    mx = _world(world, pipelining=False)
    world.deliver(["bob@example.org"])
    world.deliver(["carol@example.org"])
    (session,) = mx.sessions
    verbs = [c.split(b" ")[0].split(b":")[0] for c in session.commands]
    assert verbs[1:] == [b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA", b"RSET"]


def test_relay_stale_pipelining_connection_is_replaced_at_once(world: PipeWorld) -> None:
    mx = _world(world, pipelining=True)
    world.deliver(["bob@example.org"])
    world.lt.run(mx.close_all(), TIMEOUT)  # the MX ends the idle session from its side
    world.deliver(["carol@example.org"])
    steps = ["queued", "mx-lookup", "tls-failure", "connected", "delivered"]
    assert world.steps("carol@example.org") == steps
    assert not world.connected_details("carol@example.org")[0].endswith("(reused)")
    assert len(mx.sessions) == 2
    assert mx.delivered() == [[b"<bob@example.org>"], [b"<carol@example.org>"]]


def test_relay_pipelined_group_refused_on_a_cached_connection_redials(world: PipeWorld) -> None:
    mx = _world(world, pipelining=True)
    mx.later_mail_reply = b"421 4.3.2 Service shutting down"
    world.deliver(["bob@example.org"])
    world.deliver(["carol@example.org"])
    steps = ["queued", "mx-lookup", "tls-failure", "connected", "delivered"]
    assert world.steps("carol@example.org") == steps
    assert len(mx.sessions) == 2
    # The refused group's RCPT and DATA were answered (503, 554) and no content followed.
    assert mx.sessions[0].commands[-3:] == [
        b"MAIL FROM:<alice@example.net>",
        b"RCPT TO:<carol@example.org>",
        b"DATA",
    ]
    assert mx.delivered() == [[b"<bob@example.org>"], [b"<carol@example.org>"]]


def test_relay_same_refusal_on_a_fresh_pipelined_connection_defers(world: PipeWorld) -> None:
    """Twin: a refusal of MAIL FROM on a fresh connection is the MX's answer: deferred."""
    mx = _world(world, pipelining=True)
    world.deliver(["bob@example.org"])
    mx.mail_reply = b"421 4.3.2 Service shutting down"
    world.enqueue(["carol@example.org"])
    (deferred,) = world.wait_step("carol@example.org", "deferred")
    assert "421" in deferred.detail
    assert len(mx.sessions) == 2  # the cached one, then a fresh one: both refused
    assert mx.delivered() == [[b"<bob@example.org>"]]


# -- replies out of step ------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_data_answered_250_defers_and_drops_the_connection(
    world: PipeWorld, pipelining: bool
) -> None:
    """RFC 5321 §4.1.1.4: only the reply to the final dot delivers; 250 to DATA sent nothing."""
    mx = _world(world, pipelining=pipelining)
    mx.data_reply = b"250 2.0.0 OK"
    world.enqueue(["bob@example.org"])
    (deferred, *_) = world.wait_step("bob@example.org", "deferred")
    assert "out of step" in deferred.detail and "DATA answered 250" in deferred.detail
    assert "delivered" not in world.steps("bob@example.org")
    assert mx.delivered() == []
    mx.data_reply = None  # the MX mends its ways: the retry delivers, once
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    assert world.steps("bob@example.org").count("delivered") == 1
    assert mx.delivered() == [[b"<bob@example.org>"]]
    # The session that answered 250 to DATA was dropped, never reused.
    assert len(mx.sessions) >= 2 and mx.sessions[0].closed
    assert b"QUIT" not in mx.sessions[0].commands
    assert not world.connected_details("bob@example.org")[-1].endswith("(reused)")
    assert world.relay is not None and world.relay.queue() == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_data_answered_354_delivers_once_and_keeps_the_connection(
    world: PipeWorld, pipelining: bool
) -> None:
    """Twin: 354, content, 250 to the dot: delivered once, and the connection serves again."""
    mx = _world(world, pipelining=pipelining)
    world.deliver(["bob@example.org"])
    world.deliver(["carol@example.org"])
    assert world.steps("bob@example.org").count("delivered") == 1
    assert "deferred" not in world.steps("bob@example.org")
    assert mx.delivered() == [[b"<bob@example.org>"], [b"<carol@example.org>"]]
    assert len(mx.sessions) == 1
    assert world.connected_details("carol@example.org")[0].endswith("(reused)")


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_unasked_reply_after_the_dot_is_never_paired_with_the_next_message(
    world: PipeWorld, pipelining: bool
) -> None:
    """RFC 5321 §4.1.1, RFC 2920 §3.1: one reply per command. A connection holding a reply
    nobody asked for is dropped, never cached: the next message goes over a new one.

    The twin, a clean connection that is reused, is
    test_relay_data_answered_354_delivers_once_and_keeps_the_connection.
    """
    mx = _world(world, pipelining=pipelining)
    mx.dot_extra = b"250 2.0.0 unasked"
    world.deliver(["bob@example.org"])
    world.deliver(["carol@example.org"])
    assert mx.delivered() == [[b"<bob@example.org>"], [b"<carol@example.org>"]]
    for rcpt in ("bob@example.org", "carol@example.org"):
        steps = world.steps(rcpt)
        assert steps.count("delivered") == 1 and "deferred" not in steps
    assert len(mx.sessions) == 2
    assert mx.sessions[0].closed
    # Dropped, not asked for RSET or QUIT: their replies could not be told from the stale one.
    assert mx.sessions[0].commands[-1].startswith(b"DATA")
    assert not world.connected_details("carol@example.org")[0].endswith("(reused)")
    assert world.relay is not None and world.relay.queue() == []


# -- refused recipients --------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_552_to_rcpt_defers_to_a_later_transaction(
    world: PipeWorld, pipelining: bool
) -> None:
    """RFC 5321 §4.5.3.1.10: 552 to RCPT (too many recipients) is temporary, like 452."""
    mx = _world(world, pipelining=pipelining)
    mx.rcpt_limit = 1
    world.enqueue(["bob@example.org", "carol@example.org"])
    (deferred, *_) = world.wait_step("carol@example.org", "deferred")
    assert "552" in deferred.detail
    world.wait_step("carol@example.org", "delivered")
    world.idle()
    assert mx.delivered() == [[b"<bob@example.org>"], [b"<carol@example.org>"]]
    for rcpt in ("bob@example.org", "carol@example.org"):
        assert world.steps(rcpt).count("delivered") == 1
    assert "bounced" not in world.steps("carol@example.org")
    assert world.local == []  # no DSN
    assert world.relay is not None and world.relay.queue() == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_550_to_rcpt_still_bounces_once(world: PipeWorld, pipelining: bool) -> None:
    """Twin: 550 to RCPT is permanent: one DSN, no retry, the others delivered once."""
    mx = _world(world, pipelining=pipelining)
    mx.refused.add(b"<carol@example.org>")
    world.enqueue(["bob@example.org", "carol@example.org"])
    world.wait_step("bob@example.org", "delivered")
    (bounced,) = world.wait_step("carol@example.org", "bounced")
    world.idle()
    assert "550" in bounced.detail
    assert "deferred" not in world.steps("carol@example.org")
    assert mx.delivered() == [[b"<bob@example.org>"]]
    (dsn,) = world.local
    assert dsn[0] == SENDER and "5.1.1" in status_fields(dsn[1])["Status"]
    assert world.relay is not None and world.relay.queue() == []


# -- internationalized addresses (RFC 6531) ----------------------------------------------------

UTF8_RCPT = "jöhn@example.org"


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_utf8_address_goes_with_smtputf8_when_offered(
    world: PipeWorld, pipelining: bool
) -> None:
    """RFC 6531 §3.4: MAIL FROM carries SMTPUTF8, and the paths go as UTF-8."""
    mx = _world(world, pipelining=pipelining)
    mx.smtputf8 = True
    world.enqueue([UTF8_RCPT])
    world.wait_step(UTF8_RCPT, "delivered")
    world.idle()
    rcpt = f"<{UTF8_RCPT}>".encode()
    assert mx.delivered() == [[rcpt]]
    assert world.steps(UTF8_RCPT).count("delivered") == 1
    (session,) = mx.sessions
    mails = [c for c in session.commands if c.startswith(b"MAIL FROM:")]
    assert mails == [b"MAIL FROM:<alice@example.net> SMTPUTF8"]
    assert b"RCPT TO:" + rcpt in session.commands
    assert world.local == []
    # An ASCII envelope goes without the parameter, as before.
    world.deliver(["bob@example.org"])
    mails = [c for s in mx.sessions for c in s.commands if c.startswith(b"MAIL FROM:")]
    assert mails[-1] == b"MAIL FROM:<alice@example.net>"


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_utf8_address_bounces_5_6_7_when_smtputf8_is_not_offered(
    world: PipeWorld, pipelining: bool
) -> None:
    """Twin, RFC 6531 §3.7.5: no downgrade; one DSN with 5.6.7, nothing sent, no retry."""
    mx = _world(world, pipelining=pipelining)
    world.enqueue([UTF8_RCPT])
    (bounced,) = world.wait_step(UTF8_RCPT, "bounced")
    world.idle()
    assert "SMTPUTF8" in bounced.detail
    assert "deferred" not in world.steps(UTF8_RCPT)
    assert mx.delivered() == []
    assert not [c for s in mx.sessions for c in s.commands if c.startswith(b"MAIL")]
    (dsn,) = world.local
    assert dsn[0] == SENDER and status_fields(dsn[1])["Status"] == "5.6.7"
    assert world.relay is not None and world.relay.queue() == []
    assert world.lt.take_errors() == []


@pytest.mark.parametrize("reply", [b"451 4.3.0 Try later", b"554 5.7.1 No thanks"])
def test_relay_data_refused_keeps_its_meaning(world: PipeWorld, reply: bytes) -> None:
    """Twin: a 4xx or 5xx to DATA is the MX's answer, in step: deferred or bounced."""
    mx = _world(world, pipelining=True)
    mx.data_reply = reply
    world.enqueue(["bob@example.org"])
    step = "deferred" if reply.startswith(b"4") else "bounced"
    (event, *_) = world.wait_step("bob@example.org", step)
    assert reply.decode() in event.detail and "out of step" not in event.detail
    assert mx.delivered() == []


# -- aiosmtplib's protocol, as _mxsession reads pipelined replies from it ----------------------


def _protocol_with(data: bytes) -> aiosmtplib.protocol.SMTPProtocol:
    loop = asyncio.new_event_loop()
    try:
        protocol = aiosmtplib.protocol.SMTPProtocol(loop=loop)
    finally:
        loop.close()
    protocol._buffer.extend(data)
    return protocol


def test_aiosmtplib_buffer_yields_buffered_replies_one_by_one() -> None:
    """The private names servers/_mxsession.py relies on, and what they do."""
    protocol = _protocol_with(b"250 2.1.0 OK\r\n250-first\r\n250 second\r\n354 go\r\n")
    assert protocol._paused is False and protocol._connection_lost is False
    replies = [protocol._read_response_from_buffer() for _ in range(3)]
    assert [(r.code, r.message) for r in replies if r is not None] == [
        (250, "2.1.0 OK"),
        (250, "first\nsecond"),
        (354, "go"),
    ]
    assert protocol._buffer == bytearray()


def test_aiosmtplib_buffer_keeps_a_partial_reply() -> None:
    """Twin: half a reply is not a reply; it stays for read_response to complete."""
    protocol = _protocol_with(b"250-first\r\n250 sec")
    assert protocol._read_response_from_buffer() is None
    assert bytes(protocol._buffer) == b"250-first\r\n250 sec"
