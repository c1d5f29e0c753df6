"""The aiosmtpd session class behind every SMTP listener: corrections, limits, TLS facts.

aiosmtpd parses the protocol; ``SMTPSession`` subclasses its ``SMTP`` to correct two behaviours:

- on an implicit-TLS listener aiosmtpd never learns that the link is encrypted, so it neither
  advertises nor accepts AUTH (aiosmtpd issues #274, #281). ``connection_made`` marks the TLS
  layer as active when the transport already carries an SSL object (465). The TLS facts come
  from the public ``transport.get_extra_info()`` (``ssl_object``, ``peercert``, ``cipher``),
  which asyncio's and uvloop's transports share;
- aiosmtpd's STARTTLS runs asyncio's pure-Python TLS layer even on uvloop; ours asks the loop
  (``loop.start_tls``), so a session on uvloop gets uvloop's native TLS, and drops plaintext
  pipelined after STARTTLS before the handshake (RFC 3207 4.2);
- aiosmtpd does not advertise PIPELINING or ENHANCEDSTATUSCODES, and many of its replies lack
  enhanced codes; ``SMTPSession.push`` adds them (RFC 2034) once the client used EHLO.

Abuse limits (``config.SMTPLimits``; docs/security.md), which aiosmtpd lacks or gets wrong,
are enforced here:

- command and text line lengths: aiosmtpd's own checks, sized per session (its
  ``command_size_limits`` is a class-wide dict that every EHLO grows);
- an error budget per session (Postfix ``smtpd_hard_error_limit``) in place of aiosmtpd's
  "5 unknown commands" rule, and a command budget (aiosmtpd ``command_call_limit``);
- total and per-IP connection caps, answered with a 421 banner;
- deadlines instead of aiosmtpd's timer (restarted by every valid command, so a trickling
  client could hold a session forever): each command line must arrive within ``idle_timeout``
  of our last reply, and DATA must keep up a minimum rate; trickling extends neither;
- AUTH: the bearer-token mechanisms XOAUTH2 and OAUTHBEARER (RFC 7628, ``protocols._oauth``:
  a refused token gets the JSON error status in a 334, and 535 after the client's reply);
  a growing delay per client IP before AUTH is answered (Dovecot's auth penalty, applied
  before the credentials are checked, so timing tells nothing), a cap per connection, 503 for
  AUTH during a transaction, and 500 5.5.6 for an over-long SASL line;
- a client that talks before the banner (pregreet) gets 554 5.5.0 and is dropped. Postfix's
  postscreen drops such clients too; the wait before the banner (``greet_pause``) is off by
  default so test stacks answer at once.

Once a session is being closed for a limit, no further command runs and no message is handed
to the router, even if more input was already buffered.

aiosmtpd's private hooks
------------------------
aiosmtpd has no public API for most of this, so ``SMTPSession`` overrides or reads some of its
private names. Each is marked ``# aiosmtpd private:`` where it is used, the supported aiosmtpd
versions are pinned in pyproject.toml, and tests/servers/test_aiosmtpd_contract.py fails,
naming the hook, when one of them changes upstream:

- overridden: ``_handle_client`` (pregreet, connection caps before the banner),
  ``_call_handler_hook`` (no handler runs once the session is closing), ``_getaddr`` (fast path,
  no crash on malformed paths), ``smtp_STARTTLS`` (see above), which then sets what aiosmtpd's
  own STARTTLS and ``connection_made`` would: ``_original_transport``, ``_tls_protocol``,
  ``_tls_handshake_okay`` (from the ``STARTTLS`` hook in ``_handle_hooks``), a new session
  (``_set_rset_state``, ``_create_session``, ``_reset_timeout``) and the streams' transport;
- read or written: ``_smtp_methods`` (unknown verbs under our error budget), ``_reader`` and
  ``_writer`` (the session's streams), ``_tls_protocol`` (set on implicit TLS, see above);
- asyncio's ``StreamReader._buffer``: whether the client's next command is already buffered
  (pipelining, deadlines); there is no public way to peek at a StreamReader.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import functools
import hashlib
import io
import logging
import re
import weakref
from base64 import b64decode, b64encode
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    TLSSetupException,
    syntax,
)

from ..config import SMTPLimits
from ..protocols import _oauth
from ..protocols.smtp import (
    AuthPenalties,
    ConnectionCounts,
    Reply,
    check_helo_name,
    counts_as_error,
    enhanced_status,
    extend_data_deadline,
    plain_identity_permitted,
)
from . import _recording

if TYPE_CHECKING:
    from .smtp import SMTPHandler

__all__ = ["SMTPSession", "abort_sessions", "call_limits", "methods_named", "tls_facts"]

log = logging.getLogger("roundtrip.servers.smtp")

# After closing for a limit, how long the peer gets to read our last reply before the
# connection is aborted (a client that never reads must not pin the socket).
_CLOSE_GRACE = 2.0

#: aiosmtpd's own idle timeout: a year, so that only our deadlines ever close a session.
_AIOSMTPD_TIMER = 365 * 24 * 3600.0


#: What ``SMTPSession._tls_protocol`` holds on an implicit-TLS link, and after our STARTTLS
#: (aiosmtpd only tests it for truth once its own connection_made has not read it).
_TLS_UP: Any = object()


#: The TLS facts an asyncio transport offers through ``get_extra_info`` (the public API that
#: asyncio's and uvloop's TLS transports both implement).
_TLS_EXTRA = ("ssl_object", "peercert", "cipher", "compression", "sslcontext")


def tls_facts(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The TLS facts of ``transport`` as aiosmtpd's ``Session.ssl`` holds them; None: no TLS."""
    if transport.get_extra_info("ssl_object") is None:
        return None
    return {name: transport.get_extra_info(name) for name in _TLS_EXTRA}


#: ``<local@domain>`` with a dot-atom local part (RFC 5322 3.2.3) and an LDH domain, then
#: nothing or whitespace and parameters that do not start a comment.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    r"(?:[ \t]+(?=[^ \t(])|(?=[^ \t(])|\Z)(.*)\Z",
    re.DOTALL,
)

_METHOD_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def methods_named(cls: type, prefixes: tuple[str, ...]) -> list[str]:
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
    ``SMTPSession._unknown_command`` puts them under our error budget instead. Once the session is
    closing, every verb maps to a method that does nothing.
    """

    def __init__(self, server: SMTPSession, methods: dict[str, Any]) -> None:
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


class _SessionEnded(BaseException):
    """Ends the session task after QUIT: aiosmtpd's command loop catches Exception only."""


#: Sessions whose connection is open, for abort_sessions().
_LIVE: weakref.WeakSet[SMTPSession] = weakref.WeakSet()


def others_open(session: object, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether another SMTP session than ``session`` has its connection open on ``loop``:
    work that would stall the loop then had better run elsewhere (``Router.prepare``)."""
    return any(other is not session and other.loop is loop for other in list(_LIVE))


def abort_sessions(loop: asyncio.AbstractEventLoop) -> None:
    """Abort the connection of every session still open on ``loop`` (a stack stopping).

    A client that connects and leaves before its session ends keeps a half-closed transport
    that aiosmtpd closes only when its handler returns; cancelled at shutdown, the handler
    leaves it open on uvloop, which then warns about it when the loop closes. A TLS
    transport that is closing (the session ended with QUIT) still holds its socket while it
    waits for the client's close_notify, which a client that closes its socket without one
    (smtplib) never sends: it is aborted too, or the loop stops with the socket open
    (asyncio warns, uvloop cannot close the loop; tests/test_stack_stop_clean.py).
    """
    for session in list(_LIVE):
        transport = session.transport
        if session.loop is not loop or transport is None:
            continue
        # uvloop's transports are not asyncio.Transport subclasses: ask for abort() itself.
        # Each transport is closed once only (smtp_QUIT below), so asyncio's TLS transport
        # still has its protocol here and its abort() reaches the socket.
        abort = getattr(transport, "abort", None)
        if abort is None:
            continue
        try:
            abort()
        except (AttributeError, RuntimeError):
            pass  # a transport that a cancelled session closed twice (see MailStack.stop)


class SMTPSession(SMTP):
    """aiosmtpd's SMTP with the corrections and limits described in the module docstring."""

    _implicit_tls = False
    _auth_offered = True
    _in_ehlo = False
    _command = ""
    #: The listener's service name, for transcripts (``submissions``, ``smtp``, ...).
    _service = ""
    #: This connection's transcript when the stack records (``_recording``); message content
    #: is recorded as its size and digest, not as the bytes (``_rec_content``).
    _rec: _recording.Session | None = None
    _rec_content = False
    _data_size = 0

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ looks up the auth_* and smtp_* methods with dir() and
        # inspect.getmembers() on every connection, before the TLS handshake can start:
        # about 0.2 ms per connection over the full attribute list. Those are all it needs.
        return methods_named(type(self), ("auth_", "smtp_"))

    def __init__(
        self,
        handler: SMTPHandler,
        *,
        limits: SMTPLimits,
        connections: ConnectionCounts,
        auth_penalties: AuthPenalties,
        idle_timeout: float,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd sizes its StreamReader from this inside __init__: one text line (RFC 5321
        # 4.5.3.1.6, CRLF included) plus the transparency dot.
        self.line_length_limit = limits.max_text_line + 1
        super().__init__(
            handler,
            command_call_limit=call_limits(limits),
            # aiosmtpd's idle timer restarts on every valid command; the deadlines below
            # (_arm) take its place, so it is set never to fire first.
            timeout=_AIOSMTPD_TIMER,
            # smtp_DATA below keeps the bytes; the handler decodes what it needs.
            decode_data=False,
            **kwargs,
        )
        self._idle_timeout = idle_timeout
        # aiosmtpd compares the line without its CRLF; RFC 5321 4.5.3.1.4 counts it.
        base = limits.max_command_line - 2
        self.command_size_limit = base
        self.command_size_limits = collections.defaultdict(lambda: base)
        # aiosmtpd private: its verb -> method table, built in __init__ and read by
        # _handle_client for each command line; no public hook sees unknown verbs.
        self._smtp_methods = _Commands(self, self._smtp_methods)
        self._limits = limits
        self._connections = connections
        self._auth_penalties = auth_penalties
        self._peer_ip = ""
        self._admitted = False
        self._rejection: str | None = None
        self._closing = False
        self._close_handle: asyncio.TimerHandle | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
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
        if first:
            _LIVE.add(self)
        if first and self._implicit_tls:
            self._mark_implicit_tls(transport)
        recordings = _recording.current() if first else None
        if recordings is not None:
            self._rec = recordings.open(
                self._service,
                "smtp",
                _recording.address(transport.get_extra_info("peername")),
                _recording.address(transport.get_extra_info("sockname")),
            )
        rec = self._rec
        if rec is not None:
            tls = _recording.tls_note(transport)
            if tls is not None:  # implicit TLS, or the STARTTLS handshake just completed
                rec.note(tls)
        if first:
            self._arm(self._idle_timeout)  # the banner's push re-arms it
            peer = transport.get_extra_info("peername")
            self._peer_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            self._rejection = self._connections.admit(self._peer_ip)
            self._admitted = self._rejection is None

    def _mark_implicit_tls(self, transport: asyncio.BaseTransport) -> None:
        """Tell aiosmtpd that this implicit-TLS link is encrypted (aiosmtpd #274, #281)."""
        facts = tls_facts(transport)
        if facts is None or self.session is None:
            return
        # aiosmtpd's only notion of "TLS is up" is this attribute being set, which its own
        # STARTTLS does; it gates AUTH in EHLO and in AUTH itself. The public alternative,
        # auth_require_tls=False, raises a UserWarning together with auth_required.
        self._tls_protocol = _TLS_UP  # aiosmtpd private: see the comment above
        self.session.ssl = facts

    def _tls_active(self) -> bool:
        """Whether the link is encrypted now (implicit TLS, or after STARTTLS)."""
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def eof_received(self) -> bool | None:
        # The client is gone: its slot is free now, not a few loop turns later when the
        # closing transport reports connection_lost. On uvloop a client that closes and at
        # once reconnects is otherwise accepted before its old connection is released.
        self._release_slot()
        result: bool | None = super().eof_received()
        return result

    def connection_lost(self, error: Exception | None) -> None:
        _LIVE.discard(self)
        if self._rec is not None:
            self._rec.note("connection closed")
        self._release_slot()
        if self._close_handle is not None:
            self._close_handle.cancel()
            self._close_handle = None
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        super().connection_lost(error)

    def _release_slot(self) -> None:
        if self._admitted:
            self._admitted = False
            self._connections.release(self._peer_ip)

    def data_received(self, data: bytes) -> None:
        if self._rec is not None and not self._rec_content:
            self._rec.client(data)
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
        # aiosmtpd private: the session task, which writes the banner; the only place to
        # refuse a connection or catch a pregreet before the banner goes out.
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
        try:
            await super()._handle_client()
        except _SessionEnded:
            pass

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
            if self._rec is not None:
                self._rec.server(bytes(self._held))
            transport.write(bytes(self._held))  # type: ignore[attr-defined]
            self._held.clear()
        transport.close()
        self._close_handle = self.loop.call_later(_CLOSE_GRACE, transport.abort)  # type: ignore[attr-defined]

    # deadlines (docs/security.md A8.1)

    def _arm(self, seconds: float) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        self._deadline = self.loop.time() + seconds
        self._deadline_handle = self.loop.call_at(self._deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        if self.loop.time() < self._deadline:  # DATA bought more time meanwhile
            self._deadline_handle = self.loop.call_at(self._deadline, self._deadline_passed)
            return
        if self._in_data or self._bytes_since_reply or self._buffered():
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
            self._rec_content = self._rec is not None
            self._in_data = True
            self._bytes_since_reply = 0
            self._arm(self._limits.data_timeout)
        elif final:
            self._in_data = False
            self._bytes_since_reply = 0
            self._last_code = code
            self._arm(self._idle_timeout)
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
        if code == "250" and self._command in _HOLDABLE and b"\n" in self._buffered():
            return
        data = bytes(held)
        held.clear()
        if self._rec is not None:
            self._rec.server(data)
        # aiosmtpd private: _writer and _reader are the session's streams (aiosmtpd's push
        # writes with them too); StreamReaderProtocol offers no public accessor.
        self._writer.write(data)
        await self._writer.drain()

    def _buffered(self) -> bytes | bytearray:
        """Input the client sent that no command has read yet."""
        # asyncio private: StreamReader has no public way to look at its buffer without
        # consuming it (asyncio's and uvloop's loops both use asyncio's StreamReader).
        return getattr(self._reader, "_buffer", b"")

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        # aiosmtpd private: every handle_* hook goes through it (MAIL, RCPT, DATA ...), so
        # one check here keeps a closing session from handing anything to the handler.
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
        # aiosmtpd private: smtp_MAIL, smtp_RCPT, smtp_VRFY and smtp_EXPN parse paths with it.
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

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        """Say 221 and close the connection once.

        aiosmtpd's QUIT closes the transport and cancels the session task, whose cancellation
        handler closes it a second time. asyncio's TLS transport, closed twice while it waits
        for the client's close_notify (smtplib closes its socket without one), forgets its
        protocol: its abort() then does nothing, and a stack stopping leaves the socket open
        (tests/test_stack_stop_clean.py). Here the connection is closed once, and the task
        ends as aiosmtpd's does, through an exception its command loop lets pass.
        """
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        await self.push("221 Bye" if status is MISSING else status)
        self._close_with(None)
        raise _SessionEnded

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
        if self._rec is not None:
            self._record_content(self._rec, content)
        if isinstance(content, str):  # over a limit: the reply, once the final dot came
            await self.push(content)
            self.envelope = Envelope()  # what aiosmtpd's _set_post_data_state does
            return
        envelope.content = envelope.original_content = content
        # The envelope holds the only reference now (the handler drops it once the message
        # is built), so the DATA bytes are not kept alive by this frame while routing.
        del content
        # MISSING when the handler has no handle_DATA.
        status = await self._call_handler_hook("DATA")
        self.envelope = Envelope()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | str:
        """The message up to the final dot, dot-unstuffed; or the reply for a passed limit.

        Lines are read with ``readuntil(b"\\r\\n")`` as aiosmtpd does, so a bare LF or CR is
        content, and a line longer than the reader's limit arrives in pieces (read as they
        come and discarded; a ``.`` piece of it does not end the data).

        The lines gather in a ``BytesIO``: its ``getvalue()`` hands over its own buffer as the
        ``bytes`` when nothing else holds it, where ``bytes(bytearray)`` would copy the whole
        message, so a big message never exists twice here (tests/test_memory.py).
        """
        reader = self._reader
        limit = self.data_size_limit
        buf = io.BytesIO()
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
                buf = io.BytesIO()
                line = await reader.read(exc.consumed)
            if not in_long_line and line == b".\r\n":
                break
            size += len(line)
            if refusal is None and limit and size > limit:
                refusal = "552 Error: Too much mail data"
                buf = io.BytesIO()
            if not line.endswith(b"\r\n"):
                in_long_line = True
                continue
            if refusal is None and not in_long_line:
                if len(line) > self.line_length_limit:
                    refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
                    buf = io.BytesIO()
                elif line[:1] == b".":
                    buf.write(memoryview(line)[1:])  # transparency (RFC 5321 4.5.2)
                else:
                    buf.write(line)
            in_long_line = False
        self._data_size = size
        if refusal is not None:
            return refusal
        return buf.getvalue()

    def _record_content(self, rec: _recording.Session, content: bytes | str) -> None:
        """The message as its size and sha256 (dot-stuffing removed), then whatever the client
        sent after the final dot (pipelined; still in the reader's buffer)."""
        self._rec_content = False
        if isinstance(content, str):
            rec.content(self._data_size, None, f"not kept: {content}")
        else:
            rec.content(len(content), hashlib.sha256(content).hexdigest())
        after = self._buffered()
        if after:
            rec.client(bytes(after))

    async def _unknown_command(self, command: str, arg: str | None) -> None:
        log.info("%s: unrecognised command", self._peer_ip)
        await self.push(Reply.UNKNOWN_COMMAND)

    async def _ignore_command(self, arg: str | None) -> None:
        return None

    # commands

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS through ``loop.start_tls``: the loop's own TLS, uvloop's on uvloop.

        aiosmtpd's STARTTLS builds asyncio's pure-Python ``SSLProtocol`` itself, so every
        session of the MX ran its TLS records through it even on uvloop, whose TLS is native.
        The session after the handshake is what aiosmtpd's ``connection_made`` makes of it
        (RFC 3207 4.2: a new session, the TLS facts in ``session.ssl``, the STARTTLS hook),
        with one difference of timing: the plaintext a client pipelined after STARTTLS is
        dropped before the handshake, not after it. The loop resumes this coroutine a turn
        after the handshake, and by then the client's first command inside TLS may be in the
        buffer already (its EHLO, which aiosmtpd's order would have thrown away).
        """
        if arg or not self.tls_context:
            await super().smtp_STARTTLS(arg)  # its 501 and 454 replies
            return
        await self.push("220 Ready to start TLS")
        plain = self.transport
        assert plain is not None
        # Anything buffered now came in plaintext after STARTTLS (docs/security.md A3.1);
        # start_tls pauses reading before this coroutine yields, so nothing more can.
        self._reader._buffer.clear()  # type: ignore[attr-defined]  # asyncio private: _buffered()
        # On asyncio's loop the client's first command inside TLS can reach data_received
        # before this coroutine resumes: its recording waits for the TLS note below.
        if self._rec is not None:
            self._rec.hold_client()
        try:
            tls = await self.loop.start_tls(
                cast(asyncio.WriteTransport, plain), self, self.tls_context, server_side=True
            )
        except asyncio.CancelledError:
            self._record_held()
            raise
        except Exception as error:  # aiosmtpd's command loop closes the session on it
            self._record_held()
            raise TLSSetupException() from error
        if tls is None:  # the transport closed during the handshake
            self._record_held()
            raise TLSSetupException()
        # aiosmtpd private: the state its STARTTLS and connection_made leave behind.
        # _original_transport (the TCP one) is closed explicitly in connection_lost;
        # _tls_protocol is tested for truth (TLS is up: AUTH allowed, no second STARTTLS).
        self._original_transport = plain
        self._tls_protocol = _TLS_UP
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self.session.peer = tls.get_extra_info("peername")
        self.session.ssl = tls_facts(tls)
        self._reset_timeout()
        self._reader._transport = tls  # type: ignore[attr-defined]
        self._writer._transport = tls  # type: ignore[attr-defined]
        self.transport = tls
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)
        if self._rec is not None:
            self._rec.note(_recording.tls_note(tls) or "TLS")
        self._record_held()

    def _record_held(self) -> None:
        """Record what arrived during the STARTTLS handshake, now that its outcome is noted."""
        if self._rec is not None:
            self._rec.release_client()

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
        if not self._auth_offered and self._tls_active():
            # The MX takes no AUTH at all; before TLS aiosmtpd's own 538 answers.
            await self.push("502 5.5.1 AUTH not available on this port")
            return
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        if envelope.mail_from is not None and session.extended_smtp:
            await self.push(Reply.AUTH_IN_TRANSACTION)  # RFC 4954 section 4
            return
        attempt = bool(arg) and self._tls_active() and not session.authenticated
        if attempt:
            delay = self._auth_penalties.delay(self._peer_ip, self.loop.time())
            if delay > 0:
                # Before the credentials are checked: right and wrong ones wait alike.
                await asyncio.sleep(delay)
        self._last_code = ""
        await super().smtp_AUTH(arg)
        if self._rec is not None and attempt and session.authenticated:
            self._rec.note(f"authenticated as {_auth_user(session)}")
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

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult:
        """XOAUTH2: a bearer token the stack issued (``protocols._oauth``)."""
        return await self._auth_bearer("XOAUTH2", args)

    async def auth_OAUTHBEARER(self, _: Any, args: list[str]) -> AuthResult:
        """OAUTHBEARER (RFC 7628): a bearer token the stack issued (``protocols._oauth``)."""
        return await self._auth_bearer("OAUTHBEARER", args)

    async def _auth_bearer(self, mechanism: str, args: list[str]) -> AuthResult:
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
        credentials = _oauth.parse_response(mechanism, response)
        if credentials is None:
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8
        result = self._authenticate(mechanism, credentials)
        if not result.success:
            # RFC 7628 section 3.2.2: the error status, then whatever the client answers
            # (a dummy "AQ==", an empty line or "*"), then the failure, 535 5.7.8.
            await self.push(b"334 " + b64encode(_oauth.error_status()))
            await self._read_line()
        return result

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


def _auth_user(session: Any) -> str:
    data = session.auth_data
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


def call_limits(limits: SMTPLimits) -> dict[str, int] | None:
    """aiosmtpd's ``command_call_limit`` from ours (0 means unlimited)."""
    budgets = {verb: count for verb, count in limits.command_limits if count > 0}
    if not budgets:
        return None
    budgets.setdefault("*", 2**31)  # aiosmtpd would otherwise allow 20 of every other verb
    return budgets
