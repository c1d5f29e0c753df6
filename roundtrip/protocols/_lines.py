"""Shared pieces of the line-based sans-IO machines (POP3, IMAP).

Every machine has the same shape (docs/design.md, layers):

- ``receive_data(data: bytes) -> list[Event]``; ``b""`` means the peer closed (EOF);
- ``data_to_send() -> bytes`` drains what the machine wants written (``data_to_send_chunks()``,
  where a machine has it, drains the same bytes as a list of pieces without joining them, so
  a big message goes out without a copy; ``OutputBuffer`` implements both);
- ``tls_started()`` is called by the adapter after a STARTTLS/STLS upgrade.

Events exist only for what the adapter must act on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigError, RemoteProtocolError

__all__ = [
    "CRLF",
    "DATA_SLICE",
    "AuthenticationFailed",
    "AuthenticationSucceeded",
    "ConnectionClosed",
    "Event",
    "LineBuffer",
    "LineTooLong",
    "OutputBuffer",
    "StartTLSRequested",
    "dot_stuff",
    "dot_stuffed_slices",
    "header_section",
]

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class StartTLSRequested:
    """The machine accepted STARTTLS/STLS: upgrade the transport, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The machine is done: flush ``data_to_send()`` and close the transport."""


@dataclass(frozen=True, slots=True)
class AuthenticationFailed:
    """A login failed: the adapter delays the reply by the client's penalty (brute force)."""


@dataclass(frozen=True, slots=True)
class AuthenticationSucceeded:
    """A login succeeded: the adapter clears the client's penalty and its login deadline."""


Event = StartTLSRequested | ConnectionClosed | AuthenticationFailed | AuthenticationSucceeded


class LineTooLong(RemoteProtocolError):
    """A line grew past its limit before its CRLF arrived."""


class LineBuffer:
    """Splits a byte stream into CRLF-terminated lines with a hard length limit.

    A bare LF also ends a line (clients in the wild send it); the returned line never contains
    its terminator. When the buffered part of a line passes ``max_line`` bytes, the buffer
    discards it and ``next_line`` raises ``LineTooLong`` once, so memory stays bounded
    whatever the peer sends (docs/security.md A1.1, A7.1).
    """

    __slots__ = ("_buf", "_discarding", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` raw bytes (for literals)."""
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def next_line(self) -> bytes | None:
        """The next complete line, or None when more data is needed.

        Raises:
            LineTooLong: the current line passed ``max_line``; its bytes up to the next LF
                are dropped.
        """
        idx = self._buf.find(b"\n")
        if self._discarding:
            if idx < 0:
                self._buf.clear()
                return None
            del self._buf[: idx + 1]
            self._discarding = False
            raise LineTooLong(f"line longer than {self.max_line} octets")
        if idx < 0:
            if len(self._buf) > self.max_line:
                self._buf.clear()
                self._discarding = True
            return None
        if idx > self.max_line:
            del self._buf[: idx + 1]
            raise LineTooLong(f"line longer than {self.max_line} octets")
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


#: Below this many bytes a write is copied into the buffer's tail; at or above it the object
#: is kept as its own chunk, so a big message body is referenced, never copied.
_BIG_CHUNK = 16 * 1024


class OutputBuffer:
    """What a machine has written and the adapter has not yet taken.

    ``out += data`` appends. Small writes are gathered in one ``bytearray``; a big ``bytes``
    object (a message body) is kept by reference. ``take()`` joins everything once (the
    ``data_to_send() -> bytes`` contract); ``take_chunks()`` hands the pieces over without
    joining, so the adapter can write a 40 MB literal straight from the store's bytes.
    """

    __slots__ = ("_chunks", "_size", "_tail")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._tail = bytearray()
        self._size = 0

    def __iadd__(self, data: bytes | bytearray) -> OutputBuffer:
        self.append(data)
        return self

    def append(self, data: bytes | bytearray) -> None:
        """Append ``data`` (a ``bytes`` object of ``_BIG_CHUNK`` or more is not copied)."""
        if len(data) >= _BIG_CHUNK and type(data) is bytes:
            self._seal()
            self._chunks.append(data)
        else:
            self._tail += data
        self._size += len(data)

    def __len__(self) -> int:
        return self._size

    def _seal(self) -> None:
        if self._tail:
            self._chunks.append(bytes(self._tail))
            self._tail.clear()

    def take(self) -> bytes:
        """Everything written so far as one ``bytes`` object, and empty the buffer."""
        if not self._chunks:
            out = bytes(self._tail)
            self._tail.clear()
        elif not self._tail and len(self._chunks) == 1:
            out = self._chunks.pop()
        else:
            self._seal()
            out = b"".join(self._chunks)
            self._chunks.clear()
        self._size = 0
        return out

    def take_chunks(self) -> list[bytes]:
        """Everything written so far, in order, as a list of pieces; empty the buffer."""
        self._seal()
        chunks, self._chunks = self._chunks, []
        self._size = 0
        return chunks


# A LF with no CR before it (the only line ending dot_stuff has to rewrite).
_BARE_LF = re.compile(rb"(?<!\r)\n")


def dot_stuff(raw: bytes) -> bytes:
    """Dot-stuff a message for a multi-line reply (RFC 1939 section 3, RFC 5321 4.5.2).

    Lines end at LF; a CR just before it (or at the very end) belongs to the ending, which
    becomes CRLF; any other CR is left as it is. A leading ``.`` is doubled, and the result
    always ends with CRLF (the terminating ``.CRLF`` is not included). A message that needs
    none of this (CRLF throughout, no line starting with ``.``) is returned as the same
    object, so a big message is not copied.
    """
    if not raw:
        return b""
    data = bytes(raw)
    if data.count(b"\n") != data.count(b"\r\n"):
        data = _BARE_LF.sub(b"\r\n", data)
    # bytes.replace returns the object itself when there is nothing to replace.
    data = data.replace(b"\n.", b"\n..")
    head = b"." if data.startswith(b".") else b""
    if data.endswith(b"\n"):
        tail = b""
    elif data.endswith(b"\r"):
        tail = b"\n"
    else:
        tail = CRLF
    if head or tail:
        data = b"".join((head, data, tail))
    return data


#: Most bytes of message content handed to the transport in one write (as servers/_conn.py):
#: the transport (and the TLS layer under it) then holds about one slice, not the message.
DATA_SLICE = 256 * 1024


def dot_stuffed_slices(data: bytes, size: int = DATA_SLICE) -> Iterator[bytes | memoryview]:
    """The DATA content for ``data``, dot-stuffed and terminated, in slices of about ``size``.

    RFC 5321 §4.5.2: a line that starts with "." gets one more "."; the content ends with
    CRLF (added if missing) and then ``.\\r\\n``. ``data`` is expected to be CRLF-normalised
    (``normalize_line_endings`` in protocols/delivery.py). Nothing is copied whole: a slice
    without a dot-led line is a view of ``data``; a slice with some is joined from views (at
    most ``size`` plus one byte per dot). The joined slices put the stuffing dots in the write
    that needs them, so a message full of dot-led lines is not sent as thousands of tiny TLS
    records.

    This is the streaming form of :func:`dot_stuff` (which copies the message once, for POP3
    and IMAP replies); tests/protocols/test_delivery.py pins that the two agree on
    CRLF-normalised content.
    """
    if size < 1:
        raise ConfigError("slice size must be at least 1")
    view = memoryview(data)
    length = len(data)
    pos = 0
    dot = 0 if data.startswith(b".") else _next_dot_line(data, 0)
    while pos < length:
        end = min(pos + size, length)
        if dot == -1 or dot >= end:
            yield view[pos:end]
            pos = end
            continue
        parts: list[bytes | memoryview] = []
        while dot != -1 and dot < end:
            parts += (view[pos:dot], b".")
            pos = dot  # the line's own dot starts the next part
            dot = _next_dot_line(data, dot + 1)
        parts.append(view[pos:end])
        pos = end
        yield b"".join(parts)
    if not data.endswith(b"\r\n") and length:
        yield b"\r\n"
    yield b".\r\n"


def _next_dot_line(data: bytes, start: int) -> int:
    """Index of the next "." that starts a line at or after ``start`` (after a CRLF), or -1."""
    dot = data.find(b"\r\n.", start)
    return dot + 2 if dot != -1 else -1


def header_section(raw: bytes) -> bytes:
    """The header section of ``raw`` with the empty line that ends it (all of ``raw`` when
    there is none), without copying the body: a ``partition`` would, and for a big message
    that copy is the size of the message, held while headers are read."""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 4]
