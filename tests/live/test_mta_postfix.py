"""A real Postfix exchanges mail with a stack, both ways, over verified STARTTLS.

Postfix (``tests/live/_postfix_peer.py``) runs in its own mount namespace whose
``/etc/resolv.conf`` names the stack's DNS on 127.0.0.1:53, so it finds the stack's MX by a
real MX lookup, not a transport map. The stack runs with ``ports="standard"`` (DNS on 53, MX on
127.0.0.N:25); Postfix listens on 127.0.0.10:25 as ``mx.peer.test``.

Mail for a domain outside the stack is captured (``OUTBOUND_ADDRESS``) unless the domain is
routed: ``peer.test`` is in ``StackConfig.routed_domains``, its zone (MX ``mx.peer.test`` at
Postfix's address) is served with ``set_dns_records``, and its TLS policy is ``enforce``: the
relay looks the MX up, dials Postfix and requires STARTTLS with a certificate for
``mx.peer.test`` from the stack CA. The stack's first domain, ``first.test``, sits on
127.0.0.1, which Postfix counts as its own address (see the helper's docstring);
``example.com`` (127.0.0.2) is the domain Postfix sends to.

Needs root, Postfix (Debian's 3.7) and unshare(1); skipped otherwise, and when the standard
ports are taken.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from _mta_world import (
    DELIVERY_TIMEOUT,
    PEER_DOMAIN,
    PEER_HOST,
    PEER_MX,
    PEER_USER,
    RECIPIENT,
    SENDER,
    STACK_DOMAIN,
    message,
    point_mx,
    start_stack,
    submit,
)
from _postfix_peer import PostfixPeer, peer_unavailable_reason

from roundtrip.stack import MailStack

_REASON = peer_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"Postfix peer: {_REASON}")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[MailStack, PostfixPeer]]:
    """A stack on the standard ports and a Postfix next to it, for the whole module."""
    stack = start_stack()
    try:
        with PostfixPeer(
            ca=stack.ca, domain=PEER_DOMAIN, users=("alice",), mx_name=PEER_MX, host=PEER_HOST
        ) as peer:
            yield stack, peer
    finally:
        stack.stop()


@pytest.fixture
def pair(world: tuple[MailStack, PostfixPeer]) -> Iterator[tuple[MailStack, PostfixPeer]]:
    """The module's pair: the stack reset, ``peer.test``'s MX pointed at Postfix, and
    Postfix's queue emptied afterwards (a deferred message must not reach a later test)."""
    stack, peer = world
    stack.reset()
    point_mx(stack, PEER_DOMAIN, PEER_MX, PEER_HOST)
    stack.mx_ports[PEER_MX] = peer.port
    try:
        yield stack, peer
        stack.check()
    finally:
        peer.delete_queue()


# -- Postfix -> stack ------------------------------------------------------------------------


def test_postfix_delivers_to_stack_over_verified_starttls(
    pair: tuple[MailStack, PostfixPeer],
) -> None:
    stack, peer = pair
    tag = secrets.token_hex(6)
    began = time.monotonic()
    peer.send(PEER_USER, RECIPIENT, message(PEER_USER, RECIPIENT, tag))
    got = stack.wait_for(RECIPIENT, subject=f"interop {tag}", timeout=DELIVERY_TIMEOUT)
    elapsed = time.monotonic() - began
    # The newest trace line is the stack MX's: from Postfix's name, over TLS.
    hop = got.received_chain[0]
    assert hop.from_ is not None and hop.from_.startswith(PEER_MX), hop.raw
    assert hop.by == f"mail.{STACK_DOMAIN}", hop.raw
    assert hop.tls and hop.with_ == "ESMTPS", hop.raw
    # Postfix looked the MX up in the stack's DNS and verified the certificate for its name.
    peer.wait_for_log(
        f"Verified TLS connection established to mail.{STACK_DOMAIN}[", timeout=DELIVERY_TIMEOUT
    )
    assert stack.dns is not None
    assert (f"{STACK_DOMAIN}.", "MX", "NOERROR") in stack.dns.query_log
    print(f"Postfix -> stack: {elapsed * 1000:.0f} ms")


def test_postfix_defers_when_stack_mx_certificate_names_another_host(
    pair: tuple[MailStack, PostfixPeer],
) -> None:
    """The twin: ``example.com``'s MX renamed to a name the stack's certificate lacks;
    Postfix (``verify``) defers the message instead of sending it."""
    stack, peer = pair
    point_mx(stack, STACK_DOMAIN, f"other.{STACK_DOMAIN}", stack.endpoints(STACK_DOMAIN).host)
    tag = secrets.token_hex(6)
    peer.send(PEER_USER, RECIPIENT, message(PEER_USER, RECIPIENT, tag))
    line = peer.wait_for_log(f"to=<{RECIPIENT}>", "status=deferred", timeout=DELIVERY_TIMEOUT)
    assert "Server certificate not verified" in line, line
    stack.assert_not_delivered(RECIPIENT, subject=f"interop {tag}", timeout=1)


def test_postfix_bounces_unknown_stack_user_to_its_sender(
    pair: tuple[MailStack, PostfixPeer],
) -> None:
    """The stack MX refuses an unknown user with 550; Postfix returns a DSN to its sender."""
    stack, peer = pair
    tag = secrets.token_hex(6)
    nobody = f"nobody@{STACK_DOMAIN}"
    began = time.monotonic()
    peer.send(PEER_USER, nobody, message(PEER_USER, nobody, tag))
    dsn = peer.wait_for_message(
        "alice",
        lambda m: f"interop {tag}" in m.as_string() and m.get_content_type() == "multipart/report",
        timeout=DELIVERY_TIMEOUT,
    )
    elapsed = time.monotonic() - began
    text = dsn.as_string()
    assert f"Final-Recipient: rfc822; {nobody}" in text
    assert "Action: failed" in text and "Status: 5." in text
    assert "Diagnostic-Code: smtp; 550" in text
    stack.assert_not_delivered(subject=f"interop {tag}", timeout=1)
    print(f"Postfix -> stack, bounced back to Postfix: {elapsed * 1000:.0f} ms")


# -- stack -> Postfix ------------------------------------------------------------------------


def test_stack_relays_to_postfix_over_verified_starttls(
    pair: tuple[MailStack, PostfixPeer],
) -> None:
    stack, peer = pair
    tag = secrets.token_hex(6)
    began = time.monotonic()
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    got = peer.wait_for_message(
        "alice", lambda m: m["Subject"] == f"interop {tag}", timeout=DELIVERY_TIMEOUT
    )
    elapsed = time.monotonic() - began
    # Postfix's trace line: from the stack's relay, over TLS (smtpd_tls_received_header).
    newest = " ".join(str((got.get_all("Received") or [""])[0]).split())
    assert f"by {PEER_MX} (Postfix) with ESMTPS" in newest, newest
    assert "(using TLSv1." in newest, newest
    assert got["Return-Path"] == f"<{SENDER}>"
    # The stack looked up peer.test's MX in its DNS and dialled Postfix, nothing was captured.
    assert stack.dns is not None
    assert (f"{PEER_DOMAIN}.", "MX", "NOERROR") in stack.dns.query_log
    assert stack.outbound == []
    print(f"stack -> Postfix: {elapsed * 1000:.0f} ms")


def test_stack_keeps_mail_queued_when_postfix_certificate_names_another_host(
    pair: tuple[MailStack, PostfixPeer],
) -> None:
    """The twin: ``peer.test``'s MX renamed to a name Postfix's certificate lacks; under the
    enforce policy the relay defers (never plaintext, never unverified)."""
    stack, peer = pair
    point_mx(stack, PEER_DOMAIN, f"other.{PEER_DOMAIN}", PEER_HOST)
    stack.mx_ports[f"other.{PEER_DOMAIN}"] = peer.port
    tag = secrets.token_hex(6)
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    queue = stack.wait_relay(
        lambda q: any(m.attempts >= 1 and m.last_error for m in q), timeout=DELIVERY_TIMEOUT
    )
    (entry,) = queue
    assert entry.rcpt == (PEER_USER,)
    assert "certificate" in entry.last_error.lower(), entry.last_error
    assert not [m for m in peer.messages("alice") if m["Subject"] == f"interop {tag}"]


def test_stack_bounces_when_postfix_refuses_unknown_user(
    pair: tuple[MailStack, PostfixPeer],
) -> None:
    """Postfix answers 550 for an unknown mailbox; the stack's DSN reaches the sender's INBOX."""
    stack, peer = pair
    tag = secrets.token_hex(6)
    nobody = f"nobody@{PEER_DOMAIN}"
    began = time.monotonic()
    submit(stack, nobody, message(SENDER, nobody, tag))
    dsn = stack.wait_for(
        SENDER,
        match=lambda m: f"interop {tag}" in m.raw.decode("utf-8", "replace"),
        timeout=DELIVERY_TIMEOUT,
    )
    elapsed = time.monotonic() - began
    text = dsn.raw.decode("utf-8", "replace")
    assert f"Final-Recipient: rfc822; {nobody}" in text, text
    assert "Action: failed" in text
    assert "550" in text and PEER_MX in text, text
    peer.wait_for_log(f"<{nobody}>", "User unknown", timeout=DELIVERY_TIMEOUT)
    print(f"stack -> Postfix, bounced back to the stack: {elapsed * 1000:.0f} ms")
