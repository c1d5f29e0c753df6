"""Outbound STARTTLS policy: MTA-STS policies (RFC 8461) and TLS-RPT result types (RFC 8460).

Theory of operation
-------------------
A sending MTA decides per recipient domain how much TLS it insists on. This module holds the
pure part of that decision; ``servers/relay.py`` does the I/O, ``servers/_relayerrors.py`` maps
``ssl`` exceptions to the plain values passed in here, and ``protocols/delivery.py`` words the
failures and says which ones defer.

* :class:`TLSPolicy` is one domain's policy: a ``mode`` (RFC 8461 §5) and the ``mx`` patterns
  its MX hosts must match (§4.1), plus the optional ``max_age``.

  - ``enforce``: deliver only to an MX that matches a pattern, over STARTTLS with a certificate
    that is trusted, unexpired and valid for the MX name. Anything else is a temporary failure
    for that MX; never a plaintext fallback.
  - ``testing``: try exactly that, but on failure deliver anyway and report the failure.
  - ``none``: no MTA-STS; opportunistic TLS (RFC 7435), as for a domain without a policy.

* :func:`parse_policy` reads the policy file (RFC 8461 §3.2, ``mta-sts.txt``); invalid input
  raises ``RemoteProtocolError`` (the file comes from the recipient domain), which a sender
  reports as ``sts-policy-invalid``.
* :func:`parse_sts_record` and :func:`select_sts_record` read the ``_mta-sts.<domain>`` TXT
  record (RFC 8461 §3.1): ``v=STSv1; id=<1-32 alphanumerics>;`` plus ignored extensions.
* :func:`mx_matches` is the MX host check of RFC 8461 §4.1: a leading ``*.`` matches exactly
  one label.
* :class:`ResultType` names failures as the IANA "STARTTLS Validation Result Types" registry
  (RFC 8460 §4.3) does; :func:`verify_failure_result` maps an X.509 verification error (the
  OpenSSL ``verify_code`` / ``verify_message`` of ``ssl.SSLCertVerificationError``) to one.

An MX host that matches none of the policy's ``mx`` patterns is reported as
``certificate-host-mismatch``: RFC 8460 §4.3.1 defines it as a certificate that "did not adhere
to the constraints specified in the MTA-STS or DANE policy", and the MX patterns are exactly the
identities an MTA-STS policy allows the certificate to carry (Postfix
``smtp_tls_enforce_sts_mx_patterns`` matches the certificate against them). The draft's
``mx-mismatch`` type did not make it into RFC 8460 or the registry.

Unsupported: fetching the policy over HTTPS (``https://mta-sts.<domain>/.well-known/...``),
policy caching and ``max_age`` expiry, DANE (RFC 7672), and sending TLS-RPT reports (the relay
records result types in its events instead).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, RemoteProtocolError

__all__ = [
    "MODES",
    "PolicyMode",
    "ResultType",
    "TLSPolicy",
    "mx_matches",
    "parse_policy",
    "parse_sts_record",
    "select_sts_record",
    "sts_record",
    "verify_failure_result",
]

PolicyMode = Literal["enforce", "testing", "none"]
MODES: tuple[PolicyMode, ...] = ("enforce", "testing", "none")

#: RFC 8461 §3.2: max_age is at most 31557600 seconds (about one year).
MAX_AGE_LIMIT = 31557600
#: RFC 8461 §3.3: a policy body larger than 64 KiB may be refused; we do.
POLICY_SIZE_LIMIT = 64 * 1024

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+$")
# RFC 8461 §3.2 sts-policy-ext-name and §3.1 sts-ext-name.
_EXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
# RFC 8461 §3.1: sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E), i.e. no space, ";" or "=".
_EXT_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+$")
_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_WSP = " \t"


class ResultType(enum.StrEnum):
    """The IANA "STARTTLS Validation Result Types" (RFC 8460 §4.3)."""

    #: The MX did not offer (or refused) STARTTLS.
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    #: The certificate (or the MX name) does not fit the policy, e.g. a name not in the SAN.
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    #: The certificate has expired.
    CERTIFICATE_EXPIRED = "certificate-expired"
    #: Unknown CA, broken chain, self-signed, not yet valid, revoked ...
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    #: Any other failure (a TLS handshake error, for one).
    VALIDATION_FAILURE = "validation-failure"
    #: DANE: no valid TLSA record (not implemented here).
    TLSA_INVALID = "tlsa-invalid"
    #: DANE: DNSSEC validation failed (not implemented here).
    DNSSEC_INVALID = "dnssec-invalid"
    #: DANE required but absent (not implemented here).
    DANE_REQUIRED = "dane-required"
    #: The MTA-STS policy could not be fetched.
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    #: The MTA-STS policy is invalid.
    STS_POLICY_INVALID = "sts-policy-invalid"
    #: The HTTPS certificate of the policy host failed PKIX validation.
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) that have their own result type.
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64


def verify_failure_result(verify_code: int | None, verify_message: str = "") -> ResultType:
    """The result type of a failed certificate verification.

    Args:
        verify_code: OpenSSL's ``X509_V_ERR_*`` code (``SSLCertVerificationError.verify_code``),
            or None when unknown.
        verify_message: OpenSSL's text for it (``verify_message``), used when the code is
            missing.

    Returns:
        ``certificate-expired`` for an expired certificate, ``certificate-host-mismatch`` for a
        certificate not valid for the name, ``certificate-not-trusted`` for every other
        verification error (RFC 8460 §4.3.1 makes it the catch-all for certificate problems).
    """
    text = verify_message.lower()
    if verify_code == _X509_V_ERR_CERT_HAS_EXPIRED or (verify_code is None and "expired" in text):
        return ResultType.CERTIFICATE_EXPIRED
    if verify_code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH) or (
        verify_code is None and "mismatch" in text
    ):
        return ResultType.CERTIFICATE_HOST_MISMATCH
    return ResultType.CERTIFICATE_NOT_TRUSTED


def _normalize_host(name: str) -> str:
    return name.strip().rstrip(".").lower()


def mx_matches(pattern: str, host: str) -> bool:
    """Whether MX ``host`` matches policy ``pattern`` (RFC 8461 §4.1).

    Case and a trailing dot are ignored. ``*.example.com`` matches ``mail.example.com`` but
    neither ``example.com`` nor ``a.b.example.com``: the wildcard stands for one whole label.
    """
    pattern = _normalize_host(pattern)
    host = _normalize_host(host)
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and first != "*" and rest == pattern[2:]
    return host == pattern


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """The outbound TLS policy of one recipient domain.

    Attributes:
        mode: ``enforce``, ``testing`` or ``none`` (RFC 8461 §5).
        mx: MX host patterns (RFC 8461 §4.1); None means any MX is acceptable, which no policy
            file can say: the stack uses it for a mode given without patterns.
        max_age: seconds the policy may be cached, when it came from a policy file.
    """

    mode: PolicyMode = "enforce"
    mx: tuple[str, ...] | None = None
    max_age: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"MTA-STS mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mx is not None:
            patterns = tuple(_normalize_host(p) for p in self.mx)
            for pattern in patterns:
                if not _valid_pattern(pattern):
                    raise ConfigError(f"MTA-STS mx pattern {pattern!r} is not a host name")
            object.__setattr__(self, "mx", patterns)
        if self.max_age is not None and not 0 <= self.max_age <= MAX_AGE_LIMIT:
            raise ConfigError(f"MTA-STS max_age {self.max_age} is not in 0..{MAX_AGE_LIMIT}")

    def mx_allowed(self, host: str) -> bool:
        """Whether mail may go to ``host`` under this policy (always, in mode ``none``)."""
        if self.mode == "none" or self.mx is None:
            return True
        return any(mx_matches(pattern, host) for pattern in self.mx)

    @property
    def requires_tls(self) -> bool:
        """True in ``enforce`` mode: a failure defers the message instead of being reported."""
        return self.mode == "enforce"

    def to_text(self) -> str:
        """The policy as a policy file (RFC 8461 §3.2), CRLF-terminated lines."""
        lines = ["version: STSv1", f"mode: {self.mode}"]
        lines += [f"mx: {pattern}" for pattern in self.mx or ()]
        lines.append(f"max_age: {self.max_age if self.max_age is not None else 86400}")
        return "".join(line + "\r\n" for line in lines)


def _valid_pattern(pattern: str) -> bool:
    return bool(_DOMAIN.match(pattern[2:] if pattern.startswith("*.") else pattern))


def parse_policy(text: str | bytes) -> TLSPolicy:
    """Parse an MTA-STS policy file (RFC 8461 §3.2).

    ``key: value`` lines separated by LF or CRLF; ``version: STSv1``, ``mode`` and ``max_age``
    are required, each at most once; ``mx`` repeats and is required unless the mode is
    ``none``. Unknown keys with a well-formed name are ignored (extensions).

    Raises:
        RemoteProtocolError: the policy is invalid (a sender reports ``sts-policy-invalid``).
    """
    if isinstance(text, bytes):
        if len(text) > POLICY_SIZE_LIMIT:
            raise RemoteProtocolError(f"MTA-STS policy is larger than {POLICY_SIZE_LIMIT} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"MTA-STS policy is not UTF-8: {exc}") from None
    if len(text) > POLICY_SIZE_LIMIT:
        raise RemoteProtocolError(f"MTA-STS policy is larger than {POLICY_SIZE_LIMIT} bytes")
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the optional final delimiter
    for number, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if "\r" in line or "\x00" in line:
            raise RemoteProtocolError(f"MTA-STS policy line {number}: stray CR or NUL")
        name, colon, value = line.partition(":")
        if not colon or not _EXT_NAME.match(name):
            raise RemoteProtocolError(
                f"MTA-STS policy line {number}: expected 'key: value', got {line[:80]!r}"
            )
        key = name.lower()
        value = value.strip(_WSP)
        if key == "mx":
            if not _valid_pattern(_normalize_host(value)) or value.endswith("."):
                raise RemoteProtocolError(f"MTA-STS policy line {number}: bad mx {value!r}")
            mx.append(value)
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise RemoteProtocolError(f"MTA-STS policy: {key} appears more than once")
            fields[key] = value
        # Any other well-formed key is an extension: ignored (RFC 8461 §3.2).
    if fields.get("version") != "STSv1":
        raise RemoteProtocolError(
            f"MTA-STS policy: version {fields.get('version')!r}, expected 'STSv1'"
        )
    mode = fields.get("mode")
    if mode not in MODES:
        raise RemoteProtocolError(
            f"MTA-STS policy: mode {mode!r}, expected one of {', '.join(MODES)}"
        )
    max_age_text = fields.get("max_age", "")
    # RFC 8461 §3.2: sts-policy-max-age-value = 1*10DIGIT, at most 31557600.
    if not (max_age_text.isascii() and max_age_text.isdigit() and len(max_age_text) <= 10):
        raise RemoteProtocolError(f"MTA-STS policy: max_age {max_age_text!r} is not a number")
    max_age = int(max_age_text)
    if max_age > MAX_AGE_LIMIT:
        raise RemoteProtocolError(f"MTA-STS policy: max_age {max_age} exceeds {MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise RemoteProtocolError(f"MTA-STS policy: mode {mode} needs at least one mx line")
    return TLSPolicy(mode=mode, mx=tuple(mx), max_age=max_age)


def parse_sts_record(text: str) -> str:
    """The policy id of an ``_mta-sts`` TXT record (RFC 8461 §3.1).

    ``v=STSv1`` must come first (case-sensitive); ``id`` (1-32 letters or digits) is required;
    other ``name=value`` fields are ignored. Fields are separated by ``;`` and optional
    blanks, with an optional trailing ``;``.

    Raises:
        RemoteProtocolError: the record is not a valid STSv1 record.
    """
    parts = [p.strip(_WSP) for p in text.split(";")]
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or parts[0] != "v=STSv1":
        raise RemoteProtocolError(f"_mta-sts record {text[:80]!r} does not start with v=STSv1")
    policy_id: str | None = None
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if not eq or not _EXT_NAME.match(name) or not _EXT_VALUE.match(value):
            raise RemoteProtocolError(f"_mta-sts record: bad field {part[:80]!r}")
        if name == "id":
            if policy_id is not None:
                raise RemoteProtocolError("_mta-sts record: id appears more than once")
            if not _STS_ID.match(value):
                raise RemoteProtocolError(f"_mta-sts record: bad id {value[:80]!r}")
            policy_id = value
    if policy_id is None:
        raise RemoteProtocolError("_mta-sts record: no id")
    return policy_id


def sts_record(policy: TLSPolicy) -> str:
    """The ``_mta-sts`` TXT record announcing ``policy`` (RFC 8461 §3.1).

    The id is derived from the policy text, so it changes exactly when the policy does.
    """
    digest = hashlib.sha256(policy.to_text().encode("ascii")).hexdigest()[:20]
    return f"v=STSv1; id={digest};"


def select_sts_record(texts: Iterable[str]) -> str | None:
    """The policy id from all TXT strings at ``_mta-sts.<domain>``, or None for no policy.

    RFC 8461 §3.1: records not starting with ``v=STSv1;`` are discarded; unless exactly one
    remains and it is valid, the domain has no available policy.
    """
    candidates = [t for t in texts if t.startswith("v=STSv1;") or t == "v=STSv1"]
    if len(candidates) != 1:
        return None
    try:
        return parse_sts_record(candidates[0])
    except RemoteProtocolError:
        return None
