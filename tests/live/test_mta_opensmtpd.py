"""A real OpenSMTPD 6.8 exchanges mail with a stack, both ways.

OpenSMTPD (``tests/live/_opensmtpd_peer.py``, unpacked from Debian's ``opensmtpd`` into
``$ROUNDTRIP_PEERS_DIR``) runs in its own mount namespace whose ``/etc/resolv.conf`` names the
stack's DNS on 127.0.0.1:53, so it finds the stack's MX by a real MX lookup. The stack runs
with ``ports="standard"``; OpenSMTPD listens on 127.0.0.10:25 as ``mx.peer.test``.

OpenSMTPD -> stack: ``relay tls`` (mandatory STARTTLS, certificate verified against the stack
CA) to ``example.com``'s MX on 127.0.0.2.

Stack -> OpenSMTPD: Debian 12's OpenSMTPD 6.8.0p2 cannot complete a TLS handshake as a server
with OpenSSL 3 (its privilege-separated key engine fails: "SSL routines::EVP lib", upstream
OpenSMTPD issues 1171 and 1239), whatever the key type, protocol version or cipher. So under
``peer.test``'s ``enforce`` policy the stack's relay must keep the message queued (no
plaintext fallback), and delivery works only once the policy is ``none`` (opportunistic TLS):
the relay then redials in plaintext.

Needs root, the unpacked OpenSMTPD, the ``opensmtpd`` and ``opensmtpq`` accounts and
unshare(1) and nsenter(1); skipped otherwise, and when the standard ports are taken.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from _mta_world import (
    DELIVERY_TIMEOUT,
    FIRST_DOMAIN,
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
from _opensmtpd_peer import OpenSMTPDPeer, opensmtpd_unavailable_reason

from roundtrip.protocols.tlspolicy import PolicyMode, TLSPolicy
from roundtrip.stack import MailStack

_REASON = opensmtpd_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"OpenSMTPD peer: {_REASON}")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[MailStack, OpenSMTPDPeer]]:
    """A stack on the standard ports and an OpenSMTPD next to it, for the whole module."""
    stack = start_stack()
    try:
        with OpenSMTPDPeer(
            ca=stack.ca, domain=PEER_DOMAIN, users=("alice",), mx_name=PEER_MX, host=PEER_HOST
        ) as peer:
            yield stack, peer
    finally:
        stack.stop()


@pytest.fixture
def pair(
    world: tuple[MailStack, OpenSMTPDPeer],
) -> Iterator[tuple[MailStack, OpenSMTPDPeer, int]]:
    """The module's pair: the stack reset, ``peer.test``'s MX pointed at OpenSMTPD, a mark
    in OpenSMTPD's log, and its queue emptied afterwards (no retry reaches a later test)."""
    stack, peer = world
    stack.reset()
    point_mx(stack, PEER_DOMAIN, PEER_MX, PEER_HOST)
    stack.mx_ports[PEER_MX] = peer.port
    try:
        yield stack, peer, peer.mark()
        stack.check()
    finally:
        peer.delete_queue()


# -- OpenSMTPD -> stack ----------------------------------------------------------------------


def test_opensmtpd_delivers_to_stack_over_verified_starttls(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    stack, peer, mark = pair
    tag = secrets.token_hex(6)
    began = time.monotonic()
    peer.send(PEER_USER, RECIPIENT, message(PEER_USER, RECIPIENT, tag))
    got = stack.wait_for(RECIPIENT, subject=f"interop {tag}", timeout=DELIVERY_TIMEOUT)
    elapsed = time.monotonic() - began
    # The newest trace line is the stack MX's: from OpenSMTPD's HELO name, over TLS.
    hop = got.received_chain[0]
    assert hop.from_ is not None and hop.from_.startswith(PEER_MX), hop.raw
    assert hop.by == f"mail.{STACK_DOMAIN}", hop.raw
    assert hop.tls and hop.with_ == "ESMTPS", hop.raw
    # OpenSMTPD found the MX in the stack's DNS, required STARTTLS and checked the certificate.
    done = peer.wait_for_log(
        "mta delivery", f"to=<{RECIPIENT}>", 'result="Ok"', timeout=DELIVERY_TIMEOUT, since=mark
    )
    session = done.split()[0]
    peer.wait_for_log(session, "mta tls ciphers=TLSv1.", timeout=1, since=mark)
    peer.wait_for_log(session, 'server-cert-check result="success"', timeout=1, since=mark)
    assert stack.dns is not None
    assert (f"{STACK_DOMAIN}.", "MX", "NOERROR") in stack.dns.query_log
    print(f"OpenSMTPD -> stack: {elapsed * 1000:.0f} ms")


def test_opensmtpd_defers_when_stack_mx_certificate_names_another_host(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    """The twin: the MX of ``first.test`` renamed to a name the stack's certificate lacks;
    OpenSMTPD (``relay tls``) keeps the message queued instead of sending it.

    ``first.test`` and not ``example.com``: OpenSMTPD reuses an open connection to the same
    relay for a few seconds without a new certificate check, so an earlier test's session
    could carry the message."""
    stack, peer, mark = pair
    other = f"other.{FIRST_DOMAIN}"
    point_mx(stack, FIRST_DOMAIN, other, stack.endpoints(FIRST_DOMAIN).host)
    rcpt = f"user@{FIRST_DOMAIN}"
    tag = secrets.token_hex(6)
    peer.send(PEER_USER, rcpt, message(PEER_USER, rcpt, tag))
    peer.wait_for_log(
        f"ssl_check_name: no match for '{other}' in cert", timeout=DELIVERY_TIMEOUT, since=mark
    )
    peer.wait_for_log("SSL certificate check failed", timeout=DELIVERY_TIMEOUT, since=mark)
    peer.wait_for_log(
        "mta delivery", f"to=<{rcpt}>", 'result="TempFail"', timeout=DELIVERY_TIMEOUT, since=mark
    )
    stack.assert_not_delivered(rcpt, subject=f"interop {tag}", timeout=1)


def test_opensmtpd_bounces_unknown_stack_user_to_its_sender(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    """The stack MX refuses an unknown user with 550; OpenSMTPD returns a DSN to its sender."""
    stack, peer, _ = pair
    tag = secrets.token_hex(6)
    nobody = f"nobody@{STACK_DOMAIN}"
    began = time.monotonic()
    peer.send(PEER_USER, nobody, message(PEER_USER, nobody, tag))
    # OpenSMTPD 6.8's DSN is multipart/mixed (RFC 3464 asks for multipart/report) with a
    # message/delivery-status part and the original headers.
    dsn = peer.wait_for_message(
        "alice",
        lambda m: f"interop {tag}" in m.as_string() and m["From"].startswith("Mailer Daemon"),
        timeout=DELIVERY_TIMEOUT,
    )
    elapsed = time.monotonic() - began
    text = dsn.as_string()
    assert "message/delivery-status" in text, text
    assert f"Final-Recipient: rfc822; {nobody}" in text, text
    assert "Action: failed" in text and "Status: 5." in text, text
    assert f"{nobody}: 550 5.1.1" in text, text
    stack.assert_not_delivered(subject=f"interop {tag}", timeout=1)
    print(f"OpenSMTPD -> stack, bounced back to OpenSMTPD: {elapsed * 1000:.0f} ms")


# -- stack -> OpenSMTPD ----------------------------------------------------------------------
#
# OpenSMTPD's STARTTLS listener (``PEER_HOST``) fails every handshake; its other listener
# (``plain_host``, MX name ``PLAIN_MX``) offers no STARTTLS. The relay delivers only to the
# latter, and only when peer.test's policy is ``none``.

#: The MX name of OpenSMTPD's listener without STARTTLS.
PLAIN_MX = f"plain.{PEER_DOMAIN}"


def _route_plain(stack: MailStack, peer: OpenSMTPDPeer, mode: PolicyMode) -> None:
    """``peer.test``'s MX: OpenSMTPD's listener without STARTTLS, under TLS policy ``mode``."""
    point_mx(stack, PEER_DOMAIN, PLAIN_MX, peer.plain_host)
    stack.mx_ports[PLAIN_MX] = peer.port
    stack.tls_policies[PEER_DOMAIN] = TLSPolicy(mode=mode)


def test_stack_keeps_mail_queued_when_opensmtpd_starttls_fails(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    """OpenSMTPD offers STARTTLS but fails every handshake (see the module's docstring);
    under the enforce policy the relay defers: never plaintext."""
    stack, peer, mark = pair
    tag = secrets.token_hex(6)
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    queue = stack.wait_relay(
        lambda q: any(m.attempts >= 1 and m.last_error for m in q), timeout=DELIVERY_TIMEOUT
    )
    (entry,) = queue
    assert entry.rcpt == (PEER_USER,)
    assert "tls" in entry.last_error.lower(), entry.last_error
    peer.wait_for_log("smtp disconnected", "EVP lib", timeout=DELIVERY_TIMEOUT, since=mark)
    assert not [m for m in peer.messages("alice") if m["Subject"] == f"interop {tag}"]
    assert "smtp message" not in peer.log()[mark:]


def test_stack_relays_to_opensmtpd_without_starttls_under_policy_none(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    """Policy ``none`` (opportunistic TLS, RFC 7435) and an MX that offers no STARTTLS: the
    relay delivers in plaintext, and the message reaches alice's Maildir."""
    stack, peer, _ = pair
    _route_plain(stack, peer, "none")
    tag = secrets.token_hex(6)
    began = time.monotonic()
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    got = peer.wait_for_message(
        "alice", lambda m: m["Subject"] == f"interop {tag}", timeout=DELIVERY_TIMEOUT
    )
    elapsed = time.monotonic() - began
    newest = " ".join(str((got.get_all("Received") or [""])[0]).split())
    assert f"by {PEER_MX} (OpenSMTPD) with ESMTP id" in newest, newest
    assert got["Return-Path"] == f"<{SENDER}>"
    assert stack.dns is not None
    assert (f"{PEER_DOMAIN}.", "MX", "NOERROR") in stack.dns.query_log
    assert stack.outbound == []
    print(f"stack -> OpenSMTPD (no STARTTLS offered): {elapsed * 1000:.0f} ms")


def test_stack_keeps_mail_queued_when_opensmtpd_offers_no_starttls_under_enforce(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    """The twin: the same MX under ``enforce``: the relay defers, nothing reaches OpenSMTPD."""
    stack, peer, mark = pair
    _route_plain(stack, peer, "enforce")
    tag = secrets.token_hex(6)
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    queue = stack.wait_relay(
        lambda q: any(m.attempts >= 1 and m.last_error for m in q), timeout=DELIVERY_TIMEOUT
    )
    (entry,) = queue
    assert "starttls" in entry.last_error.lower(), entry.last_error
    assert not [m for m in peer.messages("alice") if m["Subject"] == f"interop {tag}"]
    assert "smtp message" not in peer.log()[mark:]


def test_stack_bounces_when_opensmtpd_refuses_unknown_user(
    pair: tuple[MailStack, OpenSMTPDPeer, int],
) -> None:
    """OpenSMTPD answers 550 for an unknown mailbox; the stack's DSN reaches the sender."""
    stack, peer, mark = pair
    _route_plain(stack, peer, "none")
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
    assert "550" in text and PLAIN_MX in text, text
    peer.wait_for_log(f"<{nobody}>", "550 Invalid recipient", timeout=DELIVERY_TIMEOUT, since=mark)
    print(f"stack -> OpenSMTPD, bounced back to the stack: {elapsed * 1000:.0f} ms")
