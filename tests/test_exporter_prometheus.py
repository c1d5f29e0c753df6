"""A real Prometheus (Debian's ``prometheus`` package) scrapes ``roundtrip exporter`` as it
scrapes blackbox_exporter, and its query API returns probe_success 1 for the stack and 0 for
a broken target."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_exporter import write_config

from roundtrip import MailStack
from roundtrip.exporter import Exporter, load_config

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
#: Seconds to wait for Prometheus to start and to scrape both targets.
DEADLINE = 60.0
POLL_INTERVAL = 0.5

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="prometheus is not installed (Debian: prometheus)"
)


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


def _prometheus_config(exporter_address: str) -> str:
    # blackbox_exporter's documented relabeling: the target list names what to probe, which
    # becomes the ?target= parameter and the instance label; the address is the exporter.
    return f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: roundtrip
    metrics_path: /probe
    static_configs:
      - targets: [stack, broken]
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: {exporter_address}
"""


def _unused_port() -> int:
    # Prometheus cannot report a port it picked itself, so one is chosen here; a start that
    # loses the race for it is retried with another (see _start_prometheus).
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def _start_prometheus(tmp_path: Path, config: Path) -> tuple[subprocess.Popen[bytes], int]:
    for attempt in range(3):
        port = _unused_port()
        log = (tmp_path / f"prometheus-{attempt}.log").open("wb")
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / f'tsdb-{attempt}'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break  # exited: most likely the port was taken meanwhile
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                    if r.status == 200:
                        return proc, port
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_INTERVAL)  # sleep-ok: a foreign process; poll to a deadline
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    output = "\n".join(p.read_text() for p in tmp_path.glob("prometheus-*.log"))
    pytest.fail(f"prometheus did not become ready:\n{output[-3000:]}")


def _query(port: int, expr: str) -> dict[str, float]:
    """instance -> value of ``expr`` now."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        doc = json.load(response)
    assert doc["status"] == "success", doc
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in doc["data"]["result"]}


def test_exporter_prometheus_scrapes_stack_and_broken_target(
    tmp_path: Path, stack: MailStack
) -> None:
    # A second, faster check of TLS 1.0/1.1 per scrape is not what this test is about: the
    # scrape budget (1 s scrape timeout less the margin) is kept for the round trip itself.
    config = write_config(tmp_path, stack)
    config.write_text(
        config.read_text().replace("timeout = ", "check_legacy_tls = false\ntimeout = ")
    )
    with Exporter(load_config(str(config)), listen="127.0.0.1:0") as exporter:
        host, port = exporter.address
        prometheus_yml = tmp_path / "prometheus.yml"
        prometheus_yml.write_text(_prometheus_config(f"{host}:{port}"))
        proc, web_port = _start_prometheus(tmp_path, prometheus_yml)
        try:
            seen: dict[str, float] = {}
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                seen = _query(web_port, 'probe_success{job="roundtrip"}')
                if seen.get("stack") == 1 and seen.get("broken") == 0:
                    break
                time.sleep(POLL_INTERVAL)  # sleep-ok: Prometheus scrapes on its own clock
            up = _query(web_port, 'up{job="roundtrip"}')
            steps = _query(web_port, 'probe_step_duration_seconds{instance="stack"}')
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert seen == {"stack": 1.0, "broken": 0.0}
    # Both scrapes themselves succeed: a failing target is probe_success 0, not a failed scrape.
    assert up == {"stack": 1.0, "broken": 1.0}
    assert steps, "no per-step durations stored for the stack"
