"""--tls-scan: weak cipher classes (RFC 9325 section 4.1), against a loopback TLS server.

A server offering NULL encryption and anonymous key exchange at TLS 1.2 is found out; the
twin, a server with OpenSSL's defaults, is not. Classes the local OpenSSL cannot offer (RC4,
export, often 3DES) are named as not tested, never counted as refused.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator

import pytest
import trustme

from roundtrip.probes._net import FAIL, INFO, WARN, scan_tls
from roundtrip.probes.roundtrip import weak_cipher_findings

TIMEOUT = 5.0


class TLSServer:
    """Implicit TLS on 127.0.0.1: every connection gets a handshake and is closed."""

    def __init__(self, ca: trustme.CA, ciphers: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("mail.example.test").configure_cert(self.context)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_ciphers(ciphers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self.context.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    pass  # a refused handshake: what the scan is asking about

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server(ca: trustme.CA, ciphers: str) -> Iterator[TLSServer]:
    server = TLSServer(ca, ciphers)
    yield server
    server.close()


@pytest.fixture
def weak(ca: trustme.CA) -> Iterator[TLSServer]:
    yield from _server(ca, "aNULL:eNULL:DEFAULT:@SECLEVEL=0")


@pytest.fixture
def default(ca: trustme.CA) -> Iterator[TLSServer]:
    yield from _server(ca, "DEFAULT")


def _scan(server: TLSServer) -> dict[str, str]:
    return scan_tls(
        host="127.0.0.1",
        port=server.port,
        protocol="smtp",
        tls="implicit",
        server_name="mail.example.test",
        timeout=TIMEOUT,
    )


def test_weak_ciphers_null_and_anonymous_suites_are_failures(weak: TLSServer) -> None:
    outcomes = _scan(weak)
    assert outcomes["null-encryption"].startswith("accepted TLSv1.2"), outcomes
    assert outcomes["anonymous"].startswith("accepted TLSv1.2"), outcomes
    findings = weak_cipher_findings("smtp 127.0.0.1", "127.0.0.1", outcomes)
    failed = {f.evidence[0].split(":")[0] for f in findings if f.code == "weak-cipher"}
    assert failed == {"null-encryption", "anonymous"}
    assert {f.severity for f in findings if f.code == "weak-cipher"} == {FAIL}
    assert all("RFC 9325" in f.message for f in findings if f.code == "weak-cipher")


def test_weak_ciphers_a_default_server_has_none(default: TLSServer) -> None:
    """The twin: OpenSSL's default list offers none of them."""
    outcomes = _scan(default)
    assert outcomes["null-encryption"] == "refused"
    assert outcomes["anonymous"] == "refused"
    findings = weak_cipher_findings("smtp 127.0.0.1", "127.0.0.1", outcomes)
    assert [f for f in findings if f.code == "weak-cipher"] == []


def test_weak_ciphers_untested_classes_are_named_not_passed() -> None:
    outcomes = {
        "null-encryption": "refused",
        "anonymous": "refused",
        "rc4": "not tested: local OpenSSL cannot offer it (No cipher can be selected.)",
        "export": "not tested: local OpenSSL cannot offer it (No cipher can be selected.)",
        "3des": "accepted TLSv1.2 DES-CBC3-SHA",
    }
    findings = weak_cipher_findings("smtp 127.0.0.1", "127.0.0.1", outcomes)
    [des] = [f for f in findings if f.code == "weak-cipher"]
    assert des.severity == WARN and "SHOULD NOT" in des.message
    [untested] = [f for f in findings if f.code == "weak-cipher-untested"]
    assert untested.severity == INFO and "rc4, export" in untested.message
