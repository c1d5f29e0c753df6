"""``roundtrip exporter``: /probe and /metrics over real sockets against a running MailStack,
its configuration errors, and where passwords must never appear."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roundtrip import MailStack
from roundtrip.cli import main
from roundtrip.errors import ConfigError
from roundtrip.exporter import Exporter, load_config, probe_metrics
from roundtrip.probes.roundtrip import Finding, ProbeResult

TIMEOUT = 20
LISTEN_ANY = ("--listen", "127.0.0.1:0")


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


class HangingServer:
    """A listener that accepts connections and never says a word (a hung mail server)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self.sock.close()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released: connections are refused)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def write_config(
    tmp_path: Path,
    stack: MailStack,
    *,
    extra: str = "",
    smtp_port: int | None = None,
    name: str = "stack",
) -> Path:
    """A configuration with target ``name`` (the stack) and ``broken`` (a closed port), the
    passwords in files beside it."""
    src, dst = stack.endpoints("example.com"), stack.endpoints("example.org")
    (tmp_path / "smtp.pw").write_text(stack.user("example.com").password + "\n")
    (tmp_path / "imap.pw").write_text(stack.user("example.org").password + "\n")
    port = smtp_port if smtp_port is not None else src.ports["submissions"]
    config = tmp_path / "exporter.toml"
    config.write_text(
        f"""\
[targets.{name}]
smtp = "smtps://user%40example.com@127.0.0.1:{port}"
imap = "imaps://user%40example.org@127.0.0.1:{dst.ports["imaps"]}"
cafile = "{stack.ca_file}"
smtp_password_file = "smtp.pw"
imap_password_file = "imap.pw"
timeout = 10

[targets.broken]
smtp = "smtps://user%40example.com@127.0.0.1:{_closed_port()}"
imap = "imaps://user%40example.org@127.0.0.1:{dst.ports["imaps"]}"
cafile = "{stack.ca_file}"
smtp_password_file = "smtp.pw"
imap_password_file = "imap.pw"
timeout = 5
{extra}"""
    )
    return config


@pytest.fixture
def exporter(tmp_path: Path, stack: MailStack) -> Iterator[Exporter]:
    with Exporter(load_config(str(write_config(tmp_path, stack))), listen="127.0.0.1:0") as ex:
        yield ex


def get(exporter: Exporter, path: str, *, scrape_timeout: float | None = None) -> tuple[int, str]:
    host, port = exporter.address
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if scrape_timeout is not None:
        request.add_header("X-Prometheus-Scrape-Timeout-Seconds", str(scrape_timeout))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by Prometheus' own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def test_exporter_probe_of_the_stack_succeeds(exporter: Exporter) -> None:
    status, text = get(exporter, "/probe?target=stack")
    assert status == 200
    assert value(text, "probe_success") == 1
    assert value(text, "probe_in_progress") == 0
    duration = value(text, "probe_duration_seconds")
    assert duration is not None and 0 < duration < TIMEOUT
    steps = {dict(k[1]).get("step") for k in samples(text) if k[0] == "probe_step_duration_seconds"}
    assert {"smtp_auth", "smtp_submit", "imap_login", "imap_fetch"} <= steps
    assert (value(text, "probe_time_to_visible_seconds") or -1) >= 0
    versions = [dict(k[1]) for k in samples(text) if k[0] == "probe_tls_version_info"]
    assert versions and all(v["version"].startswith("TLSv1.") for v in versions)
    assert (value(text, "probe_ssl_earliest_cert_expiry") or 0) > time.time()
    assert value(text, "probe_check", check="exactly one copy") == 1


def test_exporter_probe_of_a_broken_target_fails(exporter: Exporter) -> None:
    status, text = get(exporter, "/probe?target=broken")
    assert status == 200
    assert value(text, "probe_success") == 0
    failed = [dict(k[1]) for k in samples(text) if k[0] == "probe_failed_step_info"]
    assert failed == [{"step": "CONNECT"}]


def test_exporter_own_metrics_count_scrapes_and_failures(exporter: Exporter) -> None:
    get(exporter, "/probe?target=stack")
    get(exporter, "/probe?target=broken")
    get(exporter, "/probe?target=nosuch")
    status, text = get(exporter, "/metrics")
    assert status == 200
    assert value(text, "roundtrip_exporter_scrapes_total", target="stack") == 1
    assert value(text, "roundtrip_exporter_scrapes_total", target="broken") == 1
    assert value(text, "roundtrip_exporter_probe_failures_total", target="stack") == 0
    assert value(text, "roundtrip_exporter_probe_failures_total", target="broken") == 1
    assert value(text, "roundtrip_exporter_probe_duration_seconds_count", target="stack") == 1
    assert value(text, "roundtrip_exporter_unknown_target_scrapes_total") == 1
    # An unknown name never becomes a label value (a scraper could mint series at will).
    assert "nosuch" not in text


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/probe?target=nosuch", "unknown target 'nosuch'; configured targets: stack, broken"),
        ("/probe", "give exactly one target parameter"),
        ("/probe?target=stack&target=broken", "give exactly one target parameter"),
    ],
)
def test_exporter_bad_target_is_http_400(exporter: Exporter, path: str, message: str) -> None:
    status, text = get(exporter, path)
    assert status == 400
    assert message in text


def test_exporter_unknown_path_is_404(exporter: Exporter) -> None:
    assert get(exporter, "/nothing-here")[0] == 404


def test_exporter_hanging_target_is_cut_at_the_scrape_timeout(
    tmp_path: Path, stack: MailStack
) -> None:
    hang = HangingServer()
    try:
        config = write_config(tmp_path, stack, smtp_port=hang.port, name="hang")
        with Exporter(load_config(str(config)), listen="127.0.0.1:0") as ex:
            started = time.monotonic()
            status, text = get(ex, "/probe?target=hang", scrape_timeout=2.0)
            elapsed = time.monotonic() - started
    finally:
        hang.close()
    assert status == 200
    assert value(text, "probe_success") == 0
    # Answered within Prometheus' 2 s, though the target's own timeout is 10 s.
    assert elapsed < 2.0


def test_exporter_scrape_timeout_leaves_a_healthy_target_passing(exporter: Exporter) -> None:
    status, text = get(exporter, "/probe?target=stack", scrape_timeout=5.0)
    assert status == 200 and value(text, "probe_success") == 1
    assert value(text, "probe_timed_out") == 0


def test_exporter_one_probe_in_flight_per_target(tmp_path: Path, stack: MailStack) -> None:
    hang = HangingServer()
    try:
        config = write_config(tmp_path, stack, smtp_port=hang.port, name="hang")
        with Exporter(load_config(str(config)), listen="127.0.0.1:0") as ex:
            first: list[tuple[int, str]] = []
            thread = threading.Thread(
                target=lambda: first.append(get(ex, "/probe?target=hang", scrape_timeout=3.0))
            )
            thread.start()
            assert hang.accepted.wait(TIMEOUT), "the first probe never connected"
            status, text = get(ex, "/probe?target=hang", scrape_timeout=1.0)
            thread.join(TIMEOUT)
            # A scrape of another target is not held up by it.
            other_status, other = get(ex, "/probe?target=broken", scrape_timeout=5.0)
            own = get(ex, "/metrics")[1]
    finally:
        hang.close()
    assert status == 200
    assert value(text, "probe_in_progress") == 1
    assert value(text, "probe_success") == 0
    assert first and value(first[0][1], "probe_in_progress") == 0
    assert other_status == 200 and value(other, "probe_in_progress") == 0
    assert value(own, "roundtrip_exporter_probe_in_progress_total", target="hang") == 1
    assert hang.accepted.is_set() and len(hang._conns) == 1, "two probes ran at once"


def test_exporter_password_appears_nowhere(
    tmp_path: Path, stack: MailStack, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = (stack.user("example.com").password, stack.user("example.org").password)
    config = write_config(
        tmp_path,
        stack,
        # A target whose IMAP password is wrong: the failure is logged with the server's reply.
        extra=f"""
[targets.wrongpw]
smtp = "smtps://user%40example.com@127.0.0.1:{stack.endpoints("example.com").ports["submissions"]}"
imap = "imaps://user%40example.org@127.0.0.1:{stack.endpoints("example.org").ports["imaps"]}"
cafile = "{stack.ca_file}"
smtp_password_file = "smtp.pw"
imap_password_file = "smtp.pw"
timeout = 5
""",
    )
    caplog.set_level(logging.DEBUG, logger="roundtrip.exporter")
    with Exporter(load_config(str(config)), listen="127.0.0.1:0") as ex:
        bodies = [get(ex, f"/probe?target={name}")[1] for name in ("stack", "broken", "wrongpw")]
        bodies.append(get(ex, "/metrics")[1])
        bodies.append(get(ex, "/")[1])
        assert value(bodies[0], "probe_success") == 1
        assert value(bodies[2], "probe_success") == 0
    assert "FAIL at" in caplog.text  # the twin: the log does say what failed
    for secret in secrets:
        assert secret not in caplog.text
        assert secret not in repr(load_config(str(config)))
        for body in bodies:
            assert secret not in body


def test_exporter_command_serves_until_sigterm_and_logs_no_password(
    tmp_path: Path, stack: MailStack
) -> None:
    config = write_config(tmp_path, stack)
    proc = subprocess.Popen(
        [sys.executable, "-m", "roundtrip", "exporter", "--config", str(config), *LISTEN_ANY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()  # the process prints this line once it listens
        assert ready.startswith("roundtrip exporter: listening on http://127.0.0.1:"), ready
        base = ready.split()[4].rstrip("/")
        for name in ("stack", "broken"):
            with urllib.request.urlopen(f"{base}/probe?target={name}", timeout=TIMEOUT) as r:
                text = r.read().decode()
            assert value(text, "probe_success") == (1 if name == "stack" else 0)
        proc.terminate()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert "target stack: PASS" in err and "target broken: FAIL at CONNECT" in err
    for secret in (stack.user("example.com").password, stack.user("example.org").password):
        assert secret not in err + out


# -- configuration errors: exit 2 with the file and line -------------------------------------

_GOOD = """\
[targets.mx1]
smtp = "smtps://alice%40example.com@mail.example.com"
imap = "imaps://alice%40example.com@mail.example.com"
password_env = "EXPORTER_TEST_PW"
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_GOOD + 'colour = "blue"\n', "exporter.toml:5: targets.mx1: unknown key 'colour'"),
        (_GOOD.replace("EXPORTER_TEST_PW", "EXPORTER_TEST_UNSET"), "exporter.toml:4:"),
        (
            _GOOD.replace("smtps://alice", "smtps//alice"),
            "exporter.toml:2: smtp: 'smtps//alice%40example.com@mail.example.com': unknown scheme",
        ),
        (
            _GOOD.replace('@mail.example.com"\nimap', ':99999"\nimap'),
            "exporter.toml:2: smtp:",
        ),
        (
            _GOOD.replace("alice%40example.com@mail", "alice:hunter2@mail", 1),
            "exporter.toml:2: smtp: put no password in the URL",
        ),
        (_GOOD + "timeout = -1\n", "exporter.toml:5: timeout must be a number"),
        (_GOOD + 'pop3 = "pop3s://a@b"\n', "exporter.toml:5: targets.mx1: give exactly one of"),
        (
            _GOOD + "[targets.mx2\n",
            "not valid TOML: Expected ']' at the end of a table declaration (at line 5",
        ),
        ("[other]\nx = 1\n", "exporter.toml:1: unknown key 'other'"),
        ("", "no targets"),
        (
            _GOOD.replace('password_env = "EXPORTER_TEST_PW"', 'password_file = "missing.pw"'),
            "exporter.toml:4: password_file missing.pw: cannot read",
        ),
    ],
)
def test_exporter_bad_config_exits_2_naming_the_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    monkeypatch.setenv("EXPORTER_TEST_PW", "s3cret-exporter")
    monkeypatch.delenv("EXPORTER_TEST_UNSET", raising=False)
    config = tmp_path / "exporter.toml"
    config.write_text(text)
    assert main(["exporter", "--config", str(config), "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "s3cret-exporter" not in err and "hunter2" not in err


def test_exporter_missing_password_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXPORTER_TEST_UNSET", raising=False)
    config = tmp_path / "exporter.toml"
    config.write_text(_GOOD.replace("EXPORTER_TEST_PW", "EXPORTER_TEST_UNSET"))
    with pytest.raises(ConfigError, match="EXPORTER_TEST_UNSET is not set"):
        load_config(str(config))


def test_exporter_good_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_TEST_PW", "s3cret-exporter")
    config = tmp_path / "exporter.toml"
    config.write_text(_GOOD + "timeout = 12.5\ncheck_legacy_tls = false\n")
    (target,) = load_config(str(config)).values()
    assert target.smtp.password == target.reader.password == "s3cret-exporter"
    assert target.smtp.port == 465 and target.reader.port == 993
    assert (target.mail_from, target.rcpt_to) == ("alice@example.com", "alice@example.com")
    assert target.timeout == 12.5 and target.check_legacy_tls is False
    assert "s3cret-exporter" not in repr(target)


@pytest.mark.parametrize("listen", ["9465", "127.0.0.1:", "127.0.0.1:70000", ":1"])
def test_exporter_bad_listen_exits_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    listen: str,
) -> None:
    monkeypatch.setenv("EXPORTER_TEST_PW", "s3cret-exporter")
    config = tmp_path / "exporter.toml"
    config.write_text(_GOOD)
    assert main(["exporter", "--config", str(config), "--listen", listen]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_exporter_busy_address_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXPORTER_TEST_PW", "s3cret-exporter")
    config = tmp_path / "exporter.toml"
    config.write_text(_GOOD)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["exporter", "--config", str(config), "--listen", f"127.0.0.1:{port}"]) == 1
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_exporter_findings_by_code_and_severity() -> None:
    result = ProbeResult(
        ok=False,
        smtp="smtps://a@h:465",
        retrieve="imaps://a@h:993",
        findings=[
            Finding("plaintext-hop", "warn", "hop 1 without TLS"),
            Finding("plaintext-hop", "warn", "hop 2 without TLS"),
            Finding("legacy-tls", "fail", "TLSv1 accepted"),
        ],
        error="verification failed",
        error_step="VERIFY",
    )
    text = probe_metrics(result, duration=0.5).decode()
    assert value(text, "probe_findings", code="plaintext-hop", severity="warn") == 2
    assert value(text, "probe_findings", code="legacy-tls", severity="fail") == 1
    assert value(text, "probe_failed_step_info", step="VERIFY") == 1
    # The twin: a passing result has no findings series and no failed step.
    clean = probe_metrics(ProbeResult(ok=True, smtp="s", retrieve="r"), duration=0.1).decode()
    assert "probe_findings{" not in clean and "probe_failed_step_info" not in clean
    assert value(clean, "probe_success") == 1


def test_exporter_targets_as_an_array_is_named(tmp_path: Path) -> None:
    config = tmp_path / "exporter.toml"
    config.write_text('[[targets]]\nsmtp = "smtps://a@b"\n')
    with pytest.raises(ConfigError, match=r"exporter.toml:1: targets must be tables"):
        load_config(str(config))
