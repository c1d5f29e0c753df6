"""Pure SMTP policy: which recipients a role accepts, trace headers, submission fix-ups.

Theory of operation: aiosmtpd parses the SMTP dialogue (RFC 5321) and owns the state machine;
our hooks in ``servers/smtp.py`` are thin shims that ask the functions here what to answer.
Three roles exist, after RFC 6409 and RFC 8314:

- ``smtp``: a domain's MX (port 25 semantics). No AUTH. Accepts only recipients that are users
  of the stack's domains; anything else is relaying and is refused (never an open relay).
- ``submission``: STARTTLS then AUTH (port 587 semantics).
- ``submissions``: implicit TLS then AUTH (port 465 semantics).

Both submission roles require AUTH before MAIL and accept any syntactically valid recipient;
routing decides what happens to it. An authenticated user may only use their own address as
envelope sender (Postfix ``reject_sender_login_mismatch``), unless the stack turns that off.

Not handled here: parsing, dot-stuffing, SIZE and line limits (aiosmtpd does those).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "Reply",
    "Role",
    "TLSInfo",
    "add_missing_headers",
    "check_recipient",
    "check_sender",
    "domain_of",
    "enhanced_status",
    "received_header",
    "with_protocol",
]


class Role(Enum):
    """What an SMTP listener is for."""

    #: A domain's MX: port 25 semantics, no AUTH, local recipients only.
    SMTP = "smtp"
    #: Message submission with STARTTLS: port 587 semantics (RFC 6409).
    SUBMISSION = "submission"
    #: Message submission over implicit TLS: port 465 semantics (RFC 8314).
    SUBMISSIONS = "submissions"


class Reply:
    """Replies our hooks send, with enhanced status codes (RFC 3463, RFC 2034)."""

    OK = "250 2.1.0 OK"
    RCPT_OK = "250 2.1.5 OK"
    QUEUED = "250 2.0.0 OK: queued as {queue_id}"
    NO_SUCH_USER = "550 5.1.1 <{address}>: Recipient address rejected: no such user"
    RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
    BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
    BAD_SENDER = "501 5.1.7 Bad sender address syntax"
    TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
    SENDER_MISMATCH = "553 5.7.1 <{address}>: Sender address rejected: not owned by user {user}"
    STORE_FAILED = "451 4.3.0 Error: queue file write error"
    VRFY = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    EXPN = "502 5.5.1 EXPN not available"


# Enhanced status codes for aiosmtpd's own replies, which lack them (RFC 2034 section 3).
_ENHANCED_DEFAULTS = {
    "211": "2.0.0",
    "214": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "432": "4.7.12",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "534": "5.7.9",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
# aiosmtpd splits command lines on LF only and passes the rest through, so a bare CR, NUL or
# other control character can reach an address or the EHLO name. None of them belongs in a
# path (RFC 5321 section 4.1.2), and in a header a bare CR is a smuggling/injection vector.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What may appear of a client-chosen name in a trace field: printable, no whitespace, and no
# undecodable bytes (aiosmtpd hands those over as surrogate escapes).
_TRACE_UNSAFE = re.compile(r"[\x00-\x20\x7f\udc80-\udcff]")


def enhanced_status(reply: str) -> str:
    """Insert an RFC 3463 enhanced status code into a reply line that lacks one.

    Greetings (220), intermediate replies (3xx) and lines that already carry one pass unchanged.
    """
    code = reply[:3]
    if len(reply) < 4 or reply[3] not in " -" or _HAS_ENHANCED.match(reply):
        return reply
    enhanced = _ENHANCED_DEFAULTS.get(code)
    if enhanced is None:
        return reply
    return f"{reply[:4]}{enhanced} {reply[4:]}".rstrip()


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased, without a trailing dot ('' when there is none)."""
    return address.rpartition("@")[2].rstrip(".").lower() if "@" in address else ""


def check_recipient(
    address: str,
    *,
    role: Role,
    local_domains: Collection[str],
    has_user: Callable[[str], bool],
    current_count: int,
    max_recipients: int,
) -> str | None:
    """Decide on one RCPT TO.

    Returns:
        None to accept, or the reply line to refuse with.
    """
    if current_count >= max_recipients:
        return Reply.TOO_MANY_RECIPIENTS
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address or _CONTROL.search(address):
        return Reply.BAD_ADDRESS
    domain = domain_of(address)
    local_domains = {d.rstrip(".").lower() for d in local_domains}
    if role is Role.SMTP:
        # Source routes, %-hacks, bang paths and address literals all end up here: a domain
        # that is not ours, or a local part that names no user. Neither is ever relayed.
        if domain not in local_domains or address.startswith("@"):
            return Reply.RELAY_DENIED.format(address=address)
        if not has_user(address):
            return Reply.NO_SUCH_USER.format(address=address)
        return None
    if domain in local_domains and not has_user(address):
        return Reply.NO_SUCH_USER.format(address=address)
    return None


def check_sender(mail_from: str, *, authenticated_user: str | None, enforce: bool) -> str | None:
    """Decide on MAIL FROM.

    Any role refuses control characters in the address. On a submission role,
    ``authenticated_user`` is the AUTH identity and, when ``enforce`` is set, the only address
    it may send as (the null sender ``<>`` included).

    Returns:
        None to accept, or the reply line to refuse with.
    """
    if _CONTROL.search(mail_from):
        return Reply.BAD_SENDER
    if not enforce or authenticated_user is None:
        return None
    if mail_from.lower() != authenticated_user.lower():
        return Reply.SENDER_MISMATCH.format(address=mail_from, user=authenticated_user)
    return None


def with_protocol(*, esmtp: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` keyword of a Received line (RFC 3848)."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What a Received line says about the TLS of a hop."""

    version: str
    cipher: str
    bits: int


def received_header(
    *,
    helo: str,
    peer_ip: str,
    by_host: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    timestamp: float,
    tls: TLSInfo | None,
) -> bytes:
    """A ``Received:`` trace field for one hop (RFC 5321 section 4.4), folded, CRLF-terminated.

    The client-chosen parts (``helo``, ``recipient``) have whitespace, control characters and
    undecodable bytes replaced by ``?``, so they cannot end or fold the field.
    """
    helo = _TRACE_UNSAFE.sub("?", helo)
    lines = [f"Received: from {helo or 'unknown'} ([{peer_ip}])"]
    if tls is not None:
        lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits} bits))")
    lines.append(f"\tby {by_host} (roundtrip) with {protocol} id {queue_id}")
    tail = f"; {email.utils.formatdate(timestamp, localtime=False)}"
    if recipient is not None:
        lines.append(f"\tfor <{_TRACE_UNSAFE.sub('?', recipient)}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _header_block_end(raw: bytes) -> tuple[int, bytes]:
    """Where the header block's last line ends, and the line ending it uses.

    The offset is just before the empty line that separates header and body (0 when the
    message starts with it, ``len(raw)`` when there is none). The line ending is the one of
    that separator, so fields added there match the rest of the block.
    """
    if raw.startswith(b"\r\n"):
        return 0, b"\r\n"
    if raw.startswith(b"\n"):
        return 0, b"\n"
    # The earliest blank line wins: a CRLF header block may be followed by a body with bare
    # LFs, and a bare-LF header block by a body with CRLFs.
    found = [(idx, sep) for sep in (b"\r\n\r\n", b"\n\n") if (idx := raw.find(sep)) >= 0]
    if found:
        idx, sep = min(found)
        eol = sep[: len(sep) // 2]
        return idx + len(eol), eol
    return len(raw), (b"\n" if b"\n" in raw and b"\r\n" not in raw else b"\r\n")


def _has_header(headers: bytes, name: bytes) -> bool:
    pattern = re.compile(rb"^" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)
    return pattern.search(headers) is not None


def add_missing_headers(raw: bytes, *, domain: str, queue_id: str, timestamp: float) -> bytes:
    """Add Message-ID and Date when a submitted message lacks them (RFC 6409 section 8).

    The added fields go at the end of the header block, with the block's own line ending;
    nothing else in ``raw`` changes.
    """
    end, eol = _header_block_end(raw)
    headers = raw[:end]
    fields: list[str] = []
    if not _has_header(headers, b"Message-ID"):
        fields.append(f"Message-ID: <{queue_id}@{domain}>")
    if not _has_header(headers, b"Date"):
        fields.append(f"Date: {email.utils.formatdate(timestamp, localtime=False)}")
    if not fields:
        return raw
    extra = b"".join(f.encode("ascii") + eol for f in fields)
    if end == len(raw) and raw and not raw.endswith(b"\n"):
        # No header/body separator and no final newline: end the last line first.
        return raw + eol + extra
    return raw[:end] + extra + raw[end:]
