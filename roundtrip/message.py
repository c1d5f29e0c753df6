"""A received message, parsed once into the things a test asserts on.

:class:`ReceivedMessage` wraps the raw bytes a mailbox returned and exposes decoded headers,
addresses, the primary text and HTML bodies, attachments, inline parts, links, one-time codes
and the parsed ``Received`` chain. It uses only the standard library's ``email`` package with
``email.policy.default``.

Hostile input does not crash it (docs/security.md A5.5): CPython's parser recurses once per MIME
level and raises ``RecursionError`` at about 1000 levels. Then the message falls back to its
headers and raw bytes, with no bodies or parts, and :attr:`ReceivedMessage.parse_error` says why.
The MIME tree itself is walked iteratively, never recursively. Malformed headers keep their raw
value instead of raising.

Conventions: header values are unfolded and RFC 2047/6532-decoded ``str``; bodies are decoded
``str`` with CRLF turned into ``\\n``; addresses are bare ``local@domain`` strings; content ids
have no angle brackets; everything absent is ``None`` (or an empty list).
"""

from __future__ import annotations

import contextlib
import email.errors
import functools
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from types import MappingProxyType
from typing import Any

import authres  # type: ignore[import-untyped]

from ._headerblock import header_bounds

__all__ = [
    "Attachment",
    "AuthResult",
    "AuthResults",
    "Headers",
    "ReceivedHop",
    "ReceivedMessage",
    "parse_auth_results",
    "parse_received",
]

_POLICY = policy.default

# What CPython's header and MIME parsers have raised on malformed input (besides the
# defects they register); we keep the raw value rather than fail the caller's test.
_PARSE_ERRORS = (
    ValueError,
    LookupError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,  # a Date or Received zone offset of 11+ digits (timedelta)
    email.errors.MessageError,
)

# RFC 3848 section 1: the "with" protocol names that mean the hop used TLS.
_TLS_PROTOCOLS = frozenset(
    {"ESMTPS", "ESMTPSA", "LMTPS", "LMTPSA", "UTF8SMTPS", "UTF8SMTPSA", "UTF8LMTPS", "UTF8LMTPSA"}
)
# Comments MTAs add when the hop was encrypted (Postfix "(using TLSv1.3 ...)", Exim
# "(version=TLS1_3 ...)", sendmail "(version=TLSv1.3 ...)").
_TLS_COMMENT = re.compile(r"\(using TLS|\bversion=TLS|\bTLSv1")
_TEXT_URL = re.compile(r"(?:https?://|mailto:)[^\s<>\"'`]+", re.IGNORECASE)
_TRAILING_PUNCT = ".,;:!?'\""
DEFAULT_CODE_PATTERN = r"\b\d{6}\b"


#: The header fields ``email.policy.default`` parses with a structure of their own
#: (``email.headerregistry``'s default mapping, Subject excepted: it is unstructured text).
#: Every other field is unstructured text (RFC 5322 section 3.2.5).
_STRUCTURED = frozenset(
    (
        "bcc",
        "cc",
        "content-disposition",
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "message-id",
        "mime-version",
        "orig-date",
        "reply-to",
        "resent-bcc",
        "resent-cc",
        "resent-date",
        "resent-from",
        "resent-sender",
        "resent-to",
        "sender",
        "to",
    )
)


@functools.lru_cache(maxsize=512)
def _parsed_header(name: str, value: str) -> Any:
    return _POLICY.header_fetch_parse(name, value)


def _header(name: str, value: str) -> Any:
    """The email package's parse of a field (decoded text, addresses): a short one is kept,
    as a message's From and To are read twice and the same fields come back in every
    message of a test. May raise what ``_PARSE_ERRORS`` lists."""
    if len(value) > 1000:
        return _POLICY.header_fetch_parse(name, value)
    return _parsed_header(name, value)


def _unsurrogate(text: str) -> str:
    # The bytes parser smuggles non-ASCII octets (RFC 6532 UTF-8 headers) through as
    # surrogate escapes; turn them back into UTF-8 text.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", text).replace("\r", "").replace("\n", "")


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One ``method=result`` of an Authentication-Results field (RFC 8601 section 2.2).

    Attributes:
        method: ``dkim``, ``spf``, ``dmarc`` ... (lower case).
        result: ``pass``, ``fail``, ``none``, ``permerror`` ... (lower case).
        reason: the ``reason=`` text, or ``None``.
        properties: ``{"header.d": "example.org", "header.s": "sel", ...}``.
    """

    method: str
    result: str
    reason: str | None = None
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuthResults:
    """The topmost Authentication-Results field: what the last receiving MX found.

    Attributes:
        authserv_id: who wrote it (``""`` when there is no such field).
        results: every result, in order.
        error: why the field could not be parsed, or ``None``.
    """

    authserv_id: str = ""
    results: tuple[AuthResult, ...] = ()
    error: str | None = None

    def of(self, method: str) -> list[AuthResult]:
        """The results of ``method`` (case-insensitive), in order."""
        wanted = method.lower()
        return [r for r in self.results if r.method == wanted]

    @property
    def dkim(self) -> list[AuthResult]:
        """One result per DKIM signature, or a single ``none``."""
        return self.of("dkim")

    @property
    def spf(self) -> list[AuthResult]:
        """The SPF result (one; ``smtp.mailfrom`` or ``smtp.helo`` names the domain checked)."""
        return self.of("spf")

    @property
    def dmarc(self) -> list[AuthResult]:
        """The DMARC result (one; ``header.from`` and ``policy.dmarc`` in its properties)."""
        return self.of("dmarc")

    @property
    def arc(self) -> list[AuthResult]:
        """The ARC chain's validation (RFC 8617 section 10.2; one, when the message carried an
        ARC set): ``pass``, ``fail`` or ``none``."""
        return self.of("arc")


def parse_auth_results(value: str) -> AuthResults:
    """Parse one Authentication-Results value (after the colon) with ``authres``.

    A value ``authres`` rejects gives an empty :class:`AuthResults` whose ``error`` says why.
    """
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(value)
    except Exception as exc:  # authres raises its own SyntaxError and others on junk
        return AuthResults(error=f"{type(exc).__name__}: {exc}")
    results = []
    for item in parsed.results:
        method = getattr(item, "method", None)
        if not method:  # the bare "none" of a field with no results
            continue
        props = {f"{p.type}.{p.name}".lower(): str(p.value) for p in item.properties}
        reason = item.reason
        results.append(
            AuthResult(
                method=str(method).lower(),
                result=str(item.result).lower(),
                reason=None if reason is None else str(reason),
                properties=MappingProxyType(props),
            )
        )
    return AuthResults(str(parsed.authserv_id), tuple(results))


@dataclass(frozen=True, slots=True)
class Attachment:
    """One non-body MIME leaf: a file, an inline image, a calendar part, a forwarded message.

    Attributes:
        filename: the decoded file name (RFC 2231 and RFC 2047 handled), or ``None``.
        content_type: lowercase ``maintype/subtype``.
        data: the transfer-decoded bytes (base64/quoted-printable undone, charset untouched);
            for ``message/rfc822`` the serialized inner message.
        content_id: the Content-ID without angle brackets (what ``cid:`` URLs reference).
        inline: True for parts shown in the body (inline disposition, a Content-ID, or an
            unnamed text part), False for downloadable attachments.
    """

    filename: str | None
    content_type: str
    data: bytes = field(repr=False)
    content_id: str | None = None
    inline: bool = False

    @property
    def size(self) -> int:
        """Length of :attr:`data` in bytes."""
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ReceivedHop:
    """One ``Received`` header (RFC 5321 section 4.4), parsed leniently.

    Attributes:
        from_: the host after ``from`` (as the receiving server recorded it), or ``None``.
        by: the receiving host.
        with_: the protocol (``ESMTPS``, ``LMTP`` ...), as written.
        for_: the recipient after ``for``, without angle brackets.
        id: the receiving server's queue id.
        timestamp: the date after the last ``;`` (timezone-aware), or ``None``.
        tls: True when the protocol is one of RFC 3848's TLS names or a comment says TLS.
        raw: the unfolded header value.
    """

    from_: str | None
    by: str | None
    with_: str | None
    for_: str | None
    id: str | None
    timestamp: datetime | None
    tls: bool
    raw: str


class Headers:
    """Decoded headers in their original order; names are case-insensitive.

    ``get(name)`` returns the first value, ``get_all(name)`` every value; ``name in headers``,
    ``headers[name]`` (``KeyError`` when absent), ``len()``, iteration over names and
    ``items()`` behave as for ``email.message.Message``.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = [(name, value) for name, value in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of header ``name``, or ``default``."""
        wanted = name.lower()
        for key, value in self._items:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Return every value of header ``name`` in order (empty list when absent)."""
        wanted = name.lower()
        return [value for key, value in self._items if key.lower() == wanted]

    def items(self) -> list[tuple[str, str]]:
        """Return ``(name, value)`` pairs in order, names as written in the message."""
        return list(self._items)

    def keys(self) -> list[str]:
        return [key for key, _ in self._items]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class _HTMLScan(HTMLParser):
    """Collects href/src values and the visible text of an HTML body."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        for name, value in attrs:
            if name in ("href", "src") and value:
                value = value.strip()
                if value and not value.startswith("#"):
                    self.links.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def _text_links(text: str) -> list[str]:
    found = []
    for match in _TEXT_URL.finditer(text):
        url = match.group(0)
        while url and url[-1] in _TRAILING_PUNCT:
            url = url[:-1]
        # Drop a closing bracket the URL did not open: "(see https://x/y)".
        for opener, closer in (("(", ")"), ("[", "]")):
            while url.endswith(closer) and url.count(closer) > url.count(opener):
                url = url[:-1]
        if url:
            found.append(url)
    return found


def _strip_comments(text: str) -> str:
    out = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(char)
    return "".join(out)


def parse_received(value: str) -> ReceivedHop:
    """Parse one ``Received`` header value; fields it cannot find are ``None``."""
    text = " ".join(value.split())
    clauses, semicolon, date_part = text.rpartition(";")
    if not semicolon:
        clauses, date_part = text, ""
    tokens = _strip_comments(clauses).split()
    found: dict[str, str] = {}
    for position, token in enumerate(tokens[:-1]):
        key = token.lower()
        if key in ("from", "by", "with", "id", "for") and key not in found:
            found[key] = tokens[position + 1]
    timestamp: datetime | None = None
    date_text = _strip_comments(date_part).strip()
    if date_text:
        try:
            timestamp = parsedate_to_datetime(date_text)
        except (ValueError, TypeError, IndexError, OverflowError):
            timestamp = None
    with_ = found.get("with")
    tls = (with_ or "").upper() in _TLS_PROTOCOLS or bool(_TLS_COMMENT.search(text))
    recipient = found.get("for")
    return ReceivedHop(
        from_=found.get("from"),
        by=found.get("by"),
        with_=with_,
        for_=recipient.strip("<>") if recipient else None,
        id=found.get("id"),
        timestamp=timestamp,
        tls=tls,
        raw=text,
    )


def header_block(head: bytes, rest: bytes) -> bytes:
    """The header block of the message ``head + rest`` (through its blank line), where
    ``head`` is whole header fields or nothing: without joining the two (``rest`` may be
    big)."""
    return head + rest[: _body_offset(rest)]


def _body_offset(raw: bytes) -> int:
    """Offset of the first body octet: past the empty line ending the header block, or the
    first line that is not a field (roundtrip/_headerblock.py).

    A bare CR ends a line here too (``bare_cr``), unlike IMAP: the body is handed to the
    email package and hashed, so it starts where that package's parser starts it
    (email/feedparser.py, ``NLCRE``).
    """
    return header_bounds(raw, bare_cr=True)[1]


def _decode_text(data: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        # The charset name comes from the message: an unknown one raises LookupError, one
        # with a NUL in it ValueError ("embedded null character"), "idna", "punycode" or
        # "undefined" UnicodeError (all ValueErrors, but not UnicodeDecodeError).
        try:
            return data.decode(candidate)
        except (LookupError, ValueError):
            continue
    return data.decode("utf-8", "replace")


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except _PARSE_ERRORS:
        return None
    if name is None:
        return None
    name = _unsurrogate(str(name))
    if "=?" in name:
        with contextlib.suppress(*_PARSE_ERRORS):
            name = str(make_header(decode_header(name)))
    return name


def _header_text(part: Message, name: str) -> str | None:
    try:
        value = part.get(name)
    except _PARSE_ERRORS:
        return None
    return None if value is None else _unsurrogate(_unfold(str(value))).strip()


def _leaf_data(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            try:
                serialized: bytes = inner[0].as_bytes()
                return serialized
            except (RecursionError, *_PARSE_ERRORS):
                return b""
        return b""
    try:
        data = part.get_payload(decode=True)
    except _PARSE_ERRORS:
        return b""
    return data if isinstance(data, bytes) else b""


def _leaves(root: Message) -> list[tuple[Message, str]]:
    """MIME leaves in document order with their parent's content type, without recursion."""
    leaves: list[tuple[Message, str]] = []
    stack: list[tuple[Message, str]] = [(root, "")]
    while stack:
        part, parent = stack.pop()
        content_type = part.get_content_type()
        if part.is_multipart() and content_type != "message/rfc822":
            children = part.get_payload()
            if isinstance(children, list):
                stack.extend(
                    (child, content_type)
                    for child in reversed(children)
                    if isinstance(child, Message)
                )
            continue
        leaves.append((part, parent))
    return leaves


class _Mime:
    """The MIME structure of a message: its primary text and HTML bodies, its parts, its
    links, or why the email package could not parse it (``ReceivedMessage`` attributes)."""

    __slots__ = ("attachments", "html", "html_text", "inline_parts", "links", "parse_error", "text")

    def __init__(self, raw: bytes) -> None:
        self.parse_error: str | None = None
        parser = BytesParser(policy=_POLICY)
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[Attachment] = []
        self.inline_parts: list[Attachment] = []
        msg: Message | None = None
        try:
            msg = parser.parsebytes(raw)
        except RecursionError:
            self.parse_error = (
                "MIME structure too deeply nested for the email package (RecursionError); "
                "only headers and raw bytes are available"
            )
        except _PARSE_ERRORS as exc:
            # The feed parser reads every part's Content-Type, and the email package's
            # header parser (Python 3.11-3.13) raises on some malformed ones: "; name*" at
            # the end gives IndexError, an RFC 2231 charset with a NUL ValueError, an odd
            # RFC 2231 UTF-16 value UnicodeDecodeError. compat32 does not parse them.
            self.parse_error = (
                f"the email package could not parse the MIME structure "
                f"({type(exc).__name__}: {exc}); only headers and raw bytes are available"
            )
        if msg is not None:
            self._collect_parts(msg)
        scan = _HTMLScan()
        if self.html is not None:
            # html.parser raises on some malformed markup: AssertionError for an unknown
            # marked section ("<![x["), ValueError for a decimal character reference of more
            # than 4300 digits (int's str-conversion limit). Keep what was found so far.
            with contextlib.suppress(AssertionError, ValueError):
                scan.feed(self.html)
                scan.close()
        self.html_text = "".join(scan.text)
        links = _text_links(self.text or "") + scan.links
        self.links: list[str] = list(dict.fromkeys(links))

    def _collect_parts(self, msg: Message) -> None:
        for part, _parent in _leaves(msg):
            content_type = part.get_content_type()
            try:
                disposition = part.get_content_disposition()
            except _PARSE_ERRORS:
                disposition = None
            filename = _filename(part)
            content_id = _header_text(part, "Content-ID")
            if content_id:
                content_id = content_id.strip("<>").strip() or None
            is_file = disposition == "attachment" or (disposition is None and filename is not None)
            data = _leaf_data(part)

            if content_type in ("text/plain", "text/html") and not is_file:
                try:
                    charset = part.get_content_charset()
                except _PARSE_ERRORS:
                    charset = None
                body = _decode_text(data, charset).replace("\r\n", "\n")
                if content_type == "text/plain" and self.text is None:
                    self.text = body
                    continue
                if content_type == "text/html" and self.html is None:
                    self.html = body
                    continue

            if disposition == "inline":
                inline = True
            elif disposition == "attachment":
                inline = False
            else:
                # No disposition: a cid-referenced part or an unnamed text part is shown
                # in the body; anything else (a signature, a bare blob) is a file.
                inline = content_id is not None or (
                    part.get_content_maintype() == "text" and not is_file
                )
            item = Attachment(
                filename=filename,
                content_type=content_type,
                data=data,
                content_id=content_id,
                inline=inline,
            )
            (self.inline_parts if inline else self.attachments).append(item)


class ReceivedMessage:
    """A message as a mailbox returned it, parsed for assertions.

    The header fields are parsed when the message is made; the MIME structure (``text``,
    ``html``, ``attachments``, ``inline_parts``, ``links``, ``parse_error``) and
    ``body_sha256`` when one of them is first read, so waiting for a message by its headers
    does not decode a big attachment.

    Args:
        raw: the message bytes (``BODY[]`` over IMAP, ``RETR`` over POP3, a stored file).

    Attributes:
        raw: the bytes given.
        headers: decoded :class:`Headers`.
        subject: the decoded Subject (``""`` when absent).
        from_: the first From address, or ``None``.
        sender: the Sender address when there is one, else :attr:`from_` (RFC 5322 3.6.2).
        to: To addresses (groups flattened), in order.
        cc: Cc addresses, in order.
        message_id: the Message-ID as written, angle brackets included, or ``None``.
        date: the Date header as an aware ``datetime``, or ``None`` when absent or invalid.
        text: the primary text/plain body (first non-attachment text/plain part), or ``None``.
        html: the primary text/html body, or ``None``.
        attachments: downloadable parts (``inline`` False), in document order.
        inline_parts: inline non-body parts (cid: images, calendar parts, extra text parts).
        links: URLs in the text body, then href/src values in the HTML body, deduplicated.
        body_sha256: hex SHA-256 of the raw bytes after the header block's blank line.
        received_chain: parsed ``Received`` headers, newest (topmost) first.
        parse_error: why the MIME structure could not be parsed (then only headers and raw
            bytes are available), or ``None``.
    """

    __slots__ = (
        "_mime",
        "_sha",
        "cc",
        "date",
        "from_",
        "headers",
        "message_id",
        "raw",
        "received_chain",
        "sender",
        "subject",
        "to",
    )

    def __init__(self, raw: bytes) -> None:
        self.raw = bytes(raw)
        self._read_header(self.raw[: _body_offset(self.raw)])

    def _read_header(self, head: bytes) -> None:
        """Set the header attributes from ``head``, the header block up to and including the
        blank line. The MIME structure below it is parsed on first use (``_parsed``), so a
        look at the headers of a big message does not decode its parts."""
        msg: Message
        try:
            msg = BytesParser(policy=_POLICY).parsebytes(head, headersonly=True)
        except (RecursionError, *_PARSE_ERRORS):
            msg = BytesParser(policy=policy.compat32).parsebytes(head, headersonly=True)
        self.headers = Headers(
            (name, self._decode_header(name, value)) for name, value in msg.raw_items()
        )
        self.subject = self.headers.get("Subject") or ""
        self.message_id = (self.headers.get("Message-ID") or "").strip() or None
        self.date = self._parse_date(self.headers.get("Date"))
        from_list = self._addresses(msg, "From")
        self.from_ = from_list[0] if from_list else None
        sender_list = self._addresses(msg, "Sender")
        self.sender = sender_list[0] if sender_list else self.from_
        self.to = self._addresses(msg, "To")
        self.cc = self._addresses(msg, "Cc")
        self.received_chain = [parse_received(v) for v in self.headers.get_all("Received")]
        self._mime: _Mime | None = None
        self._sha: str | None = None

    # -- the MIME structure, parsed on first use -----------------------------------------------

    def _parsed(self) -> _Mime:
        """The body parts, parsed once; two threads asking at once both parse, and each gets
        a whole result (one attribute store)."""
        mime = self._mime
        if mime is None:
            mime = self._mime = _Mime(self.raw)
        return mime

    @property
    def text(self) -> str | None:
        return self._parsed().text

    @property
    def html(self) -> str | None:
        return self._parsed().html

    @property
    def attachments(self) -> list[Attachment]:
        return self._parsed().attachments

    @property
    def inline_parts(self) -> list[Attachment]:
        return self._parsed().inline_parts

    @property
    def links(self) -> list[str]:
        return self._parsed().links

    @property
    def parse_error(self) -> str | None:
        return self._parsed().parse_error

    @property
    def _html_text(self) -> str:
        return self._parsed().html_text

    @property
    def body_sha256(self) -> str:
        digest = self._sha
        if digest is None:
            body = memoryview(self.raw)[_body_offset(self.raw) :]  # hashed without a copy
            digest = self._sha = hashlib.sha256(body).hexdigest()
        return digest

    # -- construction helpers -------------------------------------------------------------

    @staticmethod
    def _decode_header(name: str, value: str) -> str:
        if value.isascii() and "=?" not in value and name.lower() not in _STRUCTURED:
            # Unstructured ASCII text without encoded words (RFC 2047) decodes to itself:
            # the email package's parse gives the same string at ~30 us a field, and a
            # delivered message carries a dozen such fields (Received, DKIM-Signature, ...).
            return value.replace("\r", "").replace("\n", "").strip()
        try:
            decoded = str(_header(name, value))
        except _PARSE_ERRORS:
            decoded = value
        return _unsurrogate(_unfold(decoded)).strip()

    @staticmethod
    def _parse_date(value: str | None) -> datetime | None:
        if not value:
            return None
        try:
            return parsedate_to_datetime(value)
        except (ValueError, TypeError, IndexError, OverflowError):
            return None

    @staticmethod
    def _addresses(msg: Message, name: str) -> list[str]:
        found: list[str] = []
        for raw_name, raw_value in msg.raw_items():
            if raw_name.lower() != name.lower():
                continue
            try:
                header = _header(raw_name, raw_value)
                found.extend(_unsurrogate(a.addr_spec) for a in header.addresses)
            except _PARSE_ERRORS:
                text = _unsurrogate(_unfold(raw_value))
                found.extend(addr for _, addr in getaddresses([text]) if addr)
        return [a for a in found if a and a != "<>"]

    # -- assertions helpers ---------------------------------------------------------------

    def find_link(self, pattern: str | re.Pattern[str]) -> str:
        """Return the first link matching ``pattern``.

        A ``str`` pattern matches when it occurs literally in the link or, if it is a valid
        regular expression, when ``re.search`` finds it; a compiled pattern uses ``search``.

        Raises:
            AssertionError: no link matches; the message lists every link found.
        """
        regex: re.Pattern[str] | None
        if isinstance(pattern, str):
            try:
                regex = re.compile(pattern)
            except re.error:
                regex = None
            for link in self.links:
                if pattern in link or (regex is not None and regex.search(link)):
                    return link
            shown = pattern
        else:
            for link in self.links:
                if pattern.search(link):
                    return link
            shown = pattern.pattern
        if self.links:
            listing = "\n".join(f"  - {link}" for link in self.links)
            seen = f"the {len(self.links)} link(s) found:\n{listing}"
        else:
            seen = "the message has no links in its text or HTML body"
        raise AssertionError(f"no link matches {shown!r} in {self.summary()}; {seen}")

    def find_code(self, pattern: str | re.Pattern[str] = DEFAULT_CODE_PATTERN) -> str:
        """Return the first one-time code matching ``pattern`` (six digits by default).

        Looks in the text body, then the HTML body's visible text, then the Subject. With a
        capturing group, the first group is returned, else the whole match.

        Raises:
            AssertionError: nothing matches; the message shows the start of each place searched.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        places = (
            ("text body", self.text or ""),
            ("HTML text", self._html_text),
            ("Subject", self.subject),
        )
        for _, haystack in places:
            match = regex.search(haystack)
            if match:
                return match.group(1) if regex.groups else match.group(0)
        seen = "; ".join(
            f"{where}: {_preview(haystack)}" for where, haystack in places if haystack.strip()
        )
        raise AssertionError(
            f"no code matches {regex.pattern!r} in {self.summary()}; "
            f"searched {seen or 'nothing (the message has no text, HTML or Subject)'}"
        )

    @property
    def size(self) -> int:
        """Length of :attr:`raw` in bytes."""
        return len(self.raw)

    @property
    def auth(self) -> AuthResults:
        """The topmost Authentication-Results field, parsed (``msg.auth.dkim[0].result``);
        empty when the message has none."""
        values = self.headers.get_all("Authentication-Results")
        return parse_auth_results(values[0]) if values else AuthResults()

    @property
    def body(self) -> bytes:
        """The raw bytes after the header block (what :attr:`body_sha256` hashes)."""
        return self.raw[_body_offset(self.raw) :]

    def summary(self) -> str:
        """One line: ``from -> to: subject (N bytes)``."""
        recipients = ", ".join(self.to + self.cc) or "<no recipients>"
        subject = " ".join(self.subject.split()) or "<no subject>"
        return f"{self.from_ or '<no sender>'} -> {recipients}: {subject} ({self.size} bytes)"

    def __repr__(self) -> str:
        return f"<ReceivedMessage {self.summary()}>"


def _preview(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")
