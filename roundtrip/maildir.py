"""A durable mailbox store on a Maildir++ tree: the ``Store`` interface, kept on disk.

Layout (readable by Dovecot, mutt and Python's ``mailbox.Maildir``)::

    ROOT/.roundtrip.lock              flock: one MaildirStore per tree at a time
    ROOT/.roundtrip-trash/            deleted folders on their way out (emptied at start)
    ROOT/<address>/                   INBOX: cur/ new/ tmp/ + roundtrip-uidlist
    ROOT/<address>/roundtrip-subscriptions   the user's subscribed names (RFC 3501 6.3.6)
    ROOT/<address>/.Sent/             a folder (Maildir++): cur/ new/ tmp/ maildirfolder + log
    ROOT/<address>/.A.B/              the folder ``A/B``

The formats themselves (file names, flag letters, folder names, the log) are pure functions in
``roundtrip/_maildirfmt.py``; this module does the file operations. Every rule of the ``Store``
interface (names, existence, INBOX, locking, notification) is ``Store``'s, checked once for
both backends; ``MaildirStore`` only implements its storage hooks.

Folder names on disk are modified UTF-7 (Dovecot's default) with ``\\`` inside a name written
``\\5c`` and ``.`` written ``\\2e`` (Dovecot's listescape style), so the mapping is one to one
(``a\\2eb`` and ``a.b`` get different directories, and come back under their own names after a
restart), and a name can never leave ``ROOT/<address>/``. A directory whose name is not what
some mailbox name encodes to (a stray ``\\``, say) is not a folder of ours and is skipped.

Message files are named ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>,S=<size>[:2,<flags>]``,
with the maildir flag letters D F R S T. The file's mtime is the internal date. Keywords (and
any flag without a letter), the envelope and the UID live in ``roundtrip-uidlist``: a
JSON-lines log per folder. Its first line holds UIDVALIDITY, UIDNEXT and SPECIAL-USE; each
later line is one record (a new UID for a file, new keywords). Records are appended and
fsynced; a torn last line from a crash is ignored. When dead records pile up the log is
rewritten atomically (temporary file, fsync, rename, directory fsync).

Subscriptions are the user's, not a folder's (RFC 3501 6.3.6: a deleted mailbox stays
subscribed, a missing one may be subscribed): ``roundtrip-subscriptions`` in the user
directory holds the list, replaced atomically the same way on every change. A tree written
before that file existed kept each folder's subscription in its log; at start the file is
built from those.

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
``cur/``, ``new/``, ``tmp/``, ``roundtrip-uidlist``, ``roundtrip-subscriptions``, message file,
trash directory or lock file may be a link. At start such a user or folder is skipped, logged
and listed in ``MaildirStore.refused``, never followed, and a refused default folder is not
re-created. While running, every access checks the folder's path first (``mailbox()``, hence
SELECT, STATUS, APPEND, delivery, COPY, STORE, EXPUNGE, POP3 login; RENAME, DELETE, CREATE,
SUBSCRIBE; reading a message), so a directory swapped for a link while the store runs is
refused too: with ``MailboxError`` code ``CANNOT`` (reading a message: ``StorageError``), which
IMAP answers with NO and POP3 with -ERR. Last components are opened with ``O_NOFOLLOW``. Not
closed: a swap in the microseconds between a check and the system call after it (that needs
``openat``-relative paths throughout).

Passwords are never written to disk. A recovered user exists (its mail is kept and new mail
for it accepted) but cannot log in until ``add_user`` gives it a password again; the stack does
that for its configured users every time it starts.

Message bytes are not kept in memory: ``StoredMessage.raw`` reads the file on each access
(an expunged message keeps its bytes for readers that still hold it).
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import itertools
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _maildirfmt as fmt
from ._maildirfmt import FLAG_LETTERS, LOG_NAME
from .errors import MailboxError, RoundtripError, StorageError
from .spool import fsync_dir
from .store import (
    DEFAULT_FOLDERS,
    HIERARCHY_DELIMITER,
    Mailbox,
    Store,
    StoredMessage,
    init_fields,
    validate_mailbox_name,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["FLAG_LETTERS", "LOG_NAME", "MaildirStore", "folder_dirname", "folder_name"]

log = logging.getLogger("roundtrip.maildir")

_LOCK_NAME = ".roundtrip.lock"
_TRASH_NAME = ".roundtrip-trash"
# The highest UIDVALIDITY of a deleted folder, so a re-created one gets a larger value even
# after a restart (RFC 3501 2.3.1.1; Dovecot keeps dovecot-uidvalidity for the same reason).
_UIDVALIDITY_NAME = ".roundtrip-uidvalidity"
# The maildir spec: tmp/ files untouched for 36 hours are garbage, whoever wrote them.
_STALE_TMP_SECONDS = 36 * 3600
_DIR_MODE = 0o700
_FILE_MODE = 0o600
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


def _create_file(path: Path, data: bytes, *, mtime: float | None = None, head: bytes = b"") -> None:
    """Write a new file, ``head`` then ``data``, and fsync it; on failure nothing is left at
    ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, _FILE_MODE)
    try:
        try:
            if head:
                _write_all(fd, head)
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


def folder_dirname(name: str) -> str:
    """The Maildir++ directory of a canonical non-INBOX mailbox name (``A/B`` -> ``.A.B``)."""
    return "." + ".".join(fmt.encode_part(p) for p in name.split(HIERARCHY_DELIMITER))


def folder_name(dirname: str) -> str | None:
    """The mailbox name of a Maildir++ directory, or None when it is not a valid folder."""
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    try:
        parts = [fmt.decode_part(p) for p in dirname[1:].split(".")]
        name = validate_mailbox_name(HIERARCHY_DELIMITER.join(parts))
    except (ValueError, binascii.Error, UnicodeDecodeError, MailboxError):
        return None
    # Only the directory that name is written to is that folder: another spelling (modified
    # UTF-7 that is not the shortest, a case we do not write) would be a second directory
    # for the same name.
    return name if name == "INBOX" or folder_dirname(name) == dirname else None


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
        init_fields(self, uid, internal_date, flags, box.user, box.name, envelope_from, envelope_to)
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
        return self._file.split("/", 1)[1].split(fmt.INFO, 1)[0]

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
    keywords = fmt.keywords(msg.flags)
    if keywords:
        rec["kw"] = keywords
    return rec


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

    Every public method is ``Store``'s: the rules (names, existence, INBOX, locking,
    notification) are checked there, once; this class implements the storage hooks with file
    operations (``OSError`` becomes ``StorageError``, see ``_storage_error``).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(clock=clock)
        #: The resolved root: every path the store touches is built from it.
        self.root = Path(os.path.realpath(root))
        #: Paths under the root that were not loaded at start because they are (or contain)
        #: symbolic links, so they might lead out of the tree (a user directory, a folder, a
        #: ``roundtrip-subscriptions`` file); each one is also logged.
        self.refused: list[Path] = []
        self._host = fmt.hostname()
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
        fmt.check_user_dirname(key)
        return self.root / key

    def _refuse(self, path: Path) -> None:
        """Record and log a user directory or folder skipped at start (see "Confinement")."""
        self.refused.append(path)
        log.warning("maildir: skipped %s: a symbolic link, or one inside it", path)

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
        if len(dirname.encode()) > fmt.MAX_COMPONENT:
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
            user_dir = self.root / entry
            if not self._is_user_entry(entry, user_dir):
                continue
            if not self._loadable(user_dir):
                self._refuse(user_dir)
                continue
            boxes: dict[str, Mailbox] = {}
            found = self._folders_of(user_dir, refused_defaults.setdefault(entry, set()))
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
                box = _as_box(each)
                if box in unassigned or box.log_records > 2 * len(box) + 64:
                    self._rewrite_log(box)
            self._load_subscriptions(user, boxes)

    def _load_subscriptions(self, user: str, boxes: dict[str, Mailbox]) -> None:
        """The user's subscription list; built from the folders' logs when there is none."""
        path = self.root / user / fmt.SUBSCRIPTIONS_NAME
        names: list[str] | None = None
        try:
            names = fmt.parse_subscriptions(_read_file(path))
        except FileNotFoundError:
            pass
        except OSError:  # ELOOP: a link, never read (it is replaced by a file below)
            self._refuse(path)
        subscribed: set[str] = set()
        if names is None:
            # Written before the list had its own file: each folder's log kept its own flag.
            subscribed = {name for name, box in boxes.items() if box.subscribed}
        for name in names or ():
            with contextlib.suppress(MailboxError):  # a name no client could have sent
                subscribed.add(validate_mailbox_name(name))
        if names is None:
            _replace_file(path, fmt.dump_subscriptions(subscribed))
        self._set_subscriptions(user, frozenset(subscribed))

    def _is_user_entry(self, entry: str, path: Path) -> bool:
        """True when a root entry names a user: a lower-case address, a directory or a link."""
        if entry.startswith(".") or self._key(entry) != entry:
            return False
        try:
            fmt.check_user_dirname(entry)
        except MailboxError:
            return False
        return os.path.islink(path) or os.path.isdir(path)  # a file is not a user

    def _folders_of(self, user_dir: Path, refused: set[str]) -> list[tuple[str, Path]]:
        """INBOX and the loadable folders of a user directory; refused ones go to ``refused``."""
        found: list[tuple[str, Path]] = [("INBOX", user_dir)]
        for sub in sorted(os.listdir(user_dir)):
            name = folder_name(sub)
            path = user_dir / sub
            if name is None or name == "INBOX":
                continue
            if not self._loadable(path):
                if os.path.islink(path) or os.path.isdir(path / "cur"):
                    self._refuse(path)
                    refused.add(name)
                continue
            if _is_dir(path / "cur"):  # without cur/ it is not a folder (Maildir++)
                found.append((name, path))
        return found

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
        """A folder as on disk: its log's UIDs, then new UIDs for files the log lacks."""
        _make_maildir(path, folder=name != "INBOX")
        self._clean_tmp(path / "tmp")
        log_path = path / LOG_NAME
        try:
            uidlist = fmt.parse_uidlist(_read_file(log_path))
        except FileNotFoundError:
            uidlist = fmt.Uidlist()
        special = uidlist.header.get("special_use", DEFAULT_FOLDERS.get(name))
        box = _MaildirBox(
            user,
            name,
            path,
            root=self.root,
            uidvalidity=int(uidlist.header.get("uidvalidity", 0)),
            special_use=special if isinstance(special, str) else None,
        )
        box.subscribed = uidlist.subscribed
        box.log_records = uidlist.count
        known, strays = self._scan_files(box, uidlist)
        for msg in sorted(known, key=lambda m: m.uid):
            if box._uids and msg.uid <= box._uids[-1]:
                strays.append((msg.internal_date, msg._file.split("/")[1], msg._file[:3], msg.size))
                continue  # a duplicated UID in a damaged log: renumber it
            box._add(msg)
        box.uidnext = uidlist.uidnext
        # \Recent (RFC 3501 2.3.2) is not kept on disk: what the log knew before this start
        # was seen by some earlier session; files dropped in since (below) are new arrivals.
        box.first_recent_uid = box.uidnext
        fresh: list[_MaildirMessage] = []
        for mtime, filename, sub, size in sorted(strays):
            info = filename.partition(fmt.INFO)[2]
            msg = _MaildirMessage(
                box,
                f"{sub}/{filename}",
                uid=box.uidnext,
                size=size,
                internal_date=mtime,
                flags=fmt.flags_from_info(info),
            )
            box.uidnext += 1
            box._add(msg)
            fresh.append(msg)
        if fresh and uidlist.header:
            _append_file(log_path, b"".join(fmt.dumps(_record(m)) for m in fresh))
            box.log_records += len(fresh)
        return box

    @staticmethod
    def _scan_files(
        box: _MaildirBox, uidlist: fmt.Uidlist
    ) -> tuple[list[_MaildirMessage], list[tuple[float, str, str, int]]]:
        """The message files of a folder: those with a UID record, and (mtime, name, sub,
        size) of the others."""
        known: list[_MaildirMessage] = []
        strays: list[tuple[float, str, str, int]] = []
        seen_bases: set[str] = set()
        for sub in ("cur", "new"):
            for entry in os.scandir(box.path / sub):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                base, _, info = entry.name.partition(fmt.INFO)
                if base in seen_bases:
                    continue
                seen_bases.add(base)
                st = entry.stat(follow_symlinks=False)
                rec = uidlist.records.get(base)
                if rec is None:
                    strays.append((st.st_mtime, entry.name, sub, st.st_size))
                    continue
                uid = int(rec["uid"])
                kw = uidlist.keywords.get(uid, rec.get("kw", []))
                known.append(
                    _MaildirMessage(
                        box,
                        f"{sub}/{entry.name}",
                        uid=uid,
                        size=st.st_size,
                        internal_date=float(rec.get("date", st.st_mtime)),
                        flags=fmt.flags_from_info(info) | frozenset(kw),
                        envelope_from=str(rec.get("from", "")),
                        envelope_to=tuple(str(t) for t in rec.get("to", [])),
                    )
                )
        return known, strays

    def _clean_tmp(self, tmp: Path) -> None:
        now = time.time()
        for entry in os.scandir(tmp):
            try:
                ours = fmt.OUR_FILE.match(entry.name) is not None
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
        }

    def _rewrite_log(self, box: _MaildirBox) -> None:
        lines = [fmt.dumps(self._header(box))]
        lines += [fmt.dumps(_record(_as_message(msg))) for msg in box]
        _replace_file(box.path / LOG_NAME, b"".join(lines))
        box.log_records = len(box)

    def _append_log(self, box: _MaildirBox, records: list[dict[str, Any]]) -> None:
        _append_file(box.path / LOG_NAME, b"".join(fmt.dumps(r) for r in records))
        box.log_records += len(records)

    def _maybe_compact(self, box: _MaildirBox) -> None:
        if box.log_records > 2 * len(box) + 256:
            with contextlib.suppress(OSError):  # the old log stays valid; retry next time
                self._rewrite_log(box)

    def _new_box(self, key: str, name: str) -> _MaildirBox:
        """A default folder on disk (directories completed if some exist, then the log)."""
        path = self._box_dir(key, name)
        box = _MaildirBox(
            key,
            name,
            path,
            root=self.root,
            uidvalidity=next(self._uidvalidity),
            special_use=DEFAULT_FOLDERS.get(name),
        )
        _make_maildir(path, folder=name != "INBOX")
        self._rewrite_log(box)
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

    @staticmethod
    def _storage_error(what: str, exc: OSError) -> StorageError | MailboxError:
        if exc.errno == errno.ENAMETOOLONG:
            return MailboxError(f"{what}: the name is too long", code="LIMIT")
        return StorageError(f"{what}: {exc.strerror or exc}")

    # Storage hooks of Store: users and mailboxes

    def _new_user(self, user: str) -> dict[str, Mailbox]:
        """The user directory and the default folders, on disk.

        Raises:
            MailboxError: the address cannot be a directory name.
            StorageError: the directories could not be written, or the user's directory is
                there but is not a directory inside the root (a symbolic link: nothing is
                written through it).
        """
        path = self._user_dir(user)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, _DIR_MODE)
            self._check_user_dir(user)
        except (OSError, MailboxError) as exc:
            raise StorageError(f"cannot create the maildir of {user!r}: {exc}") from exc
        try:
            return {name: self._new_box(user, name) for name in DEFAULT_FOLDERS}
        except OSError as exc:
            raise StorageError(f"cannot create the maildir of {user!r}: {exc}") from exc

    def _new_mailbox(self, user: str, name: str, *, special_use: str | None = None) -> Mailbox:
        """A new folder on disk (CREATE, or the target of renaming INBOX).

        Raises:
            MailboxError: ``LIMIT`` (name too long for a file name), ``CANNOT`` (the user
                directory is refused), ``ALREADYEXISTS`` (something is in its place on disk).
        """
        path = self._box_dir(user, name)
        self._check_user_dir(user)
        if os.path.lexists(path):
            raise MailboxError(f"mailbox {name!r} exists on disk", code="ALREADYEXISTS")
        try:
            box = _MaildirBox(
                user,
                name,
                path,
                root=self.root,
                uidvalidity=next(self._uidvalidity),
                special_use=special_use,
            )
            _make_maildir(path, folder=True)
            self._rewrite_log(box)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise self._storage_error(f"cannot create mailbox {name!r}", exc) from exc
        return box

    def _usable(self, box: Mailbox) -> bool:
        return _as_box(box).confined()

    def _check_mailbox(self, box: Mailbox) -> None:
        """Refuse a folder whose directories or log are no longer plain entries in the root."""
        if not self._usable(box):
            log.warning(
                "maildir: refused %s: it is not a maildir inside the root", _as_box(box).path
            )
            raise MailboxError(
                f"mailbox {box.name!r} is refused: its directory is not a maildir inside "
                "the store's root (a symbolic link?)",
                code="CANNOT",
            )

    def _drop_mailbox(self, box: Mailbox) -> None:
        try:
            self._trash(_as_box(box))
        except OSError as exc:
            raise self._storage_error(f"cannot delete mailbox {box.name!r}", exc) from exc

    def _empty_mailbox(self, box: Mailbox) -> None:
        folder = _as_box(box)
        try:
            for msg in folder:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_as_message(msg).path)
            folder._remove(folder.uids())
            for sub in ("cur", "new"):
                fsync_dir(folder.path / sub)
            self._rewrite_log(folder)
        except OSError as exc:
            what = f"cannot clear {folder.user}:{folder.name}"
            raise self._storage_error(what, exc) from exc

    def _move_mailboxes(self, user: str, moves: list[tuple[Mailbox, str]]) -> None:
        """Rename folder directories; on failure the ones already renamed are put back."""
        self._check_user_dir(user)
        targets: list[tuple[_MaildirBox, Path]] = []
        for box, new_name in moves:
            new_path = self._box_dir(user, new_name)
            if os.path.lexists(new_path):
                raise MailboxError(f"mailbox {new_name!r} already exists", code="ALREADYEXISTS")
            targets.append((_as_box(box), new_path))
        done: list[tuple[_MaildirBox, Path]] = []
        try:
            for folder, new_path in targets:
                os.rename(folder.path, new_path)
                done.append((folder, new_path))
            fsync_dir(self._user_dir(user))
        except OSError as exc:
            for folder, new_path in reversed(done):
                with contextlib.suppress(OSError):
                    os.rename(new_path, folder.path)
            what = f"cannot rename {moves[0][0].name!r} to {moves[0][1]!r}"
            raise self._storage_error(what, exc) from exc
        for folder, new_path in targets:
            folder.path = new_path

    def _move_message(self, msg: StoredMessage, target: Mailbox) -> StoredMessage:
        """Rename the file into the target folder; ``msg`` follows it (for sessions holding it)."""
        old, folder = _as_message(msg), _as_box(target)
        try:
            os.rename(old.path, folder.path / old._file)
        except OSError as exc:
            what = f"cannot rename {old.mailbox!r} to {folder.name!r}"
            raise self._storage_error(what, exc) from exc
        old._box = folder
        return _MaildirMessage(
            folder,
            old._file,
            uid=folder.uidnext,
            size=old.size,
            internal_date=old.internal_date,
            flags=old.flags,
            envelope_from=old.envelope_from,
            envelope_to=old.envelope_to,
        )

    def _messages_moved(self, source: Mailbox, target: Mailbox) -> None:
        """Make the renames durable, then record the new UIDs (and the old folder's loss)."""
        src, dst = _as_box(source), _as_box(target)
        for sub in ("cur", "new"):
            with contextlib.suppress(OSError):
                fsync_dir(dst.path / sub)
                fsync_dir(src.path / sub)
        with contextlib.suppress(OSError):
            self._rewrite_log(dst)
            self._rewrite_log(src)

    def _write_subscriptions(self, user: str, names: frozenset[str]) -> None:
        """Replace the user's ``roundtrip-subscriptions`` (a link in its place is replaced,
        never followed: ``rename`` acts on the link itself).

        Raises:
            MailboxError: ``CANNOT`` when the user directory is refused.
            StorageError: the file could not be written; the old one stands.
        """
        path = self._check_user_dir(user) / fmt.SUBSCRIPTIONS_NAME
        try:
            _replace_file(path, fmt.dump_subscriptions(names))
        except OSError as exc:
            what = f"cannot record the subscriptions of {user!r}"
            raise self._storage_error(what, exc) from exc

    # Storage hooks of Store: messages

    def _store_message(
        self,
        box: Mailbox,
        raw: bytes,
        flags: frozenset[str],
        internal_date: float,
        envelope_from: str,
        envelope_to: tuple[str, ...],
        head: bytes = b"",
    ) -> StoredMessage:
        """Write one message, ``head + raw``, durably.

        Order: tmp/ file, fsync, rename into new/ or cur/, directory fsync, UID record
        appended and fsynced. On ``OSError`` everything written is removed again.
        """
        folder = _as_box(box)
        size = len(head) + len(raw)
        base = fmt.unique_name(size, self._host, next(self._deliveries))
        sub = "cur" if flags else "new"
        filename = f"{base}{fmt.INFO}{fmt.info_for(flags)}" if sub == "cur" else base
        tmp = folder.path / "tmp" / base
        dest = folder.path / sub / filename
        msg = _MaildirMessage(
            folder,
            f"{sub}/{filename}",
            uid=folder.uidnext,
            size=size,
            internal_date=internal_date,
            flags=flags,
            envelope_from=envelope_from,
            envelope_to=envelope_to,
        )
        placed = False
        try:
            _create_file(tmp, raw, mtime=internal_date, head=head)
            if os.path.lexists(dest):  # pragma: no cover - the name is unique by construction
                raise OSError(errno.EEXIST, "maildir file name collision", str(dest))
            os.rename(tmp, dest)
            placed = True
            fsync_dir(folder.path / sub)
            self._append_log(folder, [_record(msg)])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if placed:
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                    fsync_dir(folder.path / sub)
            what = f"cannot store a message in {folder.user}:{folder.name}"
            raise self._storage_error(what, exc) from exc
        return msg

    def _write_flags(
        self, box: Mailbox, wanted: list[tuple[StoredMessage, frozenset[str]]]
    ) -> tuple[int, RoundtripError | None]:
        """System flags are renamed into the file name; keywords are appended to the log.

        The directories of the renames are fsynced once, at the end.
        """
        folder = _as_box(box)
        dirs: set[Path] = set()
        done = 0
        failure: OSError | None = None
        for msg, flags in wanted:
            try:
                self._apply_flags(folder, _as_message(msg), flags, dirs)
            except OSError as exc:
                failure = exc
                break
            done += 1
        try:
            for path in dirs:
                fsync_dir(path)
        except OSError as exc:
            failure = failure or exc
        if failure is None:
            return done, None
        what = f"cannot store flags in {folder.user}:{folder.name}"
        return done, self._storage_error(what, failure)

    def _apply_flags(
        self, box: _MaildirBox, msg: _MaildirMessage, flags: frozenset[str], dirs: set[Path]
    ) -> None:
        sub, _, name = msg._file.partition("/")
        base, _, old_info = name.partition(fmt.INFO)
        info = fmt.info_for(flags, old_info)
        new_sub = "cur" if (sub == "cur" or info or flags) else "new"
        new_file = f"{new_sub}/{base}{fmt.INFO}{info}" if new_sub == "cur" else f"new/{base}"
        old_file = msg._file
        if new_file != old_file:
            os.rename(box.path / old_file, box.path / new_file)
            dirs.update({box.path / sub, box.path / new_sub})
            msg._file = new_file
        if fmt.keywords(flags) != fmt.keywords(msg.flags):
            try:
                self._append_log(box, [{"uid": msg.uid, "kw": fmt.keywords(flags)}])
            except OSError:
                if new_file != old_file:  # put the file back: the flags did not change
                    with contextlib.suppress(OSError):
                        os.rename(box.path / new_file, box.path / old_file)
                        msg._file = old_file
                raise

    def _remove_messages(
        self, box: Mailbox, found: list[StoredMessage]
    ) -> tuple[list[int], RoundtripError | None]:
        """Unlink the files (a file already gone counts as removed), then fsync the folder."""
        folder = _as_box(box)
        gone: list[int] = []
        failure: OSError | None = None
        for each in found:
            msg = _as_message(each)
            msg._pin()  # sessions that still hold it may read it (RFC 3501 7.4.1)
            try:
                os.unlink(msg.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failure = exc
                break
            gone.append(msg.uid)
        try:
            for sub in ("cur", "new"):
                fsync_dir(folder.path / sub)
        except OSError as exc:
            failure = failure or exc
        if failure is None:
            return gone, None
        return gone, self._storage_error(f"cannot expunge in {folder.user}:{folder.name}", failure)

    def _messages_changed(self, box: Mailbox) -> None:
        self._maybe_compact(_as_box(box))


def _as_box(box: Mailbox) -> _MaildirBox:
    assert isinstance(box, _MaildirBox), box
    return box


def _as_message(msg: StoredMessage) -> _MaildirMessage:
    assert isinstance(msg, _MaildirMessage), msg
    return msg
