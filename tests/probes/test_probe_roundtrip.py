"""The probes against our own stack: every step timed, every failure named."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _support import AiosmtpdServer

from roundtrip import CertificateAuthority, MailStack
from roundtrip.config import Endpoint
from roundtrip.probes.roundtrip import ProbeResult, run_probe

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


def _endpoint(stack: MailStack, domain: str, service: str, **changes: str) -> Endpoint:
    ep = stack.endpoints(domain)
    user = stack.user(domain)
    protocol = {
        "submissions": "smtp",
        "submission": "smtp",
        "imaps": "imap",
        "imap": "imap",
        "pop3s": "pop3",
        "pop3": "pop3",
    }[service]
    tls = "implicit" if service.endswith("s") else "starttls"
    fields = {"user": user.address, "password": user.password, "server_name": ep.hostname}
    fields.update(changes)
    return Endpoint(
        protocol,
        tls,
        ep.host,
        ep.ports[service],
        fields["user"],
        fields["password"],
        fields["server_name"],
    )


def _probe(
    stack: MailStack,
    smtp_service: str = "submissions",
    reader: str = "imaps",
    *,
    timeout: float = TIMEOUT,
    context: object = None,
    **smtp_changes: str,
) -> ProbeResult:
    return run_probe(
        _endpoint(stack, "example.com", smtp_service, **smtp_changes),
        _endpoint(stack, "example.org", reader),
        context=context or stack.client_context(),  # type: ignore[arg-type]
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=timeout,
        settle=0.05,
    )


@pytest.mark.parametrize("smtp_service", ["submissions", "submission"])
@pytest.mark.parametrize("reader", ["imaps", "imap", "pop3s", "pop3"])
def test_probe_roundtrip_passes_every_tls_flavour(
    stack: MailStack, smtp_service: str, reader: str
) -> None:
    result = _probe(stack, smtp_service, reader)
    assert result.ok, result.error
    names = [s.name for s in result.steps]
    proto = reader.rstrip("s")
    assert names[:2] == ["smtp connect", "smtp tls"] or "smtp tls" in names
    for step in (
        "smtp auth",
        "smtp submit",
        f"{proto} login",
        f"{proto} visible",
        f"{proto} fetch",
    ):
        assert step in names
    assert all(s.seconds >= 0 for s in result.steps)
    assert len(result.tls) >= 2
    assert {f.version for f in result.tls} <= {"TLSv1.2", "TLSv1.3"}
    assert [h.with_ for h in result.hops] == ["ESMTPSA", "ESMTPS"]
    # Each hop, each STARTTLS upgrade and each certificate's names are described by an info
    # finding; nothing else.
    assert [f.code for f in result.findings if f.code == "received-hop"] == ["received-hop"] * 2
    assert {f.code for f in result.findings} <= {"received-hop", "starttls", "cert-names"}
    assert {f.severity for f in result.findings} == {"info"}


def test_probe_imap_waits_with_idle(stack: MailStack) -> None:
    result = _probe(stack)
    visible = next(s for s in result.steps if s.name == "imap visible")
    assert visible.detail == "IDLE"


def test_probe_deletes_the_message_unless_keep(stack: MailStack) -> None:
    assert _probe(stack).ok
    assert stack.messages(stack.user("example.org").address) == []


def test_probe_untrusted_ca_fails_with_tls_error(stack: MailStack) -> None:
    result = _probe(stack, context=CertificateAuthority().client_context())
    assert not result.ok
    assert result.error_step == "CONNECT"
    assert "certificate verification failed" in result.error


def test_probe_wrong_host_name_fails_with_tls_error(stack: MailStack) -> None:
    result = _probe(stack, server_name="mail.wrong.test")
    assert not result.ok
    assert "certificate verification failed" in result.error
    assert "mail.wrong.test" in result.error or "Hostname mismatch" in result.error


def test_probe_wrong_password_fails_with_auth_error(stack: MailStack) -> None:
    result = _probe(stack, password="not-it")
    assert not result.ok and result.error_step == "AUTH"
    assert "535" in result.error and "not-it" not in result.error


def test_probe_lost_message_fails_with_not_delivered(stack: MailStack) -> None:
    stack.faults.drop = True
    result = _probe(stack, timeout=0.3)
    assert not result.ok and result.error_step == "FETCH"
    assert "not found" in result.error


def test_probe_duplicate_delivery_fails_the_one_copy_check(stack: MailStack) -> None:
    stack.faults.duplicate = True
    result = _probe(stack)
    assert not result.ok
    assert result.checks["exactly one copy"] is False
    assert "the message arrived 2 times" in [f.message for f in result.findings]


def test_probe_altered_body_fails_the_body_check(stack: MailStack) -> None:
    stack.faults.alter_body = True
    result = _probe(stack)
    assert not result.ok
    assert result.checks["body unchanged"] is False
    assert result.checks["Subject unchanged"] is True


@pytest.fixture
def plain_smtp_server() -> Iterator[int]:
    """An SMTP server without STARTTLS, to prove the probe sends no credentials to it."""
    seen: list[str] = []

    class Handler:
        async def handle_AUTH(self, *args: object) -> str:  # never reached: no TLS, no AUTH
            seen.append("AUTH")
            return "235 ok"

    server = AiosmtpdServer(Handler(), hostname="plain.test")
    try:
        yield server.port
    finally:
        server.close()
    assert seen == []


def test_probe_starttls_not_offered_fails_before_credentials(
    stack: MailStack, plain_smtp_server: int
) -> None:
    smtp = Endpoint(
        "smtp",
        "starttls",
        "127.0.0.1",
        plain_smtp_server,
        "user@example.com",
        "secret-pw",
        "plain.test",
    )
    result = run_probe(
        smtp,
        _endpoint(stack, "example.org", "imaps"),
        context=stack.client_context(),
        mail_from="user@example.com",
        rcpt_to="user@example.org",
        timeout=TIMEOUT,
    )
    assert not result.ok and result.error_step == "STARTTLS"
    assert "does not offer STARTTLS; no credentials were sent" in result.error
    assert "smtp auth" not in [s.name for s in result.steps]
