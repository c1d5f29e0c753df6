"""How the relay's SMTP client groups a transaction's commands (RFC 2920), without I/O.

With PIPELINING in the MX's EHLO reply, ``MAIL FROM``, every ``RCPT TO`` and ``DATA`` go out in
one write (RFC 2920 §3.1: ``DATA`` may only end a group, since what follows it depends on its
reply); the replies come back in the same order, one per command. Without PIPELINING the client
waits for each reply before the next command (RFC 5321 §4.1), so the first write carries
``MAIL FROM`` alone. ``servers/_mxsession.py`` does the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["first_write", "path", "rset_due"]


def path(address: str, *, smtputf8: bool = False) -> bytes:
    """``address`` as a reverse- or forward-path: ``<address>``, ``<>`` for the null sender.

    RFC 5321 §4.1.2. The relay checks every envelope address for CR, LF, NUL and angle
    brackets when the message is queued (``delivery.check_address``), so nothing here can end
    or inject a command line. With ``smtputf8`` (the transaction's MAIL FROM carries the
    SMTPUTF8 parameter) the address goes as UTF-8 (RFC 6531 §3.3); without it an address
    that is not ASCII raises ``UnicodeEncodeError``: ``delivery.needs_smtputf8`` decides
    before anything is written.
    """
    return b"<" + address.encode("utf-8" if smtputf8 else "ascii") + b">"


def first_write(
    mail_from: str, rcpts: Sequence[str], *, pipelining: bool, smtputf8: bool = False
) -> list[bytes]:
    """The command lines (without CRLF) a transaction starts with, written together.

    ``MAIL FROM``, each ``RCPT TO`` and ``DATA`` when the MX offers PIPELINING; ``MAIL FROM``
    alone when it does not (the rest then goes one command at a time). With ``smtputf8``,
    ``MAIL FROM`` carries the SMTPUTF8 parameter and the paths are UTF-8 (RFC 6531 §3.4).
    """
    mail = b"MAIL FROM:" + path(mail_from, smtputf8=smtputf8)
    if smtputf8:
        mail += b" SMTPUTF8"
    if not pipelining:
        return [mail]
    rcpt_lines = (b"RCPT TO:" + path(rcpt, smtputf8=smtputf8) for rcpt in rcpts)
    return [mail, *rcpt_lines, b"DATA"]


def rset_due(*, pipelining: bool, dot_answered: bool) -> bool:
    """Whether a connection gets ``RSET`` before it waits for the next message.

    A transaction that ended with the MX's reply to the final dot is over at the MX: that
    reply clears its sender, recipients and content (RFC 5321 §4.1.1.4). Towards an MX that
    pipelines, the next transaction's first write then begins with ``MAIL FROM``, whose reply
    also shows whether the connection is still alive. Any other ending (refused sender, every
    recipient refused, ``DATA`` refused), and every MX that does not pipeline, gets ``RSET``
    (RFC 5321 §4.1.1.5), whose reply is the liveness check before the connection is cached.
    """
    return not (pipelining and dot_answered)
