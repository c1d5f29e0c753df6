"""The mailbox store: users, folders, messages, UIDs, flags and change notification.

One ``Store`` holds every user of a stack. It is thread-safe: the servers use it from the
stack's event-loop thread, tests read it from theirs. Every change is announced to listeners
(the IMAP adapter uses that for IDLE and untagged updates) and wakes ``wait_until`` at once, so
nobody polls.

Messages are kept as the exact bytes that were delivered. UIDs strictly increase within a
mailbox and are never reused while its UIDVALIDITY stands (RFC 3501 section 2.3.1.1).
"""

from __future__ import annotations

import bisect
import hmac
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import MailboxError

__all__ = [
    "DEFAULT_FOLDERS",
    "HIERARCHY_DELIMITER",
    "Mailbox",
    "Store",
    "StoreChange",
    "StoredMessage",
    "message_id_of",
    "validate_mailbox_name",
]

#: The hierarchy delimiter of mailbox names, as LIST reports it.
HIERARCHY_DELIMITER = "/"

#: Folders every user starts with, and their RFC 6154 SPECIAL-USE attribute.
DEFAULT_FOLDERS: dict[str, str | None] = {
    "INBOX": None,
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Junk": "\\Junk",
    "Trash": "\\Trash",
}

# RFC 3501 leaves the limit to the server; Dovecot refuses names past 4096 bytes of path.
_MAX_NAME = 1024
_RESERVED_PARTS = {"", ".", "..", "cur", "new", "tmp"}


def validate_mailbox_name(name: str) -> str:
    """Check a (decoded) mailbox name and return its canonical form.

    ``INBOX`` is case-insensitive (RFC 3501 section 5.1). Names that could escape a directory
    tree when stored as files are refused, whatever the backend (SECURITY.md A6.5).

    Raises:
        MailboxError: with code ``CANNOT`` when the name is not acceptable.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME:
        raise MailboxError(f"mailbox name {name!r} is empty or too long", code="CANNOT")
    if name.upper() == "INBOX":
        return "INBOX"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise MailboxError(f"mailbox name {name!r} contains control characters", code="CANNOT")
    if name.startswith(("~", "\\")) or "\\" in name:
        raise MailboxError(f"mailbox name {name!r} is not allowed", code="CANNOT")
    parts = name.split(HIERARCHY_DELIMITER)
    for part in parts:
        if part in _RESERVED_PARTS or part.startswith(".") or part.endswith("."):
            raise MailboxError(
                f"mailbox name {name!r} has a forbidden part {part!r}", code="CANNOT"
            )
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return HIERARCHY_DELIMITER.join(parts)


_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE
)


def message_id_of(raw: bytes) -> str:
    """The first Message-ID field of ``raw``'s header block, unfolded and lower-cased."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw[: end if end >= 0 else min(len(raw), 1 << 20)]
    found = _MESSAGE_ID.search(head)
    if found is None:
        return ""
    return b" ".join(found.group(1).split()).decode("utf-8", "replace").lower()


@dataclass(eq=False, slots=True)
class StoredMessage:
    """One message in one mailbox.

    ``flags`` is replaced as a whole on every change (never mutated in place), so a reader
    always sees a consistent set. ``cache`` is free for protocol code to memoise what it derives
    from ``raw`` (a parsed structure, say); it lives and dies with the message.
    """

    uid: int
    raw: bytes
    internal_date: float
    flags: frozenset[str]
    user: str
    mailbox: str
    #: time.monotonic() when the store accepted it: used for hop timings.
    stored_monotonic: float
    envelope_from: str = ""
    envelope_to: tuple[str, ...] = ()
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.raw)


class Mailbox:
    """A folder of one user: messages ordered by UID.

    Read methods are safe without the store lock for a snapshot view; mutations go through
    ``Store`` so that listeners hear about them.
    """

    __slots__ = (
        "_by_uid",
        "_message_ids",
        "_uids",
        "modseq",
        "name",
        "special_use",
        "subscribed",
        "uidnext",
        "uidvalidity",
        "user",
    )

    def __init__(self, user: str, name: str, *, uidvalidity: int, special_use: str | None) -> None:
        self.user = user
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self.special_use = special_use
        self.subscribed = True
        #: Bumped on every change to this mailbox: a cheap "anything new?" test.
        self.modseq = 1
        self._uids: list[int] = []
        self._by_uid: dict[int, StoredMessage] = {}
        # Message-ID -> UIDs, built on the first lookup and kept up to date after it.
        self._message_ids: dict[str, list[int]] | None = None

    def __len__(self) -> int:
        return len(self._uids)

    def __iter__(self) -> Iterator[StoredMessage]:
        by_uid = self._by_uid
        return (by_uid[u] for u in list(self._uids))

    def __repr__(self) -> str:
        return f"<Mailbox {self.user}:{self.name} messages={len(self)} uidnext={self.uidnext}>"

    def uids(self) -> list[int]:
        """A snapshot of the UIDs, ascending."""
        return list(self._uids)

    def get(self, uid: int) -> StoredMessage | None:
        """The message with this UID, or None: O(1)."""
        return self._by_uid.get(uid)

    def uids_between(self, low: int, high: int) -> list[int]:
        """UIDs ``u`` with ``low <= u <= high``, found by bisection (never a scan)."""
        lo = bisect.bisect_left(self._uids, low)
        hi = bisect.bisect_right(self._uids, high)
        return self._uids[lo:hi]

    @property
    def unseen(self) -> int:
        return sum(1 for m in self._by_uid.values() if "\\Seen" not in m.flags)

    # Mutators, called by Store with its lock held.

    def uids_with_message_id(self, message_id: str) -> list[int]:
        """UIDs of the messages whose Message-ID is ``message_id`` (case-insensitive).

        The first call reads every message's header block once; later deliveries and expunges
        keep the index current, so a probe finds its message in O(1) however full the mailbox.
        """
        index = self._message_ids
        if index is None:
            index = {}
            for uid in self._uids:
                key = message_id_of(self._by_uid[uid].raw)
                if key:
                    index.setdefault(key, []).append(uid)
            self._message_ids = index
        return list(index.get(message_id.strip().lower(), ()))

    def _add(self, msg: StoredMessage) -> None:
        self._uids.append(msg.uid)
        self._by_uid[msg.uid] = msg
        self.modseq += 1
        if self._message_ids is not None:
            key = message_id_of(msg.raw)
            if key:
                self._message_ids.setdefault(key, []).append(msg.uid)

    def _remove(self, uids: Iterable[int]) -> list[int]:
        gone = sorted(u for u in set(uids) if u in self._by_uid)
        if gone:
            drop = set(gone)
            self._uids = [u for u in self._uids if u not in drop]
            for u in gone:
                del self._by_uid[u]
            self.modseq += 1
            self._message_ids = None  # rebuilt on the next lookup
        return gone


@dataclass(frozen=True, slots=True)
class StoreChange:
    """What changed: ``kind`` is ``added``, ``expunged``, ``flags`` or ``mailboxes``."""

    user: str
    mailbox: str
    kind: str
    uids: tuple[int, ...] = ()


Listener = Callable[[StoreChange], None]


class Store:
    """An in-memory, thread-safe mailbox store.

    Args:
        clock: returns the wall-clock time in seconds (for internal dates); injectable for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._clock = clock
        # ``None``: a mailbox that is not a login (the stack's outbound capture).
        self._passwords: dict[str, str | None] = {}
        self._mailboxes: dict[str, dict[str, Mailbox]] = {}
        self._listeners: list[Listener] = []
        self._maildrop_locks: set[str] = set()
        # UIDVALIDITY must differ for a re-created mailbox (RFC 3501 2.3.1.1): seed from the clock.
        self._uidvalidity = itertools.count(int(clock()) & 0x7FFFFFFF or 1)
        #: Bumped on every change anywhere: waiters compare it.
        self.generation = 0
        #: Called with an exception a listener raised; the change itself stands. The stack
        #: points it at its error log so the test that caused it fails.
        self.on_listener_error: Callable[[BaseException], None] | None = None

    # Users

    @staticmethod
    def _key(address: str) -> str:
        return address.strip().lower()

    def add_user(self, address: str, password: str | None) -> None:
        """Create a user with the default folders; an existing user gets the new password.

        Args:
            address: the mailbox owner's address.
            password: what logs in; ``None`` (or ``""``) makes a mailbox that no login opens,
                on any service.
        """
        key = self._key(address)
        with self._lock:
            self._passwords[key] = password
            if key not in self._mailboxes:
                self._mailboxes[key] = {
                    name: Mailbox(key, name, uidvalidity=next(self._uidvalidity), special_use=use)
                    for name, use in DEFAULT_FOLDERS.items()
                }

    def has_user(self, address: str) -> bool:
        return self._key(address) in self._passwords

    def users(self) -> list[str]:
        with self._lock:
            return sorted(self._passwords)

    def check_password(self, address: str, password: str) -> bool:
        """True when ``address`` is a login and ``password`` is its password (constant time).

        An empty password never authenticates anyone, and a mailbox added without a password
        (the outbound capture) is not a login at all.
        """
        stored = self._passwords.get(self._key(address))
        # Compare against something even for unknown users so timing does not reveal them.
        expected = (stored or "\x00unknown\x00").encode("utf-8")
        ok = hmac.compare_digest(expected, password.encode("utf-8", "surrogateescape"))
        return ok and bool(stored) and bool(password)

    # Mailboxes

    def _user_boxes(self, address: str) -> dict[str, Mailbox]:
        boxes = self._mailboxes.get(self._key(address))
        if boxes is None:
            raise MailboxError(f"no such user {address!r}", code="NONEXISTENT")
        return boxes

    def mailbox(self, address: str, name: str = "INBOX") -> Mailbox:
        """The mailbox ``name`` of ``address``.

        Raises:
            MailboxError: ``NONEXISTENT`` when there is no such user or mailbox.
        """
        canonical = validate_mailbox_name(name)
        with self._lock:
            box = self._user_boxes(address).get(canonical)
        if box is None:
            raise MailboxError(f"no mailbox {name!r}", code="NONEXISTENT")
        return box

    def mailboxes(self, address: str) -> list[Mailbox]:
        """Every mailbox of ``address``, INBOX first, then by name."""
        with self._lock:
            boxes = list(self._user_boxes(address).values())
        return sorted(boxes, key=lambda b: (b.name != "INBOX", b.name))

    def create_mailbox(self, address: str, name: str) -> Mailbox:
        canonical = validate_mailbox_name(name.rstrip(HIERARCHY_DELIMITER))
        with self._lock:
            boxes = self._user_boxes(address)
            if canonical in boxes:
                raise MailboxError(f"mailbox {name!r} already exists", code="ALREADYEXISTS")
            box = Mailbox(
                self._key(address), canonical, uidvalidity=next(self._uidvalidity), special_use=None
            )
            boxes[canonical] = box
            self._bump()
        self._notify(StoreChange(box.user, canonical, "mailboxes"))
        return box

    def delete_mailbox(self, address: str, name: str) -> None:
        canonical = validate_mailbox_name(name)
        if canonical == "INBOX":
            raise MailboxError("INBOX cannot be deleted", code="CANNOT")
        with self._lock:
            boxes = self._user_boxes(address)
            if canonical not in boxes:
                raise MailboxError(f"no mailbox {name!r}", code="NONEXISTENT")
            del boxes[canonical]
            self._bump()
        self._notify(StoreChange(self._key(address), canonical, "mailboxes"))

    def rename_mailbox(self, address: str, old: str, new: str) -> None:
        """Rename a mailbox and its children. Renaming INBOX moves its messages (RFC 3501 6.3.5)."""
        src = validate_mailbox_name(old)
        dst = validate_mailbox_name(new)
        user = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            if src not in boxes:
                raise MailboxError(f"no mailbox {old!r}", code="NONEXISTENT")
            if dst in boxes:
                raise MailboxError(f"mailbox {new!r} already exists", code="ALREADYEXISTS")
            if src == "INBOX":
                inbox = boxes["INBOX"]
                target = Mailbox(user, dst, uidvalidity=next(self._uidvalidity), special_use=None)
                for msg in list(inbox):
                    self._put(target, msg.raw, msg.flags, msg.internal_date)
                inbox._remove(inbox.uids())
                boxes[dst] = target
            else:
                prefix = src + HIERARCHY_DELIMITER
                for name in [n for n in boxes if n == src or n.startswith(prefix)]:
                    box = boxes.pop(name)
                    box.name = dst + name[len(src) :]
                    boxes[box.name] = box
            self._bump()
        self._notify(StoreChange(user, dst, "mailboxes"))

    def subscribe(self, address: str, name: str, subscribed: bool = True) -> None:
        box = self.mailbox(address, name)
        with self._lock:
            box.subscribed = subscribed

    # Messages

    def _put(
        self,
        box: Mailbox,
        raw: bytes,
        flags: Iterable[str],
        internal_date: float | None,
        envelope_from: str = "",
        envelope_to: tuple[str, ...] = (),
    ) -> StoredMessage:
        msg = StoredMessage(
            uid=box.uidnext,
            raw=bytes(raw),
            internal_date=self._clock() if internal_date is None else internal_date,
            flags=frozenset(flags),
            user=box.user,
            mailbox=box.name,
            stored_monotonic=time.monotonic(),
            envelope_from=envelope_from,
            envelope_to=envelope_to,
        )
        box.uidnext += 1
        box._add(msg)
        return msg

    def deliver(
        self,
        address: str,
        raw: bytes,
        *,
        mailbox: str = "INBOX",
        flags: Iterable[str] = (),
        internal_date: float | None = None,
        envelope_from: str = "",
        envelope_to: Iterable[str] = (),
    ) -> StoredMessage:
        """Store ``raw`` in a mailbox of ``address`` and announce it.

        Raises:
            MailboxError: no such user or mailbox.
        """
        box = self.mailbox(address, mailbox)
        with self._lock:
            msg = self._put(box, raw, flags, internal_date, envelope_from, tuple(envelope_to))
            self._bump()
        self._notify(StoreChange(box.user, box.name, "added", (msg.uid,)))
        return msg

    #: APPEND is a delivery into a named folder.
    append = deliver

    def set_flags(
        self, address: str, mailbox: str, updates: dict[int, frozenset[str]]
    ) -> list[StoredMessage]:
        """Replace the flags of the messages with the given UIDs; returns the changed ones."""
        box = self.mailbox(address, mailbox)
        changed: list[StoredMessage] = []
        with self._lock:
            for uid, flags in updates.items():
                msg = box.get(uid)
                if msg is not None and msg.flags != flags:
                    msg.flags = frozenset(flags)
                    changed.append(msg)
            if changed:
                box.modseq += 1
                self._bump()
        if changed:
            uids = tuple(m.uid for m in changed)
            self._notify(StoreChange(box.user, box.name, "flags", uids))
        return changed

    def expunge(self, address: str, mailbox: str, uids: Iterable[int]) -> list[int]:
        """Remove messages by UID; returns the UIDs actually removed, ascending."""
        box = self.mailbox(address, mailbox)
        with self._lock:
            gone = box._remove(uids)
            if gone:
                self._bump()
        if gone:
            self._notify(StoreChange(box.user, box.name, "expunged", tuple(gone)))
        return gone

    def copy(
        self, address: str, source: str, uids: Iterable[int], target: str
    ) -> list[tuple[int, int]]:
        """Copy messages to another mailbox; returns ``(source_uid, new_uid)`` pairs."""
        src = self.mailbox(address, source)
        dst = self.mailbox(address, target)
        pairs: list[tuple[int, int]] = []
        with self._lock:
            for uid in uids:
                msg = src.get(uid)
                if msg is not None:
                    new = self._put(
                        dst,
                        msg.raw,
                        msg.flags,
                        msg.internal_date,
                        msg.envelope_from,
                        msg.envelope_to,
                    )
                    pairs.append((uid, new.uid))
            if pairs:
                self._bump()
        if pairs:
            self._notify(StoreChange(dst.user, dst.name, "added", tuple(n for _, n in pairs)))
        return pairs

    def messages(
        self, address: str | None = None, mailbox: str | None = None
    ) -> list[StoredMessage]:
        """A snapshot of stored messages, for one user or all, optionally one mailbox."""
        with self._lock:
            users = [self._key(address)] if address is not None else sorted(self._mailboxes)
            out: list[StoredMessage] = []
            for user in users:
                for box in self._mailboxes.get(user, {}).values():
                    if mailbox is None or box.name == validate_mailbox_name(mailbox):
                        out.extend(box)
        return out

    def clear(self) -> None:
        """Empty every mailbox (users and folders stay; UIDs keep increasing)."""
        with self._lock:
            for boxes in self._mailboxes.values():
                for name in [n for n in boxes if n not in DEFAULT_FOLDERS]:
                    del boxes[name]
                for box in boxes.values():
                    box._remove(box.uids())
            self._bump()
        self._notify(StoreChange("", "", "mailboxes"))

    # POP3 maildrop lock (RFC 1939 section 8, RFC 2449 IN-USE)

    def lock_maildrop(self, address: str) -> bool:
        """Take the exclusive POP3 lock of a maildrop; False when someone holds it."""
        key = self._key(address)
        with self._lock:
            if key in self._maildrop_locks:
                return False
            self._maildrop_locks.add(key)
            return True

    def unlock_maildrop(self, address: str) -> None:
        with self._lock:
            self._maildrop_locks.discard(self._key(address))

    # Change notification

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(change)`` after every change, on the thread that made it."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def wait_until(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Block until ``predicate()`` is truthy (re-checked on each change) or the timeout passes.

        Returns:
            The last value of ``predicate()``: truthy on success, falsy on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0:
                    return value
                self._changed.wait(remaining)

    def _bump(self) -> None:
        self.generation += 1
        self._changed.notify_all()

    def _notify(self, change: StoreChange) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(change)
            except Exception as exc:  # a listener's bug must not undo or hide a delivery
                if self.on_listener_error is None:
                    raise
                self.on_listener_error(exc)
