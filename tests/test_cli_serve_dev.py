"""``roundtrip serve`` for local development: a line per stored message, catch-all, fixed
ports. Real subprocesses, real smtplib."""

from __future__ import annotations

import json
import os
import select
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from roundtrip.cli import main

TIMEOUT = 10.0


@contextmanager
def _serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "roundtrip", "serve", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready, "serve printed no ready line"
        yield proc, json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _stderr_lines(proc: subprocess.Popen[str], count: int, wait: float) -> list[str]:
    """Up to ``count`` stderr lines that arrive within ``wait`` seconds.

    Read from the file descriptor: a text wrapper would buffer lines that select() then
    no longer sees.
    """
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    data = b""
    deadline = time.monotonic() + wait
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").splitlines()[:count]


def _send(doc: dict[str, object], sender: str, password: str, to: list[str]) -> None:
    domains = doc["domains"]
    assert isinstance(domains, dict)
    host, _, port = domains[sender.rpartition("@")[2]]["submissions"].rpartition(":")
    context = ssl.create_default_context(cafile=str(doc["ca_file"]))
    with smtplib.SMTP_SSL(host, int(port), context=context, timeout=TIMEOUT) as smtp:
        smtp.login(sender, password)
        smtp.sendmail(sender, to, f"From: {sender}\r\nSubject: hello dev\r\n\r\nhi\r\n".encode())


def test_serve_prints_a_line_per_stored_message_with_catch_all() -> None:
    with _serve("--user", "alice@a.test:pw", "--catch-all", "a.test") as (proc, doc):
        _send(doc, "alice@a.test", "pw", ["anyone@a.test", "carol@gmail.test"])
        lines = sorted(_stderr_lines(proc, 2, TIMEOUT))
    assert len(lines) == 2, lines
    assert lines[0].startswith("roundtrip: delivered: alice@a.test -> anyone@a.test")
    assert "[catch-all: mailbox of alice@a.test] 'hello dev' (1 hops)" in lines[0]
    assert lines[1].startswith("roundtrip: delivered: alice@a.test -> carol@gmail.test")
    assert "[outbound capture: not sent]" in lines[1]


def test_serve_quiet_prints_nothing_and_unknown_users_are_refused() -> None:
    with _serve("--user", "alice@a.test:pw", "--quiet") as (proc, doc):
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            _send(doc, "alice@a.test", "pw", ["anyone@a.test"])
        _send(doc, "alice@a.test", "pw", ["alice@a.test"])
        assert _stderr_lines(proc, 1, 0.5) == []


def test_serve_bad_ports_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ports", "80"]) == 2
    assert "a base port must be from 1024 up" in capsys.readouterr().err
