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
import contextlib
import hmac
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._headerblock import header_bounds
from .errors import MailboxError, RoundtripError

__all__ = [
    "DEFAULT_FOLDERS",
    "HIERARCHY_DELIMITER",
    "Mailbox",
    "Mailboxes",
    "Store",
    "StoreChange",
    "StoredMessage",
    "address_key",
    "message_id_of",
    "message_ids_of",
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
# A new user is subscribed to its default folders (and ``clear`` goes back to that).
_DEFAULT_SUBSCRIPTIONS = frozenset(DEFAULT_FOLDERS)
_RESERVED_PARTS = {"", ".", "..", "cur", "new", "tmp"}


def validate_mailbox_name(name: str) -> str:
    """Check a (decoded) mailbox name and return its canonical form.

    ``INBOX`` is case-insensitive (RFC 3501 section 5.1). Names that could escape a directory
    tree when stored as files are refused, whatever the backend (docs/security.md A6.5).
    A ``\\`` inside a name is an ordinary character (Dovecot and Gmail take ``foo\\bar``;
    ``MaildirStore`` escapes it on disk), but not as the first one: like a leading ``/`` or
    ``~``, a leading ``\\`` makes the name an absolute path for tools that read backslash
    paths (``\\dir``, ``\\\\host\\share``), so it stays refused as the start of a path.

    Raises:
        MailboxError: with code ``CANNOT`` when the name is not acceptable.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME:
        raise MailboxError(f"mailbox name {name!r} is empty or too long", code="CANNOT")
    if name.upper() == "INBOX":
        return "INBOX"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise MailboxError(f"mailbox name {name!r} contains control characters", code="CANNOT")
    if name.startswith(("~", "\\")):
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


def _name_order(name: str) -> tuple[bool, str]:
    """INBOX first, then by name: the order of every list of mailbox names."""
    return (name != "INBOX", name)


def _by_name(box: Mailbox) -> tuple[bool, str]:
    return _name_order(box.name)


_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE
)


#: A msg-id in a Message-ID field's value: "<", no "<" or ">", ">" (RFC 5322 section 3.6.4).
_MSG_ID_TOKEN = re.compile(rb"<[^<>]*>")


def message_ids_of(raw: bytes) -> list[str]:
    """Every ``<...>`` of every Message-ID field of ``raw``'s header block, lower-cased: the
    keys under which SEARCH HEADER Message-ID "<id>" must find the message, since the
    search asks for a field that contains the id (RFC 3501 section 6.4.4), and a field may
    carry a comment after it, or a second id, and a message a second field."""
    end = header_bounds(raw)[0]
    ids: list[str] = []
    for found in _MESSAGE_ID.finditer(raw, 0, end):
        value = b" ".join(found.group(1).split())
        ids += [t.decode("utf-8", "replace").lower() for t in _MSG_ID_TOKEN.findall(value)]
    return ids


def message_id_of(raw: bytes) -> str:
    """The first Message-ID field of ``raw``'s header block, unfolded and lower-cased.

    The header block is read by the one rule of roundtrip/_headerblock.py: a Message-ID line
    after a line that is not a field is body text, as IMAP's BODY[HEADER] reads it.
    """
    found = _MESSAGE_ID.search(raw, 0, header_bounds(raw)[0])
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

    def message_id(self) -> str:
        """:func:`message_id_of` this message."""
        return message_id_of(self.raw)

    def message_ids(self) -> list[str]:
        """:func:`message_ids_of` this message."""
        return message_ids_of(self.raw)

    def parts(self) -> tuple[bytes, bytes]:
        """The message as ``(head, rest)``, ``head + rest`` being ``raw``: whole header
        fields kept apart from the rest until the first read of ``raw``, or ``b""`` and all
        of it. Lets a reader of the header block leave a big message unjoined."""
        return b"", self.raw


def init_fields(
    msg: StoredMessage,
    uid: int,
    internal_date: float,
    flags: frozenset[str],
    user: str,
    mailbox: str,
    envelope_from: str,
    envelope_to: tuple[str, ...],
) -> None:
    """Set the fields of a new ``msg`` of a subclass whose ``raw`` is a property (the
    dataclass ``__init__`` would assign ``raw``), stored now."""
    msg.uid = uid
    msg.internal_date = internal_date
    msg.flags = flags
    msg.user = user
    msg.mailbox = mailbox
    msg.stored_monotonic = time.monotonic()
    msg.envelope_from = envelope_from
    msg.envelope_to = envelope_to
    msg.cache = {}


class _HeadedMessage(StoredMessage):
    """A StoredMessage kept as two parts until someone reads ``raw``: the fields the receiving
    MX put on top (its Received, Authentication-Results, the filter's fields) and the bytes
    it received. Joining them is a copy of the message; done on arrival, it would coexist
    with the relay's copy (held until the MX's 250) and the received bytes, three copies of
    a big message at once (tests/test_memory.py).
    """

    __slots__ = ("_parts",)

    def __init__(
        self,
        head: bytes,
        body: bytes,
        *,
        uid: int,
        internal_date: float,
        flags: frozenset[str],
        user: str,
        mailbox: str,
        envelope_from: str = "",
        envelope_to: tuple[str, ...] = (),
    ) -> None:
        init_fields(self, uid, internal_date, flags, user, mailbox, envelope_from, envelope_to)
        #: ``(head, body)`` until the first read, then the joined bytes: one attribute, so a
        #: reader on another thread sees one form or the other, never half of a change.
        self._parts: bytes | tuple[bytes, bytes] = (head, body)

    @property
    def raw(self) -> bytes:
        parts = self._parts
        if isinstance(parts, tuple):
            parts = parts[0] + parts[1]
            self._parts = parts
        return parts

    @raw.setter
    def raw(self, value: bytes) -> None:
        self._parts = bytes(value)

    @property
    def size(self) -> int:
        parts = self._parts
        return len(parts) if isinstance(parts, bytes) else len(parts[0]) + len(parts[1])

    def parts(self) -> tuple[bytes, bytes]:
        parts = self._parts
        return (b"", parts) if isinstance(parts, bytes) else parts

    def message_id(self) -> str:
        parts = self._parts
        if isinstance(parts, bytes):
            return message_id_of(parts)
        # ``head`` is whole fields: the first Message-ID of the header block is its own if
        # it has one, else the first of the header block the body starts with (none when
        # the body starts with the empty line: roundtrip/_headerblock.py).
        return message_id_of(parts[0] + b"\r\n") or message_id_of(parts[1])

    def message_ids(self) -> list[str]:
        parts = self._parts
        if isinstance(parts, bytes):
            return message_ids_of(parts)
        # The header block is ``head``'s fields, then those the body starts with (as above).
        return message_ids_of(parts[0] + b"\r\n") + message_ids_of(parts[1])


class Mailbox:
    """A folder of one user: messages ordered by UID.

    Read methods are safe without the store lock for a snapshot view; mutations go through
    ``Store`` so that listeners hear about them.
    """

    __slots__ = (
        "_by_uid",
        "_keyword_counts",
        "_message_ids",
        "_uids",
        "first_recent_uid",
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
        #: Whether the name is on the user's subscription list (``Store`` keeps it current;
        #: the list itself, names of missing mailboxes included, is ``Store.subscriptions``).
        self.subscribed = True
        #: Bumped on every change to this mailbox: a cheap "anything new?" test.
        self.modseq = 1
        #: UIDs from here up have not yet been claimed as \\Recent by a session (RFC 3501
        #: 2.3.2): see ``Store.claim_recent``.
        self.first_recent_uid = 1
        self._uids: list[int] = []
        self._by_uid: dict[int, StoredMessage] = {}
        # Message-ID -> UIDs, built on the first lookup and kept up to date after it.
        self._message_ids: dict[str, list[int]] | None = None
        # Keyword -> how many messages carry it, kept up to date by every change (keywords()).
        self._keyword_counts: dict[str, int] = {}

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

    def keywords(self) -> set[str]:
        """The keywords (flags without a backslash) some message here carries: O(keywords),
        not O(messages); IMAP's SELECT lists them in its FLAGS response."""
        return set(self._keyword_counts)

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
        """UIDs of the messages with a Message-ID field that contains the msg-id
        ``message_id`` (``<left@right>``, case-insensitive): :func:`message_ids_of`.

        The first call reads every message's header block once; later deliveries and expunges
        keep the index current, so a probe finds its message in O(1) however full the mailbox.
        """
        index = self._message_ids
        if index is None:
            index = {}
            for uid in self._uids:
                self._index_ids(index, self._by_uid[uid])
            self._message_ids = index
        return list(index.get(message_id.strip().lower(), ()))

    @staticmethod
    def _index_ids(index: dict[str, list[int]], msg: StoredMessage) -> None:
        for key in dict.fromkeys(msg.message_ids()):  # a message once per id
            index.setdefault(key, []).append(msg.uid)

    def _add(self, msg: StoredMessage) -> None:
        self._uids.append(msg.uid)
        self._by_uid[msg.uid] = msg
        self._count_keywords(msg.flags, 1)
        self.modseq += 1
        if self._message_ids is not None:
            self._index_ids(self._message_ids, msg)

    def _remove(self, uids: Iterable[int]) -> list[int]:
        gone = sorted(u for u in set(uids) if u in self._by_uid)
        if gone:
            drop = set(gone)
            self._uids = [u for u in self._uids if u not in drop]
            for u in gone:
                self._count_keywords(self._by_uid.pop(u).flags, -1)
            self.modseq += 1
            self._message_ids = None  # rebuilt on the next lookup
        return gone

    def _reflag(self, msg: StoredMessage, flags: frozenset[str]) -> None:
        self._count_keywords(msg.flags, -1)
        msg.flags = flags
        self._count_keywords(flags, 1)

    def _count_keywords(self, flags: Iterable[str], step: int) -> None:
        counts = self._keyword_counts
        for flag in flags:
            if flag.startswith("\\"):
                continue
            left = counts.get(flag, 0) + step
            if left > 0:
                counts[flag] = left
            else:
                counts.pop(flag, None)


class Mailboxes(list[Mailbox]):
    """The mailboxes of one user (``Store.mailboxes``), with the user's subscription list.

    ``subscriptions`` is read at the same moment as the mailboxes: the subscribed names,
    INBOX first, including names no mailbox has (RFC 3501 6.3.6). LSUB answers from it.
    """

    __slots__ = ("subscriptions",)

    def __init__(self, boxes: Iterable[Mailbox], subscriptions: Iterable[str]) -> None:
        super().__init__(boxes)
        self.subscriptions: tuple[str, ...] = tuple(subscriptions)


@dataclass(frozen=True, slots=True)
class StoreChange:
    """What changed: ``kind`` is ``added``, ``expunged``, ``flags`` or ``mailboxes``."""

    user: str
    mailbox: str
    kind: str
    uids: tuple[int, ...] = ()


Listener = Callable[[StoreChange], None]


def address_key(address: str) -> str:
    """An address as the stack compares it: surrounding space gone, lower case (the store's
    user keys, the test API's ``to`` and ``sender``)."""
    return address.strip().lower()


class Store:
    """An in-memory, thread-safe mailbox store.

    Args:
        clock: returns the wall-clock time in seconds (for internal dates); injectable for tests.

    The public methods hold every rule once: argument validation, the existence checks and
    their ``MailboxError`` codes, the INBOX rules, the lock, ``generation`` and the change
    notification. What a backend keeps where is left to the protected hooks under "Storage
    hooks" below; this class implements them in memory, ``MaildirStore`` on disk.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._clock = clock
        # ``None``: a mailbox that is not a login (the stack's outbound capture).
        self._passwords: dict[str, str | None] = {}
        self._mailboxes: dict[str, dict[str, Mailbox]] = {}
        # Per user, the subscribed names (RFC 3501 6.3.6): independent of which mailboxes
        # exist, so DELETE leaves a name subscribed and SUBSCRIBE may name a missing mailbox.
        self._subscriptions: dict[str, frozenset[str]] = {}
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
        return address_key(address)

    def add_user(self, address: str, password: str | None) -> None:
        """Create a user with the default folders; an existing user gets the new password.

        Args:
            address: the mailbox owner's address.
            password: what logs in; ``None`` (or ``""``) makes a mailbox that no login opens,
                on any service.

        Raises:
            MailboxError: the backend cannot hold this address (``MaildirStore``: it cannot
                be a directory name).
            StorageError: the backend could not create the user's folders.
        """
        key = self._key(address)
        with self._lock:
            if key not in self._mailboxes:
                boxes = self._new_user(key)
                self._write_subscriptions(key, _DEFAULT_SUBSCRIPTIONS)
                self._mailboxes[key] = boxes
                self._set_subscriptions(key, _DEFAULT_SUBSCRIPTIONS)
            self._passwords[key] = password

    def has_user(self, address: str) -> bool:
        """True when ``address`` has mailboxes (a user recovered from disk may not log in yet)."""
        return self._key(address) in self._mailboxes

    def users(self) -> list[str]:
        with self._lock:
            return sorted(self._mailboxes)

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
        """The mailbox ``name`` of ``address``, after the backend's safety check.

        Raises:
            MailboxError: ``NONEXISTENT`` when there is no such user or mailbox; ``CANNOT``
                when the name is not acceptable, or the backend refuses the mailbox now
                (``MaildirStore``: its directory was swapped for a symbolic link).
        """
        canonical = validate_mailbox_name(name)
        with self._lock:
            box = self._user_boxes(address).get(canonical)
        if box is None:
            raise MailboxError(f"no mailbox {name!r}", code="NONEXISTENT")
        self._check_mailbox(box)
        return box

    def mailboxes(self, address: str) -> Mailboxes:
        """Every mailbox of ``address``, INBOX first, then by name (with its subscriptions)."""
        with self._lock:
            boxes = list(self._user_boxes(address).values())
            subscribed = self._subscriptions.get(self._key(address), frozenset())
        return Mailboxes(sorted(boxes, key=_by_name), sorted(subscribed, key=_name_order))

    def subscriptions(self, address: str) -> list[str]:
        """The names ``address`` is subscribed to, INBOX first (mailboxes or not).

        Raises:
            MailboxError: ``NONEXISTENT`` when there is no such user.
        """
        with self._lock:
            self._user_boxes(address)  # NONEXISTENT for a user the store does not have
            subscribed = self._subscriptions.get(self._key(address), frozenset())
        return sorted(subscribed, key=_name_order)

    def create_mailbox(self, address: str, name: str) -> Mailbox:
        """Create the folder ``name`` (a trailing delimiter is ignored, RFC 3501 6.3.3).

        Raises:
            MailboxError: ``CANNOT`` for a bad name, ``ALREADYEXISTS``, ``NONEXISTENT`` user.
        """
        canonical = validate_mailbox_name(name.rstrip(HIERARCHY_DELIMITER))
        user = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            if canonical in boxes:
                raise MailboxError(f"mailbox {name!r} already exists", code="ALREADYEXISTS")
            box = self._new_mailbox(user, canonical)
            # RFC 3501 6.3.3: CREATE does not subscribe (that is SUBSCRIBE's job), but a name
            # subscribed before (and kept by DELETE, 6.3.6) is subscribed again.
            box.subscribed = canonical in self._subscriptions[user]
            boxes[canonical] = box
            self._bump()
        self._notify(StoreChange(user, canonical, "mailboxes"))
        return box

    def delete_mailbox(self, address: str, name: str) -> None:
        """Delete the folder ``name`` and its messages (its children stay, RFC 3501 6.3.4).

        A subscription to ``name`` stays: RFC 3501 6.3.6 forbids removing it unilaterally.

        Raises:
            MailboxError: ``CANNOT`` for INBOX or a bad name, ``NONEXISTENT``.
        """
        canonical = validate_mailbox_name(name)
        if canonical == "INBOX":
            raise MailboxError("INBOX cannot be deleted", code="CANNOT")
        user = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            box = boxes.get(canonical)
            if box is None:
                raise MailboxError(f"no mailbox {name!r}", code="NONEXISTENT")
            self._check_mailbox(box)
            self._drop_mailbox(box)
            del boxes[canonical]
            self._bump()
        self._notify(StoreChange(user, canonical, "mailboxes"))

    def rename_mailbox(self, address: str, old: str, new: str) -> None:
        """Rename a mailbox and its children. Renaming INBOX moves its messages (RFC 3501 6.3.5).

        Subscriptions follow the rename, as in Dovecot: every subscribed name that is the old
        name or below it (whether that mailbox exists or not) gets the new name. Renaming
        INBOX leaves the subscriptions as they are, since INBOX itself stays.

        Raises:
            MailboxError: ``NONEXISTENT`` source; ``ALREADYEXISTS`` when the new name, or the
                new name of one of its children, is taken; ``CANNOT`` for a bad name.
        """
        src = validate_mailbox_name(old)
        dst = validate_mailbox_name(new)
        user = self._key(address)
        with self._lock:
            boxes = self._user_boxes(address)
            if src not in boxes:
                raise MailboxError(f"no mailbox {old!r}", code="NONEXISTENT")
            if dst in boxes:
                raise MailboxError(f"mailbox {new!r} already exists", code="ALREADYEXISTS")
            moved: list[int] = []
            if src == "INBOX":
                moved = self._rename_inbox(user, boxes, dst)
            else:
                self._rename_tree(user, boxes, src, dst)
            self._bump()
        self._notify(StoreChange(user, dst, "mailboxes"))
        if moved:
            # INBOX stays and loses its messages: a session that has it selected must hear
            # them expunged (RFC 3501 section 7.4.1), or it keeps showing messages gone.
            self._notify(StoreChange(user, "INBOX", "expunged", tuple(moved)))

    def _rename_inbox(self, user: str, boxes: dict[str, Mailbox], dst: str) -> list[int]:
        """Move INBOX's messages into a new mailbox ``dst``; the UIDs that left INBOX."""
        inbox = boxes["INBOX"]
        self._check_mailbox(inbox)
        target = self._new_mailbox(user, dst)
        target.subscribed = dst in self._subscriptions[user]
        boxes[dst] = target
        moved: list[int] = []
        try:
            for msg in list(inbox):
                copy = self._move_message(msg, target)
                target.uidnext += 1
                target._add(copy)
                moved.append(msg.uid)
        finally:
            inbox._remove(moved)
            self._messages_moved(inbox, target)
        return moved

    def _rename_tree(self, user: str, boxes: dict[str, Mailbox], src: str, dst: str) -> None:
        prefix = src + HIERARCHY_DELIMITER
        moves: list[tuple[Mailbox, str]] = []
        for name in [n for n in boxes if n == src or n.startswith(prefix)]:
            self._check_mailbox(boxes[name])
            new_name = dst + name[len(src) :]
            if new_name in boxes:
                raise MailboxError(f"mailbox {new_name!r} already exists", code="ALREADYEXISTS")
            moves.append((boxes[name], new_name))
        old_subs = self._subscriptions[user]
        new_subs = frozenset(
            dst + n[len(src) :] if n == src or n.startswith(prefix) else n for n in old_subs
        )
        # The subscriptions are written first, and put back when the move fails: a RENAME
        # that answers NO must have changed nothing.
        if new_subs != old_subs:
            self._write_subscriptions(user, new_subs)
        try:
            self._move_mailboxes(user, moves)
        except BaseException:
            if new_subs != old_subs:
                with contextlib.suppress(RoundtripError):
                    self._write_subscriptions(user, old_subs)
            raise
        for box, _ in moves:
            del boxes[box.name]
        for box, new_name in moves:
            box.name = new_name
            for msg in box:
                msg.mailbox = new_name
            boxes[new_name] = box
        self._set_subscriptions(user, new_subs)

    def subscribe(self, address: str, name: str, subscribed: bool = True) -> None:
        """Add ``name`` to the subscription list of ``address``, or remove it.

        RFC 3501 6.3.6: the name need not be a mailbox (a client may subscribe to a parent
        before it exists, or keep a deleted one); the list is kept apart from the mailboxes.
        Removing a name that is neither subscribed nor a mailbox fails (6.3.7: "can't
        unsubscribe that name"); removing an unsubscribed mailbox's name does nothing.

        Raises:
            MailboxError: ``CANNOT`` for a bad name or a mailbox the backend refuses (see
                ``mailbox``); ``NONEXISTENT`` user, or name to unsubscribe.
        """
        canonical = validate_mailbox_name(name)
        user = self._key(address)
        with self._lock:
            box = self._user_boxes(address).get(canonical)
            if box is not None:
                self._check_mailbox(box)
            current = self._subscriptions[user]
            if not subscribed and box is None and canonical not in current:
                raise MailboxError(f"no mailbox or subscription {name!r}", code="NONEXISTENT")
            if (canonical in current) == subscribed:
                return
            updated = current | {canonical} if subscribed else current - {canonical}
            self._write_subscriptions(user, updated)
            self._set_subscriptions(user, updated)

    def _set_subscriptions(self, user: str, names: frozenset[str]) -> None:
        """Make ``names`` the subscription list of ``user`` (already written by the backend)."""
        self._subscriptions[user] = names
        for box in self._mailboxes.get(user, {}).values():
            box.subscribed = box.name in names

    def claim_recent(self, address: str, name: str) -> tuple[int, int]:
        """Claim \\Recent for one session: UIDs ``first <= uid < end`` of ``(first, end)``.

        RFC 3501 2.3.2: a message is recent in the first session told of it; later claims get
        none of these UIDs. A read-only session looks at ``first_recent_uid`` without claiming.

        Raises:
            MailboxError: as ``mailbox``.
        """
        box = self.mailbox(address, name)
        with self._lock:
            first, end = box.first_recent_uid, box.uidnext
            box.first_recent_uid = max(first, end)
        return first, end

    # Messages

    def _put(
        self,
        box: Mailbox,
        raw: bytes,
        flags: Iterable[str],
        internal_date: float | None,
        envelope_from: str = "",
        envelope_to: tuple[str, ...] = (),
        head: bytes = b"",
    ) -> StoredMessage:
        """Store one message under the next UID of ``box``; called with the lock held."""
        when = self._clock() if internal_date is None else internal_date
        msg = self._store_message(
            box, bytes(raw), frozenset(flags), when, envelope_from, tuple(envelope_to), head
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
        head: bytes = b"",
    ) -> StoredMessage:
        """Store ``raw`` in a mailbox of ``address`` and announce it.

        ``head``: whole header fields (each CRLF-terminated) that go in front of ``raw``. The
        message is ``head + raw``; a backend may keep the two apart until ``raw`` is read,
        so a big message is not copied while it is delivered (``_HeadedMessage``).

        Raises:
            MailboxError: no such user or mailbox.
            StorageError: the backend could not store it (nothing of it is kept).
        """
        box = self.mailbox(address, mailbox)
        with self._lock:
            msg = self._put(
                box, raw, flags, internal_date, envelope_from, tuple(envelope_to), bytes(head)
            )
            self._bump()
        self._notify(StoreChange(box.user, box.name, "added", (msg.uid,)))
        return msg

    #: APPEND is a delivery into a named folder.
    append = deliver

    def set_flags(
        self, address: str, mailbox: str, updates: dict[int, frozenset[str]]
    ) -> list[StoredMessage]:
        """Replace the flags of the messages with the given UIDs; returns the changed ones.

        Raises:
            StorageError: the backend failed part way (messages changed before that stay
                changed and are announced).
        """
        box = self.mailbox(address, mailbox)
        wanted: list[tuple[StoredMessage, frozenset[str]]] = []
        with self._lock:
            for uid, flags in updates.items():
                msg = box.get(uid)
                if msg is not None and msg.flags != flags:
                    wanted.append((msg, frozenset(flags)))
            done, failure = self._write_flags(box, wanted)
            changed = [msg for msg, _ in wanted[:done]]
            for msg, flags in wanted[:done]:
                box._reflag(msg, flags)
            if changed:
                box.modseq += 1
                self._bump()
                self._messages_changed(box)
        if changed:
            uids = tuple(m.uid for m in changed)
            self._notify(StoreChange(box.user, box.name, "flags", uids))
        if failure is not None:
            raise failure
        return changed

    def expunge(self, address: str, mailbox: str, uids: Iterable[int]) -> list[int]:
        """Remove messages by UID; returns the UIDs actually removed, ascending.

        Raises:
            StorageError: the backend failed part way (messages removed before that stay
                removed and are announced).
        """
        box = self.mailbox(address, mailbox)
        with self._lock:
            found = [m for m in (box.get(u) for u in sorted(set(uids))) if m is not None]
            gone, failure = self._remove_messages(box, found)
            box._remove(gone)
            if gone:
                self._bump()
                self._messages_changed(box)
        if gone:
            self._notify(StoreChange(box.user, box.name, "expunged", tuple(gone)))
        if failure is not None:
            raise failure
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
        """Empty every mailbox (users and default folders stay; UIDs keep increasing).

        Each user's subscriptions are the default folders again, as for a new user.

        A mailbox the backend refuses (see ``mailbox``) is left alone: nothing is deleted
        through it.
        """
        with self._lock:
            try:
                for boxes in self._mailboxes.values():
                    for name in [n for n in boxes if n not in DEFAULT_FOLDERS]:
                        if self._usable(boxes[name]):
                            self._drop_mailbox(boxes[name])
                            del boxes[name]
                    for box in boxes.values():
                        if self._usable(box):
                            self._empty_mailbox(box)
                for user in self._mailboxes:
                    if self._subscriptions.get(user) != _DEFAULT_SUBSCRIPTIONS:
                        # A user directory the backend refuses is left alone, as above.
                        with contextlib.suppress(MailboxError):
                            self._write_subscriptions(user, _DEFAULT_SUBSCRIPTIONS)
                            self._set_subscriptions(user, _DEFAULT_SUBSCRIPTIONS)
            finally:
                self._bump()
        self._notify(StoreChange("", "", "mailboxes"))

    # Storage hooks: what a backend does to keep its state. The public methods above call
    # them with the lock held, after every check, and do the bookkeeping around them. A hook
    # that fails raises (``StorageError``, or ``MailboxError`` for a refusal) before it changed
    # anything, unless it says otherwise.

    def _new_user(self, user: str) -> dict[str, Mailbox]:
        """The default folders of a new user."""
        return {
            name: self._new_mailbox(user, name, special_use=use)
            for name, use in DEFAULT_FOLDERS.items()
        }

    def _new_mailbox(self, user: str, name: str, *, special_use: str | None = None) -> Mailbox:
        """A new, empty mailbox with a fresh UIDVALIDITY (not yet in the user's folders)."""
        return Mailbox(user, name, uidvalidity=next(self._uidvalidity), special_use=special_use)

    def _usable(self, box: Mailbox) -> bool:
        """False when the backend must not touch ``box`` now (``clear`` skips it)."""
        return True

    def _check_mailbox(self, box: Mailbox) -> None:
        """Raise ``MailboxError`` (``CANNOT``) when ``box`` is not ``_usable``."""

    def _drop_mailbox(self, box: Mailbox) -> None:
        """Delete a mailbox and its messages (the caller forgets it)."""

    def _empty_mailbox(self, box: Mailbox) -> None:
        """Delete every message of ``box`` (``clear``), keeping the mailbox and its UIDNEXT."""
        box._remove(box.uids())

    def _move_mailboxes(self, user: str, moves: list[tuple[Mailbox, str]]) -> None:
        """Give each mailbox its new name's storage: all of them, or none of them."""

    def _move_message(self, msg: StoredMessage, target: Mailbox) -> StoredMessage:
        """Take ``msg`` out of its mailbox's storage into ``target``'s, as UID ``target.uidnext``.

        The caller adds the result to ``target`` and removes ``msg`` from its mailbox.
        """
        return self._store_message(
            target, msg.raw, msg.flags, msg.internal_date, msg.envelope_from, msg.envelope_to
        )

    def _messages_moved(self, source: Mailbox, target: Mailbox) -> None:
        """Called once after ``_move_message`` calls, even when one failed."""

    def _write_subscriptions(self, user: str, names: frozenset[str]) -> None:
        """Keep ``names`` as the whole subscription list of ``user``."""

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
        """Keep one message, ``head + raw``, as UID ``box.uidnext`` (the caller adds it to
        ``box``)."""
        if head:
            return _HeadedMessage(
                head,
                raw,
                uid=box.uidnext,
                internal_date=internal_date,
                flags=flags,
                user=box.user,
                mailbox=box.name,
                envelope_from=envelope_from,
                envelope_to=envelope_to,
            )
        return StoredMessage(
            uid=box.uidnext,
            raw=raw,
            internal_date=internal_date,
            flags=flags,
            user=box.user,
            mailbox=box.name,
            stored_monotonic=time.monotonic(),
            envelope_from=envelope_from,
            envelope_to=envelope_to,
        )

    def _write_flags(
        self, box: Mailbox, wanted: list[tuple[StoredMessage, frozenset[str]]]
    ) -> tuple[int, RoundtripError | None]:
        """Keep new flags for messages, in order, while their ``flags`` are still the old ones.

        Returns:
            How many of ``wanted`` were written (the caller updates those), and the error
            that stopped the rest, if any.
        """
        return len(wanted), None

    def _remove_messages(
        self, box: Mailbox, found: list[StoredMessage]
    ) -> tuple[list[int], RoundtripError | None]:
        """Delete messages of ``box``.

        Returns:
            The UIDs deleted (the caller removes them from ``box``), and the error that
            stopped the rest, if any.
        """
        return [m.uid for m in found], None

    def _messages_changed(self, box: Mailbox) -> None:
        """Called after flags changed or messages were removed, with ``box`` up to date."""

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
