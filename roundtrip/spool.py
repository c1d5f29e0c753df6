"""The relay's durable queue: one file per queued message, fsynced before the 250 (A9.4).

RFC 5321 §6.1: once a server has said 250 to the end of DATA it is responsible for the message,
and "MUST NOT lose the message for frivolous reasons, such as because the host later crashes".
The in-memory relay queue loses every message still waiting for a remote MX when the process
dies; with a :class:`RelaySpool` each one is on disk before :meth:`Relay.enqueue` returns.

Layout of the spool directory (``<maildir root>/.roundtrip-relay-queue/`` for the stack: a name
that starts with a dot can never be a user directory of ``MaildirStore``)::

    <ns>.<hex>.msg     one queued message: a magic line, a JSON envelope line, the raw bytes
    <ns>.<hex>.state   recipients still pending and attempts made, once some have settled
    .tmp.<hex>         a file being written (removed at load: it never reached its name)
    *.corrupt          a file that could not be read, moved aside at load and reported

``<ns>`` is the time of queueing in nanoseconds, so the names sort oldest first.

Writes: a new file is written under a temporary name, fsynced, renamed into place, and the
directory is fsynced, so a name either holds a whole file or does not exist. The ``.msg`` file
is never changed after that; when recipients settle, the small ``.state`` file is replaced the
same way (the message bytes are not copied again). Removal unlinks the ``.msg`` file first, so
a crash in between leaves an orphan ``.state`` (deleted at load), never a ``.msg`` that would
send to every recipient again.

What a crash can cost: a recipient whose remote 250 arrived but whose ``.state`` update did not
reach the disk is sent again after the restart (one duplicate: RFC 1047, a duplicate is better
than a loss). Nothing that was durable is sent twice.

Every ``OSError`` becomes :class:`~roundtrip.errors.StorageError`, and a failed write leaves no
file behind, so the SMTP layer answers 451 and the client keeps the message.

One process per directory: the stack's spool lives inside a locked ``MaildirStore`` tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import StorageError

__all__ = ["MAILDIR_SPOOL_NAME", "RelaySpool", "SpooledMessage", "fsync_dir"]

#: The spool directory inside a ``MaildirStore`` root (a leading dot: never a user's directory).
MAILDIR_SPOOL_NAME = ".roundtrip-relay-queue"

_MAGIC = b"roundtrip-relay-spool 1\n"
_MSG = ".msg"
_STATE = ".state"
_TMP = ".tmp."
_CORRUPT = ".corrupt"
_DIR_MODE = 0o700
_FILE_MODE = 0o600
#: The envelope line may not be longer than this (a guard against reading a garbage file whole).
_MAX_HEADER = 1 << 20


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One message read back from the spool.

    Attributes:
        name: the spool's key for the message (pass it to ``update`` and ``remove``).
        queue_id: the relay queue id it had when it was spooled.
        origin_id: the queue id of the SMTP server that accepted it ("" if unknown).
        helo: the name the relay announces in EHLO for it.
        mail_from: the envelope sender ("" for a bounce).
        rcpt: recipients not settled yet.
        received_at: when the message was first queued (relay clock).
        attempts: delivery attempts recorded so far.
        raw: the message bytes, as queued (CRLF-normalised by the relay).
    """

    name: str
    queue_id: str
    origin_id: str
    helo: str
    mail_from: str
    rcpt: tuple[str, ...]
    received_at: float
    attempts: int
    raw: bytes


class RelaySpool:
    """A directory of queued messages, written durably.

    Args:
        directory: where the files live; created (mode 0700) if missing.

    Raises:
        StorageError: the directory cannot be created.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).absolute()
        try:
            if not self.directory.is_dir():
                os.makedirs(self.directory, mode=_DIR_MODE, exist_ok=True)
                fsync_dir(self.directory.parent)
        except OSError as exc:
            raise StorageError(
                f"cannot create the relay spool {str(self.directory)!r}: {exc.strerror or exc}"
            ) from exc

    # -- writing ----------------------------------------------------------------------------

    def add(
        self,
        *,
        queue_id: str,
        helo: str,
        mail_from: str,
        rcpt: Sequence[str],
        raw: bytes,
        received_at: float,
        origin_id: str = "",
        attempts: int = 0,
    ) -> str:
        """Write one message durably; it is on stable storage when this returns.

        Returns:
            The message's name in the spool.

        Raises:
            StorageError: the file could not be written and synced (nothing is left behind).
        """
        name = f"{time.time_ns():020d}.{secrets.token_hex(6)}"
        header = {
            "queue_id": queue_id,
            "origin_id": origin_id,
            "helo": helo,
            "mail_from": mail_from,
            "rcpt": list(rcpt),
            "received_at": received_at,
            "attempts": attempts,
            "size": len(raw),
        }
        data = b"".join((_MAGIC, _dumps(header), raw))
        try:
            self._publish(self.directory / (name + _MSG), data)
        except OSError as exc:
            raise StorageError(f"cannot spool {queue_id} for the relay: {_text(exc)}") from exc
        return name

    def update(self, name: str, *, rcpt: Sequence[str], attempts: int) -> None:
        """Record the recipients still pending (and the attempts made) for ``name``.

        Raises:
            StorageError: the record could not be written; the previous one stays valid.
        """
        data = _dumps({"rcpt": list(rcpt), "attempts": attempts})
        try:
            self._publish(self.directory / (name + _STATE), data)
        except OSError as exc:
            raise StorageError(f"cannot update spooled message {name}: {_text(exc)}") from exc

    def remove(self, name: str) -> None:
        """Forget ``name``: every recipient has settled. Removing it twice does nothing.

        Raises:
            StorageError: the file could not be removed.
        """
        try:
            removed = False
            for suffix in (_MSG, _STATE):  # .msg first: an orphan .state is harmless
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / (name + suffix))
                    removed = True
            if removed:
                fsync_dir(self.directory)
        except OSError as exc:
            raise StorageError(f"cannot remove spooled message {name}: {_text(exc)}") from exc

    def _publish(self, path: Path, data: bytes) -> None:
        """Temporary file, write, fsync, rename to ``path``, fsync the directory."""
        tmp = self.directory / f"{_TMP}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        existed = path.exists()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            fsync_dir(self.directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not existed:
                # Renamed but the directory sync failed: not known to be durable, so the
                # caller reports failure and must not find the file later.
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise

    # -- reading ----------------------------------------------------------------------------

    def load(self) -> tuple[list[SpooledMessage], list[Path]]:
        """Every spooled message, oldest first, and the files moved aside as unreadable.

        Leftover temporary files and ``.state`` files without their message are removed.
        A file that cannot be parsed is renamed to ``<name>.corrupt`` (never deleted, never
        fatal); a bad ``.state`` is moved aside too and its message keeps every recipient it
        was queued with (a duplicate rather than a loss).

        Raises:
            StorageError: the directory itself cannot be read.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise StorageError(f"cannot read the relay spool: {_text(exc)}") from exc
        present = set(names)
        messages: list[SpooledMessage] = []
        corrupt: list[Path] = []
        changed = False
        for entry in names:
            path = self.directory / entry
            leftover = entry.startswith(_TMP) or (
                entry.endswith(_STATE) and entry[: -len(_STATE)] + _MSG not in present
            )
            if leftover:  # never renamed into place, or its message is gone
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    changed = True
            elif entry.endswith(_MSG):
                name = entry[: -len(_MSG)]
                try:
                    message = _read_message(name, path)
                except (OSError, ValueError):
                    corrupt.append(self._move_aside(path))
                    continue
                state_path = self.directory / (name + _STATE)
                if name + _STATE in present:
                    try:
                        rcpt, attempts = _read_state(state_path)
                    except (OSError, ValueError):
                        corrupt.append(self._move_aside(state_path))
                    else:
                        pending = tuple(r for r in message.rcpt if r in rcpt)
                        if not pending:  # all settled, removal interrupted by a crash
                            with contextlib.suppress(StorageError):
                                self.remove(name)
                            continue
                        message = replace(message, rcpt=pending, attempts=attempts)
                messages.append(message)
        if changed:
            with contextlib.suppress(OSError):
                fsync_dir(self.directory)
        return messages, corrupt

    def _move_aside(self, path: Path) -> Path:
        target = path.with_name(path.name + _CORRUPT)
        with contextlib.suppress(OSError):
            os.rename(path, target)
            fsync_dir(self.directory)
        return target


# -- helpers ----------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a file created, renamed or removed in it is durable (the Maildir
    store uses it too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read_message(name: str, path: Path) -> SpooledMessage:
    """Parse one ``.msg`` file; ``ValueError`` says what is wrong with it."""
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("not a relay spool file")
        line = f.readline(_MAX_HEADER)
        if not line.endswith(b"\n"):
            raise ValueError("truncated envelope")
        raw = f.read()
    header = json.loads(line)
    if not isinstance(header, dict):
        raise ValueError("envelope is not an object")
    rcpt = header.get("rcpt")
    strings = ("queue_id", "origin_id", "helo", "mail_from")
    if (
        not all(isinstance(header.get(key), str) for key in strings)
        or not isinstance(rcpt, list)
        or not rcpt
        or not all(isinstance(r, str) for r in rcpt)
        or not isinstance(header.get("received_at"), (int, float))
        or not isinstance(header.get("attempts"), int)
        or header.get("size") != len(raw)
    ):
        raise ValueError("bad envelope or truncated message")
    return SpooledMessage(
        name=name,
        queue_id=header["queue_id"],
        origin_id=header["origin_id"],
        helo=header["helo"],
        mail_from=header["mail_from"],
        rcpt=tuple(rcpt),
        received_at=float(header["received_at"]),
        attempts=header["attempts"],
        raw=raw,
    )


def _read_state(path: Path) -> tuple[set[str], int]:
    state = json.loads(path.read_bytes())
    if not isinstance(state, dict):
        raise ValueError("state is not an object")
    rcpt, attempts = state.get("rcpt"), state.get("attempts")
    if not isinstance(rcpt, list) or not all(isinstance(r, str) for r in rcpt):
        raise ValueError("bad recipient list")
    if not isinstance(attempts, int):
        raise ValueError("bad attempt count")
    return set(rcpt), attempts
