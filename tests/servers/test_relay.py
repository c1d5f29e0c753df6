"""The relay against loopback "remote MX" servers (aiosmtpd) found through our own DNS server."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import hashlib
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.certs import CertificateAuthority
from roundtrip.protocols.delivery import DATA_SLICE as _DATA_SLICE
from roundtrip.protocols.dns import Record, build_zone, default_records
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.dns import DNSServer, start_dns
from roundtrip.servers.relay import (
    QueuedMessage,
    Relay,
    RelayEvent,
    dot_stuffed_slices,
    normalize_line_endings,
)

TIMEOUT = 10.0
SENDER = "alice@example.net"
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool


@dataclass
class Recorder:
    """aiosmtpd handler: keeps the raw DATA bytes; RCPT replies are programmable."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    #: Replies to the final dot, used in turn before "250" (the message is then not kept).
    data_replies: list[str] = field(default_factory=list)
    connections: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        replies = self.rcpt_replies.get(address)
        if replies:
            return replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                session.ssl is not None,
            )
        )
        return "250 2.0.0 OK queued"


class World:
    """A loop thread, a DNS server, remote MX servers and a relay, with recorded outputs."""

    def __init__(self) -> None:
        self.lt = LoopThread()
        self.ca = CertificateAuthority()
        self.dns: DNSServer = self.lt.run(
            start_dns(build_zone(self.records()), host="127.0.0.1", on_error=self.lt.record_error),
            TIMEOUT,
        )
        self.ports: dict[str, int] = {}
        self.servers: list[asyncio.Server] = []
        self.local: list[tuple[str, bytes, str]] = []
        self.captured: list[tuple[str, str, bytes]] = []
        self.events: list[RelayEvent] = []
        self._cond = threading.Condition()
        self.relay: Relay | None = None

    @staticmethod
    def records() -> list[Record]:
        return [
            *default_records("example.org", "127.0.0.1"),
            Record("example.org", "MX", "20 backup.example.org."),
            Record("backup.example.org", "A", "127.0.0.1"),
            *default_records("example.net", "127.0.0.1"),
        ]

    def set_records(self, records: list[Record]) -> None:
        self.lt.run(_call(self.dns.set_records, records), TIMEOUT)

    def start_mx(
        self,
        name: str,
        *,
        cert_names: list[str] | None = None,
        ca: CertificateAuthority | None = None,
        tls: bool = True,
        host: str = "127.0.0.1",
    ) -> Recorder:
        recorder = Recorder()
        context = (ca or self.ca).server_context(cert_names or [name]) if tls else None

        def factory() -> SMTP:
            recorder.connections += 1
            return SMTP(
                recorder,
                hostname=name,
                tls_context=context,
                require_starttls=tls,
            )

        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(factory, host, 0)

        server = self.lt.run(start(), TIMEOUT)
        self.servers.append(server)
        self.ports[name] = server.sockets[0].getsockname()[1]
        return recorder

    def down_mx(self, name: str) -> None:
        """A port nobody listens on: connections are refused."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.ports[name] = sock.getsockname()[1]

    def make_relay(self, **overrides: Any) -> Relay:
        def on_event(event: RelayEvent) -> None:
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

        def deliver_local(address: str, raw: bytes, mailbox: str) -> None:
            self.local.append((address, raw, mailbox))

        def capture(mail_from: str, rcpt: str, raw: bytes) -> None:
            self.captured.append((mail_from, rcpt, raw))

        kwargs: dict[str, Any] = dict(
            dns_address=(self.dns.host, self.dns.port),
            tls_context=self.ca.client_context(),
            local_domains=lambda: {"example.org", "example.net", "ghost.example.org"},
            mx_port=lambda host: self.ports[host],
            deliver_local=deliver_local,
            capture_outbound=capture,
            on_error=self.lt.record_error,
            retry_delays=(0.05,),
            connect_timeout=5.0,
            on_event=on_event,
            reporting_mta="relay.example.net",
        )
        kwargs.update(overrides)

        async def build() -> Relay:
            return Relay(**kwargs)

        self.relay = self.lt.run(build(), TIMEOUT)
        return self.relay

    def enqueue(
        self,
        rcpt_tos: list[str],
        raw: bytes = b"Subject: hi\r\nMessage-ID: <m1@example.net>\r\n\r\nhello\r\n",
        *,
        mail_from: str = SENDER,
    ) -> QueuedMessage:
        relay = self.relay or self.make_relay()

        async def go() -> QueuedMessage:
            return relay.enqueue(
                helo="relay.example.net",
                mail_from=mail_from,
                rcpt_tos=rcpt_tos,
                raw=raw,
                received_at=time.time(),
            )

        return self.lt.run(go(), TIMEOUT)

    def wait_step(self, rcpt: str, step: str, count: int = 1) -> list[RelayEvent]:
        """Block until ``count`` events of ``step`` for ``rcpt`` were reported."""

        def matching() -> list[RelayEvent]:
            return [e for e in self.events if e.recipient == rcpt and e.step == step]

        with self._cond:
            ok = self._cond.wait_for(lambda: len(matching()) >= count, TIMEOUT)
            assert ok, f"no {step!r} x{count} for {rcpt}; events: {self.events}"
            return matching()

    def idle(self) -> None:
        assert self.relay is not None
        self.lt.run(self.relay.wait_idle(TIMEOUT), TIMEOUT + 1)

    def steps(self, rcpt: str) -> list[str]:
        return [e.step for e in self.events if e.recipient == rcpt]

    def close(self) -> None:
        async def shutdown() -> None:
            if self.relay is not None:
                await self.relay.close()
            for server in self.servers:
                server.close()
                await server.wait_closed()
            await self.dns.close()

        try:
            self.lt.run(shutdown(), TIMEOUT)
        finally:
            self.lt.stop()
            self.ca.cleanup()


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()
    assert w.lt.take_errors() == []


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def status_fields(dsn: bytes) -> dict[str, str]:
    report = list(parse(dsn).iter_parts())[1]
    return dict(report.get_payload()[1])


# -- delivery and TLS -----------------------------------------------------------------------


def test_relay_delivers_over_verified_starttls(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    queued = world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    (msg,) = mx.messages
    assert msg.tls
    assert (msg.mail_from, msg.rcpt_tos) == (SENDER, ["bob@example.org"])
    assert b"hello" in msg.raw
    assert world.steps("bob@example.org") == ["queued", "mx-lookup", "connected", "delivered"]
    stamps = [e.timestamp for e in world.events]
    assert stamps == sorted(stamps)
    assert world.relay is not None and world.relay.queue() == []
    assert queued.rcpt == ("bob@example.org",)
    assert ("example.org.", "MX", "NOERROR") in world.dns.query_log


def test_relay_defers_when_mx_certificate_is_from_another_ca(world: World) -> None:
    mx = world.start_mx("mail.example.org", ca=CertificateAuthority())
    world.start_mx("backup.example.org", ca=CertificateAuthority())
    world.enqueue(["bob@example.org"])
    (deferred,) = world.wait_step("bob@example.org", "deferred")
    world.idle()
    assert "certificate" in deferred.detail
    assert mx.messages == []
    relay = world.relay
    assert relay is not None
    (entry,) = relay.queue()
    assert entry.rcpt == ("bob@example.org",) and entry.attempts >= 1
    assert "certificate" in entry.last_error
    assert entry.next_attempt is not None
    assert world.local == []


def test_relay_verifies_the_mx_name_not_the_dialled_ip(world: World) -> None:
    # Same CA, and the leaf covers 127.0.0.1: only a check against the MX *name* fails.
    mx = world.start_mx("mail.example.org", cert_names=["other.example.com"])
    world.down_mx("backup.example.org")
    world.enqueue(["bob@example.org"])
    (deferred,) = world.wait_step("bob@example.org", "deferred")
    assert "certificate" in deferred.detail
    assert mx.messages == []


def test_relay_never_falls_back_to_plaintext(world: World) -> None:
    mx = world.start_mx("mail.example.org", tls=False)
    world.down_mx("backup.example.org")
    world.enqueue(["bob@example.org"])
    (deferred,) = world.wait_step("bob@example.org", "deferred")
    assert "STARTTLS not offered" in deferred.detail
    assert mx.messages == []
    assert mx.connections >= 1


def test_relay_plaintext_allowed_only_without_require_tls(world: World) -> None:
    mx = world.start_mx("mail.example.org", tls=False)
    world.make_relay(require_tls=False)
    world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "delivered")
    (msg,) = mx.messages
    assert not msg.tls


# -- routing --------------------------------------------------------------------------------


def test_relay_falls_back_to_next_mx_when_first_is_down(world: World) -> None:
    world.down_mx("mail.example.org")
    backup = world.start_mx("backup.example.org")
    world.enqueue(["bob@example.org"])
    (delivered,) = world.wait_step("bob@example.org", "delivered")
    assert delivered.detail == "backup.example.org"
    assert len(backup.messages) == 1


def test_relay_defers_when_every_mx_is_down(world: World) -> None:
    world.down_mx("mail.example.org")
    world.down_mx("backup.example.org")
    world.enqueue(["bob@example.org"])
    (deferred,) = world.wait_step("bob@example.org", "deferred")
    assert "backup.example.org" in deferred.detail
    assert world.local == []


def test_relay_uses_implicit_mx_when_domain_has_no_mx(world: World) -> None:
    world.set_records(
        [
            *[r for r in World.records() if not (r.name == "example.org" and r.rtype == "MX")],
            Record("example.org", "A", "127.0.0.1"),
        ]
    )
    mx = world.start_mx("example.org")
    world.enqueue(["bob@example.org"])
    (delivered,) = world.wait_step("bob@example.org", "delivered")
    assert delivered.detail == "example.org"
    assert len(mx.messages) == 1


def test_relay_reaches_an_ipv6_only_mx(world: World) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 cannot be bound here")
    world.set_records(
        [
            *default_records("example.org", "::1", mx_host="mx6.example.org"),
            *default_records("example.net", "127.0.0.1"),
        ]
    )
    mx = world.start_mx("mx6.example.org", host="::1")
    world.enqueue(["bob@example.org"])
    (connected,) = world.wait_step("bob@example.org", "connected")
    world.wait_step("bob@example.org", "delivered")
    assert connected.detail.startswith("mx6.example.org[::1]")
    assert len(mx.messages) == 1 and mx.messages[0].tls


def test_relay_null_mx_bounces_immediately(world: World) -> None:
    world.set_records(
        [
            *[r for r in World.records() if not (r.name == "example.org" and r.rtype == "MX")],
            Record("example.org", "MX", "0 ."),
        ]
    )
    mx = world.start_mx("mail.example.org")
    world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "bounced")
    world.idle()
    assert mx.connections == 0
    ((owner, dsn, mailbox),) = world.local
    assert (owner, mailbox) == (SENDER, "INBOX")
    assert status_fields(dsn)["Status"] == "5.1.10"
    assert dsn.startswith(b"Return-Path: <>\r\n")


def test_relay_nxdomain_bounces_with_5_1_2(world: World) -> None:
    world.enqueue(["bob@ghost.example.org"])
    world.wait_step("bob@ghost.example.org", "bounced")
    world.idle()
    ((_, dsn, _),) = world.local
    fields = status_fields(dsn)
    assert fields["Status"] == "5.1.2"
    assert fields["Final-Recipient"] == "rfc822; bob@ghost.example.org"
    assert world.relay is not None and world.relay.queue() == []


def test_relay_non_local_domain_is_captured_without_network(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    raw = b"Subject: out\r\n\r\nbare\nlf\r\n"
    world.enqueue(["carol@elsewhere.test", "bob@example.org"], raw)
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    assert world.captured == [
        (SENDER, "carol@elsewhere.test", b"Subject: out\r\n\r\nbare\r\nlf\r\n")
    ]
    assert world.steps("carol@elsewhere.test") == ["queued", "captured"]
    assert not any("elsewhere" in qname for qname, _, _ in world.dns.query_log)
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"]]


def test_relay_captures_only_non_local_domains(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    world.make_relay(local_domains=lambda: set())
    world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "captured")
    world.idle()
    assert mx.connections == 0 and world.dns.query_log == []
    assert [c[1] for c in world.captured] == ["bob@example.org"]


# -- retries, bounces, exactly once ---------------------------------------------------------


def test_relay_retries_4xx_then_delivers_exactly_once(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    backup = world.start_mx("backup.example.org")
    mx.rcpt_replies["bob@example.org"] = ["451 4.3.0 try later"]
    backup.rcpt_replies["bob@example.org"] = ["452 4.2.2 full"]
    world.enqueue(["bob@example.org", "dave@example.org"])
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    relay = world.relay
    assert relay is not None
    delivered = [(m.rcpt_tos, m.raw) for m in mx.messages + backup.messages]
    assert sorted(r for rcpts, _ in delivered for r in rcpts) == [
        "bob@example.org",
        "dave@example.org",
    ]
    assert world.steps("dave@example.org").count("delivered") == 1
    steps = world.steps("bob@example.org")
    assert steps.count("delivered") == 1 and steps.count("deferred") == 1
    assert relay.queue() == []
    assert world.local == []


def test_relay_5xx_sends_one_dsn(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    world.start_mx("backup.example.org")
    mx.rcpt_replies["nobody@example.org"] = ["550 5.1.1 no such user"]
    world.enqueue(["nobody@example.org"])
    world.wait_step("nobody@example.org", "bounced")
    world.idle()
    ((owner, dsn, mailbox),) = world.local
    assert (owner, mailbox) == (SENDER, "INBOX")
    msg = parse(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["In-Reply-To"] == "<m1@example.net>"
    fields = status_fields(dsn)
    assert fields["Status"] == "5.1.1"
    assert fields["Action"] == "failed"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert fields["Remote-MTA"] == "dns; mail.example.org"
    assert mx.messages == []
    assert world.relay is not None and world.relay.queue() == []


def test_relay_never_bounces_a_bounce(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    mx.rcpt_replies["nobody@example.org"] = ["550 5.1.1 no such user"]
    world.enqueue(["nobody@example.org"], mail_from="<>")
    world.wait_step("nobody@example.org", "bounced")
    world.idle()
    assert world.local == [] and world.captured == []


def test_relay_bounce_for_foreign_sender_is_captured(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    mx.rcpt_replies["nobody@example.org"] = ["550 5.1.1 no such user"]
    world.enqueue(["nobody@example.org"], mail_from="app@elsewhere.test")
    world.wait_step("nobody@example.org", "bounced")
    world.idle()
    assert world.local == []
    ((mail_from, rcpt, dsn),) = world.captured
    assert (mail_from, rcpt) == ("", "app@elsewhere.test")
    assert status_fields(dsn)["Status"] == "5.1.1"


def test_relay_queue_lifetime_expiry_bounces_4_4_7(world: World) -> None:
    world.down_mx("mail.example.org")
    world.down_mx("backup.example.org")
    world.make_relay(queue_lifetime=0.3, retry_delays=(0.05, 0.1))
    world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "expired")
    world.idle()
    ((_, dsn, _),) = world.local
    fields = status_fields(dsn)
    assert (fields["Status"], fields["Action"]) == ("4.4.7", "failed")
    assert world.steps("bob@example.org").count("deferred") >= 2
    assert world.relay is not None and world.relay.queue() == []


def test_relay_close_cancels_retries_and_keeps_messages(world: World) -> None:
    world.down_mx("mail.example.org")
    world.down_mx("backup.example.org")
    world.make_relay(retry_delays=(60,))
    world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "deferred")
    world.idle()
    relay = world.relay
    assert relay is not None
    assert relay.queue()[0].next_attempt is not None
    world.lt.run(relay.close(), TIMEOUT)
    (entry,) = relay.queue()
    assert entry.next_attempt is None and entry.attempts == 1
    with pytest.raises(RuntimeError, match="closed"):
        world.enqueue(["bob@example.org"])


# -- smuggling and injection ----------------------------------------------------------------


def test_relay_normalises_stray_cr_and_lf_on_the_wire(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    raw = (
        b"Subject: smuggle\r\n\r\n"
        b"a\rb\r\n"
        b"c\nd\r\n"
        b"x\n.\r\n"
        b"MAIL FROM:<s@x>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n"
        b"y\r.\r\n"
        b"end"
    )
    world.enqueue(["bob@example.org"], raw)
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    (msg,) = mx.messages
    assert BARE_CR_OR_LF.search(msg.raw) is None
    assert b"a\r\nb\r\nc\r\nd\r\nx\r\n.\r\nMAIL FROM:<s@x>" in msg.raw
    assert msg.raw.endswith(b"end\r\n") or msg.raw.endswith(b"end")


def test_relay_recorder_sees_bare_lf_when_sent_raw(world: World) -> None:
    """Twin of the test above: the recorder does keep bare LF, so its check has teeth."""
    world.start_mx("mail.example.org")
    mx = world.start_mx("raw.example.org", cert_names=["raw.example.org"])
    port = world.ports["raw.example.org"]
    ctx = world.ca.client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as plain:
        f = plain.makefile("rb")
        assert f.readline().startswith(b"220")
        plain.sendall(b"EHLO t\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        plain.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        f.close()
        with ctx.wrap_socket(plain, server_hostname="raw.example.org") as tls:
            g = tls.makefile("rb")
            tls.sendall(b"EHLO t\r\n")
            while not g.readline().startswith(b"250 "):
                pass
            for line in (b"MAIL FROM:<a@example.net>", b"RCPT TO:<bob@example.org>", b"DATA"):
                tls.sendall(line + b"\r\n")
                assert g.readline()[:1] in (b"2", b"3")
            tls.sendall(b"Subject: raw\r\n\r\nc\nd\r\n.\r\n")
            assert g.readline().startswith(b"250")
            tls.sendall(b"QUIT\r\n")
            g.readline()
            g.close()
    (msg,) = mx.messages
    assert BARE_CR_OR_LF.search(msg.raw) is not None


@pytest.mark.parametrize(
    ("mail_from", "rcpt"),
    [
        ("a@example.net>\r\nRSET", "bob@example.org"),
        ("a@example.net", "bob@example.org>\r\nRCPT TO:<eve@example.org"),
        ("a@example.net", "bob@example.org\n"),
        ("a\x00@example.net", "bob@example.org"),
        ("a@example.net", "bob\r@example.org"),
    ],
)
def test_relay_rejects_cr_lf_nul_in_addresses(world: World, mail_from: str, rcpt: str) -> None:
    mx = world.start_mx("mail.example.org")
    relay = world.make_relay()
    with pytest.raises(ValueError, match="CR, LF, NUL"):
        world.enqueue([rcpt], mail_from=mail_from)
    assert relay.queue() == [] and world.events == []
    assert mx.connections == 0 and world.dns.query_log == []


def test_relay_requires_a_recipient(world: World) -> None:
    world.make_relay()
    with pytest.raises(ValueError, match="recipient"):
        world.enqueue([])


def test_relay_deduplicates_recipients(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    world.enqueue(["bob@example.org", "bob@example.org"])
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.org"]]


# -- the DATA phase: dot-stuffing in slices, flow control, the reply to the final dot --------

PERIOD_AT_LINE_START = re.compile(rb"(?m)^\.")
framing = st.lists(
    st.sampled_from([b"\r\n", b".", b"..", b"\r\n.", b"a", b"xyz"]), max_size=40
).map(b"".join)


def _reference_stuffed(data: bytes) -> bytes:
    """What aiosmtplib's data() sends for CRLF-normalised content (its regex, then the dot)."""
    return PERIOD_AT_LINE_START.sub(b"..", data) + b".\r\n"


@settings(max_examples=2000, deadline=None)
@given(framing, st.integers(1, 12))
def test_relay_dot_stuffed_slices_match_the_whole_message_reference(raw: bytes, size: int) -> None:
    data = normalize_line_endings(raw)
    pieces = list(dot_stuffed_slices(data, size))
    assert b"".join(pieces) == _reference_stuffed(data)
    # A slice holds at most `size` bytes of the message plus the dots stuffed into it.
    assert pieces[-1] == b".\r\n"
    assert all(len(p) <= 2 * size for p in pieces[:-1])


def test_relay_dot_stuffed_slices_are_views_of_a_clean_message() -> None:
    data = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" * 20_000
    pieces = list(dot_stuffed_slices(data, 4096))
    assert pieces[-1] == b".\r\n"
    body = pieces[:-1]
    assert all(isinstance(p, memoryview) and p.obj is data for p in body)
    assert max(map(len, body)) == 4096


def test_relay_dot_stuffed_slices_stuff_and_terminate() -> None:
    """Twin of the above: dot-led lines are stuffed, and a missing final CRLF is added."""
    pieces = list(dot_stuffed_slices(b".a\r\n.\r\n..\r\nend", 3))
    assert b"".join(pieces) == b"..a\r\n..\r\n...\r\nend\r\n.\r\n"
    assert pieces[-2:] == [b"\r\n", b".\r\n"]
    with pytest.raises(ValueError, match="slice size"):
        list(dot_stuffed_slices(b"x\r\n", 0))


def _message_with_dot_lines(placed: dict[int, bytes], tail: bytes) -> bytes:
    """Header, filler lines, and each ``placed`` line starting exactly at its byte offset."""
    out = bytearray(b"Subject: dots\r\nMessage-ID: <dots@example.net>\r\n\r\n")
    for offset, line in sorted(placed.items()):
        gap = offset - len(out)
        assert gap >= 2, "placed lines must leave room for a filler line"
        while gap > 900:  # lines stay under the 1000-octet limit (RFC 5321 §4.5.3.1.6)
            out += b"f" * 798 + b"\r\n"
            gap -= 800
        out += b"f" * (gap - 2) + b"\r\n"
        out += line + b"\r\n"
    return bytes(out + tail)


def test_relay_dot_stuffing_survives_slice_boundaries(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    size = _DATA_SLICE
    raw = _message_with_dot_lines(
        {
            size: b".at-the-boundary",
            2 * size - 1: b".",  # a lone dot, one byte before a boundary
            3 * size + 1: b"..",  # one byte after: its CR LF straddle the boundary
            4 * size - 2: b"...x",
            5 * size: b".",
        },
        tail=b"\r\n.\r\n..\r\n.end-without-crlf",
    )
    assert raw[size : size + 1] == b"." and raw[5 * size - 2 : 5 * size + 3] == b"\r\n.\r\n"
    world.enqueue(["bob@example.org"], raw)
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    (msg,) = mx.messages
    # aiosmtpd removes one leading dot per line (RFC 5321 §4.5.2): the original comes back.
    assert msg.raw == raw + b"\r\n"
    assert msg.raw == normalize_line_endings(raw)


def _read_line(stream: Any) -> bytes:
    line: bytes = stream.readline(65536)
    if not line.endswith(b"\n"):
        raise ConnectionError(f"slow MX: connection closed mid-line: {line[-80:]!r}")
    return line


class SlowMX:
    """A threaded MX with blocking sockets that reads the content slowly, one line at a time.

    It stalls once after ``stall_after`` content bytes (a slow network), hashes the unstuffed
    content instead of keeping it (so the MX itself adds little to traced memory), answers the
    final dot with ``final_reply``, and can close the connection mid-message instead.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        name: str,
        *,
        stall_after: int = 1 << 20,
        stall_timeout: float = 0.2,
        final_reply: bytes = b"250 2.0.0 queued",
        close_after: int | None = None,
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        # A small receive window makes the relay's writes back up early.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.port: int = self.listener.getsockname()[1]
        self.context = ca.server_context([name])
        self.stall_after = stall_after
        self.stall_timeout = stall_timeout
        self.final_reply = final_reply
        self.close_after = close_after
        self.digest = hashlib.sha256()
        self.size = 0
        self.commands: list[bytes] = []
        self.error: BaseException | None = None
        #: Ends the stall early (a test that wants the MX to stop reading until it says so).
        self.unstall = threading.Event()
        self.thread = threading.Thread(target=self._run, name="slow-mx", daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        self.listener.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                self._session(conn)
        except BaseException as exc:  # reported by join() in the test's thread
            self.error = exc

    def _session(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as plain:
            conn.sendall(b"220 slow ESMTP\r\n")
            assert _read_line(plain).startswith(b"EHLO")
            conn.sendall(b"250-slow\r\n250 STARTTLS\r\n")
            assert _read_line(plain) == b"STARTTLS\r\n"
            conn.sendall(b"220 go ahead\r\n")
        with self.context.wrap_socket(conn, server_side=True) as tls, tls.makefile("rb") as f:
            for reply in (b"250-slow\r\n250 8BITMIME", b"250 ok", b"250 ok", b"354 go"):
                self.commands.append(_read_line(f))
                tls.sendall(reply + b"\r\n")
            stalled = False
            while (line := _read_line(f)) != b".\r\n":
                if line.startswith(b"."):
                    line = line[1:]
                self.digest.update(line)
                self.size += len(line)
                if self.close_after is not None and self.size >= self.close_after:
                    return
                if not stalled and self.size >= self.stall_after:
                    stalled = True
                    self.unstall.wait(self.stall_timeout)
            tls.sendall(self.final_reply + b"\r\n")
            self.commands.append(_read_line(f))  # QUIT, or EOF when the relay just closes
            tls.sendall(b"221 bye\r\n")


def _big_message(size: int) -> bytes:
    head = b"Subject: big\r\nMessage-ID: <big@example.net>\r\n\r\n.dot-led first line\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line)) + b".last\r\n"


def _traced_peak(action: Callable[[], object]) -> int:
    """Peak bytes allocated (all threads) while ``action`` runs, above what was traced before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


BIG = 20_000_000


def test_relay_streams_a_big_message_to_a_slow_mx(world: World) -> None:
    raw = _big_message(BIG)
    mx = SlowMX(world.ca, "mail.example.org")
    world.ports["mail.example.org"] = mx.port
    world.down_mx("backup.example.org")
    world.make_relay()

    def deliver() -> None:
        world.enqueue(["bob@example.org"], raw)
        world.wait_step("bob@example.org", "delivered")
        world.idle()

    peak = _traced_peak(deliver)
    mx.join()
    assert (mx.size, mx.digest.hexdigest()) == (len(raw), hashlib.sha256(raw).hexdigest())
    # In step after the content: RSET (the relay keeps connections for reuse) or QUIT.
    assert mx.commands[-1] in (b"RSET\r\n", b"QUIT\r\n")
    assert world.steps("bob@example.org").count("delivered") == 1
    # A few slices in flight, not the message (its stuffed copy and ciphertext were 2x).
    assert peak < BIG / 8, f"relay peak {peak / BIG:.2f}x the message"


def test_relay_memory_measure_sees_a_writer_without_flow_control(world: World) -> None:
    """Twin of the above: aiosmtplib's data() against the same MX buffers the whole message."""
    raw = _big_message(BIG)
    mx = SlowMX(world.ca, "mail.example.org")

    async def send() -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=mx.port,
            start_tls=False,
            tls_context=world.ca.client_context(),
            timeout=TIMEOUT,
        )
        await client.connect()
        try:
            await client.starttls(server_hostname="mail.example.org")
            await client.sendmail(SENDER, ["bob@example.org"], raw)
            await client.quit()
        finally:
            client.close()

    peak = _traced_peak(lambda: world.lt.run(send(), 2 * TIMEOUT))
    mx.join()
    assert mx.digest.hexdigest() == hashlib.sha256(raw).hexdigest()
    assert peak > BIG, f"peak {peak / BIG:.2f}x the message"


@pytest.mark.parametrize(
    ("reply", "step"), [("451 4.3.0 queue full", "deferred"), ("554 5.6.0 rejected", "bounced")]
)
def test_relay_maps_the_reply_to_the_final_dot(world: World, reply: str, step: str) -> None:
    mx = world.start_mx("mail.example.org")
    world.down_mx("backup.example.org")
    mx.data_replies.append(reply)
    world.enqueue(["bob@example.org"])
    (event,) = world.wait_step("bob@example.org", step)
    assert reply in event.detail or reply.split(" ", 1)[1] in event.detail
    if step == "deferred":  # the retry delivers, exactly once
        world.wait_step("bob@example.org", "delivered")
        world.idle()
        assert len(mx.messages) == 1
        assert world.steps("bob@example.org").count("delivered") == 1
        assert world.local == []
        return
    world.idle()
    assert mx.messages == []
    ((owner, dsn, _),) = world.local
    fields = status_fields(dsn)
    assert owner == SENDER
    assert (fields["Status"], fields["Diagnostic-Code"]) == ("5.6.0", f"smtp; {reply}")
    assert world.relay is not None and world.relay.queue() == []


def test_relay_final_250_marks_delivered(world: World) -> None:
    """Twin of the above: without a programmed reply the final dot gets 250 and delivers."""
    mx = world.start_mx("mail.example.org")
    world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "delivered")
    world.idle()
    assert len(mx.messages) == 1
    assert "deferred" not in world.steps("bob@example.org")


def test_relay_defers_when_the_mx_drops_mid_message(world: World) -> None:
    mx = SlowMX(world.ca, "mail.example.org", close_after=1 << 20)
    world.ports["mail.example.org"] = mx.port
    world.down_mx("backup.example.org")
    world.make_relay(retry_delays=(60,))
    world.enqueue(["bob@example.org"], _big_message(4_000_000))
    (deferred,) = world.wait_step("bob@example.org", "deferred")
    world.idle()
    mx.join()
    assert "mail.example.org" in deferred.detail
    assert "delivered" not in world.steps("bob@example.org")
    assert world.relay is not None and world.relay.queue()[0].rcpt == ("bob@example.org",)


def test_relay_defers_when_the_mx_stops_reading(world: World) -> None:
    mx = SlowMX(world.ca, "mail.example.org", stall_after=64 * 1024, stall_timeout=TIMEOUT)
    world.ports["mail.example.org"] = mx.port
    world.down_mx("backup.example.org")
    world.make_relay(connect_timeout=0.5, retry_delays=(60,))
    try:
        # Bigger than the kernel's socket buffers, so the transport has to pause.
        world.enqueue(["bob@example.org"], _big_message(BIG))
        (deferred,) = world.wait_step("bob@example.org", "deferred")
    finally:
        mx.unstall.set()
    world.idle()
    with pytest.raises((ConnectionError, OSError)):
        mx.join()  # the relay closed the connection mid-message
    assert "Timed out writing the message" in deferred.detail
    assert "delivered" not in world.steps("bob@example.org")
