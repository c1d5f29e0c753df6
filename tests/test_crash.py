"""Crash tests: a stack on a MaildirStore in a subprocess, SIGKILLed around the 250.

RFC 5321 section 6.1: after the 250 that ends DATA the message must survive a crash. Each
round submits over 465, SIGKILLs the server the moment the 250 arrives, restarts it on the same
directory and finds the message over IMAP. The twins kill it before the 250 (mid-DATA, and
inside the store between its steps) and check that nothing half-written appears as mail.
"""

from __future__ import annotations

import email.utils
import imaplib
import os
import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import ServerProcess

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

TIMEOUT = 10
ALICE = "alice@example.com"
PASSWORD = "alice-pw"
ROUNDS = 50

# The server: a MailStack on a MaildirStore. argv: root, crash point. It prints its endpoints
# and the CA as one JSON line, then serves until killed. A crash point makes it SIGKILL itself
# at that step of the first delivery (inside the store, before the 250 can be sent).
SERVER = r"""
import json, os, signal, sys
from roundtrip.config import StackConfig, User
from roundtrip.maildir import LOG_NAME, MaildirStore
from roundtrip.stack import MailStack

root, crash_at = sys.argv[1], sys.argv[2]
config = StackConfig(domains=("example.com",), users=(User(sys.argv[3], sys.argv[4]),))
stack = MailStack(config, store=MaildirStore(root)).start()

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if crash_at == "before-rename":  # the tmp/ file is written and fsynced, not yet in new/
    real_rename = os.rename
    def rename(src, dst, **kw):
        if os.sep + "tmp" + os.sep in str(src):
            die()
        return real_rename(src, dst, **kw)
    os.rename = rename
elif crash_at == "before-uid-record":  # in new/ and fsynced, but without its UID record
    real_open = os.open
    def open_(path, flags, *args, **kw):
        if str(path).endswith(LOG_NAME) and flags & os.O_APPEND:
            die()
        return real_open(path, flags, *args, **kw)
    os.open = open_

ep = stack.endpoints("example.com")
print(json.dumps({
    "host": ep.host,
    "submissions": ep.ports["submissions"],
    "imaps": ep.ports["imaps"],
    "ca": stack.ca.pem.decode(),
}), flush=True)
sys.stdin.read()
"""


class Server(ServerProcess):
    """One server process; ``kill()`` is SIGKILL, never a clean stop."""

    def __init__(self, root: Path, log: Path, crash_at: str = "none") -> None:
        super().__init__(SERVER, [str(root), crash_at, ALICE, PASSWORD], log, TIMEOUT)

    def smtp(self) -> smtplib.SMTP_SSL:
        smtp = smtplib.SMTP_SSL(
            self.host, self.ports["submissions"], context=self.context, timeout=TIMEOUT
        )
        smtp.login(ALICE, PASSWORD)
        return smtp

    def search(self, criteria: list[str]) -> list[int]:
        """UIDs in alice's INBOX matching an IMAP SEARCH, over IMAPS."""
        imap = imaplib.IMAP4_SSL(
            self.host, self.ports["imaps"], ssl_context=self.context, timeout=TIMEOUT
        )
        try:
            imap.login(ALICE, PASSWORD)
            imap.select("INBOX", readonly=True)
            typ, data = imap.uid("SEARCH", *criteria)
            assert typ == "OK", data
            return [int(u) for u in (data[0] or b"").split()]
        finally:
            imap.logout()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def servers(tmp_path: Path, root: Path) -> Iterator[list[Server]]:
    """Start servers with ``servers.append(...)``; all are killed at teardown."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def _start(servers: list[Server], root: Path, tmp_path: Path, crash_at: str = "none") -> Server:
    server = Server(root, tmp_path / "server.log", crash_at)
    servers.append(server)
    return server


def _message(n: int) -> tuple[str, bytes]:
    msgid = email.utils.make_msgid(idstring=f"crash{n}", domain="example.com")
    raw = (
        f"From: <{ALICE}>\r\nTo: <{ALICE}>\r\nSubject: crash round {n}\r\n"
        f"Message-ID: {msgid}\r\nDate: {email.utils.formatdate()}\r\n\r\nround {n}\r\n"
    ).encode()
    return msgid, raw


def _by_id(server: Server, msgid: str) -> list[int]:
    return server.search(["HEADER", "Message-ID", f'"{msgid}"'])


def _message_files(root: Path) -> list[str]:
    inbox = root / ALICE
    return sorted(os.listdir(inbox / "new") + os.listdir(inbox / "cur"))


def _close(smtp: smtplib.SMTP) -> None:
    smtp.close()  # no QUIT: the server is gone


def test_crash_kill_right_after_250_never_loses_the_message(
    servers: list[Server], root: Path, tmp_path: Path
) -> None:
    sent: list[str] = []
    started = time.monotonic()
    server = _start(servers, root, tmp_path)
    for n in range(ROUNDS):
        msgid, raw = _message(n)
        smtp = server.smtp()
        try:
            smtp.sendmail(ALICE, [ALICE], raw)  # returns once the 250 has arrived
            server.kill()
        finally:
            _close(smtp)
        sent.append(msgid)
        server = _start(servers, root, tmp_path)
        assert len(_by_id(server, msgid)) == 1, f"round {n}: {msgid} lost after the 250"
    assert len(server.search(["ALL"])) == ROUNDS
    for msgid in sent[:3]:  # the first ones survived every later restart too
        assert len(_by_id(server, msgid)) == 1
    elapsed = time.monotonic() - started
    assert elapsed < ROUNDS * 3, f"{ROUNDS} crash rounds took {elapsed:.1f} s"


def test_crash_kill_mid_data_stores_nothing(
    servers: list[Server], root: Path, tmp_path: Path
) -> None:
    server = _start(servers, root, tmp_path)
    msgid, raw = _message(0)
    smtp = server.smtp()
    try:
        smtp.mail(ALICE)
        smtp.rcpt(ALICE)
        code, _ = smtp.docmd("DATA")
        assert code == 354
        smtp.send(raw[: len(raw) // 2])  # half the message, no final dot
    finally:
        _close(smtp)
    server.kill()
    server = _start(servers, root, tmp_path)
    assert _by_id(server, msgid) == []
    assert _message_files(root) == []
    assert os.listdir(root / ALICE / "tmp") == []


@pytest.mark.parametrize("crash_at", ["before-rename", "before-uid-record"])
def test_crash_inside_the_store_before_250(
    servers: list[Server], root: Path, tmp_path: Path, crash_at: str
) -> None:
    # A first message, stored normally, to check that UIDs go on from it.
    server = _start(servers, root, tmp_path)
    first_id, first = _message(0)
    smtp = server.smtp()
    try:
        smtp.sendmail(ALICE, [ALICE], first)
    finally:
        smtp.quit()
    server.kill()

    server = _start(servers, root, tmp_path, crash_at)
    msgid, raw = _message(1)
    smtp = server.smtp()
    try:
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            smtp.sendmail(ALICE, [ALICE], raw)  # the server dies inside the store: no 250
    finally:
        _close(smtp)
    server.proc.wait(TIMEOUT)
    assert server.proc.returncode == -signal.SIGKILL

    server = _start(servers, root, tmp_path)
    assert _by_id(server, first_id) == [1]
    assert os.listdir(root / ALICE / "tmp") == []  # leftovers are cleaned at start
    found = _by_id(server, msgid)
    if crash_at == "before-rename":
        # Never reached new/: absent, and no stray file (the client will retry).
        assert found == []
        assert len(_message_files(root)) == 1
    else:
        # In new/ and fsynced, but the UID map missed it: recovered with a new UID above
        # UIDNEXT. The client saw no 250 and will retry: a duplicate, never a loss (RFC 1047).
        assert found == [2]
        assert len(_message_files(root)) == 2
