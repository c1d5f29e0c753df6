"""Checks of the probe beyond the round trip itself: the Received chain of the delivered copy
(per-hop TLS and delays, as info findings), and STARTTLS offered and effective, with the
capabilities fetched again after TLS and compared."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from roundtrip import MailStack
from roundtrip.cli import main
from roundtrip.config import Endpoint
from roundtrip.probes.roundtrip import ProbeResult, run_probe, verify
from roundtrip.probes.send import build_probe_message

TIMEOUT = 10.0


def _hop(frm: str, by: str, with_: str, date: str) -> bytes:
    return f"Received: from {frm} by {by} with {with_} id 1; {date}\r\n".encode()


def _verified(*received: bytes) -> ProbeResult:
    message = build_probe_message(mail_from="a@example.com", rcpt_to="b@example.org")
    result = ProbeResult(ok=False, smtp="smtps://x", retrieve="imaps://y")
    # Newest first, as servers prepend them.
    verify(message, [b"".join(reversed(received)) + message.raw], result)
    return result


def test_probe_received_chain_gives_each_hop_its_tls_and_delay() -> None:
    result = _verified(
        _hop("client", "submit.example.com", "ESMTPSA", "Thu, 03 Dec 2026 22:00:00 +0000"),
        _hop("submit.example.com", "mx.example.org", "ESMTPS", "Thu, 03 Dec 2026 22:00:02 +0000"),
        _hop("mx.example.org", "store.example.org", "LMTPS", "Thu, 03 Dec 2026 23:00:07 +0100"),
    )
    hops = [f for f in result.findings if f.code == "received-hop"]
    assert [f.severity for f in hops] == ["info"] * 3
    assert [f.server for f in hops] == ["submit.example.com", "mx.example.org", "store.example.org"]
    assert hops[0].message.endswith("with ESMTPSA (TLS), the first hop")
    assert hops[1].message.endswith("(TLS), +2 s after the previous hop")
    # 23:00:07 +0100 is 22:00:07 UTC: the zone counts.
    assert hops[2].message.endswith("(TLS), +5 s after the previous hop")
    assert hops[2].evidence[0].startswith("from mx.example.org by store.example.org with LMTPS")
    assert [h.delay for h in result.hops] == [None, 2.0, 5.0]
    assert not [f for f in result.findings if f.code == "plaintext-hop"]


def test_probe_received_chain_plaintext_hop_and_bad_date() -> None:
    result = _verified(
        _hop("client", "submit.example.com", "ESMTPSA", "Thu, 03 Dec 2026 22:00:00 +0000"),
        _hop("submit.example.com", "store.example.org", "LMTP", "not a date"),
    )
    hops = [f for f in result.findings if f.code == "received-hop"]
    assert hops[1].message.endswith("(no TLS), no delay known (date stamp unreadable)")
    plain = [f for f in result.findings if f.code == "plaintext-hop"]
    assert len(plain) == 1 and plain[0].severity == "warn"
    assert plain[0].server == "store.example.org"
    assert "with LMTP" in plain[0].evidence[0]


# -- STARTTLS offered and effective -----------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _starttls(stack: MailStack, domain: str, service: str, protocol: str) -> Endpoint:
    ep, user = stack.endpoints(domain), stack.user(domain)
    return Endpoint(
        protocol, "starttls", ep.host, ep.ports[service], user.address, user.password, ep.hostname
    )


@pytest.mark.parametrize(("service", "command"), [("imap", "STARTTLS"), ("pop3", "STLS")])
def test_probe_starttls_capabilities_are_fetched_again_and_compared(
    stack: MailStack, service: str, command: str
) -> None:
    stack.reset()
    result = run_probe(
        _starttls(stack, "example.com", "submission", "smtp"),
        _starttls(stack, "example.org", service, service),
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=TIMEOUT,
        settle=0.05,
    )
    assert result.ok, result.error
    upgrades = {f.message.split(" ")[0]: f for f in result.findings if f.code == "starttls"}
    assert set(upgrades) == {"smtp", service}
    smtp = upgrades["smtp"]
    assert smtp.severity == "info" and smtp.server == result.steps[0].server
    assert "added after TLS: AUTH; withdrawn after TLS: STARTTLS" in smtp.message
    before, after = upgrades[service].evidence
    assert command in before.split() and command not in after.split()
    assert not [f for f in result.findings if f.code == "starttls-offered-after-tls"]


@pytest.mark.parametrize("flag", [["--tls-scan"], []])
def test_probe_tls_scan_option(
    stack: MailStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flag: list[str],
) -> None:
    stack.reset()
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", stack.user("example.com").password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", stack.user("example.org").password)
    src, dst = stack.endpoints("example.com"), stack.endpoints("example.org")
    argv = [
        "probe",
        "--smtp",
        f"smtps://user%40example.com@127.0.0.1:{src.ports['submissions']}",
        "--imap",
        f"imaps://user%40example.org@127.0.0.1:{dst.ports['imaps']}",
        "--cafile",
        stack.ca_file,
        "--json",
        *flag,
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    scanned = [f for f in result["findings"] if f["code"] == "tls-versions"]
    assert len(scanned) == (2 if flag else 0)
    assert len(result["tls_scan"]) == len(scanned)
