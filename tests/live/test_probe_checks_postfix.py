"""``roundtrip probe --checks all`` against Debian's own Postfix 3.7 + Dovecot 2.3 (issue #18).

The stock configuration (``RealMailServer(profile="stock")``: Postfix's defaults for TLS
versions and bare newlines, LMTP over a unix socket) must show three findings: TLS 1.1
accepted on 465 (fail), the LMTP hop without TLS (warn) and SMTP smuggling (fail,
CVE-2023-51764: Postfix 3.7 takes ``<LF>.<LF>`` for the end of DATA). The hardened one
(``smtpd_tls_protocols = >=TLSv1.2``, ``smtpd_forbid_bare_newline = normalize``, LMTP over
TLS) must show none of them. Both listen as an MX too, for the relay and injection checks.
"""

from __future__ import annotations

import imaplib
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks._realstack import RealMailServer
from roundtrip.cli import main

_AVAILABLE, _REASON = RealMailServer.is_available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"Postfix + Dovecot: {_REASON}")


def _quote(address: str) -> str:
    return address.replace("@", "%40")


@pytest.fixture(scope="module", params=["stock", "hardened"])
def server(request: pytest.FixtureRequest) -> Iterator[RealMailServer]:
    with RealMailServer(profile=request.param, mx=True) as running:
        try:
            yield running
        finally:
            running.ca.cleanup()


def _probe(
    server: RealMailServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    smtp: str = "smtps",
) -> tuple[int, dict[str, Any]]:
    alice, bob = list(server.users)
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", server.users[alice])
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", server.users[bob])
    port = server.ports["submissions" if smtp == "smtps" else "submission"]
    code = main(
        [
            "probe",
            "--smtp",
            f"{smtp}://{_quote(alice)}@{server.host}:{port}",
            "--imap",
            f"imaps://{_quote(bob)}@{server.host}:{server.ports['imaps']}",
            "--cafile",
            server.ca.ca_file(),
            "--timeout",
            "10",
            "--mx",
            f"{server.host}:{server.ports['smtp']}",
            "--json",
            *extra,
        ]
    )
    out = capsys.readouterr().out
    for password in server.users.values():
        assert password not in out
    return code, json.loads(out)


def _findings(doc: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for result in doc["results"]:
        for finding in result["findings"]:
            found.setdefault(finding["code"], set()).add(finding["severity"])
    return found


def test_checks_all_stock_postfix_shows_the_three_findings_hardened_none(
    server: RealMailServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _probe(server, monkeypatch, capsys, "--checks", "all")
    found = _findings(doc)
    active = doc["active"]
    assert active["ran"] == [
        "starttls-injection",
        "plaintext-auth",
        "open-relay",
        "spoofing",
        "pipelining",
        "chunking",
        "smuggling",
        "brute-force",
    ]
    assert active["skipped"] == {}
    if server.profile == "stock":
        assert code == 1 and doc["ok"] is False
        assert "fail" in found["legacy-tls"]
        assert found["plaintext-hop"] == {"warn"}
        assert found["smtp-smuggling"] == {"fail"}
        assert active["checks"]["no SMTP smuggling"] is False
        # Submission (465) and MX alike: Postfix 3.7 ends DATA at a bare LF before the dot.
        for smuggling in [f for f in active["findings"] if f["code"] == "smtp-smuggling"]:
            assert "LF.LF, LF.CRLF ended DATA early" in smuggling["message"]
            assert sum("a second message arrived" in line for line in smuggling["evidence"]) == 2
        for stored in [f for f in active["findings"] if f["code"] == "smuggling-bytes"]:
            assert (
                "LF.LF: the stored message ends there (DATA ended at the variant)"
                in (stored["evidence"])
            )
    else:
        assert code == 0, doc
        assert "legacy-tls" not in found and "plaintext-hop" not in found
        assert found["smtp-smuggling"] == {"info"}
        assert all(active["checks"].values()), active["checks"]
    # Neither is an open relay, or injectable, and both refuse mail without AUTH.
    for check in ("no open relay", "no STARTTLS command injection", "submission requires AUTH"):
        assert active["checks"][check] is True
    # Postfix's defaults let a user send as another local address: a warning on both.
    assert found["sender-spoofing"] == {"warn"}
    assert found["chunking"] == {"info"} and found["pipelining"] == {"info"}
    # Dovecot refuses the made-up user; how fast is reported, never judged.
    assert found["auth-throttling"] == {"info"}
    assert active["checks"]["AUTH refuses unknown users"] is True


def _inbox_count(server: RealMailServer) -> int:
    _, bob = list(server.users)
    context = ssl.create_default_context(cafile=server.ca.ca_file())
    with imaplib.IMAP4_SSL(
        server.host, server.ports["imaps"], ssl_context=context, timeout=10
    ) as imap:
        imap.login(bob, server.users[bob])
        _, data = imap.select("INBOX", readonly=True)
        return int(data[0] or 0)


@pytest.mark.parametrize("keep", [False, True], ids=["deletes", "keep"])
def test_checks_smuggling_cleans_the_mailbox_unless_keep(
    server: RealMailServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    keep: bool,
) -> None:
    before = _inbox_count(server)
    _, doc = _probe(server, monkeypatch, capsys, "--checks", "smuggling", *(["--keep"] * keep))
    findings = [f for f in doc["active"]["findings"] if f["code"] == "smtp-smuggling"]
    assert [len(f["evidence"]) for f in findings] == [7, 7]  # submission, MX
    # Seven outer messages per route, the smuggled ones on stock, and the round trip's own.
    smuggled = 2 * 2 if server.profile == "stock" else 0
    assert _inbox_count(server) - before == (2 * 7 + smuggled + 1 if keep else 0)


@pytest.fixture
def plaintext_auth_server() -> Iterator[RealMailServer]:
    with RealMailServer(allow_plaintext_auth_on_starttls_port=True, mx=True) as running:
        try:
            yield running
        finally:
            running.ca.cleanup()


def test_checks_plaintext_auth_flags_postfix_offering_auth_before_starttls(
    plaintext_auth_server: RealMailServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = _probe(
        plaintext_auth_server, monkeypatch, capsys, "--checks", "plaintext-auth", smtp="smtp"
    )
    assert code == 1
    assert doc["active"]["checks"] == {"no AUTH before TLS": False}
    failing = [f for f in doc["active"]["findings"] if f["severity"] == "fail"]
    assert failing and "offers AUTH LOGIN PLAIN before STARTTLS" in failing[0]["message"]
    assert "535" in failing[0]["message"]  # Postfix checked the bogus user's credentials


def test_checks_plaintext_auth_twin_hardened_submission_port(
    server: RealMailServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = _probe(server, monkeypatch, capsys, "--checks", "plaintext-auth", smtp="smtp")
    assert doc["active"]["checks"] == {"no AUTH before TLS": True}
    replies = [f["message"] for f in doc["active"]["findings"] if f["code"] == "plaintext-auth"]
    assert len(replies) == 2  # the submission port and the MX
    assert any("530 5.7.0 Must issue a STARTTLS command first" in m for m in replies)
