"""What the probe says when a step fails: the reply as text, the greeting it got, the
step and limit of a timeout; and the POP3 delete step it times."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from roundtrip import MailStack
from roundtrip.config import Endpoint
from roundtrip.probes.roundtrip import ProbeResult, run_probe

TIMEOUT = 5.0
PROTOCOL = {"submissions": "smtp", "submission": "smtp", "imaps": "imap", "imap": "imap"}
PROTOCOL |= {"pop3s": "pop3", "pop3": "pop3"}


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _endpoint(
    stack: MailStack, domain: str, service: str, *, protocol: str = "", **changes: str
) -> Endpoint:
    ep, user = stack.endpoints(domain), stack.user(domain)
    fields = {"user": user.address, "password": user.password, "server_name": ep.hostname}
    fields.update(changes)
    return Endpoint(
        protocol or PROTOCOL[service],
        "implicit" if service.endswith("s") else "starttls",
        ep.host,
        ep.ports[service],
        fields["user"],
        fields["password"],
        fields["server_name"],
    )


def _run(
    stack: MailStack,
    smtp: Endpoint,
    reader: Endpoint,
    *,
    timeout: float = TIMEOUT,
    keep: bool = False,
) -> ProbeResult:
    return run_probe(
        smtp,
        reader,
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=timeout,
        keep=keep,
        settle=0.05,
    )


def test_probe_imap_refusal_is_shown_as_text_not_bytes(stack: MailStack) -> None:
    result = _run(
        stack,
        _endpoint(stack, "example.com", "submissions"),
        _endpoint(stack, "example.org", "imaps", password="not-it"),
    )
    assert not result.ok and result.error_step == "IMAP LOGIN"
    assert "answered '[AUTHENTICATIONFAILED] Authentication failed.'" in result.error
    assert "b'" not in result.error and "not-it" not in result.error


def test_probe_imap_right_password_passes(stack: MailStack) -> None:
    result = _run(
        stack,
        _endpoint(stack, "example.com", "submissions"),
        _endpoint(stack, "example.org", "imaps"),
    )
    assert result.ok, result.error


@pytest.mark.parametrize(
    ("service", "seen", "guess"),
    [("imaps", "'* OK [CAPABILITY", "an IMAP server?"), ("pop3s", "'+OK ", "a POP3 server?")],
)
def test_probe_smtp_pointed_at_another_protocol_names_the_greeting(
    stack: MailStack, service: str, seen: str, guess: str
) -> None:
    # The SMTP probe dials the IMAPS (POP3S) port of example.org: TLS works, the greeting not.
    smtp = _endpoint(stack, "example.org", service, protocol="smtp")
    result = _run(stack, smtp, _endpoint(stack, "example.org", "imaps"))
    assert not result.ok and result.error_step == "CONNECT"
    assert f"expected a 220 greeting from {smtp.address}, got {seen}" in result.error
    assert guess in result.error
    assert "does not offer AUTH" not in result.error
    failed = [s for s in result.steps if not s.ok]
    assert [s.name for s in failed] == ["smtp greeting"]
    assert "smtp auth" not in [s.name for s in result.steps]


@pytest.fixture
def refusing_smtp_server() -> Iterator[int]:
    """A server whose greeting is ``554`` (RFC 5321 section 3.1: no service here)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            conn.sendall(b"554 5.3.2 no service for you\r\n")
            try:
                while conn.recv(1024):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, name="refusing-smtp")
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(TIMEOUT * 2)
        listener.close()


def test_probe_smtp_refusing_greeting_is_quoted(
    stack: MailStack, refusing_smtp_server: int
) -> None:
    smtp = Endpoint(
        "smtp", "starttls", "127.0.0.1", refusing_smtp_server, "u@example.com", "pw", "x.test"
    )
    result = _run(stack, smtp, _endpoint(stack, "example.org", "imaps"))
    assert not result.ok and result.error_step == "CONNECT"
    assert "expected a 220 greeting" in result.error
    assert "got '554 5.3.2 no service for you'" in result.error


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake (the kernel's backlog) and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("tls", "phase"), [("implicit", "the TLS handshake"), ("starttls", "the greeting")]
)
def test_probe_silent_smtp_server_names_step_phase_and_limit(
    stack: MailStack, silent_port: int, tls: str, phase: str
) -> None:
    smtp = Endpoint("smtp", tls, "127.0.0.1", silent_port, "u@example.com", "pw", "x.test")
    result = _run(stack, smtp, _endpoint(stack, "example.org", "imaps"), timeout=0.3)
    assert not result.ok and result.error_step == "CONNECT"
    assert result.error == (
        f"CONNECT: 127.0.0.1:{silent_port} did not answer within 0.3 s (waiting for {phase})"
    )


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_probe_silent_reader_names_step_phase_and_limit(
    stack: MailStack, silent_port: int, protocol: str
) -> None:
    reader = Endpoint(protocol, "starttls", "127.0.0.1", silent_port, "u", "pw", "x.test")
    result = _run(stack, _endpoint(stack, "example.com", "submissions"), reader, timeout=0.3)
    assert not result.ok and result.error_step == f"{protocol.upper()} CONNECT"
    assert result.error.endswith(
        f"127.0.0.1:{silent_port} did not answer within 0.3 s (waiting for the greeting)"
    )


def test_probe_pop3_delete_is_a_timed_step(stack: MailStack) -> None:
    result = _run(
        stack,
        _endpoint(stack, "example.com", "submissions"),
        _endpoint(stack, "example.org", "pop3s"),
    )
    assert result.ok, result.error
    names = [s.name for s in result.steps]
    assert names[-2:] == ["pop3 fetch", "pop3 delete"]
    delete = result.steps[-1]
    assert delete.seconds > 0 and delete.detail == "1 copy"
    assert stack.messages(stack.user("example.org").address) == []


def test_probe_pop3_keep_has_no_delete_step(stack: MailStack) -> None:
    result = _run(
        stack,
        _endpoint(stack, "example.com", "submissions"),
        _endpoint(stack, "example.org", "pop3s"),
        keep=True,
    )
    assert result.ok, result.error
    assert "pop3 delete" not in [s.name for s in result.steps]
    assert len(stack.messages(stack.user("example.org").address)) == 1
