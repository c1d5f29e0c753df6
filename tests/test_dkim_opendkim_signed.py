"""Mail signed by OpenDKIM (libopendkim, C) verifies at the stack's MX, driven with smtplib.

OpenDKIM's command-line signer, ``opendkim-testmsg -d -k -s``, always signs with rsa-sha1
and relaxed/simple: it has no option for the algorithm. The signatures a production OpenDKIM
writes (rsa-sha256, ed25519-sha256, relaxed/relaxed) come from the same library through its
signing calls (``dkim_sign``, ``dkim_header``, ``dkim_eoh``, ``dkim_body``, ``dkim_eom``,
``dkim_getsighdr_d``), which this module makes through ctypes on Debian's libopendkim11 (a
dependency of opendkim-tools), as the milter does for each message. Skipped where the library
is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import pathlib
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator

import pytest
from _support import make_message
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from roundtrip import MailStack, StackConfig

TIMEOUT = 5.0
SENDER = "app@example.com"
RCPT = "user@example.org"

# libopendkim's dkim.h: dkim_canon_t and dkim_alg_t values, DKIM_STAT_OK.
_RELAXED = 1
_ALGORITHMS = {"rsa-sha256": 1, "ed25519-sha256": 2}
_OK = 0


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("opendkim") or "libopendkim.so.11"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        pytest.skip(f"libopendkim is not installed (Debian package libopendkim11): {exc}")
    lib.dkim_init.restype = ctypes.c_void_p
    lib.dkim_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dkim_sign.restype = ctypes.c_void_p
    lib.dkim_sign.argtypes = [
        ctypes.c_void_p,  # DKIM_LIB *
        ctypes.c_char_p,  # id
        ctypes.c_void_p,  # memclosure
        ctypes.c_char_p,  # secret key (PEM)
        ctypes.c_char_p,  # selector
        ctypes.c_char_p,  # domain
        ctypes.c_int,  # header canonicalization
        ctypes.c_int,  # body canonicalization
        ctypes.c_int,  # signing algorithm
        ctypes.c_ssize_t,  # body length to sign (-1: all)
        ctypes.POINTER(ctypes.c_int),  # status
    ]
    for name in ("dkim_header", "dkim_body"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.dkim_eoh.argtypes = [ctypes.c_void_p]
    lib.dkim_eom.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dkim_getsighdr_d.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.dkim_geterror.restype = ctypes.c_char_p
    lib.dkim_geterror.argtypes = [ctypes.c_void_p]
    lib.dkim_free.argtypes = [ctypes.c_void_p]
    lib.dkim_close.argtypes = [ctypes.c_void_p]
    return lib


@pytest.fixture(scope="module")
def libopendkim() -> ctypes.CDLL:
    return _library()


def _opendkim_sign(
    lib: ctypes.CDLL, raw: bytes, pem: bytes, selector: str, domain: str, algorithm: str
) -> bytes:
    """``raw`` with the DKIM-Signature libopendkim computes for it (relaxed/relaxed)."""
    handle = lib.dkim_init(None, None)
    assert handle, "dkim_init failed"
    status = ctypes.c_int(-1)
    dkim = lib.dkim_sign(
        handle,
        b"roundtrip-test",
        None,
        pem,
        selector.encode(),
        domain.encode(),
        _RELAXED,
        _RELAXED,
        _ALGORITHMS[algorithm],
        -1,
        ctypes.byref(status),
    )
    try:
        assert dkim, f"dkim_sign: status {status.value}"
        head, _, body = raw.partition(b"\r\n\r\n")
        for field in re.split(rb"\r\n(?![ \t])", head):  # one call per (folded) field
            assert lib.dkim_header(dkim, field, len(field)) == _OK, lib.dkim_geterror(dkim)
        assert lib.dkim_eoh(dkim) == _OK, lib.dkim_geterror(dkim)
        assert lib.dkim_body(dkim, body, len(body)) == _OK, lib.dkim_geterror(dkim)
        assert lib.dkim_eom(dkim, None) == _OK, lib.dkim_geterror(dkim)
        prefix = b"DKIM-Signature: "
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        got = lib.dkim_getsighdr_d(dkim, len(prefix), ctypes.byref(buf), ctypes.byref(size))
        assert got == _OK, lib.dkim_geterror(dkim)
        value = ctypes.string_at(buf.value or 0, size.value)  # owned by the handle
    finally:
        if dkim:
            lib.dkim_free(dkim)
        lib.dkim_close(handle)
    # The library folds with bare LF; the message travels with CRLF.
    field = prefix + re.sub(rb"\r?\n", b"\r\n", value) + b"\r\n"
    return field + raw


def _key(algorithm: str) -> tuple[bytes, bytes]:
    """A fresh key pair: the private PEM libopendkim reads, the public PEM the stack serves."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(domains=("example.com", "example.org"), dkim=True)) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _mx_send(stack: MailStack, raw: bytes) -> None:
    """Hand ``raw`` to the recipient's MX as the application's own mail server would."""
    host, port = stack.endpoints("example.org").address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail(SENDER, [RCPT], raw)


def _signed(
    stack: MailStack, lib: ctypes.CDLL, algorithm: str, subject: str, selector: str
) -> bytes:
    private, public = _key(algorithm)
    stack.publish_dkim_key("example.com", selector, public)
    raw = make_message(sender=SENDER, recipient=RCPT, subject=subject)
    signed = _opendkim_sign(lib, raw, private, selector, "example.com", algorithm)
    assert f"a={algorithm};".encode() in signed.partition(b"\r\n\r\n")[0]
    return signed


ALGORITHMS = sorted(_ALGORITHMS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dkim_opendkim_signed_passes_at_our_mx(
    stack: MailStack, libopendkim: ctypes.CDLL, algorithm: str
) -> None:
    selector = f"odkim-{algorithm.partition('-')[0]}"
    _mx_send(stack, _signed(stack, libopendkim, algorithm, f"odkim {algorithm}", selector))
    (msg,) = stack.assert_delivered(
        RCPT, subject=f"odkim {algorithm}", auth={"dkim": "pass", "dmarc": "pass"}
    )
    (verdict,) = msg.auth.dkim
    assert verdict.properties["header.d"] == "example.com"
    assert verdict.properties["header.s"] == selector


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dkim_opendkim_signed_body_changed_fails_at_our_mx(
    stack: MailStack, libopendkim: ctypes.CDLL, algorithm: str
) -> None:
    """The twin: the same signed message with its body changed after signing."""
    selector = f"odkim-{algorithm.partition('-')[0]}"
    signed = _signed(stack, libopendkim, algorithm, f"odkim changed {algorithm}", selector)
    head, sep, body = signed.partition(b"\r\n\r\n")
    assert b"hello" in body
    _mx_send(stack, head + sep + body.replace(b"hello", b"jello"))
    (msg,) = stack.assert_delivered(RCPT, subject=f"odkim changed {algorithm}")
    (verdict,) = msg.auth.dkim
    assert verdict.result == "fail"
    assert "body hash" in (verdict.reason or "")


def test_dkim_opendkim_testmsg_rsa_sha1_is_refused_at_our_mx(
    stack: MailStack, tmp_path: pathlib.Path
) -> None:
    """``opendkim-testmsg`` signs with rsa-sha1 only; RFC 8301 section 3.1: a verifier must
    not consider such a signature valid. The MX reports it as a permanent error, and the
    message still passes DMARC through SPF, so it is delivered."""
    tool = shutil.which("opendkim-testmsg")
    if tool is None:
        pytest.skip("opendkim-testmsg is not installed (Debian package opendkim-tools)")
    private, public = _key("rsa-sha256")  # an RSA key; the tool picks the hash itself
    keyfile = tmp_path / "odkim-sha1.private"
    keyfile.write_bytes(private)
    stack.publish_dkim_key("example.com", "odkim-sha1", public)
    raw = make_message(sender=SENDER, recipient=RCPT, subject="odkim testmsg sha1")
    done = subprocess.run(
        [tool, "-C", "-d", "example.com", "-k", str(keyfile), "-s", "odkim-sha1"],
        input=raw.replace(b"\r\n", b"\n"),  # a Unix filter: LF in, the signature with CRLF
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    signed = re.sub(rb"\r?\n", b"\r\n", done.stdout)
    assert b"a=rsa-sha1;" in signed.partition(b"\r\n\r\n")[0]
    _mx_send(stack, signed)
    (msg,) = stack.assert_delivered(RCPT, subject="odkim testmsg sha1", auth={"dmarc": "pass"})
    (verdict,) = msg.auth.dkim
    assert verdict.result == "permerror"
    assert "rsa-sha1" in (verdict.reason or "")
    assert verdict.properties["header.s"] == "odkim-sha1"
