"""ARC sealing and validation (roundtrip/protocols/arc.py, RFC 8617), checked against dkimpy.

dkimpy's ``arc_verify`` and ``arc_sign`` are an independent reading of RFC 8617: what we
seal must validate there, and what it seals must validate here; every way a chain breaks
has its ``fail``.
"""

from __future__ import annotations

from datetime import timedelta

import dkim  # dkimpy: the independent implementation
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roundtrip.protocols import arc
from roundtrip.protocols.dkim import KeyAnswer, SigningKey, sign
from roundtrip.stack._dkim import domain_keys

NOW = 1_700_000_000.0  # in the past: dkimpy refuses t= in the future
AUTHOR = domain_keys("author.test")
LIST = domain_keys("list.test")
NEXT = domain_keys("next.test")
RECORDS = {
    f"{k.selector}._domainkey.{k.domain}": k.record.encode() for k in (*AUTHOR, *LIST, *NEXT)
}
MESSAGE = (
    b"From: Ann <ann@author.test>\r\nTo: team@list.test\r\nSubject: plans\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <p1@author.test>\r\n\r\n"
    b"See you at ten.\r\n"
)
VERDICTS = "dkim=pass header.d=author.test; spf=pass smtp.mailfrom=author.test"


def _lookup(records: dict[str, bytes] | None = None) -> arc.KeyLookup:
    table = RECORDS if records is None else records

    def lookup(name: str) -> KeyAnswer:
        text = table.get(name)
        return KeyAnswer("found", text) if text is not None else KeyAnswer("missing")

    return lookup


def _dnsfunc(name: bytes, timeout: float = 5) -> bytes:
    return RECORDS.get(name.decode().rstrip("."), b"")


def _forward(raw: bytes, key: SigningKey, host: str, *, change: bool = True) -> bytes:
    """What a list does: validate, stamp its A-R, change the message, seal."""
    chain = arc.validate(raw, _lookup())
    raw = f"Authentication-Results: {host}; {VERDICTS}\r\n".encode() + raw
    if change:
        raw = raw.replace(b"Subject: ", b"Subject: [team] ", 1) + b"-- \r\nthe team list\r\n"
    return arc.seal(raw, key, host, VERDICTS, chain, now=NOW) + raw


def _signed() -> bytes:
    return sign(MESSAGE, AUTHOR, now=NOW)


def test_arc_none_without_sets() -> None:
    assert arc.validate(_signed(), _lookup()) == arc.ARCResult("none")
    assert arc.resinfo(arc.ARCResult("none")) == "arc=none"


def test_arc_sealed_by_us_passes_here_and_in_dkimpy() -> None:
    once = _forward(_signed(), LIST[1], "mx.list.test")
    result = arc.validate(once, _lookup())
    assert (result.result, result.instance, result.sealer) == ("pass", 1, "list.test")
    assert result.results.startswith("mx.list.test; dkim=pass header.d=author.test")
    assert arc.resinfo(result) == "arc=pass (i=1 d=list.test)"
    assert dkim.arc_verify(once, dnsfunc=_dnsfunc)[0] == b"pass"
    twice = _forward(once, NEXT[1], "mx.next.test")
    assert arc.validate(twice, _lookup()).instance == 2
    assert arc.validate(twice, _lookup()).result == "pass"
    assert dkim.arc_verify(twice, dnsfunc=_dnsfunc)[0] == b"pass"


def test_arc_ed25519_sealer_passes() -> None:
    once = _forward(_signed(), LIST[0], "mx.list.test")
    assert arc.validate(once, _lookup()).result == "pass"


def test_arc_sealed_by_dkimpy_passes_here() -> None:
    raw = b"Authentication-Results: mx.list.test; dkim=pass\r\n" + _signed()
    fields = dkim.arc_sign(raw, b"rt-rsa", b"list.test", LIST[1].private, b"mx.list.test")
    result = arc.validate(b"".join(fields) + raw, _lookup())
    assert (result.result, result.sealer) == ("pass", "list.test")


def test_arc_message_changed_after_sealing_fails_both_here_and_in_dkimpy() -> None:
    once = _forward(_signed(), LIST[1], "mx.list.test")
    changed = once.replace(b"See you at ten.", b"See you at two.")
    result = arc.validate(changed, _lookup())
    assert result.result == "fail"
    assert "ARC-Message-Signature i=1" in result.reason
    assert "body hash" in result.reason
    assert dkim.arc_verify(changed, dnsfunc=_dnsfunc)[0] == b"fail"


def test_arc_seal_changed_fails() -> None:
    once = _forward(_signed(), LIST[1], "mx.list.test")
    aar = b"ARC-Authentication-Results: i=1; mx.list.test;\r\n\tdkim=pass"
    changed = once.replace(aar, aar[:-4] + b"fail", 1)
    assert changed != once
    result = arc.validate(changed, _lookup())
    assert (result.result, result.reason) == ("fail", "ARC-Seal i=1 did not verify")


def test_arc_older_seal_changed_fails_the_whole_chain() -> None:
    twice = _forward(_forward(_signed(), LIST[1], "mx.list.test"), NEXT[1], "mx.next.test")
    changed = twice.replace(
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none", b"ARC-Seal: i=1; a=rsa-sha256; cv=pass"
    )
    assert arc.validate(changed, _lookup()).result == "fail"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"ARC-Seal", "0 ARC-Seal fields with i=1"),
        (b"ARC-Message-Signature", "0 ARC-Message-Signature fields with i=1"),
        (b"ARC-Authentication-Results", "0 ARC-Authentication-Results fields with i=1"),
    ],
)
def test_arc_incomplete_set_fails(name: bytes, expected: str) -> None:
    twice = _forward(_forward(_signed(), LIST[1], "mx.list.test"), NEXT[1], "mx.next.test")
    lines = twice.split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(name + b": i=1;"))
    end = start + 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    broken = b"\r\n".join(lines[:start] + lines[end:])
    result = arc.validate(broken, _lookup())
    assert (result.result, result.reason) == ("fail", expected)


def test_arc_unknown_sealer_key_fails() -> None:
    once = _forward(_signed(), LIST[1], "mx.list.test")
    records = {k: v for k, v in RECORDS.items() if "list.test" not in k}
    result = arc.validate(once, _lookup(records))
    assert result.result == "fail"
    assert "no key for signature" in result.reason


def test_arc_revoked_sealer_key_fails() -> None:
    once = _forward(_signed(), LIST[1], "mx.list.test")
    records = {**RECORDS, "rt-rsa._domainkey.list.test": b"v=DKIM1; k=rsa; p="}
    assert "revoked" in arc.validate(once, _lookup(records)).reason


def test_arc_newest_cv_fail_fails() -> None:
    once = _forward(_signed(), LIST[1], "mx.list.test")
    broken_chain = arc.ARCResult("fail", "seen broken", 1, "list.test")
    raw = b"Authentication-Results: mx.next.test; arc=fail\r\n" + once
    sealed = arc.seal(raw, NEXT[1], "mx.next.test", "arc=fail", broken_chain, now=NOW) + raw
    assert b"cv=fail" in sealed
    result = arc.validate(sealed, _lookup())
    assert (result.result, result.reason) == ("fail", "ARC-Seal i=2 says cv=fail")


def test_arc_instance_without_number_fails_and_never_raises() -> None:
    raw = b"ARC-Seal: cv=none; b=AAAA\r\n" + _signed()
    assert arc.validate(raw, _lookup()).result == "fail"
    for garbage in (b"ARC-Seal: i=1\r\n", b"ARC-Seal: i=1; b=!!!; d=x; s=y; a=rsa-sha256\r\n"):
        assert arc.validate(garbage + _signed(), _lookup()).result == "fail"


def test_arc_instance_above_fifty_fails_and_seal_refuses() -> None:
    raw = b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=list.test; s=rt-rsa; b=AAAA\r\n" + _signed()
    result = arc.validate(raw, _lookup())
    assert (result.result, result.reason) == ("fail", "instance 51 above 50")
    with pytest.raises(ValueError, match="i=50"):
        arc.seal(_signed(), LIST[1], "mx", VERDICTS, arc.ARCResult("pass", instance=50))


ARC_ZERO = (
    b"ARC-Seal: i=0; a=rsa-sha256; cv=none; d=list.test; s=rt-rsa; b=AAAA\r\n"
    b"ARC-Message-Signature: i=0; a=rsa-sha256; d=list.test; s=rt-rsa; h=from; bh=AAAA;"
    b" b=AAAA\r\n"
    b"ARC-Authentication-Results: i=0; mx.list.test; dmarc=pass header.from=author.test\r\n"
)


def test_arc_instance_zero_fails_and_a_valid_chain_still_passes() -> None:
    """i= starts at 1 (RFC 8617 section 4.2.1): a set numbered 0 fails the chain (section
    5.2), alone or next to valid sets, and a forwarder seals such a chain with cv=fail."""
    alone = arc.validate(ARC_ZERO + _signed(), _lookup())
    assert (alone.result, alone.reason, alone.instance) == ("fail", "instance 0 below 1", 0)
    assert arc.resinfo(alone) == 'arc=fail (i=0 d=list.test) reason="instance 0 below 1"'
    once = _forward(_signed(), LIST[1], "mx.list.test")
    beside = arc.validate(ARC_ZERO + once, _lookup())
    assert (beside.result, beside.reason, beside.instance) == ("fail", "instance 0 below 1", 1)
    resealed = arc.seal(ARC_ZERO + _signed(), NEXT[1], "mx.next.test", "arc=fail", alone)
    assert resealed.startswith(b"ARC-Seal: i=1; a=rsa-sha256; cv=fail;")
    # The twins: the same valid chain without the i=0 set passes, and a message that arrived
    # without any chain is still sealed with cv=none.
    assert arc.validate(once, _lookup()).result == "pass"
    first = arc.seal(_signed(), NEXT[1], "mx.next.test", "arc=none", arc.ARCResult("none"))
    assert first.startswith(b"ARC-Seal: i=1; a=rsa-sha256; cv=none;")


# validate never raises: property tests over hostile ARC fields (bounded like
# tests/protocols/test_fuzz.py: a fixed number of examples, a deadline per example).

ARC_FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
)
_ARC_NAMES = st.sampled_from(
    [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results", b"arc-seal ", b"From"]
)
_ARC_INSTANCES = st.sampled_from(
    [b"0", b"1", b"2", b"3", b"50", b"51", b"999", b"00", b"01", b"", b"-1", b"1.5", b"\xff"]
)
_ARC_TAGS = st.lists(
    st.sampled_from(
        [
            *(b"a=" + a for a in (b"rsa-sha256", b"ed25519-sha256", b"x")),
            *(b"b=" + b for b in (b"AAAA", b"", b"!!")),
            *(b"d=" + d for d in (b"list.test", b"next.test", b"..", b"\xff")),
            *(b"s=" + s for s in (b"rt-rsa", b"rt-ed25519", b"")),
            *(b"cv=" + cv for cv in (b"none", b"pass", b"fail")),
            *(b"h=" + h for h in (b"from", b"", b"arc-seal")),
            *(b"c=" + c for c in (b"relaxed/relaxed", b"simple", b"/", b"x/y")),
            *(b"bh=AAAA", b"bh=", b"t=1", b"x", b"=", b"i=2", b"\r\n\t", b"\xc3\xa9=1"),
        ]
    ),
    max_size=8,
)


@st.composite
def _arc_field(draw: st.DrawFn) -> bytes:
    tags = b"; ".join(draw(_ARC_TAGS))
    return draw(_ARC_NAMES) + b": i=" + draw(_ARC_INSTANCES) + b"; " + tags + b"\r\n"


_CHAIN = _forward(_forward(_signed(), LIST[1], "mx.list.test"), NEXT[0], "mx.next.test")
_CHAIN_HEAD = _CHAIN.index(b"\r\n\r\n") + 4


@ARC_FUZZ
@given(fields=st.lists(_arc_field(), max_size=8), on_chain=st.booleans())
def test_fuzz_arc_fields_give_a_result_never_an_exception(
    fields: list[bytes], on_chain: bool
) -> None:
    raw = b"".join(fields) + (_CHAIN if on_chain else _signed())
    result = arc.validate(raw, _lookup())
    assert result.result in ("none", "pass", "fail")
    if result.result == "pass":
        assert 1 <= result.instance <= arc.MAX_INSTANCE


@ARC_FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, _CHAIN_HEAD), st.integers(0, 8), st.binary(max_size=6)),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_arc_damaged_chain_gives_a_result_never_an_exception(
    edits: list[tuple[int, int, bytes]],
) -> None:
    raw = _CHAIN
    for at, cut, inserted in edits:
        raw = raw[:at] + inserted + raw[at + cut :]
    result = arc.validate(raw, _lookup())
    assert result.result in ("none", "pass", "fail")


def test_fuzz_arc_chain_the_damage_starts_from_passes() -> None:
    """The twin of the property tests: undamaged, the chain they start from passes."""
    result = arc.validate(_CHAIN, _lookup())
    assert (result.result, result.instance, result.sealer) == ("pass", 2, "next.test")
