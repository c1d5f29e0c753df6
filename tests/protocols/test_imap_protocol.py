"""The IMAP machine without sockets: bytes in, bytes out (h11-style pure tests)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.errors import RemoteProtocolError
from roundtrip.maildir import MaildirStore
from roundtrip.protocols import _mime
from roundtrip.protocols._imapparse import (
    CommandReader,
    ListPattern,
    LiteralAnnounced,
    ParseError,
    RawCommand,
    decode_mutf7,
    encode_mutf7,
    format_uid_set,
    parse_date_time,
    parse_sequence_set,
    tokenize,
)
from roundtrip.protocols._lines import ConnectionClosed, StartTLSRequested
from roundtrip.protocols.imap import IMAPConnection, IMAPState
from roundtrip.store import Store, StoreChange

USER = "alice@example.test"
PASSWORD = "s3cret pass"
NOW = 1_700_000_000.0

PLAIN = (
    b"From: Bob Example <bob@example.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Cc: carol@example.test\r\n"
    b"Bcc: dave@example.test\r\n"
    b"Subject: Quarterly report\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <one@example.test>\r\n"
    b"X-Token: abc123\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)
OTHER = (
    b"From: zed@other.test\r\nTo: alice@example.test\r\nSubject: lunch?\r\n"
    b"Date: Fri, 15 Mar 2024 12:00:00 +0000\r\n\r\n" + b"x" * 3000 + b"\r\n"
)


def make_store(store: Store | None = None) -> Store:
    store = Store(clock=lambda: NOW) if store is None else store
    store.add_user(USER, PASSWORD)
    store.deliver(USER, PLAIN, internal_date=1_704_103_200.0)  # 2024-01-01 10:00 UTC
    store.deliver(USER, OTHER, flags={"\\Seen"}, internal_date=1_710_504_000.0)  # 2024-03-15
    store.deliver(USER, PLAIN.replace(b"Quarterly", b"Annual"), internal_date=1_710_504_000.0)
    return store


class Client:
    """Drives one machine and keeps what it said."""

    def __init__(self, store: Store, *, secure: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("starttls_available", not secure)
        self.conn = IMAPConnection(
            store, hostname="imap.example.test", secure=secure, clock=lambda: NOW, **kwargs
        )
        self.greeting = self.conn.data_to_send()
        self.events: list[object] = []

    def send(self, data: bytes) -> bytes:
        self.events = list(self.conn.receive_data(data))
        return self.conn.data_to_send()

    def cmd(self, line: str | bytes) -> bytes:
        raw = line.encode() if isinstance(line, str) else line
        return self.send(raw + b"\r\n")

    def login(self) -> None:
        assert b"a0 OK" in self.cmd(f'a0 LOGIN {USER} "{PASSWORD}"')

    def select(self, box: str = "INBOX") -> bytes:
        self.login()
        out = self.cmd(f"s1 SELECT {box}")
        assert b"s1 OK [READ-WRITE]" in out
        return out


@pytest.fixture
def store() -> Store:
    return make_store()


# Greeting, capabilities, authentication


def test_imap_greeting_lists_capabilities_and_plaintext_shows_logindisabled(store: Store) -> None:
    plain = Client(store, secure=False)
    assert plain.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    caps = plain.cmd("c CAPABILITY")
    assert b"LOGINDISABLED" in caps and b"STARTTLS" in caps and b"AUTH=PLAIN" not in caps
    secure = Client(store, secure=True)
    caps = secure.cmd("c CAPABILITY")
    assert b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps
    for name in (b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"LITERAL+", b"APPENDLIMIT="):
        assert name in caps


def test_imap_login_before_tls_is_privacyrequired(store: Store) -> None:
    c = Client(store, secure=False)
    out = c.cmd(f"a LOGIN {USER} {PASSWORD.split()[0]}")
    assert out.startswith(b"a NO [PRIVACYREQUIRED]")
    out = c.cmd("b AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQgcGFzcw==")
    assert out.startswith(b"b NO [PRIVACYREQUIRED]")
    assert c.conn.state is IMAPState.NOT_AUTHENTICATED


def test_imap_login_after_starttls_succeeds(store: Store) -> None:
    c = Client(store, secure=False)
    assert c.cmd("t STARTTLS") == b"t OK Begin TLS negotiation now\r\n"
    assert c.events == [StartTLSRequested()]
    c.conn.tls_started()
    caps = c.cmd("c CAPABILITY")
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    c.login()
    assert c.conn.state is IMAPState.AUTHENTICATED


def test_imap_starttls_with_pipelined_plaintext_is_injection(store: Store) -> None:
    c = Client(store, secure=False)
    with pytest.raises(RemoteProtocolError):
        c.send(b"a1 STARTTLS\r\na2 NOOP\r\n")
    assert b"a2" not in c.conn.data_to_send()


def test_imap_data_between_starttls_and_handshake_is_refused(store: Store) -> None:
    c = Client(store, secure=False)
    c.cmd("a1 STARTTLS")
    with pytest.raises(RemoteProtocolError):
        c.send(b"a2 NOOP\r\n")


def test_imap_starttls_refused_on_tls_connection(store: Store) -> None:
    c = Client(store, secure=True)
    assert c.cmd("a STARTTLS").startswith(b"a BAD")
    assert c.events == []


def test_imap_login_with_quoted_and_literal_credentials(store: Store) -> None:
    c = Client(store)
    out = c.send(f"a LOGIN {{{len(USER)}}}\r\n".encode())
    assert out == b"+ Ready for literal data\r\n"
    out = c.send(USER.encode() + b' "s3cret pass"\r\n')
    assert out.startswith(b"a OK [CAPABILITY")


def test_imap_login_wrong_password_fails(store: Store) -> None:
    c = Client(store)
    assert c.cmd(f'a LOGIN {USER} "nope"').startswith(b"a NO [AUTHENTICATIONFAILED]")
    assert c.conn.state is IMAPState.NOT_AUTHENTICATED


def test_imap_authenticate_plain_sasl_ir_and_continuation(store: Store) -> None:
    import base64

    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    c = Client(store)
    assert c.cmd(f"a AUTHENTICATE PLAIN {token}").startswith(b"a OK")
    c2 = Client(store)
    assert c2.cmd("a AUTHENTICATE PLAIN") == b"+ \r\n"
    assert c2.cmd(token).startswith(b"a OK")
    c3 = Client(store)
    c3.cmd("a AUTHENTICATE PLAIN")
    assert c3.cmd("*").startswith(b"a BAD")
    bad = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
    assert Client(store).cmd(f"a AUTHENTICATE PLAIN {bad}").startswith(b"a NO")
    assert Client(store).cmd("a AUTHENTICATE CRAM-MD5").startswith(b"a NO")


# Bad input


def test_imap_bad_tag_and_unknown_command(store: Store) -> None:
    c = Client(store)
    assert c.cmd('a"b NOOP').startswith(b"* BAD")
    assert c.cmd("a FROBNICATE").startswith(b"a BAD")
    assert c.conn.state is IMAPState.NOT_AUTHENTICATED


def test_imap_three_bad_commands_before_auth_end_the_session(store: Store) -> None:
    c = Client(store)
    c.cmd("x1 BOGUS")
    c.cmd("x2 BOGUS")
    out = c.cmd("x3 BOGUS")
    assert b"* BYE Too many invalid IMAP commands." in out
    assert ConnectionClosed() in c.events
    assert c.cmd("x4 NOOP") == b""


def test_imap_bad_commands_after_auth_tolerated_up_to_limit(store: Store) -> None:
    c = Client(store, max_bad_commands=5)
    c.login()
    for i in range(4):
        assert c.cmd(f"x{i} BOGUS").startswith(f"x{i} BAD".encode())
    assert c.cmd("n NOOP").startswith(b"n OK")
    assert b"BYE" in c.cmd("x9 BOGUS")


def test_imap_command_in_wrong_state_is_bad(store: Store) -> None:
    c = Client(store)
    assert c.cmd("a SELECT INBOX").startswith(b"a BAD")
    c.login()
    assert c.cmd("b FETCH 1 FLAGS").startswith(b"b BAD")


def test_imap_over_long_line_says_bye(store: Store) -> None:
    c = Client(store, max_line=1000)
    out = c.send(b"a NOOP " + b"x" * 2000 + b"\r\n")
    assert b"* BYE" in out and ConnectionClosed() in c.events


def test_imap_8000_octet_command_is_accepted(store: Store) -> None:
    c = Client(store)
    c.select()
    numbers = ",".join(["1", "2", "3"] * 1400)
    assert len(numbers) > 8000
    assert b"u OK" in c.cmd(f"u UID FETCH {numbers} FLAGS")


# Literals


def test_imap_append_literal_too_big_gets_no_without_continuation(store: Store) -> None:
    c = Client(store, max_literal=1000)
    c.login()
    out = c.cmd("a APPEND INBOX {99999999999}")
    assert out.startswith(b"a NO [TOOBIG]")
    assert b"+" not in out.split(b"\r\n")[0][:1]
    assert c.cmd("b NOOP").startswith(b"b OK")


def test_imap_append_literal_within_limit_gets_continuation(store: Store) -> None:
    c = Client(store, max_literal=1000)
    c.login()
    assert c.cmd("a APPEND INBOX {10}") == b"+ Ready for literal data\r\n"
    out = c.send(b"Subject: x\r\n")
    assert re.match(rb"a OK \[APPENDUID \d+ 4\]", out)


def test_imap_literal_too_big_for_other_commands_is_bad(store: Store) -> None:
    c = Client(store)
    out = c.cmd("a LOGIN {100000}")
    assert out.startswith(b"a BAD") and not out.startswith(b"+")


def test_imap_preauth_append_literal_uses_line_limit(store: Store) -> None:
    c = Client(store, max_line=1000)
    assert c.cmd("a APPEND INBOX {5000}").startswith(b"a BAD")


def test_imap_nonsync_literal_contents_are_never_executed(store: Store) -> None:
    c = Client(store)
    c.login()
    body = b"Subject: trap\r\n\r\nb DELETE Sent\r\nc LOGOUT\r\n"
    out = c.send(b"a APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\nd NOOP\r\n")
    assert b"+ Ready" not in out
    assert b"a OK [APPENDUID" in out and b"d OK" in out
    assert b"b OK" not in out and b"BYE" not in out
    assert store.mailbox(USER, "Sent") is not None
    assert store.messages(USER, "INBOX")[-1].raw == body


def test_imap_nonsync_literal_too_big_says_bye_and_never_reads_it(store: Store) -> None:
    c = Client(store, max_literal=4000)
    c.login()
    out = c.send(b"a APPEND INBOX {5000+}\r\nb DELETE Sent\r\n")
    assert out.startswith(b"* BYE [TOOBIG]")
    assert ConnectionClosed() in c.events
    assert c.send(b"c DELETE Sent\r\n") == b""
    store.mailbox(USER, "Sent")


def test_imap_literal_split_over_many_segments(store: Store) -> None:
    c = Client(store)
    c.login()
    msg = b"Subject: split\r\n\r\n" + b"y" * 500 + b"\r\n"
    out = c.send(b'a APPEND INBOX (\\Flagged) "02-Jan-2024 03:04:05 +0100" {%d}\r\n' % len(msg))
    assert out.startswith(b"+")
    result = b""
    for i in range(0, len(msg), 7):
        result += c.send(msg[i : i + 7])
    result += c.send(b"\r\n")
    assert b"a OK [APPENDUID" in result
    stored = store.messages(USER, "INBOX")[-1]
    assert stored.raw == msg and stored.flags == {"\\Flagged"}
    assert stored.internal_date == parse_date_time("02-Jan-2024 03:04:05 +0100")


def test_imap_append_to_missing_mailbox_is_trycreate(store: Store) -> None:
    c = Client(store)
    c.login()
    c.cmd("a APPEND Nowhere {3}")
    assert c.send(b"abc\r\n").startswith(b"a NO [TRYCREATE]")


# Parser units


def _raw(*parts: bytes) -> RawCommand:
    return RawCommand(list(parts[::2]), list(parts[1::2]))


def test_imap_tokenize_quoted_literal_and_lists() -> None:
    toks = tokenize(
        _raw(b'a LOGIN "b\\"o\\\\b" ', b"pa ss", b" (x (y)) BODY[HEADER.FIELDS (A B)]<0.5>")
    )
    assert toks == [
        "a",
        "LOGIN",
        b'b"o\\b',
        b"pa ss",
        ["x", ["y"]],
        "BODY[HEADER.FIELDS (A B)]<0.5>",
    ]


@pytest.mark.parametrize(
    "line", [b'a LOGIN "unterminated', b"a X (a", b"a X )", b'a X "bad\\q"', b"a X \xff"]
)
def test_imap_tokenize_rejects_malformed(line: bytes) -> None:
    with pytest.raises(ParseError):
        tokenize(_raw(line))


def test_imap_tokenize_deep_nesting_is_bounded() -> None:
    with pytest.raises(ParseError):
        tokenize(_raw(b"a X " + b"(" * 5000 + b")" * 5000))


def test_imap_reader_frames_literals_and_waits_for_decision() -> None:
    r = CommandReader(max_line=100)
    r.feed(b"a APPEND INBOX {3}\r\nabc\r\n")
    ann = r.next()
    assert ann == LiteralAnnounced("a", "APPEND", 3, True, 20)
    with pytest.raises(RuntimeError):
        r.next()
    r.accept_literal()
    cmd = r.next()
    assert isinstance(cmd, RawCommand) and cmd.literals == [b"abc"]
    assert r.next() is None


def test_imap_sequence_sets_are_lazy_and_bounded() -> None:
    uids = [3, 7, 9]
    assert parse_sequence_set("1:4294967295").uid_indices(uids) == [0, 1, 2]
    assert parse_sequence_set("*:1").seq_indices(3) == [0, 1, 2]
    assert parse_sequence_set("9:*").uid_indices(uids) == [2]
    assert parse_sequence_set("100:*").uid_indices(uids) == [2]  # RFC 3501: * is the largest
    assert parse_sequence_set("1,3,2,3").seq_indices(3) == [0, 1, 2]
    assert parse_sequence_set("8").uid_indices(uids) == []
    for bad in ("0", "abc", "1:", "4294967296", "1,,2", ""):
        with pytest.raises(ParseError):
            parse_sequence_set(bad)
    with pytest.raises(ParseError):
        parse_sequence_set("4").seq_indices(3)
    assert format_uid_set([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"


def test_imap_modified_utf7_round_trip_and_rejects() -> None:
    assert decode_mutf7(b"&Jjo-!") == "\u263a!"
    assert decode_mutf7(b"Entw&APw-rfe") == "Entwürfe"
    assert decode_mutf7(b"a&-b") == "a&b"
    assert encode_mutf7("Entwürfe & Co") == b"Entw&APw-rfe &- Co"
    for bad in (b"&", b"&Jjo", b"&AGE-", b"caf\xc3\xa9", b"&!!!-", b"&A-"):
        with pytest.raises(ParseError):
            decode_mutf7(bad)


@given(st.text(max_size=30))
def test_imap_modified_utf7_round_trips_any_text(text: str) -> None:
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert decode_mutf7(encode_mutf7(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_imap_any_mailbox_name_gets_a_tagged_reply(name: bytes) -> None:
    c = Client(make_store())
    c.login()
    quoted = b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    for verb in (b"SELECT", b"CREATE", b"STATUS"):
        line = b"t " + verb + b" " + quoted.replace(b"\r", b"").replace(b"\n", b"")
        if verb == b"STATUS":
            line += b" (MESSAGES)"
        out = c.cmd(line)
        assert re.search(rb"(^|\r\n)(t|\*) (OK|NO|BAD)", out), out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_imap_arbitrary_bytes_never_crash_the_machine(data: bytes) -> None:
    c = Client(make_store())
    c.login()
    c.cmd("s SELECT INBOX")
    try:
        c.send(data)
        c.send(b"\r\n")
    except RemoteProtocolError:
        pass


# Mailboxes


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "foo//bar", ".foo", "foo.", "foo/..", "~x"]
)
def test_imap_path_traversal_names_refused(store: Store, name: str) -> None:
    c = Client(store)
    c.login()
    for verb in ("CREATE", "SELECT", "DELETE", "SUBSCRIBE"):
        out = c.cmd(f'x {verb} "{name}"')
        assert out.startswith((b"x NO", b"x BAD")), (verb, out)
    assert c.cmd(f'r RENAME Junk "{name}"').startswith((b"r NO", b"r BAD"))
    assert c.cmd(f'p APPEND "{name}" {{1}}').startswith((b"p NO", b"p BAD", b"+"))
    assert all("/" not in b.name or not b.name.startswith("/") for b in store.mailboxes(USER))


def test_imap_list_and_lsub_attributes(store: Store) -> None:
    c = Client(store)
    c.login()
    assert c.cmd("c CREATE Projects/2024/").startswith(b"c OK")
    assert c.cmd('c2 CREATE "Entw&APw-rfe"').startswith(b"c2 OK")
    out = c.cmd('l LIST "" *').decode()
    assert '* LIST (\\HasNoChildren) "/" "INBOX"' in out
    assert '* LIST (\\HasNoChildren \\Sent) "/" "Sent"' in out
    assert '* LIST (\\HasChildren) "/" "Projects"' not in out  # only Projects/2024 exists
    assert '* LIST (\\Noselect \\HasChildren) "/" "Projects"' in out
    assert '* LIST (\\HasNoChildren) "/" "Projects/2024"' in out
    assert '"Entw&APw-rfe"' in out
    top = c.cmd('l2 LIST "" %').decode()
    assert "Projects/2024" not in top and '"Projects"' in top
    assert c.cmd('l3 LIST "" ""').startswith(b'* LIST (\\Noselect) "/" ""')
    special = c.cmd('l4 LIST (SPECIAL-USE) "" *').decode()
    assert "INBOX" not in special and "\\Trash" in special
    c.cmd("u UNSUBSCRIBE Junk")
    lsub = c.cmd('l5 LSUB "" *').decode()
    assert '"Junk"' not in lsub and '"Trash"' in lsub
    assert '"inbox"' not in c.cmd('l6 LIST "" inbox').decode().lower().replace('"inbox"\r\nl6', "")


def test_imap_create_delete_rename(store: Store) -> None:
    c = Client(store)
    c.login()
    assert c.cmd("a CREATE Work").startswith(b"a OK")
    assert c.cmd("b CREATE Work").startswith(b"b NO [ALREADYEXISTS]")
    assert c.cmd("c RENAME Work Play").startswith(b"c OK")
    assert c.cmd("d DELETE Work").startswith(b"d NO [NONEXISTENT]")
    assert c.cmd("e DELETE Play").startswith(b"e OK")
    assert c.cmd("f DELETE INBOX").startswith(b"f NO")


def test_imap_select_missing_mailbox_is_no_and_unselects(store: Store) -> None:
    c = Client(store)
    c.select()
    assert c.cmd("x SELECT Missing").startswith(b"x NO [NONEXISTENT]")
    assert c.conn.state is IMAPState.AUTHENTICATED
    assert c.cmd("y FETCH 1 FLAGS").startswith(b"y BAD")


def test_imap_select_and_examine_responses(store: Store) -> None:
    c = Client(store)
    out = c.select().decode()
    box = store.mailbox(USER)
    assert "* 3 EXISTS" in out and "* OK [UNSEEN 1]" in out
    assert f"[UIDVALIDITY {box.uidvalidity}]" in out and "[UIDNEXT 4]" in out
    out = c.cmd("e EXAMINE INBOX")
    assert b"e OK [READ-ONLY]" in out
    assert c.cmd("s STORE 1 +FLAGS (\\Seen)").startswith(b"s NO")
    c.cmd("f FETCH 1 BODY[]")
    assert "\\Seen" not in store.mailbox(USER).get(1).flags  # EXAMINE never sets \Seen


def test_imap_status(store: Store) -> None:
    c = Client(store)
    c.login()
    out = c.cmd("s STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)").decode()
    v = store.mailbox(USER).uidvalidity
    # No session has selected INBOX yet: its three messages are all still recent.
    assert f'* STATUS "INBOX" (MESSAGES 3 RECENT 3 UIDNEXT 4 UIDVALIDITY {v} UNSEEN 2)' in out
    assert c.cmd("t STATUS INBOX (BOGUS)").startswith(b"t BAD")
    assert c.cmd("u STATUS Nope (MESSAGES)").startswith(b"u NO [NONEXISTENT]")


def test_imap_id_namespace_enable(store: Store) -> None:
    c = Client(store)
    assert b'* ID ("name" "roundtrip")' in c.cmd('i ID ("name" "test")')
    c.login()
    assert b'* NAMESPACE (("" "/")) NIL NIL' in c.cmd("n NAMESPACE")
    assert b"* ENABLED\r\ne OK" in c.cmd("e ENABLE CONDSTORE")


# SEARCH


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("ALL", "1 2 3"),
        ("SEEN", "2"),
        ("UNSEEN", "1 3"),
        ("FROM bob", "1 3"),
        ("FROM ZED@OTHER", "2"),
        ("TO alice", "1 2 3"),
        ("CC carol", "1 3"),
        ("BCC dave", "1 3"),
        ("SUBJECT quarterly", "1"),
        ('SUBJECT "annual report"', "3"),
        ("HEADER X-Token abc", "1 3"),
        ('HEADER X-Token ""', "1 3"),
        ("BODY numbers", "1 3"),
        ("TEXT Quarterly", "1"),
        ("TEXT numbers", "1 3"),
        ("SINCE 1-Mar-2024", "2 3"),
        ("BEFORE 1-Mar-2024", "1"),
        ("ON 15-Mar-2024", "2 3"),
        ("SENTSINCE 1-Feb-2024", "2"),
        ("SENTBEFORE 1-Feb-2024", "1 3"),
        ("SENTON 1-Jan-2024", "1 3"),
        ("LARGER 1000", "2"),
        ("SMALLER 1000", "1 3"),
        ("UID 2:*", "2 3"),
        ("2:3", "2 3"),
        ("NOT SEEN", "1 3"),
        ("OR SEEN SUBJECT annual", "2 3"),
        ("(FROM bob SUBJECT annual)", "3"),
        ("CHARSET UTF-8 SUBJECT report", "1 3"),
        ("CHARSET US-ASCII BODY numbers", "1 3"),
        ("DELETED", ""),
        ("KEYWORD $Important", ""),
        ("UNKEYWORD $Important", "1 2 3"),
    ],
)
def test_imap_search_keys(store: Store, query: str, expected: str) -> None:
    c = Client(store)
    c.select()
    out = c.cmd(f"s SEARCH {query}").decode()
    assert out.startswith(f"* SEARCH{' ' if expected else ''}{expected}\r\ns OK"), out


def test_imap_search_errors(store: Store) -> None:
    c = Client(store)
    c.select()
    assert c.cmd("a SEARCH CHARSET KOI8-R ALL").startswith(b"a NO [BADCHARSET")
    assert c.cmd("b SEARCH FROBNICATE").startswith(b"b BAD")
    assert c.cmd("c SEARCH SINCE 31-Feb-2024").startswith(b"c BAD")
    assert c.cmd("d SEARCH").startswith(b"d BAD")
    assert c.cmd("e SEARCH " + "NOT " * 200 + "ALL").startswith(b"e BAD")


def test_imap_uid_search_returns_uids(store: Store) -> None:
    c = Client(store)
    c.select()
    _notify(store, c)
    store.expunge(USER, "INBOX", [1])
    assert c.cmd("n NOOP").startswith(b"* 1 EXPUNGE\r\n")
    assert c.cmd("s UID SEARCH ALL").startswith(b"* SEARCH 2 3\r\n")
    assert c.cmd("t SEARCH ALL").startswith(b"* SEARCH 1 2\r\n")


def test_imap_search_literal_utf8_argument(store: Store) -> None:
    store.deliver(USER, b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhi\r\n")
    c = Client(store)
    c.select()
    word = "grüße".encode()
    assert c.cmd(b"s SEARCH CHARSET UTF-8 SUBJECT {%d}" % len(word)).startswith(b"+")
    assert c.send(word + b"\r\n").startswith(b"* SEARCH 4\r\n")


# FETCH


def test_imap_fetch_items(store: Store) -> None:
    c = Client(store)
    c.select()
    out = c.cmd("f FETCH 1 (FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE)")
    assert out.startswith(
        b'* 1 FETCH (FLAGS (\\Recent) UID 1 INTERNALDATE "01-Jan-2024 10:00:00 +0000"'
    )
    assert b"RFC822.SIZE %d" % len(PLAIN) in out
    assert b'"Quarterly report"' in out and b'"<one@example.test>"' in out
    out = c.cmd("g FETCH 1 (BODY BODYSTRUCTURE)")
    assert b'BODY ("TEXT" "PLAIN"' in out and b'BODYSTRUCTURE ("TEXT" "PLAIN"' in out
    header, _, text = PLAIN.partition(b"\r\n\r\n")
    out = c.cmd("h FETCH 1 (BODY.PEEK[HEADER] BODY.PEEK[TEXT] RFC822.HEADER)")
    assert b"BODY[HEADER] {%d}\r\n" % (len(header) + 4) in out
    assert b"BODY[TEXT] {%d}\r\n%s" % (len(text), text) in out
    assert b"RFC822.HEADER {%d}" % (len(header) + 4) in out
    out = c.cmd("i FETCH 1 BODY.PEEK[HEADER.FIELDS (Subject X-Token)]")
    assert (
        b"BODY[HEADER.FIELDS (Subject X-Token)] {46}\r\n"
        b"Subject: Quarterly report\r\nX-Token: abc123\r\n\r\n)"
    ) in out
    out = c.cmd("j FETCH 1 BODY.PEEK[HEADER.FIELDS.NOT (Subject)]")
    assert b"Quarterly" not in out and b"X-Token" in out
    out = c.cmd("k FETCH 1 BODY.PEEK[]<6.5>")
    assert b"BODY[]<6> {5}\r\nBob E" in out
    out = c.cmd("l FETCH 1 BODY.PEEK[1]")
    assert b"BODY[1] {%d}\r\n%s" % (len(text), text) in out
    assert "\\Seen" not in store.mailbox(USER).get(1).flags
    out = c.cmd("m FETCH 1 ALL")
    assert b"ENVELOPE" in out and b"BODY " not in out
    assert b"BODY (" in c.cmd("n FETCH 1 FULL")
    assert b"ENVELOPE" not in c.cmd("o FETCH 1 FAST")


def test_imap_fetch_body_sets_seen_and_reports_flags(store: Store) -> None:
    c = Client(store)
    c.select()
    out = c.cmd("f FETCH 1 BODY[TEXT]")
    assert b"FLAGS (\\Recent \\Seen)" in out
    assert "\\Seen" in store.mailbox(USER).get(1).flags
    out = c.cmd("g FETCH 3 RFC822")
    assert b"RFC822 {%d}" % len(store.mailbox(USER).get(3).raw) in out and b"\\Seen" in out


def test_imap_fetch_bad_items_and_sets(store: Store) -> None:
    c = Client(store)
    c.select()
    for bad in (
        "0 FLAGS",
        "abc FLAGS",
        "4 FLAGS",
        "1 BOGUS",
        "1 BODY[FOO]",
        "1 BODY[MIME]",
        "1 BODY[HEADER.FIELDS]",
        "1 (FLAGS",
        "1 BODY[]<0.0>",
    ):
        assert c.cmd(f"b FETCH {bad}").startswith(b"b BAD"), bad


def test_imap_huge_uid_set_returns_only_existing(store: Store) -> None:
    c = Client(store)
    c.select()
    out = c.cmd("u UID FETCH 1:4294967295 FLAGS")
    assert out.count(b" FETCH (") == 3 and out.endswith(b"u OK FETCH completed\r\n")
    assert c.cmd("v UID FETCH 4294967295:1 UID").count(b" FETCH (") == 3
    assert c.cmd("w FETCH *:1 UID").count(b" FETCH (") == 3
    assert c.cmd("x UID FETCH 99 FLAGS") == b"x OK FETCH completed\r\n"


class CountingMailbox:
    """A real mailbox, wrapped to count per-message reads."""

    def __init__(self, box: Any) -> None:
        self._box = box
        self.gets = 0

    def get(self, uid: int) -> Any:
        self.gets += 1
        return self._box.get(uid)

    def __len__(self) -> int:
        return len(self._box)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._box, name)


class CountingStore(Store):
    def __init__(self) -> None:
        super().__init__(clock=lambda: NOW)
        self.counter: CountingMailbox | None = None
        self.counting = False

    def mailbox(self, address: str, name: str = "INBOX") -> Any:
        box = super().mailbox(address, name)
        if not self.counting:
            return box
        self.counter = CountingMailbox(box)
        return self.counter


def test_imap_uid_fetch_of_one_message_does_not_touch_the_others() -> None:
    store = CountingStore()
    store.add_user(USER, PASSWORD)
    for _ in range(2000):
        store.deliver(USER, b"Subject: s\r\n\r\nb\r\n", flags={"\\Seen"})
    store.counting = True
    c = Client(store)
    c.login()
    c.cmd("s SELECT INBOX")
    assert store.counter is not None
    store.counter.gets = 0
    out = c.cmd("f UID FETCH 1500 (FLAGS BODY.PEEK[])")
    assert out.count(b" FETCH (") == 1
    assert store.counter.gets <= 2


# STORE, COPY, MOVE, EXPUNGE


def test_imap_store_flags(store: Store) -> None:
    c = Client(store)
    c.select()
    # The new keyword is announced in FLAGS before a FETCH shows it (RFC 3501 7.2.6).
    assert c.cmd("a STORE 1 +FLAGS (\\Flagged $Work)").startswith(
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)\r\n"
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)]"
    )
    assert c.cmd("b STORE 1 -FLAGS \\Flagged").startswith(b"* 1 FETCH (FLAGS ($Work \\Recent))")
    assert c.cmd("c STORE 1:2 FLAGS.SILENT (\\Answered)") == b"c OK STORE completed\r\n"
    assert c.cmd("d UID STORE 2 +FLAGS (\\Draft)").startswith(
        b"* 2 FETCH (FLAGS (\\Answered \\Draft \\Recent) UID 2)"
    )
    assert store.mailbox(USER).get(1).flags == {"\\Answered"}
    assert c.cmd("e STORE 1 +FLAGS (\\Bogus)").startswith(b"e BAD")
    assert c.cmd("f STORE 1 REPLACE (x)").startswith(b"f BAD")


def test_imap_expunge_and_uid_expunge(store: Store) -> None:
    c = Client(store)
    c.select()
    c.cmd("a STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    out = c.cmd("b UID EXPUNGE 2")
    assert out == b"* 2 EXPUNGE\r\nb OK EXPUNGE completed\r\n"
    out = c.cmd("c EXPUNGE")
    assert out == b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nc OK EXPUNGE completed\r\n"
    assert len(store.mailbox(USER)) == 0


def test_imap_close_expunges_unselect_does_not(store: Store) -> None:
    c = Client(store)
    c.select()
    c.cmd("a STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert c.cmd("b UNSELECT") == b"b OK UNSELECT completed\r\n"
    assert len(store.mailbox(USER)) == 3
    c.cmd("s SELECT INBOX")
    assert c.cmd("c CLOSE") == b"c OK CLOSE completed\r\n"
    assert len(store.mailbox(USER)) == 2
    assert c.conn.state is IMAPState.AUTHENTICATED


def test_imap_copy_and_move_with_uidplus(store: Store) -> None:
    c = Client(store)
    c.select()
    trash = store.mailbox(USER, "Trash")
    out = c.cmd("a COPY 1:2 Trash")
    assert out == f"a OK [COPYUID {trash.uidvalidity} 1:2 1:2] COPY completed\r\n".encode()
    out = c.cmd("b UID MOVE 3 Trash")
    assert (
        out
        == (
            f"* OK [COPYUID {trash.uidvalidity} 3 3] Moved\r\n"
            "* 3 EXPUNGE\r\nb OK MOVE completed\r\n"
        ).encode()
    )
    assert c.cmd("c COPY 1 Nowhere").startswith(b"c NO [TRYCREATE]")
    assert c.cmd("d MOVE 1 ../etc").startswith((b"d NO", b"d BAD"))
    assert len(trash) == 3 and len(store.mailbox(USER)) == 2


# Several sessions on one mailbox


def _notify(store: Store, *clients: Client) -> None:
    """Forward store changes to the machines, as the adapter does."""

    def forward(change: StoreChange) -> None:
        for client in clients:
            client.conn.on_store_change(change)

    store.add_listener(forward)


def test_imap_two_sessions_see_each_others_expunge_and_flags(store: Store) -> None:
    a, b = Client(store), Client(store)
    a.select()
    b.select()
    _notify(store, a, b)
    a.cmd("x STORE 2 +FLAGS.SILENT (\\Flagged)")
    assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Seen))" in b.cmd("n NOOP")
    assert b"FETCH" not in a.cmd("n NOOP")  # a's own change is not echoed back
    a.cmd("y STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd("z EXPUNGE")
    # No EXPUNGE while answering FETCH (RFC 3501 7.4.1); the vanished message is skipped.
    out = b.cmd("f FETCH 1:2 UID")
    assert b"EXPUNGE" not in out and out.startswith(b"* 2 FETCH (UID 2)")
    out = b.cmd("n2 NOOP")
    assert out.startswith(b"* 1 EXPUNGE\r\n")
    assert b.cmd("s SEARCH ALL").startswith(b"* SEARCH 1 2\r\n")
    store.deliver(USER, b"Subject: new\r\n\r\nx\r\n")
    assert b"* 3 EXISTS" in a.cmd("n3 NOOP")
    assert b"* 3 EXISTS" in b.cmd("n3 NOOP")


def test_imap_idle_reports_new_mail_at_once(store: Store) -> None:
    c = Client(store)
    c.select()
    _notify(store, c)
    assert c.cmd("i IDLE") == b"+ idling\r\n"
    store.deliver(USER, b"Subject: ping\r\n\r\n.\r\n")
    assert c.conn.data_to_send() == b"* 4 EXISTS\r\n* 4 RECENT\r\n"
    store.expunge(USER, "INBOX", [1])
    assert c.conn.data_to_send() == b"* 1 EXPUNGE\r\n"
    assert c.cmd("DONE") == b"i OK IDLE terminated\r\n"
    assert c.cmd("n NOOP") == b"n OK NOOP completed\r\n"


def test_imap_idle_without_done_is_bad(store: Store) -> None:
    c = Client(store)
    c.select()
    c.cmd("i IDLE")
    assert c.cmd("x NOOP").startswith(b"i BAD")


def test_imap_changes_in_other_mailboxes_or_users_are_ignored(store: Store) -> None:
    store.add_user("bob@example.test", "pw")
    c = Client(store)
    c.select()
    _notify(store, c)
    store.deliver("bob@example.test", b"Subject: x\r\n\r\n")
    store.deliver(USER, b"Subject: x\r\n\r\n", mailbox="Sent")
    assert c.cmd("n NOOP") == b"n OK NOOP completed\r\n"


def test_imap_logout_and_timeout(store: Store) -> None:
    c = Client(store)
    assert c.cmd("l LOGOUT") == b"* BYE Logging out\r\nl OK LOGOUT completed\r\n"
    assert ConnectionClosed() in c.events
    d = Client(store)
    d.conn.timed_out()
    assert d.conn.data_to_send() == b"* BYE Autologout; idle for too long\r\n"
    assert d.conn.state is IMAPState.LOGOUT
    assert d.send(b"") == b""


# Security: LIST wildcards in linear time, RENAME under itself, APPEND header limits
# (docs/security.md)


@pytest.fixture(params=["memory", "maildir"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The test store in memory and in a Maildir tree: RENAME must behave the same."""
    if request.param == "memory":
        yield make_store()
        return
    maildir = MaildirStore(tmp_path / "mail", clock=lambda: NOW)
    try:
        yield make_store(maildir)
    finally:
        maildir.close()


def _regex_list_match(pattern: str, name: str) -> bool:
    """The LIST matcher this module had before ListPattern: the oracle for its semantics."""
    regex = re.compile(
        "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
        + r"\Z",
        re.DOTALL,
    )
    return regex.match(name) is not None


@settings(max_examples=3000, deadline=None)
@given(
    pattern=st.text(alphabet="ab/*%.\n\u00fc", max_size=9),
    name=st.text(alphabet="ab/*%.\n\u00fc", max_size=9),
)
def test_imap_list_pattern_matches_as_the_regular_expression_did(pattern: str, name: str) -> None:
    assert ListPattern(pattern).matches(name) is _regex_list_match(pattern, name)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*", "a/b/c", True),
        ("%", "a/b", False),
        ("a/%", "a/b", True),
        ("a/%", "a/b/c", False),
        ("a/*", "a/b/c", True),
        ("a%*%c", "a/b/c", True),
        ("a%%%c", "a/b/c", False),
        ("*" * 200 + "x", "y" * 1000, False),
        ("%y" * 600, "y" * 1000, True),
        ("%y" * 1001, "y" * 1000, False),  # more literals than the name has characters
        ("", "", True),
        ("", "a", False),
    ],
    ids=lambda v: repr(v)[:20] if isinstance(v, str) else None,
)
def test_imap_list_pattern_examples(pattern: str, name: str, matches: bool) -> None:
    assert ListPattern(pattern).matches(name) is matches


@pytest.mark.parametrize("wildcard", ["*", "%"])
def test_imap_list_many_wildcards_answers_at_once(store: Store, wildcard: str) -> None:
    # A backtracking regular expression needed k**n steps for n wildcards: 40 stars took
    # 1.5 s, 100 never finished and blocked every session of the event loop.
    c = Client(store)
    c.login()
    assert c.cmd("c CREATE Tax/2024").startswith(b"c OK")
    assert c.cmd("s SUBSCRIBE Tax/2024").startswith(b"s OK")
    start = time.perf_counter()
    out = c.cmd(f'l LIST "" "{wildcard * 100}x"').decode()
    elapsed = time.perf_counter() - start
    assert out.endswith("l OK LIST completed\r\n")
    assert elapsed < 0.5, f"LIST took {elapsed:.3f} s"
    # Semantics kept: "Tax" ends with x; "Tax/2024" and INBOX do not.
    assert out.count("* LIST") == 1 and '"Tax"' in out, out
    out = c.cmd(f'l2 LSUB "" "{wildcard * 100}4"').decode()
    assert out.endswith("l2 OK LSUB completed\r\n")
    assert ('"Tax/2024"' in out) is (wildcard == "*"), out


@pytest.mark.parametrize(
    "line",
    [
        b"a" * 60_000 + b"( NOOP",  # tag
        b"f FETCH " + b"1," * 30_000 + b"x FLAGS",  # sequence set
        b"f FETCH " + b"1:2," * 15_000 + b": FLAGS",
        b"f FETCH 1 BODY.PEEK[" + b"x" * 60_000,  # section
        b"s STORE 1 +FLAGS (" + b"k" * 60_000 + b"[)",  # keyword
        b'h SEARCH HEADER Message-ID "<' + b"a" * 30_000 + b"@" + b"b" * 30_000 + b'"',
        b"a APPEND INBOX " + b"{1" * 30_000,  # literal announcement
        b'l LIST "" "' + b"%a" * 30_000 + b'"',
    ],
    ids=["tag", "sequence", "ranges", "section", "keyword", "msgid", "literal", "list"],
)
def test_imap_hostile_command_lines_answer_at_once(store: Store, line: bytes) -> None:
    # The regular expressions of the IMAP machine (docs/security.md) on lines near the limit.
    c = Client(store)
    c.select()
    start = time.perf_counter()
    out = c.cmd(line)
    elapsed = time.perf_counter() - start
    assert re.search(rb"^(\S+ )?(OK|NO|BAD)", out, re.MULTILINE), out[-200:]
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    assert c.cmd("n NOOP").startswith(b"n OK")


def test_imap_rename_under_itself_is_refused(any_store: Store) -> None:
    store = any_store
    c = Client(store)
    c.login()
    assert c.cmd("a CREATE p").startswith(b"a OK")
    assert c.cmd("b CREATE p/x").startswith(b"b OK")
    assert c.cmd("b2 CREATE INBOX/a").startswith(b"b2 OK")
    before = sorted(b.name for b in store.mailboxes(USER))
    for i, (old, new) in enumerate(
        [
            ("p", "p/q/r"),
            ("p", "p/x/y"),
            ("p", "p/q"),
            ("Trash", "Trash/x"),
            ("p/x", "p/x/z"),
            ("inbox/a", "INBOX/a/b"),
        ]
    ):
        out = c.cmd(f'r{i} RENAME "{old}" "{new}"')
        assert out.startswith(b"r%d NO [CANNOT]" % i), (old, new, out)
    assert sorted(b.name for b in store.mailboxes(USER)) == before
    assert store.mailbox(USER, "Trash").special_use == "\\Trash"
    assert c.cmd("n NOOP").startswith(b"n OK")


def test_imap_rename_to_a_sibling_or_out_of_inbox_still_works(any_store: Store) -> None:
    store = any_store
    c = Client(store)
    c.login()
    assert c.cmd("a CREATE p").startswith(b"a OK") and c.cmd("a2 CREATE p/x").startswith(b"a2 OK")
    # "pq" starts with "p" but is no child of it.
    assert c.cmd("b RENAME p pq").startswith(b"b OK")
    assert c.cmd("c RENAME pq/x pq/y").startswith(b"c OK")
    assert c.cmd("d RENAME pq p/q").startswith(b"d OK")
    names = {b.name for b in store.mailboxes(USER)}
    assert {"p/q", "p/q/y"} <= names and not names & {"p", "pq", "pq/y"}
    # RFC 3501 6.3.5: renaming INBOX moves its messages, even into a child of INBOX.
    assert c.cmd("e RENAME INBOX INBOX/old").startswith(b"e OK")
    assert len(store.mailbox(USER, "INBOX/old")) == 3 and len(store.mailbox(USER, "INBOX")) == 0


def test_imap_rename_inbox_expunges_in_a_session_that_has_it_selected(any_store: Store) -> None:
    """RFC 3501 6.3.5 and 7.4.1: INBOX stays and its messages leave; a session with INBOX
    selected hears them expunged, and then sees a new delivery as the only message."""
    store = any_store
    watcher, renamer = Client(store), Client(store)
    assert b"* 3 EXISTS" in watcher.select()
    _notify(store, watcher)
    renamer.login()
    assert renamer.cmd("r RENAME INBOX Archive").startswith(b"r OK")
    out = watcher.cmd("n NOOP")
    assert out.count(b" EXPUNGE\r\n") == 3 and out.endswith(b"n OK NOOP completed\r\n"), out
    assert watcher.cmd("f UID FETCH 1:* (UID)") == b"f OK FETCH completed\r\n"  # no ghost
    store.deliver(USER, b"Subject: new\r\n\r\nbody\r\n")
    out = watcher.cmd("m NOOP")
    assert b"* 1 EXISTS" in out, out
    # The twin: a session that has the renamed folder's new name selected sees all three.
    reader = Client(store)
    assert b"* 3 EXISTS" in reader.select("Archive")


def test_imap_selected_mailbox_deleted_elsewhere_ends_the_session(any_store: Store) -> None:
    """A mailbox deleted (and maybe created anew) by another session is gone with its UIDs:
    the session that had it selected gets a BYE and ends, instead of showing the old
    messages and never hearing of new ones."""
    store = any_store
    store.create_mailbox(USER, "F")
    store.deliver(USER, b"Subject: old\r\n\r\nbody\r\n", mailbox="F")
    watcher, other = Client(store), Client(store)
    assert b"* 1 EXISTS" in watcher.select("F")
    _notify(store, watcher)
    other.login()
    assert other.cmd("d DELETE F").startswith(b"d OK")
    assert watcher.conn.ended
    assert watcher.conn.data_to_send() == (
        b"* BYE Selected mailbox was deleted, have to disconnect.\r\n"
    )
    assert other.cmd("c CREATE F").startswith(b"c OK")
    assert watcher.cmd("n NOOP") == b""  # nothing more is read


def test_imap_other_mailboxes_created_or_deleted_leave_the_session_be(any_store: Store) -> None:
    store = any_store
    store.create_mailbox(USER, "F")
    store.create_mailbox(USER, "G")
    watcher, other = Client(store), Client(store)
    watcher.select("F")
    _notify(store, watcher)
    other.login()
    assert other.cmd("d DELETE G").startswith(b"d OK")
    assert other.cmd("c CREATE H").startswith(b"c OK")
    assert other.cmd("r RENAME H F/sub").startswith(b"r OK")
    assert not watcher.conn.ended
    assert watcher.cmd("n NOOP").endswith(b"n OK NOOP completed\r\n")


def _big_field_message(field_size: int) -> bytes:
    """A message whose X-Big field (folded lines together) is exactly ``field_size`` octets."""
    head = b"X-Big: "
    lines = [head + b"y" * 70]
    size = len(lines[0]) + 2
    while size + 72 <= field_size:
        lines.append(b" " + b"y" * 69)
        size += 72
    lines[-1] += b"y" * (field_size - size)
    return b"From: a@example.test\r\n" + b"\r\n".join(lines) + b"\r\n\r\nbody\r\n"


def _append(c: Client, tag: str, message: bytes) -> bytes:
    out = c.cmd(f"{tag} APPEND INBOX {{{len(message)}}}")
    assert out == b"+ Ready for literal data\r\n", out
    return c.send(message + b"\r\n")


def test_imap_append_refuses_a_header_field_smtp_refuses(store: Store) -> None:
    c = Client(store)
    c.login()
    out = _append(c, "a", _big_field_message(102_401))
    assert out.startswith(b"a NO [LIMIT] ") and b"102400" in out, out
    assert len(store.mailbox(USER)) == 3
    assert c.cmd("n NOOP").startswith(b"n OK")
    assert _append(c, "b", _big_field_message(102_400)).startswith(b"b OK [APPENDUID")
    assert len(store.mailbox(USER)) == 4


def test_imap_append_refuses_more_received_fields_than_smtp(store: Store) -> None:
    c = Client(store)
    c.login()
    hop = b"Received: from a.example.test by b.example.test; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    out = _append(c, "a", hop * 51 + b"Subject: loop\r\n\r\nbody\r\n")
    assert out.startswith(b"a NO [LIMIT] ") and b"Received" in out, out
    # The finding: a 1 MB header block of 100,000 fields.
    out = _append(c, "b", b"Received: x\r\n" * 100_000 + b"\r\nbody\r\n")
    assert out.startswith(b"b NO [LIMIT] "), out[:200]
    assert len(store.mailbox(USER)) == 3
    out = _append(c, "c", hop * 50 + b"Subject: fifty hops\r\n\r\nbody\r\n")
    assert out.startswith(b"c OK [APPENDUID"), out


def test_imap_append_header_limits_follow_the_arguments(store: Store) -> None:
    c = Client(store, max_header_size=1000, max_hops=1)
    c.login()
    assert _append(c, "a", _big_field_message(1001)).startswith(b"a NO [LIMIT]")
    assert _append(c, "b", _big_field_message(1000)).startswith(b"b OK")
    hop = b"Received: from a by b; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    assert _append(c, "c", hop * 2 + b"\r\nx\r\n").startswith(b"c NO [LIMIT]")
    off = Client(store, max_header_size=0, max_hops=0)
    off.login()
    assert _append(off, "d", hop * 60 + _big_field_message(200_000)).startswith(b"d OK")


# The error channel: a MIME bug of ours is reported, the client still gets an answer


def _boom(*args: object, **kwargs: object) -> Any:
    raise ValueError("a bug of ours")


def test_imap_fetch_reports_a_mime_bug_and_answers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    bugs: list[BaseException] = []
    c = Client(store, on_error=bugs.append)
    c.select()
    monkeypatch.setattr(_mime, "render_body", _boom)
    out = c.cmd("f FETCH 1 (BODYSTRUCTURE ENVELOPE)")
    assert out.startswith(b'* 1 FETCH (BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "US-ASCII")')
    assert b' ENVELOPE ("Mon, 01 Jan 2024 10:00:00 +0000" "Quarterly report" ' in out
    assert out.endswith(b"f OK FETCH completed\r\n"), out
    assert [str(b) for b in bugs] == ["a bug of ours"]
    # The parser itself: one report for the message, then its memoised fallback tree.
    monkeypatch.setattr(_mime, "_parse_entity", _boom)
    out = c.cmd("g FETCH 2 (BODY[1] BODY[HEADER.FIELDS (SUBJECT)])")
    assert b"g OK FETCH completed" in out and len(bugs) == 2
    assert c.cmd("h FETCH 2 BODY[1.MIME]").endswith(b"h OK FETCH completed\r\n")
    assert len(bugs) == 2


def test_imap_search_reports_a_mime_bug_and_answers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    bugs: list[BaseException] = []
    c = Client(store, on_error=bugs.append)
    c.select()
    monkeypatch.setattr(_mime, "body_text", _boom)
    monkeypatch.setattr(_mime, "decode_words", _boom)
    out = c.cmd("s SEARCH OR BODY numbers SUBJECT lunch")
    assert out == b"* SEARCH\r\ns OK SEARCH completed\r\n"
    assert len(bugs) == 6 and all(isinstance(b, ValueError) for b in bugs)


def test_imap_mime_bug_without_a_channel_still_answers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Client(store)
    c.select()
    monkeypatch.setattr(_mime, "render_body", _boom)
    assert c.cmd("f FETCH 1 BODY").endswith(b"f OK FETCH completed\r\n")


def test_imap_hostile_mime_is_answered_without_a_bug_report(store: Store) -> None:
    bugs: list[BaseException] = []
    c = Client(store, on_error=bugs.append)
    c.login()
    deep = b"Subject: deep\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"leaf\r\n"
    odd = (
        b"Date: Mon, 99 Foo 99999 25:61:61 +9999\r\nSubject: =?x-nope?B?!!!?=\r\n"
        b"Content-Type: text/plain; charset=zlib\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n%%%not base64%%%\r\n"
    )
    for n, raw in enumerate((deep, odd)):
        assert _append(c, f"a{n}", raw).startswith(b"a%d OK" % n)
    c.cmd("s SELECT INBOX")
    out = c.cmd("f FETCH 4:5 (BODYSTRUCTURE ENVELOPE BODY[1.1.1] BODY[TEXT])")
    assert b'"APPLICATION" "OCTET-STREAM"' in out and b"f OK FETCH completed" in out
    # Every key reads messages 4 and 5 (no OR branch matches them).
    out = c.cmd("s SEARCH OR SENTON 1-Jan-2024 OR BODY numbers SUBJECT Quarterly")
    assert out == b"* SEARCH 1 3\r\ns OK SEARCH completed\r\n"
    assert bugs == []
