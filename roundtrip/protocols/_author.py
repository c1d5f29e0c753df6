"""The author domains of a message: the domains of its RFC5322.From addresses, read strictly.

One reading for DKIM signing and DMARC (``roundtrip/protocols/dkim.py`` ``author_domains``),
so the domain a policy is evaluated for is the one a mail user agent shows. RFC 7489 section
3.1 defines the author domain as the domain of the address in the From field; a lenient
parser that guesses at broken syntax can read a domain that is in no address at all
(``email.utils.getaddresses`` glues ``alice@example.com (,) x.example.net`` into
``example.comx.example.net``, while ``email.policy.default``, which ``roundtrip/message.py``
uses, shows ``alice@example.com``).

:func:`read_from_fields` tokenizes each value in one pass (RFC 5322 section 3.2: comments,
nested and with quoted-pairs, quoted strings, domain literals; RFC 6532 UTF-8 text) and then
checks the tokens against the ``mailbox-list`` of section 3.6.2, obsolete forms included
(section 4.4: phrases with dots, CFWS around the dots of a dot-atom, route addresses, empty
list elements), since section 4 asks receivers to accept those. Anything else makes the field
malformed: a stray token, an unclosed comment, quoted string or angle bracket, an address
without a domain, a trailing dot, a group (From is a mailbox-list, not an address-list). For
a malformed field the candidates are every domain a reader could take for the author's: the
addresses that did parse, and every name that follows an ``@`` anywhere in the field,
comments and quoted strings included. No regular expression backtracks here: the scan is
linear in the field (docs/security.md, "Regular expressions that see client input").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AuthorDomains", "read_from_fields"]

#: RFC 5322 section 3.2.3 atext, plus RFC 6532 section 3.2 UTF8-non-ascii.
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_SPECIALS = frozenset("<>@,;:.")
#: A name after an ``@``: each attempt stops at the first character outside one class.
_AT_NAME = re.compile(r"@[ \t]*([A-Za-z0-9.-]+)")


@dataclass(frozen=True, slots=True)
class AuthorDomains:
    """The author domains of a message.

    Attributes:
        domains: the distinct domains (lower case) of the From addresses, in order; for a
            malformed field, every candidate (module docstring).
        malformed: why the From field does not parse (RFC 5322 section 3.6.2), ``""`` when
            it does.
    """

    domains: tuple[str, ...]
    malformed: str = ""


class _MalformedError(Exception):
    """A From value that is not a mailbox-list."""


_Token = tuple[str, str]  # (kind, text): "atom", "quoted", "literal", or a special itself


def _tokens(value: str) -> list[_Token]:
    """The tokens of ``value`` with CFWS dropped (RFC 5322 section 3.2); one pass."""
    tokens: list[_Token] = []
    i, n = 0, len(value)
    while i < n:
        char = value[i]
        if char in " \t":
            i += 1
        elif char == "(":
            depth = 1
            i += 1
            while i < n and depth:
                c = value[i]
                if c == "\\":
                    i += 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                i += 1
            if depth:
                raise _MalformedError("unclosed comment")
        elif char in '"[':
            close, kind = ('"', "quoted") if char == '"' else ("]", "literal")
            start = i
            i += 1
            while i < n and value[i] != close:
                if value[i] == "\\":
                    i += 1
                elif char == "[" and value[i] == "[":
                    raise _MalformedError("'[' inside a domain literal")
                i += 1
            if i >= n:
                raise _MalformedError("unclosed quoted string" if char == '"' else "unclosed [")
            i += 1
            tokens.append((kind, value[start:i]))
        elif char in _SPECIALS:
            tokens.append((char, char))
            i += 1
        elif char in _ATEXT or ord(char) > 0x7F:
            start = i
            while i < n and (value[i] in _ATEXT or ord(value[i]) > 0x7F):
                i += 1
            tokens.append(("atom", value[start:i]))
        else:
            raise _MalformedError(f"unexpected {char!r}")
    return tokens


class _Reader:
    """The mailbox-list grammar (RFC 5322 sections 3.4, 3.6.2, 4.4) over tokens."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.domains: list[str] = []

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else ""

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            raise _MalformedError(f"expected {kind!r}, found {self.peek() or 'the end'!r}")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def mailbox_list(self) -> None:
        while True:
            while self.peek() == ",":  # obs-mbox-list: empty elements
                self.pos += 1
            if not self.peek():
                break
            self.mailbox()
            if not self.peek():
                break
            if self.peek() != ",":
                raise _MalformedError("more text after an address")
            self.pos += 1
        if not self.domains:
            raise _MalformedError("no address")

    def mailbox(self) -> None:
        # A phrase (obs-phrase: words and dots), or a local-part, up to what follows it.
        start = self.pos
        while self.peek() in ("atom", "quoted", "."):
            self.pos += 1
        words = self.tokens[start : self.pos]
        following = self.peek()
        if following == "<":
            if words and words[0][0] == ".":
                raise _MalformedError("display name starts with '.'")
            self.pos += 1
            if self.peek() == "@":  # obs-route: @domain *("," ["@" domain]) ":"
                while self.peek() in ("@", ","):
                    if self.take(self.peek()) == "@":
                        self.domain()
                self.take(":")
            self.pos = self.addr_spec(self.pos)
            self.take(">")
        elif following == "@":
            self.pos = self.addr_spec(start)
        elif following == ":":
            raise _MalformedError("a group (From is a mailbox-list)")
        else:
            raise _MalformedError("an address without a domain")

    def addr_spec(self, start: int) -> int:
        """local-part "@" domain from ``start``; the position after it."""
        self.pos = start
        expect_word = True
        while self.peek() != "@":
            kind = self.peek()
            if expect_word != (kind in ("atom", "quoted")) or kind not in ("atom", "quoted", "."):
                raise _MalformedError("malformed local-part")
            expect_word = not expect_word
            self.pos += 1
        if expect_word:
            raise _MalformedError("malformed local-part")
        self.pos += 1
        domain = self.domain()
        if domain not in self.domains:
            self.domains.append(domain)
        return self.pos

    def domain(self) -> str:
        if self.peek() == "literal":
            return self.take("literal").lower()
        labels = [self.take("atom")]
        while self.peek() == ".":
            self.pos += 1
            labels.append(self.take("atom"))
        return ".".join(labels).lower()


def _mailbox_domains(value: str) -> tuple[list[str], str]:
    """The domains of the mailbox-list ``value`` and ``""``, or those read before the error
    and the error."""
    reader = _Reader([])
    try:
        reader.tokens = _tokens(value)
        reader.mailbox_list()
    except _MalformedError as exc:
        return reader.domains, str(exc)
    return reader.domains, ""


def _unfold(value: str) -> str:
    """``value`` unfolded (RFC 5322 section 2.2.3): a CRLF before a space or tab removed."""
    return value.replace("\r\n ", " ").replace("\r\n\t", "\t")


def read_from_fields(values: Sequence[str]) -> AuthorDomains:
    """The author domains of a message whose From fields have ``values``.

    Args:
        values: the raw field values, as ``dkim.from_field_values`` gives them (folding
            kept; non-ASCII octets as surrogate escapes).

    Returns:
        The domains of every address; with ``malformed`` set, the candidates (module
        docstring). No From field: no domains, ``malformed`` "no From field".
    """
    if not values:
        return AuthorDomains((), "no From field")
    found: list[str] = []
    problems: list[str] = []
    for raw_value in values:
        value = _unfold(raw_value)
        here: list[str] = []
        try:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            here.append("not UTF-8 (RFC 6532)")
        if "\r" in value or "\n" in value:
            here.append("a CR or LF that does not fold the field")
            value = value.replace("\r", " ").replace("\n", " ")
        domains, problem = _mailbox_domains(value)
        found += [d for d in domains if d not in found]
        if problem:
            here.append(problem)
        problems += here
        if here:
            for match in _AT_NAME.finditer(value):
                name = match.group(1).strip(".").lower()
                if name and ".." not in name and name not in found:
                    found.append(name)
    if problems:
        return AuthorDomains(tuple(found), f"malformed From field: {problems[0]}")
    return AuthorDomains(tuple(found))
