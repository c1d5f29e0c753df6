"""POP3 server side as a sans-IO state machine.

Theory of operation
-------------------
RFC 1939 defines three states, which ``POP3State`` names with the RFC's words:

``AUTHORIZATION``
    After the greeting. The client may ask for ``CAPA`` (RFC 2449), upgrade with ``STLS``
    (RFC 2595) and log in with ``USER``/``PASS`` or ``AUTH`` (RFC 5034, with or without a SASL
    initial response): PLAIN, or a bearer token with XOAUTH2 or OAUTHBEARER (RFC 7628, see
    ``_oauth``; a refused token gets the error status as a ``+`` challenge, then
    ``-ERR [AUTH]``). On success the machine takes the exclusive maildrop lock (RFC 1939
    section 8) and a snapshot of the INBOX: message numbers, sizes and unique-ids are fixed
    for the rest of the session, whatever else happens to the store.
``TRANSACTION``
    ``STAT``, ``LIST``, ``UIDL``, ``TOP``, ``RETR``, ``DELE``, ``RSET``, ``NOOP``, ``QUIT``.
    ``DELE`` only marks a message.
``UPDATE``
    Entered by ``QUIT`` from ``TRANSACTION`` only: the marked messages are removed from the store,
    the lock is released and the connection closes. Any other end of the session (EOF, an
    aborted socket, the autologout timer, too many bad commands) removes nothing (RFC 1939
    section 6; docs/security.md A7.2).

Bytes go in through ``receive_data`` (``b""`` means EOF) and replies come out of
``data_to_send``. The machine returns ``StartTLSRequested`` after it has accepted ``STLS``; it then
refuses all input until the adapter calls ``tls_started()``, after which it starts over in a fresh
``AUTHORIZATION`` state. Plaintext pipelined behind ``STLS`` is command injection
(CVE-2011-0411, CVE-2021-38084) and raises ``RemoteProtocolError`` without a reply.

Every failed command is answered by exactly one function, ``_reply_error``. Unknown commands,
commands in the wrong state, syntax errors, over-long lines and failed logins count as bad
commands; one more than ``max_bad_commands`` ends the session (Dovecot pop3-login allows 3).
Every command with a known verb also counts against the session's command budget
(``command_limits``, docs/security.md A8.3), which STLS does not reset: past the total
(``"*"``) or a verb's own count, the command is not run; the machine answers ``-ERR too many
commands`` (or ``-ERR too many NOOP commands``) and ends the session without UPDATE. ``LIST``
and ``UIDL`` count against their own budget only without an argument (the whole scan
listing).
Replies never echo the client's line, and passwords are neither logged nor repeated.

Deliberately unsupported: APOP (MD5 of a shared secret, RFC 1939 section 7), SASL mechanisms
other than PLAIN, XOAUTH2 and OAUTHBEARER, the ``LOGIN-DELAY`` and ``EXPIRE`` capabilities,
and ``UTF8``/``LANG`` (RFC 6856). ``auth_failure_delay`` is kept for the adapter; the machine
itself never waits.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..config import MailboxLimits
from ..errors import LocalProtocolError, RemoteProtocolError, RoundtripError
from . import _oauth
from ._lines import (
    CRLF,
    AuthenticationFailed,
    AuthenticationSucceeded,
    ConnectionClosed,
    Event,
    LineBuffer,
    LineTooLong,
    OutputBuffer,
    StartTLSRequested,
    dot_stuff,
)

__all__ = [
    "POP3Connection",
    "POP3Mailbox",
    "POP3Message",
    "POP3State",
    "POP3Store",
]


class POP3Message(Protocol):
    """One stored message, as the POP3 machine reads it."""

    @property
    def uid(self) -> int: ...

    @property
    def raw(self) -> bytes: ...

    def parts(self) -> tuple[bytes, bytes]:
        """``(head, rest)`` with ``head + rest == raw``, ``head`` whole header fields or
        ``b""`` (``roundtrip.store.StoredMessage.parts``)."""
        ...


class POP3Mailbox(Protocol):
    """A mailbox view: UIDs ascending, messages by UID, and the UIDVALIDITY of the folder."""

    @property
    def uidvalidity(self) -> int: ...

    def uids(self) -> list[int]: ...

    def get(self, uid: int) -> POP3Message | None: ...


class POP3Store(Protocol):
    """The part of ``roundtrip.store.Store`` the POP3 machine uses."""

    def check_password(self, address: str, password: str) -> bool: ...

    def mailbox(self, address: str, name: str = "INBOX") -> POP3Mailbox: ...

    def expunge(self, address: str, mailbox: str, uids: Iterable[int]) -> object: ...

    def lock_maildrop(self, address: str) -> bool: ...

    def unlock_maildrop(self, address: str) -> None: ...


class POP3State(enum.Enum):
    """The session states of RFC 1939 section 3."""

    #: Before login: CAPA, STLS, USER/PASS, AUTH, QUIT.
    AUTHORIZATION = "AUTHORIZATION"
    #: Logged in, maildrop locked, message list fixed.
    TRANSACTION = "TRANSACTION"
    #: After QUIT from TRANSACTION: deletions are applied, then the connection closes.
    UPDATE = "UPDATE"


# RFC 2449 section 4: a command line is at most 255 octets, including its CRLF.
_MAX_COMMAND_LINE = 255

# Message numbers are positive decimals; ten digits already exceed any real maildrop, and the
# cap keeps int() away from attacker-sized numbers.
_NUMBER = re.compile(r"[0-9]{1,10}")

_PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections"
_AUTH_FAILED = "Authentication failed"
#: RFC 5034 AUTH mechanisms, as listed in CAPA's SASL line.
_MECHANISMS = ("PLAIN", *_oauth.MECHANISMS)

_A = POP3State.AUTHORIZATION
_T = POP3State.TRANSACTION


class _CommandError(RemoteProtocolError):
    """A command failed; ``_reply_error`` turns it into ``-ERR [code] text``.

    ``bad`` marks the failures that count towards ``max_bad_commands``.
    """

    def __init__(self, text: str, *, code: str = "", bad: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.bad = bad


@dataclass(frozen=True, slots=True)
class _Entry:
    """One message of the session's snapshot: its bytes, or the stored message itself while
    the store keeps it in two parts (immutable, and joined by the store once, on the first
    RETR or TOP, not at login beside a copy the relay may still hold)."""

    uid: int
    unique_id: str
    size: int
    source: bytes | POP3Message

    @property
    def raw(self) -> bytes:
        source = self.source
        return source if isinstance(source, bytes) else source.raw


def _wire_size(raw: bytes) -> int:
    """Octets of the message as RETR sends it (CRLF line ends), before dot-stuffing.

    RFC 1939 section 5 asks for the exact size; messages with bare LFs grow on the wire.
    """
    if not raw:
        return 0
    bare_lf = raw.count(b"\n") - raw.count(b"\r\n")
    # The last line's ending as dot_stuff completes it (protocols/_lines.py): nothing after
    # an LF, an LF after a final CR, CRLF otherwise.
    tail = 0 if raw.endswith(b"\n") else 1 if raw.endswith(b"\r") else 2
    return len(raw) + bare_lf + tail


def _top(raw: bytes, lines: int) -> bytes:
    """The header, the blank separator line and the first ``lines`` body lines of ``raw``."""
    parts = [part + b"\n" for part in raw.split(b"\n")]
    parts[-1] = parts[-1][:-1]
    for index, part in enumerate(parts):
        if part in (b"\r\n", b"\n"):
            return b"".join(parts[: index + 1 + lines])
    return raw


class POP3Connection:
    """One POP3 session, server side.

    Args:
        store: where logins are checked and messages live (``roundtrip.store.Store`` fits).
        hostname: the server's name, shown in the greeting.
        secure: the transport is already TLS (implicit TLS, port 995).
        starttls_available: offer ``STLS`` while the transport is plaintext.
        allow_plaintext_auth: accept USER/PASS and AUTH before TLS (RFC 2595 says don't).
        max_line: longest command line in octets, CRLF included (RFC 2449 section 4).
        max_bad_commands: bad commands tolerated; one more closes the session.
        command_limits: ``(verb, count)`` budgets of the session; ``"*"`` is the total of all
            commands, 0 turns one off (default: ``MailboxLimits().pop3_command_limits``).
        auth_failure_delay: seconds an adapter should hold back a failed-login reply. The
            machine never waits itself; it only keeps the value for its adapter.

    Raises:
        LocalProtocolError: ``hostname`` contains a line break.
    """

    def __init__(
        self,
        store: POP3Store,
        *,
        hostname: str,
        secure: bool,
        starttls_available: bool,
        allow_plaintext_auth: bool = False,
        max_line: int = _MAX_COMMAND_LINE,
        max_bad_commands: int = 3,
        auth_failure_delay: float | None = None,
        command_limits: Iterable[tuple[str, int]] | None = None,
        check_token: Callable[[str, str], bool] | None = None,
    ) -> None:
        if "\r" in hostname or "\n" in hostname:
            raise LocalProtocolError(f"hostname {hostname!r} contains a line break")
        self._store = store
        self._check_token = check_token  # XOAUTH2/OAUTHBEARER; None refuses every token
        self.hostname = hostname
        self.secure = secure
        self._starttls_available = starttls_available
        self._allow_plaintext_auth = allow_plaintext_auth
        self._max_line = max_line
        self.max_bad_commands = max_bad_commands
        self.auth_failure_delay = auth_failure_delay
        if command_limits is None:
            command_limits = MailboxLimits().pop3_command_limits
        self.command_limits = {v.upper(): n for v, n in command_limits if v and n > 0}
        # Per connection, not per _reset_session: STLS must not refill the budget.
        self._command_counts: dict[str, int] = {}
        self._out = OutputBuffer()
        self._commands: dict[str, tuple[Callable[[str], None], frozenset[POP3State]]] = {
            "CAPA": (self._cmd_CAPA, frozenset({_A, _T})),
            "STLS": (self._cmd_STLS, frozenset({_A})),
            "USER": (self._cmd_USER, frozenset({_A})),
            "PASS": (self._cmd_PASS, frozenset({_A})),
            "AUTH": (self._cmd_AUTH, frozenset({_A})),
            "QUIT": (self._cmd_QUIT, frozenset({_A, _T})),
            "STAT": (self._cmd_STAT, frozenset({_T})),
            "LIST": (self._cmd_LIST, frozenset({_T})),
            "UIDL": (self._cmd_UIDL, frozenset({_T})),
            "TOP": (self._cmd_TOP, frozenset({_T})),
            "RETR": (self._cmd_RETR, frozenset({_T})),
            "DELE": (self._cmd_DELE, frozenset({_T})),
            "RSET": (self._cmd_RSET, frozenset({_T})),
            "NOOP": (self._cmd_NOOP, frozenset({_T})),
        }
        self._reset_session()
        self._closed = False
        self._write(f"+OK {hostname} roundtrip POP3 server ready")

    def _reset_session(self) -> None:
        """A fresh AUTHORIZATION state (at start, and again after STLS)."""
        self.state = POP3State.AUTHORIZATION
        self._buffer = LineBuffer(self._max_line - 1)  # LineBuffer's limit excludes the LF
        self._auth_events: list[Event] = []
        self._bad_commands = 0
        self._user: str | None = None
        self._sasl_pending = False
        self._bearer: _oauth.BearerExchange | None = None
        self._tls_pending = False
        self._address: str | None = None
        self._locked = False
        self._messages: list[_Entry] = []
        self._deleted: set[int] = set()

    # Public interface (docs/design.md, layers)

    @property
    def user(self) -> str | None:
        """The logged-in address, or None before login."""
        return self._address

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; ``b""`` means the peer closed.

        Returns:
            ``StartTLSRequested`` after STLS was accepted, ``ConnectionClosed`` when the session
            is over (QUIT, EOF, too many bad commands).

        Raises:
            RemoteProtocolError: input arrived while a TLS upgrade was pending, or plaintext
                was pipelined behind STLS. The session is closed and holds no lock.
        """
        if self._closed:
            return []
        if not data:
            self._close()
            return [ConnectionClosed()]
        if self._tls_pending:
            self._close()
            raise RemoteProtocolError("plaintext received while waiting for the TLS handshake")
        self._buffer.feed(data)
        while not self._closed and not self._tls_pending:
            try:
                line = self._buffer.next_line()
            except LineTooLong as exc:
                self._reply_error(exc)
                continue
            if line is None:
                break
            self._handle_line(line)
        events, self._auth_events = self._auth_events, []
        if self._closed:
            return [*events, ConnectionClosed()]
        if self._tls_pending:
            return [*events, StartTLSRequested()]
        return events

    def data_to_send(self) -> bytes:
        """Drain the replies written so far."""
        return self._out.take()

    def data_to_send_chunks(self) -> list[bytes]:
        """``data_to_send()`` as pieces, not joined: a RETR body is the stored bytes."""
        return self._out.take_chunks()

    def tls_started(self) -> None:
        """The adapter finished the STLS handshake: start over in AUTHORIZATION, now secure.

        Raises:
            LocalProtocolError: no STLS was pending.
        """
        if not self._tls_pending:
            raise LocalProtocolError("tls_started() called without a pending STLS")
        self._reset_session()
        self.secure = True

    def timed_out(self) -> None:
        """The autologout timer fired (RFC 1939 section 3): say so and end without UPDATE."""
        if self._closed:
            return
        self._write("-ERR autologout")
        self._close()

    # Line handling

    def _handle_line(self, line: bytes) -> None:
        try:
            if self._sasl_pending:
                self._sasl_pending = False
                self._auth_response(line)
                return
            verb_bytes, _, arg_bytes = line.partition(b" ")
            verb = verb_bytes.decode("ascii", "replace").upper()
            entry = self._commands.get(verb) if verb.isalpha() else None
            if entry is None:
                raise _CommandError("unknown command", bad=True)
            scan = verb not in ("LIST", "UIDL") or not arg_bytes.strip(_SP)
            if self._over_budget(verb if scan else ""):
                return
            handler, states = entry
            if self.state not in states:
                raise _CommandError(f"{verb} not allowed in the {self.state.name} state", bad=True)
            if verb == "PASS":
                # RFC 1939 section 7: the password is the rest of the line, spaces included.
                arg = arg_bytes.decode("utf-8", "surrogateescape")
            else:
                try:
                    arg = arg_bytes.decode("ascii").strip(" ")
                except UnicodeDecodeError:
                    raise _CommandError("arguments must be ASCII", bad=True) from None
                if "\x00" in arg:
                    raise _CommandError("NUL in command", bad=True)
            handler(arg)
        except _CommandError as exc:
            self._reply_error(exc)
        except RemoteProtocolError:
            raise  # STLS injection: no reply at all, the adapter closes
        except RoundtripError as exc:  # the store refused
            self._reply_error(exc)

    def _reply_error(self, exc: Exception) -> None:
        """The one place where a failure becomes an ``-ERR`` reply."""
        if isinstance(exc, _CommandError):
            text, code, bad = exc.text, exc.code, exc.bad
        elif isinstance(exc, LineTooLong):
            text, code, bad = "line too long", "", True
        else:  # the store refused (MailboxError, StorageError): a temporary server-side failure
            text, code, bad = "temporary failure, try again later", "SYS/TEMP", False
        if bad:
            self._bad_commands += 1
            if self._bad_commands > self.max_bad_commands:
                self._write("-ERR too many bad commands")
                self._close()
                return
        self._write(f"-ERR [{code}] {text}" if code else f"-ERR {text}")

    def _over_budget(self, verb: str) -> bool:
        """Count one command (``verb`` empty: only towards the total); past a budget, say so
        and end the session (docs/security.md A8.3)."""
        counts = self._command_counts
        for key in (verb, "*"):
            if key in self.command_limits:
                counts[key] = counts.get(key, 0) + 1
        if counts.get(verb, 0) > self.command_limits.get(verb, 0):
            self._write(f"-ERR too many {verb} commands")
        elif counts.get("*", 0) > self.command_limits.get("*", 0):
            self._write("-ERR too many commands")
        else:
            return False
        self._close()
        return True

    def _write(self, line: str) -> None:
        self._out += line.encode("utf-8") + CRLF

    def _write_multiline(self, first: str, body: bytes) -> None:
        """``+OK first``, the dot-stuffed ``body``, then ``.`` (RFC 1939 section 3)."""
        self._write(f"+OK {first}")
        self._out += body
        self._out += b"." + CRLF

    def _close(self) -> None:
        """End the session without UPDATE: release the lock, delete nothing."""
        self._closed = True
        self._sasl_pending = False
        self._release()

    def _release(self) -> None:
        if self._locked and self._address is not None:
            self._locked = False
            self._store.unlock_maildrop(self._address)

    # AUTHORIZATION

    @property
    def _auth_allowed(self) -> bool:
        return self.secure or self._allow_plaintext_auth

    def _require_auth_allowed(self) -> None:
        if not self._auth_allowed:
            raise _CommandError(_PLAINTEXT_REFUSED, code="AUTH")

    def _cmd_CAPA(self, arg: str) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is POP3State.AUTHORIZATION:
            if self._auth_allowed:
                caps += ["USER", "SASL " + " ".join(_MECHANISMS)]
            if self._starttls_available and not self.secure:
                caps.append("STLS")
        caps.append("IMPLEMENTATION roundtrip")
        self._write_multiline("Capability list follows", "".join(c + "\r\n" for c in caps).encode())

    def _cmd_STLS(self, arg: str) -> None:
        if self.secure:
            raise _CommandError("already using TLS")
        if not self._starttls_available:
            raise _CommandError("STLS not available", bad=True)
        if len(self._buffer):
            # RFC 2595 section 4 / CVE-2011-0411: nothing may follow STLS before the handshake.
            self._close()
            raise RemoteProtocolError("plaintext pipelined after STLS (command injection)")
        self._write("+OK Begin TLS negotiation")
        self._tls_pending = True

    def _cmd_USER(self, arg: str) -> None:
        self._require_auth_allowed()
        if not arg:
            raise _CommandError("USER needs a name", bad=True)
        self._user = arg
        self._write("+OK")

    def _cmd_PASS(self, arg: str) -> None:
        self._require_auth_allowed()
        user, self._user = self._user, None
        if user is None:
            raise _CommandError("USER first", bad=True)
        self._login(user, arg)

    def _cmd_AUTH(self, arg: str) -> None:
        self._require_auth_allowed()
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            # The draft-era "AUTH" listing some clients still send before CAPA.
            self._write_multiline("SASL mechanisms follow", b"PLAIN\r\n")
            return
        if mechanism.upper() not in _MECHANISMS:
            raise _CommandError("unsupported authentication mechanism", bad=True)
        self._bearer = None
        if mechanism.upper() in _oauth.MECHANISMS:
            self._bearer = _oauth.BearerExchange(mechanism, self._check_token)
        if initial.strip(" "):
            self._auth_response(initial.strip(" ").encode("ascii"))
        else:
            # RFC 5034 section 4: an empty challenge is "+ " and the response comes on its own line.
            self._out += b"+ " + CRLF
            self._sasl_pending = True

    def _auth_response(self, line: bytes) -> None:
        bearer = self._bearer
        if bearer is None:
            self._auth_plain_response(line)
            return
        if line == b"*" and not bearer.rejected:
            raise _CommandError("authentication cancelled", code="AUTH")
        try:
            result = bearer.step(line)
        except _oauth.SASLSyntaxError:
            raise _CommandError("invalid base64 in SASL response", bad=True) from None
        if isinstance(result, bytes):  # RFC 7628 3.2.2: the error status, then the failure
            self._out += b"+ " + result + CRLF
            self._sasl_pending = True
        elif result is None:
            raise self._auth_failure()
        else:
            self._login(result, None)

    def _auth_plain_response(self, line: bytes) -> None:
        if line == b"*":
            raise _CommandError("authentication cancelled", code="AUTH")
        if line == b"=":  # RFC 5034 section 4: "=" is an empty initial response
            line = b""
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise _CommandError("invalid base64 in SASL response", bad=True) from None
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            raise self._auth_failure()
        authzid, authcid, password = (p.decode("utf-8", "surrogateescape") for p in parts)
        if authzid and authzid.lower() != authcid.lower():
            # RFC 4616 section 2: we never let one user act as another.
            raise self._auth_failure()
        self._login(authcid, password)

    def _auth_failure(self) -> _CommandError:
        """The one reply for every failed login, and the event that makes the adapter wait."""
        self._auth_events.append(AuthenticationFailed())
        return _CommandError(_AUTH_FAILED, code="AUTH", bad=True)

    def _login(self, address: str, password: str | None) -> None:
        """Log ``address`` in; a password of None means a token already proved who it is."""
        verified = password is None or self._store.check_password(address, password)
        if not address or not verified:
            # One reply for unknown users and wrong passwords: nothing tells them apart.
            raise self._auth_failure()
        if not self._store.lock_maildrop(address):
            raise _CommandError("mailbox is locked by another POP3 session", code="IN-USE")
        self._auth_events.append(AuthenticationSucceeded())
        self._address = address
        self._locked = True
        snapshot_taken = False
        try:
            box = self._store.mailbox(address, "INBOX")
            entries: list[_Entry] = []
            for uid in box.uids():
                msg = box.get(uid)
                if msg is None:
                    continue
                head, rest = msg.parts()
                source: bytes | POP3Message
                if head.endswith(b"\n"):  # whole fields: the sizes add up (_wire_size)
                    size, source = _wire_size(head) + _wire_size(rest), msg
                else:
                    source = head + rest if head else rest
                    size = _wire_size(source)
                entries.append(_Entry(uid, f"{box.uidvalidity}.{uid}", size, source))
            snapshot_taken = True
        finally:
            if not snapshot_taken:
                self._release()
                self._address = None
        self._messages = entries
        self._deleted = set()
        self.state = POP3State.TRANSACTION
        self._write(f"+OK maildrop has {len(entries)} messages ({self._octets()} octets)")

    # TRANSACTION

    def _octets(self) -> int:
        return sum(e.size for n, e in enumerate(self._messages, 1) if n not in self._deleted)

    def _number(self, text: str) -> int:
        """Parse a message-number argument and check that it names a live message."""
        if not _NUMBER.fullmatch(text):
            raise _CommandError("invalid message number", bad=True)
        number = int(text)
        if not 1 <= number <= len(self._messages):
            raise _CommandError("no such message")
        if number in self._deleted:
            raise _CommandError(f"message {number} already deleted")
        return number

    def _entry(self, arg: str) -> tuple[int, _Entry]:
        args = _split_args(arg)
        if len(args) != 1:
            raise _CommandError("expected one message number", bad=True)
        number = self._number(args[0])
        return number, self._messages[number - 1]

    def _live(self) -> list[tuple[int, _Entry]]:
        return [(n, e) for n, e in enumerate(self._messages, 1) if n not in self._deleted]

    def _cmd_STAT(self, arg: str) -> None:
        if arg:
            raise _CommandError("STAT takes no arguments", bad=True)
        self._write(f"+OK {len(self._live())} {self._octets()}")

    def _cmd_LIST(self, arg: str) -> None:
        if arg:
            number, entry = self._entry(arg)
            self._write(f"+OK {number} {entry.size}")
            return
        live = self._live()
        body = "".join(f"{n} {e.size}\r\n" for n, e in live).encode()
        self._write_multiline(f"{len(live)} messages ({self._octets()} octets)", body)

    def _cmd_UIDL(self, arg: str) -> None:
        if arg:
            number, entry = self._entry(arg)
            self._write(f"+OK {number} {entry.unique_id}")
            return
        body = "".join(f"{n} {e.unique_id}\r\n" for n, e in self._live()).encode()
        self._write_multiline("unique-id listing follows", body)

    def _cmd_TOP(self, arg: str) -> None:
        args = _split_args(arg)
        if len(args) != 2:
            raise _CommandError("TOP needs a message number and a line count", bad=True)
        number = self._number(args[0])
        if not _NUMBER.fullmatch(args[1]):
            raise _CommandError("invalid line count", bad=True)
        entry = self._messages[number - 1]
        self._write_multiline("top of message follows", dot_stuff(_top(entry.raw, int(args[1]))))

    def _cmd_RETR(self, arg: str) -> None:
        _, entry = self._entry(arg)
        self._write_multiline(f"{entry.size} octets", dot_stuff(entry.raw))

    def _cmd_DELE(self, arg: str) -> None:
        number, _ = self._entry(arg)
        self._deleted.add(number)
        self._write(f"+OK message {number} deleted")

    def _cmd_RSET(self, arg: str) -> None:
        self._deleted.clear()
        self._write(f"+OK maildrop has {len(self._messages)} messages ({self._octets()} octets)")

    def _cmd_NOOP(self, arg: str) -> None:
        self._write("+OK")

    def _cmd_QUIT(self, arg: str) -> None:
        if self.state is POP3State.AUTHORIZATION:
            self._write(f"+OK {self.hostname} roundtrip POP3 server signing off")
            self._close()
            return
        self.state = POP3State.UPDATE
        address = self._address
        assert address is not None
        uids = [self._messages[n - 1].uid for n in sorted(self._deleted)]
        try:
            if uids:
                self._store.expunge(address, "INBOX", uids)
        except RoundtripError:
            self._close()
            raise _CommandError("some deleted messages not removed", code="SYS/TEMP") from None
        left = len(self._messages) - len(self._deleted)
        self._close()
        self._write(f"+OK {self.hostname} roundtrip POP3 server signing off ({left} messages left)")


#: RFC 1939 section 3: arguments are separated by a single SPACE. ``str.split()`` would also
#: split on the ASCII separators 0x1c-0x1f (and ``strip()`` remove them), making ``LIST \x1c``
#: a scan listing; they are ordinary (invalid) argument characters here.
_SP = b" "


def _split_args(arg: str) -> list[str]:
    """The arguments of a command line, split on SPACE only."""
    return [part for part in arg.split(" ") if part]
