"""Certificate chain completeness, weak signatures and keys, and strict name match (RFC 9325,
RFC 9525), each against a loopback TLS server that has the weakness and a twin without it."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from roundtrip.config import Endpoint
from roundtrip.probes._net import Finding, Timeline, open_socket, wrap_tls
from roundtrip.probes.roundtrip import run_probe

TIMEOUT = 5.0
NAME = "mail.test"

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _key(kind: str = "ec") -> Key:
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: Key,
    issuer: tuple[str, Key] | None,
    *,
    ca: bool,
    names: list[str] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    if names is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


_SHA256_RSA = bytes.fromhex("2a864886f70d01010b")  # 1.2.840.113549.1.1.11
_SHA1_RSA = bytes.fromhex("2a864886f70d010105")  # 1.2.840.113549.1.1.5, same length


def _resigned_with_sha1(cert: x509.Certificate, issuer_key: rsa.RSAPrivateKey) -> x509.Certificate:
    """``cert`` (signed sha256WithRSAEncryption) signed again with SHA-1, which
    cryptography's builder refuses to do: swap the algorithm in the TBS and sign it."""
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(_SHA256_RSA) == 1
    tbs = tbs.replace(_SHA256_RSA, _SHA1_RSA)
    signature = issuer_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    algorithm = _tlv(0x30, _tlv(0x06, _SHA1_RSA) + b"\x05\x00")
    der = _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(der)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class PKI:
    """A root, an intermediate under it and a leaf under the intermediate, as files."""

    root: Path
    intermediate: Path
    leaf_only: Path
    full_chain: Path
    key: Path


def _pki(
    tmp_path: Path,
    *,
    leaf_key: str = "ec",
    sha1: bool = False,
    names: list[str] | None = None,
    leaf_cn: str = NAME,
) -> PKI:
    root_key, inter_key, key = _key(), _key("rsa2048" if sha1 else "ec"), _key(leaf_key)
    root = _cert("probe test root", root_key, None, ca=True)
    inter = _cert("probe test intermediate", inter_key, ("probe test root", root_key), ca=True)
    leaf = _cert(
        leaf_cn,
        key,
        ("probe test intermediate", inter_key),
        ca=False,
        names=[NAME] if names is None else names or None,
    )
    if sha1:
        assert isinstance(inter_key, rsa.RSAPrivateKey)
        leaf = _resigned_with_sha1(leaf, inter_key)
    files = PKI(*(tmp_path / n for n in ("root", "inter", "leaf", "full", "key")))
    files.root.write_bytes(_pem(root))
    files.intermediate.write_bytes(_pem(inter))
    files.leaf_only.write_bytes(_pem(leaf))
    files.full_chain.write_bytes(_pem(leaf) + _pem(inter))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


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
                with (
                    contextlib.suppress(OSError),
                    self.context.wrap_socket(conn, server_side=True) as tls,
                ):
                    while tls.recv(1024):
                        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(TIMEOUT)


@contextlib.contextmanager
def serving(chain: Path, key: Path) -> Iterator[TLSListener]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the weak certificates be served at all
    ctx.load_cert_chain(chain, key)
    server = TLSListener(ctx)
    try:
        yield server
    finally:
        server.close()


def _client(*anchors: Path, lenient: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for anchor in anchors:
        ctx.load_verify_locations(anchor)
    if lenient:  # a client that still verifies, but accepts SHA-1 and small keys
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _handshake(server: TLSListener, ctx: ssl.SSLContext, name: str = NAME) -> list[Finding]:
    timeline = Timeline()
    sock = open_socket("127.0.0.1", server.port, TIMEOUT, timeline, "smtp")
    with wrap_tls(sock, ctx, name, timeline, "smtp"):
        pass
    assert timeline.findings == []  # certificate findings are kept apart
    return timeline.certificate_findings


def _codes(findings: list[Finding]) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def _failed_probe(port: int, ctx: ssl.SSLContext, name: str = NAME) -> list[Finding]:
    smtp = Endpoint("smtp", "implicit", "127.0.0.1", port, "u@test", "pw", name)
    imap = Endpoint("imap", "implicit", "127.0.0.1", port, "u@test", "pw", name)
    result = run_probe(
        smtp, imap, context=ctx, mail_from="u@test", rcpt_to="u@test", timeout=TIMEOUT
    )
    assert not result.ok and result.error_step == "CONNECT", result.error
    return result.findings


# -- chain completeness (RFC 8446 section 4.4.2) ---------------------------------------------------


def test_tls_facts_leaf_without_intermediate_is_incomplete_even_when_verified(
    tmp_path: Path,
) -> None:
    # The client happens to hold the intermediate, so it verifies; a client that does not
    # (every fresh mail client) would fail.
    pki = _pki(tmp_path)
    with serving(pki.leaf_only, pki.key) as server:
        findings = _handshake(server, _client(pki.root, pki.intermediate))
    (incomplete,) = [f for f in findings if f.code == "chain-incomplete"]
    assert incomplete.severity == "fail"
    assert incomplete.server == f"127.0.0.1:{server.port}"
    assert "missing: CN=probe test intermediate" in incomplete.evidence
    assert any(e.startswith("sent 0: subject CN=mail.test") for e in incomplete.evidence)


def test_tls_facts_full_chain_is_complete(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    with serving(pki.full_chain, pki.key) as server:
        findings = _handshake(server, _client(pki.root, pki.intermediate))
    assert _codes(findings) == {"cert-names": "info"}


def test_tls_facts_probe_names_the_missing_intermediate_when_verification_fails(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path)
    with serving(pki.leaf_only, pki.key) as server:
        findings = _failed_probe(server.port, _client(pki.root))
    (incomplete,) = [f for f in findings if f.code == "chain-incomplete"]
    assert incomplete.severity == "fail"
    assert "missing: CN=probe test intermediate" in incomplete.evidence


def test_tls_facts_probe_finds_the_chain_complete_when_only_the_name_fails(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path)
    with serving(pki.full_chain, pki.key) as server:
        findings = _failed_probe(server.port, _client(pki.root), name="other.test")
    assert "chain-incomplete" not in _codes(findings)
    assert _codes(findings)["cert-names"] == "info"


# -- weak signatures and keys (RFC 9325) -----------------------------------------------------------


def test_tls_facts_sha1_signed_leaf_is_a_failure(tmp_path: Path) -> None:
    pki = _pki(tmp_path, sha1=True)
    with serving(pki.full_chain, pki.key) as server:
        findings = _handshake(server, _client(pki.root, lenient=True))
    (weak,) = [f for f in findings if f.code == "weak-signature"]
    assert weak.severity == "fail" and "SHA1" in weak.message
    assert weak.evidence == ("leaf: CN=mail.test; signature sha1WithRSAEncryption",)


def test_tls_facts_sha1_leaf_is_reported_after_a_strict_client_refuses_it(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path, sha1=True)
    with serving(pki.full_chain, pki.key) as server:
        findings = _failed_probe(server.port, _client(pki.root))
    assert _codes(findings).get("weak-signature") == "fail"


def test_tls_facts_sha256_chain_has_no_weak_signature(tmp_path: Path) -> None:
    pki = _pki(tmp_path, leaf_key="rsa2048")
    with serving(pki.full_chain, pki.key) as server:
        findings = _handshake(server, _client(pki.root, lenient=True))
    assert not {"weak-signature", "weak-key"} & set(_codes(findings))


def test_tls_facts_rsa_1024_leaf_is_a_warning(tmp_path: Path) -> None:
    pki = _pki(tmp_path, leaf_key="rsa1024")
    with serving(pki.full_chain, pki.key) as server:
        findings = _handshake(server, _client(pki.root, lenient=True))
    (weak,) = [f for f in findings if f.code == "weak-key"]
    assert weak.severity == "warn"
    assert weak.evidence == ("leaf: CN=mail.test; key RSA 1024 bits",)


# -- strict name match (RFC 9525) ------------------------------------------------------------------


def test_tls_facts_exact_name_is_listed_without_warning(tmp_path: Path) -> None:
    pki = _pki(tmp_path, names=[NAME, "*.test"])
    with serving(pki.full_chain, pki.key) as server:
        findings = _handshake(server, _client(pki.root))
    assert _codes(findings) == {"cert-names": "info"}
    (names,) = findings
    assert names.evidence == ("DNS:mail.test", "DNS:*.test", "CN=mail.test")
    assert "matches an exact DNS-ID" in names.message


def test_tls_facts_wildcard_only_name_is_a_warning(tmp_path: Path) -> None:
    pki = _pki(tmp_path, names=["*.example.test"], leaf_cn="*.example.test")
    with serving(pki.full_chain, pki.key) as server:
        findings = _handshake(server, _client(pki.root), name="mail.example.test")
    assert _codes(findings) == {"cert-names": "info", "cert-name-wildcard": "warn"}
    (wildcard,) = [f for f in findings if f.code == "cert-name-wildcard"]
    assert wildcard.evidence == ("DNS:*.example.test", "CN=*.example.test")


def test_tls_facts_cn_only_name_is_a_warning(tmp_path: Path) -> None:
    # No subjectAltName: Python (like every RFC 9525 client) refuses it; the probe says why.
    pki = _pki(tmp_path, names=[])
    with serving(pki.full_chain, pki.key) as server:
        findings = _failed_probe(server.port, _client(pki.root))
    codes = _codes(findings)
    assert codes["cert-name-cn-only"] == "warn"
    assert "chain-incomplete" not in codes


@pytest.mark.parametrize("name", ["127.0.0.1"])
def test_tls_facts_name_of_an_address_without_ip_id_matches_nothing(
    tmp_path: Path, name: str
) -> None:
    pki = _pki(tmp_path)
    with serving(pki.full_chain, pki.key) as server:
        findings = _failed_probe(server.port, _client(pki.root), name=name)
    (names,) = [f for f in findings if f.code == "cert-names"]
    assert names.message.endswith(f"{name} matches no name")
