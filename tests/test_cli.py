"""The command line: main(argv) in-process, plus subprocesses for serve and --help."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

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
    assert "FAIL at CONNECT: CONNECT: certificate verification failed" in out


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
        (["serve", "--ports", "lots"], "invalid choice"),
        (["serve", "--domain", "bad domain"], "not a valid mail domain"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_cli_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


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
