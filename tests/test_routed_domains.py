"""StackConfig.routed_domains: the relay delivers to a foreign domain's real MX instead of
capturing its mail (for a real MTA under test; tests/live/test_mta_postfix.py does it with
Postfix). Here the "foreign" MX is a second stack that trusts the same CA."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from roundtrip import MailStack, StackConfig
from roundtrip.errors import ConfigError
from roundtrip.protocols.dns import default_records

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def peer() -> Iterator[MailStack]:
    with MailStack(StackConfig(domains=("peer.test",))) as stack:
        yield stack


def _sender_stack(peer: MailStack, *, routed: bool) -> MailStack:
    config = StackConfig(domains=("example.com",), routed_domains=("peer.test",) if routed else ())
    stack = MailStack(config, ca=peer.ca).start()
    ep = peer.endpoints("peer.test")
    # The peer's MX in this stack's DNS, and its SMTP port (not 25 with ephemeral ports).
    stack.set_dns_records(
        stack.default_dns_records() + default_records("peer.test", ep.host, mx_host=ep.hostname)
    )
    stack.mx_ports[ep.hostname] = ep.ports["smtp"]
    return stack


def _send(stack: MailStack, to: str, subject: str) -> None:
    user = stack.user()
    host, port = stack.endpoints().address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [to], f"Subject: {subject}\r\n\r\nhi\r\n".encode())


def test_routed_domain_is_delivered_to_its_mx(peer: MailStack) -> None:
    peer.reset()
    with _sender_stack(peer, routed=True) as stack:
        _send(stack, peer.user().address, "routed")
        found = peer.wait_for(peer.user().address, subject="routed", timeout=TIMEOUT)
        assert b"with ESMTPS" in found.raw  # STARTTLS (opportunistic: no policy for peer.test)
        assert stack.outbound == []


def test_routed_domain_twin_unrouted_mail_is_captured(peer: MailStack) -> None:
    peer.reset()
    with _sender_stack(peer, routed=False) as stack:
        _send(stack, peer.user().address, "captured")
        stack.assert_delivered(peer.user().address, subject="captured", timeout=TIMEOUT)
        assert [m.subject for m in stack.outbound] == ["captured"]
    peer.assert_not_delivered(timeout=0.5)


def test_routed_domain_config() -> None:
    assert StackConfig.from_strings({"routed_domains": "Peer.Test."}).routed_domains == (
        "peer.test",
    )
    with pytest.raises(ConfigError, match="a stack domain is served, not routed"):
        StackConfig(domains=("example.com",), routed_domains=("example.com",))
