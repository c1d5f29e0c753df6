"""The stack's certificates: which leaf each client sees, and that verifiers accept it.

Issue "certificates every client accepts": mbsync 1.4 and offlineimap3 match the subject Common
Name and ignore IP subjectAltNames, so by IP they need a leaf whose CN is the address they
dialled (tests/servers/test_client_programs.py runs the programs); and with standard ports the
second domain listens on 127.0.0.2, which its leaf must list.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from roundtrip.certs import CertificateAuthority
from roundtrip.config import StackConfig
from roundtrip.errors import ServerStartError
from roundtrip.stack import MailStack

TIMEOUT = 10.0


def common_name(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    [attr] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


def alt_names(der: bytes) -> tuple[set[str], set[str]]:
    """The DNS names and IP addresses of a certificate's subjectAltName."""
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = set(san.get_values_for_type(x509.DNSName))
    addresses = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns_names, addresses


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str | None) -> bytes:
    """One TLS handshake over memory BIOs; the DER certificate the client received.

    ``server_name`` goes into SNI as given (a raw SSLObject sends even an address, as mbsync
    does); the client checks nothing, so the test sees whichever leaf was chosen.
    """
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = client.wrap_bio(client_in, client_out, server_hostname=server_name)
    peer = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (conn, peer):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done == 2:
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            return der
    raise AssertionError("handshake did not finish")


def unchecked_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def test_certs_leaf_lists_names_addresses_and_loopback(ca: CertificateAuthority) -> None:
    leaf = ca.leaf(["mail.example.org", "example.org", "127.0.0.2", "0.0.0.0"])
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert common_name(der) == "mail.example.org"
    names, addresses = alt_names(der)
    assert names == {"mail.example.org", "example.org", "localhost"}
    # The unspecified address is not an identity any client can dial.
    assert addresses == {"127.0.0.2", "127.0.0.1", "::1"}


def test_certs_host_name_in_sni_gets_the_name_leaf(ca: CertificateAuthority) -> None:
    server = ca.server_context(["mail.example.org", "example.org", "127.0.0.2"])
    der = handshake(server, unchecked_client(), "mail.example.org")
    assert common_name(der) == "mail.example.org"


@pytest.mark.parametrize("dialled", [None, "127.0.0.2"])
def test_certs_client_without_sni_gets_a_leaf_named_by_the_listener_address(
    ca: CertificateAuthority, dialled: str | None
) -> None:
    # CPython sends no SNI for an address (RFC 6066 section 3), as most clients dialling one.
    server = ca.server_context(["mail.example.org", "example.org", "127.0.0.2"])
    der = handshake(server, unchecked_client(), dialled)
    assert common_name(der) == "127.0.0.2"
    # Same subjectAltNames as the name leaf: SAN-checking clients see no difference.
    names, addresses = alt_names(der)
    assert names == {"mail.example.org", "example.org", "localhost"}
    assert addresses == {"127.0.0.2", "127.0.0.1", "::1"}


@pytest.mark.parametrize(
    ("sent", "expected_cn"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("0:0::1", "::1"), ("192.0.2.7", None)],
)
def test_certs_address_sent_in_sni_picks_that_address_leaf(
    ca: CertificateAuthority, sent: str, expected_cn: str | None
) -> None:
    # Some clients put the dialled address in SNI anyway; CPython cannot be made to, so the
    # callback is called as OpenSSL would call it, on a real server-side SSLObject.
    server = ca.server_context(["mail.example.org", "127.0.0.2"])
    conn = server.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert server.sni_callback is not None
    server.sni_callback(conn, sent, server)
    if expected_cn is None:  # not an address of ours: the name leaf stays
        assert conn.context is server
        return
    assert conn.context is not server
    der = handshake(conn.context, unchecked_client(), None)
    assert common_name(der) == expected_cn


def test_certs_address_leaf_still_verifies_against_the_ca_only(ca: CertificateAuthority) -> None:
    server = ca.server_context(["mail.example.org", "127.0.0.2"])
    trusting = ca.client_context()
    trusting.check_hostname = False  # a memory BIO has no address to match; the chain counts
    assert common_name(handshake(server, trusting, None)) == "127.0.0.2"
    foreign = CertificateAuthority().client_context()
    foreign.check_hostname = False
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, foreign, None)


# With standard ports each domain listens on its own 127.0.0.N (roundtrip serve prints it).


@pytest.fixture(scope="module")
def standard_stack() -> Iterator[MailStack]:
    if os.geteuid() != 0:
        pytest.skip("ports='standard' binds ports below 1024: needs root")
    try:
        stack = MailStack(StackConfig(ports="standard")).start()
    except ServerStartError as exc:
        pytest.skip(f"standard ports cannot be bound here: {exc}")
    try:
        yield stack
    finally:
        stack.stop()


def _verify(address: tuple[str, int], ctx: ssl.SSLContext) -> str:
    """Handshake with a default-context client that verifies ``address``; the peer's CN."""
    with (
        socket.create_connection(address, timeout=TIMEOUT) as sock,
        ctx.wrap_socket(sock, server_hostname=address[0]) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return common_name(der)


@pytest.mark.parametrize("service", ["submissions", "imaps", "pop3s"])
def test_certs_standard_ports_second_domain_verifies_by_its_address(
    standard_stack: MailStack, service: str
) -> None:
    # Before: "IP address mismatch, certificate is not valid for '127.0.0.2'".
    host, port = standard_stack.endpoints("example.org").address(service)
    assert ipaddress.ip_address(host) == ipaddress.ip_address("127.0.0.2")
    ctx = ssl.create_default_context(cafile=standard_stack.ca_file)

    assert _verify((host, port), ctx) == "127.0.0.2"


def test_certs_standard_ports_foreign_ca_fails(standard_stack: MailStack) -> None:
    address = standard_stack.endpoints("example.org").address("imaps")
    ctx = ssl.create_default_context(cadata=CertificateAuthority().pem.decode())

    with pytest.raises(ssl.SSLCertVerificationError):
        _verify(address, ctx)


def test_certs_ephemeral_stack_verifies_by_address_and_name() -> None:
    with MailStack() as stack:
        ep = stack.endpoints("example.org")
        host, port = ep.address("imaps")
        ctx = ssl.create_default_context(cafile=stack.ca_file)
        assert _verify((host, port), ctx) == host
        with (
            socket.create_connection((host, port), timeout=TIMEOUT) as sock,
            ctx.wrap_socket(sock, server_hostname=ep.hostname) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            assert common_name(der) == ep.hostname
