"""IMAP4rev1 server side as a sans-IO state machine.

Theory of operation
-------------------
RFC 3501 section 3 defines the states that ``IMAPState`` names:

``NOT_AUTHENTICATED``
    After the greeting: ``CAPABILITY``, ``NOOP``, ``LOGOUT``, ``ID``, ``STARTTLS`` (RFC 3501
    6.2.1), ``LOGIN``, ``AUTHENTICATE`` (PLAIN, XOAUTH2, OAUTHBEARER; SASL-IR). On a connection
    that is not (yet) TLS, logins are refused with ``NO [PRIVACYREQUIRED]`` and CAPABILITY shows
    ``LOGINDISABLED`` (RFC 3501 6.2.3, RFC 8314), unless ``allow_plaintext_auth``.
``AUTHENTICATED``
    Mailbox commands: ``SELECT``/``EXAMINE``, ``CREATE``, ``DELETE``, ``RENAME``,
    ``SUBSCRIBE``/``UNSUBSCRIBE``, ``LIST``/``LSUB`` (with ``\\HasChildren``/``\\HasNoChildren``
    and RFC 6154 SPECIAL-USE attributes), ``STATUS``, ``APPEND`` (RFC 7889 APPENDLIMIT, RFC 4315
    APPENDUID), ``NAMESPACE`` (RFC 2342), ``ENABLE`` (RFC 5161, enables nothing), ``IDLE``
    (RFC 2177). RENAME refuses to move a mailbox under itself (``NO [CANNOT]``); APPEND refuses
    a header that SMTP DATA would refuse (``max_header_size``, ``max_hops``: ``NO [LIMIT]``).
``SELECTED``
    Also ``CHECK``, ``CLOSE``, ``UNSELECT`` (RFC 3691), ``EXPUNGE``, ``SEARCH``, ``FETCH``,
    ``STORE``, ``COPY``, ``MOVE`` (RFC 6851) and their ``UID`` forms, ``UID EXPUNGE`` (RFC 4315).
``LOGOUT``
    After ``LOGOUT``, EOF, the autologout timer or too many bad commands.

Each session keeps its own view of the selected mailbox (``_imapview.MailboxView``): the
ascending UIDs whose positions are the sequence numbers. The adapter forwards every store change
to ``on_store_change``; the machine tells the client at the legal points: before the tagged reply
of each command (no ``EXPUNGE`` while answering FETCH, STORE or SEARCH, RFC 3501 7.4.1), and at
once while the client IDLEs.

STARTTLS: after accepting it the machine parses nothing until ``tls_started()``; plaintext that was
pipelined behind it is command injection (CVE-2011-0411 class) and raises ``RemoteProtocolError``
without a reply. Every error reply is made by one function, ``_reply_error``. Bad commands are
counted: 3 before authentication (Dovecot imap-login), ``max_bad_commands`` after, then
``* BYE Too many invalid IMAP commands.``. Every command with a known verb also counts against
the session's command budget (``command_limits``, docs/security.md A8.3): past the total
(``"*"``) or a verb's own count the command is not run; the machine answers ``* BYE [LIMIT] Too
many commands`` (or ``Too many NOOP commands``; RFC 5530 LIMIT) and ends the session. The
``UID`` forms count as ``UID``. An exception of ours that the MIME code caught and answered
around goes to ``on_error`` (the stack's thread-error recorder): the client gets a well-formed
answer, the test a failure.

Where each part lives: here the states, framing, dispatch, error replies, output and handlers;
the rules are pure functions elsewhere. ``_imapparse``: framing and grammar (literal sizes are
checked before ``+``; a refused RFC 7888 non-synchronising literal ends the session with ``*
BYE [TOOBIG]``), sequence sets, LIST patterns (``ListPattern``: linear time, no regex).
``_imapwire``: arguments, flags, names, quoting, the ``NO`` exception. ``_imapauth``: CAPABILITY,
LOGIN, SASL (PLAIN, OAuth). ``_imapmailbox``: SELECT, CREATE, RENAME, LIST/LSUB, STATUS, APPEND.
``_imapview``: the selected mailbox, its updates, SEARCH, ``\\Recent`` (RFC 3501 2.3.2) and
keyword announcements (7.2.6). ``_imapfetch``: FETCH and STORE. ``_imapsearch``: SEARCH keys.
``_imapstore``: the store protocols (re-exported). ``_mime``: ENVELOPE, BODYSTRUCTURE, sections.

Deliberately unsupported: CONDSTORE/QRESYNC, BINARY, MULTIAPPEND, CATENATE, SORT/THREAD,
LIST-EXTENDED return options (selection ``(SPECIAL-USE)`` is honoured), UTF8=ACCEPT, SASL
mechanisms other than PLAIN, and ACLs.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..errors import MailboxError, RemoteProtocolError, StorageError
from . import _imapauth, _imapfetch, _imapmailbox
from ._imapfetch import FetchItem
from ._imaplimits import PREAUTH_BAD_COMMANDS, CommandBudget, LiteralVerdict, judge_literal
from ._imapparse import (
    CommandReader,
    LiteralAnnounced,
    ParseError,
    RawCommand,
    Token,
    format_uid_set,
    tokenize,
)
from ._imapsearch import BadCharsetError
from ._imapstore import IMAPMailbox, IMAPMessage, IMAPStore, IMAPStoreChange
from ._imapview import MailboxView
from ._imapwire import NoResponseError, flag_list, mailbox_arg, safe, text_arg
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

if TYPE_CHECKING:
    from ._mime import OnError

__all__ = [
    "IMAPConnection",
    "IMAPMailbox",
    "IMAPMessage",
    "IMAPState",
    "IMAPStore",
    "IMAPStoreChange",
]


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


#: FETCH items the flags-only path answers (``IMAPConnection._fetch_flags``); the switch lets
#: tests compare it with the general path.
_FLAG_ITEMS = frozenset({"FLAGS", "UID"})
_FLAGS_FAST_PATH = True

_TAG_RE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+\Z')

_Handler = Callable[[str, list[Token]], None]


#: FETCH responses of ``IMAPConnection._fetch_flags`` handed to the connection at a time.
_FLAGS_BATCH = 1024


class IMAPConnection:
    """One IMAP session over one connection.

    Args:
        store: the mailbox store (see ``IMAPStore``).
        hostname: the server's name, shown in the greeting.
        secure: True when the connection is TLS from the first byte (port 993).
        starttls_available: True when the adapter can upgrade (port 143 with a context).
        allow_plaintext_auth: accept LOGIN/AUTHENTICATE without TLS (tests only).
        clock: wall-clock seconds, the internal date of APPENDed messages.
        max_line: longest command line (Dovecot ``imap_max_line_length``, docs/security.md A6.4).
        max_literal: largest APPEND message, advertised as APPENDLIMIT (RFC 7889).
        max_nonsync_literal: largest ``{n+}`` literal of a command other than APPEND (whose
            literal may reach ``max_literal``: LITERAL+, RFC 7888 section 4).
        max_bad_commands: bad commands tolerated after authentication.
        command_limits: ``(verb, count)`` budgets of the session; ``"*"`` is the total of all
            commands, 0 turns one off (default: ``MailboxLimits().imap_command_limits``).
        max_header_size: largest header field of an APPENDed message, folded lines together;
            0 turns the check off (default: ``SMTPLimits().max_header_size``).
        max_hops: most ``Received`` fields an APPENDed message may carry; 0 turns the check
            off (default: ``SMTPLimits().max_hops``).
        on_error: hears of an exception of ours that the MIME functions caught and answered
            around (a wrong FETCH or SEARCH answer otherwise goes unseen); the stack passes its
            thread-error recorder, so ``MailStack.check()`` re-raises it.
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
        on_error: OnError = None,
        check_token: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.store = store
        self._check_token = check_token  # XOAUTH2/OAUTHBEARER; None refuses every token
        self.hostname = hostname
        self.secure = secure
        self.starttls_available = starttls_available
        self.allow_plaintext_auth = allow_plaintext_auth
        self._clock = clock
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_nonsync_literal = max_nonsync_literal
        self.max_bad_commands = max_bad_commands
        self._budget = CommandBudget(command_limits)
        self.command_limits = self._budget.limits
        self.max_header_size, self.max_hops = _imapmailbox.header_limits(max_header_size, max_hops)
        self.state = IMAPState.NOT_AUTHENTICATED
        self.user: str | None = None
        self._out = OutputBuffer()
        #: Set by an adapter that can send output while a command is still being answered:
        #: a long FETCH calls it between batches, so the client reads while the rest is
        #: built. It is called only while this input raised no event (nothing the adapter
        #: must see first, such as a failed login whose reply it holds back).
        self.flush_hook: Callable[[], None] | None = None
        self._events: list[Event] = []
        self._reader = CommandReader(max_line)
        self._bad = 0
        self._tls_pending = False
        # What the next raw line means when it is not a command.
        self._idle_tag: str | None = None
        self._sasl_tag: str | None = None
        self._sasl: _imapauth.SASLServer | None = None
        self._verb = ""
        self._view: MailboxView | None = None
        self._on_error = on_error
        self._commands = self._command_table()
        self._send(f"* OK [CAPABILITY {self._capabilities()}] {safe(hostname)} IMAP4rev1 ready")

    def _command_table(self) -> dict[str, tuple[_Handler, frozenset[IMAPState]]]:
        """Verb -> (handler, states where it is allowed): the dispatch table of ``_run``."""
        any_state = frozenset(
            [IMAPState.NOT_AUTHENTICATED, IMAPState.AUTHENTICATED, IMAPState.SELECTED]
        )
        pre = frozenset([IMAPState.NOT_AUTHENTICATED])
        auth = frozenset([IMAPState.AUTHENTICATED, IMAPState.SELECTED])
        sel = frozenset([IMAPState.SELECTED])
        return {
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
            "SEARCH": (functools.partial(self._search, uid=False), sel),
            "FETCH": (functools.partial(self._fetch, uid=False), sel),
            "STORE": (functools.partial(self._store, uid=False), sel),
            "COPY": (functools.partial(self._copy, uid=False, move=False), sel),
            "MOVE": (functools.partial(self._copy, uid=False, move=True), sel),
            "UID": (self._cmd_UID, sel),
        }

    # The machine interface: receive_data(b"") is EOF (h11), data_to_send() as in h2

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
        view = self._view
        if view is None or self.user is None or change.mailbox != view.box.name:
            return
        if change.user != self.user.strip().lower():
            return
        if change.kind == "mailboxes" and not self._still_selected(view):
            # Another session deleted (or deleted and created anew) the selected mailbox: its
            # messages and UIDs are gone, and a new mailbox of that name is another mailbox
            # (a new UIDVALIDITY), so this session cannot go on with it (as Dovecot does).
            self._send("* BYE Selected mailbox was deleted, have to disconnect.")
            self._end_session()
            return
        view.note(change)
        if self._idle_tag is not None:
            self._send_updates(allow_expunge=True)

    @property
    def ended(self) -> bool:
        """The session is over (LOGOUT, a BYE): the adapter closes the connection."""
        return self.state is IMAPState.LOGOUT

    def _still_selected(self, view: MailboxView) -> bool:
        """Whether the store still holds the selected mailbox under its name."""
        try:
            return self.store.mailbox(self._address(), view.box.name) is view.box
        except MailboxError:
            return False

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
        verdict = judge_literal(
            lit,
            append=append,
            max_literal=self.max_literal,
            max_line=self.max_line,
            max_nonsync_literal=self.max_nonsync_literal,
        )
        if verdict is LiteralVerdict.ACCEPT:
            self._reader.accept_literal()
            if lit.sync:
                self._send("+ Ready for literal data")
            return
        self._reader.reject_literal()
        tag = lit.tag if _TAG_RE.match(lit.tag.encode("ascii", "replace")) else "*"
        if verdict is LiteralVerdict.BYE:
            self._send("* BYE [TOOBIG] Non-synchronizing literal size too large")
            self._end_session()
            self._events.append(ConnectionClosed())
        elif verdict is LiteralVerdict.TOO_BIG:
            self._send(f"{tag} NO [TOOBIG] Message too large (APPENDLIMIT {self.max_literal})")
        else:
            self._send(f"{tag} BAD Literal too large")
            self._count_bad()

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
                raise ParseError(f"Unknown command {safe(verb[:20])}")
            if self._over_budget(verb):
                return
            handler, states = entry
            if self.state not in states:
                raise ParseError(f"{verb} not allowed in state {self.state.value}")
            handler(tag, tokens[2:])
        except (ParseError, NoResponseError, MailboxError, StorageError) as exc:
            self._reply_error(tag, exc)

    def _reply_error(self, tag: str, exc: Exception) -> None:
        """The one place that turns an exception into a BAD/NO reply."""
        if isinstance(exc, BadCharsetError):
            self._tagged(tag, "NO", f"[BADCHARSET (UTF-8 US-ASCII)] {safe(str(exc))}")
        elif isinstance(exc, ParseError):
            self._tagged(tag, "BAD", safe(str(exc)) or "Syntax error")
            self._count_bad()
        elif isinstance(exc, NoResponseError):
            code = f"[{exc.code}] " if exc.code else ""
            self._tagged(tag, "NO", code + safe(str(exc)))
        elif isinstance(exc, MailboxError):
            self._tagged(tag, "NO", f"[{safe(exc.code)}] {safe(str(exc))}")
        elif isinstance(exc, StorageError):
            # Disk full or I/O error in a durable store: temporary (RFC 5530 UNAVAILABLE).
            self._tagged(tag, "NO", f"[UNAVAILABLE] {safe(str(exc))}")
        else:  # pragma: no cover - the caller passes only the types above
            raise exc

    def _over_budget(self, verb: str) -> bool:
        """Count one command; past a budget say BYE and end the session."""
        text = self._budget.charge(verb)
        if text is None:
            return False
        self._send(f"* BYE [LIMIT] {text}")
        self._end_session()
        self._events.append(ConnectionClosed())
        return True

    def _count_bad(self) -> None:
        self._bad += 1
        authed = self.state in (IMAPState.AUTHENTICATED, IMAPState.SELECTED)
        limit = self.max_bad_commands if authed else PREAUTH_BAD_COMMANDS
        if self._bad >= limit and self.state is not IMAPState.LOGOUT:
            self._send("* BYE Too many invalid IMAP commands.")
            self._end_session()
            self._events.append(ConnectionClosed())

    # Output

    def _send(self, line: str | bytes) -> None:
        self._out += line.encode("utf-8") if isinstance(line, str) else line
        self._out += CRLF

    def _send_all(self, lines: Iterable[str | bytes]) -> None:
        for line in lines:
            self._send(line)

    def _tagged(self, tag: str, status: str, text: str) -> None:
        if self.state is IMAPState.SELECTED:
            self._send_updates(allow_expunge=self._verb not in ("FETCH", "STORE", "SEARCH"))
        self._send(f"{tag} {status} {text}")

    def _send_updates(self, *, allow_expunge: bool) -> None:
        """Untagged EXPUNGE/EXISTS/FETCH for changes made by others."""
        if self._view is not None:
            self._send_all(self._view.updates(allow_expunge=allow_expunge))

    def _capabilities(self) -> str:
        return _imapauth.capabilities(
            authenticated=self.state is not IMAPState.NOT_AUTHENTICATED,
            secure=self.secure,
            starttls_available=self.starttls_available,
            allow_plaintext_auth=self.allow_plaintext_auth,
            max_literal=self.max_literal,
        )

    def _end_session(self) -> None:
        self.state = IMAPState.LOGOUT
        self._view = None
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
            raise NoResponseError(
                "Plaintext authentication disallowed on non-secure connections", "PRIVACYREQUIRED"
            )

    def _cmd_LOGIN(self, tag: str, args: list[Token]) -> None:
        user, password = _imapauth.login_args(args)
        self._require_privacy()
        self._login(tag, user if user and self.store.check_password(user, password) else None)

    def _auth_failure(self) -> NoResponseError:
        """The one reply for every failed login, and the event that makes the adapter wait."""
        self._events.append(AuthenticationFailed())
        return NoResponseError("Authentication failed.", "AUTHENTICATIONFAILED")

    def _login(self, tag: str, user: str | None) -> None:
        if not user:
            raise self._auth_failure()
        self._events.append(AuthenticationSucceeded())
        self.user = user
        self.state = IMAPState.AUTHENTICATED
        self._bad = 0
        self._tagged(tag, "OK", f"[CAPABILITY {self._capabilities()}] Logged in")

    def _cmd_AUTHENTICATE(self, tag: str, args: list[Token]) -> None:
        if not args or not isinstance(args[0], str) or len(args) > 2:
            raise ParseError("AUTHENTICATE expects a mechanism")
        if args[0].upper() not in _imapauth.MECHANISMS:
            raise NoResponseError("Unsupported authentication mechanism", "CANNOT")
        self._require_privacy()
        self._sasl = _imapauth.SASLServer(args[0], self.store, self._check_token)
        if len(args) == 2:
            self._sasl_response(tag, text_arg(args[1], "initial response"))
        else:
            self._sasl_tag = tag
            self._send("+ ")

    def _sasl_line(self, line: bytes) -> None:
        tag = self._sasl_tag or "*"
        self._sasl_tag = None
        if line.strip() == b"*" and not (self._sasl and self._sasl.rejected):
            self._tagged(tag, "BAD", "Authentication cancelled")
            return
        try:
            self._sasl_response(tag, line.strip())
        except (ParseError, NoResponseError) as exc:
            self._reply_error(tag, exc)

    def _sasl_response(self, tag: str, data: bytes) -> None:
        assert self._sasl is not None
        result = self._sasl.step(data)
        if isinstance(result, bytes):  # RFC 7628 3.2.2: the error status, then the failure
            self._sasl_tag = tag
            return self._send(b"+ " + result)
        self._login(tag, result)

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
        name = _imapmailbox.one_mailbox(args)
        # RFC 3501 6.3.1: a failed SELECT leaves no mailbox selected.
        self._view = None
        if self.state is IMAPState.SELECTED:
            self.state = IMAPState.AUTHENTICATED
        user = self._address()
        box = self.store.mailbox(user, name)
        claim = functools.partial(self.store.claim_recent, user, box.name)
        self._view = view = MailboxView(box, readonly=readonly, claim=claim)
        self.state = IMAPState.SELECTED
        flags = view.select_flags()
        self._send_all(
            _imapmailbox.select_lines(box, view.uids, flags=flags, recent=len(view.recent))
        )
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self._tagged(tag, "OK", f"[{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    def _cmd_CREATE(self, tag: str, args: list[Token]) -> None:
        self.store.create_mailbox(self._address(), _imapmailbox.create_name(args))
        self._tagged(tag, "OK", "CREATE completed")

    def _cmd_DELETE(self, tag: str, args: list[Token]) -> None:
        self.store.delete_mailbox(self._address(), _imapmailbox.one_mailbox(args))
        self._tagged(tag, "OK", "DELETE completed")

    def _cmd_RENAME(self, tag: str, args: list[Token]) -> None:
        if len(args) != 2:
            raise ParseError("RENAME expects two mailbox names")
        old, new = mailbox_arg(args[0]), mailbox_arg(args[1])
        _imapmailbox.check_rename(old, new)
        self.store.rename_mailbox(self._address(), old, new)
        self._tagged(tag, "OK", "RENAME completed")

    def _cmd_SUBSCRIBE(self, tag: str, args: list[Token]) -> None:
        self.store.subscribe(self._address(), _imapmailbox.one_mailbox(args), True)
        self._tagged(tag, "OK", "SUBSCRIBE completed")

    def _cmd_UNSUBSCRIBE(self, tag: str, args: list[Token]) -> None:
        self.store.subscribe(self._address(), _imapmailbox.one_mailbox(args), False)
        self._tagged(tag, "OK", "UNSUBSCRIBE completed")

    def _cmd_LIST(self, tag: str, args: list[Token]) -> None:
        self._list(tag, args, lsub=False)

    def _cmd_LSUB(self, tag: str, args: list[Token]) -> None:
        self._list(tag, args, lsub=True)

    def _list(self, tag: str, args: list[Token], *, lsub: bool) -> None:
        ref, pattern, special_only = _imapmailbox.parse_list(args, lsub=lsub)
        boxes = self.store.mailboxes(self._address()) if pattern or lsub else []
        subscribed = self.store.subscriptions(self._address()) if lsub else None
        lines = _imapmailbox.list_lines(
            boxes, ref, pattern, lsub=lsub, special_only=special_only, subscriptions=subscribed
        )
        self._send_all(lines)
        self._tagged(tag, "OK", f"{'LSUB' if lsub else 'LIST'} completed")

    def _cmd_STATUS(self, tag: str, args: list[Token]) -> None:
        if len(args) != 2 or not isinstance(args[1], list):
            raise ParseError("STATUS expects a mailbox and a list of items")
        box = self.store.mailbox(self._address(), mailbox_arg(args[0]))
        self._send(_imapmailbox.status_line(box, args[1]))
        self._tagged(tag, "OK", "STATUS completed")

    def _cmd_APPEND(self, tag: str, args: list[Token]) -> None:
        req = _imapmailbox.parse_append(args)
        _imapmailbox.check_append(req.message, max_literal=self.max_literal)
        user = self._address()
        box = self._target_mailbox(user, req.mailbox)
        _imapmailbox.check_append_header(
            req.message, max_header_size=self.max_header_size, max_hops=self.max_hops
        )
        when = self._clock() if req.when is None else req.when
        msg = self.store.append(
            user, req.message, mailbox=req.mailbox, flags=req.flags, internal_date=when
        )
        self._tagged(tag, "OK", f"[APPENDUID {box.uidvalidity} {msg.uid}] APPEND completed")

    def _target_mailbox(self, user: str, name: str) -> IMAPMailbox:
        """The mailbox APPEND, COPY or MOVE puts messages into (RFC 3501 6.3.11 TRYCREATE)."""
        try:
            return self.store.mailbox(user, name)
        except MailboxError as exc:
            if exc.code == "NONEXISTENT":
                raise NoResponseError(str(exc), "TRYCREATE") from exc
            raise

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

    def _selected(self) -> MailboxView:
        if self._view is None:
            raise NoResponseError("No mailbox selected")
        return self._view

    def _cmd_CHECK(self, tag: str, args: list[Token]) -> None:
        self._tagged(tag, "OK", "CHECK completed")

    def _cmd_CLOSE(self, tag: str, args: list[Token]) -> None:
        view = self._selected()
        if not view.readonly:
            deleted = view.deleted()
            if deleted:
                self.store.expunge(self._address(), view.box.name, deleted)
        self._unselect()
        self._send(f"{tag} OK CLOSE completed")

    def _cmd_UNSELECT(self, tag: str, args: list[Token]) -> None:
        self._unselect()
        self._send(f"{tag} OK UNSELECT completed")

    def _unselect(self) -> None:
        self._view = None
        self.state = IMAPState.AUTHENTICATED

    def _cmd_EXPUNGE(self, tag: str, args: list[Token]) -> None:
        self._expunge(tag, None)

    def _expunge(self, tag: str, only: list[int] | None) -> None:
        view = self._selected()
        if view.readonly:
            raise NoResponseError("Mailbox is read-only", "READ-ONLY")
        deleted = view.deleted(only)
        if deleted:
            self._announce_expunged(self.store.expunge(self._address(), view.box.name, deleted))
        self._tagged(tag, "OK", "EXPUNGE completed")

    def _announce_expunged(self, gone: list[int]) -> None:
        self._send_all(self._selected().expunged(gone))

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
            view = self._selected()
            self._expunge(tag, [view.uids[i] for i in view.indices(rest[0], uid=True)])
        else:
            raise ParseError(f"Unknown UID command {safe(sub[:20])}")

    def _search(self, tag: str, args: list[Token], *, uid: bool) -> None:
        hits = self._selected().search(args, uid=uid, on_error=self._on_error)
        self._send("* SEARCH" + "".join(f" {n}" for n in hits))
        self._tagged(tag, "OK", "SEARCH completed")

    def _fetch(self, tag: str, args: list[Token], *, uid: bool) -> None:
        view = self._selected()
        box = view.box
        if len(args) != 2:
            raise ParseError("FETCH expects a sequence set and data items")
        items = _imapfetch.parse_fetch_items(args[1])
        indices = view.indices(args[0], uid=uid)
        if uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
        sets_seen = not view.readonly and any(i.sets_seen for i in items)
        wants_flags = any(i.name == "FLAGS" for i in items)
        if _FLAGS_FAST_PATH and not sets_seen and all(i.name in _FLAG_ITEMS for i in items):
            self._fetch_flags(view, indices, [i.name for i in items])
            self._tagged(tag, "OK", "FETCH completed")
            return
        for index in indices:
            msg_uid = view.uids[index]
            msg = box.get(msg_uid)
            if msg is None:  # expunged by another session, not yet announced
                continue
            add_flags = False
            if sets_seen and "\\Seen" not in msg.flags:
                self.store.set_flags(self._address(), box.name, {msg_uid: msg.flags | {"\\Seen"}})
                add_flags = not wants_flags
            if wants_flags or add_flags:
                view.known_flags[msg_uid] = msg.flags
                self._send_all(view.announce(msg.flags))
            chunks = _imapfetch.fetch_response(
                index,
                msg,
                items,
                add_flags=add_flags,
                flags=view.flags_of(msg),
                on_error=self._on_error,
            )
            for chunk in chunks:  # one by one: a message literal is never copied
                self._out += chunk
        self._tagged(tag, "OK", "FETCH completed")

    def _fetch_flags(self, view: MailboxView, indices: Iterable[int], names: list[str]) -> None:
        """FETCH of FLAGS and UID alone: what a client syncing a folder asks of every message.

        The same responses as the general path (``_imapfetch.fetch_response``), with each
        distinct flag set rendered and announced once, and the lines handed over in batches:
        a few microseconds a message instead of about seven (100,000 messages: issue #17).
        """
        get = view.box.get
        uids = view.uids
        known = view.known_flags
        recent = view.recent
        wants_flags = "FLAGS" in names
        # The line's shape once: "%d" for the sequence number, then the items in order.
        shape = b"* %d FETCH (" + b" ".join(b"%s" if n == "FLAGS" else b"UID %d" for n in names)
        shape += b")\r\n"
        rendered: dict[frozenset[str], bytes] = {}
        rendered_recent: dict[frozenset[str], bytes] = {}
        batch: list[bytes] = []
        append = batch.append
        # FETCH 1:* (FLAGS), the usual case, formats its two values without building a list.
        flags_only = names == ["FLAGS"]
        indices = indices if isinstance(indices, list) else list(indices)
        for start in range(0, len(indices), _FLAGS_BATCH):
            for index in indices[start : start + _FLAGS_BATCH]:
                msg_uid = uids[index]
                msg = get(msg_uid)
                if msg is None:  # expunged by another session, not yet announced
                    continue
                text = b""
                if wants_flags:
                    flags = msg.flags
                    cache = rendered_recent if recent and msg_uid in recent else rendered
                    found = cache.get(flags)
                    if found is None:
                        announced = view.announce(flags)
                        if announced:  # before the first FETCH that shows the keyword
                            self._out += b"".join(batch)
                            batch.clear()
                            self._send_all(announced)
                        found = cache[flags] = b"FLAGS " + flag_list(view.flags_of(msg))
                    text = found
                    known[msg_uid] = flags
                if flags_only:
                    append(shape % (index + 1, text))
                else:
                    append(shape % (index + 1, *[text if n == "FLAGS" else msg_uid for n in names]))
            self._out += b"".join(batch)
            batch.clear()
            more = start + _FLAGS_BATCH < len(indices)  # the last lines go with the tagged reply
            if more and self.flush_hook is not None and not self._events:
                self.flush_hook()

    def _store(self, tag: str, args: list[Token], *, uid: bool) -> None:
        view = self._selected()
        item, silent, flags = _imapfetch.parse_store(args)
        indices = view.indices(args[0], uid=uid)
        if view.readonly:
            raise NoResponseError("Mailbox is read-only", "READ-ONLY")
        updates = view.flag_updates(indices, item, flags)
        if updates:
            self.store.set_flags(self._address(), view.box.name, updates)
        self._send_all(view.flag_responses(indices, silent=silent, uid=uid))
        self._tagged(tag, "OK", "STORE completed")

    def _copy(self, tag: str, args: list[Token], *, uid: bool, move: bool) -> None:
        view = self._selected()
        box = view.box
        if len(args) != 2:
            raise ParseError("expected a sequence set and a mailbox")
        indices = view.indices(args[0], uid=uid)
        target = mailbox_arg(args[1])
        if move and view.readonly:
            raise NoResponseError("Mailbox is read-only", "READ-ONLY")
        user = self._address()
        dest = self._target_mailbox(user, target)
        uids = [view.uids[i] for i in indices]
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
