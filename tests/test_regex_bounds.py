"""Client-controlled text that once met a quadratic regular expression.

docs/security.md ("Regular expressions that see client input") lists every pattern and the
bound that keeps it linear; these are the two that were not, each with a twin showing the
ordinary input still parses the same. The limit is generous: before the fix each took
seconds (6.7 s and 36 s), after it milliseconds.
"""

from __future__ import annotations

import time

from roundtrip.probes.roundtrip import parse_hops
from roundtrip.protocols._mime import bodystructure

LIMIT = 1.0  # seconds: far above the fixed cost, far below the quadratic one


def _timed(func, *args):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = func(*args)
    return result, time.perf_counter() - started


def test_regex_content_language_open_parens_are_linear() -> None:
    raw = b"Content-Language: " + b"(" * 100_000 + b"\r\nSubject: x\r\n\r\nbody\r\n"
    structure, seconds = _timed(bodystructure, raw)
    assert seconds < LIMIT, f"BODYSTRUCTURE took {seconds:.2f} s"
    assert structure.startswith(b'("TEXT" "PLAIN"')


def test_regex_content_language_twin_comments_still_removed() -> None:
    raw = b"Content-Language: en (English), de (German)\r\n\r\nbody\r\n"
    assert b'("en" "de")' in bodystructure(raw)


def test_regex_received_with_clause_is_linear() -> None:
    # No "with" at all: the lazy ".*?" tried every "by" against the rest of the field.
    field = b"Received: " + b"by x " * 20_000 + b"; Mon, 1 Jan 2024 00:00:00 +0000"
    hops, seconds = _timed(parse_hops, field + b"\r\nSubject: x\r\n\r\nb\r\n")
    assert seconds < LIMIT, f"parse_hops took {seconds:.2f} s"
    assert hops[0].with_ == ""


def test_regex_received_twin_ordinary_fields() -> None:
    raw = (
        b"Received: from mail.example.com ([127.0.0.1]) by mx.example.org with ESMTPS"
        b" id 4Xy; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Received: from client ([127.0.0.1]) by mail.example.com with ESMTPSA id 1;"
        b" Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n"
    )
    hops = parse_hops(raw)
    assert [(h.by, h.with_, h.tls) for h in hops] == [
        ("mail.example.com", "ESMTPSA", True),
        ("mx.example.org", "ESMTPS", True),
    ]
    assert parse_hops(b"Received: by mx.example.org; Mon, 1 Jan 2024\r\n\r\nb")[0].with_ == ""
