"""Routing and delivery between the stack's domains: DNS MX, relay, bounces, filter, capture."""

from __future__ import annotations

import email
import email.policy
import imaplib
import poplib
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rdatatype
import pytest
from _support import AiosmtpdServer, make_message

from roundtrip import CertificateAuthority, MailStack, StackConfig
from roundtrip.protocols.dns import Record
from roundtrip.protocols.filter import FilterInput, Verdict

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    # Fast retries so deferral tests finish in milliseconds.
    with MailStack(StackConfig(retry_delays=(0.05, 0.1), queue_lifetime=30)) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _send(
    stack: MailStack, *, subject: str, to: str = "user@example.org", service: str = "submissions"
) -> None:
    sender = stack.user("example.com")
    host, port = stack.endpoints("example.com").address(service)
    raw = make_message(sender=sender.address, recipient=to, subject=subject)
    if service == "submissions":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            host, port, context=stack.client_context(), timeout=TIMEOUT
        )
    else:
        smtp = smtplib.SMTP(host, port, timeout=TIMEOUT)
        smtp.starttls(context=stack.client_context())
    with smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [to], raw)


def _dsn_for(stack: MailStack, subject: str) -> email.message.Message:
    dsn = stack.wait_for(
        "user@example.com",
        match=lambda m: (
            "Undelivered" in m.subject or "failure" in m.subject.lower() or "Delivery" in m.subject
        ),
        timeout=TIMEOUT,
    )
    parsed = email.message_from_bytes(dsn.raw, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert subject.encode() in dsn.raw
    return parsed


@pytest.mark.parametrize("service", ["submissions", "submission"])
def test_routing_cross_domain_via_dns_mx_with_starttls(stack: MailStack, service: str) -> None:
    _send(stack, subject=f"across via {service}", service=service)
    msg = stack.wait_for("user@example.org", subject=f"across via {service}", timeout=TIMEOUT)
    assert [h.with_ for h in msg.received_chain][:2] == ["ESMTPS", "ESMTPSA"]
    assert ("example.org.", "MX", "NOERROR") in stack.dns.query_log  # type: ignore[union-attr]
    assert ("mail.example.org.", "A", "NOERROR") in stack.dns.query_log  # type: ignore[union-attr]
    stack.relay_idle()
    steps = [h.step for h in stack.journey(msg.message_id or "")]
    assert steps[0] == f"{service} accepted"
    for step in (
        "relay queued",
        "relay mx-lookup",
        "relay connected",
        "smtp accepted",
        "stored",
        "relay delivered",
    ):
        assert step in steps


def test_routing_read_over_imap_and_pop3_after_relay(stack: MailStack) -> None:
    _send(stack, subject="read both ways")
    stored = stack.wait_for("user@example.org", subject="read both ways", timeout=TIMEOUT)
    rcpt = stack.user("example.org")
    host, port = stack.endpoints("example.org").address("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT) as imap:
        imap.login(rcpt.address, rcpt.password)
        imap.select("INBOX", readonly=True)
        _, data = imap.fetch("1", "(BODY.PEEK[])")
    host, port = stack.endpoints("example.org").address("pop3s")
    pop = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    try:
        pop.user(rcpt.address)
        pop.pass_(rcpt.password)
        pop_raw = b"\r\n".join(pop.retr(1)[1]) + b"\r\n"
        pop.quit()
    finally:
        pop.close()
    assert data[0][1] == pop_raw == stored.raw  # type: ignore[index]


def test_routing_same_domain_is_stored_without_the_relay(stack: MailStack) -> None:
    _send(stack, subject="local", to="user@example.com")
    msg = stack.wait_for("user@example.com", subject="local", timeout=TIMEOUT)
    assert [h.with_ for h in msg.received_chain] == ["ESMTPSA"]
    assert stack.dns.query_log == []  # type: ignore[union-attr]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_routing_mx_priority_fallback_when_first_mx_is_down(stack: MailStack) -> None:
    records = [
        r
        for r in stack.default_dns_records()
        if not (r.rtype == "MX" and r.name.rstrip(".") == "example.org")
    ]
    records += [
        Record("example.org", "MX", "5 down.example.org."),
        Record("down.example.org", "A", "127.0.0.1"),
        Record("example.org", "MX", "10 mail.example.org."),
    ]
    stack.set_dns_records(records)
    stack.mx_ports["down.example.org"] = _closed_port()
    _send(stack, subject="fallback")
    msg = stack.wait_for("user@example.org", subject="fallback", timeout=TIMEOUT)
    assert msg is not None
    assert ("down.example.org.", "A", "NOERROR") in stack.dns.query_log  # type: ignore[union-attr]


def test_routing_4xx_then_success_delivers_exactly_once(stack: MailStack) -> None:
    calls: list[str] = []

    def flaky(message: FilterInput) -> Verdict | None:
        calls.append("x")
        if len(calls) == 1:
            return Verdict(action="reject", reply="451 4.7.1 Try again later")
        return None

    stack.content_filter = flaky
    _send(stack, subject="deferred once")
    stack.wait_for("user@example.org", subject="deferred once", timeout=TIMEOUT)
    stack.relay_idle()
    assert len(calls) == 2
    assert [m.subject for m in stack.messages("user@example.org")] == ["deferred once"]
    assert stack.messages("user@example.com") == []  # no bounce


def test_routing_5xx_produces_one_dsn_to_the_sender(stack: MailStack) -> None:
    stack.content_filter = lambda m: Verdict(action="reject", reply="554 5.7.1 We do not want this")
    _send(stack, subject="refused content")
    dsn = _dsn_for(stack, "refused content")
    text = dsn.as_string()
    assert "Status: 5.7.1" in text and "We do not want this" in text
    stack.relay_idle()
    assert len(stack.messages("user@example.com")) == 1
    assert stack.messages("user@example.org") == []


def test_routing_null_mx_bounces(stack: MailStack) -> None:
    records = [
        r
        for r in stack.default_dns_records()
        if not (r.rtype == "MX" and r.name.rstrip(".") == "example.org")
    ]
    stack.set_dns_records([*records, Record("example.org", "MX", "0 .")])
    _send(stack, subject="null mx")
    assert "5.1.10" in _dsn_for(stack, "null mx").as_string()


def test_routing_nxdomain_bounces(stack: MailStack) -> None:
    records = [
        r for r in stack.default_dns_records() if not r.name.rstrip(".").endswith("example.org")
    ]
    stack.set_dns_records(records, refuse_outside=False)
    _send(stack, subject="no such domain")
    assert "5.1.2" in _dsn_for(stack, "no such domain").as_string()
    assert ("example.org.", "MX", "NXDOMAIN") in stack.dns.query_log  # type: ignore[union-attr]


@pytest.fixture
def foreign_mx(stack: MailStack) -> Iterator[tuple[int, list[bytes]]]:
    """An MX presenting a certificate from another CA (it records what it receives)."""
    other = CertificateAuthority()
    received: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            received.append(envelope.content)  # type: ignore[attr-defined]
            return "250 OK"

    server = AiosmtpdServer(
        Handler(),
        hostname="mail.example.org",
        tls_context=other.server_context(["mail.example.org"]),
    )
    try:
        yield server.port, received
    finally:
        stack.reset()  # stop the relay's retries before the peer goes away
        server.close()
        other.cleanup()


def test_routing_mx_with_untrusted_certificate_defers(
    stack: MailStack, foreign_mx: tuple[int, list[bytes]]
) -> None:
    port, received = foreign_mx
    stack.mx_ports["mail.example.org"] = port
    _send(stack, subject="must not leak")
    queue = stack.wait_relay(lambda q: any(e.attempts >= 2 for e in q), timeout=TIMEOUT)
    assert queue and "certificate" in (queue[0].last_error or "").lower()
    stack.relay_idle()  # between attempts: no connection to the peer is in flight
    assert received == []
    assert stack.messages("user@example.org") == []
    assert stack.messages("user@example.com") == []  # deferred, not bounced


def test_routing_outside_domain_is_captured(stack: MailStack) -> None:
    _send(stack, subject="to the world", to="someone@example.net")
    assert [m.subject for m in stack.outbound] == ["to the world"]
    assert stack.dns.query_log == []  # type: ignore[union-attr]


def test_routing_filter_quarantines_into_junk(stack: MailStack) -> None:
    stack.content_filter = lambda m: Verdict(
        action="quarantine", headers=(("X-Quarantine", "test"),)
    )
    _send(stack, subject="suspicious")
    msg = stack.wait_for("user@example.org", subject="suspicious", mailbox="Junk", timeout=TIMEOUT)
    assert msg.headers.get("X-Quarantine") == "test"
    assert stack.messages("user@example.org", mailbox="INBOX") == []


def test_routing_default_filter_adds_spam_headers(stack: MailStack) -> None:
    _send(stack, subject="ordinary")
    msg = stack.wait_for("user@example.org", subject="ordinary", timeout=TIMEOUT)
    assert msg.headers.get("X-Spam-Flag") == "NO"
    assert (msg.headers.get("X-Spam-Status") or "").startswith("No, score=")


def _query(stack: MailStack, name: str, rtype: str, *, tcp: bool = False) -> dns.message.Message:
    host, port = stack.dns.address  # type: ignore[union-attr]
    query = dns.message.make_query(name, rtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, host, port=port, timeout=TIMEOUT)


@pytest.mark.parametrize("tcp", [False, True])
def test_routing_dns_answers_mx_and_a_for_each_domain(stack: MailStack, tcp: bool) -> None:
    for domain in stack.config.domains:
        mx = _query(stack, domain, "MX", tcp=tcp)
        assert [r.to_text() for r in mx.answer[0]] == [f"10 mail.{domain}."]
        a = _query(stack, f"mail.{domain}", "A", tcp=tcp)
        assert [r.to_text() for r in a.answer[0]] == ["127.0.0.1"]
    assert _query(stack, "nope.example.com", "A", tcp=tcp).rcode() == dns.rcode.NXDOMAIN


def test_routing_dig_queries_the_served_zone(stack: MailStack) -> None:
    dig = shutil.which("dig")
    if dig is None:
        pytest.skip("dig is not installed (Debian package dnsutils)")
    host, port = stack.dns.address  # type: ignore[union-attr]
    out = subprocess.run(
        [dig, "+short", "-p", str(port), f"@{host}", "example.org", "MX"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    assert out.strip() == "10 mail.example.org."


@pytest.mark.parametrize("cache", [2.0, 0.0], ids=["cached", "fresh-each-time"])
def test_routing_relay_connection_cache_setting(cache: float) -> None:
    # StackConfig.relay_connection_cache reaches the relay: with it, the second message to
    # example.org rides the first one's MX connection; with 0, each message dials anew.
    with MailStack(StackConfig(relay_connection_cache=cache)) as stack:
        for subject in ("first", "second"):
            _send(stack, subject=subject)
            stack.wait_for("user@example.org", subject=subject, timeout=TIMEOUT)
            stack.relay_idle()
        assert stack.relay is not None
        connected = [e.detail for e in stack.relay.events if e.step == "connected"]
        assert len(connected) == 2
        assert "(reused)" not in connected[0]
        assert connected[1].endswith("(reused)") is (cache > 0)


def test_routing_utf8_recipient_accepted_at_submission_is_relayed_once() -> None:
    """RFC 6531: submission takes ``RCPT TO:<jöhn@...>`` with SMTPUTF8; the relay passes it on
    to the stack's MX (which offers SMTPUTF8) with the parameter, and it is stored once.

    The twin, an MX without SMTPUTF8 (one 5.6.7 DSN), is in
    tests/servers/test_relay_pipelining.py.
    """
    config = StackConfig(retry_delays=(0.05,), queue_lifetime=30, catch_all=("example.org",))
    with MailStack(config) as stack:
        sender = stack.user("example.com")
        rcpt = "jöhn@example.org"
        raw = make_message(sender=sender.address, recipient="user@example.org", subject="utf8 rcpt")
        host, port = stack.endpoints("example.com").address("submissions")
        with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
            smtp.login(sender.address, sender.password)
            assert smtp.has_extn("smtputf8")
            assert smtp.sendmail(sender.address, [rcpt], raw, mail_options=["SMTPUTF8"]) == {}
        stack.wait_for("user@example.org", subject="utf8 rcpt", timeout=TIMEOUT)
        stack.wait_relay(lambda queue: not queue, TIMEOUT)
        assert [m.subject for m in stack.messages("user@example.org")] == ["utf8 rcpt"]
        steps = [e.step for e in stack.relay.events if e.recipient == rcpt]
        assert steps.count("delivered") == 1 and "deferred" not in steps
        assert stack.messages(sender.address) == []  # no DSN
        stack.check()
