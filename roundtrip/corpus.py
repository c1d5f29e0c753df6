"""The regression corpus: sample messages that every round trip must carry intact.

The corpus is a directory of ``*.eml`` files in SMTP canonical form (CRLF line endings) with an
``INDEX.tsv`` next to them. Each index line is ``file<TAB>one-line description``, optionally
followed by ``<TAB>flags`` (comma-separated); lines starting with ``#`` are comments. Flags:

``no-final-newline``
    the file does not end in CRLF; an SMTP client must append one, so the delivered message
    is ``raw + b"\\r\\n"``.
``bare-lf`` / ``bare-cr``
    the file holds an LF or CR outside a CRLF pair; a server may reject or normalise it
    (docs/security.md, A2.2), so it is not expected to arrive byte for byte when sent as is
    (``roundtrip.testing.roundtrip_eml`` converts it to CRLF first by default).
``8bitmime`` / ``smtputf8``
    the message needs that SMTP extension to travel unchanged.

The project's own corpus lives in ``fixtures/corpus`` of a source checkout, and a copy ships
in the package as ``roundtrip/_corpus``; :func:`corpus_dir` finds the first, else the second,
so ``corpus_params()`` works from a checkout and from an installed wheel alike.

Messages too big to commit (10 MB, 40 MB) are built on demand by :func:`large_message`, and
hostile deep nesting by :func:`nested_message`. Everything here is deterministic.

Use with pytest (this module does not import pytest)::

    @pytest.mark.parametrize("message", corpus_params(), ids=str)
    def test_corpus_roundtrip(message): ...
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path

from ._headerblock import header_bounds
from .errors import ConfigError

__all__ = [
    "BYTE_IDENTICAL_BLOCKERS",
    "CorpusMessage",
    "corpus_dir",
    "corpus_params",
    "iter_corpus",
    "large_message",
    "large_payload",
    "load",
    "nested_message",
    "read_index",
]

#: Flags that mean "this message is not expected to arrive byte-identically".
BYTE_IDENTICAL_BLOCKERS = frozenset({"no-final-newline", "bare-lf", "bare-cr"})

INDEX_NAME = "INDEX.tsv"
_PACKAGED = Path(__file__).resolve().parent / "_corpus"  # package data, see pyproject.toml
_LARGE_LINE = 76  # RFC 2045 section 6.8: base64 lines of at most 76 characters


@dataclass(frozen=True, slots=True)
class CorpusMessage:
    """One corpus file.

    Attributes:
        name: the file name (``"11-attachment-pdf.eml"``); also ``str(message)``, so
            ``ids=str`` gives readable pytest ids.
        path: where it was read from.
        raw: the exact bytes of the file.
        description: the one-line description from ``INDEX.tsv`` (``""`` when not indexed).
        flags: the flags from ``INDEX.tsv`` (see the module docstring).
    """

    name: str
    path: Path
    raw: bytes = field(repr=False)
    description: str = ""
    flags: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.name

    @property
    def byte_identical(self) -> bool:
        """True when the message must arrive exactly as stored (no blocker flag)."""
        return not (self.flags & BYTE_IDENTICAL_BLOCKERS)

    @property
    def expected_delivery(self) -> bytes:
        """The bytes a correct SMTP path delivers: ``raw``, plus CRLF if it lacks a final one."""
        if "no-final-newline" in self.flags and not self.raw.endswith(b"\n"):
            return self.raw + b"\r\n"
        return self.raw

    @property
    def needs_smtputf8(self) -> bool:
        """True when the message carries UTF-8 addresses or headers (RFC 6531/6532)."""
        return "smtputf8" in self.flags

    @property
    def header_recipients(self) -> list[str]:
        """Addresses in To and Cc, in order (for building an envelope; groups are flattened)."""
        head = _header_block(self.raw).decode("utf-8", "replace")
        values: list[str] = []
        current: str | None = None
        for line in head.splitlines():
            if line[:1] in (" ", "\t") and current is not None:
                values[-1] += line
                continue
            name, sep, value = line.partition(":")
            current = name.strip().lower() if sep else None
            if current in ("to", "cc"):
                values.append(value)
            else:
                current = None
        return [addr for _, addr in getaddresses(values) if "@" in addr]


def corpus_dir() -> Path:
    """Return the project's corpus directory.

    In a source checkout (or an editable install) that is ``<checkout>/fixtures/corpus``,
    the copy that is edited; elsewhere, such as an installed wheel, the copy shipped inside
    the package (``roundtrip/_corpus``, kept equal to the checkout's by a test).
    """
    checkout = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
    if (checkout / INDEX_NAME).is_file():
        return checkout
    return _PACKAGED


def load(path: str | Path) -> bytes:
    """Return the exact bytes of one message file (no line-ending translation)."""
    return Path(path).read_bytes()


def _read_index(directory: Path) -> dict[str, tuple[str, frozenset[str]]]:
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        return {}
    entries: dict[str, tuple[str, frozenset[str]]] = {}
    for line in index_path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition("\t")
        description, _, flag_text = rest.partition("\t")
        flags = frozenset(f.strip() for f in flag_text.split(",") if f.strip())
        entries[name.strip()] = (description.strip(), flags)
    return entries


def read_index(directory: str | Path | None = None) -> dict[str, tuple[str, frozenset[str]]]:
    """Return ``{file name: (description, flags)}`` from a corpus directory's ``INDEX.tsv``.

    Returns an empty dict when the directory has no index.
    """
    return _read_index(Path(directory) if directory is not None else corpus_dir())


def iter_corpus(directory: str | Path | None = None, pattern: str = "*.eml") -> list[CorpusMessage]:
    """Load every message matching ``pattern`` in ``directory``, sorted by file name.

    Args:
        directory: a directory of messages; the project corpus (:func:`corpus_dir`) by default.
        pattern: a glob, matched in that directory only (not recursively).

    Returns:
        One :class:`CorpusMessage` per file, with descriptions and flags from ``INDEX.tsv``
        when the directory has one.

    Raises:
        FileNotFoundError: the directory does not exist.
    """
    path = Path(directory) if directory is not None else corpus_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"corpus directory {str(path)!r} does not exist; pass the directory of your "
            ".eml files explicitly"
        )
    index = _read_index(path)
    messages = []
    for file in sorted(path.glob(pattern)):
        if not file.is_file():
            continue
        description, flags = index.get(file.name, ("", frozenset()))
        messages.append(
            CorpusMessage(
                name=file.name,
                path=file,
                raw=file.read_bytes(),
                description=description,
                flags=flags,
            )
        )
    return messages


def corpus_params(
    directory: str | Path | None = None,
    pattern: str = "*.eml",
    *,
    byte_identical_only: bool = False,
) -> list[CorpusMessage]:
    """Return corpus messages for ``pytest.mark.parametrize``; use ``ids=str`` for file names.

    Args:
        directory: as for :func:`iter_corpus`.
        pattern: as for :func:`iter_corpus`.
        byte_identical_only: drop messages flagged as not expected to arrive byte for byte
            (no final newline, bare LF/CR).

    Raises:
        FileNotFoundError: as for :func:`iter_corpus`.
        ValueError: the directory holds no matching message (an empty parametrization would
            silently skip the test).
    """
    messages = iter_corpus(directory, pattern)
    if byte_identical_only:
        messages = [m for m in messages if m.byte_identical]
    if not messages:
        raise ConfigError(f"no messages matching {pattern!r} in {str(directory)!r}")
    return messages


def _header_block(raw: bytes) -> bytes:
    return raw[: header_bounds(raw)[0]]


def large_payload(size: int) -> bytes:
    """Return ``size`` deterministic pseudo-random bytes (SHAKE-256 of a fixed seed and size)."""
    if size < 0:
        raise ConfigError(f"size must be >= 0, got {size}")
    return hashlib.shake_256(f"roundtrip-large-{size}".encode()).digest(size)


def large_message(
    size: int,
    *,
    sender: str = "user@example.com",
    recipient: str = "user@example.org",
) -> bytes:
    """Build a message with one attachment of ``size`` pseudo-random bytes.

    The attachment is ``application/octet-stream`` named ``random-<size>.bin``, base64 in
    76-character CRLF lines, so the whole message is about ``size * 4/3 * 78/76`` bytes plus
    under 1 KB of headers; ``len()`` of the result is what an SMTP ``SIZE`` check sees. The
    same arguments always give the same bytes (fixed Date and Message-ID).

    Args:
        size: the decoded attachment size in bytes (10 MB: ``10 * 1024 * 1024``).
        sender: the From address.
        recipient: the To address.

    Returns:
        The message in SMTP canonical form (CRLF, ends with CRLF).
    """
    payload = large_payload(size)
    encoded = base64.b64encode(payload)
    lines = [encoded[i : i + _LARGE_LINE] for i in range(0, len(encoded), _LARGE_LINE)]
    name = f"random-{size}.bin"
    head = (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: Large attachment ({size} bytes)\r\n"
        "Date: Mon, 03 Jun 2024 12:00:00 +0000\r\n"
        f"Message-ID: <large-{size}@{sender.rpartition('@')[2] or 'example.com'}>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="large-boundary"\r\n'
        "\r\n"
        "--large-boundary\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"Attached: {name}, {size} bytes of SHAKE-256 output.\r\n"
        "\r\n"
        "--large-boundary\r\n"
        f'Content-Type: application/octet-stream; name="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "\r\n"
    ).encode("ascii")
    body = b"\r\n".join(lines)
    if body:
        body += b"\r\n"
    return head + body + b"--large-boundary--\r\n"


def nested_message(
    depth: int,
    *,
    sender: str = "user@example.com",
    recipient: str = "user@example.org",
) -> bytes:
    """Build a "MIME bomb": ``depth`` multipart/mixed levels, each holding the next.

    CPython's ``email`` recurses per level (docs/security.md, A5.5): about 245 levels break
    ``as_bytes()`` and about 1000 break parsing. The innermost part is one short text/plain.

    Args:
        depth: number of nested multipart levels (0 gives a plain single-part message).
        sender: the From address.
        recipient: the To address.
    """
    if depth < 0:
        raise ConfigError(f"depth must be >= 0, got {depth}")
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: Nested {depth} levels deep\r\n"
        "Date: Mon, 03 Jun 2024 12:00:00 +0000\r\n"
        f"Message-ID: <nested-{depth}@example.com>\r\nMIME-Version: 1.0\r\n"
    )
    parts = [head]
    for level in range(depth):
        parts.append(f'Content-Type: multipart/mixed; boundary="n{level}"\r\n\r\n--n{level}\r\n')
    parts.append("Content-Type: text/plain; charset=us-ascii\r\n\r\nbottom\r\n")
    for level in reversed(range(depth)):
        parts.append(f"--n{level}--\r\n")
    return "".join(parts).encode("ascii")
