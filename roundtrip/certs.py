"""Certificates for a stack: one trustme CA, leaf certificates, SSLContext builders.

Keys and certificates are minted at run time and never written into the project. A stack's
servers present one leaf covering every host name they serve plus the loopback addresses, so a
client may dial either the IP or the name and still verify.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections.abc import Iterable

import trustme

__all__ = ["CertificateAuthority"]

_LOOPBACK_IDENTITIES = ("localhost", "127.0.0.1", "::1")


class CertificateAuthority:
    """A trustme CA with helpers for servers and clients.

    Args:
        ca: an existing ``trustme.CA`` to wrap (a new one is made otherwise).
    """

    def __init__(self, ca: trustme.CA | None = None) -> None:
        self.ca = ca if ca is not None else trustme.CA(organization_name="roundtrip test CA")
        self._leaves: dict[tuple[str, ...], trustme.LeafCert] = {}
        self._ca_file: str | None = None

    def leaf(
        self,
        identities: Iterable[str],
        *,
        not_after: datetime.datetime | None = None,
    ) -> trustme.LeafCert:
        """A leaf certificate for ``identities`` plus localhost, 127.0.0.1 and ::1.

        Leaves are cached per set of names (minting costs about a millisecond with ECDSA).
        """
        names = tuple(dict.fromkeys([*identities, *_LOOPBACK_IDENTITIES]))
        # A Common Name as well as the SANs: fetchmail (6.4) refuses certificates without one.
        if not_after is not None:
            return self.ca.issue_cert(*names, common_name=names[0], not_after=not_after)
        cert = self._leaves.get(names)
        if cert is None:
            cert = self._leaves[names] = self.ca.issue_cert(*names, common_name=names[0])
        return cert

    def server_context(
        self,
        identities: Iterable[str],
        *,
        minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    ) -> ssl.SSLContext:
        """A server-side context presenting a leaf for ``identities``.

        TLS 1.2 is the floor (RFC 8996, RFC 8997).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = minimum_version
        # No TLS 1.3 session tickets: mail clients under test open fresh sessions, and each
        # ticket costs the server an encryption and the client a parse after every handshake.
        ctx.num_tickets = 0
        self.leaf(identities).configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies certificates and host names against this CA only.

        Built without the system trust store: ``ssl.create_default_context()`` loads it and
        spends about 70 ms doing so, on every call.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.pem.decode("ascii"))
        return ctx

    @property
    def pem(self) -> bytes:
        """The CA certificate and every CA above it (for an intermediate), PEM-encoded.

        Trusting the whole chain lets clients verify a leaf issued by an intermediate
        (``trustme.CA().create_child_ca()``), as they would a real server's.
        """
        chain = b""
        ca: trustme.CA | None = self.ca
        while ca is not None:
            chain += bytes(ca.cert_pem.bytes())
            ca = ca.parent_cert
        return chain

    def ca_file(self, directory: str | None = None) -> str:
        """Write the CA certificate to a PEM file (once) and return its path.

        External programs (fetchmail, mbsync, curl, ``--cafile``) read it from there.
        """
        if self._ca_file is None or not os.path.exists(self._ca_file):
            fd, path = tempfile.mkstemp(prefix="roundtrip-ca-", suffix=".pem", dir=directory)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.pem)
            self._ca_file = path
        return self._ca_file

    def cleanup(self) -> None:
        """Remove the CA file written by ``ca_file()``, if any."""
        if self._ca_file is not None:
            try:
                os.unlink(self._ca_file)
            except FileNotFoundError:
                pass
            self._ca_file = None
