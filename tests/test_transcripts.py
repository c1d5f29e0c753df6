"""Transcripts of the stack's connections: recorded, redacted for every mechanism, bounded.

Real clients (smtplib, imaplib, poplib, and a raw line client for what those cannot send:
SASL initial responses, literals, POP3 AUTH) log in to a running stack over loopback; then no
transcript may hold the password, the token, or the base64 payload that carries them, while
the login itself (the command, the user name, the server's answer) is still there to read.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator

import pytest

from roundtrip import MailStack, StackConfig
from roundtrip.probes._transcript import MAX_LINES
from roundtrip.servers import _recording
from roundtrip.stack import Transcript

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(transcript_connections=50)) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


class LineClient:
    """A raw line client over TLS from the first byte, for what the stdlib clients do not send."""

    def __init__(self, stack: MailStack, service: str) -> None:
        host, port = stack.endpoints("example.com").address(service)
        raw = socket.create_connection((host, port), timeout=TIMEOUT)
        self.sock = stack.client_context().wrap_socket(raw, server_hostname="mail.example.com")
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        data = self.file.readline()
        assert data, "the server closed the connection"
        return data

    def send(self, text: str | bytes) -> None:
        self.sock.sendall((text.encode() if isinstance(text, str) else text) + b"\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _settled(stack: MailStack, service: str, closed: int = 1) -> list[Transcript]:
    """The service's transcripts once ``closed`` of its connections have ended (the server
    notes the close on its loop, a moment after the client's side is done)."""
    deadline = time.monotonic() + TIMEOUT
    transcripts: list[Transcript] = []
    while time.monotonic() < deadline:
        transcripts = stack.transcripts(service=service)
        done = sum(1 for t in transcripts if any("connection closed" in x.text for x in t.lines))
        if done >= closed:
            return transcripts
        stack.relay_idle(timeout=TIMEOUT)  # a round trip to the loop thread: it ran meanwhile
    raise AssertionError(f"{service}: {closed} closed connection(s) expected, got {transcripts}")


def _assert_secret_free(stack: MailStack, *secrets: str) -> str:
    """Every transcript (text and JSON) of the stack, checked for the secrets; returned."""
    transcripts = stack.transcripts()
    assert transcripts, "nothing was recorded"
    text = "\n".join(str(t) for t in transcripts)
    text += json.dumps([t.as_dict() for t in transcripts])
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked into a transcript"
    return text


def _plain(user: str, secret: str) -> str:
    return _b64(f"\0{user}\0{secret}")


def _xoauth2(user: str, token: str) -> str:
    return _b64(f"user={user}\1auth=Bearer {token}\1\1")


def _oauthbearer(user: str, token: str) -> str:
    return _b64(f"n,a={user},\1auth=Bearer {token}\1\1")


# -- SMTP ---------------------------------------------------------------------------------


def _smtp(stack: MailStack) -> smtplib.SMTP_SSL:
    host, port = stack.endpoints("example.com").address("submissions")
    return smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)


def test_transcripts_smtp_auth_plain_initial_response_redacted(stack: MailStack) -> None:
    user = stack.user("example.com")
    with _smtp(stack) as client:
        client.ehlo()
        code, _ = client.docmd("AUTH", f"PLAIN {_plain(user.address, user.password)}")
        assert code == 235
    _settled(stack, "submissions")
    text = _assert_secret_free(stack, user.password, _plain(user.address, user.password))
    assert "-> AUTH PLAIN ****" in text
    assert "== authenticated as user@example.com" in text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_transcripts_smtp_auth_continuations_redacted(stack: MailStack, mechanism: str) -> None:
    user = stack.user("example.com")
    with _smtp(stack) as client:
        client.ehlo()
        code, _ = client.docmd("AUTH", mechanism)
        assert code == 334
        if mechanism == "PLAIN":
            code, _ = client.docmd(_plain(user.address, user.password))
        else:
            code, _ = client.docmd(_b64(user.address))
            assert code == 334
            code, _ = client.docmd(_b64(user.password))
        assert code == 235
    _settled(stack, "submissions")
    text = _assert_secret_free(
        stack,
        user.password,
        _b64(user.password),
        _b64(user.address),
        _plain(user.address, user.password),
    )
    assert f"-> AUTH {mechanism}" in text and "-> ****" in text
    assert "<- 235 2.7.0 Authentication successful" in text


@pytest.mark.parametrize(
    ("mechanism", "encode"), [("XOAUTH2", _xoauth2), ("OAUTHBEARER", _oauthbearer)]
)
def test_transcripts_smtp_bearer_tokens_redacted(
    stack: MailStack, mechanism: str, encode: Callable[[str, str], str]
) -> None:
    user = stack.user("example.com")
    token = stack.oauth_token(user)
    with _smtp(stack) as client:
        client.ehlo()
        code, _ = client.docmd("AUTH", f"{mechanism} {encode(user.address, token)}")
        assert code == 235
        client.ehlo()
        code, _ = client.docmd("RSET")
        # And as a continuation, without an initial response.
        code, _ = client.docmd("AUTH", mechanism)
        assert code == 503  # already authenticated: the exchange ends at once
    _settled(stack, "submissions")
    text = _assert_secret_free(stack, token, encode(user.address, token))
    assert f"-> AUTH {mechanism} ****" in text


def test_transcripts_smtp_failed_login_redacted_too(stack: MailStack) -> None:
    """A wrong password is a credential too (often a real one, of another account)."""
    user = stack.user("example.com")
    wrong = "Wrong-But-Real-Elsewhere-1"
    with _smtp(stack) as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login(user.address, wrong)
    _settled(stack, "submissions")
    text = _assert_secret_free(stack, wrong, _plain(user.address, wrong))
    assert "<- 535" in text


# -- IMAP ---------------------------------------------------------------------------------


def _imap(stack: MailStack) -> imaplib.IMAP4_SSL:
    host, port = stack.endpoints("example.com").address("imaps")
    return imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)


def test_transcripts_imap_login_keeps_user_not_password(stack: MailStack) -> None:
    user = stack.user("example.com")
    client = _imap(stack)
    client.login(user.address, user.password)
    client.logout()
    (transcript,) = _settled(stack, "imaps")
    text = _assert_secret_free(stack, user.password)
    assert f"LOGIN {user.address} ****" in text
    assert transcript.addresses == [user.address]


def test_transcripts_imap_login_literal_password_redacted(stack: MailStack) -> None:
    user = stack.user("example.com")
    client = LineClient(stack, "imaps")
    try:
        client.line()  # greeting
        client.send(f"a1 LOGIN {user.address} {{{len(user.password)}}}")
        assert client.line().startswith(b"+")
        client.send(user.password)
        assert client.line().startswith(b"a1 OK")
        client.send("a2 LOGOUT")
        while not client.line().startswith(b"a2 "):
            pass
    finally:
        client.close()
    _settled(stack, "imaps")
    text = _assert_secret_free(stack, user.password)
    assert "a1 OK" in text


@pytest.mark.parametrize("mechanism", ["PLAIN", "XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("initial", [True, False], ids=["sasl-ir", "continuation"])
def test_transcripts_imap_authenticate_redacted(
    stack: MailStack, mechanism: str, initial: bool
) -> None:
    user = stack.user("example.com")
    secret = user.password if mechanism == "PLAIN" else stack.oauth_token(user)
    encode = {"PLAIN": _plain, "XOAUTH2": _xoauth2, "OAUTHBEARER": _oauthbearer}[mechanism]
    payload = encode(user.address, secret)
    client = LineClient(stack, "imaps")
    try:
        client.line()
        if initial:
            client.send(f"a1 AUTHENTICATE {mechanism} {payload}")
        else:
            client.send(f"a1 AUTHENTICATE {mechanism}")
            assert client.line().startswith(b"+")
            client.send(payload)
        assert client.line().startswith(b"a1 OK")
        client.send("a2 LOGOUT")
        while not client.line().startswith(b"a2 "):
            pass
    finally:
        client.close()
    (transcript,) = _settled(stack, "imaps")
    text = _assert_secret_free(stack, secret, payload)
    assert f"a1 AUTHENTICATE {mechanism}" in text and "<- a1 OK" in text
    assert transcript.addresses == [user.address]  # from the server's note, not the payload


# -- POP3 ---------------------------------------------------------------------------------


def test_transcripts_pop3_pass_redacted(stack: MailStack) -> None:
    user = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("pop3s")
    client = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    client.user(user.address)
    client.pass_(user.password)
    client.quit()
    (transcript,) = _settled(stack, "pop3s")
    text = _assert_secret_free(stack, user.password)
    assert "-> PASS ****" in text
    assert transcript.addresses == [user.address]


@pytest.mark.parametrize("mechanism", ["PLAIN", "XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("initial", [True, False], ids=["initial", "continuation"])
def test_transcripts_pop3_auth_redacted(stack: MailStack, mechanism: str, initial: bool) -> None:
    user = stack.user("example.com")
    secret = user.password if mechanism == "PLAIN" else stack.oauth_token(user)
    encode = {"PLAIN": _plain, "XOAUTH2": _xoauth2, "OAUTHBEARER": _oauthbearer}[mechanism]
    payload = encode(user.address, secret)
    client = LineClient(stack, "pop3s")
    try:
        client.line()
        if initial:
            client.send(f"AUTH {mechanism} {payload}")
        else:
            client.send(f"AUTH {mechanism}")
            assert client.line().startswith(b"+")
            client.send(payload)
        assert client.line().startswith(b"+OK")
        client.send("QUIT")
        client.line()
    finally:
        client.close()
    _settled(stack, "pop3s")
    text = _assert_secret_free(stack, secret, payload)
    assert f"-> AUTH {mechanism}" in text


# -- content, filters, bounds -------------------------------------------------------------


def _send(stack: MailStack, body: bytes, message_id: str = "<t1@example.com>") -> None:
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    message = f"Message-ID: {message_id}\r\nSubject: t\r\n\r\n".encode() + body
    with _smtp(stack) as client:
        client.login(sender.address, sender.password)
        client.sendmail(sender.address, [rcpt.address], message)
    stack.wait_for(to=rcpt.address, timeout=TIMEOUT)


def test_transcripts_follow_a_message_through_every_hop(stack: MailStack) -> None:
    _send(stack, b"hello\r\n", "<hop@example.com>")
    stack.relay_idle(TIMEOUT)
    services = {t.service for t in stack.transcripts(message_id="hop@example.com")}
    assert services == {"submissions", "relay", "smtp"}
    relay = stack.transcripts(service="relay")[0]
    assert relay.addresses == ["user@example.com", "user@example.org"]
    assert any(line.text.startswith("TLS TLSv1.") for line in relay.lines)
    # The content is one line: its size and digest, the same on both ends of the relay hop.
    sent = [x.text for x in relay.lines if x.text.startswith("[")]
    received = [
        x.text for x in stack.transcripts(service="smtp")[0].lines if x.text.startswith("[")
    ]
    assert sent == received and "sha256" in sent[0]
    dns = stack.transcripts(service="dns")
    # The relay asks the stack's DNS server in this process: no wire format, same records.
    (mx,) = [t for t in dns if t.lines[0].text == "MX example.org."]
    assert (mx.local, mx.peer) == ("memory", "relay")
    assert mx.lines[1].text == "NOERROR MX 10 mail.example.org."


def test_transcripts_filters_exclude_other_messages(stack: MailStack) -> None:
    _send(stack, b"one\r\n", "<one@example.com>")
    assert stack.transcripts(message_id="<nowhere@example.com>") == []
    assert stack.transcripts(address="nobody@example.com") == []
    assert stack.transcripts(service="imaps") == []


def test_transcripts_big_message_is_a_size_and_a_digest(stack: MailStack) -> None:
    body = b"x" * 998 + b"\r\n"
    _send(stack, body * 1024, "<big@example.com>")
    (submission,) = stack.transcripts(service="submissions")
    lines = [x.text for x in submission.lines]
    assert any(text.startswith("[") and "bytes, sha256 " in text for text in lines)
    assert any(text.startswith("250 2.0.0 OK: queued") for text in lines)
    # The bytes were never kept.
    (session,) = [s for s in stack._recordings.sessions if s.service == "submissions"]
    assert session.kept <= _recording.MAX_BYTES


def test_transcripts_big_fetch_keeps_bounded_bytes_and_the_reply_after(stack: MailStack) -> None:
    body = b"y" * 998 + b"\r\n"
    _send(stack, body * 200, "<fetch@example.com>")
    rcpt = stack.user("example.org")
    host, port = stack.endpoints("example.org").address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    client.login(rcpt.address, rcpt.password)
    client.select("INBOX")
    client.fetch("1", "(RFC822)")
    client.logout()
    (transcript,) = _settled(stack, "imaps")
    texts = [x.text for x in transcript.lines]
    assert any("bytes, sha256" in t for t in texts), texts
    assert any("OK FETCH completed" in t for t in texts)
    (session,) = [s for s in stack._recordings.sessions if s.service == "imaps"]
    head, _, tail = session.snapshot()
    kept = sum(
        len(p) for _, kind, p in head + tail if kind in (_recording.CLIENT, _recording.SERVER)
    )
    assert kept <= _recording.MAX_BYTES + _recording.TAIL_EVENTS * _recording.SMALL_CHUNK


def test_transcripts_lines_per_connection_are_capped(stack: MailStack) -> None:
    user = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("pop3s")
    client = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    client.user(user.address)
    client.pass_(user.password)
    for _ in range(MAX_LINES):
        client.noop()
    client.quit()
    (transcript,) = _settled(stack, "pop3s")
    assert transcript.omitted > 0
    assert len(transcript.lines) == MAX_LINES + 1  # with the "... omitted" marker
    assert transcript.lines[-1].text == "connection closed"
    assert "-> PASS ****" in str(transcript)  # the head is kept: how the session began


def test_transcripts_ring_keeps_the_latest_connections(stack: MailStack) -> None:
    for _ in range(55):
        with _smtp(stack) as client:
            client.noop()
    transcripts = _settled(stack, "submissions", closed=50)
    assert len(transcripts) == 50  # transcript_connections=50


def test_transcripts_off_records_nothing() -> None:
    with MailStack(StackConfig(transcript_connections=0)) as quiet:
        with _smtp(quiet) as client:
            client.noop()
        assert quiet.transcripts() == []


def test_transcripts_config_refuses_a_negative_size() -> None:
    from roundtrip.errors import ConfigError

    with pytest.raises(ConfigError, match="transcript_connections"):
        StackConfig(transcript_connections=-1)


def test_transcripts_str_reads_like_swaks(stack: MailStack) -> None:
    with _smtp(stack) as client:
        client.ehlo("client.example")
    (transcript,) = _settled(stack, "submissions")
    text = str(transcript)
    first, *rest = text.splitlines()
    assert first.startswith("submissions 127.0.0.1:")
    assert any(" ms <- 220 mail.example.com" in line for line in rest)
    assert any(" ms -> ehlo client.example" in line for line in rest)


def test_transcripts_client_tls_failure_is_noted(stack: MailStack) -> None:
    """A STARTTLS handshake that fails leaves a note; one that succeeds names the cipher."""
    host, port = stack.endpoints("example.com").address("imap")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing: verification fails
    client = imaplib.IMAP4(host, port, timeout=TIMEOUT)
    with pytest.raises(ssl.SSLError):
        client.starttls(ssl_context=context)
    client.sock.close()
    good = imaplib.IMAP4(host, port, timeout=TIMEOUT)
    good.starttls(ssl_context=stack.client_context())
    good.logout()
    failed, succeeded = _settled(stack, "imap", closed=2)
    assert any("TLS handshake failed" in x.text for x in failed.lines), str(failed)
    assert not any(x.text.startswith("TLS TLSv") for x in failed.lines)
    assert any(x.text.startswith("TLS TLSv1.3 ") for x in succeeded.lines), str(succeeded)


def test_transcripts_dns_over_udp_and_tcp(stack: MailStack) -> None:
    import dns.message
    import dns.query

    assert stack.dns is not None
    host, port = stack.dns.address
    query = dns.message.make_query("example.org", "MX")
    dns.query.udp(query, host, port=port, timeout=TIMEOUT)
    dns.query.tcp(
        dns.message.make_query("nowhere.example.org", "A"), host, port=port, timeout=TIMEOUT
    )
    udp, tcp = stack.transcripts(service="dns")
    assert (udp.local, [x.text for x in udp.lines]) == (
        "udp",
        ["MX example.org.", "NOERROR MX 10 mail.example.org."],
    )
    assert tcp.local == "tcp" and tcp.lines[1].text.startswith("NXDOMAIN")


def test_transcripts_refused_data_is_noted_not_kept() -> None:
    """A message over the size limit is refused after the final dot: its transcript gives the
    size and the refusal, no digest (its bytes were dropped as they came)."""
    too_big = b"z" * 998 + b"\r\n"
    with MailStack(StackConfig(max_message_size=10_000, transcript_connections=5)) as small:
        sender, rcpt = small.user("example.com"), small.user("example.org")
        host, port = small.endpoints("example.com").address("submissions")
        with smtplib.SMTP_SSL(host, port, context=small.client_context(), timeout=TIMEOUT) as c:
            c.login(sender.address, sender.password)
            c.mail(sender.address)  # no SIZE: the limit is found in DATA
            c.rcpt(rcpt.address)
            code, _ = c.data(too_big * 20)
            assert code == 552
        (transcript,) = small.transcripts(service="submissions")
    texts = [x.text for x in transcript.lines]
    refused = [t for t in texts if "not kept: 552" in t]
    assert refused and refused[0].startswith("[20") and "sha256" not in refused[0], texts
    assert any(t.startswith("552 ") for t in texts)


def test_transcripts_imap_append_literal_is_a_digest(stack: MailStack) -> None:
    user = stack.user("example.com")
    message = b"Subject: appended\r\n\r\n" + b"secret body line\r\n" * 10
    client = _imap(stack)
    client.login(user.address, user.password)
    client.append("INBOX", None, None, message)
    client.logout()
    (transcript,) = _settled(stack, "imaps")
    text = str(transcript)
    assert "secret body line" not in text
    assert f"-> [{len(message)} bytes, sha256 " in text
    assert "OK [APPENDUID" in text or "OK APPEND" in text
