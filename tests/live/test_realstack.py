"""The Postfix + Dovecot harness: a real round trip, and each broken variant behaving as broken.

Everything runs on loopback against the Debian packages; the module is skipped when they are
not installed (``RealMailServer.is_available()`` says why).
"""

from __future__ import annotations

import email.utils
import imaplib
import os
import poplib
import secrets
import shutil
import smtplib
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator

import pytest

from benchmarks._realstack import ALTERED_SUFFIX, RealMailServer
from roundtrip.certs import CertificateAuthority
from roundtrip.errors import ConfigError

_AVAILABLE, _REASON = RealMailServer.is_available()
needs_stack = pytest.mark.skipif(not _AVAILABLE, reason=f"Postfix + Dovecot: {_REASON}")

#: How long a delivered message may take to become visible (measured: about 10 ms).
_DELIVERY_TIMEOUT = 10.0
#: How long "never arrives" is watched for.
_ABSENCE_TIMEOUT = 3.0
#: Interval between two IMAP searches while polling toward a deadline.
_POLL_INTERVAL = 0.02


def _message(sender: str, recipient: str, tag: str) -> tuple[bytes, bytes]:
    """A CRLF message tagged in its Subject; returns (message, body)."""
    body = f"roundtrip body {tag}\r\nsecond line\r\n".encode()
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: realstack {tag}\r\n"
        f"Message-ID: <{tag}@roundtrip.test>\r\nDate: {email.utils.formatdate()}\r\n"
    ).encode()
    return head + b"\r\n" + body, body


def _submit(server: RealMailServer, message: bytes, *, login: str | None = None) -> str:
    """Submit over implicit TLS (465 semantics) as ``login``; returns the recipient."""
    user = login or next(iter(server.users))
    with smtplib.SMTP_SSL(
        server.host, server.ports["submissions"], context=server.ca.client_context(), timeout=10
    ) as client:
        client.login(user, server.users[user])
        client.sendmail(user, [user], message)
    return user


def _imap_bodies(
    server: RealMailServer, user: str, tag: str, *, timeout: float, want: int = 1
) -> list[bytes]:
    """Bodies of INBOX messages tagged ``tag``: polls until ``want`` are there or timeout."""
    deadline = time.monotonic() + timeout
    with imaplib.IMAP4_SSL(
        server.host, server.ports["imaps"], ssl_context=server.ca.client_context(), timeout=10
    ) as imap:
        imap.login(user, server.users[user])
        while True:
            imap.select("INBOX", readonly=True)
            typ, data = imap.search(None, "HEADER", "Message-ID", f"<{tag}@roundtrip.test>")
            assert typ == "OK", data
            numbers = data[0].split()
            if len(numbers) >= want or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_INTERVAL)  # sleep-ok: Postfix gives no event; poll to a deadline
        bodies = []
        for number in numbers:
            typ, parts = imap.fetch(number.decode(), "(BODY.PEEK[TEXT])")
            assert typ == "OK", parts
            item = parts[0]
            assert isinstance(item, tuple)
            bodies.append(item[1])
        return bodies


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (the daemonised Postfix master is not ours)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def make_server() -> Iterator[type[RealMailServer]]:
    """Start extra, differently configured servers; stops them all afterwards."""
    started: list[RealMailServer] = []

    class _Tracked(RealMailServer):
        def start(self) -> RealMailServer:
            started.append(self)
            return super().start()

    yield _Tracked
    for server in started:
        server.stop()


def test_realstack_is_available_reports_a_reason() -> None:
    ok, reason = RealMailServer.is_available()
    assert isinstance(ok, bool)
    assert ok == (reason == "")


def test_realstack_rejects_unknown_tls_cert_kind() -> None:
    with pytest.raises(ConfigError, match="expired"):
        RealMailServer(tls_cert="self_signed")  # type: ignore[arg-type]


def test_realstack_rejects_non_loopback_host() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        RealMailServer(host="192.0.2.1")


def test_realstack_rejects_user_outside_domain() -> None:
    with pytest.raises(ConfigError, match="outside domain"):
        RealMailServer(domain="example.net", users={"eve@example.org": "pw"})


@needs_stack
def test_realstack_round_trip_submissions_to_imaps_and_pop3s(
    real_mailserver: RealMailServer,
) -> None:
    server = real_mailserver
    tag = secrets.token_hex(8)
    user = next(iter(server.users))
    message, body = _message(user, user, tag)
    _submit(server, message)

    bodies = _imap_bodies(server, user, tag, timeout=_DELIVERY_TIMEOUT)
    assert bodies == [body]

    pop = poplib.POP3_SSL(
        server.host, server.ports["pop3s"], context=server.ca.client_context(), timeout=10
    )
    try:
        pop.user(user)
        pop.pass_(server.users[user])
        count, _size = pop.stat()
        found = []
        for number in range(1, count + 1):
            _resp, lines, _octets = pop.retr(number)
            raw = b"\r\n".join(lines) + b"\r\n"
            if f"<{tag}@roundtrip.test>".encode() in raw:
                found.append(raw.split(b"\r\n\r\n", 1)[1])
    finally:
        pop.quit()
    assert found == [body]


@needs_stack
def test_realstack_message_for_other_user_not_in_first_users_box(
    real_mailserver: RealMailServer,
) -> None:
    """Twin of the round trip: the search really discriminates (no false positives)."""
    server = real_mailserver
    tag = secrets.token_hex(8)
    alice, bob = list(server.users)[:2]
    message, body = _message(alice, bob, tag)
    with smtplib.SMTP_SSL(
        server.host, server.ports["submissions"], context=server.ca.client_context(), timeout=10
    ) as client:
        client.login(alice, server.users[alice])
        client.sendmail(alice, [bob], message)
    assert _imap_bodies(server, bob, tag, timeout=_DELIVERY_TIMEOUT) == [body]
    assert _imap_bodies(server, alice, tag, timeout=0) == []


@needs_stack
def test_realstack_wrong_password_gets_535(real_mailserver: RealMailServer) -> None:
    server = real_mailserver
    user = next(iter(server.users))
    with (
        smtplib.SMTP_SSL(
            server.host, server.ports["submissions"], context=server.ca.client_context(), timeout=10
        ) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as info,
    ):
        client.login(user, server.users[user] + "-wrong")
    assert info.value.smtp_code == 535


@needs_stack
def test_realstack_wrong_password_refused_by_imap_and_pop3(
    real_mailserver: RealMailServer,
) -> None:
    server = real_mailserver
    user = next(iter(server.users))
    ctx = server.ca.client_context()
    with (
        imaplib.IMAP4_SSL(server.host, server.ports["imaps"], ssl_context=ctx, timeout=10) as imap,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        imap.login(user, "wrong")
    pop = poplib.POP3_SSL(server.host, server.ports["pop3s"], context=ctx, timeout=10)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop.pass_("wrong")
    finally:
        pop.close()


@needs_stack
def test_realstack_every_tls_port_verifies_against_the_ca(
    real_mailserver: RealMailServer,
) -> None:
    server = real_mailserver
    ctx = server.ca.client_context()
    for name in ("submissions", "imaps", "pop3s"):
        with (
            socket.create_connection((server.host, server.ports[name]), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=server.hostname) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with smtplib.SMTP(server.host, server.ports["submission"], timeout=10) as client:
        client.starttls(context=ctx)
        assert client.ehlo()[0] == 250
    imap = imaplib.IMAP4(server.host, server.ports["imap"], timeout=10)
    try:
        imap.starttls(ssl_context=ctx)
    finally:
        imap.logout()
    pop = poplib.POP3(server.host, server.ports["pop3"], timeout=10)
    try:
        pop.stls(context=ctx)
    finally:
        pop.quit()


@needs_stack
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("wrong_host", "mismatch"),
        ("expired", "certificate has expired"),
        ("untrusted", "unable to get local issuer certificate"),
    ],
)
def test_realstack_broken_certificate_fails_verification(
    make_server: type[RealMailServer], kind: str, expected: str
) -> None:
    ca = CertificateAuthority()
    server = make_server(tls_cert=kind, ca=ca).start()  # type: ignore[arg-type]
    ctx = ca.client_context()
    for name in ("submissions", "imaps", "pop3s"):
        with socket.create_connection((server.host, server.ports[name]), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                ctx.wrap_socket(raw, server_hostname=server.host).close()
            assert expected in info.value.verify_message, (name, info.value.verify_message)
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(server.host, server.ports["submissions"], context=ctx, timeout=10)


@needs_stack
def test_realstack_starttls_port_hides_auth_before_tls(real_mailserver: RealMailServer) -> None:
    server = real_mailserver
    user = next(iter(server.users))
    with smtplib.SMTP(server.host, server.ports["submission"], timeout=10) as client:
        client.ehlo()
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        code, reply = client.mail(user)
        assert code == 530, reply
        client.rset()
        client.starttls(context=server.ca.client_context())
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert client.login(user, server.users[user])[0] == 235


@needs_stack
def test_realstack_plaintext_auth_knob_offers_auth_before_starttls(
    make_server: type[RealMailServer],
) -> None:
    server = make_server(allow_plaintext_auth_on_starttls_port=True).start()
    user = next(iter(server.users))
    with smtplib.SMTP(server.host, server.ports["submission"], timeout=10) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert client.login(user, server.users[user])[0] == 235
        assert client.sock is not None
        assert not isinstance(client.sock, ssl.SSLSocket)


@needs_stack
def test_realstack_discard_knob_accepts_but_never_delivers(
    make_server: type[RealMailServer],
) -> None:
    server = make_server(discard_mail=True).start()
    tag = secrets.token_hex(8)
    user = next(iter(server.users))
    _submit(server, _message(user, user, tag)[0])  # accepted: no exception
    assert _imap_bodies(server, user, tag, timeout=_ABSENCE_TIMEOUT) == []
    assert "discard" in server.log_text()


@needs_stack
def test_realstack_duplicate_knob_delivers_twice(make_server: type[RealMailServer]) -> None:
    server = make_server(duplicate_delivery=True).start()
    tag = secrets.token_hex(8)
    user = next(iter(server.users))
    message, body = _message(user, user, tag)
    _submit(server, message)
    assert _imap_bodies(server, user, tag, timeout=_DELIVERY_TIMEOUT, want=2) == [body, body]


@needs_stack
def test_realstack_alter_knob_rewrites_the_body(make_server: type[RealMailServer]) -> None:
    server = make_server(alter_body=True).start()
    tag = secrets.token_hex(8)
    user = next(iter(server.users))
    message, body = _message(user, user, tag)
    _submit(server, message)
    (got,) = _imap_bodies(server, user, tag, timeout=_DELIVERY_TIMEOUT)
    assert got != body
    assert got == body.replace(b"\r\n", ALTERED_SUFFIX.encode() + b"\r\n")


@needs_stack
def test_realstack_plaintext_login_refused_before_starttls_on_other_loopback_address(
    make_server: type[RealMailServer],
) -> None:
    """Dovecot trusts a client whose address equals its own; 127.0.0.2 avoids that."""
    server = make_server(host="127.0.0.2").start()
    user = next(iter(server.users))
    imap = imaplib.IMAP4(server.host, server.ports["imap"], timeout=10)
    try:
        assert "LOGINDISABLED" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            imap.login(user, server.users[user])
    finally:
        imap.logout()
    pop = poplib.POP3(server.host, server.ports["pop3"], timeout=10)
    try:
        with pytest.raises(poplib.error_proto, match="Plaintext authentication disallowed"):
            pop.user(user)
            pop.pass_(server.users[user])
    finally:
        pop.quit()


@needs_stack
def test_realstack_same_address_loopback_client_counts_as_secure(
    real_mailserver: RealMailServer,
) -> None:
    """Twin of the above, pinning Dovecot's loopback exception on 127.0.0.1."""
    server = real_mailserver
    user = next(iter(server.users))
    imap = imaplib.IMAP4(server.host, server.ports["imap"], timeout=10)
    try:
        assert "LOGINDISABLED" not in imap.capabilities
        assert imap.login(user, server.users[user])[0] == "OK"
    finally:
        imap.logout()


@needs_stack
def test_realstack_stop_is_idempotent_and_cleans_up() -> None:
    server = RealMailServer(mx=True)
    began = time.monotonic()
    server.start()
    elapsed = time.monotonic() - began
    assert elapsed < 10.0
    workdir = server.workdir
    pid_files = [
        os.path.join(workdir, "postfix", "spool", "pid", "master.pid"),
        os.path.join(workdir, "run", "master.pid"),
    ]
    pids = []
    for path in pid_files:
        with open(path, encoding="ascii") as fh:
            pids.append(int(fh.read().split()[0]))
    with socket.create_connection((server.host, server.ports["smtp"]), timeout=10) as raw:
        assert raw.recv(512).startswith(b"220 ")
    assert "daemon started" in server.log_text()
    server.stop()
    server.stop()
    assert not os.path.exists(workdir)
    assert "daemon started" in server.log_text()  # kept in memory for failure reports
    # Every process of the server is gone, so are its sockets. (Dialling its old port proves
    # nothing under pytest-xdist: another worker's server may have taken the port since.)
    for pid in pids:
        assert not _running(pid)


@pytest.fixture
def open_parent() -> Iterator[str]:
    """A directory other users can enter (pytest's tmp_path is mode 0700)."""
    path = tempfile.mkdtemp(prefix="rt-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_stack
def test_realstack_too_long_workdir_is_refused_before_anything_starts(open_parent: str) -> None:
    parent = os.path.join(open_parent, "d" * 100)
    os.mkdir(parent)
    server = RealMailServer(workdir=parent)
    with pytest.raises(ConfigError, match="too long for unix socket paths"):
        server.start()
    assert os.listdir(parent) == []
    server.stop()  # nothing to stop: a no-op


@needs_stack
def test_realstack_private_workdir_is_refused(open_parent: str) -> None:
    private = os.path.join(open_parent, "private")
    os.mkdir(private, mode=0o700)
    server = RealMailServer(workdir=private)
    with pytest.raises(ConfigError, match="not searchable by other users"):
        server.start()
    assert os.listdir(private) == []


@needs_stack
def test_realstack_keep_leaves_logs_for_debugging(open_parent: str) -> None:
    server = RealMailServer(workdir=open_parent, keep=True)
    with server:
        workdir = server.workdir
    assert os.path.dirname(workdir) == open_parent
    assert os.path.isfile(os.path.join(workdir, "log", "postfix.log"))
    assert "daemon started" in server.log_text()
