"""Authentication rules of the IMAP machine: capabilities, LOGIN arguments, SASL PLAIN.

Theory of operation
-------------------
Before authentication CAPABILITY offers ``STARTTLS`` when the adapter can upgrade, and
``AUTH=PLAIN`` only over TLS (or with ``allow_plaintext_auth``); otherwise it shows
``LOGINDISABLED`` and logins get ``NO [PRIVACYREQUIRED]`` (RFC 3501 6.2.3, RFC 8314). The only
SASL mechanism is PLAIN (RFC 4616), with an initial response (SASL-IR, RFC 4959) or after a
``+`` continuation. An authorization identity other than the authentication identity is
refused: no user may act as another. ``IMAPConnection`` keeps the state and the store check;
passwords never leave these functions except to the store.
"""

from __future__ import annotations

import base64
import binascii

from ._imapparse import ParseError, Token
from ._imapwire import text_arg

__all__ = ["capabilities", "login_args", "sasl_plain"]


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
            caps.append("AUTH=PLAIN")
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
