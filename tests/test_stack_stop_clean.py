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


# A client that says QUIT over implicit TLS and closes its socket without a close_notify
# (smtplib does so): the server's TLS transport waits for that close_notify while closing, and
# asyncio's forgets its protocol when aiosmtpd closes it a second time, so abort() did nothing.
# Stopped meanwhile, the stack left the socket open (asyncio: ResourceWarning; uvloop: the
# loop thread did not stop within 10 s). LEAK=1 leaks one socket on purpose: the twin.
QUIT_SCRIPT = """
import gc, os, socket, sys
from roundtrip import MailStack, StackConfig
leaks = []
sys.unraisablehook = lambda u: leaks.append(repr(u.exc_value))
kept = []
for _ in range(3):
    stack = MailStack(StackConfig(domains=("example.com",))).start()
    endpoints = stack.endpoints()
    raw = socket.create_connection(endpoints.address("submissions"), timeout=5)
    tls = stack.client_context().wrap_socket(raw, server_hostname=endpoints.hostname)
    reader = tls.makefile("rb")
    assert reader.readline().startswith(b"220")
    tls.sendall(b"QUIT\\r\\n")
    assert reader.readline().startswith(b"221")
    stack.stop()
    reader.close()
    tls.close()
if os.environ.get("LEAK") == "1":
    kept.append(socket.socket())
    kept.clear()
gc.collect()
print(len(leaks), leaks[:3])
"""


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("leak", ["0", "1"])
def test_stack_stop_aborts_a_closing_tls_connection(loop: str, leak: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", QUIT_SCRIPT],
        env={**os.environ, "ROUNDTRIP_LOOP": loop, "LEAK": leak},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    leaks = int(done.stdout.split(" ", 1)[0])
    assert leaks == int(leak), done.stdout
