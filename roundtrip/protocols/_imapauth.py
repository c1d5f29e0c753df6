"""Authentication rules of the IMAP machine: capabilities, LOGIN arguments, SASL exchanges.

Theory of operation
-------------------
Before authentication CAPABILITY offers ``STARTTLS`` when the adapter can upgrade, and
``AUTH=PLAIN`` only over TLS (or with ``allow_plaintext_auth``); otherwise it shows
``LOGINDISABLED`` and logins get ``NO [PRIVACYREQUIRED]`` (RFC 3501 6.2.3, RFC 8314). The SASL
mechanisms are PLAIN (RFC 4616) and the bearer-token ones, XOAUTH2 and OAUTHBEARER (RFC 7628,
see ``_oauth``), with an initial response (SASL-IR, RFC 4959) or after a ``+`` continuation.
An authorization identity other than the authentication identity is refused: no user may act
as another. ``SASLServer`` judges one AUTHENTICATE exchange; ``IMAPConnection`` keeps the
state. Passwords and tokens never leave these functions except to the store's checks
(``check_password``; ``check_token`` is passed in: tokens are the stack's).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Protocol

from . import _oauth
from ._imapparse import ParseError, Token
from ._imapwire import text_arg

__all__ = ["MECHANISMS", "SASLServer", "capabilities", "login_args", "sasl_plain"]

#: What AUTHENTICATE takes, as advertised (``AUTH=...``).
MECHANISMS = ("PLAIN", *_oauth.MECHANISMS)


def capabilities(
    *,
    authenticated: bool,
    secure: bool,
    starttls_available: bool,
    allow_plaintext_auth: bool,
    max_literal: int,
) -> str:
    """The CAPABILITY list for the session's state and transport."""
    caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE"]
    caps += ["UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE", f"APPENDLIMIT={max_literal}"]
    if not authenticated:
        if starttls_available and not secure:
            caps.append("STARTTLS")
        if secure or allow_plaintext_auth:
            caps += [f"AUTH={mechanism}" for mechanism in MECHANISMS]
        else:
            caps.append("LOGINDISABLED")
    return " ".join(caps)


def login_args(args: list[Token]) -> tuple[str, str]:
    """LOGIN's user name and password."""
    if len(args) != 2:
        raise ParseError("LOGIN expects a user name and a password")
    user = text_arg(args[0], "user name")
    password = text_arg(args[1], "password")
    return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")


def sasl_plain(data: bytes) -> tuple[str, str] | None:
    """(user, password) of a SASL PLAIN response; None when it cannot authenticate anyone.

    Raises:
        ParseError: the response is not base64.
    """
    try:
        decoded = b"" if data == b"=" else base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParseError("Invalid base64 data") from exc
    fields = decoded.split(b"\0")
    if len(fields) != 3:
        return None
    authzid, authcid, password = (f.decode("utf-8", "replace") for f in fields)
    if authzid and authzid.lower() != authcid.lower():
        return None
    return authcid, password


class PasswordChecker(Protocol):
    def check_password(self, address: str, password: str) -> bool: ...


class SASLServer:
    """One AUTHENTICATE exchange (``mechanism`` is one of ``MECHANISMS``).

    ``step`` takes each client response and returns the authenticated user (``str``), a
    challenge for a ``+`` continuation (``bytes``), or None: the exchange failed.

    Args:
        mechanism: the mechanism named in AUTHENTICATE.
        store: has ``check_password(user, password)``.
        check_token: ``(user, token) -> bool`` for the bearer mechanisms; None refuses every
            token.
    """

    def __init__(
        self,
        mechanism: str,
        store: PasswordChecker,
        check_token: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.mechanism = mechanism.upper()
        self._store = store
        self._bearer = (
            _oauth.BearerExchange(self.mechanism, check_token)
            if self.mechanism in _oauth.MECHANISMS
            else None
        )

    @property
    def rejected(self) -> bool:
        """The error status was sent: the next response, ``*`` included, ends in failure."""
        return self._bearer is not None and self._bearer.rejected

    def step(self, data: bytes) -> str | bytes | None:
        """Judge one client response.

        Raises:
            ParseError: the response is not base64.
        """
        if self._bearer is not None:
            try:
                return self._bearer.step(data)
            except _oauth.SASLSyntaxError as exc:
                raise ParseError(str(exc)) from None
        credentials = sasl_plain(data)
        if credentials is None or not credentials[0]:
            return None
        if not self._store.check_password(*credentials):
            return None
        return credentials[0]
