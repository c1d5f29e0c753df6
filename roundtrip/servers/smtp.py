"""aiosmtpd listeners for the three SMTP roles, on the stack's own event loop.

aiosmtpd parses the protocol; the handler's hooks are shims around ``protocols/smtp.py``. Two
aiosmtpd behaviours are corrected here (NOTES.md):

- on an implicit-TLS listener aiosmtpd never learns that the link is encrypted, so it neither
  advertises nor accepts AUTH (aiosmtpd issues #274, #281). ``_SMTP.connection_made`` marks the
  TLS layer as active when the transport already carries an SSL object (465 only; the STARTTLS
  path is aiosmtpd's own);
- aiosmtpd does not advertise PIPELINING or ENHANCEDSTATUSCODES, and many of its replies lack
  enhanced codes; ``_SMTP.push`` adds them (RFC 2034) once the client used EHLO.

Abuse limits (``config.SMTPLimits``; SECURITY.md A1, A2.3, A4.3, A4.4, A8), which aiosmtpd lacks
or gets wrong, are enforced in ``_SMTP``:

- command and text line lengths: aiosmtpd's own checks, sized per session (its
  ``command_size_limits`` is a class-wide dict that every EHLO grows);
- an error budget per session (Postfix ``smtpd_hard_error_limit``) in place of aiosmtpd's
  "5 unknown commands" rule, and a command budget (aiosmtpd ``command_call_limit``);
- total and per-IP connection caps, answered with a 421 banner;
- deadlines instead of aiosmtpd's timer (restarted by every valid command, so a trickling
  client could hold a session forever): each command line must arrive within ``idle_timeout``
  of our last reply, and DATA must keep up a minimum rate; trickling extends neither;
- AUTH: a growing delay per client IP before AUTH is answered (Dovecot's auth penalty, applied
  before the credentials are checked, so timing tells nothing), a cap per connection, 503 for
  AUTH during a transaction, and 500 5.5.6 for an over-long SASL line;
- a client that talks before the banner (pregreet) gets 554 5.5.0 and is dropped. Postfix's
  postscreen drops such clients too; the wait before the banner (``greet_pause``) is off by
  default so test stacks answer at once.

Once a session is being closed for a limit, no further command runs and no message is handed
to the router, even if more input was already buffered.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import functools
import itertools
import logging
import os
import re
import ssl
import time
from base64 import b64decode, b64encode
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from ..config import SMTPLimits
from ..errors import MailboxError, StorageError
from ..protocols.smtp import (
    AuthPenalties,
    ConnectionCounts,
    Reply,
    Role,
    TLSInfo,
    add_missing_headers,
    check_address_encoding,
    check_bare_cr_in_header,
    check_from_header,
    check_header_size,
    check_helo_name,
    check_hops,
    check_recipient,
    check_sender,
    counts_as_error,
    enhanced_status,
    extend_data_deadline,
    plain_identity_permitted,
    received_header,
    with_protocol,
)

__all__ = [
    "Accepted",
    "AuthPenalties",
    "ContentRejectedError",
    "Router",
    "SMTPHandler",
    "start_smtp",
]

log = logging.getLogger("roundtrip.servers.smtp")
# aiosmtpd logs "Session.login_data is deprecated" on every AUTH, and every command at INFO.
logging.getLogger("mail.log").setLevel(logging.ERROR)

_queue_ids = itertools.count(1)


def _new_queue_id() -> str:
    return f"{os.getpid():x}{next(_queue_ids):08X}"


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message accepted by one SMTP listener, handed to the router.

    ``raw`` already carries this hop's Received line (and, on submission, a Message-ID and
    Date if they were missing).
    """

    role: Role
    server_domain: str
    hostname: str
    queue_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    authenticated_user: str | None
    tls: bool
    received_at: float
    received_monotonic: float
    #: The client's EHLO/HELO name, as given.
    helo: str = ""


#: Delivers or queues an accepted message; raising StorageError makes the reply a 451.
Router = Callable[[Accepted], None]


class ContentRejectedError(Exception):
    """Raised by a router whose content filter refuses the message; ``reply`` is sent."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


# After closing for a limit, how long the peer gets to read our last reply before the
# connection is aborted (a client that never reads must not pin the socket).
_CLOSE_GRACE = 2.0


#: ``<local@domain>`` with a dot-atom local part (RFC 5322 3.2.3) and an LDH domain, then
#: nothing or whitespace and parameters that do not start a comment.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    r"(?:[ \t]+(?=[^ \t(])|(?=[^ \t(])|\Z)(.*)\Z",
    re.DOTALL,
)

_METHOD_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _methods_named(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of ``cls`` (inherited ones included) that start with ``prefixes``."""
    names = _METHOD_NAMES.get((cls, prefixes))
    if names is None:
        names = _METHOD_NAMES[cls, prefixes] = [n for n in dir(cls) if n.startswith(prefixes)]
    return names


#: Commands whose 250 may wait for the reply to a pipelined next command (RFC 2920).
_HOLDABLE = frozenset({"MAIL", "RCPT", "RSET", "NOOP"})


class _Commands(dict[str, Any]):
    """aiosmtpd's verb -> method table, with a method for every unknown verb.

    aiosmtpd closes after 5 unknown commands with a 502 of its own; routing unknown verbs to
    ``_SMTP._unknown_command`` puts them under our error budget instead. Once the session is
    closing, every verb maps to a method that does nothing.
    """

    def __init__(self, server: _SMTP, methods: dict[str, Any]) -> None:
        super().__init__(methods)
        self._server = server

    def get(self, key: str, default: Any = None) -> Any:
        self._server._command = key
        if self._server._closing:
            return self._server._ignore_command
        method = super().get(key)
        if method is None:
            return functools.partial(self._server._unknown_command, key)
        return method


class _SMTP(SMTP):
    """aiosmtpd's SMTP with the corrections and limits described in the module docstring."""

    _implicit_tls = False
    _auth_offered = True
    _in_ehlo = False
    _command = ""

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ looks up the auth_* and smtp_* methods with dir() and
        # inspect.getmembers() on every connection, before the TLS handshake can start:
        # about 0.2 ms per connection over the full attribute list. Those are all it needs.
        return _methods_named(type(self), ("auth_", "smtp_"))

    def __init__(
        self,
        handler: SMTPHandler,
        *,
        limits: SMTPLimits,
        connections: ConnectionCounts,
        auth_penalties: AuthPenalties,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd sizes its StreamReader from this inside __init__: one text line (RFC 5321
        # 4.5.3.1.6, CRLF included) plus the transparency dot.
        self.line_length_limit = limits.max_text_line + 1
        super().__init__(handler, command_call_limit=_call_limits(limits), **kwargs)
        # aiosmtpd compares the line without its CRLF; RFC 5321 4.5.3.1.4 counts it.
        base = limits.max_command_line - 2
        self.command_size_limit = base
        self.command_size_limits = collections.defaultdict(lambda: base)
        self._smtp_methods = _Commands(self, self._smtp_methods)
        self._limits = limits
        self._connections = connections
        self._auth_penalties = auth_penalties
        self._peer_ip = ""
        self._admitted = False
        self._rejection: str | None = None
        self._closing = False
        self._close_handle: asyncio.TimerHandle | None = None
        self._greeted = False
        self._pregreet = False
        self._errors = 0
        self._auth_failures = 0
        self._last_code = ""
        self._in_data = False
        self._deadline = 0.0
        self._bytes_since_reply = 0
        self._held = bytearray()

    # connection life cycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if self._implicit_tls and self._original_transport is None:
            ssl_protocol = getattr(transport, "_ssl_protocol", None)
            has_tls = transport.get_extra_info("ssl_object") is not None
            if ssl_protocol is not None and has_tls and self.session is not None:
                self._tls_protocol = ssl_protocol
                self.session.ssl = ssl_protocol._extra
        if first:
            peer = transport.get_extra_info("peername")
            self._peer_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            self._rejection = self._connections.admit(self._peer_ip)
            self._admitted = self._rejection is None

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._connections.release(self._peer_ip)
        if self._close_handle is not None:
            self._close_handle.cancel()
            self._close_handle = None
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if not self._greeted:
            self._pregreet = True
        if self._closing:
            return  # whatever follows a limit is never parsed
        self._bytes_since_reply += len(data)
        if self._in_data:
            limits = self._limits
            self._deadline = extend_data_deadline(
                self._deadline,
                now=self.loop.time(),
                received=len(data),
                min_rate=limits.min_data_rate,
                timeout=limits.data_timeout,
            )
        super().data_received(data)

    async def _handle_client(self) -> None:
        if self._rejection is not None:
            log.info("refused %s: %s", self._peer_ip, self._rejection)
            self._close_with(self._rejection)
            return
        if self._limits.greet_pause > 0:
            await asyncio.sleep(self._limits.greet_pause)
        if self._pregreet:
            log.info("%s talked before the banner", self._peer_ip)
            self._close_with(Reply.PREGREET)
            return
        # aiosmtpd writes the banner before its first await: nothing can arrive in between.
        self._greeted = True
        await super()._handle_client()

    def _close_with(self, reply: str | None) -> None:
        """Send ``reply`` (if any) as the last words, close, and abort if the peer stalls."""
        if self._closing:
            return
        self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is not None:
            self._held += reply.encode("ascii") + b"\r\n"
        if self._held:
            transport.write(bytes(self._held))  # type: ignore[attr-defined]
            self._held.clear()
        transport.close()
        self._close_handle = self.loop.call_later(_CLOSE_GRACE, transport.abort)  # type: ignore[attr-defined]

    # deadlines (SECURITY.md A8.1)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd restarts its timer on every valid command; ours are deadlines, armed when a
        # reply goes out (_arm). Only the first call, from connection_made, arms one.
        if self._timeout_handle is None:
            self._arm(self._timeout_duration)

    def _arm(self, seconds: float) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._deadline = self.loop.time() + seconds
        self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        if self.loop.time() < self._deadline:  # DATA bought more time meanwhile
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_passed)
            return
        buffered = len(getattr(self._reader, "_buffer", b""))
        if self._in_data or self._bytes_since_reply or buffered:
            log.info("%s: deadline passed mid-command", self._peer_ip)
            self._close_with(Reply.TIMEOUT)
        else:
            # An idle client is simply dropped, as aiosmtpd does.
            log.info("%s: idle timeout", self._peer_ip)
            self._close_with(None)

    # replies

    async def push(self, status: Any) -> None:
        if self._closing:
            return
        session = self.session
        if isinstance(status, str) and not self._in_ehlo and session and session.extended_smtp:
            status = enhanced_status(status)
        text = status if isinstance(status, str) else bytes(status).decode("ascii", "replace")
        code = text[:3]
        final = len(text) == 3 or text[3:4] == " "
        if code == "354":
            self._in_data = True
            self._bytes_since_reply = 0
            self._arm(self._limits.data_timeout)
        elif final:
            self._in_data = False
            self._bytes_since_reply = 0
            self._last_code = code
            self._arm(self._timeout_duration)
        if isinstance(status, str):
            # A reply may echo client text; never let an undecodable byte crash the session.
            status = status.encode("utf-8", "backslashreplace")
        await self._write_reply(status, final=final, code=code)
        if code == "421":  # aiosmtpd's command budget closes the connection itself
            self._closing = True
            return
        if final and counts_as_error(text):
            self._errors += 1
            if self._limits.max_errors and self._errors >= self._limits.max_errors:
                log.info("%s: too many errors", self._peer_ip)
                self._close_with(Reply.TOO_MANY_ERRORS)

    async def _write_reply(self, line: bytes, *, final: bool, code: str) -> None:
        """Write one reply line, in as few TLS records and sends as the dialogue allows.

        Each write is a TLS record and a system call (about 60 us on loopback), so the lines of
        a multi-line reply go out with its last line (EHLO: one write, not ten). A 250 to a
        MAIL, RCPT, RSET or NOOP waits while the client's next command is already buffered
        (RFC 2920 section 3.1: a pipelined MAIL, RCPT, DATA gets its three replies in one
        write, as Postfix does); the next reply, or the close, takes it along. Every other
        reply, the 250 for the final dot included (RFC 1047), is written at once.
        """
        held = self._held
        held += line
        held += b"\r\n"
        last = line.rpartition(b"\n")[2]  # a status may carry a whole multi-line reply
        if not (final or len(last) == 3 or last[3:4] == b" "):
            return
        if (
            code == "250"
            and self._command in _HOLDABLE
            and b"\n" in getattr(self._reader, "_buffer", b"")
        ):
            return
        data = bytes(held)
        held.clear()
        self._writer.write(data)
        await self._writer.drain()

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if self._closing:  # e.g. the final dot of a DATA buffered before a 421
            return Reply.TIMEOUT
        return await super()._call_handler_hook(command, *args)

    # addresses in MAIL and RCPT

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, with a fast path for a plain ``<dot-atom@domain>``.

        aiosmtpd hands every path to the ``email`` package's RFC 5322 parser, about 0.1 ms per
        address. A path that is a dot-atom local part and a domain of letters, digits and
        hyphens, followed by nothing or by whitespace and parameters, parses the same with one
        regular expression (tests/servers/test_smtp_server.py compares both on generated
        input); anything else (quotes, comments, address literals, ``<>``) takes aiosmtpd's way.
        Where that parser breaks (``MAIL FROM:<`` raises IndexError inside ``email``, ``<9@[``
        AttributeError; aiosmtpd would answer with a 500 naming the exception and log a
        traceback), the path is malformed: aiosmtpd's own 553 5.1.3 reply.
        """
        match = _PLAIN_PATH.match(arg)
        if match is None:
            try:
                return super()._getaddr(arg)
            except Exception:  # IndexError, AttributeError ...: untrusted input, a parser bug
                return None, None
        address, rest = match.group(1), match.group(2)
        limit = self.local_part_limit
        if limit and len(address.rpartition("@")[0]) > limit:
            return None, None
        return address, rest

    # DATA (RFC 5321 4.1.1.4, 4.5.2)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, gathering the message in one ``bytearray``.

        aiosmtpd keeps each line as its own ``bytearray`` and joins them at the end: two to
        three times the message plus an object per line. The replies, limits and hooks are
        aiosmtpd's: only ``<CRLF>.<CRLF>`` ends the data; a message over the size limit gets
        552 and a line over the line limit 500, each after the final dot, with the data
        dropped as soon as the limit is passed; a connection lost mid-DATA leaves nothing.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if isinstance(content, str):  # over a limit: the reply, once the final dot came
            await self.push(content)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if self._decode_data:
            try:
                text = content.decode(
                    *(("utf-8", "surrogateescape") if self.enable_SMTPUTF8 else ("ascii",))
                )
            except UnicodeDecodeError:
                await self.push("500 Error: strict ASCII mode")
                return
            envelope.content, envelope.original_content = text, content
        else:
            envelope.content = envelope.original_content = content
        # The envelope holds the only reference now (the handler drops it once the message
        # is built), so the DATA bytes are not kept alive by this frame while routing.
        del content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | str:
        """The message up to the final dot, dot-unstuffed; or the reply for a passed limit.

        Lines are read with ``readuntil(b"\\r\\n")`` as aiosmtpd does, so a bare LF or CR is
        content, and a line longer than the reader's limit arrives in pieces (read as they
        come and discarded; a ``.`` piece of it does not end the data).
        """
        reader = self._reader
        limit = self.data_size_limit
        buf = bytearray()
        size = 0
        refusal: str | None = None
        in_long_line = False
        while self.transport is not None:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                log.info("%s: connection lost during DATA", self._peer_ip)
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                if refusal is None:
                    refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
                buf = bytearray()
                line = await reader.read(exc.consumed)
            if not in_long_line and line == b".\r\n":
                break
            size += len(line)
            if refusal is None and limit and size > limit:
                refusal = "552 Error: Too much mail data"
                buf = bytearray()
            if not line.endswith(b"\r\n"):
                in_long_line = True
                continue
            if refusal is None and not in_long_line:
                if len(line) > self.line_length_limit:
                    refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
                    buf = bytearray()
                elif line[:1] == b".":
                    buf += memoryview(line)[1:]  # transparency (RFC 5321 4.5.2)
                else:
                    buf += line
            in_long_line = False
        if refusal is not None:
            return refusal
        return bytes(buf)

    async def _unknown_command(self, command: str, arg: str | None) -> None:
        log.info("%s: unrecognised command", self._peer_ip)
        await self.push(Reply.UNKNOWN_COMMAND)

    async def _ignore_command(self, arg: str | None) -> None:
        return None

    # commands

    async def smtp_HELO(self, hostname: str) -> None:
        refusal = check_helo_name(hostname, verb="HELO") if hostname else None
        if refusal is not None:
            await self.push(refusal)
            return
        await super().smtp_HELO(hostname)

    async def smtp_EHLO(self, hostname: str) -> None:
        # An empty name gets aiosmtpd's own syntax reply.
        refusal = check_helo_name(hostname) if hostname else None
        if refusal is not None:
            await self.push(refusal)
            return
        # aiosmtpd adds the SIZE and SMTPUTF8 allowances to MAIL on every EHLO.
        self.command_size_limits.clear()
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_AUTH(self, arg: str) -> None:
        if not self._auth_offered and self._tls_protocol:
            # The MX takes no AUTH at all; before TLS aiosmtpd's own 538 answers.
            await self.push("502 5.5.1 AUTH not available on this port")
            return
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        if envelope.mail_from is not None and session.extended_smtp:
            await self.push(Reply.AUTH_IN_TRANSACTION)  # RFC 4954 section 4
            return
        attempt = bool(arg) and self._tls_protocol is not None and not session.authenticated
        if attempt:
            delay = self._auth_penalties.delay(self._peer_ip, self.loop.time())
            if delay > 0:
                # Before the credentials are checked: right and wrong ones wait alike.
                await asyncio.sleep(delay)
        self._last_code = ""
        await super().smtp_AUTH(arg)
        if not attempt:
            return
        if session.authenticated:
            self._auth_penalties.succeeded(self._peer_ip)
        elif self._last_code == "535":
            self._auth_penalties.failed(self._peer_ip, self.loop.time())
            self._auth_failures += 1
            cap = self._limits.max_auth_failures
            if cap and self._auth_failures >= cap:
                log.info("%s: too many failed AUTH", self._peer_ip)
                self._close_with(Reply.TOO_MANY_AUTH_FAILURES)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd's PLAIN, which ignored the authorization identity: a foreign one fails
        with 535 (RFC 4616 section 2; our IMAP and POP3 AUTHENTICATE refuse it alike)."""
        if len(args) == 1:
            response = await self.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False)
        else:
            try:
                response = b64decode(args[1].encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        fields = response.split(b"\x00") if isinstance(response, bytes) else []
        if len(fields) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = fields
        if not plain_identity_permitted(authzid, login):
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8
        return self._authenticate("PLAIN", LoginPassword(login, password))

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """aiosmtpd's SASL exchange step, without logging client data (it logged undecodable
        responses verbatim) and with a bounded line (its readline raised on a long one)."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(raw) if encode_to_b64 else raw))
        line = await self._read_line()
        if line is None:
            await self.push(Reply.AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 section 4: the client cancels
            await self.push(Reply.AUTH_ABORTED)
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(Reply.AUTH_BAD_BASE64)
            return MISSING

    async def _read_line(self) -> bytes | None:
        """One line from the client, or None when it was longer than the reader's limit (the
        whole line is consumed either way; at most one limit's worth is held in memory)."""
        try:
            return await self._reader.readuntil()
        except asyncio.LimitOverrunError as exc:
            await self._reader.read(exc.consumed)
        while True:
            try:
                await self._reader.readuntil()
                return None
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)


def _call_limits(limits: SMTPLimits) -> dict[str, int] | None:
    """aiosmtpd's ``command_call_limit`` from ours (0 means unlimited)."""
    budgets = {verb: count for verb, count in limits.command_limits if count > 0}
    if not budgets:
        return None
    budgets.setdefault("*", 2**31)  # aiosmtpd would otherwise allow 20 of every other verb
    return budgets


class SMTPHandler:
    """aiosmtpd handler for one listener: role policy, trace header, hand-off to the router."""

    def __dir__(self) -> list[str]:
        # What aiosmtpd looks for in a handler, on every connection (see _SMTP.__dir__).
        return _methods_named(type(self), ("auth_", "handle_"))

    def __init__(
        self,
        *,
        role: Role,
        domain: str,
        hostname: str,
        local_domains: Callable[[], Collection[str]],
        has_user: Callable[[str], bool],
        check_password: Callable[[str, str], bool],
        router: Router,
        max_recipients: int,
        enforce_sender: bool,
        reject_foreign_from: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
        limits: SMTPLimits | None = None,
    ) -> None:
        self.role = role
        self.domain = domain
        self.hostname = hostname
        self._local_domains = local_domains
        self._has_user = has_user
        self._check_password = check_password
        self._router = router
        self._max_recipients = max_recipients
        self._enforce_sender = enforce_sender
        self._reject_foreign_from = reject_foreign_from
        self._on_error = on_error
        self.limits = limits if limits is not None else SMTPLimits()

    # aiosmtpd hooks (names fixed by aiosmtpd)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.role is Role.SMTP:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = check_address_encoding(address, smtputf8=envelope.smtp_utf8, sender=True)
        if refusal is not None:
            return refusal
        # On the MX nobody is authenticated: only the address syntax is checked.
        refusal = check_sender(
            address, authenticated_user=_auth_user(session), enforce=self._enforce_sender
        )
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return Reply.OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = check_address_encoding(address, smtputf8=envelope.smtp_utf8, sender=False)
        if refusal is not None:
            return refusal
        refusal = check_recipient(
            address,
            role=self.role,
            local_domains=self._local_domains(),
            has_user=self._has_user,
            current_count=len(envelope.rcpt_tos),
            max_recipients=self._max_recipients,
        )
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return Reply.RCPT_OK

    async def handle_VRFY(
        self, server: SMTP, session: Session, envelope: Envelope, address: str
    ) -> str:
        return Reply.VRFY

    async def handle_EXPN(
        self, server: SMTP, session: Session, envelope: Envelope, address: str
    ) -> str:
        return Reply.EXPN

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = _content(envelope)
        refusal = check_hops(content, max_hops=self.limits.max_hops) or check_header_size(
            content, limit=self.limits.max_header_size
        )
        if refusal is None and self.role is not Role.SMTP:
            refusal = check_bare_cr_in_header(content)
        if refusal is None and self._reject_foreign_from and self.role is not Role.SMTP:
            refusal = check_from_header(content, authenticated_user=_auth_user(session))
        del content
        if refusal is not None:
            return refusal
        accepted = self._accept(session, envelope)
        try:
            self._router(accepted)
        except ContentRejectedError as exc:
            return exc.reply
        except (StorageError, MailboxError, OSError) as exc:
            log.warning("storing %s failed: %s", accepted.queue_id, exc)
            return Reply.STORE_FAILED
        except Exception as exc:  # a bug of ours: temporary failure, reported to the test
            if self._on_error is None:
                raise
            self._on_error(exc)
            return Reply.STORE_FAILED
        return Reply.QUEUED.format(queue_id=accepted.queue_id)

    # helpers

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd authenticator: the same 535 for an unknown user and a wrong password."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if self.role is Role.SMTP or not self._check_password(user, password):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)

    def _accept(self, session: Session, envelope: Envelope) -> Accepted:
        now = time.time()
        queue_id = _new_queue_id()
        content = _content(envelope)
        # From here on only ``raw`` is needed: drop the envelope's references to the DATA
        # bytes so a big message is held once, not twice, while it is routed and stored.
        envelope.content = envelope.original_content = None
        user = _auth_user(session)
        tls = session.ssl is not None
        tls_info = _tls_info(session)
        if self.role is not Role.SMTP:
            content = add_missing_headers(
                content, domain=self.domain, queue_id=queue_id, timestamp=now
            )
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        rcpts = tuple(envelope.rcpt_tos)
        trace: bytes = received_header(
            helo=session.host_name or "",
            peer_ip=peer,
            by_host=self.hostname,
            protocol=with_protocol(
                esmtp=bool(session.extended_smtp), tls=tls, authenticated=user is not None
            ),
            queue_id=queue_id,
            recipient=rcpts[0] if len(rcpts) == 1 else None,
            timestamp=now,
            tls=tls_info,
        )
        raw = trace + content
        del content  # the only other copy: freed before the router stores ``raw``
        return Accepted(
            role=self.role,
            server_domain=self.domain,
            hostname=self.hostname,
            queue_id=queue_id,
            mail_from=envelope.mail_from or "",
            rcpt_tos=rcpts,
            raw=raw,
            authenticated_user=user,
            tls=tls,
            received_at=now,
            received_monotonic=time.monotonic(),
            helo=session.host_name or "",
        )


def _content(envelope: Envelope) -> bytes:
    content = envelope.original_content or envelope.content or b""
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogateescape")
    return content


def _auth_user(session: Session) -> str | None:
    if not session.authenticated:
        return None
    data = session.auth_data
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data) if data is not None else None


def _tls_info(session: Session) -> TLSInfo | None:
    extra = session.ssl
    if not extra:
        return None
    ssl_object = extra.get("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher() or ("unknown", "", 0)
    return TLSInfo(
        version=ssl_object.version() or "TLS", cipher=cipher[0], bits=int(cipher[2] or 0)
    )


async def start_smtp(
    handler: SMTPHandler,
    *,
    host: str,
    port: int,
    tls_context: ssl.SSLContext,
    max_message_size: int,
    idle_timeout: float,
    tls_handshake_timeout: float,
    auth_penalties: AuthPenalties | None = None,
) -> asyncio.Server:
    """Listen for one SMTP role on ``host:port`` (0 picks a free port).

    ``submissions`` wraps TLS from the first byte; ``submission`` and ``smtp`` offer STARTTLS
    (required before MAIL on ``submission``).

    Args:
        handler: the role's policy; its ``limits`` (``SMTPLimits``) apply to this listener.
        idle_timeout: deadline for each command line, counted from our previous reply.
        tls_handshake_timeout: limit for the implicit-TLS handshake.
        auth_penalties: failed-AUTH records per client IP; pass one object to several
            listeners to share them (by default each listener keeps its own).
    """
    loop = asyncio.get_running_loop()
    implicit = handler.role is Role.SUBMISSIONS
    limits = handler.limits
    connections = ConnectionCounts(
        max_total=limits.max_connections, max_per_ip=limits.max_connections_per_ip
    )
    if auth_penalties is None:
        auth_penalties = AuthPenalties(
            initial=limits.auth_penalty_initial,
            maximum=limits.auth_penalty_max,
            timeout=limits.auth_penalty_timeout,
        )

    def factory() -> _SMTP:
        server = _SMTP(
            handler,
            limits=limits,
            connections=connections,
            auth_penalties=auth_penalties,
            hostname=handler.hostname,
            ident="roundtrip ESMTP",
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit else tls_context,
            # Not aiosmtpd's require_starttls: it answers 530 to AUTH before STARTTLS, where
            # RFC 4954 wants 538. MAIL before STARTTLS still gets 530 (AUTH is required and
            # cannot happen before TLS).
            require_starttls=False,
            auth_required=handler.role is not Role.SMTP,
            auth_require_tls=True,
            authenticator=handler.authenticate,
            auth_exclude_mechanism=None,
            timeout=idle_timeout,
            loop=loop,
        )
        server._implicit_tls = implicit
        server._auth_offered = handler.role is not Role.SMTP
        return server

    return await loop.create_server(
        factory,
        host=host,
        port=port,
        ssl=tls_context if implicit else None,
        ssl_handshake_timeout=tls_handshake_timeout if implicit else None,
        reuse_address=True,
    )
