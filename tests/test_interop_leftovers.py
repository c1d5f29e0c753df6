"""Interop leftovers of issue #13: the IPv6 address literal in Received, the DNS server on
every host of a dual stack, the certificate a no-SNI client gets over ::1, and the POP3 AUTH
user in transcripts.

Everything runs on loopback with real clients (smtplib, dnspython, ssl, poplib). The IPv6
tests skip where ::1 cannot be bound (a container without IPv6).
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.protocols._imapmailbox import list_lines
from roundtrip.stack._auth import peer_address
from roundtrip.store import Mailboxes, Store

TIMEOUT = 10.0
LSUB_USER = "lsub@example.com"


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
needs_ipv6 = pytest.mark.skipif(_NO_IPV6 is not None, reason=_NO_IPV6 or "")


@pytest.fixture(scope="module")
def dual_stack() -> Iterator[MailStack]:
    """Every listener on 127.0.0.1 and on ::1, one port per service."""
    if _NO_IPV6 is not None:
        pytest.skip(_NO_IPV6)
    with MailStack(StackConfig(extra_hosts=("::1",), sender_auth=True)) as stack:
        yield stack


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    stack = request.getfixturevalue("dual_stack") if "dual_stack" in request.fixturenames else None
    if stack is not None:
        stack.reset()
    yield
    if stack is not None:
        stack.check()


def _mx_hop(stack: MailStack, host: str, subject: str) -> str:
    """Hand a message to example.org's MX over ``host`` and return the Received field the MX
    wrote (unfolded)."""
    rcpt = stack.user("example.org").address
    port = stack.domains["example.org"].ports["smtp"]
    raw = make_message(sender="someone@elsewhere.test", recipient=rcpt, subject=subject)
    with smtplib.SMTP(host, port, timeout=TIMEOUT, local_hostname="client.test") as smtp:
        smtp.sendmail("someone@elsewhere.test", [rcpt], raw)
    got = stack.wait_for(rcpt, subject=subject, timeout=TIMEOUT)
    return " ".join(got.headers.get_all("Received")[0].split())


# -- 1. Received: the IPv6 address literal (RFC 5321 section 4.1.3) ---------------------------


@needs_ipv6
def test_received_ipv6_peer_is_written_as_an_ipv6_address_literal(dual_stack: MailStack) -> None:
    hop = _mx_hop(dual_stack, "::1", "mx over v6")
    assert hop.startswith("from client.test ([IPv6:::1])"), hop
    # The parsed chain still finds every clause after the literal.
    got = dual_stack.wait_for(dual_stack.user("example.org").address, subject="mx over v6")
    assert got.received_chain[0].from_ == "client.test"
    assert got.received_chain[0].by == "mail.example.org"


@needs_ipv6
def test_received_ipv4_peer_keeps_the_plain_literal(dual_stack: MailStack) -> None:
    """The twin: an IPv4 peer's literal has no tag."""
    hop = _mx_hop(dual_stack, "127.0.0.1", "mx over v4")
    assert hop.startswith("from client.test ([127.0.0.1])"), hop
    assert "IPv6:" not in hop


def test_received_peer_address_reads_both_literal_forms() -> None:
    """SPF reads the connecting address back from the top Received field: the tagged IPv6
    literal (in any case), the plain IPv4 one, and the untagged IPv6 one older stacks wrote."""
    assert peer_address(b"Received: from h ([IPv6:::1])\r\n") == "::1"
    assert peer_address(b"Received: from h ([ipv6:2001:db8::5])\r\n") == "2001:db8::5"
    assert peer_address(b"Received: from h ([127.0.0.1])\r\n") == "127.0.0.1"
    assert peer_address(b"Received: from h ([::1])\r\n") == "::1"
    # The twin: no literal, another tag, or a literal not in the top field: no address.
    assert peer_address(b"Received: from h (h.example)\r\n") is None
    assert peer_address(b"Received: from h ([IPv7:::1])\r\n") is None
    assert peer_address(b"X-Other: 1\r\nReceived: from h ([127.0.0.1])\r\n") is None


# -- 2. LSUB answers from the subscription list it is given ------------------------------------


def _boxes_with_stale_list() -> Mailboxes:
    """One subscribed mailbox, one not, and a list of names that disagrees with both."""
    store = Store()
    store.add_user(LSUB_USER, "pw")
    store.create_mailbox(LSUB_USER, "kept")
    store.create_mailbox(LSUB_USER, "dropped")
    store.subscribe(LSUB_USER, "kept", True)
    store.subscribe(LSUB_USER, "dropped", False)
    boxes = store.mailboxes(LSUB_USER)
    return Mailboxes(boxes, ["dropped", "stale/name"])


def test_imap_lsub_without_a_list_uses_the_mailboxes_own_flags() -> None:
    """No list given: the mailboxes' ``subscribed`` decide, not a ``subscriptions``
    attribute the sequence happens to carry (the IMAP machine always passes the list)."""
    lines = list_lines(_boxes_with_stale_list(), "", "*", lsub=True, special_only=False)
    assert b'* LSUB () "/" "kept"' in lines, lines
    assert not any(b"dropped" in line or b"stale" in line for line in lines), lines


def test_imap_lsub_with_a_list_answers_from_it() -> None:
    """The twin: the list the machine passes is what LSUB shows, names without a mailbox
    included (RFC 3501 6.3.6)."""
    boxes = _boxes_with_stale_list()
    lines = list_lines(
        boxes, "", "*", lsub=True, special_only=False, subscriptions=["kept", "stale/name"]
    )
    assert b'* LSUB () "/" "kept"' in lines, lines
    assert b'* LSUB (\\Noselect) "/" "stale/name"' in lines, lines
    assert not any(b"dropped" in line for line in lines), lines


# -- 3. DNS on every host of a dual stack --------------------------------------------------


def _dns_ask(host: str, port: int, name: str, rdtype: str, *, tcp: bool) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=TIMEOUT)
    return dns.query.udp(query, host, port=port, timeout=TIMEOUT)


def _texts(reply: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in reply.answer for rdata in rrset]


@needs_ipv6
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_dns_dual_stack_answers_on_every_host(dual_stack: MailStack, host: str, tcp: bool) -> None:
    assert dual_stack.dns is not None
    assert dual_stack.dns.hosts == ("127.0.0.1", "::1")
    port = dual_stack.dns.port
    assert _texts(_dns_ask(host, port, "mail.example.org", "AAAA", tcp=tcp)) == ["::1"]
    assert _texts(_dns_ask(host, port, "mail.example.org", "A", tcp=tcp)) == ["127.0.0.1"]
    # A name in no zone gets the world's answer on every address too.
    missing = _dns_ask(host, port, "no-such-domain.invalid", "MX", tcp=tcp)
    assert missing.rcode() == dns.rcode.NXDOMAIN


@needs_ipv6
def test_dns_single_host_stack_listens_on_its_host_only() -> None:
    """The twin: without extra hosts, nothing of the DNS listens on ::1."""
    with MailStack(StackConfig()) as stack:
        assert stack.dns is not None and stack.dns.hosts == ("127.0.0.1",)
        port = stack.dns.port
        assert _texts(_dns_ask("127.0.0.1", port, "mail.example.org", "A", tcp=True))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", port), timeout=TIMEOUT).close()
        stack.check()
