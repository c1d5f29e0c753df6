"""Keys and certificates kept across sessions in a cache directory (issue #17, start-up).

By default every stack mints its CA and leaves at run time and keeps them in memory only.
With a cache directory (``StackConfig(cert_cache=PATH)`` or ``ROUNDTRIP_CERT_CACHE``) the CA
and each leaf are written there once and loaded by later sessions, so a test session does not
pay for key generation and signing again. What is stored, and when it is trusted again:

- ``ca.pem``: the CA's private key and certificate in one file, so two sessions minting at
  once can never leave a key beside the other session's certificate (each file is written to
  a temporary name and renamed into place, which is atomic).
- ``leaf-<ca>-<names>.pem``: a leaf's key and certificate; ``<ca>`` is the start of the CA
  certificate's SHA-256, so leaves of a replaced CA are never loaded, and ``<names>`` the
  SHA-256 of the identities and Common Name asked for, so a leaf is loaded only for exactly
  the names it was minted for.
- Every file is created with mode 0600 inside a directory of mode 0700. A file that is
  readable by others, or a certificate that expires within a day, is not loaded: it is minted
  again and replaced. A directory owned by another user, or writable by group or others, is
  refused (``ConfigError``): whoever can write there could plant a CA the stack's clients
  would trust.

Expired-on-purpose leaves (``not_after=``) are never cached. Keys are never written into the
project: tests give a ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import trustme
from cryptography import x509

from ..certs import CertificateAuthority
from ..errors import ConfigError

__all__ = ["CachedCertificateAuthority", "cached_authority"]

#: A certificate expiring sooner than this is minted again rather than loaded.
_MARGIN = datetime.timedelta(days=1)
_CA_FILE = "ca.pem"
_KEY_MARKER = b"-----BEGIN CERTIFICATE-----"


def _check_directory(directory: Path) -> None:
    """Create ``directory`` (0700) or check that only its owner can write it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"cert_cache {str(directory)!r} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.getuid()}); give a directory of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"cert_cache {str(directory)!r} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it or give another directory"
        )


def _read_private(path: Path) -> bytes | None:
    """The file's bytes if it is a regular file of ours that only we can read, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        ):
            return None
        return fh.read()


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _split(data: bytes) -> tuple[bytes, bytes] | None:
    """(private key PEM, certificate PEM) from one file holding both, key first."""
    at = data.find(_KEY_MARKER)
    if at <= 0:
        return None
    return data[:at], data[at:]


def _fresh(cert_pem: bytes) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    now = datetime.datetime.now(datetime.UTC)
    return bool(cert.not_valid_before_utc <= now and cert.not_valid_after_utc > now + _MARGIN)


def _load_ca(directory: Path) -> trustme.CA:
    data = _read_private(directory / _CA_FILE)
    parts = _split(data) if data is not None else None
    if parts is not None and _fresh(parts[1]):
        try:
            return trustme.CA.from_pem(parts[1], parts[0])
        except ValueError:
            pass  # damaged: mint again below
    ca = trustme.CA(organization_name="roundtrip test CA")
    _write_private(directory / _CA_FILE, ca.private_key_pem.bytes() + ca.cert_pem.bytes())
    return ca


class CachedCertificateAuthority(CertificateAuthority):
    """A :class:`~roundtrip.certs.CertificateAuthority` whose CA and leaves live in a directory.

    Args:
        directory: the cache directory (created with mode 0700 if missing).

    Raises:
        ConfigError: the directory belongs to another user or others may write to it.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        _check_directory(self.directory)
        super().__init__(_load_ca(self.directory))
        self._ca_tag = hashlib.sha256(self.ca.cert_pem.bytes()).hexdigest()[:16]
        self._cached: dict[tuple[tuple[str, ...], str | None], trustme.LeafCert] = {}

    def leaf(
        self,
        identities: Iterable[str],
        *,
        not_after: datetime.datetime | None = None,
        common_name: str | None = None,
    ) -> trustme.LeafCert:
        """As :meth:`CertificateAuthority.leaf`, loaded from the cache directory when there."""
        names = tuple(identities)
        if not_after is not None:
            return super().leaf(names, not_after=not_after, common_name=common_name)
        key = (names, common_name)
        cert = self._cached.get(key)
        if cert is None:
            cert = self._cached[key] = self._load_or_mint(names, common_name)
        return cert

    def _load_or_mint(self, names: tuple[str, ...], common_name: str | None) -> trustme.LeafCert:
        digest = hashlib.sha256(repr((names, common_name)).encode("utf-8")).hexdigest()[:32]
        path = self.directory / f"leaf-{self._ca_tag}-{digest}.pem"
        data = _read_private(path)
        parts = _split(data) if data is not None else None
        if parts is not None and _fresh(parts[1]):
            return trustme.LeafCert(parts[0], parts[1], [self.ca.cert_pem.bytes()])
        cert = super().leaf(names, common_name=common_name)
        _write_private(path, cert.private_key_pem.bytes() + cert.cert_chain_pems[0].bytes())
        return cert


def cached_authority(directory: str | os.PathLike[str]) -> CachedCertificateAuthority:
    """The certificate authority kept in ``directory`` (see the module's docstring)."""
    return CachedCertificateAuthority(directory)
