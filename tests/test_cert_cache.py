"""Keys and certificates kept across sessions in a cache directory (issue #17).

Every cache lives in ``tmp_path``: no key is ever written into the project.
"""

from __future__ import annotations

import datetime
import os
import re
import smtplib
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509

from roundtrip import MailStack, StackConfig
from roundtrip.config import cert_cache_dir
from roundtrip.errors import ConfigError
from roundtrip.stack._certcache import CachedCertificateAuthority

_TIMEOUT = 10.0


def _served_leaf(stack: MailStack) -> bytes:
    """The DER certificate the stack's 465 listener presents, over a real TLS connection."""
    ep = stack.endpoint("submissions")
    with socket.create_connection((ep.host, ep.port), timeout=_TIMEOUT) as raw:
        ctx = stack.client_context()
        with ctx.wrap_socket(raw, server_hostname=ep.server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _start(cache: Path | None) -> tuple[bytes, bytes]:
    """Start a stack, check a client can log in over 465, return (CA PEM, served leaf)."""
    config = StackConfig(cert_cache=str(cache) if cache is not None else None)
    with MailStack(config) as stack:
        ep = stack.endpoint("submissions")
        with smtplib.SMTP_SSL(
            ep.host, ep.port, context=stack.client_context(), timeout=_TIMEOUT
        ) as smtp:
            smtp.login(ep.user, ep.password)
        return stack.ca.pem, _served_leaf(stack)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


def test_cert_cache_second_stack_reuses_ca_and_leaves(tmp_path: Path) -> None:
    cache = tmp_path / "certs"
    first = _start(cache)
    files = _modes(cache)
    second = _start(cache)
    assert second == first
    assert _modes(cache) == files  # nothing minted the second time
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert "ca.pem" in files and any(name.startswith("leaf-") for name in files)
    assert set(files.values()) == {0o600}


def test_cert_cache_off_mints_new_keys_every_time(tmp_path: Path) -> None:
    first, second = _start(None), _start(None)
    assert first[0] != second[0] and first[1] != second[1]
    assert list(tmp_path.iterdir()) == []


def test_cert_cache_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        MailStack(StackConfig(cert_cache=str(cache)))
    assert list(cache.iterdir()) == []


def test_cert_cache_key_readable_by_others_is_replaced(tmp_path: Path) -> None:
    first = CachedCertificateAuthority(tmp_path).pem
    (tmp_path / "ca.pem").chmod(0o644)
    second = CachedCertificateAuthority(tmp_path).pem
    assert second != first
    assert _modes(tmp_path)["ca.pem"] == 0o600
    # And a private one is loaded again.
    assert CachedCertificateAuthority(tmp_path).pem == second


def test_cert_cache_leaf_loads_only_for_the_same_names(tmp_path: Path) -> None:
    names = ["mail.example.com", "127.0.0.1"]
    leaf = CachedCertificateAuthority(tmp_path).leaf(names)
    again = CachedCertificateAuthority(tmp_path)
    assert again.leaf(names).cert_chain_pems[0].bytes() == leaf.cert_chain_pems[0].bytes()
    other = again.leaf(["mail.example.org", "127.0.0.1"]).cert_chain_pems[0].bytes()
    sans = x509.load_pem_x509_certificate(other).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "mail.example.org" in sans.value.get_values_for_type(x509.DNSName)
    assert "mail.example.com" not in sans.value.get_values_for_type(x509.DNSName)


def test_cert_cache_expiring_leaf_is_minted_again(tmp_path: Path) -> None:
    names = ["mail.example.com"]
    authority = CachedCertificateAuthority(tmp_path)
    leaf = authority.leaf(names)
    (path,) = tmp_path.glob("leaf-*.pem")
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    expiring = authority.ca.issue_cert(*names, not_after=soon)
    path.write_bytes(expiring.private_key_pem.bytes() + expiring.cert_chain_pems[0].bytes())
    fresh = CachedCertificateAuthority(tmp_path).leaf(names).cert_chain_pems[0].bytes()
    assert fresh != expiring.cert_chain_pems[0].bytes()
    assert fresh != leaf.cert_chain_pems[0].bytes()
    assert x509.load_pem_x509_certificate(fresh).not_valid_after_utc > soon
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_cert_cache_dir_from_environment() -> None:
    assert cert_cache_dir({"ROUNDTRIP_CERT_CACHE": "/tmp/x"}) == "/tmp/x"
    assert cert_cache_dir({"ROUNDTRIP_CERT_CACHE": "  "}) is None
    assert cert_cache_dir({}) is None
    home = os.path.expanduser("~")
    assert cert_cache_dir({"ROUNDTRIP_CERT_CACHE": "~/rt"}) == os.path.join(home, "rt")


PLUGIN_TEST = """
import hashlib, pathlib

def test_ca(mailstack):
    pem = pathlib.Path(mailstack.ca_file).read_bytes()
    print("CA", hashlib.sha256(pem).hexdigest())
"""


def _session_ca(pytester: pytest.Pytester) -> str:
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    [digest] = re.findall(r"\bCA ([0-9a-f]{64})\b", result.stdout.str())
    return digest


def test_cert_cache_plugin_sessions_share_the_ca(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_ca=PLUGIN_TEST)
    monkeypatch.setenv("ROUNDTRIP_CERT_CACHE", str(tmp_path / "certs"))
    assert _session_ca(pytester) == _session_ca(pytester)


def test_cert_cache_plugin_sessions_without_it_mint_each_time(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The twin: no cache directory, a new CA per session."""
    pytester.makepyfile(test_ca=PLUGIN_TEST)
    monkeypatch.delenv("ROUNDTRIP_CERT_CACHE", raising=False)
    assert _session_ca(pytester) != _session_ca(pytester)
