"""The DKIM body hash against a plain reading of RFC 6376, and the parsed-key cache.

``roundtrip/protocols/_dkimcore.py`` canonicalizes bodies in chunks and finds the trailing
empty lines without scanning the chunk, and keeps parsed public keys by record; both must
give what the RFC says, whatever the body and whatever key a selector publishes now.
"""

from __future__ import annotations

import hashlib
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.protocols._dkimcore import BodyHashes, HeaderField, _trailing_crlfs, canonical_header
from roundtrip.protocols.dkim import KeyAnswer, sign, verify
from roundtrip.stack._dkim import domain_keys

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: keys\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <k@example.com>\r\n\r\n"
    b"a body\r\n"
)


def _reference_body(body: bytes, canon: str) -> bytes:
    """RFC 6376 sections 3.4.3 and 3.4.4, read literally, over the whole body at once."""
    if canon == "relaxed":
        body = re.sub(rb"[ \t]+\r\n", b"\r\n", body)
        body = re.sub(rb"[ \t]+", b" ", body)
    body = re.sub(rb"(\r\n)+\Z", b"", body)
    if body:
        return body + b"\r\n"
    return b"\r\n" if canon == "simple" else b""


_LINES = st.lists(
    st.sampled_from([b"", b"text", b"two  spaces", b"tab\there", b"trailing \t", b" lead"]),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(lines=_LINES, chunk=st.integers(min_value=2, max_value=40))
def test_body_hash_matches_the_rfc_in_any_chunking(lines: list[bytes], chunk: int) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    raw = b"Subject: x\r\n\r\n" + body
    hashes = BodyHashes(raw, raw.index(b"\r\n\r\n") + 4, chunk=chunk)
    for canon in ("simple", "relaxed"):
        expected = _reference_body(body, canon)
        assert hashes.get(canon) == hashlib.sha256(expected).digest(), (canon, body)
        assert hashes.length(canon) == len(expected)


def test_body_hash_differs_when_a_line_with_content_is_added() -> None:
    raw = b"Subject: x\r\n\r\nline\r\n\r\n"
    more = raw + b"more\r\n"
    one, two = (BodyHashes(r, r.index(b"\r\n\r\n") + 4) for r in (raw, more))
    assert one.get("relaxed") != two.get("relaxed")
    # Empty lines at the end are not part of the body; lines with content are.
    padded = raw + b"\r\n\r\n"
    assert one.get("relaxed") == BodyHashes(padded, padded.index(b"\r\n\r\n") + 4).get("relaxed")


def _reference_header(raw: bytes) -> bytes:
    """RFC 6376 section 3.4.2, read literally: lower-case name, unfold, one space per run of
    WSP, none at either end of the value or around the colon."""
    name, _, value = raw[:-2].partition(b":")
    value = re.sub(rb"\r\n", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


_VALUE_PIECES = st.sampled_from([b"a", b"B c", b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"x;y"])


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([b"Subject", b"FROM ", b"x-Tag\t"]), pieces=st.lists(_VALUE_PIECES))
def test_relaxed_header_matches_the_rfc(name: bytes, pieces: list[bytes]) -> None:
    raw = name + b":" + b"".join(pieces) + b"\r\n"
    field = HeaderField(name, raw)
    assert canonical_header(field, "relaxed") == _reference_header(raw)
    assert canonical_header(field, "simple") == raw


def test_relaxed_header_changes_what_the_rfc_changes() -> None:
    field = HeaderField(b"Subject", b"Subject: \tfolded\r\n  twice  \r\n")
    assert canonical_header(field, "relaxed") == b"subject:folded twice\r\n"
    plain = HeaderField(b"To", b"To: one space\r\n")
    assert canonical_header(plain, "relaxed") == b"to:one space\r\n"


@given(st.binary(max_size=24).map(lambda b: bytes(c for c in b if c in b"\r\na \t")))
def test_trailing_crlfs_counts_as_the_anchored_expression(chunk: bytes) -> None:
    match = re.search(rb"(?:\r\n)+\Z", chunk)
    assert _trailing_crlfs(chunk) == ((match.end() - match.start()) // 2 if match else 0)


def test_trailing_crlfs_stops_at_a_bare_cr_or_lf() -> None:
    assert _trailing_crlfs(b"x\r\n\r\n") == 2
    assert _trailing_crlfs(b"x\n\r\n") == 1
    assert _trailing_crlfs(b"x\r\n\r") == 0
    assert _trailing_crlfs(b"\r\r\n") == 1
    assert _trailing_crlfs(b"x") == 0


def test_a_selector_that_publishes_another_key_is_checked_against_the_new_one() -> None:
    # Each domain's keys are its own; another domain's are the same selectors, other keys.
    keys, others = domain_keys("example.com"), domain_keys("rotated.example")
    published = {k.selector: k.record for k in keys}

    def lookup(name: str) -> KeyAnswer:
        selector, _, domain = name.partition("._domainkey.")
        assert domain == "example.com"
        return KeyAnswer("found", published[selector].encode())

    signed = sign(MESSAGE, keys)
    assert [r.result for r in verify(signed, lookup)] == ["pass", "pass"]
    published = {k.selector: k.record for k in others}  # the selectors name other keys now
    results = verify(signed, lookup)
    assert [(r.result, r.reason) for r in results] == [("fail", "signature did not verify")] * 2
    published = {k.selector: k.record for k in keys}
    assert [r.result for r in verify(signed, lookup)] == ["pass", "pass"]
