"""Certificates for a stack: one trustme CA, leaf certificates, SSLContext builders.

Keys and certificates are minted at run time and never written into the project. A stack's
servers present one leaf covering every host name they serve, the address they listen on and
the loopback addresses, so a client may dial either the IP or the name and still verify.

Two identities per listener: clients that match the subject Common Name and ignore IP
subjectAltNames (mbsync 1.4: "certificate owner does not match hostname 127.0.0.1";
offlineimap3: "no matching domain name found in certificate") refuse a leaf whose CN is
``mail.<domain>`` when they dial ``127.0.0.1``. A name is all SNI can carry (RFC 6066 §3 forbids
literal addresses), so a client that sends no SNI, or sends an address anyway, dialled an
address: :meth:`CertificateAuthority.server_context` answers it with a twin leaf whose CN is
that address (the listener's own when none was sent). Both leaves carry the same
subjectAltNames, so a client that verifies by SAN (RFC 6125; Python, OpenSSL's
``X509_check_host``) sees no difference.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Iterable

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority"]

_LOOPBACK_IDENTITIES = ("localhost", "127.0.0.1", "::1")


class CertificateAuthority:
    """A trustme CA with helpers for servers and clients.

    Args:
        ca: an existing ``trustme.CA`` to wrap (a new one is made otherwise).
    """

    def __init__(self, ca: trustme.CA | None = None) -> None:
        self.ca = ca if ca is not None else trustme.CA(organization_name="roundtrip test CA")
        self._leaves: dict[tuple[tuple[str, ...], str], trustme.LeafCert] = {}
        self._ca_file: str | None = None
        self._issuer: _Issuer | None = None

    def leaf(
        self,
        identities: Iterable[str],
        *,
        not_after: datetime.datetime | None = None,
        common_name: str | None = None,
    ) -> trustme.LeafCert:
        """A leaf certificate for ``identities`` plus localhost, 127.0.0.1 and ::1.

        Args:
            identities: DNS names and IP addresses for the subjectAltName; unspecified
                addresses (``0.0.0.0``, ``::``) are left out, no client can dial them.
            not_after: expiry, for tests of expired certificates (such leaves are not cached).
            common_name: the subject CN; the first identity by default.

        Leaves are cached per set of names and CN (minting costs about a millisecond with
        ECDSA).
        """
        names = _identities(identities)
        # A Common Name as well as the SANs: fetchmail (6.4) refuses certificates without one.
        cn = names[0] if common_name is None else common_name
        if not_after is not None:
            return self._issue(names, cn, not_after)
        cert = self._leaves.get((names, cn))
        if cert is None:
            cert = self._leaves[names, cn] = self._issue(names, cn, None)
        return cert

    def _issue(
        self, names: tuple[str, ...], cn: str, not_after: datetime.datetime | None
    ) -> trustme.LeafCert:
        """Mint a leaf: our own issuer for host names and addresses, trustme for the rest."""
        if not all(_is_address(name) or _PLAIN_HOST.match(name) for name in names):
            # Internationalised names, A-labels, networks, e-mail addresses: trustme's IDNA
            # encoding (idna, UTS #46) and identity parsing.
            return self.ca.issue_cert(*names, common_name=cn, not_after=not_after)
        if self._issuer is None:
            self._issuer = _Issuer(self.ca)
        return self._issuer.issue(names, cn, not_after)

    def server_context(
        self,
        identities: Iterable[str],
        *,
        minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
        local_address: str | None = None,
    ) -> ssl.SSLContext:
        """A server-side context presenting a leaf for ``identities``.

        A client that sends a host name in SNI gets the leaf whose CN is the first identity.
        One that sends no SNI, or an IP address in it, gets a twin leaf whose CN is that address
        (``local_address``, the one the listener is bound to, when none was sent: the address
        the client dialled), for clients that match the CN and ignore IP subjectAltNames. A
        listener on several addresses (``127.0.0.1`` and ``::1``) needs one context for each:
        the handshake cannot see which address the connection came in on.

        Args:
            identities: the names and addresses the leaf covers (the loopback ones are added).
            minimum_version: TLS 1.2 is the floor (RFC 8996, RFC 8997).
            local_address: the address a no-SNI client gets in the CN; by default the first
                address among ``identities``. An unspecified one (``0.0.0.0``, ``::``) says
                nothing of what the client dialled and keeps that default.
        """
        names = _identities(identities)
        addresses = [name for name in names if _is_address(name)]
        if local_address is not None and _is_address(local_address):
            local = ipaddress.ip_address(local_address)
            if not local.is_unspecified:
                # Covered by both leaves' subjectAltNames, and the no-SNI default.
                names = _identities([*names, str(local)])
                addresses = [str(local), *(a for a in addresses if a != str(local))]
        ctx = _server_context(self.leaf(names), minimum_version)
        by_address: dict[str, ssl.SSLContext] = {}

        def for_address(address: str) -> ssl.SSLContext:
            twin = by_address.get(address)
            if twin is None:
                leaf = self.leaf(names, common_name=address)
                twin = by_address[address] = _server_context(leaf, minimum_version)
            return twin

        # Minted now, not in the first handshake: the callback runs on the server's loop.
        for_address(addresses[0])
        ctx.sni_callback = _choose_leaf(for_address, addresses)
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


#: An ASCII host name that needs no IDNA processing (RFC 1123 section 2.1 labels; no A-labels,
#: which IDNA would check): written into the subjectAltName as it is, in lower case.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PLAIN_HOST = re.compile(rf"(?!.*--)(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\Z", re.IGNORECASE | re.ASCII)

#: Validity of minted leaves, as trustme's defaults: from 2000 to 3000.
_NOT_BEFORE = datetime.datetime(2000, 1, 1)
_NOT_AFTER = datetime.datetime(3000, 1, 1)


class _Issuer:
    """Issues leaf certificates from a trustme CA with cryptography directly.

    The leaves carry what ``trustme.CA.issue_cert`` puts in its own (an ECDSA P-256 key,
    basicConstraints CA:FALSE, the authority and subject key identifiers, a critical
    subjectAltName, keyUsage digitalSignature and keyEncipherment, extendedKeyUsage serverAuth
    and clientAuth). trustme encodes every DNS name with the ``idna`` package's UTS #46
    mapping, which costs about 0.7 ms a name and 1.2 MiB of tables on first use; plain ASCII
    host names need none of it (RFC 5280 section 4.2.1.6: a dNSName is an IA5String in the
    preferred name syntax), so a stack's start mints its leaves without it.
    """

    def __init__(self, ca: trustme.CA) -> None:
        self.key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
        self.cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        # The chain a server presents: the issuing CA when it is an intermediate, and every
        # intermediate above it (the root stays out, as trustme's chain_to_ca).
        self.chain: list[bytes] = []
        above: trustme.CA | None = ca
        while above is not None and above.parent_cert is not None:
            self.chain.append(bytes(above.cert_pem.bytes()))
            above = above.parent_cert

    def issue(
        self, names: tuple[str, ...], cn: str, not_after: datetime.datetime | None
    ) -> trustme.LeafCert:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "roundtrip test CA"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        general: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(name))
            if _is_address(name)
            else x509.DNSName(name.lower())
            for name in names
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(not_after or _NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self.aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.SubjectAlternativeName(general), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return trustme.LeafCert(key_pem, cert.public_bytes(serialization.Encoding.PEM), self.chain)


def _identities(identities: Iterable[str]) -> tuple[str, ...]:
    """``identities`` plus the loopback ones, without duplicates or unspecified addresses."""
    names = []
    for name in [*identities, *_LOOPBACK_IDENTITIES]:
        if _is_address(name):
            address = ipaddress.ip_address(name)
            if address.is_unspecified:
                continue
            name = str(address)
        names.append(name)
    return tuple(dict.fromkeys(names))


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _server_context(leaf: trustme.LeafCert, minimum_version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version
    # No TLS 1.3 session tickets: mail clients under test open fresh sessions, and each
    # ticket costs the server an encryption and the client a parse after every handshake.
    ctx.num_tickets = 0
    leaf.configure_cert(ctx)
    return ctx


_SNICallback = Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]


def _choose_leaf(
    for_address: Callable[[str], ssl.SSLContext], addresses: list[str]
) -> _SNICallback:
    """The ``sni_callback`` that swaps in the address-CN twin when no host name was sent."""

    def choose(conn: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name is None:
            conn.context = for_address(addresses[0])
        elif _is_address(server_name):
            address = str(ipaddress.ip_address(server_name))
            if address in addresses:
                conn.context = for_address(address)

    return choose
