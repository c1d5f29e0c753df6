"""The reader of Authentication-Results (``roundtrip.probes.authcheck.auth_results``) on the
fields real filters wrote on a real Postfix (``tests/live/test_authres_real.py``), kept here
as text so that the reading is checked on every run, without the programs.

The fields were written by Debian 12's OpenDKIM 2.11.0, OpenDMARC 1.4.2 and Rspamd 3.4 as
milters of Postfix 3.7 for ``mx.peer.test``, on a message signed by ``example.com`` with an
Ed25519 and an RSA key (RFC 8463 dual signing), sent from 127.0.0.1, which ``example.com``'s
SPF record names. The ``header.b`` values are the first eight characters of those signatures
(RFC 6008), not key material.
"""

from __future__ import annotations

import pytest

from roundtrip.probes._net import INFO, WARN
from roundtrip.probes.authcheck import auth_results

RECEIVER = "mx.peer.test"
RECEIVED = (
    "Received: from mail.example.com (localhost [127.0.0.1])\r\n"
    "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
    "\tby mx.peer.test (Postfix) with ESMTPS id D4E2020C65B\r\n"
    "\tfor <alice@peer.test>; Fri,  4 Dec 2026 04:49:51 +0000 (UTC)\r\n"
)
TAIL = "From: <sender@example.com>\r\nSubject: t\r\n\r\nbody\r\n"

#: OpenDMARC's two fields and OpenDKIM's one, top to bottom as Postfix delivered them: each
#: milter's field is inserted above the earlier ones.
OPENDMARC_DMARC = (
    "Authentication-Results: mx.peer.test; dmarc=pass (p=reject dis=none)"
    " header.from=example.com\r\n"
)
OPENDMARC_SPF = "Authentication-Results: mx.peer.test; spf=pass smtp.mailfrom=example.com\r\n"
OPENDKIM = (
    "Authentication-Results: mx.peer.test;\r\n"
    "\tdkim=pass header.d=example.com header.i=@example.com header.a=ed25519-sha256"
    " header.s=rt-ed25519 header.b=p+Aqlpz1;\r\n"
    "\tdkim=pass (2048-bit key; unprotected) header.d=example.com header.i=@example.com"
    " header.a=rsa-sha256 header.s=rt-rsa header.b=Zp93Mxl/;\r\n"
    "\tdkim-atps=neutral\r\n"
)
#: Rspamd's one field (milter_headers, ``authentication-results`` routine).
RSPAMD = (
    "Authentication-Results: mx.peer.test;\r\n"
    "\tdkim=pass header.d=example.com header.s=rt-ed25519 header.b=LED0OeAY;\r\n"
    "\tdkim=pass header.d=example.com header.s=rt-rsa header.b=xrEBhoom;\r\n"
    "\tspf=pass (mx.peer.test: domain of sender@example.com designates 127.0.0.1 as"
    " permitted sender) smtp.mailfrom=sender@example.com;\r\n"
    "\tdmarc=pass (policy=reject) header.from=example.com\r\n"
)
#: Rspamd's field for a body altered after signing, sent with an envelope sender whose SPF
#: record names no host: the DMARC policy comment comes after the properties.
RSPAMD_FAIL = (
    "Authentication-Results: mx.peer.test;\r\n"
    '\tdkim=fail ("body hash did not verify") header.d=example.com header.s=rt-ed25519'
    " header.b=CbyMFUxj;\r\n"
    '\tdkim=fail ("body hash did not verify") header.d=example.com header.s=rt-rsa'
    " header.b=LgcydtrP;\r\n"
    "\tspf=fail (mx.peer.test: domain of bounces@other.test does not designate 127.0.0.1 as"
    " permitted sender) smtp.mailfrom=bounces@other.test;\r\n"
    '\tdmarc=fail reason="No valid SPF" header.from=example.com (policy=reject)\r\n'
)


def _read(*fields: str) -> list[tuple[str, str, str]]:
    """(code, severity, message) of every auth-<method> finding, in the reader's order."""
    raw = ("".join(fields) + RECEIVED + TAIL).encode()
    return [
        (f.code, f.severity, f.message)
        for f in auth_results(raw, RECEIVER)
        if f.code in ("auth-spf", "auth-dkim", "auth-dmarc")
    ]


def test_rspamd_field_reads_every_verdict_with_its_comment() -> None:
    assert _read(RSPAMD) == [
        (
            "auth-dkim",
            INFO,
            "mx.peer.test: dkim=pass (header.d=example.com, header.s=rt-ed25519,"
            " header.b=LED0OeAY)",
        ),
        (
            "auth-dkim",
            INFO,
            "mx.peer.test: dkim=pass (header.d=example.com, header.s=rt-rsa, header.b=xrEBhoom)",
        ),
        (
            "auth-spf",
            INFO,
            "mx.peer.test: spf=pass (comment 'mx.peer.test: domain of sender@example.com"
            " designates 127.0.0.1 as permitted sender', smtp.mailfrom=sender@example.com)",
        ),
        (
            "auth-dmarc",
            INFO,
            "mx.peer.test: dmarc=pass (comment 'policy=reject', header.from=example.com)",
        ),
    ]


def test_opendkim_field_reads_both_signatures_and_the_comment_with_a_semicolon() -> None:
    """The comment ``(2048-bit key; unprotected)`` holds a semicolon; ``dkim-atps`` (RFC
    6541) is not a DKIM verdict and is not reported as one."""
    assert _read(OPENDKIM) == [
        (
            "auth-dkim",
            INFO,
            "mx.peer.test: dkim=pass (header.d=example.com, header.i=@example.com,"
            " header.a=ed25519-sha256, header.s=rt-ed25519, header.b=p+Aqlpz1)",
        ),
        (
            "auth-dkim",
            INFO,
            "mx.peer.test: dkim=pass (comment '2048-bit key; unprotected',"
            " header.d=example.com, header.i=@example.com, header.a=rsa-sha256,"
            " header.s=rt-rsa, header.b=Zp93Mxl/)",
        ),
    ]


def test_opendmarc_fields_read_alone() -> None:
    assert _read(OPENDMARC_DMARC) == [
        (
            "auth-dmarc",
            INFO,
            "mx.peer.test: dmarc=pass (comment 'p=reject dis=none', header.from=example.com)",
        )
    ]
    assert _read(OPENDMARC_SPF) == [
        ("auth-spf", INFO, "mx.peer.test: spf=pass (smtp.mailfrom=example.com)")
    ]


@pytest.mark.xfail(
    strict=True,
    reason="auth_results reads only the topmost field of the receiving host: with OpenDKIM"
    " and OpenDMARC (one field per milter and method) it reports dmarc= and drops spf= and"
    " both dkim=",
)
def test_opendkim_opendmarc_fields_of_one_host_are_all_read() -> None:
    """RFC 8601 lets one authserv-id write several fields; every field of the receiving host
    (all above its Received field) is its verdict."""
    methods = sorted(code for code, _, _ in _read(OPENDMARC_DMARC, OPENDMARC_SPF, OPENDKIM))
    assert methods == ["auth-dkim", "auth-dkim", "auth-dmarc", "auth-spf"]


def test_rspamd_fail_field_reads_every_failure_as_a_warning() -> None:
    found = _read(RSPAMD_FAIL)
    assert [(code, severity) for code, severity, _ in found] == [
        ("auth-dkim", WARN),
        ("auth-dkim", WARN),
        ("auth-spf", WARN),
        ("auth-dmarc", WARN),
    ]
    assert all("body hash did not verify" in message for _, _, message in found[:2]), found
    assert "smtp.mailfrom=bounces@other.test" in found[2][2], found
    assert "reason 'No valid SPF'" in found[3][2] and "header.from=example.com" in found[3][2]


@pytest.mark.xfail(
    strict=True,
    reason="auth_results keeps only a comment right after method=result; Rspamd writes the"
    " policy of a failed DMARC check after the properties: '(policy=reject)' is dropped",
)
def test_rspamd_dmarc_failure_keeps_the_policy_comment() -> None:
    (dmarc,) = [message for code, _, message in _read(RSPAMD_FAIL) if code == "auth-dmarc"]
    assert "policy=reject" in dmarc, dmarc
