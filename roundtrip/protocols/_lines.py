"""Shared pieces of the line-based sans-IO machines (POP3, IMAP).

Every machine has the same shape (STYLE.md section 3):

- ``receive_data(data: bytes) -> list[Event]``; ``b""`` means the peer closed (EOF);
- ``data_to_send() -> bytes`` drains what the machine wants written;
- ``tls_started()`` is called by the adapter after a STARTTLS/STLS upgrade.

Events exist only for what the adapter must act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RemoteProtocolError

__all__ = [
    "CRLF",
    "ConnectionClosed",
    "Event",
    "LineBuffer",
    "LineTooLong",
    "StartTLSRequested",
    "dot_stuff",
]

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class StartTLSRequested:
    """The machine accepted STARTTLS/STLS: upgrade the transport, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The machine is done: flush ``data_to_send()`` and close the transport."""


Event = StartTLSRequested | ConnectionClosed


class LineTooLong(RemoteProtocolError):
    """A line grew past its limit before its CRLF arrived."""


class LineBuffer:
    """Splits a byte stream into CRLF-terminated lines with a hard length limit.

    A bare LF also ends a line (clients in the wild send it); the returned line never contains
    its terminator. When the buffered part of a line passes ``max_line`` bytes, the buffer
    discards it and ``next_line`` raises ``LineTooLong`` once, so memory stays bounded
    whatever the peer sends (SECURITY.md A1.1, A7.1).
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

    def take_all(self) -> bytes:
        chunk = bytes(self._buf)
        self._buf.clear()
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


def dot_stuff(raw: bytes) -> bytes:
    """Dot-stuff a message for a multi-line reply (RFC 1939 section 3, RFC 5321 4.5.2).

    Line endings are normalised to CRLF, a leading ``.`` is doubled, and the result always
    ends with CRLF (the terminating ``.CRLF`` is not included).
    """
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = bytearray()
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"."):
            out += b"."
        out += line
        out += CRLF
    return bytes(out)
