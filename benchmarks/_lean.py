"""A lean, explicit round-trip client for the latency figures (issue "Performance").

The issue defines the round trip as: submit on 465 with AUTH, then the message is visible and
fetched over IMAPS (or POP3S). This client does exactly that over raw sockets and ``ssl``, with
no parsing beyond what the conversation needs, so that the figure is the servers' and the
network's, not a client library's. The same code runs against our stack and against
Postfix + Dovecot, so the comparison is fair. What goes on the wire:

SMTP (implicit TLS)
    greeting; ``EHLO``; ``AUTH PLAIN <initial response>``; then ``MAIL``, ``RCPT`` and ``DATA``
    in one write (RFC 2920, only if ``EHLO`` advertised PIPELINING; one at a time otherwise);
    after the 354, the message, the ``.`` and ``QUIT`` in one write. The 250 for the data and
    the 221 are read; then the socket is closed.
IMAP (implicit TLS)
    greeting; ``LOGIN``, ``SELECT INBOX`` and ``UID SEARCH HEADER Message-ID "<id>"`` in one
    write (IMAP lets a client send commands without waiting, RFC 3501 section 5.5). If the
    message is not there yet (the relay, or Postfix's LMTP delivery, is asynchronous):
    ``IDLE`` (RFC 2177) until an untagged ``EXISTS``, then ``DONE`` and ``UID SEARCH`` again in
    one write. Each IDLE wait is cut to a slice (1 ms, growing by 1.5x up to 20 ms, never past
    the deadline): our stack answers IDLE at once on delivery, but Dovecot batches IDLE
    notifications (it waits 0.5 s after an inotify event), and that batching is not delivery
    time. Without IDLE the client polls the same way with ``NOOP`` + ``UID SEARCH``. Then
    ``UID FETCH <uid> BODY.PEEK[]``.
POP3 (implicit TLS)
    greeting; ``AUTH PLAIN <initial response>`` and ``STAT`` (in one write when the server's
    ``CAPA`` lists PIPELINING, RFC 2449; ``pop3_pipelining()`` asks once, outside the timed
    round trip). A POP3 maildrop is a snapshot taken at login, so while ``STAT`` says 0 the
    client ends the session (``QUIT``, waiting for its +OK so that the maildrop lock is
    released) and logs in again after a pause: 1 ms, growing by 1.5x up to 20 ms, never past
    the deadline. Then ``RETR`` of the newest message; if that is not ours (another client's),
    ``TOP n 0`` of the others, newest first, finds the one whose headers carry our token.

The timed total stops when the message has been fetched and verified: the token is in the
headers (what the client searched for) and in the body (a real check: ``LeanError`` if not).
Clean-up is done after the clock stops and timed on its own (``cleanup``, not part of ``total``),
for both servers alike: IMAP ``UID STORE +FLAGS.SILENT (\\Deleted)``, ``UID EXPUNGE`` (plain
``EXPUNGE`` without UIDPLUS) and ``LOGOUT`` in one write; POP3 ``DELE`` and ``QUIT``.

Sockets get TCP_NODELAY at connect and TCP_QUICKACK re-armed before every read (Linux leaves
quick-ACK mode on its own; without it a client can hold an ACK for 40 ms while Postfix waits for
it), like the floor measurement. Every blocking call has a timeout (the round trip's
``timeout`` for the whole exchange; the IDLE slice while idling), and every socket is closed.
No TLS session resumption: each connection pays a full handshake, as the floor does.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import time
from typing import Protocol

__all__ = ["LeanError", "RoundTripTarget", "lean_round_trip", "pop3_pipelining"]

#: First pause of the IMAP IDLE slice and of the POP3 re-login poll, its growth, its cap.
WAIT_FIRST = 0.001
WAIT_GROWTH = 1.5
WAIT_MAX = 0.020

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class LeanError(Exception):
    """A step of the lean round trip failed: a refused command, a missing or wrong message."""


class EndpointLike(Protocol):
    """What is used of ``roundtrip.config.Endpoint`` (implicit TLS only)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def server_name(self) -> str: ...


class RoundTripTarget(Protocol):
    """What a round trip needs (``benchmarks._common.Target`` satisfies it)."""

    @property
    def smtp(self) -> EndpointLike: ...
    @property
    def imap(self) -> EndpointLike: ...
    @property
    def pop3(self) -> EndpointLike: ...
    @property
    def mail_from(self) -> str: ...
    @property
    def rcpt_to(self) -> str: ...


class _Conn:
    """One implicit-TLS connection with a byte buffer; reads lines and literals."""

    def __init__(self, endpoint: EndpointLike, ctx: ssl.SSLContext, timeout: float) -> None:
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._quickack(raw)
            self.sock = ctx.wrap_socket(raw, server_hostname=endpoint.server_name)
        except BaseException:
            raw.close()
            raise
        self.timeout = timeout
        self.buf = b""

    @staticmethod
    def _quickack(sock: socket.socket) -> None:
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _more(self) -> None:
        self._quickack(self.sock)
        data = self.sock.recv(65536)
        if not data:
            raise LeanError("connection closed by the server")
        self.buf += data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2 :]
                return line
            if len(self.buf) > 1 << 20:
                raise LeanError("line longer than 1 MiB")
            self._more()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def wait_line(self, seconds: float) -> bytes | None:
        """A line if one comes within ``seconds``, else None (nothing half-read is lost)."""
        if b"\r\n" in self.buf:
            return self.line()
        self.sock.settimeout(max(seconds, 0.0001))
        try:
            while b"\r\n" not in self.buf:
                self._more()
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(self.timeout)
        return self.line()

    def close(self) -> None:
        self.sock.close()


def _message(mail_from: str, rcpt_to: str) -> tuple[str, str, bytes]:
    token = os.urandom(12).hex()
    message_id = f"<lean-{token}@roundtrip.bench>"
    raw = (
        f"From: <{mail_from}>\r\nTo: <{rcpt_to}>\r\nSubject: lean round trip {token}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"Round-trip token: {token}\r\n"
    ).encode("ascii")
    return token, message_id, raw


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def _verify(raw: bytes, token: str, where: str) -> None:
    head, sep, body = raw.partition(b"\r\n\r\n")
    tok = token.encode("ascii")
    if not sep or tok not in head:
        raise LeanError(f"{where}: the fetched message's headers do not carry token {token}")
    if b"Round-trip token: " + tok not in body:
        raise LeanError(f"{where}: the fetched message's body lacks token {token}: {body[:200]!r}")


# --- SMTP -------------------------------------------------------------------------------------


def _smtp_reply(conn: _Conn, expect: str, what: str) -> list[bytes]:
    lines = []
    while True:
        line = conn.line()
        lines.append(line)
        if line[3:4] != b"-":
            break
    if not lines[-1].startswith(expect.encode()):
        raise LeanError(f"SMTP {what}: expected {expect}, got {lines[-1][:200]!r}")
    return lines


def _submit(
    target: RoundTripTarget,
    ctx: ssl.SSLContext,
    raw: bytes,
    timeout: float,
    steps: dict[str, float],
) -> None:
    ep = target.smtp
    started = time.perf_counter()
    conn = _Conn(ep, ctx, timeout)
    try:
        tls_done = time.perf_counter()
        steps["smtp_connect"] = tls_done - started
        _smtp_reply(conn, "220", "greeting")
        conn.send(b"EHLO lean.bench\r\n")
        ehlo = [line[4:].upper() for line in _smtp_reply(conn, "250", "EHLO")]
        if not any(e.startswith(b"AUTH") and b"PLAIN" in e.split() for e in ehlo):
            raise LeanError("SMTP EHLO: AUTH PLAIN not offered")
        conn.send(b"AUTH PLAIN " + _plain(ep.user, ep.password) + b"\r\n")
        _smtp_reply(conn, "235", "AUTH")
        envelope = [
            (f"MAIL FROM:<{target.mail_from}>\r\n".encode(), "250", "MAIL"),
            (f"RCPT TO:<{target.rcpt_to}>\r\n".encode(), "250", "RCPT"),
            (b"DATA\r\n", "354", "DATA"),
        ]
        if b"PIPELINING" in ehlo:
            conn.send(b"".join(cmd for cmd, _, _ in envelope))
            for _, code, what in envelope:
                _smtp_reply(conn, code, what)
        else:
            for cmd, code, what in envelope:
                conn.send(cmd)
                _smtp_reply(conn, code, what)
        # The message has no line starting with "." (built above), so no dot-stuffing.
        quit_too = b"QUIT\r\n" if b"PIPELINING" in ehlo else b""
        conn.send(raw + b".\r\n" + quit_too)
        _smtp_reply(conn, "250", "end of data")
        if not quit_too:
            conn.send(b"QUIT\r\n")
        _smtp_reply(conn, "221", "QUIT")
        steps["smtp_session"] = time.perf_counter() - tls_done
    finally:
        conn.close()


# --- IMAP -------------------------------------------------------------------------------------


def _quote(text: str) -> bytes:
    data = text.encode("utf-8")
    if any(b in data for b in (b"\r", b"\n", b"\0")) or not data.isascii():
        raise LeanError("IMAP: this client only sends printable ASCII quoted strings")
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _imap_response(conn: _Conn, tag: bytes) -> list[bytes]:
    """Lines (literals inline) up to and including the tagged reply; raises unless OK."""
    out = []
    while True:
        line = conn.line()
        while line.endswith(b"}") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1 : -1].rstrip(b"+"))
            literal = conn.exact(size)
            out.append(line)
            out.append(literal)
            line = conn.line()
        out.append(line)
        if line.startswith(tag + b" "):
            if line[len(tag) + 1 :][:2].upper() != b"OK":
                raise LeanError(f"IMAP {tag.decode()}: {line[:200]!r}")
            return out


def _capabilities(lines: list[bytes]) -> set[bytes]:
    caps: set[bytes] = set()
    for line in lines:
        upper = line.upper()
        at = upper.find(b"CAPABILITY ")
        if at >= 0 and (upper.startswith(b"* CAPABILITY") or b"[CAPABILITY " in upper):
            caps = set(upper[at + 11 :].split(b"]")[0].split())
    return caps


def _uids(lines: list[bytes]) -> list[bytes]:
    found: list[bytes] = []
    for line in lines:
        if line.upper().startswith(b"* SEARCH"):
            found += line.split()[2:]
    return found


def _imap_wait(
    conn: _Conn,
    caps: set[bytes],
    search: bytes,
    uids: list[bytes],
    message_id: str,
    deadline: float,
) -> tuple[list[bytes], int, int]:
    """Look again until the message shows: IDLE slices (or NOOP polls), then UID SEARCH.

    Returns the UIDs found, how many searches it took (the first look included), and how many
    IDLE slices ended on an untagged EXISTS.
    """
    looks, woken, pause = 1, 0, WAIT_FIRST
    while not uids:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise LeanError(f"IMAP: {message_id} not visible by the deadline")
        wait = min(pause, remaining)
        if b"IDLE" in caps:
            conn.send(b"i IDLE\r\n")
            while not (line := conn.line()).startswith(b"+"):
                if line.startswith(b"i "):
                    raise LeanError(f"IMAP IDLE refused: {line[:200]!r}")
            until = time.perf_counter() + wait
            while (left := until - time.perf_counter()) > 0:
                news = conn.wait_line(left)
                if news is None:
                    break
                if news.upper().endswith(b" EXISTS"):
                    woken += 1
                    break
            conn.send(b"DONE\r\nw " + search)
            _imap_response(conn, b"i")
        else:
            time.sleep(wait)
            conn.send(b"n NOOP\r\nw " + search)
            _imap_response(conn, b"n")
        uids = _uids(_imap_response(conn, b"w"))
        looks += 1
        pause = min(pause * WAIT_GROWTH, WAIT_MAX)
    return uids, looks, woken


def _imap(
    target: RoundTripTarget,
    ctx: ssl.SSLContext,
    message_id: str,
    token: str,
    timeout: float,
    deadline: float,
    steps: dict[str, float],
) -> None:
    ep = target.imap
    started = time.perf_counter()
    conn = _Conn(ep, ctx, timeout)
    try:
        tls_done = time.perf_counter()
        steps["retrieve_connect"] = tls_done - started
        greeting = conn.line()
        if not greeting.startswith(b"* OK"):
            raise LeanError(f"IMAP greeting: {greeting[:200]!r}")
        search = b"UID SEARCH HEADER Message-ID " + _quote(message_id) + b"\r\n"
        conn.send(
            b"a LOGIN " + _quote(ep.user) + b" " + _quote(ep.password) + b"\r\n"
            b"b SELECT INBOX\r\nc " + search
        )
        caps = _capabilities([greeting, *_imap_response(conn, b"a")])
        _imap_response(conn, b"b")
        uids = _uids(_imap_response(conn, b"c"))
        looked = time.perf_counter()
        steps["retrieve_first_look"] = looked - tls_done
        uids, looks, woken = _imap_wait(conn, caps, search, uids, message_id, deadline)
        visible = time.perf_counter()
        steps["wait"] = visible - looked
        steps["looks"] = looks
        steps["idle_woken"] = woken
        if len(uids) != 1:
            raise LeanError(f"IMAP: {len(uids)} copies of {message_id} (uids {uids!r})")
        uid = uids[0]
        conn.send(b"f UID FETCH " + uid + b" BODY.PEEK[]\r\n")
        lines = _imap_response(conn, b"f")
        literals = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.endswith(b"}")]
        if len(literals) != 1:
            raise LeanError(f"IMAP FETCH {uid!r}: expected one literal, got {len(literals)}")
        _verify(literals[0], token, "IMAP FETCH")
        done = time.perf_counter()
        steps["fetch"] = done - visible
        steps["fetched_at"] = done
        expunge = b"UID EXPUNGE " + uid if b"UIDPLUS" in caps else b"EXPUNGE"
        conn.send(
            b"d UID STORE " + uid + b" +FLAGS.SILENT (\\Deleted)\r\ne " + expunge + b"\r\n"
            b"z LOGOUT\r\n"
        )
        _imap_response(conn, b"d")
        _imap_response(conn, b"e")
        _imap_response(conn, b"z")
        steps["cleanup"] = time.perf_counter() - done
    finally:
        conn.close()


# --- POP3 -------------------------------------------------------------------------------------


def _pop3_ok(conn: _Conn, what: str) -> bytes:
    line = conn.line()
    if not line.startswith(b"+OK"):
        raise LeanError(f"POP3 {what}: {line[:200]!r}")
    return line


def _pop3_multiline(conn: _Conn, what: str) -> bytes:
    _pop3_ok(conn, what)
    parts: list[bytes] = []
    while True:
        line = conn.line()
        if line == b".":
            return b"".join(parts)
        parts.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def pop3_pipelining(endpoint: EndpointLike, ctx: ssl.SSLContext, timeout: float) -> bool:
    """Whether the POP3S server's ``CAPA`` lists PIPELINING (RFC 2449); one untimed session."""
    conn = _Conn(endpoint, ctx, timeout)
    try:
        _pop3_ok(conn, "greeting")
        conn.send(b"CAPA\r\n")
        caps = _pop3_multiline(conn, "CAPA").upper().split(b"\r\n")
        conn.send(b"QUIT\r\n")
        _pop3_ok(conn, "QUIT")
        return b"PIPELINING" in caps
    finally:
        conn.close()


def _pop3(
    target: RoundTripTarget,
    ctx: ssl.SSLContext,
    token: str,
    timeout: float,
    deadline: float,
    steps: dict[str, float],
    pipelining: bool,
) -> None:
    ep = target.pop3
    auth = b"AUTH PLAIN " + _plain(ep.user, ep.password) + b"\r\n"
    looks, pause, first_look = 0, WAIT_FIRST, 0.0
    while True:
        started = time.perf_counter()
        conn = _Conn(ep, ctx, timeout)
        try:
            connected = time.perf_counter()
            looks += 1
            _pop3_ok(conn, "greeting")
            if pipelining:
                conn.send(auth + b"STAT\r\n")
                _pop3_ok(conn, "AUTH")
            else:
                conn.send(auth)
                _pop3_ok(conn, "AUTH")
                conn.send(b"STAT\r\n")
            count = int(_pop3_ok(conn, "STAT").split()[1])
            looked = time.perf_counter()
            if looks == 1:
                steps["retrieve_connect"] = connected - started
                steps["retrieve_first_look"] = looked - connected
                first_look = looked
            number, raw = _pop3_find(conn, count, token) if count else (0, b"")
            if number:
                _verify(raw, token, "POP3 RETR")
                done = time.perf_counter()
                steps["looks"] = looks
                steps["wait"] = looked - first_look
                steps["fetch"] = done - looked
                steps["fetched_at"] = done
                if pipelining:
                    conn.send(f"DELE {number}\r\nQUIT\r\n".encode())
                    _pop3_ok(conn, "DELE")
                else:
                    conn.send(f"DELE {number}\r\n".encode())
                    _pop3_ok(conn, "DELE")
                    conn.send(b"QUIT\r\n")
                _pop3_ok(conn, "QUIT")
                steps["cleanup"] = time.perf_counter() - done
                return
            # Not there yet: end the session (releasing the maildrop lock), log in again later.
            conn.send(b"QUIT\r\n")
            _pop3_ok(conn, "QUIT")
        finally:
            conn.close()
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise LeanError(f"POP3: message with token {token} not visible by the deadline")
        time.sleep(min(pause, remaining))
        pause = min(pause * WAIT_GROWTH, WAIT_MAX)


def _pop3_find(conn: _Conn, count: int, token: str) -> tuple[int, bytes]:
    """(number, raw) of the message whose headers carry ``token``, or (0, b"").

    Newest first: RETR it; if it is another client's, look for ours with ``TOP n 0``.
    """
    wanted = token.encode("ascii")
    conn.send(f"RETR {count}\r\n".encode())
    raw = _pop3_multiline(conn, "RETR")
    if wanted in raw.partition(b"\r\n\r\n")[0]:
        return count, raw
    for n in range(count - 1, 0, -1):
        conn.send(f"TOP {n} 0\r\n".encode())
        if wanted in _pop3_multiline(conn, "TOP"):
            conn.send(f"RETR {n}\r\n".encode())
            return n, _pop3_multiline(conn, "RETR")
    return 0, b""


# --- the round trip ---------------------------------------------------------------------------


def lean_round_trip(
    target: RoundTripTarget,
    ctx: ssl.SSLContext,
    retrieve: str = "imap",
    timeout: float = 30.0,
    *,
    pop3_pipelining: bool = False,
) -> dict[str, float]:
    """Submit one message on 465 with AUTH, then find, fetch and verify it over IMAPS or POP3S.

    Returns the step timings in seconds: ``total`` (submission start to fetched and verified),
    ``smtp_connect`` (TCP + TLS), ``smtp_session`` (greeting to the 221), ``retrieve_connect``,
    ``retrieve_first_look`` (login to the first search or STAT), ``wait`` (until the message
    showed), ``fetch`` (FETCH or RETR and the check; for POP3 the whole session that found it),
    ``looks`` (searches or POP3 sessions), and ``cleanup`` (not part of ``total``).
    ``pop3_pipelining``: the server's CAPA lists PIPELINING (see ``pop3_pipelining()``).

    Raises:
        LeanError: a command was refused, the message did not show by ``timeout``, or the
            fetched message is not the one sent.
        OSError: connect, TLS or socket failure (``TimeoutError`` past ``timeout``).
    """
    if retrieve not in ("imap", "pop3"):
        raise ValueError(f"retrieve must be 'imap' or 'pop3', not {retrieve!r}")
    token, message_id, raw = _message(target.mail_from, target.rcpt_to)
    steps: dict[str, float] = {}
    started = time.perf_counter()
    deadline = started + timeout
    _submit(target, ctx, raw, timeout, steps)
    if retrieve == "imap":
        _imap(target, ctx, message_id, token, timeout, deadline, steps)
    else:
        _pop3(target, ctx, token, timeout, deadline, steps, pop3_pipelining)
    steps["total"] = steps.pop("fetched_at") - started
    return steps


def lean_submit(
    target: RoundTripTarget, ctx: ssl.SSLContext, timeout: float = 30.0
) -> tuple[str, dict[str, float]]:
    """Submit one message on 465 with AUTH, as ``lean_round_trip`` does, and nothing else.

    Returns the message's Subject (it carries a unique token) and the step timings
    (``smtp_connect``, ``smtp_session``). For round trips that end in the stack's own
    ``wait_for`` rather than over IMAP or POP3 (``benchmarks/sections/inprocess.py``).
    """
    token, _message_id, raw = _message(target.mail_from, target.rcpt_to)
    steps: dict[str, float] = {}
    _submit(target, ctx, raw, timeout, steps)
    return f"lean round trip {token}", steps
