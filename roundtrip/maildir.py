"""A durable mailbox store on a Maildir++ tree: the ``Store`` interface, kept on disk.

Layout (readable by Dovecot, mutt and Python's ``mailbox.Maildir``)::

    ROOT/.roundtrip.lock              flock: one MaildirStore per tree at a time
    ROOT/.roundtrip-trash/            deleted folders on their way out (emptied at start)
    ROOT/<address>/                   INBOX: cur/ new/ tmp/ + roundtrip-uidlist
    ROOT/<address>/.Sent/             a folder (Maildir++): cur/ new/ tmp/ maildirfolder + log
    ROOT/<address>/.A.B/              the folder ``A/B``

Folder names on disk are modified UTF-7 (Dovecot's default) with ``.`` inside a name written
``\\2e`` (Dovecot's listescape style); ``validate_mailbox_name`` forbids ``\\``, so the mapping
is reversible, and a name can never leave ``ROOT/<address>/``.

Message files are named ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>,S=<size>[:2,<flags>]``,
with the maildir flag letters D F R S T. The file's mtime is the internal date. Keywords (and
any flag without a letter), the envelope and the UID live in ``roundtrip-uidlist``: a
JSON-lines log per folder. Its first line holds UIDVALIDITY, UIDNEXT, SPECIAL-USE and the
subscription; each later line is one record (a new UID for a file, new keywords, a
subscription change). Records are appended and fsynced; a torn last line from a crash is
ignored. When dead records pile up the log is rewritten atomically (temporary file, fsync,
rename, directory fsync).

Durability (docs/security.md, A9.1 and A9.2): a delivery writes ``tmp/``, fsyncs the file,
renames it into ``new/`` (or ``cur/`` when it has flags), fsyncs that directory, appends and
fsyncs the UID record, and only then returns, so the SMTP layer's 250 follows stable storage.
Any ``OSError`` on the way removes what was written and raises ``StorageError`` (451).

Restart: ``MaildirStore(root)`` recovers users (every ``ROOT/<address>/``), folders, messages,
flags, keywords, UIDVALIDITY and UIDs. Files without a UID record (dropped in by another tool,
or renamed into place just before a crash) get new UIDs from UIDNEXT up, in mtime order, so
UIDs never go backwards. ``tmp/`` files of ours are removed at start (others' after 36 hours,
as the maildir spec says).

Confinement: a symbolic link inside the tree would lead out of it just as a ``../`` mailbox
name would (docs/security.md A6.5), so the store follows none. The root is resolved once, at
construction (it may itself be reached through a link); below it no user directory, folder,
``cur/``, ``new/``, ``tmp/``, ``roundtrip-uidlist``, message file, trash directory or lock
file may be a link. At start such a user or folder is skipped, logged and listed in
``MaildirStore.refused``, never followed, and a refused default folder is not re-created.
While running, every access checks the folder's path first (``mailbox()``, hence SELECT,
STATUS, APPEND, delivery, COPY, STORE, EXPUNGE, POP3 login; RENAME, DELETE, CREATE; reading a
message), so a directory swapped for a link while the store runs is refused too: with
``MailboxError`` code ``CANNOT`` (reading a message: ``StorageError``), which IMAP answers
with NO and POP3 with -ERR. Last components are opened with ``O_NOFOLLOW``. Not closed: a swap
in the microseconds between a check and the system call after it (that needs
``openat``-relative paths throughout).

Passwords are never written to disk. A recovered user exists (its mail is kept and new mail
for it accepted) but cannot log in until ``add_user`` gives it a password again; the stack does
that for its configured users every time it starts.

Message bytes are not kept in memory: ``StoredMessage.raw`` reads the file on each access
(an expunged message keeps its bytes for readers that still hold it).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import MailboxError, StorageError
from .spool import fsync_dir
from .store import (
    DEFAULT_FOLDERS,
    HIERARCHY_DELIMITER,
    Mailbox,
    Store,
    StoreChange,
    StoredMessage,
    validate_mailbox_name,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["FLAG_LETTERS", "LOG_NAME", "MaildirStore", "folder_dirname", "folder_name"]

log = logging.getLogger("roundtrip.maildir")

#: IMAP system flags and their maildir info letters (cr.yp.to/proto/maildir.html).
FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
_LETTER_FLAGS = {letter: flag for flag, letter in FLAG_LETTERS.items()}

#: The per-folder metadata log (UIDVALIDITY, UIDNEXT, filename -> UID, keywords, envelope).
LOG_NAME = "roundtrip-uidlist"
_LOCK_NAME = ".roundtrip.lock"
_TRASH_NAME = ".roundtrip-trash"
# The highest UIDVALIDITY of a deleted folder, so a re-created one gets a larger value even
# after a restart (RFC 3501 2.3.1.1; Dovecot keeps dovecot-uidvalidity for the same reason).
_UIDVALIDITY_NAME = ".roundtrip-uidvalidity"
_INFO = ":2,"
_OUR_FILE = re.compile(r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.")
# The maildir spec: tmp/ files untouched for 36 hours are garbage, whoever wrote them.
_STALE_TMP_SECONDS = 36 * 3600
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_MAX_COMPONENT = 255
_SUBDIRS = ("cur", "new", "tmp")
# Never follow a symbolic link in the last component of a path we open (see "Confinement").
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# Filesystem primitives. Every write goes through os.open/os.write/os.fsync so that tests can
# inject faults at exactly these calls.


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _create_file(path: Path, data: bytes, *, mtime: float | None = None) -> None:
    """Write a new file and fsync it; on failure nothing is left at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, _FILE_MODE)
    try:
        try:
            _write_all(fd, data)
            if mtime is not None:
                os.utime(fd if os.utime in os.supports_fd else path, (mtime, mtime))
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _replace_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path``: temporary file, fsync, rename, directory fsync."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _create_file(tmp, data)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _append_file(path: Path, data: bytes) -> None:
    """Append and fsync; on failure the file is cut back to its old length."""
    fd = os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW, _FILE_MODE
    )
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes:
    """The bytes of a file, refusing (``OSError`` ELOOP) a symbolic link in the last component."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _is_dir(path: Path) -> bool:
    """True for a directory that is not a symbolic link; False when nothing is there.

    Raises:
        OSError: ``ENOTDIR`` when something else (a link, a file) is in the way.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(mode):
        raise OSError(errno.ENOTDIR, "not a directory inside the maildir root", str(path))
    return True


def _resolves_to_itself(path: Path) -> bool:
    """True when no component of the absolute ``path`` is a symbolic link (or ``..``)."""
    return os.path.realpath(path) == str(path)


def _no_links_below(root: str, path: str) -> bool:
    """True when neither ``root`` nor a component of ``path`` below it is a symbolic link.

    ``root`` was resolved when the store opened, so this answers ``realpath(path) == path``
    for the part of the tree the store owns, at one ``lstat`` per component (``realpath``
    walks the root's ancestors too and costs about twice as much; this runs on every message
    read). Components that do not exist yet are nothing to follow.
    """
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not path.startswith(prefix):
        return False
    current = root
    try:
        if stat.S_ISLNK(os.lstat(current).st_mode):
            return False
        for part in path[len(prefix) :].split(os.sep):
            if part in ("", ".", ".."):
                return False
            current = os.path.join(current, part)
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return False
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _make_maildir(path: Path, *, folder: bool) -> None:
    if not _resolves_to_itself(path):
        raise OSError(errno.ENOTDIR, "not a directory inside the maildir root", str(path))
    created = False
    for sub in ("", *_SUBDIRS):
        target = path / sub if sub else path
        if not _is_dir(target):
            os.mkdir(target, _DIR_MODE)
            created = True
    if folder and not os.path.lexists(path / "maildirfolder"):
        _create_file(path / "maildirfolder", b"")
        created = True
    if created:
        for sub in _SUBDIRS:
            fsync_dir(path / sub)
        fsync_dir(path)
        fsync_dir(path.parent)


# Folder names <-> directory names


def _encode_mutf7(name: str) -> str:
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _decode_mutf7(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "&":
            out.append(text[i])
            i += 1
            continue
        end = text.index("-", i + 1)  # ValueError: not ours
        chunk = text[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            raw = chunk.replace(",", "/")
            data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
            out.append(data.decode("utf-16-be"))
        i = end + 1
    return "".join(out)


def folder_dirname(name: str) -> str:
    """The Maildir++ directory of a canonical non-INBOX mailbox name (``A/B`` -> ``.A.B``)."""
    parts = [_encode_mutf7(p).replace(".", "\\2e") for p in name.split(HIERARCHY_DELIMITER)]
    return "." + ".".join(parts)


def folder_name(dirname: str) -> str | None:
    """The mailbox name of a Maildir++ directory, or None when it is not a valid folder."""
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    try:
        parts = [_decode_mutf7(p.replace("\\2e", ".")) for p in dirname[1:].split(".")]
        return validate_mailbox_name(HIERARCHY_DELIMITER.join(parts))
    except (ValueError, binascii.Error, UnicodeDecodeError, MailboxError):
        return None


def _check_address(key: str) -> None:
    """Refuse addresses that are not a plain directory name under ROOT (docs/security.md A6.5)."""
    bad = (
        not key
        or key.startswith((".", "~"))
        or any(c in key for c in "/\\")
        or any(ord(c) < 0x20 or c == "\x7f" for c in key)
        or len(key.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT
    )
    if bad:
        raise MailboxError(f"address {key!r} cannot be stored as a maildir", code="CANNOT")


def _flags_from_info(info: str) -> frozenset[str]:
    return frozenset(_LETTER_FLAGS[c] for c in info if c in _LETTER_FLAGS)


def _info_for(flags: Iterable[str], old_info: str = "") -> str:
    letters = {FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS}
    # Letters we do not model (P, keyword letters of other tools) are kept, as the spec asks.
    letters |= {c for c in old_info if c not in _LETTER_FLAGS}
    return "".join(sorted(letters))


def _keywords(flags: Iterable[str]) -> list[str]:
    return sorted(f for f in flags if f not in FLAG_LETTERS)


def _hostname() -> str:
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


# In-memory objects that know their files


class _MaildirBox(Mailbox):
    """A Mailbox with its directory and the state of its log."""

    __slots__ = ("log_records", "path", "root")

    def __init__(
        self,
        user: str,
        name: str,
        path: Path,
        *,
        root: Path,
        uidvalidity: int,
        special_use: str | None,
    ) -> None:
        super().__init__(user, name, uidvalidity=uidvalidity, special_use=special_use)
        self.path = path
        #: The store's resolved root: nothing below it on ``path`` may be a symbolic link.
        self.root = str(root)
        #: Records in the log file, live or dead: compaction is due when most are dead.
        self.log_records = 0

    def confined(self) -> bool:
        """True when the folder's directories and log are inside the root, links nowhere.

        One ``lstat`` for each of the root, the user directory, the folder, ``cur/ new/ tmp/``
        and the log.
        """
        if not _no_links_below(self.root, str(self.path)):
            return False
        try:
            if not all(_is_dir(self.path / sub) for sub in _SUBDIRS):
                return False
            return not stat.S_ISLNK(os.lstat(self.path / LOG_NAME).st_mode)
        except FileNotFoundError:
            return True  # no log yet: the next write creates it (with O_NOFOLLOW)
        except OSError:
            return False


class _MaildirMessage(StoredMessage):
    """A StoredMessage whose bytes stay in its file until someone reads ``raw``."""

    __slots__ = ("_box", "_file", "_pinned", "_size")

    def __init__(
        self,
        box: _MaildirBox,
        file: str,
        *,
        uid: int,
        size: int,
        internal_date: float,
        flags: frozenset[str],
        envelope_from: str = "",
        envelope_to: tuple[str, ...] = (),
    ) -> None:
        # The dataclass __init__ would assign ``raw``; set the fields ourselves instead.
        self.uid = uid
        self.internal_date = internal_date
        self.flags = flags
        self.user = box.user
        self.mailbox = box.name
        self.stored_monotonic = time.monotonic()
        self.envelope_from = envelope_from
        self.envelope_to = envelope_to
        self.cache = {}
        self._box = box
        #: ``new/<name>`` or ``cur/<name>:2,<info>``, relative to the folder.
        self._file = file
        self._size = size
        self._pinned: bytes | None = None

    @property
    def raw(self) -> bytes:
        """The message bytes, read from the file (renames by set_flags are retried)."""
        if self._pinned is not None:
            return self._pinned
        for _ in range(5):
            path = self._box.path / self._file
            if not _no_links_below(self._box.root, str(path.parent)):
                log.warning("refused to read %s: it leaves the maildir root", path)
                raise StorageError(
                    f"message {self.uid} of {self.user}:{self.mailbox} is not readable: "
                    "its folder is not a directory inside the maildir root"
                )
            try:
                return _read_file(path)
            except FileNotFoundError:
                if self._pinned is not None:
                    return self._pinned
                if self._box.path / self._file == path:
                    break
            except OSError as exc:
                raise StorageError(f"cannot read message file {path}: {exc}") from exc
        raise StorageError(f"message file {self._file!r} of {self.user}:{self.mailbox} is gone")

    @raw.setter
    def raw(self, value: bytes) -> None:
        self._pinned = bytes(value)
        self._size = len(value)

    @property
    def size(self) -> int:
        return self._size

    @property
    def base(self) -> str:
        """The unique part of the file name (what stays when flags change)."""
        return self._file.split("/", 1)[1].split(_INFO, 1)[0]

    @property
    def path(self) -> Path:
        """Where the message file is now."""
        return self._box.path / self._file

    def _pin(self) -> None:
        with contextlib.suppress(StorageError):
            self._pinned = self.raw


def _record(msg: _MaildirMessage) -> dict[str, Any]:
    rec: dict[str, Any] = {"uid": msg.uid, "file": msg.base, "date": msg.internal_date}
    if msg.envelope_from:
        rec["from"] = msg.envelope_from
    if msg.envelope_to:
        rec["to"] = list(msg.envelope_to)
    keywords = _keywords(msg.flags)
    if keywords:
        rec["kw"] = keywords
    return rec


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


class MaildirStore(Store):
    """A ``Store`` kept in a Maildir++ tree under ``root``, durable across crashes.

    Args:
        root: the directory holding one Maildir++ per user (created if missing).
        clock: wall-clock time in seconds (internal dates, UIDVALIDITY seeds).

    Raises:
        StorageError: ``root`` cannot be created or read, or another MaildirStore (in this
            or another process) holds it.

    Call ``close()`` (or use it as a context manager) to release the tree for another store.

    ``root`` is resolved once, here (it may be reached through a symbolic link); below it the
    store follows no link. A user directory or folder that is a link, or whose ``cur/``,
    ``new/``, ``tmp/`` or log is one, is skipped at start (see ``refused``) and refused by
    every operation while running (see the module docstring, "Confinement").
    """

    def __init__(
        self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(clock=clock)
        #: The resolved root: every path the store touches is built from it.
        self.root = Path(os.path.realpath(root))
        #: Paths under the root that were not loaded at start because they are (or contain)
        #: symbolic links, so they might lead out of the tree; each one is also logged.
        self.refused: list[Path] = []
        self._host = _hostname()
        self._deliveries = itertools.count(1)
        self._lock_fd: int | None = None
        try:
            os.makedirs(self.root, mode=_DIR_MODE, exist_ok=True)
            self._take_lock()
            self._empty_trash()
            self._load()
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot open maildir store {str(self.root)!r}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # lifecycle

    def _take_lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(
            self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW, _FILE_MODE
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(
                f"maildir store {str(self.root)!r} is in use by another MaildirStore"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the tree. The store must not be used afterwards. A second call does nothing."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> MaildirStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _empty_trash(self) -> None:
        trash = self.root / _TRASH_NAME
        with contextlib.suppress(OSError):  # a link in its place: rmtree would refuse it too
            if _is_dir(trash):
                shutil.rmtree(trash, ignore_errors=True)

    # paths

    def _user_dir(self, key: str) -> Path:
        _check_address(key)
        return self.root / key

    def _refuse(self, path: Path) -> None:
        """Record and log a user directory or folder skipped at start (see "Confinement")."""
        self.refused.append(path)
        log.warning("maildir: skipped %s: a symbolic link, or one inside it", path)

    def _check_box(self, box: _MaildirBox) -> None:
        if not box.confined():
            log.warning("maildir: refused %s: it is not a maildir inside the root", box.path)
            raise MailboxError(
                f"mailbox {box.name!r} is refused: its directory is not a maildir inside "
                "the store's root (a symbolic link?)",
                code="CANNOT",
            )

    def _check_user_dir(self, key: str) -> Path:
        """The user directory, refused (``MailboxError``) when a link is on its path."""
        path = self._user_dir(key)
        try:
            ok = _resolves_to_itself(path) and _is_dir(path)
        except OSError:
            ok = False
        if not ok:
            log.warning("maildir: refused %s: it is not a directory inside the root", path)
            raise MailboxError(
                f"the maildir of {key!r} is refused: it is not a directory inside the "
                "store's root (a symbolic link?)",
                code="CANNOT",
            )
        return path

    def _box_dir(self, key: str, name: str) -> Path:
        base = self._user_dir(key)
        if name == "INBOX":
            return base
        dirname = folder_dirname(name)
        if len(dirname.encode()) > _MAX_COMPONENT:
            raise MailboxError(f"mailbox name {name!r} is too long for a maildir", code="LIMIT")
        path = base / dirname
        # Defence in depth: the encoding above cannot produce a separator, but check anyway.
        if path.parent != base or not path.name.startswith("."):
            raise MailboxError(f"mailbox name {name!r} is not allowed", code="CANNOT")
        return path

    # loading

    def _load(self) -> None:
        unassigned: list[_MaildirBox] = []
        highest = 0
        refused_defaults: dict[str, set[str]] = {}
        for entry in sorted(os.listdir(self.root)):
            if entry.startswith(".") or self._key(entry) != entry:
                continue
            try:
                _check_address(entry)
            except MailboxError:
                continue
            user_dir = self.root / entry
            if not os.path.islink(user_dir) and not os.path.isdir(user_dir):
                continue  # a file: not a user
            if not self._loadable(user_dir):
                self._refuse(user_dir)
                continue
            boxes: dict[str, Mailbox] = {}
            found: list[tuple[str, Path]] = [("INBOX", user_dir)]
            for sub in sorted(os.listdir(user_dir)):
                name = folder_name(sub)
                path = user_dir / sub
                if name is None or name == "INBOX":
                    continue
                if not self._loadable(path):
                    if os.path.islink(path) or os.path.isdir(path / "cur"):
                        self._refuse(path)
                        refused_defaults.setdefault(entry, set()).add(name)
                    continue
                if _is_dir(path / "cur"):  # without cur/ it is not a folder (Maildir++)
                    found.append((name, path))
            for name, path in found:
                box = self._load_box(entry, name, path)
                if box.uidvalidity:
                    highest = max(highest, box.uidvalidity)
                else:
                    unassigned.append(box)
                boxes[name] = box
            self._mailboxes[entry] = boxes
        with contextlib.suppress(FileNotFoundError, ValueError):
            highest = max(highest, int(_read_file(self.root / _UIDVALIDITY_NAME)))
        seed = max(int(self._clock()) & 0x7FFFFFFF or 1, highest + 1)
        self._uidvalidity = itertools.count(seed)
        for box in unassigned:
            box.uidvalidity = next(self._uidvalidity)
        for user, boxes in self._mailboxes.items():
            for name in DEFAULT_FOLDERS:
                if name not in boxes and name not in refused_defaults.get(user, ()):
                    boxes[name] = self._new_box(user, name)
            for each in boxes.values():
                assert isinstance(each, _MaildirBox)
                if each in unassigned or each.log_records > 2 * len(each) + 64:
                    self._rewrite_log(each)

    @staticmethod
    def _loadable(path: Path) -> bool:
        """False when the directory, its ``cur/ new/ tmp/`` or its log is a symbolic link.

        Missing subdirectories are fine here: an INBOX is completed, and the caller skips
        a folder without ``cur/`` (Maildir++).
        """
        try:
            if not _is_dir(path):
                return False
            for sub in _SUBDIRS:
                _is_dir(path / sub)  # missing is fine (created), anything else is not
            return not os.path.islink(path / LOG_NAME)
        except OSError:
            return False

    def _load_box(self, user: str, name: str, path: Path) -> _MaildirBox:
        _make_maildir(path, folder=name != "INBOX")
        self._clean_tmp(path / "tmp")
        header: dict[str, Any] = {}
        records: dict[str, dict[str, Any]] = {}
        keywords: dict[int, list[str]] = {}
        count = 0
        log_path = path / LOG_NAME
        try:
            lines = _read_file(log_path).split(b"\n")
        except FileNotFoundError:
            lines = []
        uidnext = 1
        subscribed = True
        for index, line in enumerate(lines):
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a torn last line (crash mid-append), or damage: the files decide
            if not isinstance(item, dict):
                continue
            if index == 0 and "roundtrip-uidlist" in item:
                header = item
                uidnext = max(uidnext, int(item.get("uidnext", 1)))
                subscribed = bool(item.get("subscribed", True))
            elif "file" in item and "uid" in item:
                records[str(item["file"])] = item
                uidnext = max(uidnext, int(item["uid"]) + 1)
                count += 1
            elif "uid" in item and "kw" in item:
                keywords[int(item["uid"])] = [str(k) for k in item["kw"]]
                count += 1
            elif "subscribed" in item:
                subscribed = bool(item["subscribed"])
                count += 1
        special = header.get("special_use", DEFAULT_FOLDERS.get(name))
        box = _MaildirBox(
            user,
            name,
            path,
            root=self.root,
            uidvalidity=int(header.get("uidvalidity", 0)),
            special_use=special if isinstance(special, str) else None,
        )
        box.subscribed = subscribed
        box.log_records = count
        known: list[_MaildirMessage] = []
        strays: list[tuple[float, str, str, int]] = []
        seen_bases: set[str] = set()
        for sub in ("cur", "new"):
            for entry in os.scandir(path / sub):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                base, _, info = entry.name.partition(_INFO)
                if base in seen_bases:
                    continue
                seen_bases.add(base)
                st = entry.stat(follow_symlinks=False)
                rec = records.get(base)
                if rec is None:
                    strays.append((st.st_mtime, entry.name, sub, st.st_size))
                    continue
                uid = int(rec["uid"])
                flags = _flags_from_info(info) | frozenset(keywords.get(uid, rec.get("kw", [])))
                known.append(
                    _MaildirMessage(
                        box,
                        f"{sub}/{entry.name}",
                        uid=uid,
                        size=st.st_size,
                        internal_date=float(rec.get("date", st.st_mtime)),
                        flags=flags,
                        envelope_from=str(rec.get("from", "")),
                        envelope_to=tuple(str(t) for t in rec.get("to", [])),
                    )
                )
        known.sort(key=lambda m: m.uid)
        for msg in known:
            if box._uids and msg.uid <= box._uids[-1]:
                strays.append((msg.internal_date, msg._file.split("/")[1], msg._file[:3], msg.size))
                continue  # a duplicated UID in a damaged log: renumber it
            box._add(msg)
        box.uidnext = uidnext
        fresh: list[_MaildirMessage] = []
        for mtime, filename, sub, size in sorted(strays):
            info = filename.partition(_INFO)[2]
            msg = _MaildirMessage(
                box,
                f"{sub}/{filename}",
                uid=box.uidnext,
                size=size,
                internal_date=mtime,
                flags=_flags_from_info(info),
            )
            box.uidnext += 1
            box._add(msg)
            fresh.append(msg)
        if fresh and header:
            _append_file(log_path, b"".join(_dumps(_record(m)) for m in fresh))
            box.log_records += len(fresh)
        return box

    def _clean_tmp(self, tmp: Path) -> None:
        now = time.time()
        for entry in os.scandir(tmp):
            try:
                ours = _OUR_FILE.match(entry.name) is not None
                if ours or now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                    os.unlink(entry.path)
            except OSError:
                continue

    # metadata

    def _header(self, box: _MaildirBox) -> dict[str, Any]:
        return {
            "roundtrip-uidlist": 1,
            "uidvalidity": box.uidvalidity,
            "uidnext": box.uidnext,
            "special_use": box.special_use,
            "subscribed": box.subscribed,
        }

    def _rewrite_log(self, box: _MaildirBox) -> None:
        lines = [_dumps(self._header(box))]
        for msg in box:
            assert isinstance(msg, _MaildirMessage)
            lines.append(_dumps(_record(msg)))
        _replace_file(box.path / LOG_NAME, b"".join(lines))
        box.log_records = len(box)

    def _append_log(self, box: _MaildirBox, records: list[dict[str, Any]]) -> None:
        _append_file(box.path / LOG_NAME, b"".join(_dumps(r) for r in records))
        box.log_records += len(records)

    def _maybe_compact(self, box: _MaildirBox) -> None:
        if box.log_records > 2 * len(box) + 256:
            with contextlib.suppress(OSError):  # the old log stays valid; retry next time
                self._rewrite_log(box)

    def _new_box(self, key: str, name: str, *, special_use: str | None = None) -> _MaildirBox:
        """Create a folder on disk (directories, then the log) and return it."""
        path = self._box_dir(key, name)
        use = DEFAULT_FOLDERS.get(name) if special_use is None else special_use
        box = _MaildirBox(
            key, name, path, root=self.root, uidvalidity=next(self._uidvalidity), special_use=use
        )
        _make_maildir(path, folder=name != "INBOX")
        self._rewrite_log(box)
        return box

    # users

    def add_user(self, address: str, password: str | None) -> None:
        """Create a user with the default folders on disk; an existing one gets the password.

        Raises:
            MailboxError: the address cannot be a directory name.
            StorageError: the directories could not be written, or the user's directory is
                there but is not a directory inside the root (a symbolic link: nothing is
                written through it).
        """
        key = self._key(address)
        with self._lock:
            if key not in self._mailboxes:
                path = self._user_dir(key)
                try:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(path, _DIR_MODE)
                    self._check_user_dir(key)
                except (OSError, MailboxError) as exc:
                    raise StorageError(f"cannot create the maildir of {key!r}: {exc}") from exc
                try:
                    self._mailboxes[key] = {
                        name: self._new_box(key, name) for name in DEFAULT_FOLDERS
                    }
                except OSError as exc:
                    raise StorageError(f"cannot create the maildir of {key!r}: {exc}") from exc
            self._passwords[key] = password

    def has_user(self, address: str) -> bool:
        return self._key(address) in self._mailboxes

    def users(self) -> list[str]:
        with self._lock:
            return sorted(self._mailboxes)

    # mailboxes

    def mailbox(self, address: str, name: str = "INBOX") -> Mailbox:
        """The mailbox ``name`` of ``address``, after checking its directories.

        Raises:
            MailboxError: ``NONEXISTENT`` when there is no such user or mailbox; ``CANNOT``
                when its directory, ``cur/ new/ tmp/`` or log is no longer a plain entry
                inside the root (say, swapped for a symbolic link while the store runs).
        """
        box = super().mailbox(address, name)
        assert isinstance(box, _MaildirBox)
        self._check_box(box)
        return box

    def _box(self, address: str, name: str) -> _MaildirBox:
        box = self.mailbox(address, name)
        assert isinstance(box, _MaildirBox)
        return box

    def create_mailbox(self, address: str, name: str) -> Mailbox:
        canonical = validate_mailbox_name(name.rstrip(HIERARCHY_DELIMITER))
        key = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            if canonical in boxes:
                raise MailboxError(f"mailbox {name!r} already exists", code="ALREADYEXISTS")
            path = self._box_dir(key, canonical)
            self._check_user_dir(key)
            if os.path.lexists(path):
                raise MailboxError(f"mailbox {name!r} exists on disk", code="ALREADYEXISTS")
            try:
                box = _MaildirBox(
                    key,
                    canonical,
                    path,
                    root=self.root,
                    uidvalidity=next(self._uidvalidity),
                    special_use=None,
                )
                _make_maildir(path, folder=True)
                self._rewrite_log(box)
            except OSError as exc:
                shutil.rmtree(path, ignore_errors=True)
                raise self._storage_error(f"cannot create mailbox {name!r}", exc) from exc
            boxes[canonical] = box
            self._bump()
        self._notify(StoreChange(key, canonical, "mailboxes"))
        return box

    def _forget_uidvalidity(self, box: _MaildirBox) -> None:
        """Remember the UIDVALIDITY of a folder about to be deleted (see _UIDVALIDITY_NAME)."""
        path = self.root / _UIDVALIDITY_NAME
        try:
            known = int(_read_file(path))
        except (FileNotFoundError, ValueError):
            known = 0
        if box.uidvalidity > known:
            _replace_file(path, b"%d\n" % box.uidvalidity)

    def _trash(self, box: _MaildirBox) -> None:
        """Remove a folder directory: first out of sight (one rename), then from the disk."""
        self._forget_uidvalidity(box)
        path = box.path
        trash = self.root / _TRASH_NAME
        if not _is_dir(trash):  # ENOTDIR when a link is in its place
            os.mkdir(trash, _DIR_MODE)
        target = trash / secrets.token_hex(8)
        os.rename(path, target)
        fsync_dir(path.parent)
        shutil.rmtree(target, ignore_errors=True)

    def delete_mailbox(self, address: str, name: str) -> None:
        canonical = validate_mailbox_name(name)
        if canonical == "INBOX":
            raise MailboxError("INBOX cannot be deleted", code="CANNOT")
        key = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            box = boxes.get(canonical)
            if box is None:
                raise MailboxError(f"no mailbox {name!r}", code="NONEXISTENT")
            assert isinstance(box, _MaildirBox)
            self._check_box(box)
            try:
                self._trash(box)
            except OSError as exc:
                raise self._storage_error(f"cannot delete mailbox {name!r}", exc) from exc
            del boxes[canonical]
            self._bump()
        self._notify(StoreChange(key, canonical, "mailboxes"))

    def rename_mailbox(self, address: str, old: str, new: str) -> None:
        """Rename a mailbox and its children. Renaming INBOX moves its messages (RFC 3501 6.3.5)."""
        src = validate_mailbox_name(old)
        dst = validate_mailbox_name(new)
        key = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            if src not in boxes:
                raise MailboxError(f"no mailbox {old!r}", code="NONEXISTENT")
            if dst in boxes:
                raise MailboxError(f"mailbox {new!r} already exists", code="ALREADYEXISTS")
            self._check_user_dir(key)
            try:
                if src == "INBOX":
                    self._rename_inbox(key, boxes, dst)
                else:
                    self._rename_tree(key, boxes, src, dst)
            except OSError as exc:
                raise self._storage_error(f"cannot rename {old!r} to {new!r}", exc) from exc
            self._bump()
        self._notify(StoreChange(key, dst, "mailboxes"))

    def _rename_tree(self, key: str, boxes: dict[str, Mailbox], src: str, dst: str) -> None:
        prefix = src + HIERARCHY_DELIMITER
        moves: list[tuple[_MaildirBox, str, Path]] = []
        for name in [n for n in boxes if n == src or n.startswith(prefix)]:
            box = boxes[name]
            assert isinstance(box, _MaildirBox)
            self._check_box(box)
            new_name = dst + name[len(src) :]
            new_path = self._box_dir(key, new_name)
            if new_name in boxes or os.path.lexists(new_path):
                raise MailboxError(f"mailbox {new_name!r} already exists", code="ALREADYEXISTS")
            moves.append((box, new_name, new_path))
        done: list[tuple[_MaildirBox, Path]] = []
        try:
            for box, _, new_path in moves:
                os.rename(box.path, new_path)
                done.append((box, new_path))
            fsync_dir(self._user_dir(key))
        except OSError:
            for box, new_path in reversed(done):
                with contextlib.suppress(OSError):
                    os.rename(new_path, box.path)
            raise
        for box, new_name, new_path in moves:
            del boxes[box.name]
            box.name = new_name
            box.path = new_path
            for msg in box:
                msg.mailbox = new_name
            boxes[new_name] = box

    def _rename_inbox(self, key: str, boxes: dict[str, Mailbox], dst: str) -> None:
        inbox = boxes["INBOX"]
        assert isinstance(inbox, _MaildirBox)
        self._check_box(inbox)
        if os.path.lexists(self._box_dir(key, dst)):
            raise MailboxError(f"mailbox {dst!r} exists on disk", code="ALREADYEXISTS")
        target = self._new_box(key, dst)
        target.special_use = None
        moved: list[_MaildirMessage] = []
        try:
            for msg in list(inbox):
                assert isinstance(msg, _MaildirMessage)
                os.rename(msg.path, target.path / msg._file)
                moved.append(msg)
        finally:
            for sub in ("cur", "new"):
                with contextlib.suppress(OSError):
                    fsync_dir(target.path / sub)
                    fsync_dir(inbox.path / sub)
            for msg in moved:
                copy = _MaildirMessage(
                    target,
                    msg._file,
                    uid=target.uidnext,
                    size=msg.size,
                    internal_date=msg.internal_date,
                    flags=msg.flags,
                    envelope_from=msg.envelope_from,
                    envelope_to=msg.envelope_to,
                )
                target.uidnext += 1
                target._add(copy)
                msg._box = target
                msg._file = copy._file
            inbox._remove([m.uid for m in moved])
            boxes[dst] = target
            with contextlib.suppress(OSError):
                self._rewrite_log(target)
                self._rewrite_log(inbox)

    def subscribe(self, address: str, name: str, subscribed: bool = True) -> None:
        box = self._box(address, name)
        with self._lock:
            if box.subscribed == subscribed:
                return
            try:
                self._append_log(box, [{"subscribed": subscribed}])
            except OSError as exc:
                raise self._storage_error(f"cannot record subscription of {name!r}", exc) from exc
            box.subscribed = subscribed

    # messages

    def _unique_name(self, size: int) -> str:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return (
            f"{sec}.M{usec}P{os.getpid()}Q{next(self._deliveries)}R{secrets.token_hex(6)}"
            f".{self._host},S={size}"
        )

    def _put(
        self,
        box: Mailbox,
        raw: bytes,
        flags: Iterable[str],
        internal_date: float | None,
        envelope_from: str = "",
        envelope_to: tuple[str, ...] = (),
    ) -> StoredMessage:
        """Write one message durably; called with the store lock held.

        Order: tmp/ file, fsync, rename into new/ or cur/, directory fsync, UID record
        appended and fsynced. On ``OSError`` everything written is removed again.
        """
        assert isinstance(box, _MaildirBox)
        flagset = frozenset(flags)
        data = bytes(raw)
        when = self._clock() if internal_date is None else internal_date
        base = self._unique_name(len(data))
        info = _info_for(flagset)
        sub = "cur" if flagset else "new"
        filename = f"{base}{_INFO}{info}" if sub == "cur" else base
        tmp = box.path / "tmp" / base
        dest = box.path / sub / filename
        msg = _MaildirMessage(
            box,
            f"{sub}/{filename}",
            uid=box.uidnext,
            size=len(data),
            internal_date=when,
            flags=flagset,
            envelope_from=envelope_from,
            envelope_to=tuple(envelope_to),
        )
        placed = False
        try:
            _create_file(tmp, data, mtime=when)
            if os.path.lexists(dest):  # pragma: no cover - the name is unique by construction
                raise OSError(errno.EEXIST, "maildir file name collision", str(dest))
            os.rename(tmp, dest)
            placed = True
            fsync_dir(box.path / sub)
            self._append_log(box, [_record(msg)])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if placed:
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                    fsync_dir(box.path / sub)
            what = f"cannot store a message in {box.user}:{box.name}"
            raise self._storage_error(what, exc) from exc
        box.uidnext += 1
        box._add(msg)
        return msg

    def set_flags(
        self, address: str, mailbox: str, updates: dict[int, frozenset[str]]
    ) -> list[StoredMessage]:
        """Replace the flags of the messages with the given UIDs; returns the changed ones.

        System flags are renamed into the file name; keywords are appended to the log.

        Raises:
            StorageError: a rename or the log failed (messages changed before that stay
                changed and are announced).
        """
        box = self._box(address, mailbox)
        changed: list[StoredMessage] = []
        dirs: set[Path] = set()
        failure: OSError | None = None
        with self._lock:
            for uid, flags in updates.items():
                msg = box.get(uid)
                if msg is None or msg.flags == flags:
                    continue
                assert isinstance(msg, _MaildirMessage)
                flags = frozenset(flags)
                try:
                    self._apply_flags(box, msg, flags, dirs)
                except OSError as exc:
                    failure = exc
                    break
                msg.flags = flags
                changed.append(msg)
            try:
                for path in dirs:
                    fsync_dir(path)
            except OSError as exc:
                failure = failure or exc
            if changed:
                box.modseq += 1
                self._bump()
            self._maybe_compact(box)
        if changed:
            uids = tuple(m.uid for m in changed)
            self._notify(StoreChange(box.user, box.name, "flags", uids))
        if failure is not None:
            raise self._storage_error(f"cannot store flags in {box.user}:{box.name}", failure)
        return changed

    def _apply_flags(
        self, box: _MaildirBox, msg: _MaildirMessage, flags: frozenset[str], dirs: set[Path]
    ) -> None:
        sub, _, name = msg._file.partition("/")
        base, _, old_info = name.partition(_INFO)
        info = _info_for(flags, old_info)
        new_sub = "cur" if (sub == "cur" or info or flags) else "new"
        new_file = f"{new_sub}/{base}{_INFO}{info}" if new_sub == "cur" else f"new/{base}"
        old_file = msg._file
        if new_file != old_file:
            os.rename(box.path / old_file, box.path / new_file)
            dirs.update({box.path / sub, box.path / new_sub})
            msg._file = new_file
        if _keywords(flags) != _keywords(msg.flags):
            try:
                self._append_log(box, [{"uid": msg.uid, "kw": _keywords(flags)}])
            except OSError:
                if new_file != old_file:  # put the file back: the flags did not change
                    with contextlib.suppress(OSError):
                        os.rename(box.path / new_file, box.path / old_file)
                        msg._file = old_file
                raise

    def expunge(self, address: str, mailbox: str, uids: Iterable[int]) -> list[int]:
        """Remove messages by UID (their files are unlinked); returns the UIDs removed."""
        box = self._box(address, mailbox)
        gone: list[int] = []
        failure: OSError | None = None
        with self._lock:
            for uid in sorted(set(uids)):
                msg = box.get(uid)
                if msg is None:
                    continue
                assert isinstance(msg, _MaildirMessage)
                msg._pin()  # sessions that still hold it may read it (RFC 3501 7.4.1)
                try:
                    os.unlink(msg.path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failure = exc
                    break
                gone.append(uid)
            try:
                for sub in ("cur", "new"):
                    fsync_dir(box.path / sub)
            except OSError as exc:
                failure = failure or exc
            box._remove(gone)
            if gone:
                self._bump()
                self._maybe_compact(box)
        if gone:
            self._notify(StoreChange(box.user, box.name, "expunged", tuple(gone)))
        if failure is not None:
            raise self._storage_error(f"cannot expunge in {box.user}:{box.name}", failure)
        return gone

    def clear(self) -> None:
        """Empty every mailbox (users and default folders stay; UIDs keep increasing).

        A folder that is no longer a maildir inside the root (see ``mailbox``) is left alone,
        on disk and in memory: nothing is deleted through a symbolic link.
        """
        with self._lock:
            try:
                for boxes in self._mailboxes.values():
                    for name in [n for n in boxes if n not in DEFAULT_FOLDERS]:
                        box = boxes[name]
                        assert isinstance(box, _MaildirBox)
                        if not box.confined():
                            continue
                        self._trash(box)
                        del boxes[name]
                    for box in boxes.values():
                        assert isinstance(box, _MaildirBox)
                        if not box.confined():
                            continue
                        for msg in box:
                            assert isinstance(msg, _MaildirMessage)
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(msg.path)
                        box._remove(box.uids())
                        for sub in ("cur", "new"):
                            fsync_dir(box.path / sub)
                        self._rewrite_log(box)
            except OSError as exc:
                raise self._storage_error("cannot clear the maildir store", exc) from exc
            finally:
                self._bump()
        self._notify(StoreChange("", "", "mailboxes"))

    # helpers

    @staticmethod
    def _storage_error(what: str, exc: OSError) -> StorageError | MailboxError:
        if exc.errno == errno.ENAMETOOLONG:
            return MailboxError(f"{what}: the name is too long", code="LIMIT")
        return StorageError(f"{what}: {exc.strerror or exc}")
