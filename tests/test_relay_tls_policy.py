"""The relay's outbound STARTTLS policy (docs/security.md A3.7): MTA-STS modes, TLS-RPT results.

Pure tests of ``roundtrip.protocols.tlspolicy`` first, then a stack whose relay delivers to
loopback "remote MX" servers (aiosmtpd) that lack STARTTLS, present a certificate from another
CA, an expired one, or one for another name.
"""

from __future__ import annotations

import datetime
import logging
import smtplib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.resolver
import pytest
from _support import AiosmtpdServer, make_message

from roundtrip import CertificateAuthority, MailStack, StackConfig
from roundtrip.errors import ConfigError, RemoteProtocolError
from roundtrip.protocols.tlspolicy import (
    ResultType,
    TLSPolicy,
    mx_matches,
    parse_policy,
    parse_sts_record,
    select_sts_record,
    sts_record,
    verify_failure_result,
)

TIMEOUT = 5.0
MX = "mail.example.org"

# -- policy file (RFC 8461 §3.2) -----------------------------------------------------------

GOOD_POLICY = (
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.org\r\nmx: *.backup.example.org\r\n"
    "max_age: 604800\r\n"
)


def test_tlspolicy_parses_a_policy_file() -> None:
    policy = parse_policy(GOOD_POLICY)
    assert policy == TLSPolicy(
        mode="enforce", mx=("mail.example.org", "*.backup.example.org"), max_age=604800
    )
    assert policy.requires_tls
    assert parse_policy(policy.to_text()) == policy


def test_tlspolicy_accepts_lf_extensions_and_blanks() -> None:
    text = "version: STSv1\nmode:testing\nmx:\tmail.example.org\nmax_age: 0\nfuture_key: x y\n"
    policy = parse_policy(text.encode())
    assert (policy.mode, policy.mx, policy.max_age) == ("testing", ("mail.example.org",), 0)
    assert not policy.requires_tls


def test_tlspolicy_mode_none_needs_no_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
    assert policy.mode == "none" and policy.mx == ()
    assert policy.mx_allowed("anything.example.net")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("mode: enforce\nmx: a.example.org\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.example.org\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.example.org\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmode: none\nmx: a.example.org\nmax_age: 1\n", "once"),
        ("version: STSv1\nmode: enforce\nmx: a.example.org\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example.org\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example.org\nmax_age: 31557601\n", "exceeds"),
        ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: *.*.example.org\nmax_age: 1\n", "bad mx"),
        ("version: STSv1\nmode: enforce\nmx: mail.*.example.org\nmax_age: 1\n", "bad mx"),
        ("version: STSv1\nmode: enforce\nmx: mail example.org\nmax_age: 1\n", "bad mx"),
        ("version: STSv1\nmode: enforce\nmx: a.example.org\nmax_age: 1\ngarbage\n", "key"),
        ("version: STSv1\rmode: enforce\nmx: a.example.org\nmax_age: 1\n", "CR"),
    ],
)
def test_tlspolicy_rejects_invalid_policy_files(text: str, complaint: str) -> None:
    with pytest.raises(RemoteProtocolError, match=complaint):
        parse_policy(text)


def test_tlspolicy_rejects_a_policy_over_64_kib() -> None:
    body = GOOD_POLICY + "x: " + "y" * (64 * 1024) + "\n"
    with pytest.raises(RemoteProtocolError, match="larger"):
        parse_policy(body.encode())
    assert parse_policy(GOOD_POLICY + "x: " + "y" * 1000 + "\n").mode == "enforce"


# -- _mta-sts TXT record (RFC 8461 §3.1) -----------------------------------------------------


def test_tlspolicy_reads_the_sts_txt_record() -> None:
    assert parse_sts_record("v=STSv1; id=20160831085700Z;") == "20160831085700Z"
    assert parse_sts_record("v=STSv1;id=abc; ext=value") == "abc"


@pytest.mark.parametrize(
    "text",
    [
        "id=abc; v=STSv1;",  # v must come first
        "v=STSv1;",  # no id
        "v=STSv1; id=" + "a" * 33,  # id too long
        "v=STSv1; id=ab-c",  # id is letters and digits only
        "v=stsv1; id=abc",  # case-sensitive
        "v=STSv1; id=abc; id=def",
    ],
)
def test_tlspolicy_rejects_bad_sts_txt_records(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_sts_record(text)


def test_tlspolicy_selects_exactly_one_sts_record() -> None:
    assert select_sts_record(["v=spf1 -all", "v=STSv1; id=one"]) == "one"
    assert select_sts_record(["v=STSv1; id=one", "v=STSv1; id=two"]) is None
    assert select_sts_record(["v=STSv1; id=bad-id"]) is None
    assert select_sts_record([]) is None


# -- MX patterns (RFC 8461 §4.1) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host"),
    [
        ("mail.example.org", "mail.example.org"),
        ("mail.example.org", "MAIL.Example.ORG."),
        ("*.example.org", "mail.example.org"),
        ("*.example.org", "mx1.example.org."),
    ],
)
def test_tlspolicy_mx_matches(pattern: str, host: str) -> None:
    assert mx_matches(pattern, host)


@pytest.mark.parametrize(
    ("pattern", "host"),
    [
        ("mail.example.org", "mail2.example.org"),
        ("*.example.org", "example.org"),  # the wildcard is one whole label
        ("*.example.org", "a.b.example.org"),  # ... and only one
        ("*.example.org", "mail.example.org.evil.test"),
        ("*.example.org", "mailexample.org"),
        ("mail.example.org", ""),
    ],
)
def test_tlspolicy_mx_does_not_match(pattern: str, host: str) -> None:
    assert not mx_matches(pattern, host)


def test_tlspolicy_value_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="mode"):
        TLSPolicy(mode="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pattern"):
        TLSPolicy(mx=("*.*.example.org",))
    assert TLSPolicy(mx=("Mail.Example.ORG.",)).mx == ("mail.example.org",)
    assert TLSPolicy().mx_allowed("any.example.net")  # no patterns: any MX
    assert not TLSPolicy(mx=("*.example.org",)).mx_allowed("example.org")
    assert TLSPolicy(mode="none", mx=("a.example.org",)).mx_allowed("b.example.net")


# -- verification errors to result types (RFC 8460 §4.3) ---------------------------------


@pytest.mark.parametrize(
    ("code", "message", "result"),
    [
        (10, "certificate has expired", ResultType.CERTIFICATE_EXPIRED),
        (62, "Hostname mismatch", ResultType.CERTIFICATE_HOST_MISMATCH),
        (64, "IP address mismatch", ResultType.CERTIFICATE_HOST_MISMATCH),
        (20, "unable to get local issuer certificate", ResultType.CERTIFICATE_NOT_TRUSTED),
        (18, "self-signed certificate", ResultType.CERTIFICATE_NOT_TRUSTED),
        (9, "certificate is not yet valid", ResultType.CERTIFICATE_NOT_TRUSTED),
        (None, "certificate has expired", ResultType.CERTIFICATE_EXPIRED),
        (None, "", ResultType.CERTIFICATE_NOT_TRUSTED),
    ],
)
def test_tlspolicy_maps_verify_errors(code: int | None, message: str, result: ResultType) -> None:
    assert verify_failure_result(code, message) is result


def test_tlspolicy_result_types_are_the_iana_names() -> None:
    assert {str(r) for r in ResultType} == {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
    }


# -- config ---------------------------------------------------------------------------------


def test_relay_tls_config_normalises_and_checks_modes() -> None:
    config = StackConfig(relay_tls={"Example.ORG.": "testing", "example.net": GOOD_POLICY})
    assert config.relay_tls == (("example.net", GOOD_POLICY), ("example.org", "testing"))
    hash(config)  # still usable as a key
    with pytest.raises(ConfigError, match="enforce, testing, none"):
        StackConfig(relay_tls={"example.org": "strict"})
    with pytest.raises(ConfigError, match="domain"):
        StackConfig(relay_tls={"not a domain": "none"})


# -- the stack's relay against loopback "remote MX" servers -----------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        retry_delays=(0.05, 0.1),
        queue_lifetime=30,
        relay_tls={"example.com": "none", "example.net": "testing"},
    )
    with MailStack(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.reset()  # stop retries before a test's fake MX goes away
    stack.check()


@dataclass
class FakeMX:
    """A remote MX outside the stack; records what it receives, and over what."""

    port: int = 0
    received: list[tuple[bytes, bool]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        tls = getattr(session, "ssl", None) is not None
        self.received.append((envelope.content, tls))  # type: ignore[attr-defined]
        self.arrived.set()
        return "250 OK"


def _serve(stack: MailStack, tls_context: ssl.SSLContext | None) -> Iterator[FakeMX]:
    mx = FakeMX()
    kwargs: dict[str, object] = {"hostname": MX}
    if tls_context is not None:
        kwargs["tls_context"] = tls_context
    server = AiosmtpdServer(mx, **kwargs)
    mx.port = server.port
    stack.mx_ports[MX] = server.port
    try:
        yield mx
    finally:
        stack.reset()
        server.close()


@pytest.fixture
def plain_mx(stack: MailStack) -> Iterator[FakeMX]:
    """An MX that does not offer STARTTLS."""
    yield from _serve(stack, None)


@pytest.fixture
def foreign_mx(stack: MailStack) -> Iterator[FakeMX]:
    """An MX whose certificate (for the right name) comes from another CA."""
    other = CertificateAuthority()
    try:
        yield from _serve(stack, other.server_context([MX]))
    finally:
        other.cleanup()


@pytest.fixture
def misnamed_mx(stack: MailStack) -> Iterator[FakeMX]:
    """An MX with a certificate from the stack's CA, but for another name."""
    yield from _serve(stack, stack.ca.server_context(["other.example.net"]))


@pytest.fixture
def expired_mx(stack: MailStack) -> Iterator[FakeMX]:
    """An MX with a certificate from the stack's CA, for the right name, that has expired."""
    now = datetime.datetime.now(datetime.UTC)
    leaf = stack.ca.ca.issue_cert(
        MX, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    yield from _serve(stack, context)


@pytest.fixture
def good_mx(stack: MailStack) -> Iterator[FakeMX]:
    """An MX with a certificate from the stack's CA for its name."""
    yield from _serve(stack, stack.ca.server_context([MX]))


def _send(stack: MailStack, subject: str) -> None:
    sender = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    raw = make_message(sender=sender.address, recipient="user@example.org", subject=subject)
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, ["user@example.org"], raw)


def _stays_queued(stack: MailStack, mx: FakeMX) -> str:
    """Wait for a retry; assert nothing was delivered or bounced. Returns the last error."""
    queue = stack.wait_relay(lambda q: any(e.attempts >= 2 for e in q), timeout=TIMEOUT)
    stack.relay_idle()
    assert mx.received == []
    assert stack.messages("user@example.org") == []
    assert stack.messages("user@example.com") == []  # deferred, not bounced
    (entry,) = queue
    assert entry.rcpt == ("user@example.org",)
    return entry.last_error


def _delivered(stack: MailStack, mx: FakeMX) -> tuple[bytes, bool]:
    assert mx.arrived.wait(TIMEOUT), "the fake MX received nothing"
    stack.relay_idle()
    ((content, tls),) = mx.received
    return content, tls


def _tls_failures(stack: MailStack) -> list[str]:
    assert stack.relay is not None
    return [e.detail for e in list(stack.relay.events) if e.step == "tls-failure"]


def _connected(stack: MailStack) -> list[str]:
    assert stack.relay is not None
    return [e.detail for e in list(stack.relay.events) if e.step == "connected"]


def test_relay_tls_world_domains_enforce_their_mx_by_default(stack: MailStack) -> None:
    # enforce, for whichever MX hosts the stack's DNS names (see recorder_mx in
    # test_catalogue_a.py: a redirected MX still needs a certificate from the stack CA).
    assert stack.tls_policies["example.org"] == TLSPolicy(mode="enforce", mx=None)
    assert stack.tls_policies["example.com"] == TLSPolicy(mode="none")  # from relay_tls
    assert stack.tls_policies["example.net"] == TLSPolicy(mode="testing")  # not a stack domain
    stack.tls_policies["example.org"] = TLSPolicy(mode="none")
    stack.reset()
    assert stack.tls_policies["example.org"].mode == "enforce"


def test_relay_tls_enforce_without_starttls_stays_queued(
    stack: MailStack, plain_mx: FakeMX
) -> None:
    _send(stack, "enforce plain")
    error = _stays_queued(stack, plain_mx)
    assert error.startswith(f"{MX}[127.0.0.1]: starttls-not-supported: STARTTLS not offered")
    assert "STARTTLS not offered" in error and "no plaintext" in error
    assert all(d.startswith("starttls-not-supported:") for d in _tls_failures(stack))
    assert _connected(stack) == []


def test_relay_tls_none_without_starttls_delivers_in_plaintext_and_says_so(
    stack: MailStack, plain_mx: FakeMX, caplog: pytest.LogCaptureFixture
) -> None:
    stack.tls_policies["example.org"] = TLSPolicy(mode="none")
    with caplog.at_level(logging.WARNING, logger="roundtrip.servers.relay"):
        _send(stack, "none plain")
        content, tls = _delivered(stack, plain_mx)
    assert b"none plain" in content and not tls
    (failure,) = _tls_failures(stack)
    assert failure.startswith("starttls-not-supported:") and "delivering without TLS" in failure
    (connected,) = _connected(stack)
    assert connected.endswith(" without TLS")
    assert any(
        "delivered to" in r.getMessage() and "without TLS" in r.getMessage() for r in caplog.records
    )
    assert stack.relay is not None and stack.relay.queue() == []


def test_relay_tls_enforce_untrusted_certificate_stays_queued(
    stack: MailStack, foreign_mx: FakeMX
) -> None:
    _send(stack, "enforce untrusted")
    error = _stays_queued(stack, foreign_mx)
    assert "certificate-not-trusted:" in error
    assert _tls_failures(stack)[0].startswith("certificate-not-trusted:")


def test_relay_tls_testing_untrusted_certificate_delivers_and_reports(
    stack: MailStack, foreign_mx: FakeMX
) -> None:
    stack.tls_policies["example.org"] = TLSPolicy(mode="testing", mx=(MX,))
    _send(stack, "testing untrusted")
    content, tls = _delivered(stack, foreign_mx)
    assert b"testing untrusted" in content and tls  # encrypted, just not authenticated
    (failure,) = _tls_failures(stack)
    assert failure.startswith("certificate-not-trusted:")
    assert "testing; delivering over unverified TLS" in failure
    assert _connected(stack)[0].endswith(" over unverified TLS")


def test_relay_tls_enforce_name_mismatch_stays_queued(
    stack: MailStack, misnamed_mx: FakeMX
) -> None:
    _send(stack, "enforce misnamed")
    error = _stays_queued(stack, misnamed_mx)
    assert "certificate-host-mismatch:" in error


def test_relay_tls_enforce_expired_certificate_stays_queued(
    stack: MailStack, expired_mx: FakeMX
) -> None:
    _send(stack, "enforce expired")
    error = _stays_queued(stack, expired_mx)
    assert "certificate-expired:" in error


def test_relay_tls_enforce_valid_certificate_delivers_verified(
    stack: MailStack, good_mx: FakeMX
) -> None:
    _send(stack, "enforce good")
    content, tls = _delivered(stack, good_mx)
    assert b"enforce good" in content and tls
    assert _tls_failures(stack) == []
    (connected,) = _connected(stack)
    assert connected == f"{MX}[127.0.0.1]:{good_mx.port}"


def test_relay_tls_enforce_mx_outside_the_policy_is_never_dialled(
    stack: MailStack, good_mx: FakeMX
) -> None:
    stack.tls_policies["example.org"] = TLSPolicy(mode="enforce", mx=("*.mx.example.org",))
    _send(stack, "enforce wrong mx")
    error = _stays_queued(stack, good_mx)
    assert error.startswith(f"{MX}[127.0.0.1]: certificate-host-mismatch: MX host {MX}")
    assert "*.mx.example.org" in error
    assert _connected(stack) == []


def test_relay_tls_enforce_mx_matching_a_wildcard_pattern_delivers(
    stack: MailStack, good_mx: FakeMX
) -> None:
    stack.tls_policies["example.org"] = TLSPolicy(mode="enforce", mx=("*.example.org",))
    _send(stack, "enforce wildcard mx")
    content, tls = _delivered(stack, good_mx)
    assert b"enforce wildcard mx" in content and tls
    assert _tls_failures(stack) == []


def test_relay_tls_testing_mx_outside_the_policy_delivers_and_reports(
    stack: MailStack, good_mx: FakeMX
) -> None:
    stack.tls_policies["example.org"] = TLSPolicy(mode="testing", mx=("other.example.org",))
    _send(stack, "testing wrong mx")
    content, tls = _delivered(stack, good_mx)
    assert b"testing wrong mx" in content and tls
    (failure,) = _tls_failures(stack)
    assert failure.startswith(f"certificate-host-mismatch: {MX}[127.0.0.1]: MX host {MX}")
    assert "testing; delivering anyway" in failure


def test_relay_tls_dns_announces_mta_sts_for_enforcing_domains(stack: MailStack) -> None:
    assert stack.dns is not None
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [stack.dns.address[0]]
    resolver.port = stack.dns.address[1]
    resolver.lifetime = TIMEOUT
    answer = resolver.resolve("_mta-sts.example.org", "TXT")
    texts = [b"".join(r.strings).decode() for r in answer]
    assert texts == [sts_record(stack.tls_policies["example.org"])]
    assert select_sts_record(texts) is not None
    # example.com's policy is "none": no record (RFC 8461 §3.1: no policy).
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("_mta-sts.example.com", "TXT")


def test_tlspolicy_sts_record_id_follows_the_policy() -> None:
    one = sts_record(TLSPolicy(mode="enforce", mx=("a.example.org",)))
    assert parse_sts_record(one) == parse_sts_record(sts_record(TLSPolicy(mx=("a.example.org",))))
    assert one != sts_record(TLSPolicy(mode="testing", mx=("a.example.org",)))
