"""Abuse limits of one IMAP session: literal sizes, bad commands, the command budget.

Theory of operation
-------------------
- Literals (RFC 3501 4.3, RFC 7888): their size is judged when announced, before ``+`` is sent.
  APPEND may carry up to the APPENDLIMIT (RFC 7889), synchronising or not: we advertise
  LITERAL+, not LITERAL-, so its 4096-octet cap does not apply (RFC 7888 section 4). Every other
  command's literals count against the command line length (Dovecot ``imap_max_line_length``,
  docs/security.md A6.4), and its non-synchronising ones are also held to
  ``max_nonsync_literal``. A non-synchronising literal that is refused ends the session: its
  octets are already on their way and cannot be told apart from commands (Dovecot does the
  same).
- Bad commands: 3 before authentication (Dovecot imap-login, docs/security.md A4.8),
  ``max_bad_commands`` after, then the session ends.
- Command budget (docs/security.md A8.3): every command with a known verb counts against the
  total (``"*"``) and its verb's own count; past either the command is not run and the session
  ends with ``* BYE [LIMIT]`` (RFC 5530).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from ..config import MailboxLimits
from ._imapparse import LiteralAnnounced

__all__ = ["PREAUTH_BAD_COMMANDS", "CommandBudget", "LiteralVerdict", "judge_literal"]

PREAUTH_BAD_COMMANDS = 3


class LiteralVerdict(enum.Enum):
    """What to do with an announced literal."""

    #: Take it (``+`` when it is synchronising).
    ACCEPT = "accept"
    #: An APPEND message above the APPENDLIMIT: ``NO [TOOBIG]``.
    TOO_BIG = "too big"
    #: Any other literal too long for a command line: ``BAD``.
    BAD = "bad"
    #: A non-synchronising literal too large to skip: ``* BYE [TOOBIG]``.
    BYE = "bye"


def judge_literal(
    lit: LiteralAnnounced,
    *,
    append: bool,
    max_literal: int,
    max_line: int,
    max_nonsync_literal: int,
) -> LiteralVerdict:
    """The verdict on ``lit``; ``append``: it belongs to an APPEND of a logged-in session."""
    if not lit.sync and not append and lit.size > max_nonsync_literal:
        return LiteralVerdict.BYE
    limit = max_literal + max_line if append else max_line
    if (append and lit.size > max_literal) or lit.size + lit.total > limit:
        if not lit.sync:
            # Its octets are on their way and would be read as commands: end the session.
            return LiteralVerdict.BYE
        return LiteralVerdict.TOO_BIG if append else LiteralVerdict.BAD
    return LiteralVerdict.ACCEPT


class CommandBudget:
    """The session's command budget.

    Args:
        limits: ``(verb, count)`` pairs; ``"*"`` is the total; 0 turns one off (None: the
            default of ``MailboxLimits.imap_command_limits``).
    """

    def __init__(self, limits: Iterable[tuple[str, int]] | None) -> None:
        if limits is None:
            limits = MailboxLimits().imap_command_limits
        #: Verb (upper case) -> allowance; verbs without one are not counted on their own.
        self.limits = {v.upper(): n for v, n in limits if v and n > 0}
        self._counts: dict[str, int] = {}

    def charge(self, verb: str) -> str | None:
        """Count one ``verb`` command; past a budget, the text of the BYE, else None."""
        counts = self._counts
        for key in (verb, "*"):
            if key in self.limits:
                counts[key] = counts.get(key, 0) + 1
        if counts.get(verb, 0) > self.limits.get(verb, 0):
            return f"Too many {verb} commands"
        if counts.get("*", 0) > self.limits.get("*", 0):
            return "Too many commands"
        return None
