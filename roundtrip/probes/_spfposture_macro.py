"""SPF macro-strings (RFC 7208 section 7), as the posture check needs them: parsed with their
syntax errors, and expanded where the expansion does not depend on the sender.

The posture check looks at a domain, not at one message, so only two macros have a value
here: ``%{d}`` (the domain whose record is being read, RFC 7208 section 7.2) and ``%{o}`` (the
domain of the sender, which for mail of the checked domain is that domain). Every other
letter (``s``, ``l``, ``i``, ``p``, ``v``, ``h``) depends on the sender's local part, address
or HELO name; ``c``, ``r`` and ``t`` are allowed only in explanation text.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

#: RFC 7208 section 7.2: the macro letters.
MACRO_LETTERS = frozenset("slodiphcrtv")

#: Letters allowed only in the text an ``exp=`` modifier points at (RFC 7208 section 7.2).
EXPLAIN_ONLY = frozenset("crt")

#: Letters whose value depends on the sender or its connection, unknown to a posture check.
SENDER_LETTERS = frozenset("slihpv")

#: RFC 7208 section 7.1: ``delimiter``.
DELIMITERS = ".-+,/_="

#: RFC 7208 section 4.3: a domain name used in a query is at most 253 characters.
MAX_DOMAIN_CHARS = 253

_EXPAND = re.compile(r"([A-Za-z])(\d*)([rR]?)([" + re.escape(DELIMITERS) + r"]*)")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")


class MacroError(ValueError):
    """A macro-string that breaks the RFC 7208 section 7.1 grammar (a permerror)."""


@dataclass(frozen=True)
class Macro:
    """One ``%{...}`` macro-expand: its letter (lower case), the number of right-hand parts
    kept (None: all), whether the parts are reversed, the delimiters that split the value,
    and whether the result is URL-escaped (an upper-case letter)."""

    letter: str
    digits: int | None
    reverse: bool
    delimiters: str
    escape: bool

    def apply(self, value: str) -> str:
        """The transformed ``value`` (RFC 7208 section 7.3)."""
        parts = re.split("[" + re.escape(self.delimiters or ".") + "]", value)
        if self.reverse:
            parts.reverse()
        if self.digits is not None:
            parts = parts[-self.digits :]
        out = ".".join(parts)
        return urllib.parse.quote(out, safe="") if self.escape else out


#: A parsed macro-string: literal text and macros, in order.
Token = str | Macro


def parse_macro_string(text: str, *, explain: bool = False) -> list[Token]:
    """The tokens of ``text`` (RFC 7208 section 7.1 ``macro-string``).

    Args:
        text: the macro-string, as the record writes it.
        explain: True for explanation text, where ``c``, ``r`` and ``t`` are allowed.

    Raises:
        MacroError: a lone ``%``, an unknown escape, an unclosed or malformed ``%{...}``, an
            unknown letter, a zero digit transformer, or a character not allowed.
    """
    tokens: list[Token] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            if not "\x21" <= char <= "\x7e":
                raise MacroError(f"character {char!r} is not allowed in a macro-string")
            literal.append(char)
            i += 1
            continue
        after = text[i + 1 : i + 2]
        escapes = {"%": "%", "_": " ", "-": "%20"}
        if after in escapes:
            literal.append(escapes[after])
            i += 2
            continue
        if after != "{":
            shown = f"'%{after}'" if after else "a lone '%' at the end"
            raise MacroError(f"{shown}: '%' must be followed by '{{', '%', '_' or '-'")
        end = text.find("}", i + 2)
        if end < 0:
            raise MacroError(f"'{text[i:]}': '%{{' is not closed by '}}'")
        body = text[i + 2 : end]
        match = _EXPAND.fullmatch(body)
        if match is None:
            raise MacroError(f"'%{{{body}}}' is not a macro (letter, digits, 'r', delimiters)")
        letter, digits, reverse, delimiters = match.groups()
        if letter.lower() not in MACRO_LETTERS:
            raise MacroError(f"'%{{{body}}}': unknown macro letter {letter!r}")
        if letter.lower() in EXPLAIN_ONLY and not explain:
            raise MacroError(f"'%{{{body}}}': {letter!r} is allowed only in explanation text")
        if digits and int(digits) == 0:
            raise MacroError(f"'%{{{body}}}': the digit transformer must not be zero")
        if literal:
            tokens.append("".join(literal))
            literal = []
        tokens.append(
            Macro(
                letter.lower(),
                int(digits) if digits else None,
                bool(reverse),
                delimiters,
                letter.isupper(),
            )
        )
        i = end + 1
    if literal:
        tokens.append("".join(literal))
    return tokens


def parse_domain_spec(text: str) -> list[Token]:
    """The tokens of a ``domain-spec`` (RFC 7208 section 7.1): a macro-string that ends in a
    macro or in ``.`` and a top label (not all digits: ``a:192.0.2.1`` is an error).

    Raises:
        MacroError: a macro syntax error, or no valid ``domain-end``.
    """
    tokens = parse_macro_string(text)
    if re.search(r"%\{[^}]*\}$|%[%_-]$", text):
        return tokens
    body, dot, top = text.rstrip(".").rpartition(".")
    if not (dot and body and _TOPLABEL.fullmatch(top)):
        raise MacroError(
            f"{text!r} does not end in a macro or a top-level label"
            + (" (an address belongs in ip4: or ip6:)" if re.fullmatch(r"[\d.]+", text) else "")
        )
    return tokens


def sender_letters(tokens: list[Token]) -> list[str]:
    """The letters of ``tokens`` whose value depends on the sender, sorted."""
    return sorted({t.letter for t in tokens if isinstance(t, Macro) and t.letter in SENDER_LETTERS})


def expand_domain(tokens: list[Token], *, domain: str, sender_domain: str) -> str:
    """The name ``tokens`` expand to with ``%{d}`` = ``domain`` and ``%{o}`` =
    ``sender_domain``, lower case, without a final dot, cut from the left to at most 253
    characters (RFC 7208 section 7.3).

    Raises:
        MacroError: a letter without a value here (check ``sender_letters`` first).
    """
    values = {"d": domain, "o": sender_domain}
    out: list[str] = []
    for token in tokens:
        if isinstance(token, str):
            out.append(token)
        elif token.letter in values:
            out.append(token.apply(values[token.letter]))
        else:
            raise MacroError(f"%{{{token.letter}}} has no value without a sender")
    name = "".join(out).rstrip(".").lower()
    while len(name) > MAX_DOMAIN_CHARS and "." in name:
        name = name.partition(".")[2]
    return name
