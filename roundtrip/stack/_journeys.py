"""Per-hop timings of the messages a stack handles (``MailStack.journey``).

Every hop records its steps under the queue id it gave the message: the accepting server
(``submissions accepted``), the relay (``relay queued``, then its events: ``relay
mx-lookup``, ``relay connected``, ``relay delivered``), the recipient's MX (``smtp
accepted``) and the store (``stored``). A stored message names those queue ids in its
``Received:`` fields (``id ...``, RFC 5321 section 4.4), so its Message-ID leads to every
hop's steps. Only the newest :data:`TIMELINE_LIMIT` messages are remembered.

An MX that checks senders (SPF, DKIM, DMARC) records its verdicts on its ``smtp accepted``
step (:attr:`HopTiming.auth`), the same results its Authentication-Results field carries, so
a journey shows which hop decided what.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from dataclasses import dataclass

from .._headerblock import header_bounds

__all__ = ["TIMELINE_LIMIT", "HopAuth", "HopTiming", "Journeys"]

#: How many messages' journeys are remembered (oldest forgotten first).
TIMELINE_LIMIT = 10_000
# The queue id of each Received field (RFC 5321 4.4 "id" clause); the header block is
# bounded by the SMTP header limits before it gets here.
_RECEIVED_ID = re.compile(
    rb"^Received:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*?\bid ([0-9A-Za-z]+)", re.MULTILINE
)
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class HopAuth:
    """The sender checks an MX made on a message (RFC 8601 section 2.7.1 result names).

    Attributes:
        spf: the SPF result (None: SPF was not checked).
        dkim: one result per DKIM-Signature, topmost first, ``("none",)`` for unsigned mail
            (empty: DKIM was not checked).
        dmarc: the DMARC result (None: DMARC was not checked).
        arc: the ARC chain's validation, ``pass``, ``fail`` or ``none`` (RFC 8617 section
            5.2; None: the message carried no ARC set, or ARC was not checked).
    """

    spf: str | None = None
    dkim: tuple[str, ...] = ()
    dmarc: str | None = None
    arc: str | None = None


@dataclass(frozen=True, slots=True)
class HopTiming:
    """One step of a message's journey through the stack.

    ``at`` is in seconds since the first hop accepted the message. ``auth`` is set on the
    step where an MX accepted the message and checked its sender (None elsewhere).
    """

    step: str
    host: str
    at: float
    auth: HopAuth | None = None


class Journeys:
    """The steps recorded per queue id, and which queue ids a Message-ID went through."""

    def __init__(self, limit: int = TIMELINE_LIMIT) -> None:
        self._limit = limit
        self._hops: collections.OrderedDict[str, list[HopTiming]] = collections.OrderedDict()
        self._relay_origin: dict[str, str] = {}
        self._by_message_id: dict[str, list[str]] = {}

    def record(self, queue_id: str, step: str, host: str, when: float) -> None:
        """Add a step (``when``: a monotonic clock reading) to a queue id's journey."""
        hops = self._hops.get(queue_id)
        if hops is None:
            hops = self._hops[queue_id] = []
            while len(self._hops) > self._limit:
                self._hops.popitem(last=False)
            while len(self._relay_origin) > self._limit:  # insertion-ordered: oldest first
                self._relay_origin.pop(next(iter(self._relay_origin)))
        hops.append(HopTiming(step, host, when))

    def authenticated(self, queue_id: str, auth: HopAuth) -> None:
        """Attach an MX's verdicts to the step where it accepted ``queue_id`` (its last
        ``... accepted`` step; nothing when that was not recorded or is forgotten)."""
        hops = self._hops.get(queue_id, [])
        for index in range(len(hops) - 1, -1, -1):
            if hops[index].step.endswith(" accepted"):
                hops[index] = dataclasses.replace(hops[index], auth=auth)
                return

    def relayed(self, relay_id: str, origin_id: str) -> None:
        """The relay queued message ``relay_id`` for the hop that accepted ``origin_id``."""
        self._relay_origin[relay_id] = origin_id

    def record_relay(self, relay_id: str, step: str, detail: str, when: float) -> None:
        """A relay event, recorded on the journey of the message it belongs to."""
        origin = self._relay_origin.get(relay_id)
        if origin is not None:
            self.record(origin, f"relay {step}", detail, when)

    def index(self, raw: bytes, *, head: bytes = b"") -> None:
        """Remember which queue ids the stored message ``head + raw`` went through."""
        head += raw[: header_bounds(raw)[0]]  # not split(): that copies the body too
        found = _MESSAGE_ID.search(head)
        if found is None:
            return
        ids = [m.decode() for m in _RECEIVED_ID.findall(head)]
        key = found.group(1).decode("utf-8", "replace")
        self._by_message_id[key] = ids
        while len(self._by_message_id) > self._limit:
            self._by_message_id.pop(next(iter(self._by_message_id)))

    def journey(self, message_id: str) -> list[HopTiming]:
        """The steps of a stored message, oldest first, ``at`` counted from the first."""
        ids = self._by_message_id.get(message_id.strip(), [])
        hops = [h for qid in reversed(ids) for h in self._hops.get(qid, [])]
        if not hops:
            return []
        hops.sort(key=lambda h: h.at)
        start = hops[0].at
        return [HopTiming(h.step, h.host, h.at - start, h.auth) for h in hops]
