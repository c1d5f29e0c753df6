"""Delivery Status Notifications ("bounces"): RFC 3464 reports built from a failed delivery.

Theory of operation
-------------------
When the relay gives up on a recipient (a 5xx reply, a null MX, an unknown domain, or the queue
lifetime running out) it tells the envelope sender with a DSN. :func:`build_dsn` is pure: the
caller passes the clock values and the domain for the Message-ID, and gets the bytes of one
message, CRLF line endings throughout:

``multipart/report; report-type=delivery-status`` (RFC 6522) with three parts:

1. ``text/plain``: a human-readable explanation;
2. ``message/delivery-status`` (RFC 3464 §2.2-2.3): the per-message fields (``Reporting-MTA``,
   ``Arrival-Date``) then one per-recipient block (``Final-Recipient``, ``Action``, ``Status``,
   ``Remote-MTA``, ``Diagnostic-Code``, ``Last-Attempt-Date``);
3. ``text/rfc822-headers`` (RFC 6522 §4): the original header section only, so a bounce never
   re-delivers a large or hostile body.

Rules the caller must keep (RFC 5321 §4.5.5, RFC 3464 §2): a DSN is sent with the null reverse
path ``<>``, and a message whose envelope sender is already null never gets a DSN ("never bounce
a bounce"). The header carries ``Auto-Submitted: auto-replied`` (RFC 3834 §5) so that
autoresponders stay quiet.

Every value copied from the peer or the original message into a header field is stripped of
CR, LF and NUL first: a remote MTA's diagnostic must not be able to inject header lines.

Unsupported: several recipients per report (one DSN per failed recipient), ``Original-Envelope-
Id``/``ORCPT`` (RFC 3461 parameters are not tracked), and returning the full original content.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["build_dsn", "original_headers"]

CRLF = b"\r\n"

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_UNSAFE = re.compile(r"[\r\n\x00]+")
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
# RFC 3464 §2.1.2-ish prudence: a header section copied into a report is capped so that a
# bounce of a hostile message stays small (Postfix header_size_limit is 102400).
_HEADER_LIMIT = 102400


def _clean(value: str) -> str:
    return _UNSAFE.sub(" ", value).strip()


def original_headers(original: bytes) -> bytes:
    """The header section of ``original`` with CRLF line endings, ending in one CRLF.

    At most 100 KiB are kept, cut at a line boundary.
    """
    match = _HEADER_END.search(original)
    head = original[: match.start()] if match else original
    head = _LINE_ENDINGS.sub(CRLF, head)[:_HEADER_LIMIT]
    if len(head) == _HEADER_LIMIT and CRLF in head:
        head = head[: head.rindex(CRLF)]
    return head.rstrip(CRLF) + CRLF if head else b""


def _original_message_id(headers: bytes) -> str | None:
    match = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)", headers)
    return match.group(1).decode("ascii", "replace") if match else None


def build_dsn(
    *,
    original: bytes,
    envelope_from: str,
    recipient: str,
    status: str,
    diagnostic: str,
    remote_mta: str,
    reporting_mta: str,
    action: str = "failed",
    arrival_date: float,
    now: float,
    message_id_domain: str,
) -> bytes:
    """Build an RFC 3464 delivery status notification for one recipient.

    Args:
        original: the message as it was queued (only its header section is returned).
        envelope_from: the original envelope sender; the DSN is addressed to it. Must not be
            empty: a bounce is never bounced (RFC 3464 §2, RFC 5321 §4.5.5).
        recipient: the recipient that failed (``Final-Recipient``).
        status: the RFC 3463 status code, ``"5.1.1"``.
        diagnostic: what the remote said, ``"smtp; 550 5.1.1 no such user"``; a value without
            a ``type;`` prefix gets ``smtp;``.
        remote_mta: the MX host that answered (omitted from the report when empty).
        reporting_mta: our host name (``Reporting-MTA``).
        action: ``failed`` (default), ``delayed``, ``delivered``, ``relayed`` or ``expanded``.
        arrival_date: when we accepted the message (seconds since the epoch).
        now: the time of the report (``Date`` and ``Last-Attempt-Date``).
        message_id_domain: the domain for the DSN's Message-ID and ``From: MAILER-DAEMON@``.

    Returns:
        The DSN as bytes with CRLF line endings.

    Raises:
        ValueError: empty ``envelope_from``, a malformed ``status`` or an unknown ``action``.
    """
    if not envelope_from or envelope_from == "<>":
        raise ConfigError(
            "no DSN for a message with a null envelope sender (never bounce a bounce)"
        )
    if not _STATUS.match(status):
        raise ConfigError(f"DSN status must look like '5.1.1' (RFC 3463); got {status!r}")
    if action not in _ACTIONS:
        raise ConfigError(f"DSN action must be one of {sorted(_ACTIONS)}; got {action!r}")
    domain = _clean(message_id_domain).strip(".") or "localhost"
    diag = _clean(diagnostic)
    if diag and ";" not in diag.split(" ", 1)[0]:
        diag = f"smtp; {diag}"
    report = _Report(
        sender=_clean(envelope_from),
        rcpt=_clean(recipient),
        domain=domain,
        reporting=_clean(reporting_mta) or domain,
        remote=_clean(remote_mta),
        diag=diag,
        status=status,
        action=action,
        headers=original_headers(original),
        arrival=email.utils.formatdate(arrival_date, usegmt=True),
        date=email.utils.formatdate(now, usegmt=True),
        now=now,
    )
    return _assemble(report)


@dataclass(frozen=True, slots=True)
class _Report:
    """The cleaned values of one DSN."""

    sender: str
    rcpt: str
    domain: str
    reporting: str
    remote: str
    diag: str
    status: str
    action: str
    headers: bytes
    arrival: str
    date: str
    now: float

    @property
    def token(self) -> str:
        """A stable digest of the report: its boundary and Message-ID derive from it."""
        parts = [self.headers, self.sender.encode(), self.rcpt.encode(), self.status.encode()]
        return hashlib.sha256(b"\0".join([*parts, repr(self.now).encode()])).hexdigest()


def _top_fields(report: _Report, boundary: str) -> list[str]:
    """The DSN's own header fields (RFC 3464 section 2, RFC 3834 Auto-Submitted)."""
    subject = (
        "Undelivered Mail Returned to Sender"
        if report.action == "failed"
        else f"Delivery Status Notification ({report.action})"
    )
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{report.domain}>",
        f"To: <{report.sender}>",
        f"Subject: {subject}",
        f"Date: {report.date}",
        f"Message-ID: <dsn.{report.token[:32]}@{report.domain}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    original_id = _original_message_id(report.headers)
    if original_id:
        top += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    return top


def _explanation(report: _Report) -> list[str]:
    """The human-readable first part."""
    explanation = [
        "This is the mail system at host " + report.reporting + ".",
        "",
        (
            "Your message could not be delivered to one or more recipients."
            if report.action == "failed"
            else f"Delivery status of your message: {report.action}."
        ),
        "",
        f"<{report.rcpt}>: {report.diag or report.status}",
    ]
    if report.remote:
        explanation.append(f"    (remote host: {report.remote})")
    return explanation


def _status_fields(report: _Report) -> tuple[list[str], list[str]]:
    """The per-message and per-recipient fields of the delivery-status part (RFC 3464 2.2,
    2.3)."""
    per_message = [f"Reporting-MTA: dns; {report.reporting}", f"Arrival-Date: {report.arrival}"]
    per_recipient = [
        f"Final-Recipient: rfc822; {report.rcpt}",
        f"Action: {report.action}",
        f"Status: {report.status}",
    ]
    if report.remote:
        per_recipient.append(f"Remote-MTA: dns; {report.remote}")
    if report.diag:
        per_recipient.append(f"Diagnostic-Code: {report.diag}")
    per_recipient.append(f"Last-Attempt-Date: {report.date}")
    return per_message, per_recipient


def _lines(items: list[str]) -> bytes:
    return b"".join(item.encode("utf-8") + CRLF for item in items)


def _assemble(report: _Report) -> bytes:
    """The multipart/report: notification, delivery status, the original's header section."""
    boundary = f"=_roundtrip-dsn-{report.token[:24]}"
    delimiter = f"--{boundary}".encode("ascii")
    per_message, per_recipient = _status_fields(report)
    header_cte = "8bit" if any(b > 0x7F for b in report.headers) else "7bit"
    notification = [
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: 8bit",
    ]
    status_part = ["Content-Type: message/delivery-status", "Content-Description: Delivery report"]
    headers_part = [
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers",
        f"Content-Transfer-Encoding: {header_cte}",
    ]
    parts = [
        _lines(_top_fields(report, boundary)),
        CRLF,
        b"This is a MIME-encapsulated delivery status notification." + CRLF,
        CRLF,
        delimiter + CRLF,
        _lines(notification),
        CRLF,
        _lines(_explanation(report)),
        CRLF,
        delimiter + CRLF,
        _lines(status_part),
        CRLF,
        _lines(per_message),
        CRLF,
        _lines(per_recipient),
        CRLF,
        delimiter + CRLF,
        _lines(headers_part),
        CRLF,
        report.headers,
        CRLF,
        delimiter + b"--" + CRLF,
    ]
    return b"".join(parts)
