"""IMAP4rev1 server side as a sans-IO state machine.

Theory of operation
-------------------
RFC 3501 section 3 defines the states that ``IMAPState`` names:

``NOT_AUTHENTICATED``
    After the greeting: ``CAPABILITY``, ``NOOP``, ``LOGOUT``, ``ID``, ``STARTTLS`` (RFC 3501
    6.2.1), ``LOGIN`` and ``AUTHENTICATE PLAIN`` with SASL-IR (RFC 4959). On a connection that is
    not (yet) TLS, logins are refused with ``NO [PRIVACYREQUIRED]`` and CAPABILITY shows
    ``LOGINDISABLED`` (RFC 3501 6.2.3, RFC 8314), unless ``allow_plaintext_auth``.
``AUTHENTICATED``
    Mailbox commands: ``SELECT``/``EXAMINE``, ``CREATE``, ``DELETE``, ``RENAME``,
    ``SUBSCRIBE``/``UNSUBSCRIBE``, ``LIST``/``LSUB`` (with ``\\HasChildren``/``\\HasNoChildren``
    and RFC 6154 SPECIAL-USE attributes), ``STATUS``, ``APPEND`` (RFC 7889 APPENDLIMIT, RFC 4315
    APPENDUID), ``NAMESPACE`` (RFC 2342), ``ENABLE`` (RFC 5161, enables nothing), ``IDLE``
    (RFC 2177). LIST patterns are matched by ``_imapparse.ListPattern`` (linear time, no
    regex). RENAME refuses to move a mailbox under itself (``NO [CANNOT]``); APPEND refuses a
    header that SMTP DATA would refuse (``max_header_size``, ``max_hops``: ``NO [LIMIT]``).
``SELECTED``
    Also ``CHECK``, ``CLOSE``, ``UNSELECT`` (RFC 3691), ``EXPUNGE``, ``SEARCH``, ``FETCH``,
    ``STORE``, ``COPY``, ``MOVE`` (RFC 6851) and their ``UID`` forms, ``UID EXPUNGE`` (RFC 4315).
``LOGOUT``
    After ``LOGOUT``, EOF, the autologout timer or too many bad commands.

Framing and the grammar live in ``_imapparse`` (literal sizes are checked before ``+`` is sent;
non-synchronising literals (RFC 7888 LITERAL+) above ``max_nonsync_literal`` end the session with
``* BYE [TOOBIG]``), SEARCH keys in ``_imapsearch``, MIME in ``_mime``.

Each session keeps its own view of the selected mailbox: the ascending list of UIDs whose
positions are the message sequence numbers. The adapter forwards every store change to
``on_store_change``; the machine notes it and tells the client at the legal points: before the
tagged reply of each command (no ``EXPUNGE`` while answering FETCH, STORE or SEARCH, RFC 3501
7.4.1), and at once while the client IDLEs. New messages are found by bisection above the highest
UID already announced, so no update costs time proportional to the mailbox. Sequence sets are
evaluated against the view with bisection and never expanded (SECURITY.md A6.7).

STARTTLS: after accepting it the machine parses nothing until ``tls_started()``; plaintext that was
pipelined behind it is command injection (CVE-2011-0411 class) and raises ``RemoteProtocolError``
without a reply. Every error reply is made by one function, ``_reply_error``. Bad commands are
counted: 3 before authentication (Dovecot imap-login), ``max_bad_commands`` after, then
``* BYE Too many invalid IMAP commands.``. Every command with a known verb also counts against
the session's command budget (``command_limits``, SECURITY.md A8.3): past the total (``"*"``)
or a verb's own count the command is not run; the machine answers ``* BYE [LIMIT] Too many
commands`` (or ``Too many NOOP commands``; RFC 5530 LIMIT) and ends the session. The ``UID``
forms count as ``UID``.

Deliberately unsupported: ``\\Recent`` (never set), CONDSTORE/QRESYNC, BINARY, MULTIAPPEND,
CATENATE, SORT/THREAD, LIST-EXTENDED return options (selection ``(SPECIAL-USE)`` is honoured),
UTF8=ACCEPT, SASL mechanisms other than PLAIN, and ACLs.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import MailboxLimits, SMTPLimits
from ..errors import MailboxError, RemoteProtocolError, StorageError
from . import _mime
from ._imapparse import (
    MAX_NUMBER,
    CommandReader,
    ListPattern,
    LiteralAnnounced,
    ParseError,
    RawCommand,
    Token,
    decode_mutf7,
    encode_mutf7,
    format_uid_set,
    parse_date_time,
    parse_sequence_set,
    tokenize,
)
from ._imapsearch import BadCharsetError, SearchMessage, compile_search, mime_tree
from ._lines import (
    CRLF,
    AuthenticationFailed,
    AuthenticationSucceeded,
    ConnectionClosed,
    Event,
    LineTooLong,
    OutputBuffer,
    StartTLSRequested,
)
from .smtp import check_header_size, check_hops

__all__ = [
    "IMAPConnection",
    "IMAPMailbox",
    "IMAPMessage",
    "IMAPState",
    "IMAPStore",
    "IMAPStoreChange",
]


#: One stored message, as the IMAP machine reads it: exactly what SEARCH reads.
IMAPMessage = SearchMessage


class IMAPMailbox(Protocol):
    """A folder: UIDs ascending, messages by UID, and its IMAP attributes."""

    @property
    def name(self) -> str: ...

    @property
    def uidvalidity(self) -> int: ...

    @property
    def uidnext(self) -> int: ...

    @property
    def special_use(self) -> str | None: ...

    @property
    def subscribed(self) -> bool: ...

    def __len__(self) -> int: ...

    def uids(self) -> list[int]: ...

    def get(self, uid: int) -> IMAPMessage | None: ...

    def uids_between(self, low: int, high: int) -> list[int]: ...


class IMAPStore(Protocol):
    """The store operations the machine needs; ``roundtrip.store.Store`` satisfies it.

    Mutators raise ``roundtrip.errors.MailboxError`` whose ``code`` becomes the response code.
    """

    def check_password(self, address: str, password: str) -> bool: ...

    def mailbox(self, address: str, name: str = ...) -> IMAPMailbox: ...

    def mailboxes(self, address: str) -> Sequence[IMAPMailbox]: ...

    def create_mailbox(self, address: str, name: str) -> object: ...

    def delete_mailbox(self, address: str, name: str) -> None: ...

    def rename_mailbox(self, address: str, old: str, new: str) -> None: ...

    def subscribe(self, address: str, name: str, subscribed: bool = ...) -> None: ...

    def append(
        self,
        address: str,
        raw: bytes,
        *,
        mailbox: str = ...,
        flags: Iterable[str] = ...,
        internal_date: float | None = ...,
    ) -> IMAPMessage: ...

    def set_flags(
        self, address: str, mailbox: str, updates: dict[int, frozenset[str]]
    ) -> Sequence[IMAPMessage]: ...

    def expunge(self, address: str, mailbox: str, uids: Iterable[int]) -> list[int]: ...

    def copy(
        self, address: str, source: str, uids: Iterable[int], target: str
    ) -> list[tuple[int, int]]: ...


class IMAPStoreChange(Protocol):
    """A store change notification (``roundtrip.store.StoreChange``)."""

    @property
    def user(self) -> str: ...

    @property
    def mailbox(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def uids(self) -> tuple[int, ...]: ...


class IMAPState(enum.Enum):
    """RFC 3501 section 3 connection states."""

    #: Greeted; only CAPABILITY, NOOP, LOGOUT, ID, STARTTLS, LOGIN, AUTHENTICATE.
    NOT_AUTHENTICATED = "not authenticated"
    #: Logged in, no mailbox selected.
    AUTHENTICATED = "authenticated"
    #: A mailbox is selected (SELECT read-write or EXAMINE read-only).
    SELECTED = "selected"
    #: Finished: BYE sent or the peer went away; all input is ignored.
    LOGOUT = "logout"


class _NoError(Exception):
    """A command failed for a reason the client can act on: tagged ``NO``."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


_FLAGS_TEXT = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"
_SYSTEM_FLAGS = {f.lower(): f for f in _FLAGS_TEXT.split()}
_TAG_RE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+\Z')
_KEYWORD_RE = re.compile(r'[^\x00-\x20\x7f(){%*"\\\]]+\Z')
# Dovecot imap-login allows 3 bad commands before authentication (SECURITY.md A4.8).
_PREAUTH_BAD_COMMANDS = 3
_SECTION_RE = re.compile(
    r"(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d{1,10})(?:\.(\d{1,10}))?>)?\Z", re.IGNORECASE
)
_SECTION_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")
_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE_ITEMS = frozenset(
    [
        "UID",
        "FLAGS",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
        "BODYSTRUCTURE",
        "BODY",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
    ]
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


_MSGID_SHAPE = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")


def _message_id_needle(args: list[Token]) -> str | None:
    """The id of a search that is exactly ``HEADER Message-ID <complete msg-id>``, else None."""
    if len(args) != 3:
        return None
    words = []
    for arg in args:
        if isinstance(arg, bytes):
            words.append(arg.decode("utf-8", "replace"))
        elif isinstance(arg, str):
            words.append(arg)
        else:
            return None
    key, name, text = words
    if key.upper() != "HEADER" or name.lower() != "message-id":
        return None
    if not _MSGID_SHAPE.match(text.strip()):
        return None
    return text.strip()


@dataclass(frozen=True, slots=True)
class _FetchItem:
    """One FETCH data item: its response name and how to compute it."""

    name: str
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()
    start: int | None = None
    length: int | None = None
    sets_seen: bool = False
    section: bool = False


def _quote(text: str | bytes) -> bytes:
    """A quoted string when possible, otherwise a literal."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if all(0x20 <= b < 0x7F for b in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def _safe(text: str) -> str:
    """Text for a response line: no CR, LF or other control characters, bounded length."""
    return "".join(c if " " <= c < "\x7f" else "?" for c in text)[:200]


def _internal_date(when: float) -> bytes:
    t = _gmtime(when)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t[2],
        _MONTHS[t[1] - 1].encode(),
        t[0],
        t[3],
        t[4],
        t[5],
    )


def _gmtime(when: float) -> tuple[int, int, int, int, int, int]:
    d = datetime.datetime.fromtimestamp(int(when), datetime.UTC)
    return d.year, d.month, d.day, d.hour, d.minute, d.second


def _flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(sorted(flags)).encode("utf-8", "replace") + b")"


def _text_arg(tok: Token, what: str) -> bytes:
    """An astring argument as bytes."""
    if isinstance(tok, list):
        raise ParseError(f"{what} must be a string")
    return tok.encode("ascii") if isinstance(tok, str) else tok


def _mailbox_arg(tok: Token) -> str:
    """A mailbox name from the wire: modified UTF-7 decoded and checked for traversal."""
    return _mailbox_name(decode_mutf7(_text_arg(tok, "mailbox name")))


def _mailbox_name(name: str) -> str:
    """Refuse names that could escape a directory tree (SECURITY.md A6.5); the store checks too."""
    if name.upper() == "INBOX":
        return "INBOX"
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise _NoError(f"invalid mailbox name {_safe(name)!r}", "CANNOT")
    return name


def _canonical_name(name: str) -> str:
    """``name`` with a leading ``INBOX`` part in capitals, as the store keeps it."""
    head, sep, tail = name.partition("/")
    return ("INBOX" if head.upper() == "INBOX" else head) + sep + tail


class IMAPConnection:
    """One IMAP session over one connection.

    Args:
        store: the mailbox store (see ``IMAPStore``).
        hostname: the server's name, shown in the greeting.
        secure: True when the connection is TLS from the first byte (port 993).
        starttls_available: True when the adapter can upgrade (port 143 with a context).
        allow_plaintext_auth: accept LOGIN/AUTHENTICATE without TLS (tests only).
        clock: wall-clock seconds, the internal date of APPENDed messages.
        max_line: longest command line (Dovecot ``imap_max_line_length``, SECURITY.md A6.4).
        max_literal: largest APPEND message, advertised as APPENDLIMIT (RFC 7889).
        max_nonsync_literal: largest ``{n+}`` literal (RFC 7888 section 4, LITERAL- is 4096).
        max_bad_commands: bad commands tolerated after authentication.
        command_limits: ``(verb, count)`` budgets of the session; ``"*"`` is the total of all
            commands, 0 turns one off (default: ``MailboxLimits().imap_command_limits``).
        max_header_size: largest header field of an APPENDed message, folded lines together;
            0 turns the check off (default: ``SMTPLimits().max_header_size``).
        max_hops: most ``Received`` fields an APPENDed message may carry; 0 turns the check
            off (default: ``SMTPLimits().max_hops``).
    """

    def __init__(
        self,
        store: IMAPStore,
        *,
        hostname: str,
        secure: bool,
        starttls_available: bool,
        allow_plaintext_auth: bool = False,
        clock: Callable[[], float],
        max_line: int = 65536,
        max_literal: int = 50 * 1024 * 1024,
        max_nonsync_literal: int = 4096,
        max_bad_commands: int = 20,
        command_limits: Iterable[tuple[str, int]] | None = None,
        max_header_size: int | None = None,
        max_hops: int | None = None,
    ) -> None:
        self.store = store
        self.hostname = hostname
        self.secure = secure
        self.starttls_available = starttls_available
        self.allow_plaintext_auth = allow_plaintext_auth
        self._clock = clock
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_nonsync_literal = max_nonsync_literal
        self.max_bad_commands = max_bad_commands
        if command_limits is None:
            command_limits = MailboxLimits().imap_command_limits
        self.command_limits = {v.upper(): n for v, n in command_limits if v and n > 0}
        # APPEND refuses what SMTP DATA refuses for its header (Postfix header_size_limit and
        # hopcount_limit): the same message must not get in through the other door.
        smtp_defaults = SMTPLimits()
        self.max_header_size = (
            smtp_defaults.max_header_size if max_header_size is None else max_header_size
        )
        self.max_hops = smtp_defaults.max_hops if max_hops is None else max_hops
        self._command_counts: dict[str, int] = {}
        self.state = IMAPState.NOT_AUTHENTICATED
        self.user: str | None = None
        self._out = OutputBuffer()
        self._events: list[Event] = []
        self._reader = CommandReader(max_line)
        self._bad = 0
        self._tls_pending = False
        # What the next raw line means when it is not a command.
        self._idle_tag: str | None = None
        self._sasl_tag: str | None = None
        self._verb = ""
        # Selected-mailbox view (see the module docstring).
        self._box: IMAPMailbox | None = None
        self._readonly = False
        self._uids: list[int] = []
        self._high_uid = 0
        self._pending_expunge: set[int] = set()
        self._pending_flags: set[int] = set()
        self._known_flags: dict[int, frozenset[str]] = {}
        self._commands: dict[str, tuple[Callable[[str, list[Token]], None], frozenset[IMAPState]]]
        any_state = frozenset(
            [IMAPState.NOT_AUTHENTICATED, IMAPState.AUTHENTICATED, IMAPState.SELECTED]
        )
        pre = frozenset([IMAPState.NOT_AUTHENTICATED])
        auth = frozenset([IMAPState.AUTHENTICATED, IMAPState.SELECTED])
        sel = frozenset([IMAPState.SELECTED])
        self._commands = {
            "CAPABILITY": (self._cmd_CAPABILITY, any_state),
            "NOOP": (self._cmd_NOOP, any_state),
            "LOGOUT": (self._cmd_LOGOUT, any_state),
            "ID": (self._cmd_ID, any_state),
            "STARTTLS": (self._cmd_STARTTLS, pre),
            "LOGIN": (self._cmd_LOGIN, pre),
            "AUTHENTICATE": (self._cmd_AUTHENTICATE, pre),
            "ENABLE": (self._cmd_ENABLE, auth),
            "NAMESPACE": (self._cmd_NAMESPACE, auth),
            "SELECT": (self._cmd_SELECT, auth),
            "EXAMINE": (self._cmd_EXAMINE, auth),
            "CREATE": (self._cmd_CREATE, auth),
            "DELETE": (self._cmd_DELETE, auth),
            "RENAME": (self._cmd_RENAME, auth),
            "SUBSCRIBE": (self._cmd_SUBSCRIBE, auth),
            "UNSUBSCRIBE": (self._cmd_UNSUBSCRIBE, auth),
            "LIST": (self._cmd_LIST, auth),
            "LSUB": (self._cmd_LSUB, auth),
            "STATUS": (self._cmd_STATUS, auth),
            "APPEND": (self._cmd_APPEND, auth),
            "IDLE": (self._cmd_IDLE, auth),
            "CHECK": (self._cmd_CHECK, sel),
            "CLOSE": (self._cmd_CLOSE, sel),
            "UNSELECT": (self._cmd_UNSELECT, sel),
            "EXPUNGE": (self._cmd_EXPUNGE, sel),
            "SEARCH": (self._cmd_SEARCH, sel),
            "FETCH": (self._cmd_FETCH, sel),
            "STORE": (self._cmd_STORE, sel),
            "COPY": (self._cmd_COPY, sel),
            "MOVE": (self._cmd_MOVE, sel),
            "UID": (self._cmd_UID, sel),
        }
        self._send(f"* OK [CAPABILITY {self._capabilities()}] {_safe(hostname)} IMAP4rev1 ready")

    # The machine interface (STYLE.md section 3)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer (``b""`` is EOF); returns events for the adapter.

        Raises:
            RemoteProtocolError: plaintext pipelined behind STARTTLS.
        """
        self._events = []
        if self.state is IMAPState.LOGOUT:
            return []
        if not data:
            self._end_session()
            return [ConnectionClosed()]
        if self._tls_pending:
            raise RemoteProtocolError("data received before the STARTTLS handshake")
        self._reader.feed(data)
        try:
            self._process()
        except LineTooLong:
            self._send("* BYE Too long command line")
            self._end_session()
            self._events.append(ConnectionClosed())
        return self._events

    def data_to_send(self) -> bytes:
        return self._out.take()

    def data_to_send_chunks(self) -> list[bytes]:
        """``data_to_send()`` as pieces, not joined: a FETCH literal is the stored bytes."""
        return self._out.take_chunks()

    def tls_started(self) -> None:
        """The adapter finished the STARTTLS handshake: the session continues over TLS."""
        self._tls_pending = False
        self.secure = True

    def timed_out(self) -> None:
        """The adapter's inactivity timer fired: say goodbye (RFC 3501 5.4)."""
        if self.state is not IMAPState.LOGOUT:
            self._send("* BYE Autologout; idle for too long")
            self._end_session()

    def on_store_change(self, change: IMAPStoreChange) -> None:
        """Note a store change; while IDLE, tell the client at once (RFC 2177)."""
        box = self._box
        if box is None or self.user is None or change.mailbox != box.name:
            return
        if change.user != self.user.strip().lower():
            return
        if change.kind == "expunged":
            self._pending_expunge.update(change.uids)
        elif change.kind == "flags":
            self._pending_flags.update(change.uids)
        if self._idle_tag is not None:
            self._send_updates(allow_expunge=True)

    # Framing

    def _process(self) -> None:
        while self.state is not IMAPState.LOGOUT and not self._tls_pending:
            if self._idle_tag is not None or self._sasl_tag is not None:
                line = self._reader.next_line()
                if line is None:
                    return
                if self._idle_tag is not None:
                    self._idle_line(line)
                else:
                    self._sasl_line(line)
                continue
            item = self._reader.next()
            if item is None:
                return
            if isinstance(item, LiteralAnnounced):
                self._literal_announced(item)
            else:
                self._run(item)

    def _literal_announced(self, lit: LiteralAnnounced) -> None:
        authed = self.state in (IMAPState.AUTHENTICATED, IMAPState.SELECTED)
        append = authed and lit.verb == "APPEND"
        limit = self.max_literal + self.max_line if append else self.max_line
        if not lit.sync and lit.size > self.max_nonsync_literal:
            # RFC 7888 section 4: the octets are already on their way and cannot be told
            # apart from commands, so the session ends (Dovecot does the same).
            self._reader.reject_literal()
            self._send("* BYE [TOOBIG] Non-synchronizing literal size too large")
            self._end_session()
            self._events.append(ConnectionClosed())
            return
        if (append and lit.size > self.max_literal) or lit.size + lit.total > limit:
            self._reader.reject_literal()
            tag = lit.tag if _TAG_RE.match(lit.tag.encode("ascii", "replace")) else "*"
            if append:
                self._send(f"{tag} NO [TOOBIG] Message too large (APPENDLIMIT {self.max_literal})")
            else:
                self._send(f"{tag} BAD Literal too large")
                self._count_bad()
            return
        self._reader.accept_literal()
        if lit.sync:
            self._send("+ Ready for literal data")

    def _run(self, raw: RawCommand) -> None:
        tag = "*"
        head = raw.head.split(b" ", 1)[0]
        if _TAG_RE.match(head):
            tag = head.decode("ascii")
        try:
            tokens = tokenize(raw)
            if tag == "*" or len(tokens) < 2 or not isinstance(tokens[1], str):
                tag = "*"
                raise ParseError("Error in IMAP command received by server.")
            verb = tokens[1].upper()
            self._verb = verb
            entry = self._commands.get(verb)
            if entry is None:
                raise ParseError(f"Unknown command {_safe(verb[:20])}")
            if self._over_budget(verb):
                return
            handler, states = entry
            if self.state not in states:
                raise ParseError(f"{verb} not allowed in state {self.state.value}")
            handler(tag, tokens[2:])
        except (ParseError, _NoError, MailboxError, StorageError) as exc:
            self._reply_error(tag, exc)

    def _reply_error(self, tag: str, exc: Exception) -> None:
        """The one place that turns an exception into a BAD/NO reply."""
        if isinstance(exc, BadCharsetError):
            self._tagged(tag, "NO", f"[BADCHARSET (UTF-8 US-ASCII)] {_safe(str(exc))}")
        elif isinstance(exc, ParseError):
            self._tagged(tag, "BAD", _safe(str(exc)) or "Syntax error")
            self._count_bad()
        elif isinstance(exc, _NoError):
            code = f"[{exc.code}] " if exc.code else ""
            self._tagged(tag, "NO", code + _safe(str(exc)))
        elif isinstance(exc, MailboxError):
            self._tagged(tag, "NO", f"[{_safe(exc.code)}] {_safe(str(exc))}")
        elif isinstance(exc, StorageError):
            # Disk full or I/O error in a durable store: temporary (RFC 5530 UNAVAILABLE).
            self._tagged(tag, "NO", f"[UNAVAILABLE] {_safe(str(exc))}")
        else:  # pragma: no cover - the caller passes only the types above
            raise exc

    def _over_budget(self, verb: str) -> bool:
        """Count one command; past a budget say BYE and end the session (SECURITY.md A8.3)."""
        counts = self._command_counts
        for key in (verb, "*"):
            if key in self.command_limits:
                counts[key] = counts.get(key, 0) + 1
        if counts.get(verb, 0) > self.command_limits.get(verb, 0):
            text = f"Too many {verb} commands"
        elif counts.get("*", 0) > self.command_limits.get("*", 0):
            text = "Too many commands"
        else:
            return False
        self._send(f"* BYE [LIMIT] {text}")
        self._end_session()
        self._events.append(ConnectionClosed())
        return True

    def _count_bad(self) -> None:
        self._bad += 1
        authed = self.state in (IMAPState.AUTHENTICATED, IMAPState.SELECTED)
        limit = self.max_bad_commands if authed else _PREAUTH_BAD_COMMANDS
        if self._bad >= limit and self.state is not IMAPState.LOGOUT:
            self._send("* BYE Too many invalid IMAP commands.")
            self._end_session()
            self._events.append(ConnectionClosed())

    # Output

    def _send(self, line: str | bytes) -> None:
        self._out += line.encode("utf-8") if isinstance(line, str) else line
        self._out += CRLF

    def _tagged(self, tag: str, status: str, text: str) -> None:
        if self.state is IMAPState.SELECTED:
            self._send_updates(allow_expunge=self._verb not in ("FETCH", "STORE", "SEARCH"))
        self._send(f"{tag} {status} {text}")

    def _send_updates(self, *, allow_expunge: bool) -> None:
        """Untagged EXPUNGE/EXISTS/FETCH for changes made by others."""
        box = self._box
        if box is None:
            return
        if allow_expunge and self._pending_expunge:
            gone = sorted(self._pending_expunge)
            self._pending_expunge.clear()
            for uid in gone:
                i = bisect.bisect_left(self._uids, uid)
                if i < len(self._uids) and self._uids[i] == uid:
                    del self._uids[i]
                    self._known_flags.pop(uid, None)
                    self._send(f"* {i + 1} EXPUNGE")
        new = box.uids_between(self._high_uid + 1, MAX_NUMBER)
        if new:
            self._uids.extend(new)
            self._high_uid = new[-1]
            self._send(f"* {len(self._uids)} EXISTS")
        if self._pending_flags:
            changed = sorted(self._pending_flags)
            self._pending_flags.clear()
            for uid in changed:
                i = bisect.bisect_left(self._uids, uid)
                msg = box.get(uid)
                if i >= len(self._uids) or self._uids[i] != uid or msg is None:
                    continue
                flags = msg.flags
                if self._known_flags.get(uid) != flags:
                    self._known_flags[uid] = flags
                    self._send(b"* %d FETCH (UID %d FLAGS %s)" % (i + 1, uid, _flag_list(flags)))

    def _capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE"]
        caps += ["UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE", f"APPENDLIMIT={self.max_literal}"]
        if self.state is IMAPState.NOT_AUTHENTICATED:
            if self.starttls_available and not self.secure:
                caps.append("STARTTLS")
            if self.secure or self.allow_plaintext_auth:
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        return " ".join(caps)

    def _end_session(self) -> None:
        self.state = IMAPState.LOGOUT
        self._box = None
        self._idle_tag = None
        self._sasl_tag = None

    # Any state

    def _cmd_CAPABILITY(self, tag: str, args: list[Token]) -> None:
        self._send(f"* CAPABILITY {self._capabilities()}")
        self._tagged(tag, "OK", "CAPABILITY completed")

    def _cmd_NOOP(self, tag: str, args: list[Token]) -> None:
        self._tagged(tag, "OK", "NOOP completed")

    def _cmd_LOGOUT(self, tag: str, args: list[Token]) -> None:
        self._send("* BYE Logging out")
        self._send(f"{tag} OK LOGOUT completed")
        self._end_session()
        self._events.append(ConnectionClosed())

    def _cmd_ID(self, tag: str, args: list[Token]) -> None:
        self._send('* ID ("name" "roundtrip")')
        self._tagged(tag, "OK", "ID completed")

    # Not authenticated

    def _cmd_STARTTLS(self, tag: str, args: list[Token]) -> None:
        if self.secure or not self.starttls_available:
            raise ParseError("TLS is already active" if self.secure else "STARTTLS unavailable")
        if len(self._reader.buffer) or self._reader.in_command:
            # Plaintext pipelined behind STARTTLS would run after the handshake as if it had
            # come over TLS (CVE-2011-0411): refuse without replying.
            raise RemoteProtocolError("plaintext pipelined after STARTTLS")
        self._send(f"{tag} OK Begin TLS negotiation now")
        self._tls_pending = True
        self._events.append(StartTLSRequested())

    def _require_privacy(self) -> None:
        if not (self.secure or self.allow_plaintext_auth):
            raise _NoError(
                "Plaintext authentication disallowed on non-secure connections", "PRIVACYREQUIRED"
            )

    def _cmd_LOGIN(self, tag: str, args: list[Token]) -> None:
        if len(args) != 2:
            raise ParseError("LOGIN expects a user name and a password")
        user = _text_arg(args[0], "user name")
        password = _text_arg(args[1], "password")
        self._require_privacy()
        self._login(tag, user.decode("utf-8", "replace"), password.decode("utf-8", "replace"))

    def _auth_failure(self) -> _NoError:
        """The one reply for every failed login, and the event that makes the adapter wait."""
        self._events.append(AuthenticationFailed())
        return _NoError("Authentication failed.", "AUTHENTICATIONFAILED")

    def _login(self, tag: str, user: str, password: str) -> None:
        if not user or not self.store.check_password(user, password):
            raise self._auth_failure()
        self._events.append(AuthenticationSucceeded())
        self.user = user
        self.state = IMAPState.AUTHENTICATED
        self._bad = 0
        self._tagged(tag, "OK", f"[CAPABILITY {self._capabilities()}] Logged in")

    def _cmd_AUTHENTICATE(self, tag: str, args: list[Token]) -> None:
        if not args or not isinstance(args[0], str) or len(args) > 2:
            raise ParseError("AUTHENTICATE expects a mechanism")
        if args[0].upper() != "PLAIN":
            raise _NoError("Unsupported authentication mechanism", "CANNOT")
        self._require_privacy()
        if len(args) == 2:
            self._sasl_response(tag, _text_arg(args[1], "initial response"))
        else:
            self._sasl_tag = tag
            self._send("+ ")

    def _sasl_line(self, line: bytes) -> None:
        tag = self._sasl_tag or "*"
        self._sasl_tag = None
        if line.strip() == b"*":
            self._tagged(tag, "BAD", "Authentication cancelled")
            return
        try:
            self._sasl_response(tag, line.strip())
        except (ParseError, _NoError) as exc:
            self._reply_error(tag, exc)

    def _sasl_response(self, tag: str, data: bytes) -> None:
        try:
            decoded = b"" if data == b"=" else base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ParseError("Invalid base64 data") from exc
        fields = decoded.split(b"\0")
        if len(fields) != 3:
            raise self._auth_failure()
        authzid, authcid, password = (f.decode("utf-8", "replace") for f in fields)
        if authzid and authzid.lower() != authcid.lower():
            raise self._auth_failure()
        self._login(tag, authcid, password)

    # Authenticated

    def _address(self) -> str:
        assert self.user is not None
        return self.user

    def _cmd_ENABLE(self, tag: str, args: list[Token]) -> None:
        if not args:
            raise ParseError("ENABLE expects capability names")
        self._send("* ENABLED")
        self._tagged(tag, "OK", "ENABLE completed")

    def _cmd_NAMESPACE(self, tag: str, args: list[Token]) -> None:
        self._send('* NAMESPACE (("" "/")) NIL NIL')
        self._tagged(tag, "OK", "NAMESPACE completed")

    def _cmd_SELECT(self, tag: str, args: list[Token]) -> None:
        self._select(tag, args, readonly=False)

    def _cmd_EXAMINE(self, tag: str, args: list[Token]) -> None:
        self._select(tag, args, readonly=True)

    def _select(self, tag: str, args: list[Token], *, readonly: bool) -> None:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        name = _mailbox_arg(args[0])
        # RFC 3501 6.3.1: a failed SELECT leaves no mailbox selected.
        self._box = None
        if self.state is IMAPState.SELECTED:
            self.state = IMAPState.AUTHENTICATED
        box = self.store.mailbox(self._address(), name)
        self._box = box
        self._readonly = readonly
        self._uids = box.uids()
        self._high_uid = self._uids[-1] if self._uids else 0
        self._pending_expunge.clear()
        self._pending_flags.clear()
        self._known_flags.clear()
        self.state = IMAPState.SELECTED
        first_unseen = 0
        for i, uid in enumerate(self._uids):
            msg = box.get(uid)
            if msg is not None and "\\Seen" not in msg.flags:
                first_unseen = i + 1
                break
        self._send(f"* FLAGS ({_FLAGS_TEXT})")
        self._send(f"* OK [PERMANENTFLAGS ({_FLAGS_TEXT} \\*)] Flags permitted.")
        self._send(f"* {len(self._uids)} EXISTS")
        self._send("* 0 RECENT")
        if first_unseen:
            self._send(f"* OK [UNSEEN {first_unseen}] First unseen.")
        self._send(f"* OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
        self._send(f"* OK [UIDNEXT {box.uidnext}] Predicted next UID")
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self._tagged(tag, "OK", f"[{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    def _cmd_CREATE(self, tag: str, args: list[Token]) -> None:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        raw = decode_mutf7(_text_arg(args[0], "mailbox name"))
        # RFC 3501 6.3.3: a trailing delimiter only says the client intends children.
        name = _mailbox_name(raw[:-1] if raw.endswith("/") else raw)
        self.store.create_mailbox(self._address(), name)
        self._tagged(tag, "OK", "CREATE completed")

    def _cmd_DELETE(self, tag: str, args: list[Token]) -> None:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        self.store.delete_mailbox(self._address(), _mailbox_arg(args[0]))
        self._tagged(tag, "OK", "DELETE completed")

    def _cmd_RENAME(self, tag: str, args: list[Token]) -> None:
        if len(args) != 2:
            raise ParseError("RENAME expects two mailbox names")
        old, new = _mailbox_arg(args[0]), _mailbox_arg(args[1])
        # A mailbox cannot move under itself (Dovecot refuses too): the tree would be its
        # own child, and a SPECIAL-USE folder would carry its attribute into the new name.
        # INBOX is exempt: renaming it moves its messages and leaves it in place (RFC 3501
        # 6.3.5), so "INBOX/old" is a new sibling of what stays.
        src, dst = _canonical_name(old), _canonical_name(new)
        if src != "INBOX" and dst.startswith(src + "/"):
            raise _NoError("Cannot rename a mailbox to a child of itself", "CANNOT")
        self.store.rename_mailbox(self._address(), old, new)
        self._tagged(tag, "OK", "RENAME completed")

    def _cmd_SUBSCRIBE(self, tag: str, args: list[Token]) -> None:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        self.store.subscribe(self._address(), _mailbox_arg(args[0]), True)
        self._tagged(tag, "OK", "SUBSCRIBE completed")

    def _cmd_UNSUBSCRIBE(self, tag: str, args: list[Token]) -> None:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        self.store.subscribe(self._address(), _mailbox_arg(args[0]), False)
        self._tagged(tag, "OK", "UNSUBSCRIBE completed")

    def _cmd_LIST(self, tag: str, args: list[Token]) -> None:
        self._list(tag, args, lsub=False)

    def _cmd_LSUB(self, tag: str, args: list[Token]) -> None:
        self._list(tag, args, lsub=True)

    def _list(self, tag: str, args: list[Token], *, lsub: bool) -> None:
        verb = "LSUB" if lsub else "LIST"
        special_only = False
        if args and isinstance(args[0], list) and not lsub:
            # RFC 5258 selection options: only (SPECIAL-USE) of RFC 6154 changes anything.
            opts = [o.upper() for o in args[0] if isinstance(o, str)]
            special_only = "SPECIAL-USE" in opts
            args = args[1:]
        if len(args) >= 4 and isinstance(args[2], str) and args[2].upper() == "RETURN":
            args = args[:2]
        if len(args) != 2:
            raise ParseError(f"{verb} expects a reference and a mailbox pattern")
        ref = decode_mutf7(_text_arg(args[0], "reference"))
        pattern = decode_mutf7(_text_arg(args[1], "pattern"))
        if not pattern and not lsub:
            self._send('* LIST (\\Noselect) "/" ""')
            self._tagged(tag, "OK", "LIST completed")
            return
        full = ref + pattern
        if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] in "/*%"):
            full = "INBOX" + full[5:]
        # Not a regular expression: backtracking took k**n steps for n wildcards.
        wanted = ListPattern(full, delimiter="/")
        boxes = {b.name: b for b in self.store.mailboxes(self._address())}
        names: set[str] = set(boxes)
        for name in boxes:
            parts = name.split("/")
            for i in range(1, len(parts)):
                names.add("/".join(parts[:i]))
        parents = {n.rsplit("/", 1)[0] for n in names if "/" in n}
        order = sorted(names, key=lambda n: (n != "INBOX", n))
        for name in order:
            if not wanted.matches(name):
                continue
            box = boxes.get(name)
            if lsub and (box is None or not box.subscribed):
                continue
            attrs = ["\\HasChildren" if name in parents else "\\HasNoChildren"]
            if box is None:
                attrs.insert(0, "\\Noselect")
            elif box.special_use:
                attrs.append(box.special_use)
            if special_only and (box is None or not box.special_use):
                continue
            self._send(f'* {verb} ({" ".join(attrs)}) "/" '.encode() + _quote(encode_mutf7(name)))
        self._tagged(tag, "OK", f"{verb} completed")

    def _cmd_STATUS(self, tag: str, args: list[Token]) -> None:
        if len(args) != 2 or not isinstance(args[1], list):
            raise ParseError("STATUS expects a mailbox and a list of items")
        name = _mailbox_arg(args[0])
        box = self.store.mailbox(self._address(), name)
        out: list[str] = []
        for item in args[1]:
            if not isinstance(item, str):
                raise ParseError("bad STATUS item")
            key = item.upper()
            if key == "MESSAGES":
                out.append(f"MESSAGES {len(box)}")
            elif key == "RECENT":
                out.append("RECENT 0")
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
                raise ParseError(f"unknown STATUS item {_safe(key[:30])}")
        self._send(b"* STATUS " + _quote(encode_mutf7(box.name)) + f" ({' '.join(out)})".encode())
        self._tagged(tag, "OK", "STATUS completed")

    def _cmd_APPEND(self, tag: str, args: list[Token]) -> None:
        if len(args) < 2:
            raise ParseError("APPEND expects a mailbox and a message")
        name = _mailbox_arg(args[0])
        rest = args[1:]
        flags: frozenset[str] = frozenset()
        when: float | None = None
        if rest and isinstance(rest[0], list):
            flags = self._parse_flags(rest[0])
            rest = rest[1:]
        if len(rest) == 2:
            date = rest[0]
            if not isinstance(date, bytes):
                raise ParseError("APPEND date-time must be a quoted string")
            when = parse_date_time(date.decode("ascii", "replace"))
            rest = rest[1:]
        if len(rest) != 1 or not isinstance(rest[0], bytes):
            raise ParseError("APPEND expects a message literal")
        message = rest[0]
        if len(message) > self.max_literal:
            raise _NoError(f"Message too large (APPENDLIMIT {self.max_literal})", "TOOBIG")
        if not message:
            raise _NoError("Cannot append an empty message", "CANNOT")
        user = self._address()
        try:
            box = self.store.mailbox(user, name)
        except MailboxError as exc:
            if exc.code == "NONEXISTENT":
                raise _NoError(str(exc), "TRYCREATE") from exc
            raise
        if check_header_size(message, limit=self.max_header_size) is not None:
            raise _NoError(
                f"Message header field too large (limit {self.max_header_size} octets)", "LIMIT"
            )
        if check_hops(message, max_hops=self.max_hops) is not None:
            raise _NoError(
                f"Too many Received header fields, a mail loop? (limit {self.max_hops})", "LIMIT"
            )
        msg = self.store.append(
            user,
            message,
            mailbox=name,
            flags=flags,
            internal_date=self._clock() if when is None else when,
        )
        self._tagged(tag, "OK", f"[APPENDUID {box.uidvalidity} {msg.uid}] APPEND completed")

    def _cmd_IDLE(self, tag: str, args: list[Token]) -> None:
        if args:
            raise ParseError("IDLE takes no arguments")
        self._idle_tag = tag
        self._send("+ idling")
        self._send_updates(allow_expunge=True)

    def _idle_line(self, line: bytes) -> None:
        tag = self._idle_tag or "*"
        self._idle_tag = None
        self._verb = "IDLE"
        if line.strip().upper() == b"DONE":
            self._tagged(tag, "OK", "IDLE terminated")
        else:
            self._tagged(tag, "BAD", "Expected DONE")
            self._count_bad()

    # Selected

    def _selected(self) -> IMAPMailbox:
        if self._box is None:
            raise _NoError("No mailbox selected")
        return self._box

    def _cmd_CHECK(self, tag: str, args: list[Token]) -> None:
        self._tagged(tag, "OK", "CHECK completed")

    def _cmd_CLOSE(self, tag: str, args: list[Token]) -> None:
        box = self._selected()
        if not self._readonly:
            deleted = [u for u in self._uids if _has_flag(box.get(u), "\\Deleted")]
            if deleted:
                self.store.expunge(self._address(), box.name, deleted)
        self._unselect()
        self._send(f"{tag} OK CLOSE completed")

    def _cmd_UNSELECT(self, tag: str, args: list[Token]) -> None:
        self._unselect()
        self._send(f"{tag} OK UNSELECT completed")

    def _unselect(self) -> None:
        self._box = None
        self._uids = []
        self.state = IMAPState.AUTHENTICATED

    def _cmd_EXPUNGE(self, tag: str, args: list[Token]) -> None:
        self._expunge(tag, None)

    def _expunge(self, tag: str, only: list[int] | None) -> None:
        box = self._selected()
        if self._readonly:
            raise _NoError("Mailbox is read-only", "READ-ONLY")
        candidates = self._uids if only is None else only
        deleted = [u for u in candidates if _has_flag(box.get(u), "\\Deleted")]
        if deleted:
            self._announce_expunged(self.store.expunge(self._address(), box.name, deleted))
        self._tagged(tag, "OK", "EXPUNGE completed")

    def _announce_expunged(self, gone: list[int]) -> None:
        for uid in gone:
            i = bisect.bisect_left(self._uids, uid)
            if i < len(self._uids) and self._uids[i] == uid:
                del self._uids[i]
                self._known_flags.pop(uid, None)
                self._send(f"* {i + 1} EXPUNGE")
            self._pending_expunge.discard(uid)

    def _indices(self, tok: Token, *, uid: bool) -> list[int]:
        if not isinstance(tok, str):
            raise ParseError("expected a sequence set")
        seqset = parse_sequence_set(tok)
        if uid:
            return seqset.uid_indices(self._uids)
        return seqset.seq_indices(len(self._uids))

    def _cmd_UID(self, tag: str, args: list[Token]) -> None:
        if not args or not isinstance(args[0], str):
            raise ParseError("UID expects a command")
        sub = args[0].upper()
        rest = args[1:]
        self._verb = "UID " + sub
        if sub == "FETCH":
            self._fetch(tag, rest, uid=True)
        elif sub == "STORE":
            self._store(tag, rest, uid=True)
        elif sub == "SEARCH":
            self._search(tag, rest, uid=True)
        elif sub == "COPY":
            self._copy(tag, rest, uid=True, move=False)
        elif sub == "MOVE":
            self._copy(tag, rest, uid=True, move=True)
        elif sub == "EXPUNGE":
            if len(rest) != 1:
                raise ParseError("UID EXPUNGE expects a UID set")
            indices = self._indices(rest[0], uid=True)
            self._expunge(tag, [self._uids[i] for i in indices])
        else:
            raise ParseError(f"Unknown UID command {_safe(sub[:20])}")

    def _cmd_SEARCH(self, tag: str, args: list[Token]) -> None:
        self._search(tag, args, uid=False)

    def _search(self, tag: str, args: list[Token], *, uid: bool) -> None:
        box = self._selected()
        needle = _message_id_needle(args)
        lookup = getattr(box, "uids_with_message_id", None)
        if needle is not None and lookup is not None:
            # SEARCH HEADER Message-ID "<id>", the validator's way to find its message: an
            # index lookup instead of a scan. For a complete msg-id, "the field contains the
            # string" (RFC 3501 6.4.4) and "the field is the string" select the same messages.
            found: list[int] = []
            for wanted in sorted(lookup(needle)):
                i = bisect.bisect_left(self._uids, wanted)  # the session's UIDs ascend
                if i < len(self._uids) and self._uids[i] == wanted:
                    found.append(wanted if uid else i + 1)
            self._send("* SEARCH" + "".join(f" {n}" for n in found))
            self._tagged(tag, "OK", "SEARCH completed")
            return
        matcher = compile_search(
            args, count=len(self._uids), max_uid=self._uids[-1] if self._uids else 0
        )
        hits: list[int] = []
        for i, u in enumerate(self._uids):
            msg = box.get(u)
            if msg is not None and matcher(msg, i + 1):
                hits.append(u if uid else i + 1)
        self._send("* SEARCH" + "".join(f" {n}" for n in hits))
        self._tagged(tag, "OK", "SEARCH completed")

    def _cmd_FETCH(self, tag: str, args: list[Token]) -> None:
        self._fetch(tag, args, uid=False)

    def _fetch(self, tag: str, args: list[Token], *, uid: bool) -> None:
        box = self._selected()
        if len(args) != 2:
            raise ParseError("FETCH expects a sequence set and data items")
        items = _fetch_items(args[1])
        indices = self._indices(args[0], uid=uid)
        if uid and not any(i.name == "UID" for i in items):
            items.insert(0, _FetchItem("UID"))
        sets_seen = not self._readonly and any(i.sets_seen for i in items)
        wants_flags = any(i.name == "FLAGS" for i in items)
        for index in indices:
            msg_uid = self._uids[index]
            msg = box.get(msg_uid)
            if msg is None:  # expunged by another session, not yet announced
                continue
            add_flags = False
            if sets_seen and "\\Seen" not in msg.flags:
                self.store.set_flags(self._address(), box.name, {msg_uid: msg.flags | {"\\Seen"}})
                add_flags = not wants_flags
            parts = [self._fetch_item(msg, item) for item in items]
            if add_flags:
                parts.append(b"FLAGS " + _flag_list(msg.flags))
            if wants_flags or add_flags:
                self._known_flags[msg_uid] = msg.flags
            # The pieces go out one after the other: a message literal is never copied.
            self._out += b"* %d FETCH (" % (index + 1)
            for n, part in enumerate(parts):
                if n:
                    self._out += b" "
                if isinstance(part, tuple):
                    self._out += part[0]
                    self._out += part[1]
                else:
                    self._out += part
            self._out += b")" + CRLF
        self._tagged(tag, "OK", "FETCH completed")

    def _fetch_item(self, msg: IMAPMessage, item: _FetchItem) -> bytes | tuple[bytes, bytes]:
        """The response item; a literal as (``NAME {n}\\r\\n``, data), so data is not copied."""
        name = item.name
        if name == "UID":
            return b"UID %d" % msg.uid
        if name == "FLAGS":
            return b"FLAGS " + _flag_list(msg.flags)
        if name == "INTERNALDATE":
            return b"INTERNALDATE " + _internal_date(msg.internal_date)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % msg.size
        if name == "ENVELOPE":
            return b"ENVELOPE " + _mime.envelope(msg.raw, tree=mime_tree(msg))
        if name == "BODYSTRUCTURE":
            return b"BODYSTRUCTURE " + _mime.bodystructure(msg.raw, tree=mime_tree(msg))
        if name == "BODY" and not item.section:
            return b"BODY " + _mime.bodystructure(msg.raw, extended=False, tree=mime_tree(msg))
        if item.text is None and not item.part:
            data = msg.raw
        else:
            data = _mime.section(msg.raw, item.part, item.text, item.fields, tree=mime_tree(msg))
        if item.start is not None:
            end = None if item.length is None else item.start + item.length
            data = data[item.start : end]
        return name.encode("ascii") + b" {%d}\r\n" % len(data), data

    def _cmd_STORE(self, tag: str, args: list[Token]) -> None:
        self._store(tag, args, uid=False)

    def _store(self, tag: str, args: list[Token], *, uid: bool) -> None:
        box = self._selected()
        if len(args) < 3 or not isinstance(args[1], str):
            raise ParseError("STORE expects a sequence set, an item and flags")
        item = args[1].upper()
        silent = item.endswith(".SILENT")
        if silent:
            item = item[: -len(".SILENT")]
        if item not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise ParseError(f"unknown STORE item {_safe(item[:30])}")
        flag_args = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
        flags = self._parse_flags(flag_args)
        indices = self._indices(args[0], uid=uid)
        if self._readonly:
            raise _NoError("Mailbox is read-only", "READ-ONLY")
        updates: dict[int, frozenset[str]] = {}
        for index in indices:
            msg = box.get(self._uids[index])
            if msg is None:
                continue
            if item == "FLAGS":
                new = flags
            elif item == "+FLAGS":
                new = msg.flags | flags
            else:
                new = msg.flags - flags
            updates[msg.uid] = frozenset(new)
        if updates:
            self.store.set_flags(self._address(), box.name, updates)
        for index in indices:
            msg_uid = self._uids[index]
            msg = box.get(msg_uid)
            if msg is None:
                continue
            self._known_flags[msg_uid] = msg.flags
            if not silent:
                uid_part = b" UID %d" % msg_uid if uid else b""
                self._send(
                    b"* %d FETCH (FLAGS %s%s)" % (index + 1, _flag_list(msg.flags), uid_part)
                )
        self._tagged(tag, "OK", "STORE completed")

    @staticmethod
    def _parse_flags(tokens: list[Token]) -> frozenset[str]:
        out: set[str] = set()
        for tok in tokens:
            if not isinstance(tok, str):
                raise ParseError("flags must be atoms")
            if tok.startswith("\\"):
                flag = _SYSTEM_FLAGS.get(tok.lower())
                if flag is None:
                    raise ParseError(f"invalid system flag {_safe(tok[:30])}")
                out.add(flag)
            elif _KEYWORD_RE.match(tok):
                out.add(tok)
            else:
                raise ParseError(f"invalid keyword {_safe(tok[:30])}")
        return frozenset(out)

    def _cmd_COPY(self, tag: str, args: list[Token]) -> None:
        self._copy(tag, args, uid=False, move=False)

    def _cmd_MOVE(self, tag: str, args: list[Token]) -> None:
        self._copy(tag, args, uid=False, move=True)

    def _copy(self, tag: str, args: list[Token], *, uid: bool, move: bool) -> None:
        box = self._selected()
        if len(args) != 2:
            raise ParseError("expected a sequence set and a mailbox")
        indices = self._indices(args[0], uid=uid)
        target = _mailbox_arg(args[1])
        if move and self._readonly:
            raise _NoError("Mailbox is read-only", "READ-ONLY")
        user = self._address()
        try:
            dest = self.store.mailbox(user, target)
        except MailboxError as exc:
            if exc.code == "NONEXISTENT":
                raise _NoError(str(exc), "TRYCREATE") from exc
            raise
        uids = [self._uids[i] for i in indices]
        pairs = self.store.copy(user, box.name, uids, target) if uids else []
        code = ""
        if pairs:
            code = (
                f"[COPYUID {dest.uidvalidity} {format_uid_set([p[0] for p in pairs])} "
                f"{format_uid_set([p[1] for p in pairs])}] "
            )
        if not move:
            self._tagged(tag, "OK", code + "COPY completed")
            return
        if code:
            self._send(f"* OK {code}Moved")
            self._announce_expunged(self.store.expunge(user, box.name, [p[0] for p in pairs]))
        self._tagged(tag, "OK", "MOVE completed")


def _has_flag(msg: IMAPMessage | None, flag: str) -> bool:
    return msg is not None and flag in msg.flags


def _fetch_items(tok: Token) -> list[_FetchItem]:
    """Parse the FETCH data items (one atom, a macro, or a parenthesised list)."""
    if isinstance(tok, str) and tok.upper() in _MACROS:
        return [_FetchItem(n) for n in _MACROS[tok.upper()]]
    atoms = tok if isinstance(tok, list) else [tok]
    if not atoms:
        raise ParseError("empty FETCH item list")
    items: list[_FetchItem] = []
    for atom in atoms:
        if not isinstance(atom, str):
            raise ParseError("FETCH items must be atoms")
        if atom.upper() in _MACROS:
            # RFC 3501 allows macros only alone, but clients (imapclient) parenthesise them.
            items.extend(_FetchItem(n) for n in _MACROS[atom.upper()])
        else:
            items.append(_fetch_item(atom))
    return items


def _fetch_item(atom: str) -> _FetchItem:
    upper = atom.upper()
    if upper in _SIMPLE_ITEMS:
        if upper == "RFC822":
            return _FetchItem("RFC822", sets_seen=True, section=True)
        if upper == "RFC822.HEADER":
            return _FetchItem("RFC822.HEADER", text="HEADER", section=True)
        if upper == "RFC822.TEXT":
            return _FetchItem("RFC822.TEXT", text="TEXT", sets_seen=True, section=True)
        return _FetchItem(upper)
    m = _SECTION_RE.match(atom)
    if m is None:
        raise ParseError(f"invalid FETCH item {_safe(atom[:40])}")
    peek = m.group(1).upper() == "BODY.PEEK"
    spec = m.group(2)
    fields: tuple[str, ...] = ()
    field_text = ""
    if "(" in spec:
        head, _, rest = spec.partition("(")
        if not rest.endswith(")") or not head.endswith(" "):
            raise ParseError("invalid header field list")
        fields = tuple(f.strip('"') for f in rest[:-1].split())
        if not fields or any(not f or not f.isascii() for f in fields):
            raise ParseError("invalid header field list")
        field_text = " (" + " ".join(fields) + ")"
        spec = head[:-1]
    part: list[int] = []
    words = spec.split(".") if spec else []
    while words and words[0].isdigit():
        n = int(words.pop(0)) if len(words[0]) <= 10 else 0
        if not 1 <= n <= MAX_NUMBER:
            raise ParseError("invalid part number")
        part.append(n)
    text = ".".join(words).upper() or None
    if text is not None and text not in _SECTION_TEXTS:
        raise ParseError(f"invalid section {_safe(spec[:40])}")
    if (text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT")) != bool(fields):
        raise ParseError("header field list required with HEADER.FIELDS only")
    if text == "MIME" and not part:
        raise ParseError("MIME needs a part number")
    start = length = None
    name_spec = ".".join([*(str(p) for p in part), *([text] if text else [])]) + field_text
    name = f"BODY[{name_spec}]"
    if m.group(3) is not None:
        start = int(m.group(3))
        if m.group(4) is not None:
            length = int(m.group(4))
            if length == 0:
                raise ParseError("partial length must be positive")
        name += f"<{start}>"
    return _FetchItem(
        name, tuple(part), text, fields, start, length, sets_seen=not peek, section=True
    )
