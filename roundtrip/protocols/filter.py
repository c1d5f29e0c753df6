"""The content filter stage of a receiving MX: accept, reject, quarantine, or add headers.

Theory of operation: the recipient's MX runs one filter on every message it accepts, after
the final dot and before it replies (so a rejection is a 5xx to DATA, as with a Postfix
before-queue milter). The filter sees the envelope, the bytes and how the message arrived,
and returns a ``Verdict``. ``None`` means accept unchanged.

``default_filter`` adds ``X-Spam-*`` headers from the small, documented rule set below and
never rejects; it gives tests something realistic to assert on without a real spam engine.
Tests plug their own filter with ``MailStack.content_filter``.

Rules of ``default_filter`` (score per rule; a message scoring ``SPAM_THRESHOLD`` or more is
flagged ``X-Spam-Flag: YES``):

====================  =====  ===============================================================
rule                  score  fires when
====================  =====  ===============================================================
GTUBE                 1000   the body contains the GTUBE test string (spam test, by design)
MISSING_DATE           1.0   no Date header
MISSING_MESSAGE_ID     1.0   no Message-ID header
MISSING_SUBJECT        0.5   no Subject header, or an empty one
SUBJECT_ALL_CAPS       1.5   a Subject of 10+ letters, all capitals
HTML_ONLY              0.5   Content-Type text/html at the top (no text alternative)
NO_TLS                 0.5   the last hop used no TLS
====================  =====  ===============================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .._headerblock import header_bounds
from ..errors import ConfigError

__all__ = [
    "GTUBE",
    "SPAM_THRESHOLD",
    "ContentFilter",
    "FilterInput",
    "Verdict",
    "default_filter",
    "header_fields",
    "prepend_headers",
]

#: The Generic Test for Unsolicited Bulk Email: a string every spam filter flags.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAM_THRESHOLD = 5.0


class FilterInput:
    """What the filter sees of one message at the receiving MX.

    ``raw`` is the message as this MX received it, its Received field on top; the
    Authentication-Results field this MX writes is added with the filter's own fields.

    The MX hands the message over in two parts: ``head``, the fields it put on top (its
    Received), and ``content``, the bytes the client sent. ``raw`` joins them on first use,
    which copies the message; a filter that reads only fields (``header``) or searches the
    body (``content``) leaves a big message uncopied.
    """

    __slots__ = ("_raw", "content", "head", "helo", "hostname", "mail_from", "rcpt_tos", "tls")

    def __init__(
        self,
        mail_from: str,
        rcpt_tos: tuple[str, ...],
        raw: bytes,
        tls: bool,
        helo: str,
        hostname: str,
        *,
        head: bytes = b"",
    ) -> None:
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.tls = tls
        self.helo = helo
        self.hostname = hostname
        #: Whole fields in front of ``content`` (CRLF-terminated), or nothing.
        self.head = head
        self.content = raw
        self._raw: bytes | None = None if head else raw

    @property
    def raw(self) -> bytes:
        """The whole message, ``head + content``."""
        if self._raw is None:
            self._raw = self.head + self.content
        return self._raw

    @property
    def header(self) -> bytes:
        """The message's header block (``head`` and the content's fields), without the
        blank line and the body."""
        return self.head + _header_block(self.content)

    def __repr__(self) -> str:
        return (
            f"FilterInput(mail_from={self.mail_from!r}, rcpt_tos={self.rcpt_tos!r}, "
            f"size={len(self.head) + len(self.content)}, tls={self.tls!r}, "
            f"helo={self.helo!r}, hostname={self.hostname!r})"
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """A filter's decision.

    Attributes:
        action: ``accept`` (into INBOX), ``quarantine`` (into Junk) or ``reject`` (5xx).
        headers: fields to prepend to the stored message, in order.
        reply: the SMTP reply for ``reject``; must be a 4xx or 5xx line.
    """

    action: Literal["accept", "quarantine", "reject"] = "accept"
    headers: tuple[tuple[str, str], ...] = ()
    reply: str = "550 5.7.1 Message content rejected"

    def __post_init__(self) -> None:
        if self.action not in ("accept", "quarantine", "reject"):
            raise ConfigError(f"unknown filter action {self.action!r}")
        if not re.match(r"^[45]\d\d [45]\.\d{1,3}\.\d{1,3} \S", self.reply):
            raise ConfigError(f"filter reply {self.reply!r} is not a 4xx/5xx line with a status")
        for name, value in self.headers:
            if not re.fullmatch(r"[!-9;-~]+", name) or any(c in value for c in "\r\n\0"):
                raise ConfigError(f"filter header {name!r} is not a safe header field")

    @property
    def mailbox(self) -> str:
        return "Junk" if self.action == "quarantine" else "INBOX"


ContentFilter = Callable[[FilterInput], "Verdict | None"]


def _header_block(raw: bytes) -> bytes:
    """The fields at the top of ``raw``, without the empty line that ends them
    (roundtrip/_headerblock.py); none when ``raw`` starts with it (the MX's ``head`` then holds
    every field; roundtrip/store.py reads ``(head, rest)`` alike)."""
    return raw[: header_bounds(raw)[0]]


def _header(headers: bytes, name: bytes) -> bytes | None:
    found = re.search(
        rb"^" + re.escape(name) + rb"[ \t]*:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
        headers,
        re.IGNORECASE | re.MULTILINE,
    )
    return found.group(1).strip() if found else None


def default_filter(message: FilterInput) -> Verdict:
    """Score ``message`` with the rules in the module docstring and add X-Spam headers."""
    headers = message.header
    hits: list[tuple[str, float]] = []
    if GTUBE in message.content:  # not in ``head``: the MX's own fields
        hits.append(("GTUBE", 1000.0))
    if _header(headers, b"Date") is None:
        hits.append(("MISSING_DATE", 1.0))
    if _header(headers, b"Message-ID") is None:
        hits.append(("MISSING_MESSAGE_ID", 1.0))
    subject = _header(headers, b"Subject")
    if not subject:
        hits.append(("MISSING_SUBJECT", 0.5))
    else:
        letters = re.sub(rb"[^A-Za-z]", b"", subject)
        if len(letters) >= 10 and letters.isupper():
            hits.append(("SUBJECT_ALL_CAPS", 1.5))
    ctype = _header(headers, b"Content-Type") or b""
    if ctype.lower().startswith(b"text/html"):
        hits.append(("HTML_ONLY", 0.5))
    if not message.tls:
        hits.append(("NO_TLS", 0.5))
    score = sum(s for _, s in hits)
    spam = score >= SPAM_THRESHOLD
    tests = ",".join(name for name, _ in hits) or "none"
    return Verdict(
        headers=(
            ("X-Spam-Checker-Version", f"roundtrip default filter on {message.hostname}"),
            ("X-Spam-Flag", "YES" if spam else "NO"),
            ("X-Spam-Score", f"{score:.1f}"),
            (
                "X-Spam-Status",
                f"{'Yes' if spam else 'No'}, score={score:.1f} "
                f"required={SPAM_THRESHOLD:.1f} tests={tests}",
            ),
        )
    )


def header_fields(headers: tuple[tuple[str, str], ...]) -> bytes:
    """The given fields, CRLF-terminated, values as given (a block to go on top of a
    message)."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8")


def prepend_headers(
    raw: bytes, headers: tuple[tuple[str, str], ...], *, below: bytes = b""
) -> bytes:
    """``raw`` with the given fields in front (CRLF-terminated, values as given), and
    ``below`` (whole fields, already encoded) between them and ``raw``: one copy of a big
    message instead of one per prepended block."""
    if not headers and not below:
        return raw
    return b"".join((header_fields(headers), below, raw))
