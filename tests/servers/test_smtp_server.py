"""The SMTP listeners (MX, submission with STARTTLS, implicit-TLS submission) over loopback.

Real ``smtplib`` clients with verifying ``ssl`` contexts; raw sockets where exact bytes matter
(smtplib rewrites line endings and dot-stuffs). Each test gets its own loop thread,
store and three listeners on port 0.
"""

from __future__ import annotations

import base64
import contextlib
import smtplib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.strategies
import pytest
from _support import RawSMTPClient, SMTPListeners, SMTPWorld

from roundtrip.certs import CertificateAuthority
from roundtrip.errors import StorageError
from roundtrip.protocols.smtp import Role, domain_of
from roundtrip.servers.smtp import Accepted
from roundtrip.store import Store

HOST = "127.0.0.1"
SERVER_NAME = "mail.example.com"
TIMEOUT = 5.0
SILENCE = 1.0  # how long "nothing arrives" is watched for
LIMIT = 10_000
MAX_RECIPIENTS = 3
LOCAL_DOMAINS = ("example.com", "example.org")
USER = "user@example.com"
PASSWORD = "correct horse"
OTHER = "user@example.org"
OTHER_PASSWORD = "battery staple"
STRANGER = "someone@ext.test"

# Lines starting with ".", a lone ".", CRLF endings: what dot transparency must carry unchanged.
MESSAGE = (
    b"From: user@example.com\r\n"
    b"To: user@example.org\r\n"
    b"Subject: dots\r\n"
    b"Message-ID: <fixed-1@example.com>\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"last line\r\n"
)
BARE = b"From: user@example.com\r\nTo: user@example.org\r\nSubject: bare\r\n\r\nhello\r\n"


@dataclass
class World(SMTPWorld):
    #: (recipient, message) pairs that would have gone to the relay.
    relayed: list[tuple[str, Accepted]] = field(default_factory=list)
    #: When set, the router fails as a full disk would.
    storage_broken: bool = False

    def client_context(self) -> ssl.SSLContext:
        return self.ca.client_context()

    def smtp(self, role: Role) -> smtplib.SMTP:
        return smtplib.SMTP(HOST, self.ports[role], timeout=TIMEOUT)

    def smtps(self) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL(
            HOST, self.ports[Role.SUBMISSIONS], timeout=TIMEOUT, context=self.client_context()
        )

    def raw(self, role: Role) -> RawSMTPClient:
        ctx = self.client_context() if role is Role.SUBMISSIONS else None
        return RawSMTPClient(self.ports[role], ctx)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def world(ca: CertificateAuthority) -> Iterator[World]:
    store = Store()
    store.add_user(USER, PASSWORD)
    store.add_user(OTHER, OTHER_PASSWORD)
    listeners = SMTPListeners(ca, thread_name="smtp-test-loop")
    w = World(ca=ca, store=store, thread=listeners.thread)

    def router(accepted: Accepted) -> None:
        if w.storage_broken:
            raise StorageError("disk full")
        w.routed.append(accepted)
        for rcpt in accepted.rcpt_tos:
            if domain_of(rcpt) in LOCAL_DOMAINS:
                store.deliver(
                    rcpt,
                    accepted.raw,
                    envelope_from=accepted.mail_from,
                    envelope_to=accepted.rcpt_tos,
                    head=accepted.head,
                )
            else:
                w.relayed.append((rcpt, accepted))

    try:
        w.ports.update(
            listeners.start(
                Role,
                store=store,
                router=router,
                local_domains=LOCAL_DOMAINS,
                max_recipients=MAX_RECIPIENTS,
                max_message_size=LIMIT,
                idle_timeout=TIMEOUT,
                tls_handshake_timeout=TIMEOUT,
            )
        )
        yield w
    finally:
        errors = listeners.close()
    assert errors == []


def split_received(raw: bytes) -> tuple[bytes, bytes]:
    """(the leading Received field, everything after it)."""
    assert raw.startswith(b"Received: "), raw[:80]
    pos = 0
    while True:
        end = raw.index(b"\r\n", pos) + 2
        if raw[end : end + 1] not in (b" ", b"\t"):
            return raw[:end], raw[end:]
        pos = end


def unfold(field_: bytes) -> str:
    return " ".join(field_.decode("utf-8").split())


def inbox(world: World, user: str = USER) -> list[bytes]:
    return [m.raw for m in world.store.messages(user, "INBOX")]


def auth_plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# Implicit TLS submission (port 465 semantics)


def test_submissions_ehlo_advertises_extensions(world: World) -> None:
    with world.smtps() as client:
        code, _ = client.ehlo("client.example")
        features = client.esmtp_features
    assert code == 250
    assert set(features["auth"].split()) == {"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"}
    assert features["size"] == str(LIMIT)
    for name in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
        assert name in features, features
    assert "starttls" not in features


def test_submissions_send_stores_message_byte_identical(world: World) -> None:
    with world.smtps() as client:
        client.login(USER, PASSWORD)
        refused = client.sendmail(USER, [OTHER], MESSAGE)
    assert refused == {}
    (stored,) = inbox(world, OTHER)
    received, rest = split_received(stored)
    assert rest == MESSAGE
    trace = unfold(received)
    assert " with ESMTPSA id " in trace
    assert f"by {SERVER_NAME} " in trace
    assert f"for <{OTHER}>;" in trace
    assert "(using TLSv1." in trace
    assert world.relayed == []


def test_submissions_received_names_tls_version(world: World) -> None:
    with world.smtps() as client:
        client.login(USER, PASSWORD)
        version = client.sock.version()  # type: ignore[union-attr]
        client.sendmail(USER, [OTHER], MESSAGE)
    assert version is not None
    (stored,) = inbox(world, OTHER)
    assert f"(using {version} with cipher " in unfold(split_received(stored)[0])


def test_submissions_mail_without_auth_refused(world: World) -> None:
    with world.smtps() as client:
        client.ehlo("client.example")
        code, reply = client.mail(USER)
        assert code == 530, reply
        assert reply.startswith(b"5.7.0"), reply
        # the twin: the same session works after AUTH
        client.login(USER, PASSWORD)
        assert client.mail(USER)[0] == 250
    assert world.routed == []


def _failed_auth(world: World, mechanism: str, user: str, password: str) -> tuple[int, bytes]:
    with world.smtps() as client:
        client.ehlo("client.example")
        client.user, client.password = user, password
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth(mechanism, authobject)
        # the session survives a failed AUTH
        assert client.noop()[0] == 250
    return info.value.smtp_code, info.value.smtp_error


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submissions_bad_credentials_give_one_identical_535(world: World, mechanism: str) -> None:
    wrong_password = _failed_auth(world, mechanism, USER, "wrong")
    unknown_user = _failed_auth(world, mechanism, "nobody@example.com", PASSWORD)
    assert wrong_password == unknown_user == (535, b"5.7.8 Authentication credentials invalid")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submissions_auth_mechanism_works(world: World, mechanism: str) -> None:
    with world.smtps() as client:
        client.ehlo("client.example")
        client.user, client.password = USER, PASSWORD
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, reply = client.auth(mechanism, authobject)
        assert (code, reply) == (235, b"2.7.0 Authentication successful")
        client.sendmail(USER, [OTHER], MESSAGE)
    assert len(inbox(world, OTHER)) == 1


def test_submissions_untrusted_ca_fails_verification(world: World) -> None:
    stranger_ca = CertificateAuthority()
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(
            HOST,
            world.ports[Role.SUBMISSIONS],
            timeout=TIMEOUT,
            context=stranger_ca.client_context(),
        )
    # the twin: the listener is unharmed and the right CA verifies
    with world.smtps() as client:
        assert client.noop()[0] == 250


def test_submissions_plaintext_client_gets_no_banner(world: World) -> None:
    with socket.create_connection((HOST, world.ports[Role.SUBMISSIONS]), timeout=TIMEOUT) as sock:
        sock.sendall(b"EHLO client.example\r\n")
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(4096):
                data += chunk
    assert b"220" not in data and b"250" not in data


def test_submissions_foreign_sender_refused(world: World) -> None:
    with world.smtps() as client:
        client.login(USER, PASSWORD)
        code, reply = client.mail(OTHER)
        assert code == 553, reply
        assert reply.startswith(b"5.7.1 "), reply
        # the twin: their own address, in any case, is fine
        assert client.mail(USER.upper())[0] == 250
    assert world.routed == []


def test_submissions_adds_missing_message_id_and_date_once(world: World) -> None:
    with world.smtps() as client:
        client.login(USER, PASSWORD)
        client.sendmail(USER, [OTHER], BARE)
    (stored,) = inbox(world, OTHER)
    _, rest = split_received(stored)
    headers, sep, body = rest.partition(b"\r\n\r\n")
    assert sep and body == b"hello\r\n"
    names = [line.split(b":", 1)[0].lower() for line in headers.split(b"\r\n")]
    assert names.count(b"message-id") == 1
    assert names.count(b"date") == 1
    # the original fields come first, unchanged
    assert rest.startswith(BARE.split(b"\r\n\r\n")[0] + b"\r\n")


# Submission with STARTTLS (port 587 semantics)


def test_submission_before_starttls_refuses_auth_and_mail(world: World) -> None:
    with world.smtp(Role.SUBMISSION) as client:
        client.ehlo("client.example")
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        code, reply = client.docmd("AUTH", auth_plain(USER, PASSWORD))
        assert code == 538, reply
        code, reply = client.mail(USER)
        assert code == 530, reply
    assert world.routed == []


def test_submission_after_starttls_auth_and_send(world: World) -> None:
    with world.smtp(Role.SUBMISSION) as client:
        client.starttls(context=world.client_context())
        client.ehlo("client.example")
        assert "starttls" not in client.esmtp_features
        assert set(client.esmtp_features["auth"].split()) == {
            "PLAIN",
            "LOGIN",
            "XOAUTH2",
            "OAUTHBEARER",
        }
        client.login(USER, PASSWORD)
        client.sendmail(USER, [OTHER], MESSAGE)
    (stored,) = inbox(world, OTHER)
    received, rest = split_received(stored)
    assert rest == MESSAGE
    assert " with ESMTPSA id " in unfold(received)


def test_submission_after_starttls_mail_still_needs_auth(world: World) -> None:
    with world.smtp(Role.SUBMISSION) as client:
        client.starttls(context=world.client_context())
        client.ehlo("client.example")
        assert client.mail(USER)[0] == 530


# MX (port 25 semantics)


def test_mx_never_advertises_or_accepts_auth(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        client.ehlo("client.example")
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH", auth_plain(USER, PASSWORD))[0] == 538
        client.starttls(context=world.client_context())
        client.ehlo("client.example")
        assert "auth" not in client.esmtp_features
        assert "starttls" not in client.esmtp_features
        code, reply = client.docmd("AUTH", auth_plain(USER, PASSWORD))
        assert code == 502, reply
        # no AUTH happened, so the MX still only takes local mail
        client.mail(USER)
        assert client.rcpt(STRANGER)[0] == 554


def test_mx_local_recipient_plaintext_is_esmtp(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        refused = client.sendmail(STRANGER, [USER], MESSAGE)
    assert refused == {}
    (stored,) = inbox(world)
    received, rest = split_received(stored)
    assert rest == MESSAGE  # the MX adds nothing but the trace line
    trace = unfold(received)
    assert " with ESMTP id " in trace
    assert "(using " not in trace
    assert world.routed[0].authenticated_user is None
    assert world.routed[0].tls is False


def test_mx_hands_over_its_received_field_apart_from_the_bytes_it_received(
    world: World,
) -> None:
    """The MX does not copy the message on arrival: ``raw`` is what the client sent, ``head``
    this hop's Received field; submission hands over one whole message (the twin)."""
    with world.smtp(Role.SMTP) as client:
        client.sendmail(STRANGER, [USER], MESSAGE)
    with world.smtp(Role.SUBMISSION) as client:
        client.starttls(context=world.client_context())
        client.login(USER, PASSWORD)
        client.sendmail(USER, [OTHER], MESSAGE)
    mx, submission = world.routed
    assert mx.raw == MESSAGE
    assert mx.head.startswith(b"Received: ") and mx.head.endswith(b"\r\n")
    assert mx.message == mx.head + MESSAGE
    assert split_received(mx.message) == (mx.head, MESSAGE)
    assert submission.head == b""
    assert submission.raw.startswith(b"Received: ") and submission.message is submission.raw


def test_mx_local_recipient_after_starttls_is_esmtps(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        client.starttls(context=world.client_context())
        client.sendmail(STRANGER, [USER], MESSAGE)
    (stored,) = inbox(world)
    trace = unfold(split_received(stored)[0])
    assert " with ESMTPS id " in trace
    assert "(using TLSv1." in trace
    assert world.routed[0].tls is True


def test_mx_message_without_ids_is_not_rewritten(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        client.sendmail(STRANGER, [USER], BARE)
    (stored,) = inbox(world)
    assert split_received(stored)[1] == BARE


def test_mx_unknown_local_user_refused(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        client.ehlo("client.example")
        client.mail(STRANGER)
        code, reply = client.rcpt("nobody@example.com")
        assert code == 550, reply
        assert reply.startswith(b"5.1.1 "), reply
        assert client.rcpt(USER)[0] == 250


def test_mx_foreign_domain_refused(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        client.ehlo("client.example")
        client.mail(USER)
        code, reply = client.rcpt(STRANGER)
        assert code == 554, reply
        assert reply.startswith(b"5.7.1 "), reply


RELAY_VARIANTS = [
    '"u@ext.test"@example.org',
    "u%ext.test@example.org",
    "ext.test!u@example.org",
    "@example.org:u@ext.test",
    "u@[192.0.2.1]",
    "u@ext.test.",
    "U@EXT.TEST",
    "user@example.com@ext.test",
    "user@ext.test",
]


@pytest.mark.parametrize("rcpt", RELAY_VARIANTS)
def test_mx_refuses_open_relay_encodings(world: World, rcpt: str) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250")
        reply = client.cmd(f"RCPT TO:<{rcpt}>")
        assert reply[-1][:1] == "5", reply
        assert client.cmd("DATA")[0].startswith("503")  # no valid recipient
        assert client.cmd("QUIT")[0].startswith("221")
    assert world.routed == [] and world.relayed == []


@pytest.mark.parametrize("rcpt", [USER, "USER@EXAMPLE.COM", OTHER])
def test_mx_accepts_local_users_in_any_case(world: World, rcpt: str) -> None:
    with world.smtp(Role.SMTP) as client:
        client.sendmail(STRANGER, [rcpt], MESSAGE)
    assert world.relayed == []
    assert len(world.store.messages(rcpt, "INBOX")) == 1


def test_mx_vrfy_and_expn_reveal_nothing(world: World) -> None:
    with world.smtp(Role.SMTP) as client:
        client.ehlo("client.example")
        code, reply = client.verify(USER)
        assert code == 252, reply
        assert USER.encode() not in reply
        assert client.verify("nobody@example.com")[0] == 252
        code, reply = client.expn("staff")
        assert code == 502, reply


# Enhanced status codes, limits, smuggling, STARTTLS injection


def test_enhanced_status_codes_after_ehlo_only(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        greeting = client.reply()
        assert greeting == [f"220 {SERVER_NAME} roundtrip ESMTP"]
        ehlo = client.cmd("EHLO client.example")
        assert "250-ENHANCEDSTATUSCODES" in ehlo
        assert ehlo[0] == f"250-{SERVER_NAME}"  # EHLO lines carry no codes
        assert client.cmd("RSET") == ["250 2.0.0 OK"]
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]
        assert client.cmd(f"MAIL FROM:<{STRANGER}>") == ["250 2.1.0 OK"]
        assert client.cmd(f"RCPT TO:<{USER}>") == ["250 2.1.5 OK"]
        assert client.cmd("DATA")[0].startswith("354 ")
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert client.reply()[0].startswith("250 2.0.0 OK: queued as ")
        assert client.cmd("BOGUS")[0].startswith("500 5.5.2 ")
        assert client.cmd("QUIT") == ["221 2.0.0 Bye"]


def test_no_enhanced_status_codes_after_helo(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("HELO client.example")
        assert client.cmd("NOOP") == ["250 OK"]
        assert client.cmd("RSET") == ["250 OK"]


def test_recipient_limit(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        client.cmd(f"MAIL FROM:<{STRANGER}>")
        for _ in range(MAX_RECIPIENTS):
            assert client.cmd(f"RCPT TO:<{USER}>") == ["250 2.1.5 OK"]
        assert client.cmd(f"RCPT TO:<{OTHER}>")[0].startswith("452 4.5.3 ")
        assert client.cmd("DATA")[0].startswith("354 ")
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert client.reply()[0].startswith("250 ")
    assert world.routed[0].rcpt_tos == (USER,) * MAX_RECIPIENTS
    assert world.store.messages(OTHER) == []


@pytest.mark.parametrize(("size", "code"), [(LIMIT, "250"), (LIMIT + 1, "552")])
def test_mail_size_parameter(world: World, size: int, code: str) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        reply = client.cmd(f"MAIL FROM:<{STRANGER}> SIZE={size}")
        assert reply[0][:3] == code, reply
        if code == "552":
            assert reply[0].startswith("552 5.3.4 "), reply


def _data_session(client: RawSMTPClient) -> None:
    client.reply()
    client.cmd("EHLO client.example")
    assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250")
    assert client.cmd(f"RCPT TO:<{USER}>")[0].startswith("250")
    assert client.cmd("DATA")[0].startswith("354")


def test_oversize_data_refused_after_final_dot_only(world: World) -> None:
    line = b"x" * 98 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (LIMIT // len(line) + 10)
    assert len(body) > LIMIT
    with world.raw(Role.SMTP) as client:
        _data_session(client)
        client.send(body)
        assert client.silent_for(SILENCE) == b""  # no reply before the end of data
        client.send(b".\r\n")
        reply = client.reply()
        assert reply[0].startswith("552 5.3.4 "), reply
        # the session goes on, and a message within the limit still goes through
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]
        assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250")
        assert client.cmd(f"RCPT TO:<{USER}>")[0].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
        assert client.reply()[0].startswith("250 ")
    (stored,) = inbox(world)
    assert split_received(stored)[1] == b"Subject: small\r\n\r\nok\r\n"


@pytest.mark.parametrize("role", [Role.SMTP, Role.SUBMISSION])
def test_starttls_discards_injected_plaintext(world: World, role: Role) -> None:
    with world.raw(role) as client:
        client.reply()
        client.cmd("EHLO client.example")
        client.send(b"STARTTLS\r\nEHLO evil.example\r\n")
        assert client.reply()[0].startswith("220")
        client.starttls(world.client_context())
        leaked = client.silent_for(SILENCE)
        assert leaked == b"", f"plaintext after STARTTLS was executed: {leaked!r}"
        # the session is fresh: MAIL needs a new EHLO first
        assert client.cmd(f"MAIL FROM:<{USER}>")[0].startswith("503")
        ehlo = client.cmd("EHLO client.example")
        assert ehlo[0] == f"250-{SERVER_NAME}"
    # the server still serves a new client
    with world.smtp(role) as again:
        assert again.ehlo("client.example")[0] == 250


@pytest.mark.parametrize("role", [Role.SMTP, Role.SUBMISSION])
def test_starttls_injection_in_a_second_segment(world: World, role: Role) -> None:
    """docs/security.md A3.1, the James bypass: the injected line follows in its own segment."""
    with world.raw(role) as client:
        client.reply()
        client.cmd("EHLO client.example")
        client.send(b"STARTTLS\r\n")
        client.send(b"EHLO evil.example\r\n")
        assert client.reply()[0].startswith("220")
        try:
            client.starttls(world.client_context())
        except (ssl.SSLError, OSError):
            pass  # the plaintext reached the TLS layer and broke the handshake: nothing ran
        else:
            leaked = client.silent_for(SILENCE)
            assert leaked == b"", f"plaintext after STARTTLS was executed: {leaked!r}"
    with world.smtp(role) as again:
        assert again.ehlo("client.example")[0] == 250


SMUGGLING_VECTORS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r.\n", b"\r\n.\r", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("vector", SMUGGLING_VECTORS, ids=repr)
def test_smuggling_vector_is_content(world: World, vector: bytes) -> None:
    smuggled = (
        f"MAIL FROM:<{STRANGER}>\r\nRCPT TO:<{OTHER}>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nx"
    ).encode()
    with world.raw(Role.SMTP) as client:
        _data_session(client)
        client.send(b"Subject: carrier\r\n\r\nbody" + vector + smuggled + b"\r\n.\r\n")
        reply = client.reply()
        assert reply[0].startswith("250 2.0.0 OK: queued as "), reply
        client.send(b"QUIT\r\n")
        rest = client.read_to_eof()
    assert rest == b"221 2.0.0 Bye\r\n"  # nothing smuggled ran as a command
    assert len(world.routed) == 1
    assert world.store.messages(OTHER) == []
    (stored,) = inbox(world)
    body = split_received(stored)[1].partition(b"\r\n\r\n")[2]
    assert b"Subject: SMUGGLED" in body


def test_helo_control_characters_do_not_reach_the_trace_header(world: World) -> None:
    # Refused outright (RFC 5321 4.1.1.1: a domain or an address literal); the next valid
    # name is what the trace field shows.
    with world.raw(Role.SMTP) as client:
        client.reply()
        assert client.cmd("EHLO evil\rX-Injected: yes")[0].startswith("501 5.5.4 ")
        assert client.cmd("EHLO evil.example")[-1].startswith("250 ")
        client.cmd(f"MAIL FROM:<{STRANGER}>")
        client.cmd(f"RCPT TO:<{USER}>")
        client.cmd("DATA")
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert client.reply()[0].startswith("250")
    (stored,) = inbox(world)
    received, rest = split_received(stored)
    assert rest == b"Subject: x\r\n\r\nx\r\n"
    assert b"\r" not in received.replace(b"\r\n", b"")
    assert received.startswith(b"Received: from evil.example ([127.0.0.1])\r\n")


# Envelope syntax, routing and failure paths


def test_mx_refuses_control_characters_in_sender(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        reply = client.cmd("MAIL FROM:<a\rRSET@ext.test>")
        assert reply[0].startswith("501 5.1.7 "), reply
        assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250")


@pytest.mark.parametrize("rcpt", ["a\x01b@ext.test", "a\rb@ext.test", "a\x7fb@ext.test"], ids=repr)
def test_submission_refuses_control_characters_in_recipient(world: World, rcpt: str) -> None:
    with world.raw(Role.SUBMISSIONS) as client:
        client.reply()
        client.cmd("EHLO client.example")
        assert client.cmd(auth_plain_command(USER, PASSWORD))[0].startswith("235")
        assert client.cmd(f"MAIL FROM:<{USER}>")[0].startswith("250")
        reply = client.cmd(f"RCPT TO:<{rcpt}>")
        assert reply[0].startswith("501 5.1.3 "), reply
        assert client.cmd(f"RCPT TO:<{STRANGER}>")[0].startswith("250")


def auth_plain_command(user: str, password: str) -> str:
    return "AUTH " + auth_plain(user, password)


def test_submission_routes_foreign_recipient_to_relay(world: World) -> None:
    with world.smtps() as client:
        client.login(USER, PASSWORD)
        client.sendmail(USER, [STRANGER, OTHER], MESSAGE)
    (accepted,) = world.routed
    assert accepted.rcpt_tos == (STRANGER, OTHER)
    assert accepted.authenticated_user == USER
    assert accepted.mail_from == USER
    assert [rcpt for rcpt, _ in world.relayed] == [STRANGER]
    (stored,) = inbox(world, OTHER)
    assert " for <" not in unfold(split_received(stored)[0])  # several recipients: no "for"


def test_submission_refuses_unknown_local_user(world: World) -> None:
    with world.smtps() as client:
        client.login(USER, PASSWORD)
        client.mail(USER)
        code, reply = client.rcpt("nobody@example.org")
        assert code == 550, reply
        assert reply.startswith(b"5.1.1 ")


def test_storage_failure_is_a_temporary_error(world: World) -> None:
    world.storage_broken = True
    with world.smtp(Role.SMTP) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(STRANGER, [USER], MESSAGE)
        assert info.value.smtp_code == 451
        assert info.value.smtp_error.startswith(b"4.3.0 ")
        world.storage_broken = False
        client.rset()
        assert client.sendmail(STRANGER, [USER], MESSAGE) == {}
    assert len(inbox(world)) == 1


def test_submissions_refuses_starttls_inside_tls(world: World) -> None:
    with world.raw(Role.SUBMISSIONS) as client:
        client.reply()
        client.cmd("EHLO client.example")
        reply = client.cmd("STARTTLS")
        assert reply[0][:1] in ("4", "5"), reply  # aiosmtpd: 454 4.7.0 TLS not available
        assert client.cmd("NOOP") == ["250 2.0.0 OK"]


@contextlib.contextmanager
def single_listener(
    ca: CertificateAuthority, role: Role, *, idle_timeout: float, tls_handshake_timeout: float
) -> Iterator[int]:
    """One listener with its own timeouts on its own loop; yields its port."""
    store = Store()
    listeners = SMTPListeners(ca, thread_name="smtp-single-listener")
    try:
        ports = listeners.start(
            [role],
            store=store,
            router=lambda accepted: None,
            local_domains=LOCAL_DOMAINS,
            max_recipients=MAX_RECIPIENTS,
            max_message_size=LIMIT,
            idle_timeout=idle_timeout,
            tls_handshake_timeout=tls_handshake_timeout,
        )
        yield ports[role]
    finally:
        errors = listeners.close()
    assert errors == []


def test_submissions_drops_silent_client_at_handshake_timeout(ca: CertificateAuthority) -> None:
    with single_listener(
        ca, Role.SUBMISSIONS, idle_timeout=TIMEOUT, tls_handshake_timeout=0.2
    ) as port:
        # silent: the server must hang up on its own, well before our TIMEOUT
        with (
            socket.create_connection((HOST, port), timeout=TIMEOUT) as sock,
            contextlib.suppress(ConnectionResetError),
        ):
            assert sock.recv(4096) == b""
        # the twin: a client that does the handshake is served
        ctx = ca.client_context()
        with smtplib.SMTP_SSL(HOST, port, timeout=TIMEOUT, context=ctx) as client:
            assert client.noop()[0] == 250


def test_idle_client_is_dropped(ca: CertificateAuthority) -> None:
    with (
        single_listener(ca, Role.SMTP, idle_timeout=0.5, tls_handshake_timeout=TIMEOUT) as port,
        RawSMTPClient(port) as client,
    ):
        assert client.reply()[0].startswith("220 ")
        assert client.cmd("NOOP") == ["250 OK"]  # the twin: an active client is served
        with contextlib.suppress(ConnectionResetError):
            assert client.read_to_eof() == b""


def test_starttls_forgets_the_transaction(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250")
        assert client.cmd("STARTTLS")[0].startswith("220")
        client.starttls(world.client_context())
        client.cmd("EHLO client.example")
        reply = client.cmd(f"RCPT TO:<{USER}>")
        assert reply[0].startswith("503 5.5.1 "), reply
        assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250")
        assert client.cmd(f"RCPT TO:<{USER}>")[0].startswith("250")


# reply batching (RFC 2920): fewer TLS records and sends, never a held-back answer


def test_pipelined_mail_rcpt_data_answered_in_one_write(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        client.send(f"MAIL FROM:<{STRANGER}>\r\nRCPT TO:<{USER}>\r\nDATA\r\n".encode())
        first = client.sock.recv(65536)  # one write from the server arrives as one segment
        assert [line[:3] for line in first.split(b"\r\n")[:-1]] == [b"250", b"250", b"354"]
        client.send(BARE + b".\r\n")
        assert client.reply()[0].startswith("250 ")
    assert len(inbox(world)) == 1


def test_ehlo_reply_lines_arrive_in_one_write(world: World) -> None:
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.send(b"EHLO client.example\r\n")
        data = client.sock.recv(65536)
        lines = data.split(b"\r\n")
        assert data.endswith(b"\r\n") and len(lines) > 3
        assert all(line.startswith(b"250-") for line in lines[:-2])
        assert lines[-2].startswith(b"250 ")


def test_mail_reply_not_held_for_an_unfinished_next_line(world: World) -> None:
    # The 250 waits only for a *complete* buffered command: a client that has sent part of
    # the next line, or nothing, gets its answer at once.
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        client.send(f"MAIL FROM:<{STRANGER}>\r\nRCPT TO:<{USER}".encode())
        assert client.reply()[0].startswith("250 ")
        client.send(b">\r\n")
        assert client.reply()[0].startswith("250 ")
        assert client.cmd("RSET")[0].startswith("250 ")


def test_final_dot_reply_not_held_for_a_pipelined_command(world: World) -> None:
    # RFC 1047: the 250 for the final dot goes out at once, even with the next command queued.
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        client.cmd(f"MAIL FROM:<{STRANGER}>")
        client.cmd(f"RCPT TO:<{USER}>")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BARE + b".\r\nNOOP\r\n")
        first = client.sock.recv(65536)
        assert first.startswith(b"250 ")
        rest = first.split(b"\r\n", 1)[1]
        client.buf = rest
        assert client.reply()[0].startswith("250 ")  # the NOOP's own answer


# MAIL/RCPT paths: the fast path parses exactly as aiosmtpd's RFC 5322 parser

_PATH_CHARS = 'ab.-+_@<>"()[] \tZ9=\\:'


def _both_parsers(arg: str) -> tuple[object, object]:
    from aiosmtpd.smtp import SMTP

    from roundtrip.servers._smtpsession import SMTPSession

    bare = object.__new__(SMTPSession)  # _getaddr reads nothing but local_part_limit

    def outcome(parse: Any) -> object:
        try:
            return parse(bare, arg)
        except Exception as exc:  # the email parser fails on some inputs: fail alike
            return type(exc)

    ours, reference = outcome(SMTPSession._getaddr), outcome(SMTP._getaddr)
    if isinstance(reference, type):  # where aiosmtpd's parser crashes, ours says "unparsable"
        reference = (None, None)
    return ours, reference


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.c>",
        "<a@b.c> SIZE=10",
        "<first.last+tag@sub.example.org>  BODY=8BITMIME",
        "<A@B.C>x",
        " <a@b>",
        "<a@[127.0.0.1]>",
        "<>",
        "<a..b@c>",
        '<"q q"@b>',
        "<a@b.c> (comment) SIZE=1",
        "<a@b.c> ",
        "<@relay.example:a@b.c>",
        "a@b.c",
        "<a@b.c> SIZE=1 ",
        "<a@b.c>\tBODY=7BIT",
        "<",
        "<9@[",
    ],
)
def test_fast_path_parses_paths_as_aiosmtpd_does(arg: str) -> None:
    fast, reference = _both_parsers(arg)
    assert fast == reference


@hypothesis.settings(max_examples=2000, deadline=None, derandomize=True)
@hypothesis.given(hypothesis.strategies.text(alphabet=_PATH_CHARS, max_size=24))
def test_fast_path_agrees_with_aiosmtpd_on_generated_paths(tail: str) -> None:
    for arg in ("<" + tail, "<a@b" + tail, tail):
        fast, reference = _both_parsers(arg)
        assert fast == reference, arg


@pytest.mark.parametrize("command", ["MAIL FROM:<", "MAIL FROM:<(", "MAIL FROM:<9@[", "RCPT TO:<"])
def test_unparsable_path_is_malformed_and_the_session_goes_on(world: World, command: str) -> None:
    # The email package's parser raises IndexError on these; that must not reach the client.
    with world.raw(Role.SMTP) as client:
        client.reply()
        client.cmd("EHLO client.example")
        if command.startswith("RCPT"):
            client.cmd(f"MAIL FROM:<{STRANGER}>")
        assert client.cmd(command) == ["553 5.1.3 Error: malformed address"]
        client.cmd("RSET")
        assert client.cmd(f"MAIL FROM:<{STRANGER}>")[0].startswith("250 ")
