"""What the web view's JSON API answers, as plain dicts built from the stack and its store.

Nothing here knows HTTP: ``_app.py`` calls these functions (in a worker thread, since parsing
a message is CPU work that must not stall the stack's servers) and serialises the result. The
data is the Python API's: mailboxes and messages come from ``Store``, parsed with
``DeliveredMessage`` (``roundtrip/message.py``), the journey from ``MailStack.journey`` and
the relay queue from ``MailStack.relay_queue``.
"""

from __future__ import annotations

import contextlib
import email.utils
import html
import logging
import re
import time
from collections.abc import Callable
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import Any

from ..errors import MailboxError
from ..message import Attachment
from ..stack import OUTBOUND_ADDRESS, DeliveredMessage, MailStack
from ..store import StoredMessage

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "NotFoundError",
    "delete_message",
    "empty_mailbox",
    "html_of",
    "journey",
    "mailboxes",
    "message_detail",
    "message_list",
    "part_of",
    "queue",
    "stored_message",
]

#: Messages per page of a list unless ``limit`` says otherwise, and the most one page holds.
DEFAULT_PAGE = 50
MAX_PAGE = 500
# A MIME tree deeper than this is cut (message.py walks leaves without recursion for the
# same reason: hostile nesting, docs/security.md A5.5).
_MAX_TREE_DEPTH = 50
_MAX_TREE_NODES = 2000
# What our Received lines say about TLS (roundtrip/protocols/smtp.py trace field), and
# Postfix's equivalent: "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))".
_TLS_FACTS = re.compile(r"using (TLSv?[\d.]+) with cipher ([A-Za-z0-9_-]+)")
log = logging.getLogger("roundtrip.web")


class NotFoundError(Exception):
    """No such user, mailbox, message or part; the text says which."""


def _mailbox(stack: MailStack, user: str, folder: str) -> Any:
    try:
        return stack.store.mailbox(user, folder)
    except MailboxError as exc:
        raise NotFoundError(f"no mailbox {folder!r} of {user!r}: {exc}") from None


def stored_message(stack: MailStack, user: str, folder: str, uid: int) -> StoredMessage:
    """The message ``uid`` of ``user``'s ``folder``.

    Raises:
        NotFoundError: no such user, mailbox or UID.
    """
    found = _mailbox(stack, user, folder).get(uid)
    if found is None:
        raise NotFoundError(f"no message with UID {uid} in {user} {folder}")
    assert isinstance(found, StoredMessage)
    return found


def mailboxes(stack: MailStack) -> dict[str, Any]:
    """Every domain, and every mailbox of every user with its total and unread counts."""
    domains: dict[str, list[dict[str, Any]]] = {d.lower(): [] for d in stack.config.domains}
    outbound: list[dict[str, Any]] = []
    for user in stack.store.users():
        boxes = [
            {
                "user": user,
                "folder": box.name,
                "total": len(box),
                "unread": box.unseen,
                "outbound": user == OUTBOUND_ADDRESS,
            }
            for box in stack.store.mailboxes(user)
        ]
        if user == OUTBOUND_ADDRESS:
            outbound.extend(boxes)
            continue
        domain = user.rpartition("@")[2]
        domains.setdefault(domain, []).extend(boxes)
    return {
        "domains": [{"name": name, "mailboxes": boxes} for name, boxes in domains.items()],
        "outbound": outbound,
        "queue": queue(stack)["queue"],
    }


def queue(stack: MailStack) -> dict[str, Any]:
    """The relay queue: each entry with its next attempt (seconds since the epoch and from
    now) and the last temporary failure, verbatim."""
    now = time.time()
    entries = []
    for entry in stack.relay_queue():
        entries.append(
            {
                "id": entry.id,
                "mail_from": entry.mail_from,
                "rcpt": list(entry.rcpt),
                "attempts": entry.attempts,
                "next_attempt": entry.next_attempt,
                "next_attempt_in": (
                    None if entry.next_attempt is None else round(entry.next_attempt - now, 3)
                ),
                "last_error": entry.last_error,
                "received_at": entry.received_at,
                "delivered": list(entry.delivered),
                "bounced": list(entry.bounced),
            }
        )
    return {"queue": entries}


def _text(value: object) -> str:
    """A header value as text, whatever it is: RFC 2047 words decoded, RFC 6532 UTF-8 kept,
    undecodable octets replaced, unfolded. Never raises.

    ``value`` is normally a raw ``str`` from :func:`_raw_values` (undecodable octets as
    surrogate escapes, as ``email.parser.BytesParser`` stores them); anything else (an
    ``email.header.Header``, which ``compat32``'s ``Message.get`` returns for 8-bit
    values) is turned into text with ``str()`` first.
    """
    if value is None:
        return ""
    try:
        text = value if isinstance(value, str) else str(value)
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except Exception:  # a value no str() can read: shown as nothing rather than a 500
        return ""
    if "=?" in text:
        # email.policy.default's unstructured reading decodes encoded words leniently:
        # adjacent words (one character split across two, RFC 2047 section 5) are joined,
        # an unknown charset or bad base64 becomes a defect, and 8-bit text beside a word
        # is kept. A parser bug must not cost the listing: then the text stays as it is.
        try:
            text = str(policy.default.header_factory("subject", text))
        except Exception:
            pass
    return " ".join(text.split())


def _raw_values(msg: Message, name: str) -> list[str]:
    """Every ``name`` field's value as stored (``Message.raw_items``): a ``str`` even
    when the field has 8-bit octets, where ``compat32``'s ``get`` gives a ``Header``."""
    wanted = name.lower()
    return [v if isinstance(v, str) else str(v) for k, v in msg.raw_items() if k.lower() == wanted]


def _addresses(msg: Message, name: str) -> tuple[list[str], list[str]]:
    """The addresses of every ``name`` field, and their display names decoded.

    The field is split into mailboxes before any encoded word is decoded: a decoded name
    may hold a comma or an angle bracket (``Müller, Jürgen``) that would split it again.
    """
    try:
        pairs = email.utils.getaddresses(_raw_values(msg, name))
    except Exception:  # getaddresses is not meant to raise; one message must not break a list
        return [], [_text(v) for v in _raw_values(msg, name)]
    addresses, names = [], []
    for display, address in pairs:
        address = _text(address)
        if address:
            addresses.append(address)
        if display and (decoded := _text(display)):
            names.append(decoded)
    return addresses, names


def _body_texts(msg: Message) -> tuple[list[str], int]:
    """The decoded text parts (for the preview and the search) and how many attachments."""
    texts: list[str] = []
    files = 0
    for index, part in enumerate(msg.walk()):
        if index > _MAX_TREE_NODES or part.is_multipart():
            continue
        try:
            disposition = part.get_content_disposition()
            filename = part.get_filename()
        except (ValueError, LookupError, TypeError, AttributeError):
            disposition, filename = None, None
        if disposition == "attachment" or (disposition is None and filename is not None):
            files += 1
        elif part.get_content_maintype() == "text":
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    texts.append(data.decode(charset, "replace"))
                except LookupError:
                    texts.append(data.decode("utf-8", "replace"))
    return texts, files


def _light(stored: StoredMessage) -> dict[str, Any]:
    """What a list row and the search need, from a quick parse (cached with the message).

    The list must answer in a few milliseconds however full the mailbox, and the full
    ``DeliveredMessage`` parse (``email.policy.default`` header objects) costs some 50 times
    more than the ``compat32`` parse used here; the message view uses the full one.

    Never raises: a message some part of which cannot be read is listed with the rest (its
    envelope at least), so one odd message never turns a whole listing into an error.
    """
    cached = stored.cache.get("web")
    if isinstance(cached, dict):
        return cached
    try:
        light = _read_light(stored)
    except Exception:
        log.warning("web view: cannot summarise %s UID %s", stored.user, stored.uid, exc_info=True)
        light = _fallback_light(stored)
    stored.cache["web"] = light
    return light


def _fallback_light(stored: StoredMessage) -> dict[str, Any]:
    """A row for a message whose parse failed: the envelope, and the subject if a
    headers-only parse can read it."""
    subject = ""
    with contextlib.suppress(Exception):
        head = BytesParser(policy=policy.compat32).parsebytes(stored.raw, headersonly=True)
        subject = next((_text(v) for v in _raw_values(head, "Subject")), "")
    return {
        "subject": subject,
        "from": None,
        "to": [],
        "cc": [],
        "date": None,
        "attachments": 0,
        "preview": "",
        "haystack": "\n".join([subject, stored.envelope_from, *stored.envelope_to]).lower(),
    }


def _read_light(stored: StoredMessage) -> dict[str, Any]:
    try:
        msg = BytesParser(policy=policy.compat32).parsebytes(stored.raw)
    except RecursionError:  # hostile nesting (docs/security.md A5.5): headers only
        msg = BytesParser(policy=policy.compat32).parsebytes(stored.raw, headersonly=True)

    date = None
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        date = email.utils.parsedate_to_datetime(_text(next(iter(_raw_values(msg, "Date")), "")))
    try:
        texts, files = _body_texts(msg)
    except Exception:  # a body part the parser cannot read: the headers are still listed
        log.warning("web view: cannot read the body of %s UID %s", stored.user, stored.uid)
        texts, files = [], 0
    subject = next((_text(v) for v in _raw_values(msg, "Subject")), "")
    (sender, sender_names), (to, to_names), (cc, cc_names) = (
        _addresses(msg, name) for name in ("From", "To", "Cc")
    )
    return {
        "subject": subject,
        "from": sender[0] if sender else None,
        "to": to,
        "cc": cc,
        "date": date.isoformat() if date else None,
        "attachments": files,
        "preview": " ".join((texts[0] if texts else "").split())[:120],
        "haystack": "\n".join(
            [
                subject,
                *sender,
                *to,
                *cc,
                # docs/web.md: From, To and Cc are searched with encoded words decoded, and
                # only a display name can hold one (RFC 2047 section 5).
                *sender_names,
                *to_names,
                *cc_names,
                stored.envelope_from,
                *stored.envelope_to,
                *texts,
            ]
        ).lower(),
    }


def _summary(stored: StoredMessage) -> dict[str, Any]:
    light = _light(stored)
    return {
        "uid": stored.uid,
        "user": stored.user,
        "folder": stored.mailbox,
        "subject": light["subject"],
        "from": light["from"],
        "to": light["to"],
        "cc": light["cc"],
        "envelope_from": stored.envelope_from,
        "envelope_to": list(stored.envelope_to),
        "date": light["date"],
        "internal_date": stored.internal_date,
        "size": stored.size,
        "seen": "\\Seen" in stored.flags,
        "attachments": light["attachments"],
        "preview": light["preview"],
    }


def _matches(stored: StoredMessage, needle: str) -> bool:
    return needle in _light(stored)["haystack"]


def message_list(
    stack: MailStack,
    user: str,
    folder: str,
    *,
    offset: int = 0,
    limit: int = DEFAULT_PAGE,
    query: str = "",
) -> dict[str, Any]:
    """One page of a mailbox, newest (highest UID) first.

    Only the page's messages are read, unless ``query`` asks to search: then every message
    is (once; what the search needs is cached with the message). The search is a case-insensitive
    substring of the subject, From, To, Cc, the envelope, the text or the HTML body.

    Raises:
        NotFoundError: no such user or mailbox.
    """
    box = _mailbox(stack, user, folder)
    uids = box.uids()
    uids.reverse()
    limit = max(1, min(limit, MAX_PAGE))
    offset = max(0, offset)
    needle = query.strip().lower()
    if needle:
        found = [m for m in (box.get(u) for u in uids) if m is not None and _matches(m, needle)]
        total = len(found)
        page = found[offset : offset + limit]
    else:
        total = len(uids)
        page = [m for m in (box.get(u) for u in uids[offset : offset + limit]) if m is not None]
    return {
        "user": box.user,
        "folder": box.name,
        "total": total,
        "offset": offset,
        "limit": limit,
        "query": query,
        "messages": [_summary(m) for m in page],
    }


def _mime_tree(raw: bytes) -> dict[str, Any] | None:
    """The MIME structure, walked without recursion; ``None`` when it cannot be parsed."""
    try:
        root = BytesParser(policy=policy.default).parsebytes(raw)
    except RecursionError:
        return None
    nodes = 0

    def node(part: Message, path: str) -> dict[str, Any]:
        try:
            disposition = part.get_content_disposition()
            filename = part.get_filename()
        except (ValueError, LookupError, TypeError, AttributeError):
            disposition, filename = None, None
        payload = part.get_payload()
        size = len(payload) if isinstance(payload, (str, bytes)) else None
        return {
            "path": path,
            "content_type": part.get_content_type(),
            "charset": part.get_content_charset(),
            "disposition": disposition,
            "filename": None if filename is None else str(filename),
            "encoding": part.get("Content-Transfer-Encoding"),
            "encoded_size": size,  # as transmitted (before base64 or QP decoding)
            "children": [],
        }

    top = node(root, "1")
    stack: list[tuple[Message, dict[str, Any], int]] = [(root, top, 0)]
    while stack:
        part, out, depth = stack.pop()
        children = part.get_payload()
        if not part.is_multipart() or not isinstance(children, list):
            continue
        if depth >= _MAX_TREE_DEPTH or nodes >= _MAX_TREE_NODES:
            out["truncated"] = True
            continue
        for index, child in enumerate(children, 1):
            if not isinstance(child, Message):
                continue
            nodes += 1
            made = node(child, f"{out['path']}.{index}")
            out["children"].append(made)
            stack.append((child, made, depth + 1))
    return top


def _parts(msg: DeliveredMessage) -> list[Attachment]:
    """Attachments, then inline parts: the index of a part in the API."""
    return [*msg.attachments, *msg.inline_parts]


def journey(stack: MailStack, stored: StoredMessage) -> dict[str, Any]:
    """Each hop of the message: the stack's step timings (``MailStack.journey``) and the
    message's own ``Received`` fields, oldest first, with the TLS each one records."""
    msg = DeliveredMessage.of(stored)
    steps = [
        {"step": h.step, "host": h.host, "at": round(h.at, 6)}
        for h in (stack.journey(msg.message_id) if msg.message_id else [])
    ]
    hops = []
    for hop in reversed(msg.received_chain):
        facts = _TLS_FACTS.search(hop.raw)
        hops.append(
            {
                "from": hop.from_,
                "by": hop.by,
                "with": hop.with_,
                "id": hop.id,
                "for": hop.for_,
                "time": hop.timestamp.isoformat() if hop.timestamp else None,
                "tls": hop.tls,
                "tls_version": facts.group(1) if facts else None,
                "cipher": facts.group(2) if facts else None,
                "raw": hop.raw,
            }
        )
    auth = msg.auth
    return {
        "message_id": msg.message_id,
        "steps": steps,
        "received": hops,
        "spam": {
            name: value
            for name in ("X-Spam-Flag", "X-Spam-Status", "X-Spam-Score")
            if (value := msg.headers.get(name)) is not None
        },
        "auth": {
            "authserv_id": auth.authserv_id,
            "results": [
                {"method": r.method, "result": r.result, "reason": r.reason} for r in auth.results
            ],
            "error": auth.error,
        },
    }


def message_detail(stack: MailStack, user: str, folder: str, uid: int) -> dict[str, Any]:
    """Everything about one message: summary, headers, text, whether it has HTML, its
    attachments and inline parts (with the index to download them), the MIME tree and the
    journey.

    Raises:
        NotFoundError: no such user, mailbox or message.
    """
    stored = stored_message(stack, user, folder, uid)
    msg = DeliveredMessage.of(stored)
    parts = [
        {
            "index": index,
            "filename": part.filename,
            "content_type": part.content_type,
            "size": part.size,
            "content_id": part.content_id,
            "inline": part.inline,
        }
        for index, part in enumerate(_parts(msg))
    ]
    return {
        **_summary(stored),
        # The full parse's reading, as the Python API gives it (the list uses a quick one).
        "subject": msg.subject,
        "from": msg.from_,
        "to": msg.to,
        "cc": msg.cc,
        "date": msg.date.isoformat() if msg.date else None,
        "attachments": len(msg.attachments),
        "message_id": msg.message_id,
        "flags": sorted(stored.flags),
        "headers": [[name, value] for name, value in msg.headers.items()],
        "text": msg.text,
        "has_html": msg.html is not None,
        "parts": parts,
        "mime": _mime_tree(stored.raw),
        "parse_error": msg.parse_error,
        "journey": journey(stack, stored),
    }


def html_of(stored: StoredMessage, part_url: Callable[[int], str]) -> str:
    """The HTML body of ``stored``, with each ``cid:`` reference replaced by
    ``part_url(index)`` of the part it names (RFC 2392), so inline images show without any
    remote request.

    ``part_url`` is the only thing of the view written into the message's HTML, which is
    hostile: it must not hold anything that grants more than that part.

    Raises:
        NotFoundError: the message has no HTML body.
    """
    msg = DeliveredMessage.of(stored)
    if msg.html is None:
        raise NotFoundError(
            f"message {stored.uid} of {stored.user} {stored.mailbox} has no HTML body"
        )
    by_cid = {p.content_id: i for i, p in enumerate(_parts(msg)) if p.content_id}
    if not by_cid:
        return msg.html

    def link(match: re.Match[str]) -> str:
        index = by_cid.get(match.group(2))
        if index is None:
            return match.group(0)
        return match.group(1) + html.escape(part_url(index), quote=True)

    return re.sub(r"""(["'])cid:([^"'\s>]+)""", link, msg.html)


def part_of(stored: StoredMessage, index: int) -> Attachment:
    """Part ``index`` of :func:`message_detail`'s ``parts``.

    Raises:
        NotFoundError: no such part.
    """
    parts = _parts(DeliveredMessage.of(stored))
    if not 0 <= index < len(parts):
        raise NotFoundError(
            f"message {stored.uid} has {len(parts)} part(s); there is no part {index}"
        )
    return parts[index]


def delete_message(stack: MailStack, user: str, folder: str, uid: int) -> None:
    """Remove one message, as an IMAP EXPUNGE does.

    Raises:
        NotFoundError: no such message.
    """
    stored_message(stack, user, folder, uid)
    stack.store.expunge(user, folder, [uid])


def empty_mailbox(stack: MailStack, user: str, folder: str) -> int:
    """Remove every message of one mailbox; returns how many.

    Raises:
        NotFoundError: no such mailbox.
    """
    box = _mailbox(stack, user, folder)
    return len(stack.store.expunge(user, box.name, box.uids()))
