"""Property tests over the sans-IO machines' inputs (docs/security.md A6.8, A7.1, A7.4, DNS).

Every input must end in a well-formed reply or a clean close, never an exception other than
``RemoteProtocolError`` (the adapter's signal to drop the connection). Bounded: about 200
examples per property and a per-example deadline, so a ReDoS or a parser loop fails the run.
"""

from __future__ import annotations

import re
import struct
from datetime import timedelta

import dns.flags
import dns.message
import dns.rdatatype
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roundtrip.errors import RemoteProtocolError
from roundtrip.protocols._lines import ConnectionClosed
from roundtrip.protocols.dns import Record, Zone, answer, build_zone, default_records
from roundtrip.protocols.imap import IMAPConnection
from roundtrip.protocols.pop3 import POP3Connection
from roundtrip.store import Store

USER = "alice@example.test"
PASSWORD = "s3cret"
NOW = 1_700_000_000.0
MESSAGES = (
    b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n.dot line\r\n",
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n--b--\r\n",
    b"Subject: bare\n\nlf only\n.x",
)
FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
)


def make_store() -> Store:
    store = Store(clock=lambda: NOW)
    store.add_user(USER, PASSWORD)
    for raw in MESSAGES:
        store.deliver(USER, raw)
    return store


# -- POP3 ---------------------------------------------------------------------------------

POP3_VERBS = [
    "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP",
    "DELE", "RSET", "NOOP", "QUIT", "XYZZY", "",
]  # fmt: skip
_NUMBER = st.one_of(
    st.integers(min_value=-5, max_value=10).map(str),
    st.sampled_from(["0", "4294967296", "99999999999999999999", "1e3", "+1", " 1", "1 2"]),
)
_ARG = st.one_of(
    _NUMBER,
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
_POP3_LINE = st.builds(
    lambda verb, args, lower: (verb.lower() if lower else verb) + "".join(" " + a for a in args),
    st.sampled_from(POP3_VERBS),
    st.lists(_ARG, max_size=3),
    st.booleans(),
)
_POP3_MULTILINE = {"CAPA", "RETR", "TOP"}


def _pop3_check(line: bytes, out: bytes) -> None:
    """One command's reply: one status line, or a status line and dot-terminated data."""
    assert out.endswith(b"\r\n"), (line, out)
    first = out.split(b"\r\n", 1)[0]
    assert first.startswith((b"+OK", b"-ERR", b"+ ")), (line, out)
    verb, _, arg = line.partition(b" ")
    verb_text = verb.decode("latin-1").upper()
    multi = verb_text in _POP3_MULTILINE or (
        verb_text in ("LIST", "UIDL", "AUTH") and not arg.strip()
    )
    if first.startswith(b"+OK") and multi:
        assert out.endswith(b"\r\n.\r\n"), (line, out)
        # Dot-stuffed: no data line is a lone "." before the end.
        body = out[len(first) + 2 : -3]
        assert b"\r\n.\r\n" not in b"\r\n" + body, (line, out)
    else:
        assert out == first + b"\r\n", (line, out)


def _pop3(logged_in: bool) -> POP3Connection:
    conn = POP3Connection(
        make_store(),
        hostname="pop.example.test",
        secure=True,
        starttls_available=False,
        max_bad_commands=1000,  # keep the session open to reach deeper states
    )
    conn.data_to_send()
    if logged_in:
        conn.receive_data(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
        assert conn.data_to_send().count(b"+OK") == 2
    return conn


@FUZZ
@given(st.lists(_POP3_LINE, min_size=1, max_size=12), st.booleans())
def test_fuzz_pop3_commands_get_well_formed_replies(lines: list[str], logged_in: bool) -> None:
    conn = _pop3(logged_in)
    for text in lines:
        line = text.encode("latin-1").replace(b"\r", b"").replace(b"\n", b"")
        try:
            events = conn.receive_data(line + b"\r\n")
        except RemoteProtocolError:
            return
        out = conn.data_to_send()
        if any(isinstance(e, ConnectionClosed) for e in events):
            assert out == b"" or out.endswith(b"\r\n")
            return
        _pop3_check(line, out)


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_pop3_arbitrary_bytes_then_a_clean_session_state(data: bytes, logged_in: bool) -> None:
    conn = _pop3(logged_in)
    try:
        events = conn.receive_data(data)
    except RemoteProtocolError:
        return
    out = conn.data_to_send()
    assert out == b"" or out.endswith(b"\r\n")
    if any(isinstance(e, ConnectionClosed) for e in events):
        return
    # Whatever came before, a complete NOOP line is answered (or the session ends cleanly).
    try:
        events = conn.receive_data(b"\r\nNOOP\r\n")
    except RemoteProtocolError:
        return
    out = conn.data_to_send()
    if not any(isinstance(e, ConnectionClosed) for e in events):
        assert re.search(rb"(\+OK|-ERR)[^\r\n]*\r\n$", out), out


# -- IMAP ---------------------------------------------------------------------------------

IMAP_VERBS = [
    "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "ENABLE",
    "NAMESPACE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
    "LIST", "LSUB", "STATUS", "APPEND", "IDLE", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE",
    "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID", "XYZZY",
]  # fmt: skip
_ATOMS = [
    "INBOX", "Junk", "1", "*", "1:*", "*:1", "1:4294967295", "2,4:7", "0", "4294967296",
    "FLAGS", "+FLAGS", "-FLAGS.SILENT", "\\Seen", "\\Deleted", "ALL", "FULL", "BODY[]",
    "BODY.PEEK[HEADER.FIELDS (SUBJECT)]", "BODY[1.2.3.MIME]", "BODY[]<0.10>", "RFC822",
    "BODYSTRUCTURE", "ENVELOPE", "UID", "FETCH", "SEARCH", "TEXT", "HEADER", "SUBJECT",
    "SINCE", "1-Jan-2024", "NOT", "OR", "CHARSET", "UTF-8", "MESSAGES", "UIDNEXT", "NIL",
    "PLAIN", "&Jjo-", "&-", "%", "..", "~", "(", ")", "[", "]", "{", "}",
]  # fmt: skip
_QUOTED = st.text(
    st.characters(min_codepoint=1, max_codepoint=0x2FF, exclude_characters="\r\n"), max_size=20
).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
_LITERAL = st.binary(max_size=60).map(lambda b: f"{{{len(b)}}}\r\n" + b.decode("latin-1"))
_IMAP_ARG = st.recursive(
    st.one_of(st.sampled_from(_ATOMS), _QUOTED, _LITERAL, _NUMBER),
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "(" + " ".join(xs) + ")"),
    max_leaves=8,
)


def _imap(state: str) -> IMAPConnection:
    conn = IMAPConnection(
        make_store(),
        hostname="imap.example.test",
        secure=True,
        starttls_available=False,
        clock=lambda: NOW,
        max_bad_commands=1000,
    )
    conn.data_to_send()
    if state != "new":
        conn.receive_data(f'a LOGIN {USER} "{PASSWORD}"\r\n'.encode())
        assert b"a OK" in conn.data_to_send()
    if state == "selected":
        conn.receive_data(b"s SELECT INBOX\r\n")
        assert b"s OK" in conn.data_to_send()
    return conn


def _feed(conn: IMAPConnection, data: bytes) -> tuple[bytes, bool]:
    """Feed ``data``; returns the output and whether the session ended."""
    try:
        events = conn.receive_data(data)
    except RemoteProtocolError:
        return b"", True
    return conn.data_to_send(), any(isinstance(e, ConnectionClosed) for e in events)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(IMAP_VERBS), st.lists(_IMAP_ARG, max_size=4), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["new", "authenticated", "selected"]),
)
def test_fuzz_imap_commands_end_with_their_tagged_reply(
    commands: list[tuple[str, list[str], bool]], state: str
) -> None:
    conn = _imap(state)
    for number, (verb, args, uid) in enumerate(commands):
        tag = f"t{number}"
        line = f"{tag} {'UID ' if uid else ''}{verb} {' '.join(args)}".rstrip()
        data = line.encode("utf-8", "surrogateescape") + b"\r\n"
        out, closed = _feed(conn, data)
        done = re.compile(rb"(^|\r\n)" + tag.encode() + rb" (OK|NO|BAD)[ \r]")
        if not closed and not done.search(out):
            # Waiting on us: IDLE wants DONE, AUTHENTICATE a SASL line, a literal its bytes
            # (a refused literal is answered at once). "DONE" ends the first two.
            assert re.search(rb"(^|\r\n)\+ ", out) or b"{" in data, (data, out)
            more, closed = _feed(conn, b"DONE\r\n")
            out += more
        if closed:
            assert out == b"" or out.endswith(b"\r\n"), (data, out)
            assert b"* BYE" in out or out == b"" or b"LOGOUT" in data.upper(), (data, out)
            return
        assert out.endswith(b"\r\n"), (data, out)
        if not done.search(out):
            # Only a literal we answered with "+" can still be open: it takes its bytes.
            assert b"{" in data, (data, out)
            return


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["new", "selected"]))
def test_fuzz_imap_arbitrary_bytes_then_noop_is_answered(data: bytes, state: str) -> None:
    conn = _imap(state)
    out, closed = _feed(conn, data)
    if closed:
        return
    # Close any literal, IDLE or SASL exchange the junk opened, then a NOOP must complete.
    out, closed = _feed(conn, b"\r\nDONE\r\n*\r\nzz NOOP\r\n")
    if closed:
        return
    if not re.search(rb"(^|\r\n)zz (OK|NO|BAD) ", out):
        # The junk announced a literal still being read: the NOOP went into it.
        assert re.search(rb"\{\d+\+?\}", data), (data, out)


# -- DNS ----------------------------------------------------------------------------------


def _zone() -> Zone:
    return build_zone(
        [
            *default_records("example.org", "127.0.0.1"),
            Record("www.example.org", "CNAME", "mail.example.org."),
            Record("loop.example.org", "CNAME", "loop.example.org."),
            *default_records("example.net", "::1"),
        ]
    )


ZONE = _zone()


def _dns_check(query: bytes) -> None:
    reply = answer(ZONE, query)
    if reply == b"":
        return
    message = dns.message.from_wire(reply)
    assert message.flags & dns.flags.QR
    assert message.id == struct.unpack("!H", query[:2])[0]


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_dns_arbitrary_bytes(query: bytes) -> None:
    _dns_check(query)


_LABEL = st.one_of(
    st.sampled_from(["example", "org", "net", "mail", "www", "loop", "_dmarc", "*", "xn--d"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
)


@FUZZ
@given(
    st.lists(_LABEL, min_size=0, max_size=5),
    st.integers(min_value=0, max_value=65535),
    st.integers(min_value=0, max_value=0xFFFF),
    st.booleans(),
    st.lists(st.tuples(st.integers(min_value=0, max_value=400), st.integers(0, 255)), max_size=4),
)
def test_fuzz_dns_mutated_queries(
    labels: list[str],
    rdtype: int,
    flags: int,
    edns: bool,
    flips: list[tuple[int, int]],
) -> None:
    name = ".".join(labels) + "." if labels else "."
    try:
        query = dns.message.make_query(name, dns.rdatatype.RdataType.make(rdtype), use_edns=edns)
    except Exception:  # dnspython refuses some names and types itself: not our input
        return
    wire = bytearray(query.to_wire())
    wire[2:4] = struct.pack("!H", flags & ~0x8000)  # any flags and opcode, but a query
    for position, value in flips:
        if position < len(wire):
            wire[position] = value
    _dns_check(bytes(wire))
