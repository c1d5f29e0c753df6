"""POP3Connection, bytes in and bytes out: no sockets, no loop, a real Store."""

from __future__ import annotations

import base64

import pytest

from roundtrip.errors import LocalProtocolError, RemoteProtocolError, StorageError
from roundtrip.protocols._lines import ConnectionClosed, StartTLSRequested
from roundtrip.protocols.pop3 import POP3Connection, POP3State
from roundtrip.store import Mailbox, Store

USER = "alice@example.test"
PASSWORD = "s3cret pass"  # with a space: PASS takes the rest of the line

MSG1 = b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n.dot line\r\nline 3\r\n"
MSG2 = b"Subject: two\r\n\r\nbody\r\n"
MSG3 = b"Subject: bare\n\nlf only\n.x"  # bare LFs, no final newline

PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
)
AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"


@pytest.fixture
def store() -> Store:
    store = Store()
    store.add_user(USER, PASSWORD)
    store.add_user("carol@example.test", "other")
    for raw in (MSG1, MSG2, MSG3):
        store.deliver(USER, raw)
    return store


def connect(
    store: Store,
    *,
    secure: bool = True,
    starttls: bool = False,
    allow_plaintext_auth: bool = False,
    max_bad_commands: int = 3,
) -> POP3Connection:
    conn = POP3Connection(
        store,
        hostname="pop.example.test",
        secure=secure,
        starttls_available=starttls,
        allow_plaintext_auth=allow_plaintext_auth,
        max_bad_commands=max_bad_commands,
    )
    greeting = conn.data_to_send()
    assert greeting.startswith(b"+OK ") and greeting.endswith(b"\r\n")
    return conn


def talk(conn: POP3Connection, data: bytes) -> bytes:
    conn.receive_data(data)
    return conn.data_to_send()


def login(store: Store, **kwargs: bool) -> POP3Connection:
    conn = connect(store, **kwargs)
    assert talk(conn, f"USER {USER}\r\n".encode()) == b"+OK\r\n"
    reply = talk(conn, f"PASS {PASSWORD}\r\n".encode())
    assert reply.startswith(b"+OK "), reply
    return conn


def inbox(store: Store) -> Mailbox:
    return store.mailbox(USER, "INBOX")


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


# Greeting, CAPA


def test_pop3_greeting_names_host(store: Store) -> None:
    conn = POP3Connection(store, hostname="pop.example.test", secure=True, starttls_available=False)
    assert conn.data_to_send() == b"+OK pop.example.test roundtrip POP3 server ready\r\n"
    assert conn.state is POP3State.AUTHORIZATION


def test_pop3_hostname_with_line_break_refused(store: Store) -> None:
    with pytest.raises(LocalProtocolError):
        POP3Connection(store, hostname="x\r\n+OK", secure=True, starttls_available=False)


def capa(conn: POP3Connection) -> list[bytes]:
    reply = talk(conn, b"CAPA\r\n")
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2:] == [b".", b""]
    return lines[1:-2]


def test_pop3_capa_secure_offers_login_not_stls(store: Store) -> None:
    caps = capa(connect(store, secure=True, starttls=False))
    for cap in (
        b"TOP",
        b"UIDL",
        b"USER",
        b"SASL PLAIN XOAUTH2 OAUTHBEARER",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
    ):
        assert cap in caps
    assert b"PIPELINING" in caps and b"IMPLEMENTATION roundtrip" in caps
    assert b"STLS" not in caps


def test_pop3_capa_plaintext_offers_stls_not_login(store: Store) -> None:
    caps = capa(connect(store, secure=False, starttls=True))
    assert b"STLS" in caps
    assert b"USER" not in caps and b"SASL PLAIN" not in caps


def test_pop3_capa_plaintext_allowed_offers_login(store: Store) -> None:
    caps = capa(connect(store, secure=False, starttls=False, allow_plaintext_auth=True))
    assert b"USER" in caps and b"SASL PLAIN XOAUTH2 OAUTHBEARER" in caps and b"STLS" not in caps


def test_pop3_capa_in_transaction(store: Store) -> None:
    caps = capa(login(store))
    assert b"UIDL" in caps and b"STLS" not in caps


# USER / PASS


def test_pop3_user_pass_logs_in(store: Store) -> None:
    conn = connect(store)
    assert talk(conn, f"USER {USER}\r\n".encode()) == b"+OK\r\n"
    reply = talk(conn, f"PASS {PASSWORD}\r\n".encode())
    assert reply.startswith(b"+OK maildrop has 3 messages")
    assert conn.state is POP3State.TRANSACTION
    assert conn.user == USER


@pytest.mark.parametrize(
    ("user", "password"),
    [(USER, "wrong"), ("nobody@example.test", PASSWORD), (USER, ""), (USER, PASSWORD + " ")],
)
def test_pop3_login_failure_same_reply(store: Store, user: str, password: str) -> None:
    conn = connect(store)
    talk(conn, f"USER {user}\r\n".encode())
    reply = talk(conn, f"PASS {password}\r\n".encode())
    assert reply == AUTH_FAILED
    assert conn.state is POP3State.AUTHORIZATION
    assert store.lock_maildrop(USER)  # a failed login takes no lock


def test_pop3_login_retry_after_failure(store: Store) -> None:
    conn = connect(store)
    talk(conn, f"USER {USER}\r\n".encode())
    assert talk(conn, b"PASS nope\r\n") == AUTH_FAILED
    # The failed PASS forgot the USER: PASS again alone is refused.
    assert talk(conn, f"PASS {PASSWORD}\r\n".encode()).startswith(b"-ERR")
    talk(conn, f"USER {USER}\r\n".encode())
    assert talk(conn, f"PASS {PASSWORD}\r\n".encode()).startswith(b"+OK")


def test_pop3_pass_before_user_refused(store: Store) -> None:
    conn = connect(store)
    assert talk(conn, f"PASS {PASSWORD}\r\n".encode()).startswith(b"-ERR")
    assert conn.state is POP3State.AUTHORIZATION


def test_pop3_password_never_echoed(store: Store) -> None:
    conn = connect(store)
    secret = "Hunter2-unique-secret"
    out = talk(conn, f"USER {USER}\r\nPASS {secret}\r\nPASS {secret}\r\n".encode())
    out += talk(conn, b"AUTH PLAIN " + plain("", USER, secret) + b"\r\n")
    out += talk(conn, f"XYZZY {secret}\r\n".encode())
    assert secret.encode() not in out
    assert plain("", USER, secret) not in out


@pytest.mark.parametrize(
    "line",
    [f"USER {USER}", f"PASS {PASSWORD}", "AUTH PLAIN " + plain("", USER, PASSWORD).decode()],
)
def test_pop3_login_refused_before_tls(store: Store, line: str) -> None:
    conn = connect(store, secure=False, starttls=True)
    assert talk(conn, line.encode() + b"\r\n") == PLAINTEXT_REFUSED
    assert conn.state is POP3State.AUTHORIZATION


def test_pop3_login_allowed_before_tls_when_configured(store: Store) -> None:
    login(store, secure=False, allow_plaintext_auth=True)


# AUTH PLAIN (RFC 5034)


def test_pop3_auth_plain_initial_response(store: Store) -> None:
    conn = connect(store)
    reply = talk(conn, b"AUTH PLAIN " + plain("", USER, PASSWORD) + b"\r\n")
    assert reply.startswith(b"+OK ")
    assert conn.state is POP3State.TRANSACTION


def test_pop3_auth_plain_continuation(store: Store) -> None:
    conn = connect(store)
    assert talk(conn, b"auth plain\r\n") == b"+ \r\n"
    reply = talk(conn, plain(USER, USER, PASSWORD) + b"\r\n")
    assert reply.startswith(b"+OK ")
    assert conn.state is POP3State.TRANSACTION


def test_pop3_auth_without_mechanism_lists_plain(store: Store) -> None:
    conn = connect(store)
    assert talk(conn, b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"AUTH PLAIN " + plain("", USER, "wrong")], AUTH_FAILED),
        ([b"AUTH PLAIN " + plain("", "nobody@example.test", PASSWORD)], AUTH_FAILED),
        ([b"AUTH PLAIN " + plain("carol@example.test", USER, PASSWORD)], AUTH_FAILED),
        ([b"AUTH PLAIN ="], AUTH_FAILED),
        ([b"AUTH PLAIN", b"*"], b"-ERR [AUTH] authentication cancelled\r\n"),
        ([b"AUTH PLAIN", b"not base64!"], b"-ERR invalid base64 in SASL response\r\n"),
        ([b"AUTH CRAM-MD5"], b"-ERR unsupported authentication mechanism\r\n"),
    ],
)
def test_pop3_auth_plain_failures(store: Store, lines: list[bytes], expected: bytes) -> None:
    conn = connect(store)
    out = b"".join(talk(conn, line + b"\r\n") for line in lines)
    assert out.endswith(expected)
    assert conn.state is POP3State.AUTHORIZATION


def test_pop3_auth_continuation_is_not_a_command(store: Store) -> None:
    conn = connect(store)
    talk(conn, b"AUTH PLAIN\r\n")
    # A command sent where the SASL response belongs is a bad response, not a QUIT.
    assert talk(conn, b"QUIT\r\n").startswith(b"-ERR")
    assert conn.state is POP3State.AUTHORIZATION


# Maildrop lock (RFC 1939 section 8, RFC 2449 IN-USE)


def test_pop3_second_session_in_use(store: Store) -> None:
    first = login(store)
    second = connect(store)
    talk(second, f"USER {USER}\r\n".encode())
    reply = talk(second, f"PASS {PASSWORD}\r\n".encode())
    assert reply.startswith(b"-ERR [IN-USE] ")
    assert second.state is POP3State.AUTHORIZATION
    talk(first, b"QUIT\r\n")
    login(store)  # free again after QUIT


def test_pop3_lock_released_on_eof(store: Store) -> None:
    conn = login(store)
    assert conn.receive_data(b"") == [ConnectionClosed()]
    assert conn.receive_data(b"") == []  # idempotent
    login(store)


# Transaction commands


def test_pop3_stat_list_sizes(store: Store) -> None:
    conn = login(store)
    sizes = [len(MSG1), len(MSG2), len(MSG3.replace(b"\n", b"\r\n")) + 2]
    assert talk(conn, b"STAT\r\n") == f"+OK 3 {sum(sizes)}\r\n".encode()
    listing = b"".join(f"{n} {s}\r\n".encode() for n, s in enumerate(sizes, 1))
    assert talk(conn, b"LIST\r\n") == (
        f"+OK 3 messages ({sum(sizes)} octets)\r\n".encode() + listing + b".\r\n"
    )
    assert talk(conn, b"LIST 2\r\n") == f"+OK 2 {sizes[1]}\r\n".encode()


def test_pop3_retr_dot_stuffs_and_terminates(store: Store) -> None:
    conn = login(store)
    reply = talk(conn, b"RETR 1\r\n")
    assert reply == (
        f"+OK {len(MSG1)} octets\r\n".encode()
        + b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n..dot line\r\nline 3\r\n"
        + b".\r\n"
    )


def test_pop3_retr_size_matches_wire_for_bare_lf(store: Store) -> None:
    conn = login(store)
    size = int(talk(conn, b"LIST 3\r\n").split()[2])
    reply = talk(conn, b"RETR 3\r\n")
    body = reply.split(b"\r\n", 1)[1].removesuffix(b".\r\n")
    assert body == b"Subject: bare\r\n\r\nlf only\r\n..x\r\n"
    assert size == len(body) - 1  # one stuffed dot is not part of the size


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: cr\r\n\r\nends in a bare CR\r",  # dot-stuffing adds only the LF
        b"Subject: cr\r\n\r\nbare CR\rinside\r",
        b"Subject: none\r\n\r\nno final line end",  # gets a whole CRLF
        b"Subject: lf\n\nbare LF\n",
        b"Subject: crlf\r\n\r\n.dot\r\n",
        b"Subject: mixed\r\n\nx\r\ny\n\r",
    ],
)
def test_pop3_list_and_stat_count_the_octets_retr_sends(raw: bytes) -> None:
    # RFC 1939 section 5: LIST and STAT give the exact size of the message as RETR sends it
    # (line ends as CRLF, before dot-stuffing). A final bare CR gets an LF, not a CRLF.
    store = Store()
    store.add_user(USER, PASSWORD)
    store.deliver(USER, raw)
    conn = login(store)
    size = int(talk(conn, b"LIST 1\r\n").split()[2])
    stat = int(talk(conn, b"STAT\r\n").split()[2])
    body = talk(conn, b"RETR 1\r\n").split(b"\r\n", 1)[1].removesuffix(b".\r\n")
    unstuffed = b"\r\n".join(
        line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n")
    )
    assert size == stat == len(unstuffed)


def test_pop3_uidl_stable_across_sessions(store: Store) -> None:
    conn = login(store)
    first = talk(conn, b"UIDL\r\n")
    single = talk(conn, b"UIDL 2\r\n")
    talk(conn, b"QUIT\r\n")
    conn = login(store)
    assert talk(conn, b"UIDL\r\n") == first
    box = inbox(store)
    expected = f"+OK 2 {box.uidvalidity}.{box.uids()[1]}\r\n".encode()
    assert single == expected
    ids = [line.split()[1] for line in first.split(b"\r\n")[1:-2]]
    assert len(set(ids)) == 3
    assert all(0 < len(i) <= 70 and all(0x21 <= c <= 0x7E for c in i) for i in ids)


def test_pop3_uidl_of_remaining_messages_unchanged_after_delete(store: Store) -> None:
    conn = login(store)
    before = talk(conn, b"UIDL 3\r\n").split()[2]
    talk(conn, b"DELE 1\r\nQUIT\r\n")
    conn = login(store)
    assert talk(conn, b"UIDL 2\r\n").split()[2] == before


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (0, b"From: bob@example.test\r\nSubject: one\r\n\r\n"),
        (2, b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n..dot line\r\n"),
        (99, b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n..dot line\r\nline 3\r\n"),
    ],
)
def test_pop3_top(store: Store, lines: int, expected: bytes) -> None:
    conn = login(store)
    reply = talk(conn, f"TOP 1 {lines}\r\n".encode())
    assert reply == b"+OK top of message follows\r\n" + expected + b".\r\n"


def test_pop3_noop(store: Store) -> None:
    assert talk(login(store), b"NOOP\r\n") == b"+OK\r\n"


def test_pop3_pipelined_commands_answered_in_order(store: Store) -> None:
    conn = login(store)
    reply = talk(conn, b"NOOP\r\nSTAT\r\nLIST 1\r\n")
    lines = reply.split(b"\r\n")
    assert lines[0] == b"+OK" and lines[1].startswith(b"+OK 3 ") and lines[2].startswith(b"+OK 1 ")


def test_pop3_byte_at_a_time(store: Store) -> None:
    conn = connect(store)
    out = b""
    for byte in f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode():
        out += talk(conn, bytes([byte]))
    assert out.count(b"+OK") == 3


# Message numbers and arguments (docs/security.md A7.4)


@pytest.mark.parametrize("command", ["RETR", "LIST", "UIDL", "DELE", "TOP"])
@pytest.mark.parametrize("number", ["0", "-1", "4", "99999999999999999999", "abc", "1x", "²"])
def test_pop3_bad_message_number(store: Store, command: str, number: str) -> None:
    conn = login(store)
    suffix = " 1" if command == "TOP" else ""
    reply = talk(conn, f"{command} {number}{suffix}\r\n".encode())
    assert reply.startswith(b"-ERR ") and reply.count(b"\r\n") == 1
    assert conn.state is POP3State.TRANSACTION
    assert len(inbox(store)) == 3


@pytest.mark.parametrize("command", ["RETR 1", "LIST 1", "UIDL 1", "DELE 1", "TOP 1 0"])
def test_pop3_deleted_message_refused(store: Store, command: str) -> None:
    conn = login(store)
    assert talk(conn, b"DELE 1\r\n") == b"+OK message 1 deleted\r\n"
    assert talk(conn, command.encode() + b"\r\n") == b"-ERR message 1 already deleted\r\n"


@pytest.mark.parametrize(
    "line", ["TOP 1 -1", "TOP 1 x", "TOP 1", "TOP", "RETR", "RETR 1 2", "STAT 1", "DELE"]
)
def test_pop3_bad_arguments(store: Store, line: str) -> None:
    conn = login(store)
    assert talk(conn, line.encode() + b"\r\n").startswith(b"-ERR ")


@pytest.mark.parametrize("line", ["RETR 1", "STAT", "LIST", "UIDL", "TOP 1 0", "DELE 1", "NOOP"])
def test_pop3_transaction_commands_before_login_refused(store: Store, line: str) -> None:
    conn = connect(store)
    assert talk(conn, line.encode() + b"\r\n").startswith(b"-ERR ")
    assert conn.state is POP3State.AUTHORIZATION


@pytest.mark.parametrize("line", [f"USER {USER}", f"PASS {PASSWORD}", "AUTH PLAIN", "STLS"])
def test_pop3_authorization_commands_after_login_refused(store: Store, line: str) -> None:
    conn = login(store, starttls=True)
    assert talk(conn, line.encode() + b"\r\n").startswith(b"-ERR ")
    assert conn.state is POP3State.TRANSACTION


# Deletion semantics (RFC 1939 section 6, docs/security.md A7.2)


def test_pop3_dele_quit_removes(store: Store) -> None:
    conn = login(store)
    talk(conn, b"DELE 1\r\nDELE 3\r\n")
    assert talk(conn, b"STAT\r\n").startswith(b"+OK 1 ")
    assert len(inbox(store)) == 3  # DELE only marks
    events = conn.receive_data(b"QUIT\r\n")
    assert events == [ConnectionClosed()]
    assert conn.data_to_send().startswith(b"+OK ")
    assert [m.raw for m in inbox(store)] == [MSG2]
    assert conn.state is POP3State.UPDATE


def test_pop3_dele_eof_keeps(store: Store) -> None:
    conn = login(store)
    talk(conn, b"DELE 1\r\n")
    conn.receive_data(b"")
    assert len(inbox(store)) == 3


def test_pop3_dele_rset_quit_keeps(store: Store) -> None:
    conn = login(store)
    talk(conn, b"DELE 1\r\nDELE 2\r\n")
    assert talk(conn, b"RSET\r\n").startswith(b"+OK maildrop has 3 messages")
    talk(conn, b"QUIT\r\n")
    assert len(inbox(store)) == 3


def test_pop3_dele_timeout_keeps(store: Store) -> None:
    conn = login(store)
    talk(conn, b"DELE 1\r\n")
    conn.timed_out()
    assert conn.data_to_send() == b"-ERR autologout\r\n"
    assert conn.receive_data(b"QUIT\r\n") == []  # closed: nothing more is processed
    assert len(inbox(store)) == 3
    login(store)  # lock released


def test_pop3_snapshot_fixed_at_login(store: Store) -> None:
    conn = login(store)
    store.deliver(USER, b"Subject: late\r\n\r\nx\r\n")
    assert talk(conn, b"STAT\r\n").startswith(b"+OK 3 ")
    talk(conn, b"DELE 1\r\nQUIT\r\n")
    assert [m.raw for m in inbox(store)][-1] == b"Subject: late\r\n\r\nx\r\n"
    assert len(inbox(store)) == 3


def test_pop3_nothing_after_quit_is_processed(store: Store) -> None:
    conn = login(store)
    reply = talk(conn, b"QUIT\r\nDELE 1\r\nNOOP\r\n")
    assert reply.count(b"\r\n") == 1
    assert len(inbox(store)) == 3


def test_pop3_quit_in_authorization(store: Store) -> None:
    conn = connect(store)
    assert conn.receive_data(b"QUIT\r\n") == [ConnectionClosed()]
    assert conn.data_to_send().startswith(b"+OK ")


class FailingStore(Store):
    def mailbox(self, address: str, name: str = "INBOX") -> Mailbox:
        raise StorageError("disk on fire")


def test_pop3_store_failure_is_temporary_error() -> None:
    store = FailingStore()
    store.add_user(USER, PASSWORD)
    conn = connect(store)
    talk(conn, f"USER {USER}\r\n".encode())
    assert talk(conn, f"PASS {PASSWORD}\r\n".encode()).startswith(b"-ERR [SYS/TEMP] ")
    assert conn.state is POP3State.AUTHORIZATION
    assert store.lock_maildrop(USER)  # the lock taken for the login was given back


# Limits (RFC 2449 section 4, docs/security.md A7.1)


def test_pop3_line_of_255_octets_accepted(store: Store) -> None:
    conn = connect(store)
    line = b"USER " + b"a" * 248 + b"\r\n"
    assert len(line) == 255
    assert talk(conn, line) == b"+OK\r\n"


@pytest.mark.parametrize("length", [256, 300, 5000])
def test_pop3_line_too_long(store: Store, length: int) -> None:
    conn = connect(store)
    line = b"USER " + b"a" * (length - 7) + b"\r\n"
    assert talk(conn, line) == b"-ERR line too long\r\n"
    # The connection is still usable afterwards.
    assert talk(conn, b"CAPA\r\n").startswith(b"+OK")


def test_pop3_line_too_long_in_pieces(store: Store) -> None:
    conn = connect(store)
    out = b"".join(talk(conn, b"x" * 100) for _ in range(10))
    out += talk(conn, b"\r\nCAPA\r\n")
    assert out.startswith(b"-ERR line too long\r\n+OK")


@pytest.mark.parametrize(
    "junk", [b"XYZZY", b"", b"\x00\x01", b"\xff\xfe", b"USER\x00x", b"LIST\xff", b"CAPA2"]
)
def test_pop3_unknown_command(store: Store, junk: bytes) -> None:
    conn = connect(store)
    assert talk(conn, junk + b"\r\n").startswith(b"-ERR ")


def test_pop3_three_bad_commands_tolerated(store: Store) -> None:
    conn = connect(store)
    events = conn.receive_data(b"BAD1\r\nBAD2\r\nBAD3\r\n")
    assert events == []
    assert conn.data_to_send().count(b"-ERR") == 3
    assert talk(conn, b"CAPA\r\n").startswith(b"+OK")


def test_pop3_four_bad_commands_close(store: Store) -> None:
    conn = connect(store)
    events = conn.receive_data(b"BAD1\r\nBAD2\r\nBAD3\r\nBAD4\r\nCAPA\r\n")
    assert events == [ConnectionClosed()]
    out = conn.data_to_send()
    assert out.endswith(b"-ERR too many bad commands\r\n")
    assert b"+OK" not in out


def test_pop3_failed_logins_count_as_bad(store: Store) -> None:
    conn = connect(store)
    out = b""
    for _ in range(4):
        out += talk(conn, f"USER {USER}\r\nPASS wrong\r\n".encode())
    assert out.endswith(b"-ERR too many bad commands\r\n")
    assert conn.receive_data(b"CAPA\r\n") == []


# STLS (RFC 2595) and command injection (docs/security.md A3.1)


def test_pop3_stls_then_fresh_authorization(store: Store) -> None:
    conn = connect(store, secure=False, starttls=True)
    talk(conn, b"BAD1\r\nBAD2\r\nBAD3\r\n")
    assert conn.receive_data(b"STLS\r\n") == [StartTLSRequested()]
    assert conn.data_to_send() == b"+OK Begin TLS negotiation\r\n"
    conn.tls_started()
    assert conn.secure and conn.state is POP3State.AUTHORIZATION
    assert conn.data_to_send() == b""  # no second greeting (RFC 2595 section 4)
    caps = capa(conn)
    assert b"STLS" not in caps and b"USER" in caps
    talk(conn, b"BAD1\r\n")  # the bad-command count started over
    assert talk(conn, f"USER {USER}\r\n".encode()) == b"+OK\r\n"
    assert talk(conn, f"PASS {PASSWORD}\r\n".encode()).startswith(b"+OK")


def test_pop3_stls_pipelined_plaintext_is_injection(store: Store) -> None:
    conn = connect(store, secure=False, starttls=True)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"STLS\r\nCAPA\r\n")
    assert conn.data_to_send() == b""  # neither the STLS +OK nor anything for CAPA
    assert conn.receive_data(b"CAPA\r\n") == []


def test_pop3_stls_partial_pipelined_is_injection(store: Store) -> None:
    conn = connect(store, secure=False, starttls=True)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"STLS\r\nCA")


def test_pop3_data_during_tls_upgrade_is_injection(store: Store) -> None:
    conn = connect(store, secure=False, starttls=True)
    assert conn.receive_data(b"STLS\r\n") == [StartTLSRequested()]
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"CAPA\r\n")


def test_pop3_stls_unavailable(store: Store) -> None:
    conn = connect(store, secure=False, starttls=False)
    assert talk(conn, b"STLS\r\n") == b"-ERR STLS not available\r\n"


def test_pop3_stls_when_secure(store: Store) -> None:
    conn = connect(store, secure=True, starttls=True)
    assert conn.receive_data(b"STLS\r\n") == []
    assert conn.data_to_send() == b"-ERR already using TLS\r\n"


def test_pop3_tls_started_without_stls(store: Store) -> None:
    conn = connect(store, secure=False, starttls=True)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()


@pytest.mark.parametrize("sep", ["\x1c", "\x1d", "\x1e", "\x1f", "\x0b", "\x0c"])
def test_pop3_arguments_split_on_space_only(store: Store, sep: str) -> None:
    """RFC 1939 section 3: a SPACE separates arguments. A control character is no separator
    (str.split() took 0x1c-0x1f for whitespace: ``LIST \\x1c`` became the scan listing)."""
    conn = login(store, max_bad_commands=10)
    for verb in ("LIST", "UIDL"):
        reply = talk(conn, f"{verb} {sep}\r\n".encode("latin-1"))
        assert reply.startswith(b"-ERR") and reply.count(b"\r\n") == 1, reply
    assert talk(conn, f"TOP 1{sep}0\r\n".encode("latin-1")).startswith(b"-ERR")
    # Twin: the same commands with a plain SPACE work.
    assert talk(conn, b"LIST 1\r\n").startswith(b"+OK 1 ")
    assert talk(conn, b"TOP 1 0\r\n").startswith(b"+OK")
