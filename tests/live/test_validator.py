"""``roundtrip probe`` against a real Postfix + Dovecot: healthy passes, each breakage is named.

Every broken variant is a ``RealMailServer`` knob (about 0.25 s to start). The CLI runs
in-process through ``main(argv)``; passwords go through the environment only.

Dovecot treats a client whose address equals its own as secure and then offers plaintext
LOGIN before STARTTLS. The STARTTLS-everywhere healthy case therefore runs on a server bound to
127.0.0.2 (the client's source address stays 127.0.0.1), and its twin on 127.0.0.1 shows the
validator flagging exactly that.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._realstack import RealMailServer
from roundtrip.cli import main

_AVAILABLE, _REASON = RealMailServer.is_available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"Postfix + Dovecot: {_REASON}")

TIMEOUT = "10"


def _quote(address: str) -> str:
    return address.replace("@", "%40")


def _argv(
    server: RealMailServer,
    *,
    smtp: str = "smtps",
    reader: str = "imaps",
    timeout: str = TIMEOUT,
) -> list[str]:
    alice, bob = list(server.users)
    port = {"smtps": "submissions", "smtp": "submission"}[smtp]
    reader_port = {"imaps": "imaps", "imap": "imap", "pop3s": "pop3s", "pop3": "pop3"}[reader]
    flag = "--imap" if reader.startswith("imap") else "--pop3"
    return [
        "probe",
        "--smtp",
        f"{smtp}://{_quote(alice)}@{server.host}:{server.ports[port]}",
        flag,
        f"{reader}://{_quote(bob)}@{server.host}:{server.ports[reader_port]}",
        "--cafile",
        server.ca.ca_file(),
        "--timeout",
        timeout,
    ]


def _passwords(server: RealMailServer, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = list(server.users)
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", server.users[alice])
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", server.users[bob])
    monkeypatch.setenv("ROUNDTRIP_POP3_PASSWORD", server.users[bob])


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def healthy(real_mailserver: RealMailServer, monkeypatch: pytest.MonkeyPatch) -> RealMailServer:
    _passwords(real_mailserver, monkeypatch)
    return real_mailserver


@pytest.fixture
def variant(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RealMailServer]:
    """A server built with the knobs in ``request.param``."""
    with RealMailServer(**request.param) as server:
        _passwords(server, monkeypatch)
        try:
            yield server
        finally:
            server.ca.cleanup()


def _secrets_absent(server: RealMailServer, *texts: str) -> None:
    for password in server.users.values():
        for text in texts:
            assert password not in text


# -- healthy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["imaps", "pop3s"])
def test_validator_healthy_server_passes(
    healthy: RealMailServer, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(_argv(healthy, reader=reader), capsys)
    assert code == 0, out + err
    proto = reader[:4]
    for line in (
        "ok   smtp connect",
        "ok   smtp tls",
        "ok   smtp auth",
        "ok   smtp submit",
        f"ok   {proto} visible",
        f"ok   {proto} fetch",
        "time to visible",
        "ok   check exactly one copy",
        "ok   check body unchanged",
        "TLS 1.0/1.1 offered: refused",
        "ok   check TLS below 1.2 refused",
        "matches 127.0.0.1: yes",
    ):
        assert line in out
    assert "TLSv1.3" in out or "TLSv1.2" in out
    assert "finding [fail]" not in out
    assert out.rstrip().splitlines()[-1].startswith("  PASS")
    _secrets_absent(healthy, out, err)


def test_validator_wrong_password_fails_at_auth(
    healthy: RealMailServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", "definitely-wrong-pw")
    code, out, err = _run(_argv(healthy), capsys)
    assert code == 1
    assert "FAIL at AUTH" in out and "refused the credentials" in out and "535" in out
    assert "definitely-wrong-pw" not in out + err


def test_validator_wrong_imap_password_fails_at_login(
    healthy: RealMailServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", "definitely-wrong-pw")
    code, out, err = _run(_argv(healthy), capsys)
    assert code == 1
    assert "FAIL at IMAP LOGIN" in out and "AUTHENTICATIONFAILED" in out
    assert "definitely-wrong-pw" not in out + err


def test_validator_missing_password_is_a_usage_error(
    healthy: RealMailServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ROUNDTRIP_SMTP_PASSWORD")
    code, _, err = _run(_argv(healthy), capsys)
    assert code == 2
    assert "set ROUNDTRIP_SMTP_PASSWORD" in err


@pytest.mark.parametrize("variant", [{"host": "127.0.0.2"}], indirect=True)
@pytest.mark.parametrize("reader", ["imap", "pop3"])
def test_validator_starttls_everywhere_passes(
    variant: RealMailServer, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(_argv(variant, smtp="smtp", reader=reader), capsys)
    assert code == 0, out + err
    assert "ok   check no AUTH before TLS" in out
    assert f"ok   {reader} tls" in out and "ok   smtp tls" in out


def test_validator_flags_login_before_starttls_on_loopback_dovecot(
    healthy: RealMailServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The twin of the above: Dovecot trusts a client on its own address and allows LOGIN
    # before STARTTLS; the validator must say so.
    code, out, _ = _run(_argv(healthy, smtp="smtp", reader="imap"), capsys)
    assert code == 1
    assert "FAIL check no AUTH before TLS" in out
    assert "LOGIN is allowed before STARTTLS" in out


# -- broken variants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ({"tls_cert": "untrusted"}, "unable to get local issuer certificate"),
        ({"tls_cert": "wrong_host"}, "mismatch, certificate is not valid for '127.0.0.1'"),
        ({"tls_cert": "expired"}, "certificate has expired"),
    ],
    indirect=["variant"],
    ids=["untrusted", "wrong_host", "expired"],
)
def test_validator_bad_certificate_fails_naming_it(
    variant: RealMailServer, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(_argv(variant), capsys)
    assert code == 1
    assert "FAIL at CONNECT: certificate verification failed" in out
    assert expected in out
    # The certificate is still described (from a diagnostic handshake, nothing sent).
    assert "server presented: subject" in out
    assert "NOT VERIFIED: diagnostic handshake" in out
    assert "smtp auth" not in out
    _secrets_absent(variant, out, err)


@pytest.mark.parametrize("variant", [{"tls_cert": "wrong_host"}], indirect=True)
def test_validator_wrong_host_reports_the_names_it_has(
    variant: RealMailServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run([*_argv(variant, reader="pop3s"), "--json"], capsys)
    assert code == 1
    (result,) = json.loads(out)["results"]
    (facts,) = result["tls"]
    assert facts["san"] == ["DNS:wrong.invalid"]
    assert facts["hostname_match"] is False and facts["hostname_verified"] is False


@pytest.mark.parametrize(
    "variant", [{"allow_plaintext_auth_on_starttls_port": True}], indirect=True
)
def test_validator_auth_before_starttls_fails(
    variant: RealMailServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(_argv(variant, smtp="smtp"), capsys)
    assert code == 1
    assert "FAIL check no AUTH before TLS" in out
    assert "AUTH is offered before STARTTLS on a STARTTLS port" in out
    assert "FAIL at VERIFY" in out


@pytest.mark.parametrize(
    "variant", [{"allow_plaintext_auth_on_starttls_port": True}], indirect=True
)
def test_validator_auth_before_starttls_is_not_seen_on_implicit_tls(
    variant: RealMailServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The twin: port 465 of the same server is fine.
    code, out, _ = _run(_argv(variant, smtp="smtps"), capsys)
    assert code == 0, out


@pytest.mark.parametrize("variant", [{"discard_mail": True}], indirect=True)
@pytest.mark.parametrize("reader", ["imaps", "pop3s"])
def test_validator_message_never_delivered_fails(
    variant: RealMailServer, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(_argv(variant, reader=reader, timeout="1"), capsys)
    assert code == 1
    assert "ok   smtp submit" in out
    assert "not found" in out and "by the deadline" in out


@pytest.mark.parametrize("variant", [{"duplicate_delivery": True}], indirect=True)
@pytest.mark.parametrize("reader", ["imaps", "pop3s"])
def test_validator_message_delivered_twice_fails(
    variant: RealMailServer, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(_argv(variant, reader=reader), capsys)
    assert code == 1
    assert "FAIL check exactly one copy" in out
    assert "the message arrived 2 times" in out


@pytest.mark.parametrize("variant", [{"alter_body": True}], indirect=True)
def test_validator_altered_message_fails_with_reports(
    variant: RealMailServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit, prom = tmp_path / "probe.xml", tmp_path / "probe.prom"
    argv = [*_argv(variant), "--junit-xml", str(junit), "--prometheus", str(prom)]
    code, out, _ = _run(argv, capsys)
    assert code == 1
    assert "FAIL check body unchanged" in out
    assert "the body changed in transit: line 1" in out
    assert "altered by relay" in out
    suite = ET.parse(junit).getroot()
    failures = {
        case.get("name"): case.find("failure")
        for case in suite.iter("testcase")
        if case.find("failure") is not None
    }
    assert "check body unchanged" in failures
    assert "finding altered" in failures
    assert int(suite.get("failures", "0")) == len(failures)
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    (success,) = families["roundtrip_probe_success"].samples
    assert success.value == 0
    checks = {s.labels["check"]: s.value for s in families["roundtrip_probe_check"].samples}
    assert checks["body unchanged"] == 0 and checks["exactly one copy"] == 1


# -- reports and repetition against the healthy server -----------------------------------------


def test_validator_reports_are_machine_readable(
    healthy: RealMailServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit, prom = tmp_path / "probe.xml", tmp_path / "probe.prom"
    argv = [*_argv(healthy), "--json", "--junit-xml", str(junit), "--prometheus", str(prom)]
    code, out, err = _run(argv, capsys)
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["ok"] is True
    (result,) = doc["results"]
    assert result["time_to_visible"] > 0
    assert {f["server"].rpartition(":")[2] for f in result["tls"]} == {
        str(healthy.ports["submissions"]),
        str(healthy.ports["imaps"]),
    }
    assert all(f["hostname_match"] and f["days_left"] > 30 for f in result["tls"])
    assert set(result["legacy_tls"].values()) == {"refused"}

    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    names = [case.get("name") for case in suite.iter("testcase")]
    assert {"smtp connect", "smtp tls", "smtp auth", "smtp submit", "imap visible"} <= set(names)
    assert "check exactly one copy" in names
    assert int(suite.get("tests", "0")) == len(names)

    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert families["roundtrip_probe_success"].samples[0].value == 1
    steps = {s.labels["step"] for s in families["roundtrip_probe_step_seconds"].samples}
    assert {"smtp_connect", "smtp_tls", "smtp_auth", "smtp_submit", "imap_fetch"} <= steps
    expiry = families["roundtrip_tls_cert_expiry_days"].samples
    assert len(expiry) == 2 and all(s.value > 30 for s in expiry)
    assert families["roundtrip_probe_duration_seconds"].type == "summary"
    _secrets_absent(healthy, out, err, junit.read_text(), prom.read_text())


def test_validator_count_reports_percentiles(
    healthy: RealMailServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run([*_argv(healthy, reader="pop3s"), "--count", "3"], capsys)
    assert code == 0, out + err
    progress = [line for line in err.splitlines() if line.startswith("roundtrip: run ")]
    assert [line.split(":")[1].strip() for line in progress] == ["run 1/3", "run 2/3", "run 3/3"]
    assert all("PASS" in line for line in progress)
    assert "summary: 3 runs, 0 failed" in out
    assert "p50" in out and "p95" in out and "max" in out
