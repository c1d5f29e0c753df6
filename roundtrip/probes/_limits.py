"""Per-step limits of the probe's connections: an overall deadline and a reply-size budget.

A socket timeout bounds each read, not a step: a server that sends one line of a never-ending
multi-line greeting every half second (``220-still here``), or untagged ``* n EXISTS`` lines
without end, never lets a read time out, and smtplib, imaplib and poplib keep collecting what
it sends until memory runs out (issue #18). So every probe step runs under a ``StepLimit``
(``map_errors`` opens one), and every read and write on a probe connection
(``_transcript.RecordingSocket``) asks it first:

* the deadline: the socket timeout is cut to what is left of the step, and a read that
  starts after the deadline, or times out because of it, raises ``StepDeadlineError``;
* the budget: the bytes received since the probe last sent something (one exchange: a
  command and its reply) may not exceed ``max_reply_bytes``, else ``ReplyTooLargeError``.
  The replies the probe waits for are small (its own message is a few hundred bytes), so the
  budget is generous and still keeps a flooding server from filling memory.

The limit in force lives in a ``ContextVar``: the client libraries between ``map_errors`` and
the socket need not know of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MAX_REPLY_BYTES",
    "ReplyTooLargeError",
    "StepDeadlineError",
    "StepLimit",
    "current",
    "step_limit",
]

#: Bytes one reply (everything received between two sends of ours) may take.
MAX_REPLY_BYTES = 4 * 1024 * 1024


class StepDeadlineError(TimeoutError):
    """A step outlived its deadline while the server kept it busy (or silent).

    ``last_line`` is the latest line the server sent (the evidence), empty if none.
    """

    def __init__(self, limit: StepLimit, last_line: str = "") -> None:
        super().__init__(f"the step's deadline of {limit.timeout:g} s passed")
        self.limit = limit
        self.last_line = last_line


class ReplyTooLargeError(ConnectionError):
    """The server sent more than the probe accepts for one reply: ``str()`` says what
    (``"announced a literal of N bytes ..."``); ``last_line`` is the evidence."""

    def __init__(self, what: str, last_line: str = "") -> None:
        super().__init__(what)
        self.last_line = last_line


@dataclass
class StepLimit:
    """The deadline (``time.monotonic()``) and reply budget of one step."""

    step: str
    timeout: float
    deadline: float
    max_reply_bytes: int = MAX_REPLY_BYTES

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_CURRENT: contextvars.ContextVar[StepLimit | None] = contextvars.ContextVar(
    "roundtrip_probe_step_limit", default=None
)


def current() -> StepLimit | None:
    """The limit of the step running in this context, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def step_limit(
    step: str,
    *,
    timeout: float,
    deadline: float | None = None,
    max_reply_bytes: int = MAX_REPLY_BYTES,
) -> Iterator[StepLimit]:
    """Run the body under a new limit: ``deadline`` (monotonic), else ``timeout`` from now."""
    limit = StepLimit(
        step,
        timeout,
        time.monotonic() + timeout if deadline is None else deadline,
        max_reply_bytes,
    )
    token = _CURRENT.set(limit)
    try:
        yield limit
    finally:
        _CURRENT.reset(token)
