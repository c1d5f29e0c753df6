"""Find a tagged message over IMAP or POP3, waiting until a deadline, timing each step.

IMAP waits with IDLE (RFC 2177) where the server offers it, else polls with a growing
interval; POP3 has no push, and a POP3 session sees the maildrop as it was at login, so it
reconnects to look again.

The IMAP client is imaplib driven one command at a time, not imapclient: the probe reports
each step's time (connect, TLS handshake, LOGIN, SELECT, the wait for the message, FETCH)
and the TLS facts of its connection, so it opens the socket itself with ``_net.dial`` and
reads IDLE's lines under a per-wait timeout. imapclient opens its own socket and hides those
steps inside single calls. Tests that only need a stored message's octets use
``roundtrip.testing.download_imap`` (imapclient) and ``download_pop3`` instead; the two
``fetch_*`` functions here search for a tagged message until a deadline.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import socket
import ssl
import time
from typing import Any

from ..config import Endpoint
from ..errors import ConnectError, NotDeliveredError, TLSError
from ._limits import MAX_REPLY_BYTES, ReplyTooLargeError
from ._net import (
    FAIL,
    Timeline,
    check_implicit_tls,
    compare_capabilities,
    dial,
    display,
    map_errors,
    record_tls,
    starttls_context,
)

__all__ = ["fetch_imap", "fetch_pop3"]

_POLL_FIRST = 0.005
_POLL_MAX = 0.5
_IDLE_TAG = b"RTIDLE"
#: Seconds (at most; a tenth of the timeout when that is less) the wait for the message
#: keeps before the probe's deadline for its last look: a SEARCH, IDLE's DONE.
LAST_LOOK = 0.5


def _backoff(delay: float) -> float:
    return min(delay * 2, _POLL_MAX)


class _IMAP(imaplib.IMAP4):
    """imaplib over a timed, tuned socket; dials ``endpoint.host``, verifies ``server_name``.

    ``max_literal``: the largest literal (RFC 3501 section 4.3) it reads. imaplib reads a
    literal whole, into one buffer of the size the server announced; a server announcing
    10 GB would have it allocated and filled (issue #18). A larger one is refused unread.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        context: ssl.SSLContext,
        timeline: Timeline,
        timeout: float,
        max_literal: int = MAX_REPLY_BYTES,
    ) -> None:
        self._endpoint = endpoint
        self._context = context
        self._timeline = timeline
        self._max_literal = max_literal
        super().__init__(endpoint.server_name, endpoint.port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return dial(self._endpoint, self._context, self._timeline, timeout or 10.0, "imap")

    def read(self, size: int) -> bytes:
        if size > self._max_literal:
            raise ReplyTooLargeError(
                f"announced a literal of {size} bytes; the probe reads at most "
                f"{self._max_literal} (it sent a message far smaller), so none of it was read",
                self._timeline.last_received("imap"),
            )
        return super().read(size)


def _imap_search(imap: _IMAP, message_id: str) -> list[bytes]:
    typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{message_id}"')
    if typ != "OK":
        raise imaplib.IMAP4.error(f"SEARCH failed: {display(data)!r}")
    found = b" ".join(d for d in data if isinstance(d, bytes)).split()
    return found


def _imap_idle_once(imap: _IMAP, remaining: float) -> None:
    """IDLE until the server announces something or ``remaining`` seconds pass."""
    imap.send(_IDLE_TAG + b" IDLE\r\n")
    sock = imap.sock
    try:
        line = imap.readline()
        if not line.startswith(b"+"):
            raise imaplib.IMAP4.error(f"IDLE refused: {display(line)!r}")
        # Only the wait for news is bounded by ``remaining``, not the server's "+".
        sock.settimeout(max(remaining, 0.001))
        try:
            while True:
                line = imap.readline()
                if not line:
                    raise imaplib.IMAP4.abort("connection closed during IDLE")
                if re.match(rb"\* \d+ (EXISTS|RECENT)", line):
                    break
        except TimeoutError:
            # A timed-out socket file refuses further reads; nothing was half-read (the
            # timeout means no bytes came), so a fresh file over the same socket is exact.
            stale, imap.file = imap.file, sock.makefile("rb")
            stale.close()
        sock.settimeout(imap._timeout_value)
        imap.send(b"DONE\r\n")
        while True:
            line = imap.readline()
            if not line:
                raise imaplib.IMAP4.abort("connection closed after IDLE")
            if line.startswith(_IDLE_TAG + b" "):
                break
    finally:
        sock.settimeout(imap._timeout_value)


def fetch_imap(
    endpoint: Endpoint,
    *,
    message_id: str,
    context: ssl.SSLContext,
    timeout: float,
    deadline: float,
    timeline: Timeline,
    delete: bool,
    mailbox: str = "INBOX",
    settle: float = 0.0,
    max_size: int = MAX_REPLY_BYTES,
) -> list[bytes]:
    """Log in, wait until ``message_id`` is in ``mailbox`` (until ``deadline``, a
    ``time.monotonic()`` value), fetch every copy, and delete them if ``delete``.

    Once the message shows, it looks again after ``settle`` seconds so that a duplicate
    delivered just after the first copy is counted too. A copy (any literal) larger than
    ``max_size`` bytes is refused without being read.

    Returns:
        The raw bytes of each copy found (normally one).

    Raises:
        NotDeliveredError: no copy by the deadline.
        ConnectError, TLSError, AuthError, RejectedError: a step failed.
    """
    server = endpoint.address
    imap = _imap_session(endpoint, context, timeline, timeout, mailbox, max_size)
    try:
        uids = _imap_wait(
            imap,
            message_id=message_id,
            mailbox=mailbox,
            server=server,
            timeline=timeline,
            timeout=timeout,
            deadline=deadline,
            settle=settle,
        )
        copies: list[bytes] = []
        with map_errors("IMAP FETCH", server, timeout=timeout):
            started = time.perf_counter()
            for uid in uids:
                typ, data = imap.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
                bodies = _literals(data)
                # Every UID the search found is a copy: one the server will not hand over
                # (NO, or an OK without the body) must not leave "exactly one copy" true.
                if typ != "OK" or len(bodies) != 1:
                    raise imaplib.IMAP4.error(
                        f"UID FETCH {uid.decode()} (one of {len(uids)} copies found) "
                        f"gave {typ} and {len(bodies)} bodies: {display(data)!r}"
                    )
                copies.extend(bodies)
            timeline.add("imap fetch", started, server=server, detail=f"{len(copies)} copy")
        if delete:
            _imap_delete(imap, uids, server=server, timeline=timeline, timeout=timeout)
        with map_errors("IMAP LOGOUT", server, timeout=timeout):
            imap.logout()
        return copies
    finally:
        _close_quietly(imap)


def _imap_session(
    endpoint: Endpoint,
    context: ssl.SSLContext,
    timeline: Timeline,
    timeout: float,
    mailbox: str,
    max_literal: int = MAX_REPLY_BYTES,
) -> _IMAP:
    """Connect, upgrade with STARTTLS when the endpoint asks for it, LOGIN and SELECT
    ``mailbox``, each step timed; the connection is closed if a step fails."""
    server = endpoint.address
    try:
        with map_errors("IMAP CONNECT", server, timeout=timeout, waiting="the greeting"):
            imap = _IMAP(endpoint, context, timeline, timeout, max_literal)
            imap._timeout_value = timeout  # type: ignore[attr-defined]
    except ConnectError as exc:
        check_implicit_tls(endpoint, timeline, "imap", timeout, exc)
        raise
    try:
        if endpoint.tls == "starttls":
            if "LOGINDISABLED" not in imap.capabilities:
                timeline.finding(
                    "auth-before-tls",
                    FAIL,
                    f"imap {server}: LOGIN is allowed before STARTTLS (no LOGINDISABLED) on a "
                    "STARTTLS port (RFC 3501 section 6.2.3)",
                    server,
                )
            if "STARTTLS" not in imap.capabilities:
                raise TLSError(
                    f"STARTTLS: {server} does not offer STARTTLS; no credentials were sent",
                    step="STARTTLS",
                    host=server,
                )
            before = list(imap.capabilities)
            with map_errors("IMAP STARTTLS", server, timeout=timeout):
                started = time.perf_counter()
                # imaplib asks for CAPABILITY again once TLS is up (RFC 2595 section 3.1).
                imap.starttls(ssl_context=starttls_context(imap.sock, context))
                record_tls(
                    timeline, "imap", started, imap.sock, server, endpoint.server_name, context
                )
            compare_capabilities(
                timeline,
                label="imap",
                server=server,
                before=before,
                after=imap.capabilities,
                command="STARTTLS",
            )
        with map_errors("IMAP LOGIN", server, timeout=timeout):
            started = time.perf_counter()
            imap.login(endpoint.user, endpoint.password)
            timeline.add("imap login", started, server=server)
        with map_errors("IMAP SELECT", server, timeout=timeout):
            started = time.perf_counter()
            typ, data = imap.select(_quote_mailbox(mailbox))
            if typ != "OK":
                raise imaplib.IMAP4.error(f"SELECT {mailbox} failed: {display(data)!r}")
            timeline.add("imap select", started, server=server)
        return imap
    except BaseException:
        _close_quietly(imap)
        raise


def _imap_wait(
    imap: _IMAP,
    *,
    message_id: str,
    mailbox: str,
    server: str,
    timeline: Timeline,
    timeout: float,
    deadline: float,
    settle: float,
) -> list[bytes]:
    """The UIDs of ``message_id`` once it shows (and ``settle`` seconds more have passed);
    raises ``NotDeliveredError`` if it has not shown by ``deadline``."""
    idle = "IDLE" in imap.capabilities
    started = time.perf_counter()
    delay = _POLL_FIRST
    settle_until: float | None = None
    # The wait ends at the probe's deadline, also when a server keeps it busy: the schedule
    # stops ``reserve`` seconds early, so that the last look (SEARCH, IDLE's DONE) fits.
    reserve = min(timeout / 10, LAST_LOOK)
    wait_deadline = max(deadline, time.monotonic() + reserve)
    look_by = wait_deadline - reserve
    with map_errors("IMAP WAIT", server, timeout=timeout, deadline=wait_deadline):
        while True:
            uids = _imap_search(imap, message_id)
            remaining = look_by - time.monotonic()
            if uids and settle_until is None:
                timeline.visible_at = time.perf_counter()
                timeline.add(
                    "imap visible", started, server=server, detail="IDLE" if idle else "poll"
                )
                settle_until = time.monotonic() + min(settle, max(remaining, 0.0))
            if settle_until is not None:
                # A second copy (a duplicate) may land just after the first one.
                wait = settle_until - time.monotonic()
                if wait <= 0:
                    break
                time.sleep(wait)
                imap.noop()
                settle_until = time.monotonic()
                continue
            if remaining <= 0:
                break
            if idle:
                # IDLE, but never longer than the poll schedule: Dovecot delays its
                # notifications by 0.5 s, which would be reported as delivery time.
                _imap_idle_once(imap, min(delay, remaining))
            else:
                time.sleep(min(delay, remaining))
                imap.noop()
            delay = _backoff(delay)
    if not uids:
        timeline.fail("imap visible", started, server=server, detail="not found")
        raise NotDeliveredError(
            f"FETCH: message {message_id} not found in {mailbox} at {server} by the deadline",
            step="FETCH",
            host=server,
        )
    return uids


def _imap_delete(
    imap: _IMAP, uids: list[bytes], *, server: str, timeline: Timeline, timeout: float
) -> None:
    """Mark ``uids`` deleted and expunge them (only them, with UIDPLUS: RFC 4315)."""
    with map_errors("IMAP DELETE", server, timeout=timeout):
        started = time.perf_counter()
        uid_set = ",".join(u.decode() for u in uids)
        typ, data = imap.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)")
        if typ != "OK":
            raise imaplib.IMAP4.error(
                f"UID STORE {uid_set} +FLAGS (\\Deleted) failed: {display(data)!r}"
            )
        if "UIDPLUS" in imap.capabilities:
            typ, data = imap.uid("EXPUNGE", uid_set)
        else:
            typ, data = imap.expunge()
        if typ != "OK":
            raise imaplib.IMAP4.error(f"EXPUNGE failed: {display(data)!r}")
        timeline.add("imap delete", started, server=server)


def _literals(data: list[Any]) -> list[bytes]:
    return [part[1] for part in data if isinstance(part, tuple) and len(part) == 2]


def _quote_mailbox(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9._/-]+", name) else '"' + name.replace('"', r"\"") + '"'


def _close_quietly(client: Any) -> None:
    sock = getattr(client, "sock", None)
    try:
        if sock is not None:
            sock.close()
    except OSError:
        pass
    file = getattr(client, "file", None)
    if file is not None:
        try:
            file.close()
        except OSError:
            pass


class _POP3(poplib.POP3):
    """poplib over a timed, tuned socket."""

    def __init__(
        self, endpoint: Endpoint, context: ssl.SSLContext, timeline: Timeline, timeout: float
    ) -> None:
        self._endpoint = endpoint
        self._context = context
        self._timeline = timeline
        try:
            super().__init__(endpoint.server_name, endpoint.port, timeout=timeout)
        except BaseException:
            # poplib leaves the socket open when the greeting fails (or never comes).
            _close_quietly(self)
            raise

    def _create_socket(self, timeout: float) -> socket.socket:
        return dial(self._endpoint, self._context, self._timeline, timeout, "pop3")


def _pop3_session(
    endpoint: Endpoint, context: ssl.SSLContext, timeline: Timeline, timeout: float
) -> _POP3:
    server = endpoint.address
    try:
        with map_errors("POP3 CONNECT", server, timeout=timeout, waiting="the greeting"):
            pop = _POP3(endpoint, context, timeline, timeout)
    except ConnectError as exc:
        check_implicit_tls(endpoint, timeline, "pop3", timeout, exc)
        raise
    try:
        if endpoint.tls == "starttls":
            with map_errors("POP3 CAPA", server, timeout=timeout):
                caps = pop.capa()
            if "STLS" not in caps:
                raise TLSError(
                    f"STLS: {server} does not offer STLS; no credentials were sent",
                    step="STLS",
                    host=server,
                )
            if "USER" in caps:
                timeline.finding(
                    "auth-before-tls",
                    FAIL,
                    f"pop3 {server}: USER is offered before STLS on a STARTTLS port "
                    "(RFC 2595 section 4)",
                    server,
                )
            with map_errors("POP3 STLS", server, timeout=timeout):
                started = time.perf_counter()
                pop.stls(context=starttls_context(pop.sock, context))
                record_tls(
                    timeline, "pop3", started, pop.sock, server, endpoint.server_name, context
                )
            # RFC 2595 section 4: what CAPA said before TLS no longer holds; ask again.
            with map_errors("POP3 CAPA", server, timeout=timeout):
                after = pop.capa()
            compare_capabilities(
                timeline, label="pop3", server=server, before=caps, after=after, command="STLS"
            )
        with map_errors("POP3 LOGIN", server, timeout=timeout):
            started = time.perf_counter()
            pop.user(endpoint.user)
            pop.pass_(endpoint.password)
            timeline.add("pop3 login", started, server=server)
        return pop
    except BaseException:
        _close_quietly(pop)
        raise


_MESSAGE_ID_RE = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def fetch_pop3(
    endpoint: Endpoint,
    *,
    message_id: str,
    context: ssl.SSLContext,
    timeout: float,
    deadline: float,
    timeline: Timeline,
    delete: bool,
    settle: float = 0.0,
    max_size: int = MAX_REPLY_BYTES,
) -> list[bytes]:
    """Like ``fetch_imap`` over POP3: reconnect until the message shows, RETR every copy
    (an answer to RETR growing past ``max_size`` bytes is cut off, and the step fails)."""
    server = endpoint.address
    started_wait = time.perf_counter()
    delay = _POLL_FIRST
    checked: dict[bytes, bool] = {}
    settled = settle <= 0
    while True:
        pop = _pop3_session(endpoint, context, timeline, timeout)
        try:
            with map_errors("POP3 SEARCH", server, timeout=timeout):
                matches = _pop3_matches(pop, message_id, checked)
            remaining = deadline - time.monotonic()
            if matches and timeline.visible_at is None:
                timeline.visible_at = time.perf_counter()
                timeline.add("pop3 visible", started_wait, server=server, detail="poll")
            if matches and (settled or remaining <= 0):
                return _pop3_take(
                    pop,
                    matches,
                    server=server,
                    timeline=timeline,
                    timeout=timeout,
                    delete=delete,
                    max_size=max_size,
                )
            with map_errors("POP3 QUIT", server, timeout=timeout):
                pop.quit()
        finally:
            _close_quietly(pop)
        if matches:
            # A POP3 session sees the maildrop as at login: look once more after ``settle``
            # for a duplicate delivered just after the first copy.
            time.sleep(min(settle, remaining))
            settled = True
            continue
        if remaining <= 0:
            timeline.fail("pop3 visible", started_wait, server=server, detail="not found")
            raise NotDeliveredError(
                f"RETR: message {message_id} not found at {server} by the deadline",
                step="RETR",
                host=server,
            )
        time.sleep(min(delay, remaining))
        delay = _backoff(delay)


def _pop3_matches(pop: _POP3, message_id: str, checked: dict[bytes, bool]) -> list[int]:
    """The message numbers of this session whose Message-ID is ``message_id``. ``checked``
    remembers the verdict per UIDL across sessions, so each message's header is read once."""
    matches: list[int] = []
    _, listing, _ = pop.uidl()
    for entry in listing:
        number, _, uidl = entry.partition(b" ")
        num = int(number)
        if uidl not in checked:
            _, lines, _ = pop.top(num, 0)
            header = b"\r\n".join(lines)
            found = _MESSAGE_ID_RE.search(header)
            checked[uidl] = bool(found and found.group(1).decode() == message_id)
        if checked[uidl]:
            matches.append(num)
    return matches


def _pop3_take(
    pop: _POP3,
    matches: list[int],
    *,
    server: str,
    timeline: Timeline,
    timeout: float,
    delete: bool,
    max_size: int = MAX_REPLY_BYTES,
) -> list[bytes]:
    """RETR every match, then DELE them (if ``delete``) and QUIT; returns the copies."""
    copies: list[bytes] = []
    with map_errors("POP3 RETR", server, timeout=timeout, max_reply_bytes=max_size):
        started = time.perf_counter()
        for num in matches:
            _, lines, _ = pop.retr(num)
            copies.append(b"\r\n".join(lines) + b"\r\n")
        timeline.add("pop3 fetch", started, server=server, detail=f"{len(copies)} copy")
    if delete:
        # The server removes messages marked with DELE only when QUIT ends the
        # session (RFC 1939 section 6): the step times both.
        with map_errors("POP3 DELE", server, timeout=timeout):
            started = time.perf_counter()
            for num in matches:
                pop.dele(num)
            pop.quit()
            timeline.add("pop3 delete", started, server=server, detail=f"{len(matches)} copy")
    else:
        with map_errors("POP3 QUIT", server, timeout=timeout):
            pop.quit()
    return copies
