"""TLS facts and findings: legacy-version acceptance, expiring certificates, host name match."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator

import pytest
import trustme

from roundtrip import CertificateAuthority, MailStack
from roundtrip.config import Endpoint
from roundtrip.probes._net import (
    Timeline,
    _hostname_matches,
    check_legacy_tls,
    open_socket,
    scan_tls,
    wrap_tls,
)
from roundtrip.probes.roundtrip import run_probe

TIMEOUT = 5.0


class TLSListener:
    """Implicit-TLS listener on 127.0.0.1:0: handshakes, then waits for the client to hang up."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        while tls.recv(1024):
                            pass
                except (OSError, ssl.SSLError):
                    pass

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(TIMEOUT)


@contextlib.contextmanager
def listener(context: ssl.SSLContext) -> Iterator[TLSListener]:
    server = TLSListener(context)
    try:
        yield server
    finally:
        server.close()


def _server_context(leaf: trustme.LeafCert, *, legacy: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    if legacy:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@pytest.fixture(scope="module")
def ca() -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority()
    yield authority
    authority.cleanup()


def _legacy(
    port: int, *, protocol: str = "smtp", tls: str = "implicit", timeout: float = TIMEOUT
) -> str:
    return check_legacy_tls(
        host="127.0.0.1",
        port=port,
        protocol=protocol,
        tls=tls,
        server_name="127.0.0.1",
        timeout=timeout,
    )


def test_tls_legacy_check_reports_a_server_accepting_tls_1_1(ca: CertificateAuthority) -> None:
    try:
        ctx = _server_context(ca.leaf(["mail.test"]), legacy=True)
    except (ValueError, ssl.SSLError) as exc:  # pragma: no cover - OpenSSL built without 1.1
        pytest.skip(f"local OpenSSL cannot serve TLS 1.1: {exc}")
    with listener(ctx) as server:
        outcome = _legacy(server.port)
    if outcome.startswith("not tested: local OpenSSL"):  # pragma: no cover
        pytest.skip(outcome)
    assert outcome in ("accepted TLSv1.1", "accepted TLSv1")


def test_tls_legacy_check_reports_refusal_by_a_modern_server(ca: CertificateAuthority) -> None:
    with listener(_server_context(ca.leaf(["mail.test"]))) as server:
        assert _legacy(server.port) == "refused"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.mark.parametrize(
    ("service", "protocol"), [("submission", "smtp"), ("imap", "imap"), ("pop3", "pop3")]
)
def test_tls_legacy_check_speaks_starttls_first(
    stack: MailStack, service: str, protocol: str
) -> None:
    port = stack.endpoints("example.org").ports[service]
    assert _legacy(port, protocol=protocol, tls="starttls") == "refused"


def test_tls_legacy_check_says_not_tested_when_starttls_is_refused(stack: MailStack) -> None:
    # The twin: an implicit-TLS port spoken to as if it were STARTTLS never gets that far.
    port = stack.endpoints("example.org").ports["imaps"]
    # (It waits for our ClientHello, we for its greeting: the short timeout ends it.)
    outcome = _legacy(port, protocol="imap", tls="starttls", timeout=0.2)
    assert outcome.startswith("not tested")


def _facts_for(leaf: trustme.LeafCert, ca: CertificateAuthority) -> Timeline:
    timeline = Timeline()
    with listener(_server_context(leaf)) as server:
        sock = open_socket("127.0.0.1", server.port, TIMEOUT, timeline, "smtp")
        with wrap_tls(sock, ca.client_context(), "mail.test", timeline, "smtp"):
            pass
    return timeline


def test_tls_certificate_expiring_within_30_days_is_a_warning(ca: CertificateAuthority) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    timeline = _facts_for(ca.leaf(["mail.test"], not_after=soon), ca)
    (facts,) = timeline.tls
    assert facts.days_left in (9, 10)
    assert facts.hostname_match and facts.hostname_verified
    (finding,) = timeline.findings
    assert finding.code == "cert-expiring" and finding.severity == "warn"
    assert f"expires in {facts.days_left} days" in finding.message


def test_tls_certificate_valid_for_long_gives_no_finding(ca: CertificateAuthority) -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=90)
    timeline = _facts_for(ca.leaf(["mail.test"], not_after=later), ca)
    assert timeline.findings == []
    (facts,) = timeline.tls
    assert facts.days_left in (89, 90)
    assert facts.version in ("TLSv1.2", "TLSv1.3") and facts.cipher
    assert "CN=mail.test" in facts.subject and "roundtrip test CA" in facts.issuer
    assert "DNS:mail.test" in facts.san and "IP:127.0.0.1" in facts.san


@pytest.mark.parametrize(
    ("san", "name", "match"),
    [
        (["DNS:mail.example.com"], "mail.example.com", True),
        (["DNS:mail.example.com"], "MAIL.example.com.", True),
        (["DNS:*.example.com"], "mail.example.com", True),
        (["DNS:*.example.com"], "a.b.example.com", False),
        (["DNS:*.example.com"], "example.com", False),
        (["DNS:mail.example.com"], "mail.example.org", False),
        (["IP:127.0.0.1"], "127.0.0.1", True),
        (["DNS:127.0.0.1"], "127.0.0.1", False),
        (["IP:::1"], "::1", True),
        ([], "mail.example.com", False),
    ],
)
def test_tls_hostname_match(san: list[str], name: str, match: bool) -> None:
    assert _hostname_matches(san, name) is match


def _endpoint(stack: MailStack, domain: str, service: str, server_name: str = "") -> Endpoint:
    ep, user = stack.endpoints(domain), stack.user(domain)
    protocol = {"submissions": "smtp", "submission": "smtp", "imaps": "imap", "pop3s": "pop3"}
    return Endpoint(
        protocol[service],
        "starttls" if service == "submission" else "implicit",
        ep.host,
        ep.ports[service],
        user.address,
        user.password,
        server_name or ep.hostname,
    )


@pytest.mark.parametrize("smtp_service", ["submissions", "submission"])
def test_tls_probe_checks_legacy_tls_when_asked(stack: MailStack, smtp_service: str) -> None:
    result = run_probe(
        _endpoint(stack, "example.com", smtp_service),
        _endpoint(stack, "example.org", "imaps"),
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=TIMEOUT,
        check_legacy_tls=True,
        settle=0.0,
    )
    assert result.ok, result.error
    assert set(result.legacy_tls.values()) == {"refused"} and len(result.legacy_tls) == 2
    assert result.checks["TLS below 1.2 refused"] is True
    assert ("no AUTH before TLS" in result.checks) == (smtp_service == "submission")


def test_tls_probe_describes_the_certificate_after_a_name_mismatch(stack: MailStack) -> None:
    result = run_probe(
        _endpoint(stack, "example.com", "submissions", server_name="mail.wrong.test"),
        _endpoint(stack, "example.org", "imaps"),
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=TIMEOUT,
        check_legacy_tls=True,
    )
    assert not result.ok and result.error_step == "CONNECT"
    (facts,) = result.tls
    assert facts.hostname_verified is False and facts.hostname_match is False
    assert "DNS:mail.example.com" in facts.san
    assert "matches mail.wrong.test: no" in result.error
    # No legacy check against a server whose certificate already failed.
    assert result.legacy_tls == {}


# -- the TLS scan: each version on its own, and forward secrecy ---------------------------------


def _scan(port: int) -> dict[str, str]:
    return scan_tls(
        host="127.0.0.1",
        port=port,
        protocol="smtp",
        tls="implicit",
        server_name="127.0.0.1",
        timeout=TIMEOUT,
    )


def test_tls_scan_lists_the_versions_of_a_modern_server(ca: CertificateAuthority) -> None:
    with listener(_server_context(ca.leaf(["mail.test"]))) as server:
        outcomes = _scan(server.port)
    assert outcomes["TLSv1.2"].startswith("accepted TLSv1.2 ")
    assert outcomes["TLSv1.3"].startswith("accepted TLSv1.3 TLS_")
    for old in ("TLSv1", "TLSv1.1"):
        assert outcomes[old] == "refused" or outcomes[old].startswith("not tested: local")
    assert outcomes["no-forward-secrecy"] == "refused"


def test_tls_scan_finds_a_cipher_suite_without_forward_secrecy() -> None:
    # Static RSA key exchange needs an RSA key (trustme's default is ECDSA).
    leaf = trustme.CA().issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    ctx = _server_context(leaf)
    try:
        ctx.set_ciphers("DEFAULT:kRSA:@SECLEVEL=0")
    except ssl.SSLError as exc:  # pragma: no cover - OpenSSL built without static RSA
        pytest.skip(f"local OpenSSL cannot serve static RSA key exchange: {exc}")
    with listener(ctx) as server:
        outcomes = _scan(server.port)
    if outcomes["no-forward-secrecy"].startswith("not tested: local"):  # pragma: no cover
        pytest.skip(outcomes["no-forward-secrecy"])
    assert outcomes["no-forward-secrecy"].startswith("accepted TLSv1.2 AES")


@pytest.mark.parametrize("scan", [True, False])
def test_tls_probe_scans_each_server_when_asked(stack: MailStack, scan: bool) -> None:
    smtp, reader = (
        _endpoint(stack, "example.com", "submission"),
        _endpoint(stack, "example.org", "imaps"),
    )
    result = run_probe(
        smtp,
        reader,
        context=stack.client_context(),
        mail_from=stack.user("example.com").address,
        rcpt_to=stack.user("example.org").address,
        timeout=TIMEOUT,
        scan_tls=scan,
        settle=0.0,
    )
    assert result.ok, result.error
    versions = [f for f in result.findings if f.code == "tls-versions"]
    if not scan:
        assert versions == [] and result.tls_scan == {}
        return
    assert set(result.tls_scan) == {smtp.address, reader.address}
    assert [f.server for f in versions] == [smtp.address, reader.address]
    assert all(f.severity == "info" for f in versions)
    assert versions[0].message.startswith(f"smtp {smtp.address}: accepts TLSv1.2, TLSv1.3")
    assert "TLSv1.3: accepted TLSv1.3" in " ".join(versions[0].evidence)
    assert not [f for f in result.findings if f.code == "no-forward-secrecy"]
