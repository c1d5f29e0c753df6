"""OAuth 2.0 bearer tokens over SASL: XOAUTH2 and OAUTHBEARER (RFC 7628), server side.

Theory of operation
-------------------
The stack issues tokens (``MailStack.oauth_token``): random, bound to one user, with an expiry.
``TokenTable`` keeps them; the clock is passed in and the random token is made by the caller,
so this module stays pure.

A client proves a token with one SASL message:

- XOAUTH2 (Google's mechanism, also in GreenMail and smtp4dev):
  ``user=<user>\\x01auth=Bearer <token>\\x01\\x01``;
- OAUTHBEARER (RFC 7628 section 3.1): a GS2 header naming the user,
  ``n,a=<user>,``, then ``\\x01`` and key/value pairs ending in ``\\x01\\x01``, one of them
  ``auth=Bearer <token>``. The user name is a GS2 ``saslname`` (RFC 5801 section 4: ``,`` is
  ``=2C`` and ``=`` is ``=3D``).

A token that is unknown, expired, or issued to another user than the one named is not refused
at once: RFC 7628 section 3.2.2 has the server send an error status (JSON, base64 in a
continuation: ``{"status":"invalid_token",...}``), to which the client answers with a dummy
response (``\\x01``, an empty line, or ``*``), and only then does the exchange fail (SMTP 535,
IMAP ``NO``, POP3 ``-ERR``). A message that cannot be parsed fails at once, without the status.

``BearerExchange`` is that conversation for the protocols with a ``+`` continuation (IMAP
AUTHENTICATE, POP3 AUTH); SMTP's aiosmtpd session drives the same functions itself.

Deliberately unsupported: OAUTHBEARER without an authorization identity (the user is then only
in the token; every client we know names it), channel binding (``p=``), and the
``host``/``port`` pairs, which are accepted and ignored. Tokens never appear in a reply or a
``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "MECHANISMS",
    "BearerCredentials",
    "BearerExchange",
    "SASLSyntaxError",
    "TokenTable",
    "decode_b64",
    "error_status",
    "parse_response",
    "well_formed",
]

#: The bearer-token SASL mechanisms, as advertised.
MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
# RFC 7628 section 3.1: key = 1*(ALPHA); the value is VCHAR / SP / HTAB / CR / LF.
_KVPAIR = re.compile(rb"([A-Za-z]+)=([\x20-\x7e\t\r\n]*)\Z")
# RFC 5801 section 4: a saslname has no bare "," and "=" only as "=2C" or "=3D".
_SASLNAME = re.compile(r"(?:[^,=]|=2C|=3D)+\Z")


class SASLSyntaxError(ValueError):
    """A SASL response that is not base64 (the protocol answers with its syntax error)."""


@dataclass(frozen=True, slots=True)
class BearerCredentials:
    """The user a client names and the token it presents (the token stays out of ``repr``)."""

    user: str
    token: str = field(repr=False)


def well_formed(token: str) -> bool:
    """True when ``token`` is an RFC 6750 ``b64token`` (what ``Bearer`` may carry)."""
    return bool(_B64TOKEN.match(token))


def _bearer(value: bytes) -> str | None:
    scheme, _, token = value.decode("ascii", "replace").partition(" ")
    # RFC 7628 section 3.1: the scheme is case-insensitive, as in HTTP (RFC 6750 section 2.1).
    if scheme.lower() != "bearer" or not well_formed(token):
        return None
    return token


def _pairs(data: bytes) -> dict[str, bytes] | None:
    """The ``key=value`` pairs of ``data`` = ``*(kvpair \\x01) \\x01``; None when malformed."""
    if not data.endswith(b"\x01\x01"):
        return None
    pairs: dict[str, bytes] = {}
    for item in data[:-2].split(b"\x01"):
        found = _KVPAIR.match(item)
        if found is None:
            return None
        pairs.setdefault(found.group(1).decode("ascii").lower(), found.group(2))
    return pairs


def _xoauth2(data: bytes) -> BearerCredentials | None:
    pairs = _pairs(data)
    if pairs is None or "user" not in pairs or "auth" not in pairs:
        return None
    token = _bearer(pairs["auth"])
    user = pairs["user"].decode("utf-8", "replace")
    return BearerCredentials(user, token) if token is not None and user else None


def _oauthbearer(data: bytes) -> BearerCredentials | None:
    # gs2-header = gs2-cb-flag "," [ gs2-authzid ] "," (RFC 5801 section 4), then kvsep.
    head, sep, rest = data.partition(b"\x01")
    parts = head.split(b",")
    if not sep or len(parts) != 3 or parts[0] not in (b"n", b"y") or parts[2]:
        return None
    authzid = parts[1].decode("utf-8", "replace")
    if not authzid.startswith("a=") or not _SASLNAME.match(authzid[2:]):
        return None
    user = authzid[2:].replace("=2C", ",").replace("=3D", "=")
    pairs = _pairs(rest)
    if pairs is None or "auth" not in pairs:
        return None
    token = _bearer(pairs["auth"])
    return BearerCredentials(user, token) if token is not None else None


def parse_response(mechanism: str, data: bytes) -> BearerCredentials | None:
    """The credentials in a decoded XOAUTH2 or OAUTHBEARER client response; None if malformed.

    Args:
        mechanism: ``XOAUTH2`` or ``OAUTHBEARER`` (any case).
        data: the client's response, already base64-decoded.
    """
    if mechanism.upper() == "XOAUTH2":
        return _xoauth2(data)
    return _oauthbearer(data)


def error_status(scope: str = "mail") -> bytes:
    """RFC 7628 section 3.2.2's error status for a refused token (JSON, not yet base64)."""
    status = {"status": "invalid_token", "schemes": "bearer", "scope": scope}
    return json.dumps(status, separators=(",", ":")).encode("ascii")


def decode_b64(line: bytes) -> bytes:
    """A base64 SASL response (``=`` is the empty one, RFC 4959 / RFC 5034).

    Raises:
        SASLSyntaxError: not base64.
    """
    line = line.strip()
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLSyntaxError("Invalid base64 data") from None


@dataclass(frozen=True, slots=True)
class _Issued:
    user: str
    expires: float


class TokenTable:
    """The tokens a stack issued: which user each one is for, and until when.

    Args:
        clock: wall-clock seconds, compared with each token's expiry.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tokens: dict[str, _Issued] = {}

    @staticmethod
    def _key(user: str) -> str:
        return user.strip().lower()

    def issue(self, user: str, token: str, *, lifetime: float) -> None:
        """Record ``token`` for ``user``, valid for ``lifetime`` seconds (0 or less: expired)."""
        now = self._clock()
        # Expired tokens are dropped as new ones come, so the table stays small.
        self._tokens = {t: i for t, i in self._tokens.items() if i.expires > now}
        self._tokens[token] = _Issued(self._key(user), now + lifetime)

    def check(self, user: str, token: str) -> bool:
        """True when ``token`` was issued to ``user`` and has not expired."""
        issued = self._tokens.get(token)
        return (
            issued is not None and issued.user == self._key(user) and self._clock() < issued.expires
        )

    def clear(self) -> None:
        self._tokens = {}


class BearerExchange:
    """One XOAUTH2 or OAUTHBEARER exchange of a protocol with ``+`` continuations.

    Feed each client response to ``step``. It returns the authenticated user (``str``), a
    challenge to send as ``+ <challenge>`` (``bytes``, the base64 error status of RFC 7628
    section 3.2.2, after which one more response must be fed), or ``None``: the exchange
    failed and the protocol sends its failure reply.

    Args:
        mechanism: ``XOAUTH2`` or ``OAUTHBEARER``.
        check_token: ``(user, token) -> bool``; None refuses every token.
    """

    def __init__(self, mechanism: str, check_token: Callable[[str, str], bool] | None) -> None:
        self.mechanism = mechanism.upper()
        self._check = check_token
        #: The error status was sent: whatever comes next, the exchange fails.
        self.rejected = False

    def step(self, response: bytes) -> str | bytes | None:
        """Judge one client response (as sent: base64, or ``*``).

        Raises:
            SASLSyntaxError: the first response is not base64.
        """
        if self.rejected:
            return None
        credentials = parse_response(self.mechanism, decode_b64(response))
        if credentials is None:
            return None
        if self._check is not None and self._check(credentials.user, credentials.token):
            return credentials.user
        self.rejected = True
        return base64.b64encode(error_status())
