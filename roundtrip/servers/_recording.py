"""What the stack's servers record of each connection, kept cheaply and read rarely.

Theory of operation (issue #15, transcripts). A stack that records installs one
:class:`Recordings` on its event loop (:func:`install`); every listener asks for it when a
connection starts (:func:`current`) and, if there is one, opens a :class:`Session` in it. The
stack's listeners and its relay share the loop, so none of them needs a new parameter, and a
server started on a loop without recordings (most tests of ``servers/``) records nothing.

Recording has to stay cheap: the stack's cost per message is measured (tests/test_load.py). A
session keeps what went over the wire as ``(time, kind, payload)`` tuples, the payload being the
very ``bytes`` object the transport handed over; lines are split, credentials redacted and
content abbreviated only when someone reads the session (``roundtrip/stack/_transcripts.py``,
with the probe's recorder).

Memory is bounded three ways. The ring keeps the last ``size`` connections and the last
``size`` DNS queries. A session keeps its first :data:`MAX_BYTES` bytes; after that a chunk of
more than :data:`SMALL_CHUNK` bytes is kept only as its size and its last line (so the end of a
message or literal is still seen), and later events go to a tail of :data:`TAIL_EVENTS`, the
ones between head and tail being counted, not kept. SMTP message content never enters a session
as bytes: the SMTP adapters record its size and sha256 (:meth:`Session.content`).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLIENT",
    "CLIENT_SKIP",
    "CONTENT",
    "MAX_BYTES",
    "NOTE",
    "SERVER",
    "SERVER_SKIP",
    "DNSQuery",
    "Recordings",
    "Session",
    "current",
    "install",
    "note_message",
    "tls_note",
]

#: Event kinds: bytes the client sent, bytes the server sent, a fact about the connection,
#: message content the client sent (``(size, sha256 hex or None, why not kept)``), and chunks
#: kept as ``(size, last line)`` only.
CLIENT = 0
SERVER = 1
NOTE = 2
CONTENT = 3
CLIENT_SKIP = 4
SERVER_SKIP = 5

#: Bytes of a session kept in full (each event counts ``_EVENT_COST`` more, so a client
#: sending a byte at a time fills the head too).
MAX_BYTES = 32 * 1024
_EVENT_COST = 32
#: Past ``MAX_BYTES``, a chunk up to this size is still kept (a command, a reply).
SMALL_CHUNK = 512
#: Events kept after the head is full (the latest ones).
TAIL_EVENTS = 256
#: Bytes of a skipped chunk's last line that are kept.
_LAST_LINE = 256

_now = time.perf_counter

Event = tuple[float, int, Any]


class Session:
    """One connection: who, when, and what went over it.

    Args:
        service: the listener's service name (``submissions``, ``imap``, ...) or ``relay``.
        protocol: ``smtp``, ``imap`` or ``pop3``: how the reader splits and redacts it.
        peer: the other end, ``host:port``.
        local: our end, ``host:port`` (for the relay, the MX's name).
    """

    __slots__ = (
        "dropped",
        "events",
        "held",
        "kept",
        "local",
        "peer",
        "protocol",
        "service",
        "started",
        "started_at",
        "tail",
    )

    def __init__(self, service: str, protocol: str, peer: str, local: str) -> None:
        self.service = service
        self.protocol = protocol
        self.peer = peer
        self.local = local
        #: ``time.perf_counter()`` and ``time.time()`` at the start.
        self.started = _now()
        self.started_at = time.time()
        self.events: list[Event] = []
        self.kept = 0
        #: Events after the head (None until the head is full), and how many fell out of it.
        self.tail: collections.deque[Event] | None = None
        self.dropped = 0
        #: Client bytes waiting for :meth:`release_client` (None: none are held).
        self.held: list[bytes] | None = None

    def client(self, data: bytes) -> None:
        """Bytes the client sent."""
        if self.held is not None:
            self.held.append(data)
            return
        kept = self.kept + len(data) + _EVENT_COST
        if kept <= MAX_BYTES:
            self.kept = kept
            self.events.append((_now(), CLIENT, data))
        else:
            self._late(CLIENT, data)

    def hold_client(self) -> None:
        """Keep what the client sends from now on until :meth:`release_client`.

        For a STARTTLS handshake: on asyncio's loop the client's first command inside TLS
        can reach the server before the server notes that TLS is up, and must follow that
        note in the transcript.
        """
        if self.held is None:
            self.held = []

    def release_client(self) -> None:
        """Record what :meth:`hold_client` kept, after whatever was noted meanwhile."""
        held, self.held = self.held, None
        for data in held or ():
            self.client(data)

    def server(self, data: bytes) -> None:
        """Bytes the server sent."""
        kept = self.kept + len(data) + _EVENT_COST
        if kept <= MAX_BYTES:
            self.kept = kept
            self.events.append((_now(), SERVER, data))
        else:
            self._late(SERVER, data)

    def note(self, text: str) -> None:
        """A fact: the TLS handshake, the authenticated user, the queue id."""
        self._add((_now(), NOTE, text))

    def content(self, size: int, digest: str | None, why: str = "") -> None:
        """Message content the client sent (SMTP DATA), as its size and sha256 hex digest;
        ``digest`` None with ``why`` when the content was not kept (a refused message)."""
        self._add((_now(), CONTENT, (size, digest, why)))

    def _add(self, event: Event) -> None:
        if self.kept + _EVENT_COST <= MAX_BYTES:
            self.kept += _EVENT_COST
            self.events.append(event)
        else:
            self._tail_add(event)

    def _late(self, kind: int, data: bytes) -> None:
        self.kept = MAX_BYTES  # the head is closed: everything later goes to the tail, in order
        if len(data) > SMALL_CHUNK:
            cut = data.rfind(b"\n", max(0, len(data) - _LAST_LINE), len(data) - 1) + 1
            last = bytes(data[cut:]) if cut else b""
            skip = CLIENT_SKIP if kind == CLIENT else SERVER_SKIP
            self._tail_add((_now(), skip, (len(data) - len(last), last)))
        else:
            self._tail_add((_now(), kind, data))

    def _tail_add(self, event: Event) -> None:
        tail = self.tail
        if tail is None:
            tail = self.tail = collections.deque(maxlen=TAIL_EVENTS)
        if len(tail) == TAIL_EVENTS:
            self.dropped += 1
        tail.append(event)

    def snapshot(self) -> tuple[list[Event], int, list[Event]]:
        """``(head, events dropped, tail)``; safe to call from another thread (the copies are
        made under the GIL without running Python code, so no append interleaves)."""
        tail = list(self.tail) if self.tail is not None else []
        return list(self.events), self.dropped, tail


@dataclass(frozen=True, slots=True)
class DNSQuery:
    """One DNS query and the answer sent (``reply`` empty when none was).

    A look-up asked in memory (transport ``memory``: the relay's MX look-ups) has no wire
    format: ``query`` and ``reply`` are empty and ``records`` holds the answer's records as
    text, as a reader of the reply would print them (``"MX 10 mail.example.org."``).
    """

    started: float
    started_at: float
    transport: str
    peer: str
    query: bytes
    reply: bytes
    qname: str
    qtype: str
    rcode: str
    records: tuple[str, ...] | None = None


@dataclass
class Recordings:
    """The last ``size`` connections and DNS queries of one stack (see the module docstring)."""

    size: int
    sessions: collections.deque[Session] = field(init=False)
    queries: collections.deque[DNSQuery] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = collections.deque(maxlen=self.size)
        self.queries = collections.deque(maxlen=self.size)

    def open(self, service: str, protocol: str, peer: str, local: str) -> Session:
        session = Session(service, protocol, peer, local)
        self.sessions.append(session)
        return session

    def dns(
        self,
        *,
        transport: str,
        peer: str,
        query: bytes,
        reply: bytes,
        qname: str,
        qtype: str,
        rcode: str,
    ) -> None:
        self.queries.append(
            DNSQuery(_now(), time.time(), transport, peer, query, reply, qname, qtype, rcode)
        )

    def lookup(
        self, *, peer: str, qname: str, qtype: str, rcode: str, records: tuple[str, ...]
    ) -> None:
        """A look-up answered in memory (no wire format): its records as text."""
        self.queries.append(
            DNSQuery(_now(), time.time(), "memory", peer, b"", b"", qname, qtype, rcode, records)
        )

    def clear(self) -> None:
        self.sessions.clear()
        self.queries.clear()


_INSTALLED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Recordings] = (
    weakref.WeakKeyDictionary()
)


def install(recordings: Recordings | None) -> None:
    """Record the connections of the servers on the running loop (None: stop recording)."""
    loop = asyncio.get_running_loop()
    if recordings is None or not recordings.size:
        _INSTALLED.pop(loop, None)
    else:
        _INSTALLED[loop] = recordings


def current() -> Recordings | None:
    """The recordings of the running loop's stack, or None (not recording)."""
    if not _INSTALLED:
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return _INSTALLED.get(loop)


def address(value: Any) -> str:
    """``host:port`` of a socket address as asyncio gives it (``peername``, ``sockname``)."""
    if isinstance(value, tuple) and len(value) >= 2:
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    return str(value) if value else "?"


def tls_note(transport: Any) -> str | None:
    """``TLS <version> <cipher>`` of a transport, or None when it carries no TLS."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher() or ("?", "", 0)
    return f"TLS {ssl_object.version() or '?'} {cipher[0]}"


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.MULTILINE | re.IGNORECASE)
#: Bytes of a message searched for its Message-ID (its header; RFC 5322 puts no cap on it).
_HEADER_SCAN = 64 * 1024


def note_message(rec: Session, raw: bytes, what: str) -> None:
    """Note ``what`` happened to a message (``queued as ...``), with its Message-ID."""
    end = raw.find(b"\r\n\r\n", 0, _HEADER_SCAN)
    found = _MESSAGE_ID.search(raw, 0, end if end >= 0 else _HEADER_SCAN)
    if found is not None:
        what += f", Message-ID: {found.group(1).decode('utf-8', 'replace')}"
    rec.note(what)
