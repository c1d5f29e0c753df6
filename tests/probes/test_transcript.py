"""Session transcripts of the probe's connections: complete, redacted, bounded.

The round-trip tests run the probe against our own stack over real sockets; the
``test_recorder_*`` tests feed the pure recorder the bytes of mechanisms our stack does not
offer (CRAM-MD5, XOAUTH2, OAUTHBEARER, IMAP AUTHENTICATE, POP3 AUTH and APOP).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from roundtrip import MailStack
from roundtrip.config import Endpoint
from roundtrip.probes._net import Timeline
from roundtrip.probes._transcript import MAX_LINES, REDACTED, Recorder
from roundtrip.probes.roundtrip import ProbeResult, run_probe
from roundtrip.probes.send import _SMTPClient

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _endpoint(stack: MailStack, domain: str, service: str, password: str | None = None) -> Endpoint:
    ep = stack.endpoints(domain)
    user = stack.user(domain)
    protocol = service.rstrip("s").replace("submission", "smtp")
    tls = "implicit" if service.endswith("s") else "starttls"
    return Endpoint(
        protocol,
        tls,
        ep.host,
        ep.ports[service],
        user.address,
        user.password if password is None else password,
        ep.hostname,
    )


def _probe(
    stack: MailStack,
    smtp_service: str,
    reader: str,
    *,
    smtp_password: str | None = None,
    reader_password: str | None = None,
) -> ProbeResult:
    return run_probe(
        _endpoint(stack, "example.com", smtp_service, smtp_password),
        _endpoint(stack, "example.org", reader, reader_password),
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=TIMEOUT,
        settle=0.05,
    )


def secret_forms(user: str, password: str) -> list[str]:
    """The password and every form a client sends it in (SASL PLAIN and LOGIN, base64)."""
    b64 = lambda raw: base64.b64encode(raw.encode()).decode()  # noqa: E731
    return [
        password,
        b64(password),
        b64(f"\0{user}\0{password}"),
        b64(f"{user}\0{user}\0{password}"),
    ]


def _everything(result: ProbeResult) -> str:
    return "\n".join(str(t) for t in result.transcripts) + json.dumps(result.as_dict())


def _lines(result: ProbeResult, protocol: str) -> list[str]:
    return [
        f"{line.dir} {line.text}"
        for t in result.transcripts
        if t.protocol == protocol
        for line in t.lines
    ]


@pytest.mark.parametrize(
    ("smtp_service", "reader"), [("submissions", "imaps"), ("submission", "pop3")]
)
def test_transcript_of_a_passing_probe_holds_every_exchange(
    stack: MailStack, smtp_service: str, reader: str
) -> None:
    result = _probe(stack, smtp_service, reader)
    assert result.ok, result.error
    smtp = _lines(result, "smtp")
    assert any(line.startswith("== connected to 127.0.0.1:") for line in smtp)
    assert any(
        line.startswith("== TLS TLSv1.") and "subject CN=mail.example.com" in line for line in smtp
    )
    assert any(line.startswith("<- 220 ") for line in smtp)
    assert "-> ehlo roundtrip.probe" in smtp
    assert f"-> AUTH PLAIN {REDACTED}" in smtp
    # smtplib writes "FROM:" up to 3.12 and "from:" from 3.13 on (the verb is case-blind).
    lowered = [line.lower() for line in smtp]
    assert "-> mail from:<user@example.com>" in lowered
    assert "-> rcpt to:<user@example.org>" in lowered
    assert "-> data" in smtp
    content = smtp.index("-> data") + 2
    assert smtp[content].startswith("-> [") and "bytes, sha256 " in smtp[content]
    # The content is one line: none of the message's own lines is in the transcript.
    assert not any("roundtrip probe token" in line for line in smtp)
    if smtp_service == "submission":
        assert smtp.index("-> STARTTLS") < smtp.index(next(x for x in smtp if "== TLS" in x))
    transcript = next(t for t in result.transcripts if t.protocol == "smtp")
    assert "smtp auth" in transcript.steps and "smtp submit" in transcript.steps
    assert str(transcript).splitlines()[1].endswith(f"== connected to {transcript.peer}")
    reading = _lines(result, reader.rstrip("s"))
    if reader == "imaps":
        assert any(
            line.startswith("-> ") and line.endswith(f" LOGIN user@example.org {REDACTED}")
            for line in reading
        )
        assert any(" UID FETCH " in line for line in reading)
        fetch = next(i for i, line in enumerate(reading) if " FETCH (UID" in line)
        assert reading[fetch + 1].startswith("<- [") and "bytes, sha256" in reading[fetch + 1]
    else:
        assert "-> USER user@example.org" in reading
        assert f"-> PASS {REDACTED}" in reading
        retr = reading.index("-> RETR 1")
        assert reading[retr + 2].startswith("<- [") and reading[retr + 3] == "<- ."
    for user in ("example.com", "example.org"):
        account = stack.user(user)
        for secret in secret_forms(account.address, account.password):
            assert secret not in _everything(result)
    assert not any(t.failed for t in result.transcripts)


def test_transcript_wrong_smtp_password_marks_the_connection_with_the_refusal(
    stack: MailStack,
) -> None:
    result = _probe(stack, "submissions", "imaps", smtp_password="wrong-smtp-secret")
    assert not result.ok and result.error_step == "AUTH"
    failed = [t for t in result.transcripts if t.failed]
    assert [t.protocol for t in failed] == ["smtp"]
    lines = _lines(result, "smtp")
    assert lines[-1].startswith("<- 535 ")
    # smtplib tries every mechanism both sides know: PLAIN, then LOGIN.
    auth = lines[lines.index(f"-> AUTH PLAIN {REDACTED}") :]
    assert auth[1].startswith("<- 535 ")
    assert [line for line in auth if line.startswith("->")] == [
        f"-> AUTH PLAIN {REDACTED}",
        f"-> AUTH LOGIN {REDACTED}",
        f"-> {REDACTED}",
    ]
    for secret in secret_forms("user@example.com", "wrong-smtp-secret"):
        assert secret not in _everything(result)


def test_transcript_wrong_imap_password_marks_the_imap_connection(stack: MailStack) -> None:
    result = _probe(stack, "submissions", "imap", reader_password="wrong-imap-secret")
    assert not result.ok and result.error_step == "IMAP LOGIN"
    assert [t.protocol for t in result.transcripts if t.failed] == ["imap"]
    lines = _lines(result, "imap")
    assert " NO " in lines[-1] and lines[-1].startswith("<- ")
    assert lines[-2].endswith(f"LOGIN user@example.org {REDACTED}")
    assert "wrong-imap-secret" not in _everything(result)


def test_transcript_wrong_pop3_password_redacts_pass(stack: MailStack) -> None:
    result = _probe(stack, "submissions", "pop3s", reader_password="wrong-pop3-secret")
    assert not result.ok
    lines = _lines(result, "pop3")
    assert f"-> PASS {REDACTED}" in lines and lines[-1].startswith("<- -ERR")
    assert "wrong-pop3-secret" not in _everything(result)


@pytest.mark.parametrize("initial_response", [True, False])
def test_transcript_smtp_auth_login_redacts_user_and_password(
    stack: MailStack, initial_response: bool
) -> None:
    """AUTH LOGIN (which the stack offers besides PLAIN) over a real socket, with and
    without the initial response: both base64 continuation lines are hidden."""
    timeline = Timeline()
    endpoint = _endpoint(stack, "example.com", "submissions")
    client = _SMTPClient(endpoint, stack.client_context(), timeline, TIMEOUT)
    try:
        client.connect(endpoint.server_name, endpoint.port)
        client.ehlo("roundtrip.probe")
        client.user, client.password = endpoint.user, endpoint.password
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response)
        assert code == 235
        client.quit()
    finally:
        client.close()
    (transcript,) = timeline.transcripts
    lines = [f"{line.dir} {line.text}" for line in transcript.lines]
    auth = next(i for i, line in enumerate(lines) if line.startswith("-> AUTH LOGIN"))
    sent_after = [line for line in lines[auth + 1 :] if line.startswith("->")]
    assert sent_after[:-1] == [f"-> {REDACTED}"] * (1 if initial_response else 2)
    assert sent_after[-1] == "-> quit"
    text = str(transcript)
    for secret in [*secret_forms(endpoint.user, endpoint.password), _b64(endpoint.user)]:
        assert secret not in text


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the recorder alone: mechanisms the stack does not offer -----------------------------------


def _record(protocol: str, exchange: list[tuple[str, bytes]]) -> list[str]:
    recorder = Recorder(protocol, "192.0.2.1:1", clock=lambda: 0.0)
    for direction, data in exchange:
        (recorder.sent if direction == ">" else recorder.received)(data)
    return [f"{line.dir} {line.text}" for line in recorder.transcript.lines]


SECRET = "s3cret-pass"


@pytest.mark.parametrize(
    ("protocol", "exchange", "kept"),
    [
        (
            "smtp",
            [
                (">", b"AUTH CRAM-MD5\r\n"),
                ("<", b"334 PDEyMzQ+\r\n"),
                (">", _b64(f"user {SECRET}").encode() + b"\r\n"),
                ("<", b"235 ok\r\n"),
            ],
            ["-> AUTH CRAM-MD5", "<- 334 PDEyMzQ+", f"-> {REDACTED}", "<- 235 ok"],
        ),
        (
            "smtp",
            [
                (">", b"AUTH XOAUTH2 " + _b64(f"user=u\1auth=Bearer {SECRET}\1\1").encode()),
                (">", b"\r\n"),
                ("<", b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
                (">", b"\r\n"),
                ("<", b"535 5.7.8 no\r\n"),
                (">", b"QUIT\r\n"),
            ],
            [
                f"-> AUTH XOAUTH2 {REDACTED}",
                "<- 334 eyJzdGF0dXMiOiI0MDEifQ==",
                f"-> {REDACTED}",
                "<- 535 5.7.8 no",
                "-> QUIT",
            ],
        ),
        (
            "imap",
            [
                (
                    ">",
                    b"A1 AUTHENTICATE OAUTHBEARER " + _b64(f"n,,\1auth=Bearer {SECRET}").encode(),
                ),
                (">", b"\r\n"),
                ("<", b"+ eyJzdGF0dXMiOiJpbnZhbGlkIn0=\r\n"),
                (">", b"\1\r\n"),
                ("<", b"A1 NO [AUTHENTICATIONFAILED] no\r\n"),
                (">", b"A2 LOGOUT\r\n"),
            ],
            [
                f"-> A1 AUTHENTICATE OAUTHBEARER {REDACTED}",
                "<- + eyJzdGF0dXMiOiJpbnZhbGlkIn0=",
                f"-> {REDACTED}",
                "<- A1 NO [AUTHENTICATIONFAILED] no",
                "-> A2 LOGOUT",
            ],
        ),
        (
            "imap",
            [
                (">", b"A1 AUTHENTICATE PLAIN\r\n"),
                ("<", b"+ \r\n"),
                (">", _b64(f"\0user\0{SECRET}").encode() + b"\r\n"),
                ("<", b"A1 OK done\r\n"),
            ],
            ["-> A1 AUTHENTICATE PLAIN", "<- + ", f"-> {REDACTED}", "<- A1 OK done"],
        ),
        (
            "imap",
            [
                (">", b'A1 LOGIN "us er" "' + SECRET.encode() + b'"\r\n'),
                ("<", b"A1 OK\r\n"),
            ],
            [f'-> A1 LOGIN "us er" {REDACTED}', "<- A1 OK"],
        ),
        (
            "imap",
            [
                (">", b"A1 LOGIN user {11}\r\n"),
                ("<", b"+ go\r\n"),
                (">", SECRET.encode() + b"\r\n"),
                ("<", b"A1 OK\r\n"),
            ],
            [f"-> A1 LOGIN {REDACTED}", "<- + go", f"-> {REDACTED}", f"-> {REDACTED}", "<- A1 OK"],
        ),
        (
            "pop3",
            [
                (">", b"AUTH PLAIN\r\n"),
                ("<", b"+ \r\n"),
                (">", _b64(f"\0user\0{SECRET}").encode() + b"\r\n"),
                ("<", b"+OK\r\n"),
                (">", b"APOP user c4c9334bac560ecc979e58001b3e22fb\r\n"),
                (">", f"PASS {SECRET}\r\n".encode()),
            ],
            [
                "-> AUTH PLAIN",
                "<- + ",
                f"-> {REDACTED}",
                "<- +OK",
                f"-> APOP user {REDACTED}",
                f"-> PASS {REDACTED}",
            ],
        ),
    ],
    ids=[
        "smtp-cram-md5",
        "smtp-xoauth2",
        "imap-oauthbearer",
        "imap-plain",
        "imap-login",
        "imap-login-literal",
        "pop3-auth-apop-pass",
    ],
)
def test_recorder_redacts_every_mechanism(
    protocol: str, exchange: list[tuple[str, bytes]], kept: list[str]
) -> None:
    lines = _record(protocol, exchange)
    assert lines == kept
    text = "\n".join(lines)
    for secret in [SECRET, *(_b64(raw) for raw in (f"\0user\0{SECRET}", f"user {SECRET}"))]:
        assert secret not in text


def test_recorder_shows_commands_that_are_not_credentials() -> None:
    """The twin: outside an authentication exchange, lines go through unchanged."""
    lines = _record(
        "smtp",
        [(">", b"MAIL FROM:<a@example.com>\r\n"), ("<", b"250 ok\r\n"), (">", b"AUTHX y\r\n")],
    )
    assert lines == ["-> MAIL FROM:<a@example.com>", "<- 250 ok", "-> AUTHX y"]


def test_recorder_keeps_at_most_max_lines_with_a_marker() -> None:
    recorder = Recorder("imap", "192.0.2.1:1", clock=lambda: 0.0)
    for number in range(5 * MAX_LINES):
        recorder.sent(f"A{number} NOOP\r\n".encode())
    lines = recorder.transcript.lines
    assert len(lines) == MAX_LINES + 1
    assert lines[MAX_LINES // 2].text == f"... {4 * MAX_LINES} lines omitted"
    assert lines[0].text == "A0 NOOP" and lines[-1].text == f"A{5 * MAX_LINES - 1} NOOP"
    assert recorder.transcript.as_dict()["omitted"] == 4 * MAX_LINES


def test_recorder_below_the_limit_has_no_marker() -> None:
    recorder = Recorder("imap", "192.0.2.1:1", clock=lambda: 0.0)
    for number in range(MAX_LINES):
        recorder.sent(f"A{number} NOOP\r\n".encode())
    assert len(recorder.transcript.lines) == MAX_LINES
    assert not any("omitted" in line.text for line in recorder.transcript.lines)


def test_recorder_cuts_a_literal_split_across_reads() -> None:
    recorder = Recorder("imap", "192.0.2.1:1", clock=lambda: 0.0)
    for chunk in (b"* 1 FETCH (BODY[] {11}\r\nhello", b" worl", b"d)\r\nA1 OK\r\n"):
        recorder.received(chunk)
    texts = [line.text for line in recorder.transcript.lines]
    assert texts[0] == "* 1 FETCH (BODY[] {11}"
    assert texts[1].startswith("[11 bytes, sha256 ")
    assert texts[2:] == [")", "A1 OK"]
