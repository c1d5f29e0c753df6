"""A real Exim 4 exchanges mail with a stack, both ways, over verified STARTTLS.

Exim (``tests/live/_exim_peer.py``, unpacked from Debian's ``exim4-daemon-light`` into
``$ROUNDTRIP_PEERS_DIR``) runs in its own mount namespace whose ``/etc/resolv.conf`` names the
stack's DNS on 127.0.0.1:53, so it finds the stack's MX by a real MX lookup. The stack runs
with ``ports="standard"``; Exim listens on 127.0.0.10:25 as ``mx.peer.test``.

``peer.test`` is in ``StackConfig.routed_domains`` with the TLS policy ``enforce``: the relay
looks its MX up in the stack's DNS, dials Exim and requires STARTTLS with a certificate for
``mx.peer.test`` from the stack CA. Exim sends to ``example.com`` (127.0.0.2) and verifies the
stack's certificate against the stack CA (``CV=yes`` in its mainlog).

Needs root, the unpacked Exim, the ``Debian-exim`` account and unshare(1); skipped otherwise,
and when the standard ports are taken.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from _exim_peer import EximPeer, exim_unavailable_reason
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

from roundtrip.stack import MailStack

_REASON = exim_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"Exim peer: {_REASON}")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[MailStack, EximPeer]]:
    """A stack on the standard ports and an Exim next to it, for the whole module."""
    stack = start_stack()
    try:
        with EximPeer(
            ca=stack.ca, domain=PEER_DOMAIN, users=("alice",), mx_name=PEER_MX, host=PEER_HOST
        ) as peer:
            yield stack, peer
    finally:
        stack.stop()


@pytest.fixture
def pair(world: tuple[MailStack, EximPeer]) -> Iterator[tuple[MailStack, EximPeer]]:
    """The module's pair: the stack reset, ``peer.test``'s MX pointed at Exim, and Exim's
    queue emptied afterwards (a deferred message must not reach a later test)."""
    stack, peer = world
    stack.reset()
    point_mx(stack, PEER_DOMAIN, PEER_MX, PEER_HOST)
    stack.mx_ports[PEER_MX] = peer.port
    try:
        yield stack, peer
        stack.check()
    finally:
        peer.delete_queue()


# -- Exim -> stack ---------------------------------------------------------------------------


def test_exim_delivers_to_stack_over_verified_starttls(pair: tuple[MailStack, EximPeer]) -> None:
    stack, peer = pair
    tag = secrets.token_hex(6)
    began = time.monotonic()
    peer.send(PEER_USER, RECIPIENT, message(PEER_USER, RECIPIENT, tag))
    got = stack.wait_for(RECIPIENT, subject=f"interop {tag}", timeout=DELIVERY_TIMEOUT)
    elapsed = time.monotonic() - began
    # The newest trace line is the stack MX's: from Exim's name, over TLS.
    hop = got.received_chain[0]
    assert hop.from_ is not None and hop.from_.startswith(PEER_MX), hop.raw
    assert hop.by == f"mail.{STACK_DOMAIN}", hop.raw
    assert hop.tls and hop.with_ == "ESMTPS", hop.raw
    # Exim looked the MX up in the stack's DNS and verified the certificate (CV=yes).
    peer.wait_for_log(f"=> {RECIPIENT}", "T=remote_smtp", timeout=DELIVERY_TIMEOUT)
    lines = peer.lines_for(f"{tag}@roundtrip.test", timeout=DELIVERY_TIMEOUT)
    (line,) = [line for line in lines if f"=> {RECIPIENT}" in line]
    assert f"H=mail.{STACK_DOMAIN} [" in line and "X=TLS1." in line, line
    assert "CV=yes" in line, line
    assert stack.dns is not None
    assert (f"{STACK_DOMAIN}.", "MX", "NOERROR") in stack.dns.query_log
    print(f"Exim -> stack: {elapsed * 1000:.0f} ms")


def test_exim_defers_when_stack_mx_certificate_names_another_host(
    pair: tuple[MailStack, EximPeer],
) -> None:
    """The twin: ``example.com``'s MX renamed to a name the stack's certificate lacks; Exim
    (``tls_verify_cert_hostnames``) defers the message instead of sending it."""
    stack, peer = pair
    point_mx(stack, STACK_DOMAIN, f"other.{STACK_DOMAIN}", stack.endpoints(STACK_DOMAIN).host)
    tag = secrets.token_hex(6)
    peer.send(PEER_USER, RECIPIENT, message(PEER_USER, RECIPIENT, tag))
    peer.wait_for_log(f"== {RECIPIENT}", "defer", timeout=DELIVERY_TIMEOUT)
    lines = peer.lines_for(f"{tag}@roundtrip.test", timeout=DELIVERY_TIMEOUT)
    (deferred,) = [line for line in lines if f"== {RECIPIENT}" in line]
    assert f"other.{STACK_DOMAIN}" in deferred and "certificate" in deferred.lower(), deferred
    assert not [line for line in lines if f"=> {RECIPIENT}" in line], lines
    stack.assert_not_delivered(RECIPIENT, subject=f"interop {tag}", timeout=1)


def test_exim_bounces_unknown_stack_user_to_its_sender(pair: tuple[MailStack, EximPeer]) -> None:
    """The stack MX refuses an unknown user with 550; Exim returns a DSN to its sender."""
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
    assert f"Final-Recipient: rfc822;{nobody}" in text.replace("; ", ";"), text
    assert "Action: failed" in text and "Status: 5." in text, text
    assert "550" in text, text
    stack.assert_not_delivered(subject=f"interop {tag}", timeout=1)
    print(f"Exim -> stack, bounced back to Exim: {elapsed * 1000:.0f} ms")


# -- stack -> Exim ---------------------------------------------------------------------------


def test_stack_relays_to_exim_over_verified_starttls(pair: tuple[MailStack, EximPeer]) -> None:
    stack, peer = pair
    tag = secrets.token_hex(6)
    began = time.monotonic()
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    got = peer.wait_for_message(
        "alice", lambda m: m["Subject"] == f"interop {tag}", timeout=DELIVERY_TIMEOUT
    )
    elapsed = time.monotonic() - began
    # Exim's trace line: received by mx.peer.test with esmtps (STARTTLS), naming the cipher.
    newest = " ".join(str((got.get_all("Received") or [""])[0]).split())
    assert f"by {PEER_MX} with esmtps (TLS1." in newest, newest
    assert got["Return-Path"] == f"<{SENDER}>"
    (line,) = [
        line
        for line in peer.lines_for(f"{tag}@roundtrip.test", timeout=DELIVERY_TIMEOUT)
        if f"<= {SENDER}" in line
    ]
    assert "X=TLS1." in line and f"H=(mail.{STACK_DOMAIN})" in line, line
    assert stack.dns is not None
    assert (f"{PEER_DOMAIN}.", "MX", "NOERROR") in stack.dns.query_log
    assert stack.outbound == []
    print(f"stack -> Exim: {elapsed * 1000:.0f} ms")


def test_stack_keeps_mail_queued_when_exim_certificate_names_another_host(
    pair: tuple[MailStack, EximPeer],
) -> None:
    """The twin: ``peer.test``'s MX renamed to a name Exim's certificate lacks; under the
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
    assert f"id={tag}@roundtrip.test" not in peer.log()


def test_stack_bounces_when_exim_refuses_unknown_user(pair: tuple[MailStack, EximPeer]) -> None:
    """Exim answers 550 for an unknown mailbox; the stack's DSN reaches the sender's INBOX."""
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
    peer.wait_for_log(f"rejected RCPT <{nobody}>", "user unknown", timeout=DELIVERY_TIMEOUT)
    print(f"stack -> Exim, bounced back to the stack: {elapsed * 1000:.0f} ms")
