"""Mailbox commands of the IMAP machine: SELECT, CREATE, RENAME, LIST/LSUB, STATUS, APPEND.

Theory of operation
-------------------
``IMAPConnection`` keeps the session state and calls the store; this module reads these
commands' arguments and builds their untagged responses, so every rule below is a pure function.

- SELECT/EXAMINE (RFC 3501 6.3.1): FLAGS and PERMANENTFLAGS (the keywords in use among them),
  EXISTS, RECENT, UNSEEN, UIDVALIDITY and UIDNEXT.
- CREATE (6.3.3): a trailing delimiter only says the client intends children.
- RENAME (6.3.5): a mailbox cannot move under itself (Dovecot refuses too, ``NO [CANNOT]``);
  INBOX is exempt, since renaming it moves its messages and leaves it in place.
- LIST (6.3.8): ``\\HasChildren``/``\\HasNoChildren`` (RFC 3348), RFC 6154 SPECIAL-USE
  attributes and the ``(SPECIAL-USE)`` selection option of RFC 5258; other LIST-EXTENDED
  options are ignored. LSUB (6.3.9) gives subscribed names without those attributes, and an
  unsubscribed parent of a subscribed name that ``%`` does not reach as ``\\Noselect``. The
  subscription list is the user's, not the mailboxes' (6.3.6: SUBSCRIBE may name a missing
  mailbox, DELETE keeps the name subscribed); a subscribed name that is no mailbox is listed
  ``\\Noselect`` too: RFC 5258 3.4 marks it ``\\NonExistent``, which implies ``\\Noselect``,
  and Dovecot answers ``\\Noselect`` for it to clients that do not use LIST-EXTENDED.
  Patterns are matched by ``_imapparse.ListPattern`` (linear time, no regular expression:
  backtracking took k**n steps for n wildcards).
- STATUS (6.3.10): MESSAGES, RECENT (the messages no session has claimed as ``\\Recent``),
  UIDNEXT, UIDVALIDITY, UNSEEN.
- APPEND (6.3.11): optional flags and date-time, one literal; refused past APPENDLIMIT
  (RFC 7889, ``NO [TOOBIG]``), when empty, and when its header is one SMTP DATA would refuse
  (Postfix ``header_size_limit`` and ``hopcount_limit``, ``NO [LIMIT]``): the same message must
  not get in through the other door.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import SMTPLimits
from ._imapparse import (
    MAX_NUMBER,
    ListPattern,
    ParseError,
    Token,
    decode_mutf7,
    encode_mutf7,
    parse_date_time,
)
from ._imapstore import IMAPMailbox
from ._imapwire import (
    NoResponseError,
    canonical_name,
    decode_name,
    mailbox_arg,
    mailbox_name,
    parse_flags,
    quote,
    safe,
    text_arg,
)
from .smtp import check_header_size, check_hops

__all__ = [
    "AppendRequest",
    "check_append",
    "check_append_header",
    "check_rename",
    "create_name",
    "header_limits",
    "list_lines",
    "one_mailbox",
    "parse_append",
    "parse_list",
    "select_lines",
    "status_line",
]


def select_lines(box: IMAPMailbox, uids: list[int], *, flags: list[str], recent: int) -> list[str]:
    """The untagged responses of SELECT/EXAMINE over the session's view ``uids``.

    ``flags``: the FLAGS and PERMANENTFLAGS lines (``_imapwire.flags_lines``); ``recent``: how
    many of ``uids`` are ``\\Recent`` in this session.
    """
    first_unseen = 0
    for i, uid in enumerate(uids):
        msg = box.get(uid)
        if msg is not None and "\\Seen" not in msg.flags:
            first_unseen = i + 1
            break
    lines = [*flags, f"* {len(uids)} EXISTS", f"* {recent} RECENT"]
    if first_unseen:
        lines.append(f"* OK [UNSEEN {first_unseen}] First unseen.")
    lines.append(f"* OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
    lines.append(f"* OK [UIDNEXT {box.uidnext}] Predicted next UID")
    return lines


_MATCHES_NOTHING = "\x00"


def one_mailbox(args: list[Token]) -> str:
    """The one mailbox name of SELECT, EXAMINE, DELETE, SUBSCRIBE or UNSUBSCRIBE."""
    if len(args) != 1:
        raise ParseError("expected one mailbox name")
    return mailbox_arg(args[0])


def create_name(args: list[Token]) -> str:
    """The mailbox name CREATE asks for."""
    if len(args) != 1:
        raise ParseError("expected one mailbox name")
    raw = decode_name(text_arg(args[0], "mailbox name"))
    return mailbox_name(raw[:-1] if raw.endswith("/") else raw)


def check_rename(old: str, new: str) -> None:
    """Refuse a RENAME that would move a mailbox under itself."""
    src, dst = canonical_name(old), canonical_name(new)
    if src != "INBOX" and dst.startswith(src + "/"):
        raise NoResponseError("Cannot rename a mailbox to a child of itself", "CANNOT")


def parse_list(args: list[Token], *, lsub: bool) -> tuple[str, str, bool]:
    """LIST/LSUB arguments: (reference, pattern, whether only SPECIAL-USE mailboxes)."""
    special_only = False
    if args and isinstance(args[0], list) and not lsub:
        # RFC 5258 selection options: only (SPECIAL-USE) of RFC 6154 changes anything.
        opts = [o.upper() for o in args[0] if isinstance(o, str)]
        special_only = "SPECIAL-USE" in opts
        args = args[1:]
    if len(args) >= 4 and isinstance(args[2], str) and args[2].upper() == "RETURN":
        args = args[:2]
    if len(args) != 2:
        raise ParseError(f"{'LSUB' if lsub else 'LIST'} expects a reference and a mailbox pattern")
    raw_ref, raw_pattern = text_arg(args[0], "reference"), text_arg(args[1], "pattern")
    try:
        ref, pattern = decode_mutf7(raw_ref), decode_mutf7(raw_pattern)
    except ParseError:
        # Not modified UTF-7: no mailbox has such a name, so nothing matches (Dovecot answers
        # OK with no names too). No stored name holds a NUL, so this pattern matches none.
        return "", _MATCHES_NOTHING, special_only
    return ref, pattern, special_only


def list_lines(
    mailboxes: Sequence[IMAPMailbox],
    ref: str,
    pattern: str,
    *,
    lsub: bool,
    special_only: bool,
    subscriptions: Iterable[str] | None = None,
) -> list[bytes]:
    """The untagged LIST/LSUB responses for ``ref`` + ``pattern``.

    ``subscriptions``: the subscribed names, mailboxes or not (the store's
    ``subscriptions``, which the IMAP machine passes for LSUB). When None, the mailboxes' own
    ``subscribed`` say which of them are.
    """
    verb = "LSUB" if lsub else "LIST"
    if not pattern and not lsub:
        return [b'* LIST (\\Noselect) "/" ""']
    full = ref + pattern
    if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] in "/*%"):
        full = "INBOX" + full[5:]
    wanted = ListPattern(full, delimiter="/")
    boxes = {b.name: b for b in mailboxes}
    if lsub:
        return _lsub_lines(set(boxes), _subscribed(mailboxes, subscriptions), wanted)
    names: set[str] = set(boxes)
    for name in boxes:
        parts = name.split("/")
        for i in range(1, len(parts)):
            names.add("/".join(parts[:i]))
    parents = {n.rsplit("/", 1)[0] for n in names if "/" in n}
    lines: list[bytes] = []
    for name in sorted(names, key=lambda n: (n != "INBOX", n)):
        if not wanted.matches(name):
            continue
        box = boxes.get(name)
        attrs = ["\\HasChildren" if name in parents else "\\HasNoChildren"]
        if box is None:
            attrs.insert(0, "\\Noselect")
        elif box.special_use:
            attrs.append(box.special_use)
        if special_only and (box is None or not box.special_use):
            continue
        lines.append(f'* {verb} ({" ".join(attrs)}) "/" '.encode() + quote(encode_mutf7(name)))
    return lines


def _subscribed(mailboxes: Sequence[IMAPMailbox], subscriptions: Iterable[str] | None) -> set[str]:
    if subscriptions is None:
        return {box.name for box in mailboxes if box.subscribed}
    return set(subscriptions)


def _lsub_lines(existing: set[str], subscribed: set[str], wanted: ListPattern) -> list[bytes]:
    """LSUB (RFC 3501 6.3.9): the subscribed names that match, without LIST's attributes.

    A subscribed name the pattern does not reach (``%`` stops at a delimiter) shows its
    unsubscribed ancestors that the pattern does match as ``\\Noselect``: ``LSUB "" %`` with
    only ``foo/bar`` subscribed returns ``foo`` that way. A subscribed name that is not a
    mailbox (never created, or deleted since) is ``\\Noselect`` as well.
    """
    found: dict[str, str] = {
        name: "" if name in existing else "\\Noselect"
        for name in subscribed
        if wanted.matches(name)
    }
    for name in subscribed:
        if name in found:
            continue
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in subscribed and wanted.matches(parent):
                found[parent] = "\\Noselect"
    return [
        f'* LSUB ({found[name]}) "/" '.encode() + quote(encode_mutf7(name))
        for name in sorted(found, key=lambda n: (n != "INBOX", n))
    ]


def status_line(box: IMAPMailbox, items: list[Token]) -> bytes:
    """The untagged STATUS response for the requested ``items``."""
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ParseError("bad STATUS item")
        key = item.upper()
        if key == "MESSAGES":
            out.append(f"MESSAGES {len(box)}")
        elif key == "RECENT":
            # What a session selecting it now would see (RFC 3501 6.3.10).
            recent = box.uids_between(box.first_recent_uid, MAX_NUMBER)
            out.append(f"RECENT {len(recent)}")
        elif key == "UIDNEXT":
            out.append(f"UIDNEXT {box.uidnext}")
        elif key == "UIDVALIDITY":
            out.append(f"UIDVALIDITY {box.uidvalidity}")
        elif key == "UNSEEN":
            unseen = 0
            for uid in box.uids():
                msg = box.get(uid)
                if msg is not None and "\\Seen" not in msg.flags:
                    unseen += 1
            out.append(f"UNSEEN {unseen}")
        else:
            raise ParseError(f"unknown STATUS item {safe(key[:30])}")
    return b"* STATUS " + quote(encode_mutf7(box.name)) + f" ({' '.join(out)})".encode()


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """What APPEND asks for; ``when`` is None when the client sent no date-time."""

    mailbox: str
    flags: frozenset[str]
    when: float | None
    message: bytes


def parse_append(args: list[Token]) -> AppendRequest:
    """APPEND's arguments: mailbox, optional flag list, optional date-time, the literal."""
    if len(args) < 2:
        raise ParseError("APPEND expects a mailbox and a message")
    name = mailbox_arg(args[0])
    rest = args[1:]
    flags: frozenset[str] = frozenset()
    when: float | None = None
    if rest and isinstance(rest[0], list):
        flags = parse_flags(rest[0])
        rest = rest[1:]
    if len(rest) == 2:
        date = rest[0]
        if not isinstance(date, bytes):
            raise ParseError("APPEND date-time must be a quoted string")
        when = parse_date_time(date.decode("ascii", "replace"))
        rest = rest[1:]
    if len(rest) != 1 or not isinstance(rest[0], bytes):
        raise ParseError("APPEND expects a message literal")
    return AppendRequest(name, flags, when, rest[0])


def header_limits(max_header_size: int | None, max_hops: int | None) -> tuple[int, int]:
    """APPEND's header limits; None takes SMTP DATA's default, so both doors refuse alike."""
    smtp = SMTPLimits()
    return (
        smtp.max_header_size if max_header_size is None else max_header_size,
        smtp.max_hops if max_hops is None else max_hops,
    )


def check_append(message: bytes, *, max_literal: int) -> None:
    """Refuse a message APPEND never takes, whatever the mailbox."""
    if len(message) > max_literal:
        raise NoResponseError(f"Message too large (APPENDLIMIT {max_literal})", "TOOBIG")
    if not message:
        raise NoResponseError("Cannot append an empty message", "CANNOT")


def check_append_header(message: bytes, *, max_header_size: int, max_hops: int) -> None:
    """Refuse a header that SMTP DATA would refuse (checked after the mailbox exists)."""
    if check_header_size(message, limit=max_header_size) is not None:
        raise NoResponseError(
            f"Message header field too large (limit {max_header_size} octets)", "LIMIT"
        )
    if check_hops(message, max_hops=max_hops) is not None:
        raise NoResponseError(
            f"Too many Received header fields, a mail loop? (limit {max_hops})", "LIMIT"
        )
