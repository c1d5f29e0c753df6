"""One SMTP session of the relay with one MX address: connect, STARTTLS, the transaction.

The connection starts in plaintext and is upgraded with ``starttls(server_hostname=<MX
name>)``: we dial the IP our DNS gave us but verify the certificate against the MX *name*
(asyncio's ``server_hostname`` drives both SNI and the hostname check). Dialling the name
instead would go through ``getaddrinfo`` and the system resolver, which knows nothing of the
stack's zones. How much TLS the policy requires, and what a failure means, is
``protocols/delivery.py`` (:func:`~roundtrip.protocols.delivery.tls_failure`); the relay
passes that decision in as ``on_tls_failure``.

The message content is written by :meth:`Dialer.send_content`, not by aiosmtplib's
``data()``: that one dot-stuffs into a copy and hands the whole message to the transport at
once, so a 40 MB message cost several copies plus its ciphertext. Ours sends ``DATA`` with
aiosmtplib, then writes the stored bytes dot-stuffed (RFC 5321 §4.5.2) in slices produced
lazily by :func:`~roundtrip.protocols.delivery.dot_stuffed_slices`, each written only when the
transport has not asked us to pause, and reads the final reply with aiosmtplib's response
reader.

Every exception from aiosmtplib, ``ssl`` and the socket leaves as ``StepError``
(``servers/_relayerrors.py``): one that carries no reply code means the host failed as a whole
and the relay tries the next address.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import aiosmtplib

from ..protocols._pipelining import first_write, path, rset_due
from ..protocols.delivery import (
    DATA_SLICE,
    FALLBACK_WORDS,
    Outcome,
    Permanent,
    Temporary,
    data_reply_outcome,
    dot_stuffed_slices,
    handshake_fallback,
    needs_smtputf8,
    no_smtputf8,
    out_of_step,
    rcpt_outcome,
    reply_outcome,
)
from ..protocols.tlspolicy import ResultType
from . import _recording
from ._mxcache import Connection, Failure, discard, unread
from ._relayerrors import StepError, translated

__all__ = ["Dialer", "Started"]

#: ``(result, detail, fallback)``: record a TLS failure; raises ``StepError`` under enforce.
OnTLSFailure = Callable[[ResultType, str, str], None]

_WITHOUT_TLS = "delivering without TLS"


@dataclass(eq=False)
class Started:
    """A transaction under way: the reply to MAIL FROM, and how many replies are still owed.

    ``owed`` counts the replies to the ``RCPT TO`` and ``DATA`` written with ``MAIL FROM``
    when the MX offers PIPELINING (RFC 2920); without it, 0. ``smtputf8``: MAIL FROM carried
    the SMTPUTF8 parameter, so the paths are UTF-8 (RFC 6531). ``refused``: nothing was sent,
    because the envelope needs SMTPUTF8 and the MX does not offer it (RFC 6531 §3.7.5).
    """

    mail: aiosmtplib.SMTPResponse
    owed: int
    smtputf8: bool = False
    refused: Permanent | None = None


class Dialer:
    """Opens MX connections and runs transactions over them (on the relay's loop).

    Args:
        tls_context: client context trusting the stack CA (verifies certificates and names).
        timeout: seconds per SMTP step (aiosmtplib ``timeout``), and per wait for the
            transport to drain while the content is written.
    """

    def __init__(self, *, tls_context: ssl.SSLContext, timeout: float) -> None:
        self._tls_context = tls_context
        self._timeout = timeout
        self._unverified_context: ssl.SSLContext | None = None

    def _unverified(self) -> ssl.SSLContext:
        """Encryption without authentication, for opportunistic TLS (RFC 7435 §3)."""
        if self._unverified_context is None:
            # Not create_default_context(): loading the system trust store costs ~70 ms and
            # nothing is verified here anyway.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._unverified_context = context
        return self._unverified_context

    def _client(self, helo: str, ip: str, port: int) -> aiosmtplib.SMTP:
        kind = _MXClient if _recording.current() is None else _RecordingSMTP
        return kind(
            hostname=ip,
            port=port,
            local_hostname=helo,
            start_tls=False,  # upgraded in open(), so the certificate is checked against the MX
            validate_certs=True,
            tls_context=self._tls_context,
            timeout=self._timeout,
        )

    async def open(
        self,
        *,
        helo: str,
        host: str,
        ip: str,
        port: int,
        verify: bool,
        on_tls_failure: OnTLSFailure,
    ) -> tuple[aiosmtplib.SMTP, str, tuple[Failure, ...]]:
        """Connect, EHLO and STARTTLS; ``verify`` is False under policy mode ``none``.

        A TLS failure goes to ``on_tls_failure``, which raises under ``enforce``; otherwise
        the delivery goes on without TLS (not offered, or refused), or, after a failed
        handshake, over a new connection as :func:`handshake_fallback` says: with unverified
        TLS (a failed verification under ``testing``) or in plaintext (any other handshake
        failure). Without ``verify`` TLS is not verified at all (RFC 7435). aiosmtplib drops
        bytes the server sent after its ``220`` to STARTTLS (docs/security.md A3.8).

        Returns:
            The client, ready for MAIL FROM; "" for verified TLS, else a note for events
            (" without TLS", " over unverified TLS"); and the TLS failures recorded.

        Raises:
            StepError: this host cannot take the message now.
        """
        failures: list[Failure] = []

        def fail(result: ResultType, detail: str, fallback: str) -> None:
            failures.append((result, detail, fallback))
            on_tls_failure(result, detail, fallback)

        client = self._client(helo, ip, port)
        ready = False
        try:
            with translated():
                await client.connect()
                await client.ehlo()
            if not client.supports_extension("starttls"):
                fail(ResultType.STARTTLS_NOT_SUPPORTED, "STARTTLS not offered", _WITHOUT_TLS)
                ready = True
                return client, " without TLS", tuple(failures)
            context = self._tls_context if verify else self._unverified()
            try:
                with translated():
                    await client.starttls(server_hostname=host, tls_context=context)
            except StepError as exc:
                if exc.code is not None:
                    # Still in plaintext and in step: a refusal is as good as no offer.
                    detail = f"STARTTLS refused: {exc.code} {exc.reply}"
                    fail(ResultType.STARTTLS_NOT_SUPPORTED, detail, _WITHOUT_TLS)
                    ready = True
                    return client, " without TLS", tuple(failures)
                # The handshake failed (or the MX hung up on STARTTLS): whether and how the
                # delivery goes on is handshake_fallback's rule. Under enforce, fail() raises.
                # Which mode it is otherwise follows from verify (only none skips it).
                certificate = isinstance(exc.__cause__, ssl.SSLCertVerificationError)
                step = handshake_fallback(
                    "testing" if verify else "none", certificate_failed=certificate
                )
                result = exc.tls or ResultType.VALIDATION_FAILURE
                fail(result, str(exc), FALLBACK_WORDS[step])
                # Nothing is left to talk over after a failed handshake: a new connection.
                discard(client)
                client = self._client(helo, ip, port)
                if step == "unverified-tls":
                    security = await self._open_unverified(client, host, fail)
                else:
                    security = await self._open_plaintext(client)
                ready = True
                return client, security, tuple(failures)
            with translated():
                await client.ehlo()
            ready = True
            return client, "" if verify else " over unverified TLS", tuple(failures)
        finally:
            if not ready:  # failed or cancelled: nothing to say QUIT over
                discard(client)

    async def _open_unverified(self, client: aiosmtplib.SMTP, host: str, fail: OnTLSFailure) -> str:
        """Connect ``client`` again with unverified TLS (or none if no longer offered).

        Should that handshake fail too, ``fail`` records it and the delivery goes on over a
        third connection, in plaintext (:func:`handshake_fallback` for a handshake failure).
        """
        with translated():
            await client.connect()
            await client.ehlo()
            if not client.supports_extension("starttls"):
                return " without TLS"
        try:
            with translated():
                await client.starttls(server_hostname=host, tls_context=self._unverified())
        except StepError as exc:
            if exc.code is not None:
                raise
            result = exc.tls or ResultType.VALIDATION_FAILURE
            fail(result, str(exc), FALLBACK_WORDS["plaintext"])
            discard(client)
            return await self._open_plaintext(client)
        with translated():
            await client.ehlo()
        return " over unverified TLS"

    async def _open_plaintext(self, client: aiosmtplib.SMTP) -> str:
        """Connect ``client`` again and stay in plaintext: its last handshake failed."""
        with translated():
            await client.connect()
            await client.ehlo()
        return " without TLS"

    async def start(self, conn: Connection, *, mail_from: str, rcpts: list[str]) -> Started:
        """Send MAIL FROM and read its reply; with PIPELINING, send RCPT and DATA with it.

        An MX that lists PIPELINING in its EHLO reply (RFC 2920) gets ``MAIL FROM``, every
        ``RCPT TO`` and ``DATA`` in one write, as Postfix sends them: one round trip instead of
        two plus one per recipient. The replies still owed are read by :meth:`transaction`.
        Without PIPELINING only ``MAIL FROM`` goes out. A refusal is returned, not raised.

        Raises:
            StepError: no (well-formed) reply; a pipelined connection is then closed.
        """
        client = conn.client
        pipelining = client.supports_extension("pipelining")
        utf8 = needs_smtputf8(mail_from, rcpts)
        if utf8 and not client.supports_extension("smtputf8"):
            # RFC 6531 §3.7.5: no downgrade; nothing is sent and the session stays in step.
            refused = no_smtputf8(conn.endpoint[0])
            return Started(aiosmtplib.SMTPResponse(0, ""), 0, refused=refused)
        commands = first_write(mail_from, rcpts, pipelining=pipelining, smtputf8=utf8)
        if not pipelining:
            try:
                with translated():
                    mail = await client.execute_command(*commands)
            except StepError as exc:
                if exc.code is None:
                    raise
                # A malformed reply: as a refusal (reply_outcome makes it temporary).
                return Started(aiosmtplib.SMTPResponse(exc.code, exc.reply), 0)
            if unread(client):
                # More than one reply to MAIL FROM: which one is ours is unknowable.
                discard(client)
                raise StepError(
                    f"reply out of step: more than one reply to MAIL FROM ({mail.code})"
                )
            return Started(mail, 0, smtputf8=utf8)
        started = Started(aiosmtplib.SMTPResponse(0, ""), len(commands), smtputf8=utf8)
        try:
            with translated():
                protocol = client.protocol
                if protocol is None:
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                protocol.write(b"".join(command + b"\r\n" for command in commands))
        except StepError:
            discard(client)
            raise
        started.mail = await self._owed(client, started)
        return started

    async def _owed(self, client: aiosmtplib.SMTP, started: Started) -> aiosmtplib.SMTPResponse:
        """The next reply to a pipelined group (RFC 2920 §3.1: one per command, in order).

        aiosmtplib's protocol parses one reply per arrival of data and leaves the rest in its
        buffer, where the next ``read_response`` would not look before more data came: so a
        reply already buffered is taken from there (``_read_response_from_buffer``, aiosmtplib
        private), any other is awaited with ``read_response``. Nothing is lost in between:
        no other await runs while replies are owed, and aiosmtplib keeps what arrives while a
        read is pending.

        Raises:
            StepError: no reply, or a malformed one: the group is out of step, so the
                connection is closed and the error carries no reply code.
        """
        started.owed -= 1
        try:
            with translated():
                protocol = client.protocol
                if protocol is None:
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                reply = protocol._read_response_from_buffer() if protocol._buffer else None
                if reply is None:
                    return await protocol.read_response(timeout=self._timeout)
        except StepError as exc:
            discard(client)
            raise StepError(f"pipelined reply: {exc}") from exc
        rec = client.recording if isinstance(client, _RecordingSMTP) else None
        if rec is not None:  # read_response (wrapped) records what it returns; this it did not
            rec.server(_reply_bytes(reply))
        return reply

    async def _settle_owed(self, client: aiosmtplib.SMTP, started: Started) -> bool:
        """Read the replies still owed after a refusal; whether the session is still in step.

        A 354 to a pipelined ``DATA`` after the recipients were all refused leaves the MX
        waiting for content we will not send: the connection is closed instead (RFC 2920 §3.1
        expects a 503 or 554 there).
        """
        try:
            reply = None
            while started.owed > 0:
                reply = await self._owed(client, started)
        except StepError:
            return False
        if (reply is not None and reply.code == 354) or unread(client):
            discard(client)
            return False
        return True

    async def transaction(
        self,
        conn: Connection,
        *,
        mail_from: str,
        raw: bytes,
        host: str,
        rcpts: list[str],
        started: Started | None = None,
    ) -> tuple[dict[str, Outcome], bool]:
        """MAIL (unless :meth:`start` sent it already, on reuse), RCPT, DATA over ``conn``.

        Returns:
            The outcome of each recipient, and whether the session ended in step, so that
            the connection may carry another message after RSET.

        Raises:
            StepError: the host failed as a whole (no reply, or a 4xx to MAIL FROM).
        """
        client = conn.client
        conn.messages += 1
        if started is None:
            started = await self.start(conn, mail_from=mail_from, rcpts=rcpts)
        if started.refused is not None:
            return dict.fromkeys(rcpts, started.refused), True
        mail = started.mail
        if mail.code != 250:
            conn.errors += 1
            outcome = reply_outcome(mail.code, mail.message, host)
            in_step = await self._settle_owed(client, started)
            if isinstance(outcome, Temporary):
                raise StepError(f"MAIL FROM: {mail.code} {mail.message}")
            return dict.fromkeys(rcpts, outcome), in_step
        if started.owed:
            return await self._pipelined(conn, started, raw=raw, host=host, rcpts=rcpts)
        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                with translated():
                    reply = await client.execute_command(
                        b"RCPT TO:" + path(rcpt, smtputf8=started.smtputf8)
                    )
            except StepError as exc:
                if exc.code is None:
                    raise
                reply = aiosmtplib.SMTPResponse(exc.code, exc.reply)
            if unread(client):
                return self._out_of_step(
                    conn, host, rcpts, f"more than one reply to RCPT TO ({reply.code})"
                )
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                conn.errors += 1
                outcomes[rcpt] = rcpt_outcome(reply.code, reply.message, host)
        if not accepted:
            return outcomes, True
        try:
            with translated():
                reply = await client.execute_command(b"DATA")
        except StepError as exc:
            if exc.code is None:
                raise
            # A malformed or over-long reply: out of step.
            outcomes.update(dict.fromkeys(accepted, reply_outcome(exc.code, exc.reply, host)))
            return outcomes, False
        if unread(client):
            return self._out_of_step(
                conn, host, rcpts, f"more than one reply to DATA ({reply.code})"
            )
        return await self._content(
            conn, reply, raw=raw, host=host, outcomes=outcomes, accepted=accepted
        )

    async def _pipelined(
        self, conn: Connection, started: Started, *, raw: bytes, host: str, rcpts: list[str]
    ) -> tuple[dict[str, Outcome], bool]:
        """The rest of a pipelined transaction: the RCPT replies, DATA's, then the content."""
        client = conn.client
        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        for rcpt in rcpts:
            reply = await self._owed(client, started)
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                conn.errors += 1
                outcomes[rcpt] = rcpt_outcome(reply.code, reply.message, host)
        reply = await self._owed(client, started)
        if unread(client):
            # More replies than commands: RFC 2920 §3.1 pairs them one to one, so which ones
            # are ours is unknowable, and no content goes out.
            return self._out_of_step(conn, host, rcpts, "more replies than commands")
        if not accepted:
            if reply.code < 400:  # 354 awaits content we will not send; a 2xx is out of step
                discard(client)
                return outcomes, False
            return outcomes, True
        if reply.code != 354:
            return await self._content(
                conn, reply, raw=raw, host=host, outcomes=outcomes, accepted=accepted
            )
        outcomes, in_step = await self._content(
            conn, reply, raw=raw, host=host, outcomes=outcomes, accepted=accepted
        )
        conn.clean = not rset_due(pipelining=True, dot_answered=in_step)
        return outcomes, in_step

    async def _content(
        self,
        conn: Connection,
        reply: aiosmtplib.SMTPResponse,
        *,
        raw: bytes,
        host: str,
        outcomes: dict[str, Outcome],
        accepted: list[str],
    ) -> tuple[dict[str, Outcome], bool]:
        """After DATA's ``reply``: the content if it was 354, and the outcome of ``accepted``.

        Only the reply to the final dot can deliver. A 4xx or 5xx to ``DATA`` settles as any
        refusal; any other reply to it (a 250, say) is out of step (``data_reply_outcome``):
        no content went out, so the recipients are deferred and the connection is dropped,
        never asked for QUIT (the MX may be waiting for content).
        """
        refused = data_reply_outcome(reply.code, reply.message, host)
        if refused is not None:
            conn.errors += 1
            outcomes.update(dict.fromkeys(accepted, refused))
            if reply.code < 400:
                discard(conn.client)
                return outcomes, False
            return outcomes, True
        try:
            with translated():
                reply = await self.send_content(conn.client, raw)
        except StepError as exc:
            if exc.code is None:
                raise
            # A malformed or over-long reply: out of step.
            outcomes.update(dict.fromkeys(accepted, reply_outcome(exc.code, exc.reply, host)))
            return outcomes, False
        if unread(conn.client):
            # The first reply after the dot is the dot's (send_content armed the reader before
            # the MX could answer), so it stands; what follows it was never asked for, and
            # would answer the next command (RFC 5321 §4.1.1): the connection is dropped.
            discard(conn.client)
            in_step = False
        else:
            in_step = True
        if reply.code != 250:  # to the final dot
            conn.errors += 1
            outcome = reply_outcome(reply.code, reply.message, host)
            outcomes.update(dict.fromkeys(accepted, outcome))
            return outcomes, in_step
        outcomes.update(dict.fromkeys(accepted))
        return outcomes, in_step

    @staticmethod
    def _out_of_step(
        conn: Connection, host: str, rcpts: list[str], detail: str
    ) -> tuple[dict[str, Outcome], bool]:
        """Replies no longer pair with the commands sent: drop the connection, defer all.

        Every recipient of the transaction is deferred, refusals included: a reply paired
        with the wrong command says nothing about the recipient it seemed to answer.
        """
        conn.errors += 1
        discard(conn.client)
        return dict.fromkeys(rcpts, out_of_step(host, detail)), False

    async def send_content(self, client: aiosmtplib.SMTP, raw: bytes) -> aiosmtplib.SMTPResponse:
        """After ``354``: write the content under flow control and read the final reply.

        Uses aiosmtplib's protocol: its transport, the flow-control wait that its
        ``FlowControlMixin`` offers for ``StreamWriter.drain()`` (``_drain_helper``), and
        ``read_response``. Each wait for the transport to drain, and the final reply, may take
        ``timeout`` seconds (the timeout of every other step).

        Raises:
            StepError: the connection broke or timed out (the client is then closed, because
                the session is mid-message and cannot be reused), or the reply was malformed
                (``code`` set; the session is still framed).
        """
        protocol = client.protocol
        timeout = self._timeout
        in_step = False
        rec = client.recording if isinstance(client, _RecordingSMTP) else None
        if rec is not None:
            # The content goes to the transport below, past the recorded write: its size and
            # sha256 (before dot-stuffing, as the MX's transcript shows it) stand for it.
            rec.content(len(raw), hashlib.sha256(raw).hexdigest())
            _recording.note_message(rec, raw, "content sent")
        try:
            with translated():
                if protocol is None:
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                for piece in _coalesced(dot_stuffed_slices(raw)):
                    await self._drained(protocol, timeout)
                    transport = protocol.transport
                    if transport is None or transport.is_closing():
                        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                    cast(asyncio.WriteTransport, transport).write(piece)
                # No await between the last write and this call: read_response arms the
                # reader before any reply can be received. Replies sent before the final dot
                # (RFC 5321 forbids them) are discarded by aiosmtplib as unsolicited, never
                # mis-paired.
                reply = await protocol.read_response(timeout=timeout)
            in_step = True
            return reply
        except StepError as exc:
            in_step = exc.code is not None
            raise
        finally:
            if not in_step:
                # QUIT now would be read as message content. Dropped, not closed: a graceful
                # TLS close waits for the MX's close_notify, which an MX still reading (or a
                # relay cancelled because the stack stops) may never get to.
                discard(client)

    @staticmethod
    async def _drained(protocol: aiosmtplib.protocol.SMTPProtocol, timeout: float) -> None:
        """Return once the transport has not asked us to pause (at once, usually)."""
        # aiosmtplib private: FlowControlMixin's flags, which _drain_helper reads first. Not
        # paused is the usual case, and it must not cost a round of the loop: wait_for would
        # run _drain_helper as a task of its own (Python 3.11).
        if not protocol._paused and not protocol._connection_lost:
            return
        try:
            await asyncio.wait_for(protocol._drain_helper(), timeout)
        except TimeoutError as exc:
            raise aiosmtplib.SMTPTimeoutError(
                f"Timed out writing the message (no progress for {timeout:g} s)"
            ) from exc


def _coalesced(slices: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """``slices`` with neighbours joined while together they fit in one slice.

    A message smaller than a slice, its CRLF and the final ``.\\r\\n`` then go out in one
    write (one TLS record, one system call) instead of two or three; a bigger one costs one
    copy of its last slice at most.
    """
    held: bytes | memoryview | None = None
    for piece in slices:
        if held is None:
            held = piece
        elif len(held) + len(piece) <= DATA_SLICE:
            held = b"".join((held, piece))
        else:
            yield held
            held = piece
    if held is not None:
        yield held


class _MXClient(aiosmtplib.SMTP):
    """aiosmtplib's client, keeping its TCP transport for :func:`~._mxcache.discard`.

    aiosmtplib closes its connection itself, gracefully, after QUIT and when a command
    fails or times out, and forgets the transport: over TLS that close waits for the
    server's close_notify. Should the relay then drop the connection (the stack stops),
    ``wire`` is what it aborts, so nothing outlives the event loop.
    """

    wire: asyncio.BaseTransport | None = None

    async def connect(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        response = await super().connect(*args, **kwargs)
        self.wire = self.transport  # plaintext TCP: STARTTLS comes later, in Dialer.open
        return response


class _RecordingSMTP(_MXClient):
    """aiosmtplib's client with a transcript per connection (the stack records).

    Each ``connect()`` opens a session in the stack's recordings. The protocol's ``write``
    and ``read_response`` are then wrapped on the instance (aiosmtplib calls both by
    attribute, on every loop), so every command is recorded as the bytes written and every
    reply as the lines the server sent, STARTTLS and all; the greeting, read inside
    ``connect()``, is recorded from the reply it returns. Replies are recorded as parsed,
    not as received: uvloop hands data to the protocol through a method it looked up once,
    so wrapping ``data_received`` would miss them. The message content bypasses ``write``
    (:meth:`Dialer.send_content`), which records its size and digest instead.
    """

    recording: _recording.Session | None = None

    async def connect(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        recordings = _recording.current()
        self.recording = None
        response = await super().connect(*args, **kwargs)
        protocol = self.protocol
        if recordings is None or protocol is None or protocol.transport is None:
            return response
        transport = protocol.transport
        rec = self.recording = recordings.open(
            "relay",
            "smtp",
            _recording.address(transport.get_extra_info("peername")),
            _recording.address(transport.get_extra_info("sockname")),
        )
        rec.server(_reply_bytes(response))
        write, read_response = protocol.write, protocol.read_response

        def recorded_write(data: bytes) -> None:
            rec.client(data)
            write(data)

        async def recorded_read_response(timeout: float | None = None) -> aiosmtplib.SMTPResponse:
            reply = await read_response(timeout=timeout)
            rec.server(_reply_bytes(reply))
            return reply

        setattr(protocol, "write", recorded_write)  # noqa: B010
        setattr(protocol, "read_response", recorded_read_response)  # noqa: B010
        return response

    async def starttls(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        rec = self.recording
        name = kwargs.get("server_hostname")
        if rec is not None and name:
            rec.note(f"STARTTLS to {name}")
        try:
            response = await super().starttls(*args, **kwargs)
        except BaseException as exc:
            if rec is not None:
                rec.note(f"TLS handshake failed: {exc!r}")
            raise
        protocol = self.protocol
        if rec is not None and protocol is not None:
            rec.note(_recording.tls_note(protocol.transport) or "TLS")
        return response

    def close(self) -> None:
        if self.recording is not None and self.protocol is not None:
            self.recording.note("connection closed")
            self.recording = None
        super().close()


def _reply_bytes(response: aiosmtplib.SMTPResponse) -> bytes:
    """A reply as the server wrote it (``220-...`` lines, then ``220 ...``)."""
    lines = response.message.split("\n") or [""]
    text = "".join(
        f"{response.code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n"
        for i, line in enumerate(lines)
    )
    return text.encode("utf-8", "replace")
