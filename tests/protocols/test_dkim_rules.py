"""Pure DKIM rules: bytes in, results and header text out (roundtrip/protocols/dkim.py)."""

from __future__ import annotations

import random

import authres
import dns.message
import dns.rcode
import dns.rrset
import pytest

from roundtrip.protocols.dkim import (
    DKIMResult,
    KeyAnswer,
    authentication_results,
    from_domain,
    key_answer,
    key_query,
    sign,
    verify,
)
from roundtrip.stack._dkim import domain_keys

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
    b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
    b"hello  there \r\n\r\n\r\n"
)
KEYS = domain_keys("example.com")


def _records(answer: KeyAnswer | None = None) -> dict[str, KeyAnswer]:
    return {
        f"{k.selector}._domainkey.{k.domain}": answer or KeyAnswer("found", k.record.encode())
        for k in KEYS
    }


def _lookup(records: dict[str, KeyAnswer]):  # type: ignore[no-untyped-def]
    return lambda name: records.get(name, KeyAnswer("missing"))


def test_dkim_sign_then_verify_passes_both() -> None:
    signed = sign(MESSAGE, KEYS)
    results = verify(signed, _lookup(_records()))
    assert [(r.result, r.algorithm, r.selector) for r in results] == [
        ("pass", "ed25519-sha256", "rt-ed25519"),
        ("pass", "rsa-sha256", "rt-rsa"),
    ]


def test_dkim_relaxed_survives_refolding_and_trailing_space() -> None:
    signed = sign(MESSAGE, KEYS)
    moved = signed.replace(b"Subject: hi", b"Subject:   hi  ").replace(b"there \r\n", b"there\r\n")
    assert {r.result for r in verify(moved, _lookup(_records()))} == {"pass"}


def test_dkim_a_second_from_breaks_the_oversigned_signature() -> None:
    signed = sign(MESSAGE, KEYS)
    head, _, body = signed.partition(b"\r\n\r\n")
    forged = head + b"\r\nFrom: mallory@evil.test\r\n\r\n" + body
    assert {r.result for r in verify(forged, _lookup(_records()))} == {"fail"}


def test_dkim_changed_body_fails_with_reason() -> None:
    signed = sign(MESSAGE, KEYS).replace(b"hello", b"jello")
    results = verify(signed, _lookup(_records()))
    assert {(r.result, r.reason) for r in results} == {("fail", "body hash did not verify")}


def test_dkim_changed_subject_fails_the_signature() -> None:
    signed = sign(MESSAGE, KEYS).replace(b"Subject: hi", b"Subject: ho")
    results = verify(signed, _lookup(_records()))
    assert {(r.result, r.reason) for r in results} == {("fail", "signature did not verify")}


def test_dkim_unsigned_is_none() -> None:
    assert verify(MESSAGE, _lookup(_records())) == [DKIMResult("none")]


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (KeyAnswer("missing"), "permerror"),
        (KeyAnswer("error"), "temperror"),
        (KeyAnswer("found", b"v=DKIM1; k=rsa; p="), "permerror"),
        (KeyAnswer("found", b"v=DKIM1; k=rsa; p=AAAA"), "permerror"),
        (KeyAnswer("found", b"\xff\xfe"), "permerror"),
    ],
)
def test_dkim_key_problems_map_to_rfc8601_results(answer: KeyAnswer, result: str) -> None:
    signed = sign(MESSAGE, KEYS)
    assert {r.result for r in verify(signed, _lookup(_records(answer)))} == {result}


def test_dkim_garbage_signatures_never_raise() -> None:
    rng = random.Random(8463)
    alphabet = b"v=1;a=rsa-sha256ed25519 d=s=h=bh=b=c=relaxed/simplel=x=t=q=dns/txt:AZaz09+/\t"
    signed = sign(MESSAGE, KEYS)
    for _ in range(300):
        value = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        raw = b"DKIM-Signature: " + value + b"\r\n" + signed
        results = verify(raw, _lookup(_records()))
        assert results[0].result in ("permerror", "fail", "neutral"), (value, results[0])
        assert [r.result for r in results[1:]] == ["pass", "pass"]


def test_dkim_authentication_results_parse_back_with_authres() -> None:
    results = [
        DKIMResult("pass", "", "example.com", "rt-ed25519", "ed25519-sha256", "abcd+/12"),
        DKIMResult("fail", 'body "hash"; x', "example.com", "rt-rsa", "rsa-sha256", "zz"),
        DKIMResult("permerror", "malformed signature: bad\r\nline", "ex ample", "", "", ""),
    ]
    field = authentication_results("mail.example.org", results)
    assert field.endswith(b"\r\n") and b"\r\n\t" in field
    parsed = authres.AuthenticationResultsHeader.parse(field.decode().replace("\r\n", ""))
    assert parsed.authserv_id == "mail.example.org"
    got = [(r.method, r.result, r.reason) for r in parsed.results]
    assert got == [
        ("dkim", "pass", None),
        ("dkim", "fail", "body 'hash'; x"),
        ("dkim", "permerror", "malformed signature: bad??line"),
    ]
    props = {p.name: p.value for p in parsed.results[0].properties}
    assert props == {"d": "example.com", "s": "rt-ed25519", "a": "ed25519-sha256", "b": "abcd+/12"}


def test_dkim_authentication_results_without_signatures_says_none() -> None:
    field = authentication_results("mx.test", [])
    assert field == b"Authentication-Results: mx.test;\r\n\tdkim=none\r\n"


def _reply(rcode: dns.rcode.Rcode, txt: str | None = None) -> bytes:
    query = dns.message.from_wire(key_query("s._domainkey.example.com"))
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if txt is not None:
        response.answer.append(
            dns.rrset.from_text("s._domainkey.example.com.", 60, "IN", "TXT", txt)
        )
    return response.to_wire()


def test_dkim_key_answer_reads_dns_replies() -> None:
    assert key_answer(_reply(dns.rcode.NOERROR, '"v=DKIM1; " "p=AB"')) == KeyAnswer(
        "found", b"v=DKIM1; p=AB"
    )
    assert key_answer(_reply(dns.rcode.NXDOMAIN)) == KeyAnswer("missing")
    assert key_answer(_reply(dns.rcode.NOERROR)) == KeyAnswer("missing")
    assert key_answer(_reply(dns.rcode.SERVFAIL)) == KeyAnswer("error")
    assert key_answer(_reply(dns.rcode.REFUSED)) == KeyAnswer("error")
    assert key_answer(b"") == KeyAnswer("error")
    assert key_answer(b"\x00\x01garbage") == KeyAnswer("error")


@pytest.mark.parametrize(
    ("raw", "domain"),
    [
        (MESSAGE, "example.com"),
        (b"From: a@Sub.Example.COM\r\n\r\nx", "sub.example.com"),
        # A trailing dot is not a dot-atom (RFC 5322 section 3.2.3): malformed, no domain.
        (b"From: a@Sub.Example.COM.\r\n\r\nx", None),
        # getaddresses glued this into example.comx.example.net (roundtrip/protocols/_author.py).
        (b"From: alice@example.com (,) x.example.net\r\n\r\nx", None),
        (b"From: Alice (work) <alice@example.com>\r\n\r\nx", "example.com"),
        (b"From: undisclosed\r\n\r\nx", None),
        (b"Subject: none\r\n\r\nx", None),
        (b"From: =?x?q?\xff?= <\xff@\r\n\r\nx", None),
    ],
)
def test_dkim_from_domain(raw: bytes, domain: str | None) -> None:
    assert from_domain(raw) == domain
