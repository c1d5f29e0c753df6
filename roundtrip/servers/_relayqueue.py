"""The relay's queue records: what a queued message holds, its snapshots and its events.

``servers/relay.py`` keeps one :class:`Entry` per queued message and hands out
:class:`QueuedMessage` snapshots and :class:`RelayEvent` steps (both re-exported there, where
the stack imports them).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

__all__ = ["STEPS", "Entry", "Prepared", "QueuedMessage", "RelayEvent"]

#: Steps reported in :attr:`Relay.events`, in the order they happen for one recipient.
STEPS = (
    "queued",
    "captured",
    "mx-lookup",
    "tls-failure",
    "connected",
    "delivered",
    "deferred",
    "bounced",
    "expired",
)


@dataclass(frozen=True, slots=True)
class RelayEvent:
    """One step of one recipient's journey; ``timestamp`` comes from the relay's clock.

    ``step`` is one of :data:`STEPS`; ``detail`` names the MX host or quotes the reply.
    """

    queue_id: str
    recipient: str
    step: str
    timestamp: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A snapshot of one queue entry (see :meth:`Relay.queue`).

    Attributes:
        id: the queue id (also used in events).
        mail_from: the envelope sender ("" for a bounce).
        rcpt: recipients still waiting for delivery.
        attempts: delivery attempts made so far.
        next_attempt: when the next attempt is due (relay clock), None if none is scheduled.
        last_error: the last temporary failure, verbatim.
        received_at: when the message was accepted.
        delivered: recipients delivered so far.
        bounced: recipients given up on.
    """

    id: str
    mail_from: str
    rcpt: tuple[str, ...]
    attempts: int
    next_attempt: float | None
    last_error: str
    received_at: float
    delivered: tuple[str, ...] = ()
    bounced: tuple[str, ...] = ()


@dataclass(eq=False)
class Entry:
    """One queued message, as the relay works on it (:class:`QueuedMessage` is its snapshot)."""

    id: str
    helo: str
    mail_from: str
    raw: bytes
    received_at: float
    pending: list[str]
    delivered: list[str] = field(default_factory=list)
    bounced: list[str] = field(default_factory=list)
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str = ""
    timer: asyncio.TimerHandle | None = None
    #: The entry's name in the relay's spool (None without a spool).
    spool_name: str | None = None

    def snapshot(self) -> QueuedMessage:
        return QueuedMessage(
            id=self.id,
            mail_from=self.mail_from,
            rcpt=tuple(self.pending),
            attempts=self.attempts,
            next_attempt=self.next_attempt,
            last_error=self.last_error,
            received_at=self.received_at,
            delivered=tuple(self.delivered),
            bounced=tuple(self.bounced),
        )


@dataclass(frozen=True)
class Prepared:
    """A message :meth:`Relay.prepare` checked and spooled, waiting for commit or abandon."""

    entry: Entry
    recipients: tuple[str, ...]
