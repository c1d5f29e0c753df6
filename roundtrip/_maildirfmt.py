"""The on-disk formats of ``MaildirStore``, as pure functions: no file is opened here.

- Message file names: ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>,S=<size>[:2,<info>]``
  (cr.yp.to/proto/maildir.html), where ``<info>`` holds the letters of the IMAP system flags.
  Letters we do not model (P, keyword letters of other tools) are kept as found.
- Folder name parts: modified UTF-7 (RFC 3501 5.1.3) with ``\\`` written ``\\5c`` and ``.``
  written ``\\2e`` (Dovecot's listescape style), so no two names share a directory; joining
  the parts (``A/B`` -> ``.A.B``) is ``maildir.folder_dirname``, which also knows the store's
  naming rules. A name without ``\\`` is written as before ``\\`` was allowed in names.
- ``roundtrip-uidlist``: JSON lines. The first holds UIDVALIDITY, UIDNEXT and SPECIAL-USE;
  each later line is one record: a UID for a file (``uid``, ``file``, ``date``, optional
  ``from``, ``to``, ``kw``) or new keywords of a UID (``uid``, ``kw``). A line that does not
  parse (a torn last line after a crash) is skipped: the message files decide. Logs written
  before ``roundtrip-subscriptions`` existed also hold the folder's subscription
  (``subscribed``, in the first line or as a record); it is read once, to build that file.
- ``roundtrip-subscriptions``: one JSON object, ``{"roundtrip-subscriptions": 1, "names":
  [...]}``, the user's subscribed names (RFC 3501 6.3.6), whether those mailboxes exist or
  not. It is replaced whole (temporary file, fsync, rename) on every change.
- User directories: the lower-cased address itself, refused when it could name anything but
  one plain entry under the root (docs/security.md A6.5).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import MailboxError

#: IMAP system flags and their maildir info letters (cr.yp.to/proto/maildir.html).
FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {letter: flag for flag, letter in FLAG_LETTERS.items()}

#: The per-folder metadata log (UIDVALIDITY, UIDNEXT, filename -> UID, keywords, envelope).
LOG_NAME = "roundtrip-uidlist"
#: The per-user subscription list, in the user's directory (next to INBOX's log).
SUBSCRIPTIONS_NAME = "roundtrip-subscriptions"
#: What separates a message file's unique part from its flag letters.
INFO = ":2,"
#: File names that ``unique_name`` makes (so ``tmp/`` leftovers of ours are recognised).
OUR_FILE = re.compile(r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.")
#: The longest file name most file systems take, in bytes.
MAX_COMPONENT = 255


def unique_name(size: int, host: str, serial: int) -> str:
    """A new message file name (without flags): unique per host, process and ``serial``."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{serial}R{secrets.token_hex(6)}.{host},S={size}"


def hostname() -> str:
    """This host's name with ``/``, ``:`` and ``,`` escaped, as the maildir spec asks."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def flags_from_info(info: str) -> frozenset[str]:
    return frozenset(LETTER_FLAGS[c] for c in info if c in LETTER_FLAGS)


def info_for(flags: Iterable[str], old_info: str = "") -> str:
    """The info letters of ``flags``, keeping letters of ``old_info`` that are not ours."""
    letters = {FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS}
    letters |= {c for c in old_info if c not in LETTER_FLAGS}
    return "".join(sorted(letters))


def keywords(flags: Iterable[str]) -> list[str]:
    """The flags that have no info letter: they live in the uidlist."""
    return sorted(f for f in flags if f not in FLAG_LETTERS)


# ``\`` is the escape character and is escaped itself: every ``\`` in a result starts one of
# these two escapes, so decoding is unambiguous ("a\2eb" and "a.b" get different directories).
_ESCAPES = {"\\": "\\5c", ".": "\\2e"}
_UNESCAPES = {code: char for char, code in _ESCAPES.items()}
_ESCAPE_RE = re.compile(r"\\(?:5c|2e)|\\")


def encode_part(part: str) -> str:
    """One folder name part as a directory name part (no ``.`` and no ``/`` in the result)."""
    return "".join(_ESCAPES.get(c, c) for c in _encode_mutf7(part))


def decode_part(text: str) -> str:
    """The inverse of ``encode_part``.

    Raises:
        ValueError: (or ``binascii.Error``, ``UnicodeDecodeError``) not something we wrote,
            such as a ``\\`` that starts neither escape.
    """

    def unescape(found: re.Match[str]) -> str:
        char = _UNESCAPES.get(found.group())
        if char is None:
            raise ValueError(f"stray backslash in folder name {text!r}")
        return char

    return _decode_mutf7(_ESCAPE_RE.sub(unescape, text))


def _encode_mutf7(name: str) -> str:
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _decode_mutf7(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "&":
            out.append(text[i])
            i += 1
            continue
        end = text.index("-", i + 1)  # ValueError: not ours
        chunk = text[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            raw = chunk.replace(",", "/")
            data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
            out.append(data.decode("utf-16-be"))
        i = end + 1
    return "".join(out)


def check_user_dirname(key: str) -> None:
    """Refuse addresses that are not a plain directory name under ROOT (docs/security.md A6.5).

    Raises:
        MailboxError: code ``CANNOT``.
    """
    bad = (
        not key
        or key.startswith((".", "~"))
        or any(c in key for c in "/\\")
        or any(ord(c) < 0x20 or c == "\x7f" for c in key)
        or len(key.encode("utf-8", "surrogatepass")) > MAX_COMPONENT
    )
    if bad:
        raise MailboxError(f"address {key!r} cannot be stored as a maildir", code="CANNOT")


def dumps(obj: dict[str, Any]) -> bytes:
    """One uidlist line."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


@dataclass(slots=True)
class Uidlist:
    """What a ``roundtrip-uidlist`` says, live records only."""

    #: The first line (empty when the log is missing or its first line is damaged).
    header: dict[str, Any] = field(default_factory=dict)
    #: The record of each file, by the file name's unique part.
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Keywords set after delivery, by UID (newest wins).
    keywords: dict[int, list[str]] = field(default_factory=dict)
    #: Record lines after the header, live or dead (compaction is due when most are dead).
    count: int = 0
    uidnext: int = 1
    #: The subscription of a log written before ``roundtrip-subscriptions`` existed.
    subscribed: bool = True


def parse_uidlist(data: bytes) -> Uidlist:
    """Read a uidlist, skipping lines that do not parse."""
    out = Uidlist()
    for index, line in enumerate(data.split(b"\n")):
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a torn last line (crash mid-append), or damage: the files decide
        if not isinstance(item, dict):
            continue
        if index == 0 and "roundtrip-uidlist" in item:
            out.header = item
            out.uidnext = max(out.uidnext, int(item.get("uidnext", 1)))
            out.subscribed = bool(item.get("subscribed", True))
        elif "file" in item and "uid" in item:
            out.records[str(item["file"])] = item
            out.uidnext = max(out.uidnext, int(item["uid"]) + 1)
            out.count += 1
        elif "uid" in item and "kw" in item:
            out.keywords[int(item["uid"])] = [str(k) for k in item["kw"]]
            out.count += 1
        elif "subscribed" in item:
            out.subscribed = bool(item["subscribed"])
            out.count += 1
    return out


def dump_subscriptions(names: Iterable[str]) -> bytes:
    """The ``roundtrip-subscriptions`` file holding ``names``."""
    return dumps({"roundtrip-subscriptions": 1, "names": sorted(names)})


def parse_subscriptions(data: bytes) -> list[str] | None:
    """The names of a ``roundtrip-subscriptions`` file; None when it is not one of ours."""
    try:
        item = json.loads(data)
    except ValueError:
        return None
    if not isinstance(item, dict) or "roundtrip-subscriptions" not in item:
        return None
    names = item.get("names")
    if not isinstance(names, list):
        return None
    return [n for n in names if isinstance(n, str)]
