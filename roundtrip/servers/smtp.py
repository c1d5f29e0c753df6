"""aiosmtpd listeners for the three SMTP roles, on the stack's own event loop.

aiosmtpd parses the protocol. ``SMTPHandler``'s hooks are shims around ``protocols/smtp.py``
(role policy, trace header, hand-off to the router); the session class that corrects aiosmtpd
and enforces the abuse limits (``config.SMTPLimits``) is ``_smtpsession.SMTPSession``, whose
docstring lists both and the aiosmtpd private hooks they need.

Every listener runs on asyncio's own loop or on uvloop alike: TLS facts come from the public
``transport.get_extra_info()`` only (see ``_runner`` for ``ROUNDTRIP_LOOP``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from ..config import SMTPLimits
from ..errors import ContentRejectedError, MailboxError, StorageError
from ..protocols._oauth import BearerCredentials
from ..protocols.smtp import (
    AuthPenalties,
    ConnectionCounts,
    Reply,
    Role,
    TLSInfo,
    add_missing_headers,
    check_address_encoding,
    check_bare_cr_in_header,
    check_from_header,
    check_header_size,
    check_hops,
    check_recipient,
    check_sender,
    received_header,
    with_protocol,
)
from . import _recording
from ._smtpsession import SMTPSession, methods_named, others_open

__all__ = [
    "Accepted",
    "AuthPenalties",
    "ContentRejectedError",
    "Router",
    "SMTPHandler",
    "start_smtp",
]

log = logging.getLogger("roundtrip.servers.smtp")
# aiosmtpd logs "Session.login_data is deprecated" on every AUTH, and every command at INFO.
logging.getLogger("mail.log").setLevel(logging.ERROR)

_queue_ids = itertools.count(1)


def _new_queue_id() -> str:
    return f"{os.getpid():x}{next(_queue_ids):08X}"


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message accepted by one SMTP listener, handed to the router.

    The message is ``head + raw`` (:attr:`message`). On submission ``raw`` is all of it: this
    hop's Received field on top, and a Message-ID and Date if they were missing. The MX keeps
    its Received field in ``head`` and the bytes it received as ``raw``, so that a big
    message is not copied on arrival; the store joins them when the message is first read
    (roundtrip/store.py, ``Store.deliver``).
    """

    role: Role
    server_domain: str
    hostname: str
    queue_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    authenticated_user: str | None
    tls: bool
    received_at: float
    received_monotonic: float
    #: The client's EHLO/HELO name, as given.
    helo: str = ""
    #: The router's prepare step has signed ``raw`` already (or found no key to sign with),
    #: so routing does not sign again.
    signed: bool = False
    #: Whole fields (CRLF-terminated) in front of ``raw``: the MX's Received field.
    head: bytes = b""

    @property
    def message(self) -> bytes:
        """The whole message, ``head + raw`` (a copy when there is a ``head``)."""
        return self.head + self.raw if self.head else self.raw


#: Delivers or queues an accepted message; raising StorageError makes the reply a 451.
Router = Callable[[Accepted], None]
#: Work on an accepted message that may leave the loop (DKIM signing: roundtrip/stack/
#: _delivery.py), awaited before the router sees it; it returns the message to route. The
#: flag says whether other SMTP sessions share the loop (``others_open``): alone, the work
#: stalls nobody and is cheaper done in place.
Prepare = Callable[[Accepted, bool], Awaitable[Accepted]]


class SMTPHandler:
    """aiosmtpd handler for one listener: role policy, trace header, hand-off to the router."""

    def __dir__(self) -> list[str]:
        # What aiosmtpd looks for in a handler, on every connection (see SMTPSession.__dir__).
        return methods_named(type(self), ("auth_", "handle_"))

    def __init__(
        self,
        *,
        role: Role,
        domain: str,
        hostname: str,
        local_domains: Callable[[], Collection[str]],
        has_user: Callable[[str], bool],
        check_password: Callable[[str, str], bool],
        router: Router,
        max_recipients: int,
        enforce_sender: bool,
        reject_foreign_from: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
        limits: SMTPLimits | None = None,
        check_token: Callable[[str, str], bool] | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        self.role = role
        self._prepare = prepare
        self._check_token = check_token
        self.domain = domain
        self.hostname = hostname
        self._local_domains = local_domains
        self._has_user = has_user
        self._check_password = check_password
        self._router = router
        self._max_recipients = max_recipients
        self._enforce_sender = enforce_sender
        self._reject_foreign_from = reject_foreign_from
        self._on_error = on_error
        self.limits = limits if limits is not None else SMTPLimits()

    # aiosmtpd hooks (names fixed by aiosmtpd)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.role is Role.SMTP:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = check_address_encoding(address, smtputf8=envelope.smtp_utf8, sender=True)
        if refusal is not None:
            return refusal
        # On the MX nobody is authenticated: only the address syntax is checked.
        refusal = check_sender(
            address, authenticated_user=_auth_user(session), enforce=self._enforce_sender
        )
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return Reply.OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = check_address_encoding(address, smtputf8=envelope.smtp_utf8, sender=False)
        if refusal is not None:
            return refusal
        refusal = check_recipient(
            address,
            role=self.role,
            local_domains=self._local_domains(),
            has_user=self._has_user,
            current_count=len(envelope.rcpt_tos),
            max_recipients=self._max_recipients,
        )
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return Reply.RCPT_OK

    async def handle_VRFY(
        self, server: SMTP, session: Session, envelope: Envelope, address: str
    ) -> str:
        return Reply.VRFY

    async def handle_EXPN(
        self, server: SMTP, session: Session, envelope: Envelope, address: str
    ) -> str:
        return Reply.EXPN

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = _content(envelope)
        refusal = check_hops(content, max_hops=self.limits.max_hops) or check_header_size(
            content, limit=self.limits.max_header_size
        )
        if refusal is None and self.role is not Role.SMTP:
            refusal = check_bare_cr_in_header(content)
        if refusal is None and self._reject_foreign_from and self.role is not Role.SMTP:
            refusal = check_from_header(content, authenticated_user=_auth_user(session))
        del content
        if refusal is not None:
            return refusal
        accepted = self._accept(session, envelope)
        try:
            if self._prepare is not None:
                accepted = await self._prepare(accepted, others_open(server, server.loop))
            self._router(accepted)
        except ContentRejectedError as exc:
            return exc.reply
        except (StorageError, MailboxError, OSError) as exc:
            log.warning("storing %s failed: %s", accepted.queue_id, exc)
            return Reply.STORE_FAILED
        except Exception as exc:  # a bug of ours: temporary failure, reported to the test
            if self._on_error is None:
                raise
            self._on_error(exc)
            return Reply.STORE_FAILED
        rec: _recording.Session | None = getattr(server, "_rec", None)
        if rec is not None:
            _recording.note_message(rec, accepted.raw, f"queued as {accepted.queue_id}")
        return Reply.QUEUED.format(queue_id=accepted.queue_id)

    # helpers

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd authenticator: the same 535 for an unknown user and a wrong password.

        ``auth_data`` is a ``LoginPassword`` (PLAIN, LOGIN) or a ``BearerCredentials``
        (XOAUTH2, OAUTHBEARER), checked with ``check_token``; no token passes without one.
        """
        if isinstance(auth_data, BearerCredentials):
            check = self._check_token
            user, token = auth_data.user, auth_data.token
            if self.role is Role.SMTP or check is None or not check(user, token):
                return AuthResult(success=False, handled=False)
            return AuthResult(success=True, auth_data=user)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if self.role is Role.SMTP or not self._check_password(user, password):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)

    def _accept(self, session: Session, envelope: Envelope) -> Accepted:
        now = time.time()
        queue_id = _new_queue_id()
        content = _content(envelope)
        # From here on only ``raw`` is needed: drop the envelope's references to the DATA
        # bytes so a big message is held once, not twice, while it is routed and stored.
        envelope.content = envelope.original_content = None
        user = _auth_user(session)
        tls = session.ssl is not None
        tls_info = _tls_info(session)
        if self.role is not Role.SMTP:
            content = add_missing_headers(
                content, domain=self.domain, queue_id=queue_id, timestamp=now
            )
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        rcpts = tuple(envelope.rcpt_tos)
        trace: bytes = received_header(
            helo=session.host_name or "",
            peer_ip=peer,
            by_host=self.hostname,
            protocol=with_protocol(
                esmtp=bool(session.extended_smtp), tls=tls, authenticated=user is not None
            ),
            queue_id=queue_id,
            recipient=rcpts[0] if len(rcpts) == 1 else None,
            timestamp=now,
            tls=tls_info,
        )
        if self.role is Role.SMTP:
            head, raw = trace, content
        else:  # submission signs and relays the whole message: one copy, here
            head, raw = b"", trace + content
        del content  # on submission the only other copy: freed before the router stores
        return Accepted(
            role=self.role,
            server_domain=self.domain,
            hostname=self.hostname,
            queue_id=queue_id,
            mail_from=envelope.mail_from or "",
            rcpt_tos=rcpts,
            raw=raw,
            head=head,
            authenticated_user=user,
            tls=tls,
            received_at=now,
            received_monotonic=time.monotonic(),
            helo=session.host_name or "",
        )


def _content(envelope: Envelope) -> bytes:
    content = envelope.original_content or envelope.content or b""
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogateescape")
    return content


def _auth_user(session: Session) -> str | None:
    if not session.authenticated:
        return None
    data = session.auth_data
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data) if data is not None else None


def _tls_info(session: Session) -> TLSInfo | None:
    extra = session.ssl
    if not extra:
        return None
    ssl_object = extra.get("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher() or ("unknown", "", 0)
    return TLSInfo(
        version=ssl_object.version() or "TLS", cipher=cipher[0], bits=int(cipher[2] or 0)
    )


async def start_smtp(
    handler: SMTPHandler,
    *,
    host: str,
    port: int,
    tls_context: ssl.SSLContext,
    max_message_size: int,
    idle_timeout: float,
    tls_handshake_timeout: float,
    auth_penalties: AuthPenalties | None = None,
) -> asyncio.Server:
    """Listen for one SMTP role on ``host:port`` (0 picks a free port).

    ``submissions`` wraps TLS from the first byte; ``submission`` and ``smtp`` offer STARTTLS
    (required before MAIL on ``submission``).

    Args:
        handler: the role's policy; its ``limits`` (``SMTPLimits``) apply to this listener.
        idle_timeout: deadline for each command line, counted from our previous reply.
        tls_handshake_timeout: limit for the implicit-TLS handshake.
        auth_penalties: failed-AUTH records per client IP; pass one object to several
            listeners to share them (by default each listener keeps its own).
    """
    loop = asyncio.get_running_loop()
    implicit = handler.role is Role.SUBMISSIONS
    limits = handler.limits
    connections = ConnectionCounts(
        max_total=limits.max_connections, max_per_ip=limits.max_connections_per_ip
    )
    if auth_penalties is None:
        auth_penalties = AuthPenalties(
            initial=limits.auth_penalty_initial,
            maximum=limits.auth_penalty_max,
            timeout=limits.auth_penalty_timeout,
        )

    def factory() -> SMTPSession:
        server = SMTPSession(
            handler,
            limits=limits,
            connections=connections,
            auth_penalties=auth_penalties,
            hostname=handler.hostname,
            ident="roundtrip ESMTP",
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            tls_context=None if implicit else tls_context,
            # Not aiosmtpd's require_starttls: it answers 530 to AUTH before STARTTLS, where
            # RFC 4954 wants 538. MAIL before STARTTLS still gets 530 (AUTH is required and
            # cannot happen before TLS).
            require_starttls=False,
            auth_required=handler.role is not Role.SMTP,
            auth_require_tls=True,
            authenticator=handler.authenticate,
            auth_exclude_mechanism=None,
            idle_timeout=idle_timeout,
            loop=loop,
        )
        server._implicit_tls = implicit
        server._auth_offered = handler.role is not Role.SMTP
        server._service = handler.role.value
        return server

    return await loop.create_server(
        factory,
        host=host,
        port=port,
        ssl=tls_context if implicit else None,
        ssl_handshake_timeout=tls_handshake_timeout if implicit else None,
        reuse_address=True,
    )
