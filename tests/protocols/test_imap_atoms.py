"""IMAP atoms (roundtrip/protocols/_imapparse.py): the tokenizer must split and refuse
exactly as a plain byte-by-byte reading of RFC 3501 section 9 does, for any mix of atom
characters, sections in brackets, spaces and bytes no atom may hold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.protocols._imapparse import ParseError, RawCommand, tokenize


def _by_bytes(line: bytes) -> list[str] | None:
    """Atoms separated by spaces, read one byte at a time; None where a token is refused.
    A "[" with a "]" after it takes everything up to that "]" (7-bit and printable)."""
    tokens: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == 0x20:
            i += 1
            continue
        start = i
        while i < len(line) and line[i] not in b' ()"':
            c = line[i]
            if c == 0x5B and line.find(b"]", i) >= 0:
                end = line.find(b"]", i)
                if any(b < 0x20 or b > 0x7E for b in line[i:end]):
                    return None
                i = end + 1
                continue
            if c == 0x7B or c < 0x20 or c > 0x7E:
                return None
            i += 1
        if i == start:
            return None  # "(", ")" or '"' would start another kind of token: not in here
        tokens.append(line[start:i].decode("ascii"))
    return tokens


_ATOM_BYTES = [b"a", b"Z", b"7", b".", b"]", b"[", b"%", b"*", b"\\", b"<", b">", b"+"]
_BYTES = st.sampled_from(
    [*_ATOM_BYTES, b" ", b"  ", b"{", b"\x01", b"\x7f", b"\x80", b"\xff", b"\t"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_BYTES, min_size=1, max_size=16))
def test_atoms_split_and_refuse_as_read_byte_by_byte(pieces: list[bytes]) -> None:
    line = b"".join(pieces)
    expected = _by_bytes(line)
    if expected is None:
        with pytest.raises(ParseError):
            tokenize(RawCommand([line], []))
    else:
        assert tokenize(RawCommand([line], [])) == expected


def test_atoms_with_a_section_and_a_bad_byte_after_a_long_run() -> None:
    assert tokenize(RawCommand([b"a UID FETCH 1:* BODY.PEEK[HEADER.FIELDS (A B)]"], [])) == [
        "a",
        "UID",
        "FETCH",
        "1:*",
        "BODY.PEEK[HEADER.FIELDS (A B)]",
    ]
    for bad in (b"\x80", b"\x00", b"{"):
        with pytest.raises(ParseError):
            tokenize(RawCommand([b"a FETCH 1 averyveryverylongatom" + bad + b"tail"], []))
