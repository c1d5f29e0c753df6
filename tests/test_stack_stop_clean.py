"""A stack stops without leaving connections open, whatever its clients did.

A client that connects to an SMTP port and leaves at once keeps a half-closed transport that
aiosmtpd closes only when its session handler returns; the stack cancels that handler when it
stops, and on uvloop the transport then stayed open until the loop closed and warned about it
(ResourceWarning, an error under ``-W error``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = """
import gc, socket, sys, time
from roundtrip import MailStack
from roundtrip.stack._services import IMPLICIT_TLS_SERVICES, SERVICES
leaks = []
sys.unraisablehook = lambda u: leaks.append(repr(u.exc_value))
with MailStack() as stack:
    dialled = 0
    for endpoints in stack.domains.values():
        for service in (s for s in SERVICES if s not in IMPLICIT_TLS_SERVICES):
            socket.create_connection(endpoints.address(service), timeout=5).close()
            dialled += 1
    # Every connection reached its server (each server records it when it takes it; an
    # implicit-TLS one only after a handshake, hence plaintext ports only): a socket still in
    # the accept queue when the loop stops is asyncio's to leak, not ours.
    deadline = time.monotonic() + 10
    while len(stack.transcripts()) < dialled and time.monotonic() < deadline:
        time.sleep(0.01)  # sleep-ok: a poll with a deadline
gc.collect()
print(dialled, len(leaks), leaks[:3])
"""

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


@pytest.mark.parametrize("loop", LOOPS)
def test_stack_stop_leaves_no_connection_open(loop: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", SCRIPT],
        env={**os.environ, "ROUNDTRIP_LOOP": loop},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    dialled, leaks, *_ = done.stdout.split(" ", 2)
    assert int(dialled) == 8  # two domains, four plaintext services each
    assert int(leaks) == 0, done.stdout
