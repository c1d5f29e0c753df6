"""One IMAP session's view of its selected mailbox: sequence numbers, pending updates, SEARCH.

Theory of operation
-------------------
RFC 3501 2.3.1.2: message sequence numbers are positions in the session's view, which changes
only when the session is told. :class:`MailboxView` keeps the ascending list of UIDs whose
positions are those numbers, and what other sessions changed since: expunged UIDs and UIDs whose
flags changed. ``IMAPConnection`` decides when updates may be sent (never an ``EXPUNGE`` while
answering FETCH, STORE or SEARCH, RFC 3501 7.4.1); :meth:`MailboxView.updates` builds them. New
messages are found by bisection above the highest UID already announced, so no update costs
time proportional to the mailbox. Sequence sets are evaluated against the view with bisection
and never expanded (docs/security.md A6.7).

``\\Recent`` (RFC 3501 2.3.2) is the view's too: a read-write session claims the messages it is
the first to be told of (``IMAPStore.claim_recent``) at SELECT and whenever new ones arrive, so
no other session sees them as recent; a read-only one (EXAMINE) sees the unclaimed ones without
claiming them. The flag is never stored: it is added where flags are shown and where SEARCH
reads them, and ``* n RECENT`` follows every ``* n EXISTS``.

Keywords: RFC 3501 7.2.6 says a flag is in the untagged FLAGS response before any FETCH shows
it. The view remembers the keywords it has announced (those in use at SELECT) and
:meth:`MailboxView.announce` gives a new ``FLAGS`` and ``PERMANENTFLAGS`` before a response that
would show another one.

SEARCH runs here because it reads the view: a search that is exactly ``HEADER Message-ID <id>``
(the validator's way to find its message) is an index lookup when the mailbox offers one;
everything else is a scan with the predicate of ``_imapsearch.compile_search``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import _imapfetch
from ._imapparse import MAX_NUMBER, ParseError, Token, parse_sequence_set
from ._imapsearch import compile_search
from ._imapstore import IMAPMailbox, IMAPMessage, IMAPStoreChange
from ._imapwire import flag_list, flags_lines, has_flag

if TYPE_CHECKING:
    from ._mime import OnError

__all__ = ["MailboxView"]


class MailboxView:
    """The selected mailbox as one session sees it.

    Args:
        box: the mailbox the session selected.
        readonly: selected with EXAMINE.
        claim: claims ``\\Recent`` for this session in the store, returning the claimed UID
            range ``(first, end)`` (``IMAPStore.claim_recent``); None, or ``readonly``, only
            looks at the unclaimed messages.
    """

    def __init__(
        self,
        box: IMAPMailbox,
        *,
        readonly: bool,
        claim: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.box = box
        self.readonly = readonly
        #: Ascending UIDs; the position of a UID plus one is its sequence number.
        self.uids = box.uids()
        #: Flags last told to the client, so an unchanged flag set is not announced again.
        self.known_flags: dict[int, frozenset[str]] = {}
        #: The UIDs that are ``\\Recent`` in this session.
        self.recent: set[int] = set()
        #: Keywords told to the client in a FLAGS response.
        self.keywords: set[str] = set()
        self._claim = None if readonly else claim
        self._claimed: list[tuple[int, int]] = []
        self._high_uid = self.uids[-1] if self.uids else 0
        self._pending_expunge: set[int] = set()
        self._pending_flags: set[int] = set()
        self._last_search: tuple[tuple[object, ...], tuple[int, ...]] | None = None
        self._take_recent(self.uids)
        self.keywords.update(box.keywords())

    def _take_recent(self, new: list[int]) -> None:
        """Mark which of the ``new`` UIDs (ascending) are recent in this session."""
        if not new:
            return
        if self._claim is None:
            self.recent.update(new[bisect.bisect_left(new, self.box.first_recent_uid) :])
            return
        first, end = self._claim()
        # Older ranges lie below every new UID: drop them, so the list stays short.
        self._claimed = [r for r in self._claimed if r[1] > new[0]]
        if first < end:
            self._claimed.append((first, end))
        # ``new`` is ascending: each claimed range is one slice of it (O(log n) to find).
        for lo, hi in self._claimed:
            self.recent.update(new[bisect.bisect_left(new, lo) : bisect.bisect_left(new, hi)])

    def flags_of(self, msg: IMAPMessage) -> frozenset[str]:
        """The flags to show for ``msg``: its stored ones, plus ``\\Recent`` in this session."""
        if msg.uid in self.recent:
            return msg.flags | {"\\Recent"}
        return msg.flags

    def select_flags(self) -> list[str]:
        """The FLAGS and PERMANENTFLAGS responses of SELECT: system flags and known keywords."""
        return flags_lines(self.keywords)

    def announce(self, flags: Iterable[str]) -> list[str]:
        """A new FLAGS/PERMANENTFLAGS pair when ``flags`` holds a keyword not yet announced."""
        new = {f for f in flags if not f.startswith("\\") and f not in self.keywords}
        if not new:
            return []
        self.keywords |= new
        return flags_lines(self.keywords)

    def note(self, change: IMAPStoreChange) -> None:
        """Remember a change of this mailbox made by anyone, to announce it later."""
        if change.kind == "expunged":
            self._pending_expunge.update(change.uids)
        elif change.kind == "flags":
            self._pending_flags.update(change.uids)

    def updates(self, *, allow_expunge: bool) -> list[bytes]:
        """Untagged EXPUNGE/EXISTS/FETCH for changes made by others; the view catches up."""
        lines: list[bytes] = []
        if allow_expunge and self._pending_expunge:
            gone = sorted(self._pending_expunge)
            self._pending_expunge.clear()
            for uid in gone:
                i = bisect.bisect_left(self.uids, uid)
                if i < len(self.uids) and self.uids[i] == uid:
                    del self.uids[i]
                    self.known_flags.pop(uid, None)
                    self.recent.discard(uid)
                    lines.append(b"* %d EXPUNGE" % (i + 1))
        new = self.box.uids_between(self._high_uid + 1, MAX_NUMBER)
        if new:
            self.uids.extend(new)
            self._high_uid = new[-1]
            self._take_recent(new)
            lines.append(b"* %d EXISTS" % len(self.uids))
            lines.append(b"* %d RECENT" % len(self.recent))
        if self._pending_flags:
            changed = sorted(self._pending_flags)
            self._pending_flags.clear()
            for uid in changed:
                i = bisect.bisect_left(self.uids, uid)
                msg = self.box.get(uid)
                if i >= len(self.uids) or self.uids[i] != uid or msg is None:
                    continue
                flags = msg.flags
                if self.known_flags.get(uid) != flags:
                    self.known_flags[uid] = flags
                    lines.extend(line.encode() for line in self.announce(flags))
                    shown = flag_list(self.flags_of(msg))
                    lines.append(b"* %d FETCH (UID %d FLAGS %s)" % (i + 1, uid, shown))
        return lines

    def expunged(self, gone: list[int]) -> list[bytes]:
        """This session expunged ``gone``: the EXPUNGE responses, and the view without them."""
        lines: list[bytes] = []
        for uid in gone:
            i = bisect.bisect_left(self.uids, uid)
            if i < len(self.uids) and self.uids[i] == uid:
                del self.uids[i]
                self.known_flags.pop(uid, None)
                self.recent.discard(uid)
                lines.append(b"* %d EXPUNGE" % (i + 1))
            self._pending_expunge.discard(uid)
        return lines

    def flag_updates(
        self, indices: list[int], item: str, flags: frozenset[str]
    ) -> dict[int, frozenset[str]]:
        """UID -> new flags for STORE ``item`` (``FLAGS``, ``+FLAGS``, ``-FLAGS``) of ``flags``."""
        updates: dict[int, frozenset[str]] = {}
        for index in indices:
            msg = self.box.get(self.uids[index])
            if msg is not None:
                updates[msg.uid] = _imapfetch.stored_flags(item, msg.flags, flags)
        return updates

    def flag_responses(self, indices: list[int], *, silent: bool, uid: bool) -> list[bytes]:
        """The untagged FETCH FLAGS after a STORE (none when ``silent``); notes what was told."""
        lines: list[bytes] = []
        for index in indices:
            msg_uid = self.uids[index]
            msg = self.box.get(msg_uid)
            if msg is None:
                continue
            self.known_flags[msg_uid] = msg.flags
            if not silent:
                lines.extend(line.encode() for line in self.announce(msg.flags))
                uid_part = b" UID %d" % msg_uid if uid else b""
                shown = flag_list(self.flags_of(msg))
                lines.append(b"* %d FETCH (FLAGS %s%s)" % (index + 1, shown, uid_part))
        return lines

    def deleted(self, candidates: list[int] | None = None) -> list[int]:
        """The UIDs among ``candidates`` (default: the whole view) flagged ``\\Deleted``."""
        uids = self.uids if candidates is None else candidates
        return [u for u in uids if has_flag(self.box.get(u), "\\Deleted")]

    def indices(self, tok: Token, *, uid: bool) -> list[int]:
        """Positions in the view named by a sequence set (``uid``: a UID set)."""
        if not isinstance(tok, str):
            raise ParseError("expected a sequence set")
        seqset = parse_sequence_set(tok)
        if uid:
            return seqset.uid_indices(self.uids)
        return seqset.seq_indices(len(self.uids))

    def search(self, args: list[Token], *, uid: bool, on_error: OnError) -> list[int]:
        """The sequence numbers (``uid``: the UIDs) of the messages SEARCH ``args`` selects."""
        needle = _imapfetch.message_id_needle(args)
        lookup = getattr(self.box, "uids_with_message_id", None)
        if needle is not None and lookup is not None:
            # "The field contains the string" (RFC 3501 6.4.4): a complete msg-id is contained
            # in a field exactly where it is one of the field's <...> (store.message_ids_of
            # indexes every one of every Message-ID field).
            found: list[int] = []
            for wanted in sorted(lookup(needle)):
                i = bisect.bisect_left(self.uids, wanted)
                if i < len(self.uids) and self.uids[i] == wanted:
                    found.append(wanted if uid else i + 1)
            return found
        top = self.uids[-1] if self.uids else 0
        # The same SEARCH again, nothing changed since (the mailbox's modseq moves on every
        # delivery, flag change and expunge; the view's UIDs on every update it announced):
        # the last answer. A client polling for new mail repeats one search (issue #17: a
        # repeated SEARCH SUBJECT over 100,000 messages took 113 ms, Dovecot's 0.5 ms).
        key = (self.box.modseq, len(self.uids), top, uid, repr(args))
        if self._last_search is not None and self._last_search[0] == key:
            return list(self._last_search[1])
        matcher = compile_search(
            args, count=len(self.uids), max_uid=top, recent=self.recent, on_error=on_error
        )
        hits: list[int] = []
        for i, u in enumerate(self.uids):
            msg = self.box.get(u)
            if msg is not None and matcher(msg, i + 1):
                hits.append(u if uid else i + 1)
        self._last_search = (key, tuple(hits))
        return hits
