"""Session transcripts of the probe's connections: what was sent and received, line by line.

Theory of operation. ``dial`` wraps every socket the probe's clients use (smtplib, imaplib,
poplib) in a ``RecordingSocket``; the bytes it sends and receives go to a ``Recorder``,
which splits them into lines and keeps them, with the time since the connection started, in
a ``Transcript`` (``str()`` prints it in the style of swaks: ``<-`` the server, ``->`` us,
``==`` facts such as the peer and the TLS handshake). A STARTTLS upgrade goes through
``RecordingContext``, so the lines after the handshake are recorded as well.

The recorder knows just enough of each protocol to keep a transcript safe and small:

* Credentials never reach a line. SMTP ``AUTH`` (RFC 4954) and POP3 ``AUTH`` (RFC 5034)
  keep only the mechanism name; every client line until the server's final reply (not a
  ``334`` / ``+`` continuation) is ``****``. That covers PLAIN, LOGIN, CRAM-MD5, XOAUTH2 and
  OAUTHBEARER alike, initial response or not. IMAP ``LOGIN`` keeps the user name, IMAP
  ``AUTHENTICATE`` (RFC 3501 section 6.2.2) is handled as SMTP ``AUTH``, POP3 ``PASS`` and
  ``APOP`` keep only the command (RFC 1939 section 7).
* Message content is one line: SMTP ``DATA`` content after the ``354`` (RFC 5321 section
  4.1.1.4), a POP3 ``RETR``/``TOP`` answer (RFC 1939 section 7) and every IMAP literal
  (``{N}``, RFC 3501 section 4.3) become ``[N bytes, sha256 0123abcd...]``.
* Memory is bounded: the first and last ``MAX_LINES // 2`` lines of a connection are kept
  with a ``... K lines omitted`` marker between them, each line is cut at ``MAX_LINE_CHARS``
  characters, and a line without an end is cut at ``MAX_PENDING`` bytes.

The stack's servers keep their connections as raw bytes and read them back through this same
``Recorder`` (``roundtrip/stack/_transcripts.py``), so the probe and the stack redact alike.
What a server did not keep as bytes reaches the recorder summarised: SMTP message content as its
size and digest (``content``), a chunk past the server's budget as its size (``skipped``), and
events dropped between the head and the tail of a long session as a count (``gap``).
"""

from __future__ import annotations

import collections
import hashlib
import io
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import _limits

__all__ = [
    "MAX_LINES",
    "Line",
    "Recorder",
    "RecordingContext",
    "RecordingSocket",
    "Transcript",
]

#: Lines kept per connection (the first and the last half).
MAX_LINES = 200
#: Characters kept of one line.
MAX_LINE_CHARS = 300
#: Bytes buffered of a line whose end has not come yet.
MAX_PENDING = 8192
#: What replaces a credential.
REDACTED = "****"

#: Directions: what the server sent, what we sent, a fact about the connection.
RECEIVED = "<-"
SENT = "->"
NOTE = "=="

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r?\n$")


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a transcript: seconds since the connection started, direction, text."""

    t: float
    dir: str
    text: str

    def __str__(self) -> str:
        return f"{self.t * 1000:8.1f} ms {self.dir} {self.text}"


@dataclass
class Transcript:
    """The recorded session of one connection.

    ``protocol`` is ``smtp``, ``imap`` or ``pop3``; ``peer`` the address dialled; ``steps``
    the probe steps this connection served; ``failed`` marks the connection a probe failed
    on. ``str(transcript)`` is the readable form, ``as_dict()`` the JSON one.
    """

    protocol: str
    peer: str
    steps: list[str] = field(default_factory=list)
    failed: bool = False
    #: The stack's transcripts only: the listener (``submissions``, ``imap``, ``relay``,
    #: ``dns``), both ends, the wall-clock start, and the addresses (MAIL FROM, RCPT TO, the
    #: login) and Message-IDs seen, to filter by.
    service: str = ""
    local: str = ""
    started_at: float = 0.0
    addresses: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    #: Lines dropped between ``head`` and ``tail`` (``MAX_LINES``).
    omitted: int = 0
    head: list[Line] = field(default_factory=list)
    tail: collections.deque[Line] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_LINES - MAX_LINES // 2)
    )

    def add(self, line: Line) -> None:
        if len(self.head) < MAX_LINES // 2:
            self.head.append(line)
            return
        if len(self.tail) == self.tail.maxlen:
            self.omitted += 1
        self.tail.append(line)

    @property
    def lines(self) -> list[Line]:
        """Every kept line, with a marker line where lines were omitted."""
        if not self.omitted:
            return [*self.head, *self.tail]
        t = self.tail[0].t if self.tail else 0.0
        marker = Line(t, NOTE, f"... {self.omitted} lines omitted")
        return [*self.head, marker, *self.tail]

    def __str__(self) -> str:
        title = f"{self.protocol} {self.peer}"
        if self.service:
            title = self._stack_title()
        if self.steps:
            title += f" ({', '.join(self.steps)})"
        return "\n".join([title, *(str(line) for line in self.lines)])

    def _stack_title(self) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(self.started_at))
        millis = int(self.started_at * 1000) % 1000
        if self.service == "relay":  # we are the client: our end, then the MX
            ends = f"{self.local} -> {self.peer}"
        elif self.local:
            ends = f"{self.peer} -> {self.local}"
        else:
            ends = self.peer
        seen = ", ".join([*self.addresses, *self.message_ids])
        return f"{self.service} {ends} at {clock}.{millis:03d}" + (f" ({seen})" if seen else "")

    def as_dict(self) -> dict[str, Any]:
        if self.service:
            return {
                "service": self.service,
                "protocol": self.protocol,
                "peer": self.peer,
                "local": self.local,
                "started_at": self.started_at,
                "addresses": list(self.addresses),
                "message_ids": list(self.message_ids),
                "omitted": self.omitted,
                "lines": [
                    {"t": round(line.t, 6), "dir": line.dir, "text": line.text}
                    for line in self.lines
                ],
            }
        return {
            "protocol": self.protocol,
            "peer": self.peer,
            "steps": list(self.steps),
            "failed": self.failed,
            "omitted": self.omitted,
            "lines": [
                {"t": round(line.t, 6), "dir": line.dir, "text": line.text} for line in self.lines
            ],
        }


def _digest_text(size: int, digest: Any) -> str:
    if digest is None:  # some of the bytes were not recorded
        return f"[{size} bytes, sha256 not kept]"
    return f"[{size} bytes, sha256 {digest.hexdigest()[:16]}]"


def _text(line: bytes) -> str:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if len(text) > MAX_LINE_CHARS:
        text = f"{text[:MAX_LINE_CHARS]}... ({len(line)} bytes)"
    return text


class _Direction:
    """One direction's byte stream cut into lines, IMAP literals into a size and a digest."""

    def __init__(self, emit: Callable[[bytes], None], literal: Callable[[str], None]) -> None:
        self._emit = emit
        self._literal = literal
        self._pending = bytearray()
        #: Bytes of the current literal still to come, its size and its running digest.
        self._literal_left = 0
        self._literal_size = 0
        self._digest: Any = hashlib.sha256()

    def skip(self, size: int) -> int:
        """``size`` bytes went by unrecorded: count them into the current literal; return how
        many were outside it (then the line being read is lost too)."""
        inside = min(size, self._literal_left)
        if inside:
            self._digest = None
            self._literal_left -= inside
            if not self._literal_left:
                self._literal(_digest_text(self._literal_size, self._digest))
        if size > inside:
            self._pending = bytearray()
        return size - inside

    def reset(self) -> None:
        """Forget the line and the literal being read (events in between were lost)."""
        self._pending = bytearray()
        self._literal_left = 0

    def feed(self, data: bytes, *, literals: bool) -> None:
        pos = 0
        while pos < len(data):
            if self._literal_left:
                chunk = data[pos : pos + self._literal_left]
                if self._digest is not None:
                    self._digest.update(chunk)
                self._literal_left -= len(chunk)
                pos += len(chunk)
                if not self._literal_left:
                    self._literal(_digest_text(self._literal_size, self._digest))
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._pending += data[pos:]
                if len(self._pending) > MAX_PENDING:
                    line, self._pending = bytes(self._pending), bytearray()
                    self._emit(line)
                return
            self._pending += data[pos : end + 1]
            pos = end + 1
            line, self._pending = bytes(self._pending), bytearray()
            self._emit(line)
            found = _LITERAL.search(line) if literals else None
            if found:
                self._literal_size = self._literal_left = int(found.group(1))
                self._digest = hashlib.sha256()
                if not self._literal_left:
                    self._literal(_digest_text(0, self._digest))


class Recorder:
    """Turns the bytes of one connection into a redacted, bounded ``Transcript``.

    Args:
        protocol: ``smtp``, ``imap`` or ``pop3``: how to find credentials and content.
        peer: the address dialled, as ``host:port``.
        clock: seconds, monotonic; the transcript's times count from this recorder's start.
    """

    def __init__(
        self, protocol: str, peer: str, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.transcript = Transcript(protocol, peer)
        #: The latest line the server sent (as text, cut like a transcript line): the
        #: evidence when a step ends because the server would not stop.
        self.last_received = ""
        self._protocol = protocol
        self._clock = clock
        self._started = clock()
        self._sent = _Direction(self._on_sent, self._sent_literal)
        self._received = _Direction(self._on_received, self._received_literal)
        #: Client lines are credentials until the server's final reply to AUTH.
        self._in_auth = False
        #: SMTP: DATA sent, waiting for 354. POP3: RETR/TOP sent, waiting for +OK.
        self._content_asked = False
        #: Inside message content (ours for SMTP, the server's for POP3): size and digest.
        self._content: tuple[int, Any] | None = None

    # -- input ----------------------------------------------------------------------------

    def sent(self, data: bytes) -> None:
        self._sent.feed(bytes(data), literals=self._protocol == "imap")

    def received(self, data: bytes) -> None:
        self._received.feed(bytes(data), literals=self._protocol == "imap")

    def note(self, text: str) -> None:
        self._add(NOTE, text)

    def content(self, size: int, digest: str | None, why: str = "") -> None:
        """Message content the client sent, already summarised (the stack's SMTP servers keep
        its size and sha256, never the bytes): its line and the final dot."""
        self._content_asked = False
        self._content = None
        summary = f"sha256 {digest[:16]}" if digest else (why or "sha256 not kept")
        self._add(SENT, f"[{size} bytes, {summary}]")
        self._add(SENT, ".")

    def skipped(self, size: int, *, sent: bool) -> None:
        """``size`` bytes went one way unrecorded (past a server's recording budget)."""
        side = self._sent if sent else self._received
        outside = side.skip(size)
        ours = self._protocol == "smtp" if sent else self._protocol == "pop3"
        if outside and ours and self._content is not None:
            total, _ = self._content
            self._content = (total + outside, None)  # the digest can no longer be right
        elif outside:
            self._add(SENT if sent else RECEIVED, f"[{outside} bytes not kept]")

    def gap(self, events: int) -> None:
        """``events`` went by unrecorded: what was being read is lost; credentials stay
        redacted (an AUTH exchange still open is assumed to go on)."""
        self._sent.reset()
        self._received.reset()
        self._content = None
        self._content_asked = False
        self._add(NOTE, f"... {events} events not kept")

    # -- lines ----------------------------------------------------------------------------

    def _add(self, direction: str, text: str) -> None:
        self.transcript.add(Line(self._clock() - self._started, direction, text))

    def _in_content(self, line: bytes, direction: str) -> bool:
        """Count a line of message content; at its end (``.``) write the one summary line."""
        if self._content is None:
            return False
        if line.rstrip(b"\r\n") == b".":
            size, digest = self._content
            self._content = None
            self._add(direction, _digest_text(size, digest))
            self._add(direction, ".")
            return True
        size, digest = self._content
        if digest is not None:
            digest.update(line)
        self._content = (size + len(line), digest)
        return True

    def _on_sent(self, line: bytes) -> None:
        if self._protocol == "smtp" and self._in_content(line, SENT):
            return
        self._add(SENT, self._redact(line))

    def _on_received(self, line: bytes) -> None:
        if self._protocol == "pop3" and self._in_content(line, RECEIVED):
            return
        self.last_received = _text(line)
        self._add(RECEIVED, self.last_received)
        stripped = line.rstrip(b"\r\n")
        if self._in_auth:
            # A continuation keeps the exchange going; the final reply ends it.
            if self._protocol == "smtp":
                self._in_auth = stripped.startswith(b"334")
            elif self._protocol == "imap":
                self._in_auth = stripped.startswith((b"+", b"*"))
            else:
                self._in_auth = stripped == b"+" or stripped.startswith(b"+ ")
        if self._content_asked:
            self._content_asked = False
            if stripped.startswith((b"354", b"+OK")):
                self._content = (0, hashlib.sha256())

    def _sent_literal(self, text: str) -> None:
        if self._in_auth:
            text = REDACTED
        self._add(SENT, text)

    def _received_literal(self, text: str) -> None:
        self._add(RECEIVED, text)

    # -- credentials ----------------------------------------------------------------------

    def _redact(self, line: bytes) -> str:
        if self._in_auth:
            return REDACTED
        text = _text(line)
        words = text.split(" ")
        if self._protocol == "imap":
            return self._redact_imap(text, words)
        verb = words[0].upper()
        if verb == "AUTH" and len(words) > 1:
            self._in_auth = True
            return " ".join(words[:2]) + (f" {REDACTED}" if len(words) > 2 else "")
        if self._protocol == "pop3" and verb in ("PASS", "APOP") and len(words) > 1:
            keep = 1 if verb == "PASS" else 2
            return " ".join(words[:keep]) + f" {REDACTED}"
        if self._protocol == "smtp" and verb == "DATA" and len(words) == 1:
            self._content_asked = True
        if self._protocol == "pop3" and verb in ("RETR", "TOP"):
            self._content_asked = True
        return text

    def _redact_imap(self, text: str, words: list[str]) -> str:
        verb = words[1].upper() if len(words) > 1 else ""
        if verb == "AUTHENTICATE" and len(words) > 2:
            self._in_auth = True
            return " ".join(words[:3]) + (f" {REDACTED}" if len(words) > 3 else "")
        if verb != "LOGIN":
            return text
        head = f"{words[0]} {words[1]} "
        if _LITERAL.search(text.encode("utf-8", "replace") + b"\n"):
            # An argument goes as a literal: the rest of the command (literals and the
            # lines after them) is secret until the server's tagged reply.
            self._in_auth = True
            return f"{head}{REDACTED}"
        user = re.match(r'(?:"(?:[^"\\]|\\.)*"|[^\s"{]+)(?= )', text[len(head) :])
        return f"{head}{user.group(0) + ' ' if user else ''}{REDACTED}"


# -- the socket side ----------------------------------------------------------------------


class _Reader(io.RawIOBase):
    """The raw stream under ``RecordingSocket.makefile``: its ``recv_into``, recorded and
    held to the step's limits."""

    def __init__(self, owner: RecordingSocket) -> None:
        super().__init__()
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._owner.recv_into(buffer)


class RecordingSocket:
    """A connected socket (plain or TLS) whose traffic goes to a ``Recorder``.

    It offers what smtplib, imaplib and poplib call (``sendall``, ``send``, ``recv``,
    ``makefile("rb")``, ``settimeout``) and passes everything else (``close``, ...) to the
    socket it wraps, ``wrapped``.

    Every read and write is held to the limit of the step in progress (``_limits``): the
    socket timeout a client sets is cut to what is left of the step's deadline, and the bytes
    received since our last send may not exceed the step's reply budget.

    """

    def __init__(self, sock: socket.socket, recorder: Recorder) -> None:
        self.wrapped = sock
        self.recorder = recorder
        #: The timeout the client set; the wrapped socket's may be cut shorter by a deadline.
        self._timeout: float | None = sock.gettimeout()
        #: Bytes received since we last sent something: the reply in progress.
        self._reply_bytes = 0

    # -- limits -------------------------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self.wrapped.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _arm(self) -> tuple[_limits.StepLimit | None, bool]:
        """Apply the step's deadline to the socket timeout; returns the limit and whether the
        deadline (rather than the client's timeout) bounds the next call."""
        limit = _limits.current()
        if limit is None:
            self.wrapped.settimeout(self._timeout)
            return None, False
        remaining = limit.remaining()
        if remaining <= 0:
            self._deadline_passed(limit)
        binding = self._timeout is None or remaining < self._timeout
        self.wrapped.settimeout(remaining if binding else self._timeout)
        return limit, binding

    def _received(self, data: bytes | memoryview, limit: _limits.StepLimit | None) -> None:
        if not data:
            return
        self.recorder.received(bytes(data))
        self._reply_bytes += len(data)
        if limit is not None and self._reply_bytes > limit.max_reply_bytes:
            raise _limits.ReplyTooLargeError(
                f"sent more than {limit.max_reply_bytes} bytes without ending its reply",
                self.recorder.last_received,
            )

    def _timed(self, exc: TimeoutError, limit: _limits.StepLimit | None, binding: bool) -> None:
        if limit is not None and binding:
            self._deadline_passed(limit, exc)

    def _deadline_passed(
        self, limit: _limits.StepLimit, exc: TimeoutError | None = None
    ) -> NoReturn:
        """A server silent since our last command did not answer (a plain timeout); one
        that kept sending without finishing its reply held the step past its deadline."""
        if self._reply_bytes == 0:
            raise TimeoutError("timed out") from exc
        raise _limits.StepDeadlineError(limit, self.recorder.last_received) from exc

    # -- I/O ----------------------------------------------------------------------------

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self._arm()
        self._reply_bytes = 0
        self.recorder.sent(data)
        self.wrapped.sendall(data, flags)

    def send(self, data: bytes, flags: int = 0) -> int:
        self._arm()
        self._reply_bytes = 0
        count = self.wrapped.send(data, flags)
        self.recorder.sent(bytes(data[:count]))
        return count

    def recv(self, size: int, flags: int = 0) -> bytes:
        limit, binding = self._arm()
        try:
            data = self.wrapped.recv(size, flags)
        except TimeoutError as exc:
            self._timed(exc, limit, binding)
            raise
        self._received(data, limit)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        limit, binding = self._arm()
        try:
            count = self.wrapped.recv_into(buffer, nbytes, flags)
        except TimeoutError as exc:
            self._timed(exc, limit, binding)
            raise
        self._received(memoryview(buffer)[:count], limit)
        return count

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.IOBase:
        if mode not in ("r", "rb"):
            raise ValueError(f"RecordingSocket.makefile: mode {mode!r} is not supported")
        size = buffering if buffering and buffering > 0 else io.DEFAULT_BUFFER_SIZE
        return io.BufferedReader(_Reader(self), size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class RecordingContext:
    """An ``SSLContext`` stand-in for a client's STARTTLS: the handshake runs on the real
    socket with the real context, and what follows is recorded on the same transcript."""

    def __init__(self, context: ssl.SSLContext, recorder: Recorder) -> None:
        self.wrapped = context
        self.recorder = recorder

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> RecordingSocket:
        raw = sock.wrapped if isinstance(sock, RecordingSocket) else sock
        try:
            tls = self.wrapped.wrap_socket(raw, *args, **kwargs)
        except (OSError, ValueError) as exc:
            self.recorder.note(f"TLS handshake failed: {exc}")
            raise
        upgraded = RecordingSocket(tls, self.recorder)
        if isinstance(sock, RecordingSocket):
            # The client's own timeout, not the one a step's deadline cut short.
            upgraded.settimeout(sock.gettimeout())
        return upgraded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)
