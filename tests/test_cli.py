"""The command line: main(argv) in-process, plus subprocesses for serve and --help."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roundtrip import CertificateAuthority, MailStack
from roundtrip.cli import main

TIMEOUT = 20


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _urls(stack: MailStack) -> tuple[str, str, str]:
    src, dst = stack.endpoints("example.com"), stack.endpoints("example.org")
    return (
        f"smtps://user%40example.com@127.0.0.1:{src.ports['submissions']}",
        f"imaps://user%40example.org@127.0.0.1:{dst.ports['imaps']}",
        f"pop3s://user%40example.org@127.0.0.1:{dst.ports['pop3s']}",
    )


@pytest.fixture
def passwords(stack: MailStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", stack.user("example.com").password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", stack.user("example.org").password)
    monkeypatch.setenv("ROUNDTRIP_POP3_PASSWORD", stack.user("example.org").password)


def test_cli_probe_embedded_default_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("roundtrip probe: embedded stack (example.com, example.org)")
    for step in (
        "smtp connect",
        "smtp tls",
        "smtp auth",
        "smtp submit",
        "imap visible",
        "imap fetch",
        "pop3 visible",
        "pop3 fetch",
    ):
        assert f"ok   {step}" in out
    # Per-hop timings inside the stack: 465 -> relay -> DNS MX -> the recipient's MX -> store.
    for hop in (
        "submissions accepted",
        "relay mx-lookup",
        "relay connected",
        "smtp accepted",
        "stored",
    ):
        assert re.search(rf"time +[0-9.]+ ms  {hop}", out), hop
    assert out.count("PASS") == 2


def test_cli_probe_json_is_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert [r["retrieve"].split(":")[0] for r in doc["results"]] == ["imaps", "pop3s"]
    assert all(r["checks"]["exactly one copy"] for r in doc["results"])


@pytest.mark.usefixtures("passwords")
@pytest.mark.parametrize("reader", ["--imap", "--pop3"])
def test_cli_probe_real_target_passes(
    stack: MailStack, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    smtp, imap, pop3 = _urls(stack)
    url = imap if reader == "--imap" else pop3
    assert main(["probe", "--smtp", smtp, reader, url, "--cafile", stack.ca_file]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    for secret in (stack.user("example.com").password, stack.user("example.org").password):
        assert secret not in out


@pytest.mark.usefixtures("passwords")
def test_cli_probe_untrusted_ca_exits_1_naming_tls(
    stack: MailStack, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    other = CertificateAuthority()
    try:
        smtp, imap, _ = _urls(stack)
        assert main(["probe", "--smtp", smtp, "--imap", imap, "--cafile", other.ca_file()]) == 1
    finally:
        other.cleanup()
    out = capsys.readouterr().out
    assert "FAIL at CONNECT: certificate verification failed" in out
    assert "CONNECT: CONNECT" not in out


@pytest.mark.usefixtures("passwords")
def test_cli_probe_wrong_password_exits_1(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", "not-the-password")
    smtp, imap, _ = _urls(stack)
    assert main(["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file]) == 1
    out = capsys.readouterr().out
    assert "FAIL at AUTH" in out and "535" in out
    assert "not-the-password" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "--smtp", "http://x"], "unknown scheme"),
        (["probe", "--smtp", "smtps://u@h"], "needs --imap URL or --pop3 URL"),
        (["probe", "--imap", "imaps://u@h"], "need --smtp"),
        (["probe", "--smtp", "smtps://u:pw@h", "--imap", "imaps://u@h"], "no password in the URL"),
        (["probe", "--timeout", "0"], "must be greater than 0"),
        (["probe", "--count", "0"], "--count must be at least 1"),
        (["probe", "--count", "two"], "invalid int value"),
        (["probe", "--interval", "-1"], "--interval must not be negative"),
        (["probe", "--junit-xml", "/nonexistent-dir/x.xml"], "the directory does not exist"),
        (["probe", "--prometheus", "/nonexistent-dir/x.prom"], "the directory does not exist"),
        (["serve", "--ports", "lots"], "choose one of ephemeral, standard, or a base port"),
        (["serve", "--domain", "bad domain"], "not a valid mail domain"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_cli_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_probe_missing_password_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ROUNDTRIP_SMTP_PASSWORD", raising=False)
    assert main(["probe", "--smtp", "smtps://u%40a.test@h", "--imap", "imaps://u@h"]) == 2
    assert "set ROUNDTRIP_SMTP_PASSWORD to the password of 'u@a.test'" in capsys.readouterr().err


@pytest.mark.usefixtures("passwords")
def test_cli_probe_unreadable_cafile_is_a_usage_error(
    stack: MailStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    smtp, imap, _ = _urls(stack)
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate")
    assert main(["probe", "--smtp", smtp, "--imap", imap, "--cafile", str(bad)]) == 2
    assert "cannot load CA certificates" in capsys.readouterr().err


def test_cli_probe_count_shows_progress_and_percentiles(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["probe", "--count", "2", "--interval", "0.01"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("roundtrip: run")]
    assert len(progress) == 2 and progress[1].startswith("roundtrip: run 2/2: imaps PASS")
    assert "pop3s PASS" in progress[0]
    # Two runs of each retrieval path, with statistics per path: IMAP and POP3 never mix.
    assert "summary: 2 runs of each of 2 paths (4 round trips), 0 failed" in captured.out
    summary = captured.out.split("\nsummary: ", 1)[1].splitlines()
    headers = [line for line in summary if "->" in line]
    assert [h.split("->")[1].split(":")[0].strip() for h in headers] == ["imaps", "pop3s"]
    assert all(h.endswith(": 2 runs, 0 failed") for h in headers)
    stats = [line for line in summary if "p50" in line]
    assert len(stats) == 4 and all("p95" in line and "max" in line for line in stats)
    assert all(line.endswith("(2 runs)") for line in stats)


def test_cli_probe_count_json_is_still_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--count", "2", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["schema_version"] == 2
    assert doc["summary"]["runs"] == 4 and doc["summary"]["failed"] == 0
    assert doc["summary"]["total_seconds"]["p95"] <= doc["summary"]["total_seconds"]["max"]
    assert doc["summary"]["runs_per_path"] == 2
    paths = doc["summary"]["paths"]
    assert [p["protocol"] for p in paths] == ["imap", "pop3"]
    for path in paths:
        assert path["runs"] == 2 and path["failed"] == 0
        assert path["total_seconds"]["count"] == 2
        assert path["total_seconds"]["p50"] <= path["total_seconds"]["max"]
    assert "roundtrip: run" not in captured.err


def test_cli_probe_writes_junit_and_prometheus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit, prom = tmp_path / "r.xml", tmp_path / "r.prom"
    assert main(["probe", "--junit-xml", str(junit), "--prometheus", str(prom)]) == 0
    capsys.readouterr()
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests", "0")) > 10
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    success = families["roundtrip_probe_success"].samples
    assert [s.labels["retrieve"].split(":")[0] for s in success] == ["imaps", "pop3s"]
    assert all(s.value == 1 for s in success)
    # POP3 reconnects while polling: still no series twice, no JUnit case name twice.
    series = [
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in families.values()
        for sample in family.samples
    ]
    assert len(series) == len(set(series))
    cases = [(c.get("classname"), c.get("name")) for c in suite.iter("testcase")]
    assert len(cases) == len(set(cases))


@pytest.mark.usefixtures("passwords")
def test_cli_probe_failing_runs_show_in_every_report(
    stack: MailStack,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", "not-the-password")
    smtp, imap, _ = _urls(stack)
    junit, prom = tmp_path / "r.xml", tmp_path / "r.prom"
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file, "--count", "2"]
    assert main([*argv, "--junit-xml", str(junit), "--prometheus", str(prom)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("FAIL at AUTH") == 2
    assert "summary: 2 runs, 2 failed" in captured.out
    suite = ET.parse(junit).getroot()
    messages = [f.get("message", "") for f in suite.iter("failure")]
    assert len(messages) == 2 and all("refused the credentials" in m for m in messages)
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert families["roundtrip_probe_success"].samples[0].value == 0
    assert families["roundtrip_probe_failed_runs"].samples[0].value == 2
    for text in (captured.out, captured.err, junit.read_text(), prom.read_text()):
        assert "not-the-password" not in text


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no line from {proc.args} within {timeout} s")
    return proc.stdout.readline()


def test_cli_serve_json_prints_one_line_then_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roundtrip",
            "serve",
            "--json",
            "--domain",
            "a.test",
            "--domain",
            "b.test",
            "--user",
            "alice@a.test:pw-a",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        doc = json.loads(_read_line(proc, TIMEOUT))
        assert set(doc) >= {"ca_file", "domains", "users"}
        assert set(doc["domains"]) == {"a.test", "b.test"}
        for services in doc["domains"].values():
            assert set(services) >= {
                "smtp",
                "submissions",
                "submission",
                "pop3",
                "pop3s",
                "imap",
                "imaps",
            }
        assert {"address": "alice@a.test", "password": "pw-a"} in doc["users"]
        assert os.path.exists(doc["ca_file"])
        host, _, port = doc["domains"]["a.test"]["submissions"].rpartition(":")
        import smtplib
        import ssl

        context = ssl.create_default_context(cafile=doc["ca_file"])
        with smtplib.SMTP_SSL(host, int(port), context=context, timeout=TIMEOUT) as smtp:
            smtp.login("alice@a.test", "pw-a")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "warning" not in err


def test_cli_python_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "roundtrip", "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0
    assert "serve" in result.stdout and "probe" in result.stdout


def test_cli_serve_maildir_keeps_mail_across_restarts(tmp_path: object) -> None:
    import pathlib
    import smtplib
    import ssl

    root = pathlib.Path(str(tmp_path)) / "mail"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "roundtrip",
        "serve",
        "--json",
        "--domain",
        "a.test",
        "--user",
        "alice@a.test:pw-a",
        "--maildir",
        str(root),
    ]
    for round_ in range(2):
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            doc = json.loads(_read_line(proc, TIMEOUT))
            if round_ == 0:
                host, _, port = doc["domains"]["a.test"]["submissions"].rpartition(":")
                context = ssl.create_default_context(cafile=doc["ca_file"])
                with smtplib.SMTP_SSL(host, int(port), context=context, timeout=TIMEOUT) as smtp:
                    smtp.login("alice@a.test", "pw-a")
                    smtp.sendmail(
                        "alice@a.test", ["alice@a.test"], b"Subject: kept\r\n\r\ndurable\r\n"
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0
    files = [p for p in (root / "alice@a.test").rglob("*") if p.parent.name in ("new", "cur")]
    assert len(files) == 1
    stored = files[0].read_bytes()
    assert b"Subject: kept\r\n" in stored and stored.endswith(b"\r\n\r\ndurable\r\n")


# -- messages, options and help ----------------------------------------------------------------


def test_cli_probe_far_future_certificate_shows_a_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    tls = [
        line for line in out.splitlines() if line.strip().startswith("tls ") and "subject" in line
    ]
    assert tls and all(re.search(r"expires \d{4}-\d\d-\d\d \(in \d+ years\)", t) for t in tls)
    assert not re.search(r"\d{4,} days to expiry", out)


def test_cli_probe_pop3_delete_step_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ok   pop3 delete +[0-9.]+ ms", out)
    assert re.search(r"ok   imap delete +[0-9.]+ ms", out)


def test_cli_probe_keep_shows_no_delete_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--keep"]) == 0
    out = capsys.readouterr().out
    assert "pop3 delete" not in out and "imap delete" not in out


@pytest.mark.usefixtures("passwords")
def test_cli_probe_imap_and_pop3_together(
    stack: MailStack, capsys: pytest.CaptureFixture[str]
) -> None:
    smtp, imap, pop3 = _urls(stack)
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--pop3", pop3, "--cafile", stack.ca_file]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["retrieve"] for r in doc["results"]] == [imap, pop3]
    assert all(r["ok"] for r in doc["results"])
    assert doc["target"] == f"{smtp} -> {imap}, {pop3}"


@pytest.mark.usefixtures("passwords")
def test_cli_probe_imap_and_pop3_each_report_their_failure(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDTRIP_POP3_PASSWORD", "not-the-password")
    smtp, imap, pop3 = _urls(stack)
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--pop3", pop3, "--cafile", stack.ca_file]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.count("  PASS") == 1 and "FAIL at POP3 LOGIN" in out
    assert "not-the-password" not in out


@pytest.mark.usefixtures("passwords")
def test_cli_probe_imap_refusal_is_decoded(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", "not-the-password")
    smtp, imap, _ = _urls(stack)
    assert main(["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file]) == 1
    out = capsys.readouterr().out
    assert "FAIL at IMAP LOGIN: 127.0.0.1:" in out
    assert "answered '[AUTHENTICATIONFAILED] Authentication failed.'" in out
    assert "b'" not in out


@pytest.mark.usefixtures("passwords")
def test_cli_probe_smtp_at_imaps_port_names_the_greeting(
    stack: MailStack, capsys: pytest.CaptureFixture[str]
) -> None:
    _, imap, _ = _urls(stack)
    port = stack.endpoints("example.org").ports["imaps"]
    smtp = f"smtps://user%40example.com@127.0.0.1:{port}"
    assert main(["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file]) == 1
    out = capsys.readouterr().out
    assert f"FAIL at CONNECT: expected a 220 greeting from 127.0.0.1:{port}, got '* OK" in out
    assert "does not offer AUTH" not in out


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake (the kernel's backlog) and never says a word."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.usefixtures("passwords")
def test_cli_probe_silent_server_names_step_and_timeout(
    stack: MailStack, silent_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    _, imap, _ = _urls(stack)
    smtp = f"smtps://user%40example.com@127.0.0.1:{silent_port}"
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file]
    assert main([*argv, "--timeout", "0.3"]) == 1
    out = capsys.readouterr().out
    assert (
        f"FAIL at CONNECT: 127.0.0.1:{silent_port} did not answer within 0.3 s "
        "(waiting for the TLS handshake)"
    ) in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "--json", "--count", "0"], "--count must be at least 1"),
        (["probe", "--json", "--count", "two"], "invalid int value"),
        (["probe", "--js", "--smtp", "http://x"], "unknown scheme"),
        (["serve", "--json", "--ports", "lots"], "or a base port"),
    ],
)
def test_cli_json_usage_error_is_a_json_document(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc == {
        "schema_version": 2,
        "ok": False,
        "error": doc["error"],
        "exit_code": 2,
    }
    assert message in doc["error"] and message in captured.err


def test_cli_usage_error_without_json_prints_nothing_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["probe", "--count", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--count must be at least 1" in captured.err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"roundtrip {version('roundtrip')}"


def test_cli_serve_help_describes_ports_users_maildir_and_stopping(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    description = text.split("options:")[0]
    for words in ("465", "587", "993", "995", "--user", "stable", "--maildir", "Ctrl-C", "SIGTERM"):
        assert words in description, words
    assert "0.0.0.0" in text.split("--host")[-1]


def test_cli_serve_non_loopback_host_warns(capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is not on this machine: the bind fails after the
    # warning, so the test never listens beyond loopback.
    code = main(["serve", "--host", "192.0.2.1"])
    err = capsys.readouterr().err
    assert "warning: --host 192.0.2.1 is not a loopback address" in err
    assert code == 1


# Session transcripts (-v/--verbose, and the failing connection's without it)


def _secret_forms(stack: MailStack) -> list[str]:
    """Each password and the base64 forms AUTH PLAIN and AUTH LOGIN send it in."""
    import base64

    forms = []
    for domain in ("example.com", "example.org"):
        account = stack.user(domain)
        for raw in (
            account.password,
            f"\0{account.address}\0{account.password}",
            f"{account.address}\0{account.address}\0{account.password}",
        ):
            forms.append(base64.b64encode(raw.encode()).decode())
        forms.append(account.password)
    return forms


def _mask(text: str) -> str:
    """Numbers (with the padding before them), tokens, queue ids and DKIM signature
    prefixes (``header.b``) masked: they differ between runs."""
    text = re.sub(r"header\.b=[A-Za-z0-9+/]+", "header.b=B", text)
    return re.sub(r" *\b[0-9A-Fa-f]*\d[0-9A-Fa-f.]*\b", " N", text)


@pytest.mark.usefixtures("passwords")
def test_cli_probe_verbose_prints_redacted_transcripts(
    stack: MailStack, capsys: pytest.CaptureFixture[str]
) -> None:
    smtp, imap, pop3 = _urls(stack)
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--pop3", pop3, "--cafile", stack.ca_file]
    assert main([*argv, "-v"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "transcript: smtp 127.0.0.1:" in out
    assert re.search(r"\d+\.\d ms <- 220 mail\.example\.com", out)
    assert re.search(r"\d+\.\d ms == TLS TLSv1\.\d \S+; peer certificate subject CN=", out)
    for line in (
        "-> ehlo roundtrip.probe",
        "-> auth plain ****",
        "-> mail from:<user@example.com>",  # smtplib: "FROM:" up to 3.12, "from:" in 3.13
        "-> rcpt to:<user@example.org>",
        "-> data",
        " login user@example.org ****",
        " uid fetch ",
        "-> user user@example.org",
        "-> pass ****",
    ):
        assert line in out.lower(), line
    assert re.search(r"-> \[\d+ bytes, sha256 [0-9a-f]{16}\]", out)
    assert re.search(r"<- \[\d+ bytes, sha256 [0-9a-f]{16}\]", out)
    assert "transcript of the failing connection" not in out
    for secret in _secret_forms(stack):
        assert secret not in captured.out and secret not in captured.err


@pytest.mark.usefixtures("passwords")
def test_cli_probe_passing_without_verbose_prints_no_transcript(
    stack: MailStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """The twin: without -v a passing probe's report is the step report alone, the same
    lines as with -v minus the transcripts (numbers masked)."""
    smtp, imap, _ = _urls(stack)
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert "transcript" not in plain and " <- " not in plain and " -> A" not in plain
    assert main([*argv, "--verbose"]) == 0
    verbose = capsys.readouterr().out.splitlines()
    transcript = re.compile(r"    transcript: |    +\d+\.\d ms (<-|->|==) ")
    kept = [line for line in verbose if not transcript.match(line)]
    assert len(kept) < len(verbose)
    assert _mask("\n".join(kept)) == _mask(plain.rstrip("\n"))


@pytest.mark.usefixtures("passwords")
@pytest.mark.parametrize(
    ("variable", "protocol", "refusal"),
    [
        ("ROUNDTRIP_SMTP_PASSWORD", "smtp", r"<- 535 5\.7\.8 Authentication credentials invalid"),
        ("ROUNDTRIP_IMAP_PASSWORD", "imap", r"<- \S+ NO \[AUTHENTICATIONFAILED\]"),
    ],
)
def test_cli_probe_failure_prints_the_failing_connections_transcript(
    stack: MailStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    protocol: str,
    refusal: str,
) -> None:
    monkeypatch.setenv(variable, "not-the-password")
    smtp, imap, _ = _urls(stack)
    assert main(["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert out.count("transcript of the failing connection: ") == 1
    assert f"transcript of the failing connection: {protocol} 127.0.0.1:" in out
    assert "    transcript: " not in out  # only the failing connection, without -v
    assert re.search(refusal, out), out
    for secret in ["not-the-password", *_secret_forms(stack)]:
        assert secret not in out and secret not in captured.err
    import base64

    for raw in ("not-the-password", "\0user@example.com\0not-the-password"):
        assert base64.b64encode(raw.encode()).decode() not in out


@pytest.mark.usefixtures("passwords")
def test_cli_probe_json_carries_redacted_transcripts(
    stack: MailStack, capsys: pytest.CaptureFixture[str]
) -> None:
    smtp, _, pop3 = _urls(stack)
    argv = ["probe", "--smtp", smtp, "--pop3", pop3, "--cafile", stack.ca_file, "--json"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    doc = json.loads(text)
    (result,) = doc["results"]
    protocols = [t["protocol"] for t in result["transcripts"]]
    assert protocols[0] == "smtp" and set(protocols) == {"smtp", "pop3"}
    smtp_lines = result["transcripts"][0]["lines"]
    assert {"t", "dir", "text"} == set(smtp_lines[0])
    assert result["transcripts"][0]["peer"].startswith("127.0.0.1:")
    assert {"dir": "->", "text": "AUTH PLAIN ****"} in [
        {"dir": line["dir"], "text": line["text"]} for line in smtp_lines
    ]
    texts = [line["text"] for t in result["transcripts"] for line in t["lines"]]
    assert "PASS ****" in texts
    assert all(line["t"] >= 0 for t in result["transcripts"] for line in t["lines"])
    for secret in _secret_forms(stack):
        assert secret not in text


def test_cli_probe_count_keeps_transcripts_of_the_latest_passing_run_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["probe", "--json", "--count", "3"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [bool(r["transcripts"]) for r in results] == [False] * 4 + [True] * 2


@pytest.mark.usefixtures("passwords")
def test_cli_probe_count_keeps_transcripts_of_every_failed_run(
    stack: MailStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", "not-the-password")
    smtp, imap, _ = _urls(stack)
    argv = ["probe", "--smtp", smtp, "--imap", imap, "--cafile", stack.ca_file, "--json"]
    assert main([*argv, "--count", "3"]) == 1
    results = json.loads(capsys.readouterr().out)["results"]
    assert [[t["failed"] for t in r["transcripts"]] for r in results] == [[False, True]] * 3
