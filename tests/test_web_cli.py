"""``roundtrip serve --web`` and the plugin's ``--roundtrip-web``: real subprocesses, real
sockets, real smtplib."""

from __future__ import annotations

import http.client as http_client
import json
import os
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the web view needs aiohttp (pip install roundtrip[web])")

from roundtrip import cli
from roundtrip.cli import main

TIMEOUT = 10.0


@contextmanager
def serve(*args: str) -> Iterator[dict[str, Any]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "roundtrip", "serve", "--json", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready, "serve printed no ready line"
        yield json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0


def http(method: str, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {} if token is None else {"X-Roundtrip-Token": token}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def send(doc: dict[str, Any], sender: str, password: str, to: str) -> None:
    host, _, port = doc["domains"]["a.test"]["submissions"].rpartition(":")
    context = ssl.create_default_context(cafile=doc["ca_file"])
    with smtplib.SMTP_SSL(host, int(port), context=context, timeout=TIMEOUT) as smtp:
        smtp.login(sender, password)
        smtp.sendmail(sender, [to], f"From: {sender}\r\nSubject: via web\r\n\r\nhi\r\n".encode())


def test_web_cli_serve_json_gains_web_and_token_keys() -> None:
    with serve("--user", "alice@a.test:pw") as plain:
        keys = set(plain)
    assert "web" not in plain and "web_token" not in plain
    with serve("--user", "alice@a.test:pw", "--web") as doc:
        assert set(doc) == keys | {"web", "web_token"}
        assert doc["web"].startswith("http://127.0.0.1:") and doc["web"].endswith("/")
        port = int(doc["web"].rstrip("/").rpartition(":")[2])
        events = http_client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            events.request("GET", "/api/events")
            stream = events.getresponse()
            send(doc, "alice@a.test", "pw", "alice@a.test")
            while b'"kind":"added"' not in (line := stream.readline()):
                assert line, "the events stream ended before the message was stored"
        finally:
            events.close()
        query = urllib.parse.urlencode({"user": "alice@a.test"})
        status, page = http("GET", f"{doc['web']}api/messages?{query}")
        assert (status, [m["subject"] for m in page["messages"]]) == (200, ["via web"])
        assert http("DELETE", f"{doc['web']}api/messages?{query}")[0] == 403
        assert http("DELETE", f"{doc['web']}api/messages?{query}", doc["web_token"]) == (
            200,
            {"removed": 1},
        )


def _ready_text(*args: str, until: bytes) -> str:
    """What ``serve`` without --json prints, up to the line that starts with ``until``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "roundtrip", "serve", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    text = b""
    try:
        lines = [b""]
        while not any(x.startswith(until) and x.endswith(b"\n") for x in lines):
            ready, _, _ = select.select([fd], [], [], TIMEOUT)
            assert ready, f"serve printed no ready text: {text!r}"
            chunk = os.read(fd, 65536)
            assert chunk, f"serve ended: {text!r}"
            text += chunk
            lines = text.splitlines(keepends=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
        proc.stdout.close()
    return text.decode()


def test_web_cli_serve_prints_the_url_with_its_token() -> None:
    text = _ready_text("--web", until=b"  web ")
    line = next(x for x in text.splitlines() if x.startswith("  web "))
    url = line.split()[1]
    assert url.startswith("http://127.0.0.1:") and "/#token=" in url


def test_web_cli_serve_fails_when_the_web_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "roundtrip", "serve", "--quiet", "--web", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"web view: cannot bind 127.0.0.1:{port}" in proc.stderr
    assert "  web " not in proc.stdout


def test_web_cli_bad_web_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--web", "host:port"]) == 2
    assert "--web 'host:port': the port must be a number" in capsys.readouterr().err


def test_web_cli_non_loopback_address_warns(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._web_address("0.0.0.0:8025") == ("0.0.0.0", 8025)
    assert "warning: --web 0.0.0.0 is not a loopback address" in capsys.readouterr().err


def test_web_cli_loopback_address_does_not_warn(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._web_address("") == ("127.0.0.1", 0)
    assert cli._web_address("[::1]:0") == ("::1", 0)
    assert capsys.readouterr().err == ""


INNER_TEST = """
import json
import urllib.request

from roundtrip.pytest_plugin import _WEB_VIEW


def test_inner(mailstack, pytestconfig):
    view = pytestconfig.stash[_WEB_VIEW]
    assert view.stack is mailstack
    user = mailstack.user().address
    mailstack.store.deliver(user, b"Subject: watched\\r\\n\\r\\nx\\r\\n")
    url = view.url + "api/messages?user=" + user
    with urllib.request.urlopen(url, timeout=10) as response:
        page = json.load(response)
    assert [m["subject"] for m in page["messages"]] == ["watched"]
"""


def test_web_plugin_option_serves_the_session_stack(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TEST)
    result = pytester.runpytest_subprocess("--roundtrip-web", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["roundtrip web view: http://127.0.0.1:*/#token=*"])
    port = int(result.stdout.str().split("roundtrip web view: http://127.0.0.1:")[1].split("/")[0])
    with pytest.raises(OSError):  # stopped with the session
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=TIMEOUT)


def test_web_plugin_without_the_option_starts_no_view(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
import sys

def test_inner(mailstack):
    assert "roundtrip.web" not in sys.modules and "aiohttp" not in sys.modules
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "roundtrip web view" not in result.stdout.str()


def test_web_plugin_bad_address_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner="def test_inner():\n    pass\n")
    result = pytester.runpytest_subprocess("--roundtrip-web", "nohost:port")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--web 'nohost:port': the port must be a number*"])
