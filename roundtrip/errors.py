"""The whole exception tree of roundtrip, and nothing else."""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "ConnectError",
    "ContentRejectedError",
    "LocalProtocolError",
    "MailboxError",
    "NotDeliveredError",
    "ParseError",
    "ProbeError",
    "ProtocolError",
    "RejectedError",
    "RemoteProtocolError",
    "RoundtripError",
    "RoundtripWarning",
    "ServerStartError",
    "StorageError",
    "TLSError",
]


class RoundtripError(Exception):
    """Base class of every error roundtrip raises on purpose."""


class RoundtripWarning(UserWarning):
    """A configuration that is legal but risky (for example, skipping certificate checks)."""


class ConfigError(RoundtripError, ValueError):
    """A bad configuration value: from ini, the command line, a marker or code."""


class ProtocolError(RoundtripError):
    """Abstract: a protocol machine was driven outside its rules."""


class LocalProtocolError(ProtocolError):
    """Our own code drove a protocol machine wrongly."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (for example, plaintext pipelined after STARTTLS)."""


class ParseError(RemoteProtocolError, ValueError):
    """A command does not follow the protocol's grammar (an IMAP machine answers ``BAD``)."""


class ContentRejectedError(RoundtripError):
    """A router's content filter refuses a message; the SMTP listener sends ``reply``.

    Attributes:
        reply: the SMTP reply line, for example ``550 5.7.1 Message refused``.
    """

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class ServerStartError(RoundtripError):
    """A listener could not be bound, or did not become ready in time."""


class ProbeError(RoundtripError):
    """A client-side step against a mail server failed.

    Attributes:
        step: the protocol step that failed ("CONNECT", "EHLO", "AUTH", "RCPT", "FETCH", ...).
        host: the ``host:port`` the step talked to, when known.
        reply: the server's reply, verbatim, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        step: str = "",
        host: str = "",
        reply: str | bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.host = host
        self.reply = reply


class ConnectError(ProbeError):
    """The TCP connection could not be made or was lost."""


class TLSError(ProbeError):
    """TLS failed: handshake, certificate verification, or STARTTLS not offered."""


class AuthError(ProbeError):
    """The server refused the credentials, or would not offer authentication safely."""


class RejectedError(ProbeError):
    """The server refused a command; ``reply`` keeps its answer verbatim."""


class NotDeliveredError(ProbeError, AssertionError):
    """The expected message was not in the mailbox by the deadline.

    It is also an ``AssertionError`` so that pytest reports it as a test failure.
    """


class MailboxError(RoundtripError):
    """A mailbox operation was refused by the store.

    Attributes:
        code: an IMAP response code (RFC 5530) naming the reason: ``NONEXISTENT``,
            ``ALREADYEXISTS``, ``CANNOT``, ``LIMIT`` or ``INUSE``.
    """

    def __init__(self, message: str, *, code: str = "CANNOT") -> None:
        super().__init__(message)
        self.code = code


class StorageError(RoundtripError):
    """Storing a message failed (disk full, I/O error): a temporary failure, never a 250."""
