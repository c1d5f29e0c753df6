"""The durable relay queue (docs/security.md A9.4, RFC 5321 section 6.1).

Three levels: ``RelaySpool`` on a temporary directory (files, atomic updates, corrupt files,
injected disk errors); a ``MailStack`` on a ``MaildirStore`` stopped and started again in
process (a deferred message is restored and delivered once; a full disk is a 451); and a
server process SIGKILLed right after the submission's 250 while the remote MX defers, then
restarted without the fault: the message arrives exactly once.
"""

from __future__ import annotations

import errno
import imaplib
import json
import os
import signal
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import ServerProcess, make_message

from roundtrip.config import StackConfig, User
from roundtrip.errors import StorageError
from roundtrip.maildir import MaildirStore
from roundtrip.protocols.filter import FilterInput, Verdict, default_filter
from roundtrip.spool import MAILDIR_SPOOL_NAME, RelaySpool
from roundtrip.stack import MailStack

TIMEOUT = 10
ALICE = "alice@example.com"
BOB = "bob@example.org"
PASSWORD = "secret-pw"
DEFER = "451 4.7.1 Try again later"


def _envelope(**overrides: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "queue_id": "Q000007",
        "origin_id": "ABC123",
        "helo": "mail.example.com",
        "mail_from": ALICE,
        "rcpt": [BOB, "carol@example.org"],
        "raw": b"Subject: hi\r\n\r\n.dot line\r\n",
        "received_at": 1700000000.5,
    }
    envelope.update(overrides)
    return envelope


def _fail_nth(real: Callable[..., Any], n: int, err: int) -> Callable[..., Any]:
    count = 0

    def fake(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    return fake


# -- RelaySpool on a directory ----------------------------------------------------------------


def test_spool_add_then_load_gives_every_field_back(tmp_path: Path) -> None:
    spool = RelaySpool(tmp_path / "q")
    first = spool.add(**_envelope())
    second = spool.add(**_envelope(queue_id="Q000008", mail_from="", rcpt=[BOB]))
    assert sorted(os.listdir(spool.directory)) == [f"{first}.msg", f"{second}.msg"]
    assert (spool.directory / f"{first}.msg").stat().st_mode & 0o777 == 0o600

    messages, corrupt = RelaySpool(tmp_path / "q").load()  # as a new process would
    assert corrupt == []
    assert [m.name for m in messages] == [first, second]  # oldest first
    one = messages[0]
    assert (one.queue_id, one.origin_id, one.helo, one.mail_from) == (
        "Q000007",
        "ABC123",
        "mail.example.com",
        ALICE,
    )
    assert one.rcpt == (BOB, "carol@example.org")
    assert one.received_at == 1700000000.5
    assert one.attempts == 0
    assert one.raw == b"Subject: hi\r\n\r\n.dot line\r\n"
    assert messages[1].mail_from == ""


def test_spool_update_keeps_only_pending_recipients(tmp_path: Path) -> None:
    spool = RelaySpool(tmp_path)
    name = spool.add(**_envelope())
    spool.update(name, rcpt=["carol@example.org"], attempts=2)
    [message], _ = spool.load()
    assert message.rcpt == ("carol@example.org",)
    assert message.attempts == 2
    # A state can only shrink the recipient list, never add to it.
    spool.update(name, rcpt=["carol@example.org", "mallory@example.org"], attempts=3)
    [message], _ = spool.load()
    assert message.rcpt == ("carol@example.org",)


def test_spool_all_settled_but_not_removed_is_removed_at_load(tmp_path: Path) -> None:
    # A crash between the last state update and the unlink: nothing is left to send.
    spool = RelaySpool(tmp_path)
    name = spool.add(**_envelope())
    spool.update(name, rcpt=[], attempts=1)
    assert spool.load() == ([], [])
    assert os.listdir(tmp_path) == []


def test_spool_remove_deletes_message_and_state_twice_is_harmless(tmp_path: Path) -> None:
    spool = RelaySpool(tmp_path)
    name = spool.add(**_envelope())
    spool.update(name, rcpt=[BOB], attempts=1)
    spool.remove(name)
    spool.remove(name)
    assert os.listdir(tmp_path) == []
    assert spool.load() == ([], [])


def test_spool_corrupt_files_are_moved_aside_and_reported(tmp_path: Path) -> None:
    spool = RelaySpool(tmp_path)
    good = spool.add(**_envelope())
    truncated = spool.add(**_envelope(queue_id="Q000009"))
    path = tmp_path / f"{truncated}.msg"
    path.write_bytes(path.read_bytes()[:-3])  # the size in the envelope no longer matches
    (tmp_path / "0000.garbage.msg").write_bytes(b"\x00\xff not a spool file")
    (tmp_path / "0001.badjson.msg").write_bytes(b"roundtrip-relay-spool 1\n{not json\n")
    bad_state = spool.add(**_envelope(queue_id="Q000010"))
    (tmp_path / f"{bad_state}.state").write_bytes(b"[1, 2")
    (tmp_path / ".tmp.0123").write_bytes(b"half written")  # crash before the rename
    (tmp_path / "9999.orphan.state").write_bytes(b'{"rcpt":[],"attempts":0}')

    messages, corrupt = spool.load()

    # The message with a bad state keeps every recipient: a duplicate rather than a loss.
    assert [(m.name, m.rcpt) for m in messages] == [
        (good, (BOB, "carol@example.org")),
        (bad_state, (BOB, "carol@example.org")),
    ]
    assert sorted(p.name for p in corrupt) == sorted(
        [
            "0000.garbage.msg.corrupt",
            "0001.badjson.msg.corrupt",
            f"{truncated}.msg.corrupt",
            f"{bad_state}.state.corrupt",
        ]
    )
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{good}.msg", f"{bad_state}.msg", *(p.name for p in corrupt)]
    )
    assert spool.load()[1] == []  # moved aside once, then ignored


def test_spool_valid_file_is_not_reported(tmp_path: Path) -> None:
    # Twin of the test above: nothing to move aside when every file is whole.
    spool = RelaySpool(tmp_path)
    spool.add(**_envelope())
    messages, corrupt = spool.load()
    assert len(messages) == 1
    assert corrupt == []


@pytest.mark.parametrize(
    ("call", "n", "err"),
    [
        ("fsync", 1, errno.ENOSPC),  # the file
        ("fsync", 2, errno.EIO),  # the directory, after the rename
        ("write", 1, errno.ENOSPC),
        ("rename", 1, errno.EIO),
    ],
)
def test_spool_disk_error_raises_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, n: int, err: int
) -> None:
    spool = RelaySpool(tmp_path)
    monkeypatch.setattr(f"roundtrip.spool.os.{call}", _fail_nth(getattr(os, call), n, err))
    with pytest.raises(StorageError, match="cannot spool Q000007") as exc:
        spool.add(**_envelope())
    monkeypatch.undo()
    assert isinstance(exc.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []
    assert spool.load() == ([], [])


def test_spool_failed_update_keeps_the_previous_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = RelaySpool(tmp_path)
    name = spool.add(**_envelope())
    spool.update(name, rcpt=["carol@example.org"], attempts=1)
    monkeypatch.setattr("roundtrip.spool.os.fsync", _fail_nth(os.fsync, 1, errno.ENOSPC))
    with pytest.raises(StorageError, match="cannot update"):
        spool.update(name, rcpt=[], attempts=2)
    monkeypatch.undo()
    [message], _ = spool.load()
    assert message.rcpt == ("carol@example.org",)
    assert sorted(os.listdir(tmp_path)) == [f"{name}.msg", f"{name}.state"]


# -- a MailStack on a MaildirStore, restarted in process ---------------------------------------


def _config(**overrides: Any) -> StackConfig:
    return StackConfig(
        domains=("example.com", "example.org"),
        users=(User(ALICE, PASSWORD), User(BOB, PASSWORD)),
        **overrides,
    )


def _defer(_: FilterInput) -> Verdict:
    return Verdict(action="reject", reply=DEFER)


def _submit(stack: MailStack, raw: bytes) -> None:
    ep = stack.endpoints("example.com")
    with smtplib.SMTP_SSL(
        ep.host, ep.ports["submissions"], context=stack.client_context(), timeout=TIMEOUT
    ) as smtp:
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, [BOB], raw)


def _spooled(root: Path) -> list[str]:
    return sorted(os.listdir(root / MAILDIR_SPOOL_NAME))


def test_relay_spool_stack_restart_restores_and_delivers_once(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    raw = make_message(sender=ALICE, recipient=BOB, subject="survives a restart")
    with MailStack(_config(), store=MaildirStore(root)) as stack:
        stack.content_filter = _defer  # example.org's MX answers 451: the message stays queued
        _submit(stack, raw)
        stack.relay_idle()
        assert stack.relay is not None
        [entry] = stack.relay.queue()
        assert entry.rcpt == (BOB,)
        assert DEFER in entry.last_error
        assert [n.rpartition(".")[2] for n in _spooled(root)] == ["msg"]
        assert stack.messages(BOB) == []

    stack = MailStack(_config(retry_delays=(0.2,)), store=MaildirStore(root))
    stack.content_filter = _defer  # still deferring: the restored entry is visible
    with stack:
        [restored] = stack.relay_queue()
        assert restored.rcpt == (BOB,)
        assert restored.mail_from == ALICE
        stack.content_filter = default_filter
        stack.wait_for(BOB, subject="survives a restart", timeout=TIMEOUT)
        stack.relay_idle()
        assert len(stack.messages(BOB)) == 1
        assert _spooled(root) == []
        stack.check()

    with MailStack(_config(), store=MaildirStore(root)) as stack:  # and never again
        stack.relay_idle()
        assert stack.relay_queue() == []
        assert len(stack.messages(BOB)) == 1


def test_relay_spool_delivered_message_leaves_no_spool_file(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    raw = make_message(sender=ALICE, recipient=BOB, subject="straight through")
    with MailStack(_config(), store=MaildirStore(root)) as stack:
        _submit(stack, raw)
        stack.wait_for(BOB, subject="straight through", timeout=TIMEOUT)
        stack.relay_idle()
        assert _spooled(root) == []
        stack.check()


def _submit_to(stack: MailStack, rcpts: list[str], raw: bytes) -> None:
    ep = stack.endpoints("example.com")
    with smtplib.SMTP_SSL(
        ep.host, ep.ports["submissions"], context=stack.client_context(), timeout=TIMEOUT
    ) as smtp:
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, rcpts, raw)


@pytest.mark.parametrize("rcpts", [[BOB], [ALICE, BOB]], ids=["remote", "local-and-remote"])
def test_relay_spool_disk_full_at_enqueue_is_451_not_250(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rcpts: list[str]
) -> None:
    # The spool is written before any local copy (ALICE is local to the submission server):
    # the first fsync is the spool's, and its failure is a 451 with nothing stored anywhere,
    # so the client's retry duplicates nothing.
    root = tmp_path / "mail"
    raw = make_message(sender=ALICE, recipient=BOB, subject="disk full")
    with MailStack(_config(), store=MaildirStore(root)) as stack:
        monkeypatch.setattr("roundtrip.spool.os.fsync", _fail_nth(os.fsync, 1, errno.ENOSPC))
        with pytest.raises(smtplib.SMTPDataError) as exc:
            _submit_to(stack, rcpts, raw)
        monkeypatch.undo()
        assert exc.value.smtp_code == 451
        stack.relay_idle()
        assert _spooled(root) == []
        assert stack.relay_queue() == []
        assert stack.messages(ALICE) == []
        assert stack.messages(BOB) == []
        stack.check()


def test_relay_spool_local_store_failure_withdraws_the_spooled_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The twin: the spool works but ALICE's copy cannot be stored; the 451 must not leave
    # BOB's copy queued (it would be delivered, and again after the client's retry).
    root = tmp_path / "mail"
    raw = make_message(sender=ALICE, recipient=BOB, subject="store fails")
    with MailStack(_config(), store=MaildirStore(root)) as stack:

        def full_disk(*args: Any, **kwargs: Any) -> Any:
            raise StorageError("cannot store: no space left on device")

        monkeypatch.setattr(stack.store, "deliver", full_disk)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            _submit_to(stack, [ALICE, BOB], raw)
        monkeypatch.undo()
        assert exc.value.smtp_code == 451
        stack.relay_idle()
        assert _spooled(root) == []
        assert stack.relay_queue() == []
        assert stack.messages(BOB) == []
        # and the retry goes through once, to both
        _submit_to(stack, [ALICE, BOB], raw)
        stack.wait_for(BOB, subject="store fails", timeout=TIMEOUT)
        stack.relay_idle()
        assert len(stack.messages(ALICE)) == 1
        assert len(stack.messages(BOB)) == 1
        stack.check()


def test_relay_without_spool_keeps_queue_in_memory_only(tmp_path: Path) -> None:
    # Twin: the in-memory store gets no spool, and a restart forgets the queue.
    with MailStack(_config()) as stack:
        assert stack.relay is not None
        stack.content_filter = _defer
        _submit(stack, make_message(sender=ALICE, recipient=BOB, subject="memory only"))
        stack.relay_idle()
        assert len(stack.relay_queue()) == 1
        assert stack.relay._spool is None
    with MailStack(_config()) as stack:
        assert stack.relay_queue() == []


# -- SIGKILL right after the 250, in a subprocess ----------------------------------------------

# argv: root ("" = in-memory store), mode ("defer": example.org's MX answers 451). Prints its
# endpoints and CA as one JSON line. On each "idle" line from stdin it waits for the relay to
# be idle and prints the spool's file names as JSON. Serves until killed.
SERVER = r"""
import json, os, sys
from roundtrip.config import StackConfig, User
from roundtrip.maildir import MaildirStore
from roundtrip.protocols.filter import Verdict
from roundtrip.spool import MAILDIR_SPOOL_NAME
from roundtrip.stack import MailStack

root, mode, password = sys.argv[1], sys.argv[2], sys.argv[3]
config = StackConfig(
    domains=("example.com", "example.org"),
    users=(User("alice@example.com", password), User("bob@example.org", password)),
)
stack = MailStack(config, store=MaildirStore(root) if root else None)
if mode == "defer":
    stack.content_filter = lambda _: Verdict(action="reject", reply="451 4.7.1 Try again later")
stack.start()
com, org = stack.endpoints("example.com"), stack.endpoints("example.org")
print(json.dumps({
    "host": com.host,
    "submissions": com.ports["submissions"],
    "imaps": org.ports["imaps"],
    "ca": stack.ca.pem.decode(),
}), flush=True)
for line in sys.stdin:
    stack.relay_idle()
    spool = os.path.join(root, MAILDIR_SPOOL_NAME)
    print(json.dumps(sorted(os.listdir(spool)) if root else []), flush=True)
"""


class Server(ServerProcess):
    """One server process; ``kill()`` is SIGKILL, never a clean stop."""

    def __init__(self, root: str, mode: str, log: Path) -> None:
        super().__init__(SERVER, [root, mode, PASSWORD], log, TIMEOUT)

    def idle(self) -> list[str]:
        """Wait until the relay is idle; the spool's file names."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"idle\n")
        self.proc.stdin.flush()
        names: list[str] = json.loads(self.read_line())
        return names

    def submit(self, raw: bytes) -> None:
        """Submit ALICE -> BOB over 465; returns once the 250 has arrived. No QUIT."""
        smtp = smtplib.SMTP_SSL(
            self.host, self.ports["submissions"], context=self.context, timeout=TIMEOUT
        )
        try:
            smtp.login(ALICE, PASSWORD)
            smtp.sendmail(ALICE, [BOB], raw)
        finally:
            smtp.close()

    def count(self, msgid: str) -> int:
        """How many messages in BOB's INBOX carry ``msgid``, over IMAPS."""
        imap = imaplib.IMAP4_SSL(
            self.host, self.ports["imaps"], ssl_context=self.context, timeout=TIMEOUT
        )
        try:
            imap.login(BOB, PASSWORD)
            imap.select("INBOX", readonly=True)
            typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{msgid}"')
            assert typ == "OK", data
            return len((data[0] or b"").split())
        finally:
            imap.logout()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def _start(servers: list[Server], root: str, mode: str, tmp_path: Path) -> Server:
    server = Server(root, mode, tmp_path / "server.log")
    servers.append(server)
    return server


def _round_message(n: int) -> tuple[str, bytes]:
    raw = make_message(sender=ALICE, recipient=BOB, subject=f"spool round {n}")
    msgid = raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
    return msgid, raw


ROUNDS = 5

skip_without_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


@skip_without_sigkill
def test_relay_spool_kill_after_250_while_deferred_delivers_exactly_once(
    servers: list[Server], tmp_path: Path
) -> None:
    root = str(tmp_path / "mail")
    started = time.monotonic()
    sent: list[str] = []
    for n in range(ROUNDS):
        server = _start(servers, root, "defer", tmp_path)
        msgid, raw = _round_message(n)
        server.submit(raw)  # the 250: the relay owns the message now
        server.kill()
        sent.append(msgid)
        server = _start(servers, root, "none", tmp_path)  # the MX accepts again
        assert server.idle() == [], f"round {n}: the spool was not emptied"
        for each in sent:  # this round's once, and no earlier one again
            assert server.count(each) == 1, f"round {n}: {each}"
        server.kill()
    elapsed = time.monotonic() - started
    assert elapsed < ROUNDS * 4, f"{ROUNDS} rounds took {elapsed:.1f} s"


@skip_without_sigkill
def test_relay_spool_settled_message_is_not_sent_again_after_kill(
    servers: list[Server], tmp_path: Path
) -> None:
    root = str(tmp_path / "mail")
    server = _start(servers, root, "none", tmp_path)
    msgid, raw = _round_message(0)
    server.submit(raw)
    assert server.idle() == []  # delivered: no spool file left
    assert server.count(msgid) == 1
    server.kill()
    server = _start(servers, root, "none", tmp_path)
    assert server.idle() == []
    assert server.count(msgid) == 1  # no duplicate


@skip_without_sigkill
def test_relay_in_memory_store_loses_the_deferred_message_on_kill(
    servers: list[Server], tmp_path: Path
) -> None:
    # The twin that shows what the spool prevents: without it the message is gone.
    server = _start(servers, "", "defer", tmp_path)
    msgid, raw = _round_message(0)
    server.submit(raw)
    server.kill()
    server = _start(servers, "", "none", tmp_path)
    server.idle()
    assert server.count(msgid) == 0
