"""asyncio IMAP listener: ``roundtrip.protocols.imap.IMAPConnection`` over ``_conn.serve``.

One listener serves one TLS mode: implicit TLS (port 993 semantics) when
``implicit_tls_context`` is given, otherwise plaintext with STARTTLS (port 143) when
``starttls_context`` is given. Every connection subscribes to the store's change notifications
so that IDLE and untagged updates reach the client within one loop iteration.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..protocols.imap import IMAPConnection, IMAPStore
from ._conn import ConnectionInfo, LineServerProtocol, ListenerLimits, Machine, serve

__all__ = ["IMAPListenerStore", "start_imap"]


class IMAPListenerStore(IMAPStore, Protocol):
    """The store as the listener needs it: the machine's view plus change listeners."""

    def add_listener(self, listener: Callable[[Any], None]) -> None: ...

    def remove_listener(self, listener: Callable[[Any], None]) -> None: ...


async def start_imap(
    store: IMAPListenerStore,
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
    max_literal: int = 50 * 1024 * 1024,
    command_limits: Iterable[tuple[str, int]] | None = None,
    max_header_size: int | None = None,
    max_hops: int | None = None,
    check_token: Callable[[str, str], bool] | None = None,
) -> tuple[asyncio.Server, set[LineServerProtocol]]:
    """Listen for IMAP on ``host:port`` (0 picks a free port).

    Args:
        store: the mailbox store (``roundtrip.store.Store``).
        host: the address to bind.
        port: the port to bind; 0 for any free port (read it back from ``server.sockets``).
        hostname: the name in the greeting.
        implicit_tls_context: TLS from the first byte (993); None for plaintext + STARTTLS.
        starttls_context: offered through STARTTLS on a plaintext listener; None: no STARTTLS.
        idle_timeout: seconds of silence before ``* BYE Autologout`` and close.
        on_error: records unexpected exceptions from the loop thread, including those the IMAP
            machine's MIME code caught and answered around.
        tls_handshake_timeout: seconds a TLS handshake may take.
        allow_plaintext_auth: accept LOGIN before TLS (tests of legacy setups only).
        max_literal: the APPENDLIMIT.
        command_limits: the session's command budget (``MailboxLimits.imap_command_limits``;
            None: its default).
        max_header_size: largest header field an APPENDed message may have (0: no limit;
            None: the default of ``SMTPLimits.max_header_size``).
        max_hops: most ``Received`` fields an APPENDed message may carry (0: no limit; None:
            the default of ``SMTPLimits.max_hops``).
        check_token: ``(user, token) -> bool`` for XOAUTH2 and OAUTHBEARER (RFC 7628); None
            refuses every token.

    Returns:
        The asyncio server and the live set of connections (abort them on stop).
    """
    starttls = starttls_context if implicit_tls_context is None else None
    budget = None if command_limits is None else tuple(command_limits)

    def factory(info: ConnectionInfo) -> Machine:
        return IMAPConnection(
            store,
            hostname=hostname,
            secure=info.secure,
            starttls_available=starttls is not None,
            allow_plaintext_auth=allow_plaintext_auth,
            clock=time.time,
            max_literal=max_literal,
            command_limits=budget,
            max_header_size=max_header_size,
            max_hops=max_hops,
            on_error=on_error,
            check_token=check_token,
        )

    def subscribe(callback: Callable[[Any], None]) -> Callable[[], None]:
        store.add_listener(callback)
        return lambda: store.remove_listener(callback)

    return await serve(
        factory,
        host=host,
        port=port,
        implicit_tls_context=implicit_tls_context,
        starttls_context=starttls,
        idle_timeout=idle_timeout,
        on_error=on_error,
        subscribe=subscribe,
        tls_handshake_timeout=tls_handshake_timeout,
        limits=limits,
        service="imaps" if implicit_tls_context is not None else "imap",
        protocol_name="imap",
        busy_reply=lambda reason: (
            b"* BYE [UNAVAILABLE] " + reason.encode("ascii", "replace") + b"\r\n"
        ),
    )
