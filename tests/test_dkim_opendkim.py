"""A second, independent verifier accepts the stack's DKIM signatures: OpenDKIM's
``opendkim-testmsg`` (libopendkim, C), which looks keys up through the C library's resolver.

The resolver reads /etc/resolv.conf and asks port 53 only, so the tool runs in a private
mount namespace whose resolv.conf names 127.83.0.1, where this module forwards DNS queries
to the stack's own server. The machine's resolver is never touched. Needs root (a mount
namespace, port 53) and Debian's opendkim-tools; skipped otherwise.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig

TIMEOUT = 5.0
FORWARDER = "127.83.0.1"
RCPT = "user@example.org"


def _forward(sock: socket.socket, upstream: tuple[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            query, client = sock.recvfrom(4096)
        except TimeoutError:
            continue
        except OSError:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.settimeout(TIMEOUT)
            out.sendto(query, upstream)
            try:
                reply = out.recv(65535)
            except TimeoutError:
                continue
        sock.sendto(reply, client)


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(domains=("example.com", "example.org"), dkim=True)) as running:
        yield running


@pytest.fixture(scope="module")
def testmsg(stack: MailStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    tool = shutil.which("opendkim-testmsg")
    if tool is None:
        pytest.skip("opendkim-testmsg is not installed (Debian package opendkim-tools)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed for a private resolv.conf")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((FORWARDER, 53))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot bind {FORWARDER}:53 for the DNS forwarder: {exc}")
    sock.settimeout(0.2)
    conf = tmp_path_factory.mktemp("resolv") / "resolv.conf"
    conf.write_text(f"nameserver {FORWARDER}\noptions timeout:2 attempts:1\n")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {conf} /etc/resolv.conf"],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    if probe.returncode != 0:
        sock.close()
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    assert stack.dns is not None
    stop = threading.Event()
    thread = threading.Thread(target=_forward, args=(sock, stack.dns.address, stop), daemon=True)
    thread.start()
    try:
        yield [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount --bind "{conf}" /etc/resolv.conf && exec "{tool}"',
        ]
    finally:
        stop.set()
        thread.join(TIMEOUT)
        sock.close()


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _arrived(stack: MailStack, subject: str) -> bytes:
    user = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    raw = make_message(sender=user.address, recipient=RCPT, subject=subject)
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [RCPT], raw)
    return stack.wait_for(RCPT, subject=subject, timeout=TIMEOUT).raw


def _only(raw: bytes, algorithm: bytes) -> bytes:
    """``raw`` keeping the one DKIM-Signature of ``algorithm`` (testmsg checks the first)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    kept = [
        f
        for f in fields
        if not f.lower().startswith(b"dkim-signature:") or b"a=" + algorithm in f.replace(b" ", b"")
    ]
    return b"\r\n".join(kept) + sep + body


def _run(command: list[str], raw: bytes) -> subprocess.CompletedProcess[bytes]:
    # The tool reads LF line ends as a Unix filter does.
    return subprocess.run(
        command, input=raw.replace(b"\r\n", b"\n"), capture_output=True, timeout=30, check=False
    )


ALGORITHMS = [b"rsa-sha256", b"ed25519-sha256"]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.decode())
def test_dkim_opendkim_verifies_our_signature(
    stack: MailStack, testmsg: list[str], algorithm: bytes
) -> None:
    raw = _only(_arrived(stack, f"opendkim {algorithm.decode()}"), algorithm)
    assert stack.dns is not None
    stack.dns.query_log.clear()  # forget the MX's own look-up: what follows is OpenDKIM's
    done = _run(testmsg, raw)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    selector = "rt-rsa" if algorithm == b"rsa-sha256" else "rt-ed25519"
    assert (f"{selector}._domainkey.example.com.", "TXT", "NOERROR") in stack.dns.query_log


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.decode())
def test_dkim_opendkim_rejects_an_altered_body(
    stack: MailStack, testmsg: list[str], algorithm: bytes
) -> None:
    raw = _only(_arrived(stack, f"opendkim altered {algorithm.decode()}"), algorithm)
    done = _run(testmsg, raw.replace(b"hello", b"jello"))
    assert done.returncode != 0
    assert b"bad signature" in done.stderr.lower(), done
