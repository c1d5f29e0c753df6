"""``probe --count N``: a progress bar on a terminal, plain lines when piped.

The terminal is a real pseudo-terminal (``pty``), the command a real subprocess.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

TIMEOUT = 60.0


def _run_with_tty_stderr(args: list[str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "roundtrip", *args],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    data = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], deadline - time.monotonic())[0]:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        code = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        os.close(master)
    return code, data.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal() -> None:
    code, err = _run_with_tty_stderr(["probe", "--count", "3"])
    assert code == 0, err
    assert "\r\x1b[Kroundtrip: [" in err
    assert "3/3" in err and "imaps p50" in err and "pop3s p50" in err and "failed 0" in err
    assert "roundtrip: run 1/3:" not in err


def test_progress_plain_lines_when_piped() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "roundtrip", "probe", "--count", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "roundtrip: run 1/2:" in result.stderr and "roundtrip: run 2/2:" in result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr
