"""What the real-MTA interop tests share: names, a message, submission, the peer's MX, the stack.

Each ``tests/live/test_mta_*.py`` runs one peer MTA (Postfix, Exim, OpenSMTPD) on
``PEER_HOST``:25 as ``PEER_MX`` for ``PEER_DOMAIN``, next to a stack on the standard ports
whose relay routes ``PEER_DOMAIN`` (``StackConfig.routed_domains``) under an enforced TLS
policy. ``FIRST_DOMAIN`` sits on 127.0.0.1, which the peers count as their own address; they
send to ``STACK_DOMAIN`` (127.0.0.2).
"""

from __future__ import annotations

import email.utils
import smtplib

import pytest

from roundtrip.config import StackConfig, User
from roundtrip.errors import ServerStartError
from roundtrip.protocols.dns import Record, default_records
from roundtrip.stack import MailStack

#: The peer's side: its domain, host name and address (port 25).
PEER_DOMAIN = "peer.test"
FIRST_DOMAIN = "first.test"
PEER_MX = "mx.peer.test"
PEER_HOST = "127.0.0.10"
#: The stack domain the peer sends to (on 127.0.0.2 with standard ports).
STACK_DOMAIN = "example.com"
PEER_USER = f"alice@{PEER_DOMAIN}"
SENDER = f"sender@{STACK_DOMAIN}"
RECIPIENT = f"user@{STACK_DOMAIN}"
#: Generous: a delivery takes well under a second each way on an idle machine.
DELIVERY_TIMEOUT = 20.0


def message(sender: str, rcpt: str, tag: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: interop {tag}\r\n"
        f"Message-ID: <{tag}@roundtrip.test>\r\nDate: {email.utils.formatdate()}\r\n"
        f"\r\nbody {tag}\r\n"
    ).encode()


def sender(stack: MailStack) -> User:
    return next(u for u in stack.users if u.address == SENDER)


def submit(stack: MailStack, rcpt: str, raw: bytes) -> None:
    """Submit as ``SENDER`` over implicit TLS to the stack."""
    user = sender(stack)
    ep = stack.endpoint("submissions", user)
    with smtplib.SMTP_SSL(ep.host, ep.port, context=stack.client_context(), timeout=10) as client:
        client.login(user.address, user.password)
        client.sendmail(user.address, [rcpt], raw)


def point_mx(stack: MailStack, domain: str, mx_name: str, address: str) -> None:
    """Serve the stack's default records, except ``domain``'s MX: ``mx_name`` at ``address``."""
    records = [
        r
        for r in stack.default_dns_records()
        if not (r.name.rstrip(".") == domain and r.rtype == "MX")
    ]
    if domain not in stack.domains:  # a routed domain: its whole zone
        records += [r for r in default_records(domain, address) if r.rtype in ("SOA", "NS")]
    records += [Record(domain, "MX", f"10 {mx_name}."), Record(mx_name, "A", address)]
    stack.set_dns_records(records)


def start_stack() -> MailStack:
    """The stack every interop module runs against; skips when the standard ports are taken."""
    config = StackConfig(
        domains=(FIRST_DOMAIN, STACK_DOMAIN),
        users=(User(SENDER), User(RECIPIENT), User(f"user@{FIRST_DOMAIN}")),
        ports="standard",
        # peer.test is delivered over SMTP, not captured, under an enforced TLS policy.
        routed_domains=(PEER_DOMAIN,),
        relay_tls=((PEER_DOMAIN, "enforce"),),
    )
    try:
        return MailStack(config).start()
    except ServerStartError as exc:
        pytest.skip(f"a stack on the standard ports (25, 53, ...) cannot start here: {exc}")
