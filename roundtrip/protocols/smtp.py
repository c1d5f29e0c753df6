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

Abuse limits (docs/security.md A1, A4.3, A5, A8) are decided here and enforced by the adapter:
``check_address_encoding`` (RFC 6531: 8-bit addresses need SMTPUTF8, and must be valid UTF-8),
``check_hops`` (mail loops, Postfix ``hopcount_limit``), ``extend_data_deadline`` (a DATA
deadline that only a minimum data rate can push back, Postfix ``smtpd_min_data_rate``),
``counts_as_error`` (Postfix ``smtpd_hard_error_limit``), and two small bookkeeping classes with
injected clocks: ``ConnectionCounts`` (total and per-IP caps) and ``AuthPenalties`` (a growing
delay per client IP after failed AUTH, Dovecot's auth penalty).

Not handled here: parsing, dot-stuffing, and the SIZE and line-length checks themselves
(aiosmtpd does those; the adapter configures them).
"""

from __future__ import annotations

import email.utils
import itertools
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum

from .._headerblock import first_empty_line, header_bounds
from ._limits import (
    TOO_MANY_CONNECTIONS,
    TOO_MANY_CONNECTIONS_FROM,
    AuthPenalties,
    ConnectionCounts,
    auth_penalty,
)

__all__ = [
    "AuthPenalties",
    "ConnectionCounts",
    "Reply",
    "Role",
    "TLSInfo",
    "add_missing_headers",
    "auth_penalty",
    "check_address_encoding",
    "check_bare_cr_in_header",
    "check_from_header",
    "check_header_size",
    "check_helo_name",
    "check_hops",
    "check_recipient",
    "check_sender",
    "count_received",
    "counts_as_error",
    "domain_of",
    "enhanced_status",
    "extend_data_deadline",
    "plain_identity_permitted",
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
    # Abuse limits (docs/security.md A1.6, A4.3, A8.1-A8.3). Texts follow Postfix smtpd.
    UNKNOWN_COMMAND = "500 Error: command not recognized"
    TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
    TOO_MANY_CONNECTIONS = TOO_MANY_CONNECTIONS
    TOO_MANY_CONNECTIONS_FROM = TOO_MANY_CONNECTIONS_FROM
    TOO_MANY_AUTH_FAILURES = "421 4.7.0 Error: too many failed authentications"
    TIMEOUT = "421 4.4.2 Error: timeout exceeded"
    #: A client that talked before the banner (Postfix smtpd_forbid_unauth_pipelining text).
    PREGREET = "554 5.5.0 Error: SMTP protocol synchronization"
    AUTH_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
    AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
    AUTH_ABORTED = "501 5.7.0 Auth aborted"
    AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"
    #: 8-bit addresses without SMTPUTF8: 553 with X.6.7 (RFC 6531 section 3.7, RFC 5248).
    NON_ASCII_SENDER = "553 5.6.7 Non-ASCII addresses not permitted for that sender"
    NON_ASCII_RECIPIENT = "553 5.6.7 Non-ASCII addresses not permitted for that recipient"
    MALFORMED_UTF8_SENDER = "553 5.1.7 Error: malformed UTF-8 in sender address"
    MALFORMED_UTF8_RECIPIENT = "553 5.1.3 Error: malformed UTF-8 in recipient address"
    #: A mail loop (RFC 5321 section 6.3; Postfix hopcount_limit, bounce code 5.4.6).
    TOO_MANY_HOPS = "554 5.4.6 Error: too many hops"
    BARE_CR_IN_HEADER = (
        "554 5.6.0 Bare CR in the message header section: CR is allowed only before LF"
        " (RFC 5322 section 2.3)"
    )
    BAD_HELO = (
        "501 5.5.4 Invalid {verb} name: a domain or an address literal is required"
        " (RFC 5321 section 4.1.1.1)"
    )
    FROM_MISMATCH = "553 5.7.1 <{address}>: From: header not owned by user {user}"
    HEADER_TOO_LARGE = "552 5.3.4 Error: message header field too large (limit {limit} octets)"


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


def check_from_header(raw: bytes, *, authenticated_user: str | None) -> str | None:
    """Refuse a submitted message whose From: names an address other than the AUTH user.

    docs/security.md A4.6 (Postfix needs a milter for this). A message without From: passes: the
    submission server may add one (RFC 6409 section 8).

    Returns:
        None to accept, or the reply line to refuse with.
    """
    if authenticated_user is None:
        return None
    end = _checked_end(raw)
    values = [
        b" ".join(m.group(1).split()).decode("utf-8", "replace")
        for m in _FROM.finditer(raw, 0, end)
    ]
    for _, address in email.utils.getaddresses(values):
        if address and address.lower() != authenticated_user.lower():
            return Reply.FROM_MISMATCH.format(address=address, user=authenticated_user)
    return None


def check_bare_cr_in_header(raw: bytes) -> str | None:
    """Refuse a submitted message with a CR that is not part of a CRLF in its header section.

    RFC 5322 section 2.3 and RFC 5321 section 2.3.8 allow CR and LF only together. The
    submission checks split lines on LF, while the next hop turns a bare CR into a line break
    (see ``normalize_line_endings`` in roundtrip/servers/relay.py): ``Subject: x<CR>From: ...``
    would hide a forged From: from ``check_from_header`` and deliver it, and ``<CR><CR>`` would
    become a blank line that pushes the remaining fields into the body. Refusing it makes every
    check see exactly the lines that will be delivered.

    Returns:
        None to accept, or the reply line to refuse with.
    """
    end = _checked_end(raw)
    if _BARE_CR.search(raw, 0, end):
        return Reply.BARE_CR_IN_HEADER
    return None


_BARE_CR = re.compile(rb"\r(?!\n)")


def plain_identity_permitted(authzid: bytes, authcid: bytes) -> bool:
    """Whether SASL PLAIN's authorization identity may be used with this authentication one.

    RFC 4616 section 2: the server fails the exchange unless the authenticated identity may
    act as the one asked for. Nobody here acts for another user: the authorization identity
    must be empty or the same address (compared without case, as logins are).
    """
    return not authzid or authzid.lower() == authcid.lower()


#: What a domain name of EHLO/HELO may hold, besides letters and digits of any script
#: (U-labels, RFC 6531 section 3.7.1): the dot, the hyphen, and the underscore that many
#: hosts' names carry in practice (Postfix's ``reject_invalid_helo_hostname`` allows it too).
_HELO_NAME_EXTRA = frozenset("-._")


def check_helo_name(name: str, *, verb: str = "EHLO") -> str | None:
    """Refuse an EHLO/HELO argument that is neither a domain nor an address literal.

    RFC 5321 section 4.1.1.1. The name goes into ``Received:`` fields and DSNs; a Unicode
    line separator (U+2028, U+2029, U+0085), a control character or a space in it would let a
    consumer that splits on them see an injected field.

    Returns:
        None to accept, or the reply line to refuse with.
    """
    refusal = Reply.BAD_HELO.format(verb=verb)
    if not name or len(name) > 255:
        return refusal
    if name.startswith("["):
        # An address literal: printable ASCII without brackets, backslash or space inside.
        inner = name[1:-1]
        if not name.endswith("]") or not inner:
            return refusal
        if not all("!" <= ch <= "~" and ch not in "[]\\" for ch in inner):
            return refusal
        return None
    if not all(ch.isalnum() or ch in _HELO_NAME_EXTRA for ch in name):
        return refusal
    if name.startswith(".") or ".." in name:
        return refusal
    return None


_FROM = re.compile(rb"^from[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE)


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


def _address_literal(ip: str) -> str:
    """``ip`` as an SMTP address literal (RFC 5321 section 4.1.3): ``[192.0.2.1]`` for IPv4,
    ``[IPv6:2001:db8::1]`` for IPv6 (the tag Postfix writes too). A zone index (``%lo``) is
    dropped: no literal can carry it."""
    if ":" in ip:
        return f"[IPv6:{ip.partition('%')[0]}]"
    return f"[{ip}]"


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
    lines = [f"Received: from {helo or 'unknown'} ({_address_literal(peer_ip)})"]
    if tls is not None:
        lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits} bits))")
    lines.append(f"\tby {by_host} (roundtrip) with {protocol} id {queue_id}")
    tail = f"; {email.utils.formatdate(timestamp, localtime=False)}"
    if recipient is not None:
        lines.append(f"\tfor <{_TRACE_UNSAFE.sub('?', recipient)}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _checked_end(raw: bytes) -> int:
    """Where the header block the submission checks read ends: every line up to the first
    empty line, fields or not (``first_empty_line`` in roundtrip/_headerblock.py).

    Wider than the header block of the one rule on purpose: a line that is not a field ends
    the header for IMAP and the email package, but a reader that reads on past it must not
    find a From:, a bare CR or a Received field that these checks did not see.
    """
    return first_empty_line(raw)[0]


def _insertion_point(raw: bytes) -> tuple[int, bytes]:
    """Where fields added to the header block go, and the line ending they take.

    The offset is the end of the header block (roundtrip/_headerblock.py): just before the
    empty line, or before the first line that is not a field; 0 when the message starts with
    either, ``len(raw)`` when the whole message is fields. The line ending is the one of the
    block's last line that has one, else of the empty line, else of the first line after the
    block, else CRLF.
    """
    end, body = header_bounds(raw)
    nl = raw.rfind(b"\n", 0, end)
    if nl < 0 and body > end:
        return end, raw[end:body]
    if nl < 0:
        nl = raw.find(b"\n", end)
    if nl < 0:
        return end, b"\r\n"
    return end, b"\r\n" if nl > 0 and raw[nl - 1] == 0x0D else b"\n"


def _has_header(headers: bytes, name: bytes) -> bool:
    pattern = re.compile(rb"^" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)
    return pattern.search(headers) is not None


def add_missing_headers(raw: bytes, *, domain: str, queue_id: str, timestamp: float) -> bytes:
    """Add Message-ID and Date when a submitted message lacks them (RFC 6409 section 8).

    The added fields go at the end of the header block, with the block's own line ending;
    nothing else in ``raw`` changes.
    """
    end, eol = _insertion_point(raw)
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


# Abuse limits


def counts_as_error(reply: str) -> bool:
    """Whether a final reply counts towards the session's error limit.

    Every 4xx and 5xx does (Postfix increments its error count on each rejected command),
    except the 421 that closes the session anyway.
    """
    return len(reply) >= 3 and reply[0] in "45" and not reply.startswith("421")


# Lone surrogates are how aiosmtpd hands over bytes that are not UTF-8 (surrogateescape).
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def check_address_encoding(address: str, *, smtputf8: bool, sender: bool) -> str | None:
    """Decide whether an envelope address may carry the octets it does (RFC 6531).

    Without the SMTPUTF8 parameter on MAIL, any octet above 127 is refused with 553 5.6.7
    (RFC 6531 section 3.7, code X.6.7). With it, the address must still be valid UTF-8 (RFC 6532
    section 3.1); undecodable octets get 553 5.1.7 (sender) or 5.1.3 (recipient).

    Returns:
        None to accept, or the reply line to refuse with.
    """
    if not _NON_ASCII.search(address):
        return None
    if not smtputf8:
        return Reply.NON_ASCII_SENDER if sender else Reply.NON_ASCII_RECIPIENT
    if _UNDECODABLE.search(address):
        return Reply.MALFORMED_UTF8_SENDER if sender else Reply.MALFORMED_UTF8_RECIPIENT
    return None


_RECEIVED = re.compile(rb"^Received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def count_received(raw: bytes) -> int:
    """How many ``Received:`` fields the header block of ``raw`` carries (body lines are not
    counted)."""
    end = _checked_end(raw)
    return len(_RECEIVED.findall(raw, 0, end))


def check_hops(raw: bytes, *, max_hops: int) -> str | None:
    """Refuse a message that already went through more than ``max_hops`` hops.

    RFC 5321 section 6.3 asks for a loop limit on Received fields; Postfix's
    ``hopcount_limit`` is 50 and bounces with 5.4.6. ``max_hops`` 0 turns the check off.

    Returns:
        None to accept, or the reply line to refuse with.
    """
    if max_hops and count_received(raw) > max_hops:
        return Reply.TOO_MANY_HOPS
    return None


def largest_header_field(raw: bytes) -> int:
    """Octets of the largest header field of ``raw`` (a field with its folded lines)."""
    end = _checked_end(raw)
    largest = 0
    start = 0
    pos = 0
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        stop = end if nl < 0 else nl + 1
        if pos > start and raw[pos : pos + 1] not in (b" ", b"\t"):
            largest = max(largest, pos - start)  # a new field begins: the last one ended
            start = pos
        pos = stop
    return max(largest, end - start)


def check_header_size(raw: bytes, *, limit: int) -> str | None:
    """Refuse a header field larger than ``limit`` octets (Postfix ``header_size_limit``;
    docs/security.md A5.6). ``limit`` 0 turns the check off.

    Returns:
        None to accept, or the reply line to refuse with.
    """
    if limit and largest_header_field(raw) > limit:
        return Reply.HEADER_TOO_LARGE.format(limit=limit)
    return None


def extend_data_deadline(
    deadline: float, *, now: float, received: int, min_rate: float, timeout: float
) -> float:
    """The DATA deadline after ``received`` more bytes arrived at ``now``.

    Each byte buys ``1/min_rate`` seconds, but the deadline never lies more than ``timeout``
    ahead of now (Postfix ``smtpd_per_request_deadline`` with ``smtpd_min_data_rate``). A
    client slower than ``min_rate`` therefore runs out of time however it trickles.
    """
    return min(deadline + received / min_rate, now + timeout)


_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:", re.MULTILINE)


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results field value (lower case, no final dot).

    RFC 8601 section 2.2: ``[CFWS] authserv-id [CFWS [authres-version]] ";"``, the id being
    an RFC 2045 ``value`` (a token or a quoted string). Comments (nested, with quoted-pairs,
    RFC 5322 section 3.2.2) are removed in one pass before the id is taken, so
    ``mail.example.org(ok);`` gives ``mail.example.org`` as ``authres`` (the parser
    ``roundtrip/probes/_authres.py`` reads fields with) does; a quoted id is unquoted.
    """
    text = value.decode("utf-8", "replace")
    bare: list[str] = []
    depth, quoted, escaped = 0, False, False
    for char in text:
        if escaped:
            escaped = False
            if not depth:
                bare.append(char)
        elif char == "\\" and (quoted or depth):
            escaped = True
        elif depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if not depth:
                bare.append(" ")
        elif quoted:
            quoted = char != '"'
            bare.append(" " if not quoted else char)
        elif char == '"':
            quoted = True
            bare.append(" ")
        elif char == "(":
            depth = 1
            bare.append(" ")
        elif char == ";":
            break
        else:
            bare.append(char)
    words = "".join(bare).split()
    return words[0].lower().rstrip(".") if words else ""


def drop_forged_auth_results(raw: bytes, authserv_ids: Collection[str]) -> bytes:
    """Remove ``Authentication-Results`` fields that claim one of our own authserv-ids.

    RFC 8601 section 5: a receiving MTA must delete A-R fields carrying its own authserv-id
    that arrive from outside, else a sender can forge "dkim=pass" in our name. Fields naming
    another host are trace data and stay. The whole top-level header block is examined,
    however long (a bound on it would let a field below the bound through), and nothing else
    in ``raw`` changes. The id is read as readers read it (:func:`authserv_id`), case aside.
    """
    end = _checked_end(raw)
    head = raw[:end]
    if b"authentication-results" not in head.lower():
        return raw
    ours = {i.lower().rstrip(".") for i in authserv_ids}
    starts = [m.start() for m in _FIELD_START.finditer(head)] + [len(head)]
    kept = bytearray(head[: starts[0]])
    changed = False
    for begin, stop in itertools.pairwise(starts):
        field_bytes = head[begin:stop]
        name, _, value = field_bytes.partition(b":")
        if name.strip().lower() == b"authentication-results" and authserv_id(value) in ours:
            changed = True
            continue
        kept += field_bytes
    return bytes(kept) + raw[end:] if changed else raw
