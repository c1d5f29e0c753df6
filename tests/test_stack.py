"""MailStack end to end with stdlib clients: submit over 465 and 587, read over POP3 and IMAP."""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import CertificateAuthority, MailStack, NotDeliveredError, StackConfig
from roundtrip.errors import ConfigError, ServerStartError

TIMEOUT = 5


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def _submit_465(stack: MailStack, raw: bytes, *, to: str) -> None:
    sender = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [to], raw)


def test_stack_465_submit_then_pop3s_retr_is_byte_identical(stack: MailStack) -> None:
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    raw = make_message(
        sender=sender.address,
        recipient=rcpt.address,
        subject="465 to pop3s",
        body="line one\r\n.leading dot\r\n..two dots\r\n",
    )
    _submit_465(stack, raw, to=rcpt.address)
    stack.wait_for(rcpt.address, subject="465 to pop3s", timeout=TIMEOUT)
    host, port = stack.endpoints("example.org").address("pop3s")
    pop = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    try:
        pop.user(rcpt.address)
        pop.pass_(rcpt.password)
        _, lines, _ = pop.retr(1)
        pop.quit()
    finally:
        pop.close()
    got = b"\r\n".join(lines) + b"\r\n"
    assert _body(got) == _body(raw)


def test_stack_587_starttls_submit_then_pop3_stls(stack: MailStack) -> None:
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    raw = make_message(sender=sender.address, recipient=rcpt.address, subject="587 to stls")
    host, port = stack.endpoints("example.com").address("submission")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=stack.client_context())
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [rcpt.address], raw)
    stack.wait_for(rcpt.address, subject="587 to stls", timeout=TIMEOUT)
    host, port = stack.endpoints("example.org").address("pop3")
    pop = poplib.POP3(host, port, timeout=TIMEOUT)
    try:
        pop.stls(context=stack.client_context())
        pop.user(rcpt.address)
        pop.pass_(rcpt.password)
        _, lines, _ = pop.retr(1)
        pop.quit()
    finally:
        pop.close()
    assert _body(b"\r\n".join(lines) + b"\r\n") == _body(raw)


def test_stack_imap_and_pop3_see_the_same_bytes(stack: MailStack) -> None:
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    raw = make_message(sender=sender.address, recipient=rcpt.address, subject="both readers")
    _submit_465(stack, raw, to=rcpt.address)
    delivered = stack.wait_for(rcpt.address, subject="both readers", timeout=TIMEOUT)
    host, port = stack.endpoints("example.org").address("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    try:
        imap.login(rcpt.address, rcpt.password)
        imap.select("INBOX")
        _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        imap.logout()
    finally:
        imap.shutdown() if imap.state != "LOGOUT" else None
    imap_raw = [part[1] for part in data if isinstance(part, tuple)]
    host, port = stack.endpoints("example.org").address("pop3s")
    pop = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT)
    try:
        pop.user(rcpt.address)
        pop.pass_(rcpt.password)
        pop_raw = [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in range(1, pop.stat()[0] + 1)]
        pop.quit()
    finally:
        pop.close()
    assert imap_raw == pop_raw == [delivered.raw]


def test_stack_wrong_password_and_unknown_user_get_the_same_535(stack: MailStack) -> None:
    host, port = stack.endpoints("example.com").address("submissions")
    replies = []
    for user, password in (("user@example.com", "wrong"), ("nobody@example.com", "wrong")):
        with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                smtp.login(user, password)
            replies.append((info.value.smtp_code, info.value.smtp_error))
    assert replies[0] == replies[1]
    assert replies[0][0] == 535


def test_stack_auth_before_starttls_gets_538(stack: MailStack) -> None:
    host, port = stack.endpoints("example.com").address("submission")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        code, reply = smtp.docmd("AUTH", "PLAIN AHVzZXIAcGFzcw==")
    assert code == 538, reply


def test_stack_mx_offers_no_auth_and_refuses_foreign_rcpt(stack: MailStack) -> None:
    host, port = stack.endpoints("example.org").address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=stack.client_context())
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.mail("someone@elsewhere.test")
        code, reply = smtp.rcpt("victim@elsewhere.test")
        assert code == 554 and b"Relay access denied" in reply
        code, reply = smtp.rcpt("user@example.org")
        assert code == 250


def test_stack_client_trusting_another_ca_fails_verification(stack: MailStack) -> None:
    other = CertificateAuthority().client_context()
    host, port = stack.endpoints("example.com").address("submissions")
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(host, port, context=other, timeout=TIMEOUT)


def test_stack_foreign_domain_mail_is_captured_not_sent(stack: MailStack) -> None:
    sender = stack.user("example.com")
    raw = make_message(sender=sender.address, recipient="someone@gmail.com", subject="captured")
    _submit_465(stack, raw, to="someone@gmail.com")
    assert [m.subject for m in stack.outbound] == ["captured"]
    assert stack.outbound[0].envelope_to == ("someone@gmail.com",)


def test_stack_wait_for_failure_lists_what_arrived(stack: MailStack) -> None:
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    _submit_465(
        stack,
        make_message(sender=sender.address, recipient=rcpt.address, subject="the real one"),
        to=rcpt.address,
    )
    with pytest.raises(NotDeliveredError) as info:
        stack.wait_for(rcpt.address, subject="another one", timeout=0.2)
    text = str(info.value)
    assert "no message to user@example.org in INBOX with subject 'another one'" in text
    assert "subject 'the real one'" in text


def test_stack_wait_for_unknown_user_is_a_config_error(stack: MailStack) -> None:
    with pytest.raises(ConfigError, match="not a user"):
        stack.wait_for("ghost@example.org", timeout=0.1)


def test_stack_describe_has_every_service_per_domain(stack: MailStack) -> None:
    doc = stack.describe()
    assert set(doc["domains"]) == {"example.com", "example.org"}
    for services in doc["domains"].values():
        assert set(services) >= {
            "smtp",
            "submissions",
            "submission",
            "pop3",
            "pop3s",
            "imap",
            "imaps",
        }
        for endpoint in services.values():
            host, _, port = endpoint.rpartition(":")
            assert host == "127.0.0.1" and int(port) > 0


def test_stack_stop_is_idempotent_and_frees_ports() -> None:
    stack = MailStack(StackConfig(domains=("solo.test",))).start()
    host, port = stack.endpoints().address("submissions")
    stack.stop()
    stack.stop()
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        assert sock.connect_ex((host, port)) != 0


def test_stack_endpoints_before_start_is_an_error() -> None:
    with pytest.raises(ServerStartError, match="not running"):
        MailStack().endpoints()


def test_stack_server_error_is_reraised_by_check(stack: MailStack) -> None:
    def broken(change: object) -> None:
        raise RuntimeError("listener exploded")

    # A store listener that raises runs on the loop thread during SMTP delivery: the message
    # is still delivered (never lost), and the error surfaces through check().
    sender = rcpt = stack.user("example.com")
    stack.store.add_listener(broken)
    try:
        _submit_465(
            stack,
            make_message(sender=sender.address, recipient=rcpt.address, subject="boom"),
            to=rcpt.address,
        )
    finally:
        stack.store.remove_listener(broken)
    assert [m.subject for m in stack.messages(rcpt.address)] == ["boom"]
    with pytest.raises(RuntimeError, match="listener exploded"):
        stack.check()
    stack.check()  # reported once


def _standard_ports_usable() -> str | None:
    if os.geteuid() != 0:
        return "ports='standard' binds ports below 1024: needs root"
    return None


def test_stack_standard_ports_full_roundtrip_across_domains() -> None:
    reason = _standard_ports_usable()
    if reason:
        pytest.skip(reason)
    try:
        stack = MailStack(StackConfig(ports="standard")).start()
    except ServerStartError as exc:
        if "in use" in str(exc):
            pytest.skip(f"a well-known mail port is taken on this machine: {exc}")
        raise
    try:
        doc = stack.describe()
        assert doc["dns"] == "127.0.0.1:53"
        assert doc["domains"]["example.com"]["submissions"] == "127.0.0.1:465"
        assert doc["domains"]["example.org"]["imaps"] == "127.0.0.2:993"
        sender, rcpt = stack.user("example.com"), stack.user("example.org")
        raw = make_message(sender=sender.address, recipient=rcpt.address, subject="standard")
        with smtplib.SMTP_SSL(
            "127.0.0.1", 465, context=stack.client_context(), timeout=TIMEOUT
        ) as smtp:
            smtp.login(sender.address, sender.password)
            smtp.sendmail(sender.address, [rcpt.address], raw)
        msg = stack.wait_for(rcpt.address, subject="standard", timeout=TIMEOUT)
        assert [h.with_ for h in msg.received_chain][:2] == ["ESMTPS", "ESMTPSA"]
    finally:
        stack.stop()


def test_stack_standard_ports_without_privilege_is_a_clear_error() -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing to drop the privilege")
        prefix = [setpriv, "--bounding-set=-net_bind_service"]
    script = (
        "from roundtrip import MailStack, StackConfig\n"
        "from roundtrip.errors import ServerStartError\n"
        "try:\n"
        "    MailStack(StackConfig(ports='standard')).start()\n"
        "except ServerStartError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [*prefix, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "needs root or CAP_NET_BIND_SERVICE" in result.stdout, result.stderr
