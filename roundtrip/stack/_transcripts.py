"""Transcripts of the stack's connections: the servers' raw records, read back as text.

The servers keep each connection as cheap ``(time, kind, bytes)`` events
(``roundtrip/servers/_recording.py``). Reading one replays its events through the probe's
``Recorder`` (``roundtrip/probes/_transcript.py``), so a transcript of the stack is split,
redacted and abbreviated by the same rules as the probe's: AUTH payloads and their
continuation lines, IMAP LOGIN passwords, AUTHENTICATE continuations, POP3 PASS, APOP and AUTH,
XOAUTH2 and OAUTHBEARER tokens never reach a line; message content and IMAP literals become
``[N bytes, sha256 ...]``. ``->`` is always the client and ``<-`` the server, whichever end is
the stack (on the relay's connections the stack is the client).

A DNS query is a transcript of two lines, the question and the answer.

:func:`report` writes the section a failing test gets in pytest's report (the plugin decides
when): the test's connections, those about the addresses its failure names first, and the
DNS queries as one block.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import dns.exception
import dns.message

from ..probes._transcript import NOTE, RECEIVED, SENT, Line, Recorder, Transcript
from ..servers._recording import (
    CLIENT,
    CLIENT_SKIP,
    CONTENT,
    SERVER,
    SERVER_SKIP,
    DNSQuery,
    Recordings,
    Session,
)

__all__ = ["Transcript", "collect", "report"]

_SMTP_PATH = re.compile(r"^(?:MAIL FROM|RCPT TO):\s*<([^>]*)>", re.IGNORECASE)
_IMAP_LOGIN = re.compile(r'^\S+ LOGIN ("(?:[^"\\]|\\.)*"|[^\s"{]+) ', re.IGNORECASE)
_POP3_USER = re.compile(r"^USER (\S+)", re.IGNORECASE)
_AUTHENTICATED = re.compile(r"^authenticated as (\S+)")
_MESSAGE_ID = re.compile(r"Message-ID: (<[^>]*>)")
#: An address in a failure message, to put the connections about it first.
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def collect(
    recordings: Recordings,
    *,
    address: str | None = None,
    message_id: str | None = None,
    service: str | None = None,
    since: float | None = None,
) -> list[Transcript]:
    """The recorded connections (and DNS queries), oldest first, filtered.

    Args:
        address: only connections that named it (MAIL FROM, RCPT TO, a login); any case.
        message_id: only connections that carried it (with or without the ``<>``).
        service: only this listener's (``submissions``, ``imaps``, ``relay``, ``dns``, ...).
        since: only connections that began at or after this ``time.time()``.
    """
    wanted_address = address.strip().lower() if address else None
    wanted_id = message_id.strip().strip("<>") if message_id else None
    sessions = list(recordings.sessions)
    queries = list(recordings.queries)
    found: list[Transcript] = []
    if service in (None, "dns") and wanted_address is None and wanted_id is None:
        found += [_dns(q) for q in queries if since is None or q.started_at >= since]
    for session in sessions:
        if service is not None and session.service != service:
            continue
        if since is not None and session.started_at < since:
            continue
        transcript = _transcript(session)
        if wanted_address is not None and wanted_address not in transcript.addresses:
            continue
        if wanted_id is not None and f"<{wanted_id}>" not in transcript.message_ids:
            continue
        found.append(transcript)
    found.sort(key=lambda t: t.started_at)
    return found


def _transcript(session: Session) -> Transcript:
    """Replay one session's events through the probe's recorder."""
    now = [session.started]
    recorder = Recorder(session.protocol, session.peer, clock=lambda: now[0])
    head, dropped, tail = session.snapshot()
    _replay(recorder, head, now)
    if dropped:
        recorder.gap(dropped)
    _replay(recorder, tail, now)
    transcript = recorder.transcript
    transcript.service = session.service
    transcript.local = session.local
    transcript.started_at = session.started_at
    _seen(transcript)
    return transcript


def _replay(recorder: Recorder, events: Iterable[tuple[float, int, Any]], now: list[float]) -> None:
    for at, kind, payload in events:
        now[0] = at
        if kind == CLIENT:
            recorder.sent(payload)
        elif kind == SERVER:
            recorder.received(payload)
        elif kind == CONTENT:
            recorder.content(payload[0], payload[1], payload[2])
        elif kind in (CLIENT_SKIP, SERVER_SKIP):
            skipped: int = payload[0]
            last: bytes = payload[1]
            recorder.skipped(skipped, sent=kind == CLIENT_SKIP)
            if last:
                (recorder.sent if kind == CLIENT_SKIP else recorder.received)(last)
        else:
            recorder.note(str(payload))


def _seen(transcript: Transcript) -> None:
    """Fill in the addresses and Message-IDs a transcript names."""
    addresses: dict[str, None] = {}
    ids: dict[str, None] = {}
    login = _IMAP_LOGIN if transcript.protocol == "imap" else _POP3_USER
    for line in transcript.lines:
        if line.dir == SENT:
            found = _SMTP_PATH.match(line.text) or login.match(line.text)
            if found and found.group(1):
                addresses[found.group(1).strip('"').lower()] = None
        elif line.dir == NOTE:
            user = _AUTHENTICATED.match(line.text)
            if user:
                addresses[user.group(1).lower()] = None
            for message_id in _MESSAGE_ID.findall(line.text):
                ids[message_id] = None
    transcript.addresses = list(addresses)
    transcript.message_ids = list(ids)


def _dns(query: DNSQuery) -> Transcript:
    transcript = Transcript("dns", query.peer, service="dns", local=query.transport)
    transcript.started_at = query.started_at
    transcript.add(Line(0.0, SENT, f"{query.qtype} {query.qname}"))
    transcript.add(Line(0.0, RECEIVED, _answer_text(query)))
    return transcript


def _answer_text(query: DNSQuery) -> str:
    if query.records is not None:  # answered in memory
        return " ".join([query.rcode, "; ".join(query.records)]) if query.records else query.rcode
    if not query.reply:
        return "(no answer sent)"
    try:
        message = dns.message.from_wire(query.reply)
    except dns.exception.DNSException:
        return f"{query.rcode} (unparsable answer of {len(query.reply)} bytes)"
    records = [
        f"{rrset.rdtype.name} {rdata.to_text()}" for rrset in message.answer for rdata in rrset
    ]
    return " ".join([query.rcode, "; ".join(records)]) if records else query.rcode


def report(transcripts: list[Transcript], failure: str = "") -> str:
    """The pytest report section: connections about the addresses in ``failure`` first,
    then the others, then the DNS queries one per line; "" when there is nothing."""
    named = {a.lower() for a in _ADDRESS.findall(failure)}
    connections = [t for t in transcripts if t.service != "dns"]
    queries = [t for t in transcripts if t.service == "dns"]
    connections.sort(key=lambda t: (not named.intersection(t.addresses), t.started_at))
    blocks = [str(t) for t in connections]
    if queries:
        lines = [f"dns ({len(queries)} queries)"]
        for query in queries:
            question, answer = (line.text for line in query.lines)
            lines.append(f"  {_clock(query.started_at)} {question} -> {answer}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"
