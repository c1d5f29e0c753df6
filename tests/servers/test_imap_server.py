"""The IMAP listeners over real loopback sockets, driven by imapclient, imaplib and raw sockets."""

from __future__ import annotations

import asyncio
import email.policy
import imaplib
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from email.message import EmailMessage

import pytest
from _support import listener_port, shutdown_line_listeners
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from roundtrip.certs import CertificateAuthority
from roundtrip.protocols import _mime
from roundtrip.servers._conn import LineServerProtocol
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.imap import start_imap
from roundtrip.store import Store

HOST = "127.0.0.1"
USER = "alice@example.test"
PASSWORD = "correct horse"
TIMEOUT = 5.0
ATTACHMENT = bytes(range(256)) * 4

SIMPLE = (
    b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nCc: carol@example.test\r\n"
    b"Subject: first note\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <first@example.test>\r\n\r\nhello alice\r\n"
)
SECOND = (
    b"From: zed@other.test\r\nTo: alice@example.test\r\nSubject: second note\r\n"
    b"Date: Fri, 15 Mar 2024 12:00:00 +0000\r\n\r\n" + b"lorem ipsum " * 200 + b"\r\n"
)


def nested_message() -> bytes:
    """multipart/mixed( multipart/alternative(text/plain, text/html), application/pdf )."""
    msg = EmailMessage()
    msg["From"] = "Carol <carol@example.test>"
    msg["To"] = USER
    msg["Subject"] = "report with attachment"
    msg["Date"] = "Tue, 02 Apr 2024 09:30:00 +0000"
    msg.set_content("plain body\n")
    msg.add_alternative("<p>html body</p>\n", subtype="html")
    msg.add_attachment(ATTACHMENT, maintype="application", subtype="pdf", filename="r.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


NESTED = nested_message()  # once: the MIME boundary is random


@dataclass
class IMAPServers:
    store: Store
    thread: LoopThread
    ca: CertificateAuthority
    imaps_port: int
    imap_port: int

    def context(self) -> ssl.SSLContext:
        return self.ca.client_context()

    def imapclient(self, mode: str) -> IMAPClient:
        if mode == "implicit":
            return IMAPClient(
                HOST, port=self.imaps_port, ssl=True, ssl_context=self.context(), timeout=TIMEOUT
            )
        client = IMAPClient(HOST, port=self.imap_port, ssl=False, timeout=TIMEOUT)
        client.starttls(self.context())
        return client

    def imaplib(self, mode: str) -> imaplib.IMAP4:
        if mode == "implicit":
            return imaplib.IMAP4_SSL(
                HOST, self.imaps_port, ssl_context=self.context(), timeout=TIMEOUT
            )
        client = imaplib.IMAP4(HOST, self.imap_port, timeout=TIMEOUT)
        client.starttls(ssl_context=self.context())
        return client

    def raw(self, *, tls: bool = False) -> RawClient:
        sock = socket.create_connection((HOST, self.imaps_port if tls else self.imap_port), TIMEOUT)
        if tls:
            sock = self.context().wrap_socket(sock, server_hostname=HOST)
        raw = RawClient(sock)
        raw.greeting = raw.read_until(rb"\* OK .*\r\n")
        return raw


class RawClient:
    """A socket that reads until a pattern, for tests where exact bytes matter."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.greeting = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, pattern: bytes, timeout: float = TIMEOUT) -> bytes:
        """Read until ``pattern`` matches, EOF, or the timeout; returns what was read."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not regex.search(self.buf):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            self.buf += chunk
        data, self.buf = self.buf, b""
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread(name="imap-test-loop")
    yield thread
    thread.stop()


def _serve(
    ca: CertificateAuthority, thread: LoopThread, idle_timeout: float = 30.0
) -> Iterator[IMAPServers]:
    store = Store()
    store.add_user(USER, PASSWORD)
    store.deliver(USER, SIMPLE, internal_date=1_704_103_200.0)
    store.deliver(USER, SECOND, flags={"\\Seen"}, internal_date=1_710_504_000.0)
    store.deliver(USER, NESTED, internal_date=1_712_050_200.0)
    ctx = ca.server_context(["imap.example.test"])
    listeners: list[tuple[asyncio.Server, set[LineServerProtocol]]] = []
    try:
        for implicit, starttls in ((ctx, None), (None, ctx)):
            listeners.append(
                thread.run(
                    start_imap(
                        store,
                        host=HOST,
                        port=0,
                        hostname="imap.example.test",
                        implicit_tls_context=implicit,
                        starttls_context=starttls,
                        idle_timeout=idle_timeout,
                        on_error=thread.record_error,
                    ),
                    timeout=5,
                )
            )
        yield IMAPServers(
            store, thread, ca, listener_port(listeners[0][0]), listener_port(listeners[1][0])
        )
    finally:
        thread.run(shutdown_line_listeners(listeners), timeout=5)
    errors = thread.take_errors()
    assert not errors, errors


@pytest.fixture
def servers(ca: CertificateAuthority, loop_thread: LoopThread) -> Iterator[IMAPServers]:
    yield from _serve(ca, loop_thread)


MODES = ["implicit", "starttls"]


# The full session, with each client library


@pytest.mark.parametrize("mode", MODES)
def test_imap_server_imapclient_session(servers: IMAPServers, mode: str) -> None:
    with servers.imapclient(mode) as c:
        assert b"LOGINDISABLED" not in c.capabilities()
        c.login(USER, PASSWORD)
        folders = {name: flags for flags, _, name in c.list_folders()}
        assert set(folders) == {"INBOX", "Sent", "Drafts", "Junk", "Trash"}
        assert b"\\Sent" in folders["Sent"] and b"\\HasNoChildren" in folders["INBOX"]
        assert c.find_special_folder(b"\\Trash") == "Trash"
        ns = c.namespace()
        assert ns.personal[0][1] == "/"
        assert c.folder_status("INBOX", ["MESSAGES", "UNSEEN"]) == {b"MESSAGES": 3, b"UNSEEN": 2}

        info = c.select_folder("INBOX", readonly=True)
        assert info[b"EXISTS"] == 3 and info[b"READ-ONLY"] == [b""]
        assert b"\\Seen" not in c.fetch([1], ["BODY[]", "FLAGS"])[1][b"FLAGS"]
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 3 and info[b"UIDNEXT"] == 4

        # SEARCH, each key family
        assert c.search("ALL") == [1, 2, 3]
        assert c.search(["FROM", "bob"]) == [1]
        assert c.search(["TO", "alice"]) == [1, 2, 3]
        assert c.search(["CC", "carol"]) == [1]
        assert c.search(["SUBJECT", "second"]) == [2]
        assert c.search(["HEADER", "Message-ID", "<first@example.test>"]) == [1]
        assert c.search(["BODY", "ipsum"]) == [2]
        assert c.search(["TEXT", "html body"]) == [3]
        assert c.search(["SEEN"]) == [2] and c.search(["UNSEEN"]) == [1, 3]
        assert c.search(["SINCE", "1-Mar-2024"]) == [2, 3]
        assert c.search(["BEFORE", "1-Mar-2024"]) == [1]
        assert c.search(["ON", "15-Mar-2024"]) == [2]
        assert c.search(["SENTSINCE", "1-Apr-2024"]) == [3]
        assert c.search(["SENTBEFORE", "2-Jan-2024"]) == [1]
        assert c.search(["SENTON", "15-Mar-2024"]) == [2]
        assert c.search(["LARGER", "1500"]) == [2, 3]
        assert c.search(["SMALLER", "1500"]) == [1]
        assert c.search(["UID", "2:*"]) == [2, 3]
        assert c.search(["NOT", "SEEN"]) == [1, 3]
        assert c.search(["OR", "FROM", "zed", "FROM", "carol"]) == [2, 3]
        assert c.search(["NOT", ["FROM", "bob", "SUBJECT", "first"]]) == [2, 3]
        assert c.search(["SUBJECT", "attachment"], charset="UTF-8") == [3]

        # FETCH, each item
        data = c.fetch(
            [1], ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY.PEEK[HEADER]"]
        )[1]
        assert data[b"RFC822.SIZE"] == len(SIMPLE)
        assert data[b"INTERNALDATE"].year == 2024
        env = data[b"ENVELOPE"]
        assert env.subject == b"first note" and env.from_[0].mailbox == b"bob"
        assert env.message_id == b"<first@example.test>"
        assert data[b"BODY[HEADER]"] == SIMPLE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        # EXAMINE left them recent; this SELECT is the first read-write session (RFC 3501 2.3.2).
        assert data[b"FLAGS"] == (b"\\Recent",)
        data = c.fetch([1], ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]", "BODY.PEEK[TEXT]<0.5>"])[1]
        assert data[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: first note\r\n\r\n"
        assert data[b"BODY[TEXT]<0>"] == b"hello"
        data = c.fetch([1], ["BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)]", "RFC822.HEADER"])[1]
        assert b"first note" not in data[b"BODY[HEADER.FIELDS.NOT (SUBJECT)]"]
        assert data[b"RFC822.HEADER"].startswith(b"From: Bob")
        data = c.fetch([1], ["RFC822", "RFC822.TEXT"])[1]
        assert data[b"RFC822"] == SIMPLE and data[b"RFC822.TEXT"] == b"hello alice\r\n"
        assert b"\\Seen" in c.get_flags([1])[1]  # implicit \Seen
        for macro in ("ALL", "FAST", "FULL"):
            assert b"FLAGS" in c.fetch([2], [macro])[2]

        # BODYSTRUCTURE of a nested multipart with an attachment
        data = c.fetch(
            [3],
            [
                "BODYSTRUCTURE",
                "BODY",
                "BODY.PEEK[]",
                "BODY.PEEK[2]",
                "BODY.PEEK[1.2]",
                "BODY.PEEK[2.MIME]",
                "BODY.PEEK[1]",
            ],
        )[3]
        bs = data[b"BODYSTRUCTURE"]
        assert bs.is_multipart and bs[1].lower() == b"mixed"
        alternative, attachment = bs[0]
        assert alternative.is_multipart and alternative[1].lower() == b"alternative"
        assert [p[1].lower() for p in alternative[0]] == [b"plain", b"html"]
        assert (attachment[0].lower(), attachment[1].lower()) == (b"application", b"pdf")
        assert attachment[5].lower() == b"base64"
        assert attachment[8][0].lower() == b"attachment"
        assert data[b"BODY"].is_multipart
        assert data[b"BODY[]"] == NESTED
        import base64

        assert base64.b64decode(data[b"BODY[2]"]) == ATTACHMENT
        assert b"html body" in data[b"BODY[1.2]"]
        assert b"Content-Disposition: attachment" in data[b"BODY[2.MIME]"]
        assert b"plain body" in data[b"BODY[1]"] and b"html body" in data[b"BODY[1]"]

        # STORE
        added = c.add_flags([2], [b"\\Flagged", b"$Work"])[2]
        assert added == (b"$Work", b"\\Flagged", b"\\Recent", b"\\Seen")
        assert c.remove_flags([2], [b"$Work"])[2] == (b"\\Flagged", b"\\Recent", b"\\Seen")
        c.set_flags([2], [b"\\Answered"])
        assert c.get_flags([2])[2] == (b"\\Answered", b"\\Recent")

        # APPEND, COPY, MOVE, EXPUNGE (UIDPLUS)
        appended = c.append("INBOX", b"Subject: appended\r\n\r\nfrom the test\r\n", [b"\\Draft"])
        assert appended.startswith(b"[APPENDUID ") and appended.split()[2] == b"4]"
        assert c.search(["SUBJECT", "appended"]) == [4]
        assert c.fetch([4], ["FLAGS"])[4][b"FLAGS"] == (b"\\Draft", b"\\Recent")
        c.create_folder("Archive/2024")
        listed = {n: f for f, _, n in c.list_folders()}
        assert listed["Archive"] == (b"\\Noselect", b"\\HasChildren")
        assert listed["Archive/2024"] == (b"\\HasNoChildren",)
        c.copy([1, 2], "Archive/2024")
        c.move([4], "Trash")
        assert c.search("ALL") == [1, 2, 3]
        c.add_flags([1], [b"\\Deleted"])
        c.uid_expunge([1])
        assert c.search("ALL") == [2, 3]
        c.add_flags([2], [b"\\Deleted"])
        c.expunge()
        assert c.search("ALL") == [3]
        assert c.folder_status("Archive/2024", ["MESSAGES"])[b"MESSAGES"] == 2
        assert c.folder_status("Trash", ["MESSAGES"])[b"MESSAGES"] == 1
        c.rename_folder("Archive/2024", "Archive/Old")
        c.delete_folder("Archive/Old")
        assert not c.folder_exists("Archive/Old")
        c.unselect_folder()
        c.select_folder("INBOX")
        c.close_folder()
    assert len(servers.store.mailbox(USER)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_imap_server_imaplib_session(servers: IMAPServers, mode: str) -> None:
    m = servers.imaplib(mode)
    try:
        assert "LOGINDISABLED" not in m.capabilities
        typ, _ = m.login(USER, PASSWORD)
        assert typ == "OK"
        typ, lines = m.list()
        assert typ == "OK" and any(b'"Sent"' in line for line in lines)
        typ, data = m.select("INBOX")
        assert (typ, data) == ("OK", [b"3"])
        assert m.search(None, "FROM", "zed") == ("OK", [b"2"])
        assert m.search(None, "CHARSET", "UTF-8", "SUBJECT", "note") == ("OK", [b"1 2"])
        assert m.uid("SEARCH", "ALL") == ("OK", [b"1 2 3"])
        typ, data = m.fetch("1", "(UID BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == SIMPLE
        typ, data = m.fetch("1:*", "(FLAGS)")
        assert len(data) == 3
        typ, data = m.uid("FETCH", "1:4294967295", "(FLAGS)")
        assert len(data) == 3
        typ, data = m.store("1", "+FLAGS", "(\\Flagged)")
        assert typ == "OK" and b"\\Flagged" in data[0]
        typ, data = m.append(
            "INBOX",
            "(\\Seen)",
            imaplib.Time2Internaldate(1_700_000_000),
            b"Subject: via imaplib\r\n\r\nbody\r\n",
        )
        assert typ == "OK" and data[0].startswith(b"[APPENDUID")
        assert m.copy("1:2", "Trash")[0] == "OK"
        typ, data = m._simple_command("MOVE", "1", "Junk")
        assert typ == "OK"
        assert m.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        typ, data = m.expunge()
        # imaplib also returns the EXPUNGE that MOVE announced earlier.
        assert typ == "OK" and data == [b"1", b"1"]
        assert len(servers.store.mailbox(USER)) == 2
        typ, data = m.namespace()
        assert data == [b'(("" "/")) NIL NIL']
        assert m.status("Trash", "(MESSAGES)")[1] == [b'"Trash" (MESSAGES 2)']
        assert m.close()[0] == "OK"
        assert m.logout()[0] == "BYE"
    finally:
        with suppress(OSError, imaplib.IMAP4.error):
            m.shutdown()


# IDLE, and two sessions on one mailbox


def test_imap_server_search_header_stops_where_the_header_block_ends(
    servers: IMAPServers,
) -> None:
    """A line that is not a field, or an empty line first, ends the header block
    (roundtrip/_headerblock.py): what follows is body text for SEARCH."""
    servers.store.deliver(USER, b"hello\r\nMessage-ID: <stray@example.test>\r\n\r\nb\r\n")
    servers.store.deliver(USER, b"\r\nSubject: bodyword\r\n\r\nmore\r\n")
    servers.store.deliver(USER, b"Message-ID: <real@example.test>\r\nSubject: x\n\r\nb\r\n")
    m = servers.imaplib("starttls")
    try:
        m.login(USER, PASSWORD)
        m.select("INBOX")
        assert m.search(None, "HEADER", "Message-ID", "stray@example.test") == ("OK", [b""])
        assert m.search(None, "BODY", "stray@example.test") == ("OK", [b"4"])
        # The twins: a real header field is found, and TEXT finds the headerless body.
        assert m.search(None, "HEADER", "Message-ID", "real@example.test") == ("OK", [b"6"])
        assert m.search(None, "HEADER", "Subject", "bodyword") == ("OK", [b""])
        assert m.search(None, "TEXT", "bodyword") == ("OK", [b"5"])
        typ, data = m.fetch("5", "(BODY.PEEK[HEADER])")
        assert typ == "OK" and data[0][1] == b"\r\n"
    finally:
        m.logout()


@pytest.mark.parametrize("mode", MODES)
def test_imap_server_idle_sees_delivery_from_another_thread(
    servers: IMAPServers, mode: str
) -> None:
    with servers.imapclient(mode) as c:
        c.login(USER, PASSWORD)
        c.select_folder("INBOX")
        c.idle()
        started = time.monotonic()
        servers.store.deliver(USER, b"Subject: while idle\r\n\r\nping\r\n")
        responses = c.idle_check(timeout=TIMEOUT)
        assert (4, b"EXISTS") in responses
        assert time.monotonic() - started < 1.0  # pushed, not polled
        servers.store.expunge(USER, "INBOX", [1])
        responses = c.idle_check(timeout=TIMEOUT)
        assert (1, b"EXPUNGE") in responses
        c.idle_done()
        assert c.search("ALL") == [2, 3, 4]  # UIDs


def test_imap_server_idle_without_changes_reports_nothing(servers: IMAPServers) -> None:
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        c.select_folder("INBOX")
        c.idle()
        assert c.idle_check(timeout=0.2) == []
        c.idle_done()


def test_imap_server_two_sessions_see_each_others_changes(servers: IMAPServers) -> None:
    with servers.imapclient("implicit") as a, servers.imapclient("implicit") as b:
        for c in (a, b):
            c.login(USER, PASSWORD)
            c.select_folder("INBOX")
        a.add_flags([2], [b"\\Flagged"])
        # The store hands the change to b's machine on the loop before a's STORE is answered,
        # so b's very next command carries the untagged update.
        seen = b.noop()[1]
        assert (2, b"FETCH", (b"UID", 2, b"FLAGS", (b"\\Flagged", b"\\Seen"))) in seen, seen
        a.add_flags([1], [b"\\Deleted"])
        a.expunge()
        assert (1, b"EXPUNGE") in b.noop()[1]
        assert b.search("ALL") == a.search("ALL") == [2, 3]


def test_imap_server_deleting_the_selected_mailbox_ends_that_session(
    servers: IMAPServers,
) -> None:
    """Another session deletes the mailbox this one has selected: a BYE, then the server
    closes the connection (the session's messages and UIDs are gone)."""
    servers.store.create_mailbox(USER, "Shared")
    watcher = servers.raw(tls=True)
    watcher.send(f'a LOGIN {USER} "{PASSWORD}"\r\nb SELECT Shared\r\n'.encode())
    assert b"b OK" in watcher.read_until(rb"b OK .*\r\n")
    with servers.imapclient("implicit") as other:
        other.login(USER, PASSWORD)
        other.create_folder("Elsewhere")  # the twin: another mailbox changes nothing
        other.delete_folder("Elsewhere")
        watcher.send(b"n NOOP\r\n")
        assert watcher.read_until(rb"n OK .*\r\n").endswith(b"n OK NOOP completed\r\n")
        other.delete_folder("Shared")
    out = watcher.read_until(rb"\Z-never")  # everything until the server closes
    assert out == b"* BYE Selected mailbox was deleted, have to disconnect.\r\n", out
    watcher.sock.settimeout(TIMEOUT)
    assert watcher.sock.recv(1) == b""  # closed, not just silent
    watcher.close()


# Refusals (the "fails when it should" twins)


def test_imap_server_login_before_starttls_is_refused(servers: IMAPServers) -> None:
    m = imaplib.IMAP4(HOST, servers.imap_port, timeout=TIMEOUT)
    try:
        assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            m.login(USER, PASSWORD)
    finally:
        m.shutdown()
    with closing(servers.raw()) as raw:
        raw.send(b"a LOGIN alice@example.test secret\r\n")
        assert raw.read_until(rb"a .*\r\n").startswith(b"a NO [PRIVACYREQUIRED]")


def test_imap_server_implicit_tls_offers_no_starttls(servers: IMAPServers) -> None:
    with closing(servers.raw(tls=True)) as raw:
        assert b"STARTTLS" not in raw.greeting and b"AUTH=PLAIN" in raw.greeting
        raw.send(b"a STARTTLS\r\n")
        assert raw.read_until(rb"a .*\r\n").startswith(b"a BAD")


def test_imap_server_wrong_password(servers: IMAPServers) -> None:
    with servers.imapclient("implicit") as c, pytest.raises(IMAPClientError):
        c.login(USER, "wrong")


def test_imap_server_bad_tag_unknown_command_bad_sequence_set(servers: IMAPServers) -> None:
    with closing(servers.raw(tls=True)) as raw:
        raw.send(b'a LOGIN alice@example.test "correct horse"\r\nb SELECT INBOX\r\n')
        assert b"b OK [READ-WRITE]" in raw.read_until(rb"b OK.*\r\n")
        raw.send(b'x"y NOOP\r\n')
        assert raw.read_until(rb"\r\n").startswith(b"* BAD")
        raw.send(b"c FROBNICATE\r\n")
        assert raw.read_until(rb"c .*\r\n").startswith(b"c BAD")
        for i, bad in enumerate([b"0", b"abc", b"1:", b"9", b"4294967296"]):
            raw.send(b"d%d FETCH %s FLAGS\r\n" % (i, bad))
            assert raw.read_until(rb"d\d .*\r\n").startswith(b"d%d BAD" % i), bad
        raw.send(b"e NOOP\r\n")
        assert raw.read_until(rb"e .*\r\n") == b"e OK NOOP completed\r\n"


def test_imap_server_select_missing_folder(servers: IMAPServers) -> None:
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        with pytest.raises(IMAPClientError, match="NONEXISTENT"):
            c.select_folder("Missing")
        assert c.select_folder("INBOX")[b"EXISTS"] == 3


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "foo//bar", ".foo"])
def test_imap_server_path_traversal_names_refused(servers: IMAPServers, name: str) -> None:
    before = sorted(b.name for b in servers.store.mailboxes(USER))
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        for call in (c.create_folder, c.select_folder, c.delete_folder):
            with pytest.raises(IMAPClientError):
                call(name)
        with pytest.raises(IMAPClientError):
            c.rename_folder("Junk", name)
        with pytest.raises(IMAPClientError):
            c.append(name, b"Subject: x\r\n\r\n")
        c.select_folder("INBOX")
        with pytest.raises(IMAPClientError):
            c.copy([1], name)
    assert sorted(b.name for b in servers.store.mailboxes(USER)) == before


def test_imap_server_literal_too_big_gets_no_continuation(servers: IMAPServers) -> None:
    with closing(servers.raw(tls=True)) as raw:
        raw.send(b'a LOGIN alice@example.test "correct horse"\r\n')
        raw.read_until(rb"a OK.*\r\n")
        raw.send(b"b APPEND INBOX {99999999999}\r\n")
        reply = raw.read_until(rb"b .*\r\n")
        assert reply.startswith(b"b NO [TOOBIG]") and b"+ " not in reply
        raw.send(b"c APPEND INBOX {11}\r\n")
        assert raw.read_until(rb"\+ .*\r\n").startswith(b"+ ")
        raw.send(b"Subject: x\r\n\r\n")
        assert raw.read_until(rb"c .*\r\n").startswith(b"c OK [APPENDUID")


def test_imap_server_nonsync_literal_hides_no_commands(servers: IMAPServers) -> None:
    with closing(servers.raw(tls=True)) as raw:
        raw.send(b'a LOGIN alice@example.test "correct horse"\r\n')
        raw.read_until(rb"a OK.*\r\n")
        body = b"Subject: trap\r\n\r\nx DELETE Sent\r\n"
        raw.send(b"b APPEND INBOX {%d+}\r\n%s\r\nc NOOP\r\n" % (len(body), body))
        reply = raw.read_until(rb"c .*\r\n")
        assert b"b OK [APPENDUID" in reply and b"x OK" not in reply
        raw.send(b"d APPEND INBOX {99999999999+}\r\n" + b"e DELETE Sent\r\n" * 10)
        assert raw.read_until(rb"BYE.*\r\n").startswith(b"* BYE [TOOBIG]")
        assert raw.read_until(rb"$^") == b""  # closed, nothing else answered
    assert servers.store.mailbox(USER, "Sent") is not None


def test_imap_server_starttls_injection_is_not_executed(servers: IMAPServers) -> None:
    with closing(servers.raw()) as raw:
        raw.send(b"a1 STARTTLS\r\na2 NOOP\r\n")
        got = raw.read_until(rb"a2 OK", timeout=1.0)
        assert b"a2 OK" not in got
        with suppress(ssl.SSLError, OSError):
            tls = servers.context().wrap_socket(raw.sock, server_hostname=HOST)
            raw.sock = tls
            assert b"a2 OK" not in raw.read_until(rb"a2 OK", timeout=1.0)
    # The server still serves a new client, and STARTTLS done right works.
    with servers.imapclient("starttls") as c:
        c.login(USER, PASSWORD)
        assert c.select_folder("INBOX")[b"EXISTS"] == 3


def test_imap_server_starttls_injection_in_a_second_segment(servers: IMAPServers) -> None:
    with closing(servers.raw()) as raw:
        raw.send(b"a1 STARTTLS\r\n")
        raw.send(b"a2 NOOP\r\n")
        got = raw.read_until(rb"a1 .*\r\n", timeout=1.0)
        with suppress(ssl.SSLError, OSError):
            raw.sock = servers.context().wrap_socket(raw.sock, server_hostname=HOST)
            got += raw.read_until(rb"a2 OK", timeout=1.0)
        assert b"a2 OK" not in got


def test_imap_server_huge_uid_set(servers: IMAPServers) -> None:
    with closing(servers.raw(tls=True)) as raw:
        raw.send(b'a LOGIN alice@example.test "correct horse"\r\nb SELECT INBOX\r\n')
        raw.read_until(rb"b OK.*\r\n")
        started = time.monotonic()
        raw.send(b"c UID FETCH 1:4294967295 FLAGS\r\n")
        reply = raw.read_until(rb"c OK.*\r\n")
        assert time.monotonic() - started < 1.0
        assert reply.count(b" FETCH (") == 3
        raw.send(b"d UID FETCH " + b",".join([b"1", b"2", b"3"] * 1400) + b" UID\r\n")
        assert raw.read_until(rb"d OK.*\r\n").count(b" FETCH (") == 3


def test_imap_server_too_many_bad_commands_then_new_client(servers: IMAPServers) -> None:
    with closing(servers.raw()) as raw:
        raw.send(b"x1 GARBAGE\r\nx2 GARBAGE\r\nx3 GARBAGE\r\nx4 GARBAGE\r\n")
        got = raw.read_until(rb"\* BYE .*\r\n")
        assert b"* BYE Too many invalid IMAP commands." in got
        assert raw.read_until(rb"$^") == b""
    with closing(servers.raw()) as raw:
        raw.send(b"a NOOP\r\n")
        assert raw.read_until(rb"a .*\r\n") == b"a OK NOOP completed\r\n"


def test_imap_server_over_long_line(servers: IMAPServers) -> None:
    with closing(servers.raw()) as raw:
        raw.send(b"a NOOP " + b"x" * 70_000 + b"\r\n")
        assert b"* BYE" in raw.read_until(rb"\* BYE .*\r\n")
    with closing(servers.raw()) as raw:
        raw.send(b"a NOOP\r\n")
        assert raw.read_until(rb"a .*\r\n").startswith(b"a OK")


def test_imap_server_autologout(ca: CertificateAuthority, loop_thread: LoopThread) -> None:
    for servers in _serve(ca, loop_thread, idle_timeout=0.3):
        with closing(servers.raw()) as raw:
            got = raw.read_until(rb"\* BYE .*\r\n")
            assert got == b"* BYE Autologout; idle for too long\r\n"
            assert raw.read_until(rb"$^") == b""


def test_imap_server_unicode_folder_names_round_trip(servers: IMAPServers) -> None:
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        c.create_folder("Entwürfe ☺")
        assert "Entwürfe ☺" in [n for _, _, n in c.list_folders()]
        c.select_folder("Entwürfe ☺")
    assert servers.store.mailbox(USER, "Entwürfe ☺") is not None


def test_imap_server_invalid_modified_utf7_is_refused(servers: IMAPServers) -> None:
    with closing(servers.raw(tls=True)) as raw:
        raw.send(b'a LOGIN alice@example.test "correct horse"\r\n')
        raw.read_until(rb"a OK.*\r\n")
        for i, name in enumerate([b'"&Jjo"', b'"&AGE-"', b'"caf\xc3\xa9"', b'"&-&"']):
            raw.send(b"c%d CREATE %s\r\n" % (i, name))
            assert re.match(rb"c%d (NO|BAD) " % i, raw.read_until(rb"c\d .*\r\n")), name
        raw.send(b"d NOOP\r\n")
        assert raw.read_until(rb"d .*\r\n").startswith(b"d OK")


# Security (docs/security.md)


def _logged_in(servers: IMAPServers) -> RawClient:
    raw = servers.raw(tls=True)
    raw.send(b'a LOGIN alice@example.test "correct horse"\r\n')
    assert b"a OK" in raw.read_until(rb"a (OK|NO|BAD).*\r\n")
    return raw


@pytest.mark.parametrize("wildcard", [b"*", b"%"])
def test_imap_server_list_with_many_wildcards_blocks_no_other_session(
    servers: IMAPServers, wildcard: bytes
) -> None:
    # One event loop serves every session: a LIST that backtracks for minutes stops them all
    # (and a regular expression holds the GIL, so not even SIGTERM got through).
    servers.store.create_mailbox(USER, "Tax")
    with closing(_logged_in(servers)) as a, closing(_logged_in(servers)) as b:
        start = time.perf_counter()
        a.send(b'l LIST "" "' + wildcard * 100 + b'x"\r\n')
        b.send(b"n NOOP\r\n")
        noop = b.read_until(rb"n (OK|NO|BAD).*\r\n")
        noop_time = time.perf_counter() - start
        listing = a.read_until(rb"l (OK|NO|BAD).*\r\n")
        list_time = time.perf_counter() - start
    assert noop == b"n OK NOOP completed\r\n"
    assert listing == b'* LIST (\\HasNoChildren) "/" "Tax"\r\nl OK LIST completed\r\n'
    assert list_time < 0.5 and noop_time < 0.5, (list_time, noop_time)


def test_imap_server_rename_under_itself_is_refused(servers: IMAPServers) -> None:
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        with pytest.raises(IMAPClientError, match="CANNOT"):
            c.rename_folder("Trash", "Trash/x")
        assert (b"\\HasNoChildren", b"\\Trash") in [f[0] for f in c.list_folders()]
        c.rename_folder("Trash", "Bin")
        assert (b"\\HasNoChildren", b"\\Trash") in [f[0] for f in c.list_folders("", "Bin")]


def test_imap_server_append_over_header_limit_is_refused(servers: IMAPServers) -> None:
    big = b"X-Big: " + b"\r\n ".join([b"y" * 70] * 1500) + b"\r\n"
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        with pytest.raises(IMAPClientError, match=r"\[LIMIT\]"):
            c.append("INBOX", SIMPLE.replace(b"\r\n\r\n", b"\r\n" + big + b"\r\n", 1))
        assert c.select_folder("INBOX")[b"EXISTS"] == 3
        c.append("INBOX", SIMPLE)
        assert c.select_folder("INBOX")[b"EXISTS"] == 4


# The error channel: a MIME bug of ours reaches on_error, the client still gets its answer


def _boom(*args: object, **kwargs: object) -> object:
    raise ValueError("a bug of ours")


def test_imap_server_mime_bug_reaches_on_error(
    servers: IMAPServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mime, "render_body", _boom)
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        c.select_folder("INBOX", readonly=True)
        got = c.fetch([3], ["BODYSTRUCTURE"])[3][b"BODYSTRUCTURE"]
        assert got[0] == b"TEXT" and got[1] == b"PLAIN"  # well-formed, parsed by imapclient
        assert c.noop()[0].startswith(b"NOOP completed")
    errors = servers.thread.take_errors()  # recorded before the reply was sent
    assert [str(e) for e in errors] == ["a bug of ours"]


def test_imap_server_deep_mime_is_no_bug(servers: IMAPServers) -> None:
    deep = b"Subject: deep\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"x\r\n"
    servers.store.deliver(USER, deep)
    with servers.imapclient("implicit") as c:
        c.login(USER, PASSWORD)
        c.select_folder("INBOX", readonly=True)
        got = c.fetch([4], ["BODYSTRUCTURE", "ENVELOPE"])[4]
        assert b"OCTET-STREAM" in repr(got[b"BODYSTRUCTURE"]).encode()
        assert got[b"ENVELOPE"].subject == b"deep"
    assert servers.thread.take_errors() == []


def test_imap_server_drops_the_socket_soon_after_bye(servers: IMAPServers) -> None:
    # After BYE the session is over (RFC 3501 7.1.5): the server closes the connection. Over
    # TLS, asyncio otherwise waits up to 30 s (ssl_shutdown_timeout) for the client's
    # close_notify, which a client that just reads never sends. The client here speaks TLS
    # through memory buffers, so it can see the TCP FIN apart from the TLS close.
    sock = socket.create_connection((HOST, servers.imaps_port), TIMEOUT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = servers.context().wrap_bio(incoming, outgoing, server_hostname=HOST)

    def flush() -> None:
        data = outgoing.read()
        if data:
            sock.sendall(data)

    def feed(timeout: float) -> bool:
        sock.settimeout(timeout)
        data = sock.recv(65536)
        if not data:
            return False
        incoming.write(data)
        return True

    with closing(sock):
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                assert feed(TIMEOUT)
        flush()
        tls.write(f'a LOGIN {USER} "{PASSWORD}"\r\nb LOGOUT\r\n'.encode())
        flush()
        text = b""
        while b"b OK" not in text:
            try:
                text += tls.read(65536)
            except ssl.SSLWantReadError:
                assert feed(TIMEOUT), text
        assert b"* BYE" in text
        start = time.monotonic()
        with suppress(ConnectionError):
            while feed(10.0):  # TimeoutError here: the server held the socket open
                pass
        assert time.monotonic() - start < 5.0


def test_imap_server_keeps_a_live_session_open(servers: IMAPServers) -> None:
    # Twin: without BYE nothing is closed; the session still answers after the grace.
    with closing(servers.raw(tls=True)) as raw:
        raw.send(f'a LOGIN {USER} "{PASSWORD}"\r\n'.encode())
        raw.read_until(rb"a OK.*\r\n")
        assert raw.read_until(rb"never", timeout=1.5) == b""
        raw.send(b"b NOOP\r\n")
        assert raw.read_until(rb"b .*\r\n").startswith(b"b OK")
