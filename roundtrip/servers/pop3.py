"""POP3 listeners: ``protocols.pop3.POP3Connection`` over the shared line adapter.

``pop3s`` (port 995) is implicit TLS: secure from the first byte, no STLS. ``pop3`` (port 110) is
plaintext and offers STLS; logins are refused there until TLS is up (RFC 2595, RFC 8314), unless
``allow_plaintext_auth`` says otherwise.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable

from ..protocols.pop3 import POP3Connection, POP3Store
from ._conn import ConnectionInfo, LineServerProtocol, ListenerLimits, serve

__all__ = ["start_pop3"]


async def start_pop3(
    store: POP3Store,
    *,
    host: str,
    port: int,
    hostname: str,
    implicit_tls_context: ssl.SSLContext | None,
    starttls_context: ssl.SSLContext | None,
    idle_timeout: float,
    on_error: Callable[[BaseException], None],
    tls_handshake_timeout: float = 30.0,
    allow_plaintext_auth: bool = False,
    limits: ListenerLimits | None = None,
    command_limits: Iterable[tuple[str, int]] | None = None,
    check_token: Callable[[str, str], bool] | None = None,
) -> tuple[asyncio.Server, set[LineServerProtocol]]:
    """Listen for POP3 on ``host:port`` (0 picks a free port).

    Args:
        store: the mailbox store (``roundtrip.store.Store``).
        host: address to bind.
        port: port to bind; 0 lets the OS choose (read it back from ``server.sockets``).
        hostname: the name in the greeting.
        implicit_tls_context: wrap every connection in TLS from the first byte (pop3s).
        starttls_context: offer STLS with this context (pop3); ignored on a pop3s listener.
        idle_timeout: seconds without input before ``-ERR autologout`` and close.
        on_error: records unexpected exceptions from the loop thread.
        tls_handshake_timeout: seconds a TLS handshake may take.
        limits: connection caps, the login deadline and login penalties.
        allow_plaintext_auth: accept logins before TLS (tests of legacy setups only).
        command_limits: the session's command budget (``MailboxLimits.pop3_command_limits``;
            None: its default).
        check_token: ``(user, token) -> bool`` for XOAUTH2 and OAUTHBEARER (RFC 7628); None
            refuses every token.

    Returns:
        The asyncio server and the live set of its connections (abort them on stop).
    """

    budget = None if command_limits is None else tuple(command_limits)

    def factory(info: ConnectionInfo) -> POP3Connection:
        return POP3Connection(
            store,
            hostname=hostname,
            secure=info.secure,
            starttls_available=starttls_context is not None and not info.secure,
            allow_plaintext_auth=allow_plaintext_auth,
            command_limits=budget,
            check_token=check_token,
        )

    return await serve(
        factory,
        host=host,
        port=port,
        implicit_tls_context=implicit_tls_context,
        starttls_context=None if implicit_tls_context is not None else starttls_context,
        idle_timeout=idle_timeout,
        on_error=on_error,
        tls_handshake_timeout=tls_handshake_timeout,
        limits=limits,
        service="pop3s" if implicit_tls_context is not None else "pop3",
        protocol_name="pop3",
        busy_reply=lambda reason: b"-ERR [SYS/TEMP] " + reason.encode("ascii", "replace") + b"\r\n",
    )
