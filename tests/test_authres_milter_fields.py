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

from roundtrip.probes._net import INFO, WARN, Finding
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


def _findings(*fields: str, above: str = "", receiver: str = RECEIVER) -> list[Finding]:
    """Every finding of the reader on ``above``, the fields, then the receiver's Received."""
    raw = (above + "".join(fields) + RECEIVED + TAIL).encode()
    return auth_results(raw, receiver)


def test_opendkim_opendmarc_fields_of_one_host_are_all_read() -> None:
    """RFC 8601 lets one authserv-id write several fields; every field of the receiving host
    (all above its Received field) is its verdict, each result with its own comment and its
    own field as evidence, every field in the summary's evidence."""
    assert _read(OPENDMARC_DMARC, OPENDMARC_SPF, OPENDKIM) == [
        (
            "auth-dmarc",
            INFO,
            "mx.peer.test: dmarc=pass (comment 'p=reject dis=none', header.from=example.com)",
        ),
        ("auth-spf", INFO, "mx.peer.test: spf=pass (smtp.mailfrom=example.com)"),
        *_read(OPENDKIM),
    ]
    found = _findings(OPENDMARC_DMARC, OPENDMARC_SPF, OPENDKIM)
    (summary,) = [f for f in found if f.code == "auth-results"]
    assert summary.message == (
        "Authentication-Results by mx.peer.test (the field of the receiving host mx.peer.test"
        " and the 2 below it with that authserv-id): dmarc=pass, spf=pass, dkim=pass,"
        " dkim=pass, dkim-atps=neutral"
    )
    assert [e[:60] for e in summary.evidence] == [
        _unfolded(OPENDMARC_DMARC)[:60],
        _unfolded(OPENDMARC_SPF)[:60],
        _unfolded(OPENDKIM)[:60],
    ]
    evidence = {f.message.split()[1]: f.evidence for f in found if f.code != "auth-results"}
    assert evidence["dmarc=pass"] == (_unfolded(OPENDMARC_DMARC),)
    assert evidence["spf=pass"] == (_unfolded(OPENDMARC_SPF),)
    assert evidence["dkim=pass"] == summary.evidence[2:]


def _unfolded(field: str) -> str:
    """A field as the reader shows it: unfolded, without its line end."""
    return " ".join(line.strip() for line in field.strip().split("\r\n"))


def test_fields_of_another_authserv_id_are_not_merged() -> None:
    """The twin: a field of another authserv-id between the receiver's fields ends the
    block. What lies below it came with the message: a receiver that follows RFC 8601
    section 5 removes such fields, one that does not must not have them read as its own."""
    foreign = "Authentication-Results: forger.example; dkim=pass header.d=example.com\r\n"
    forged = "Authentication-Results: mx.peer.test; spf=pass smtp.mailfrom=example.com\r\n"
    found = _findings(OPENDMARC_DMARC, foreign, forged)
    assert [(f.code, f.server) for f in found] == [
        ("auth-results", RECEIVER),
        ("auth-dmarc", RECEIVER),
    ]
    assert found[0].message.endswith(
        ": dmarc=pass; 1 field of mx.peer.test below a field of forger.example not read:"
        " they came with the message (RFC 8601 section 5)"
    ), found[0].message
    assert len(found[0].evidence) == 1
    # The foreign field alone is not merged either when it is picked (receiving host unknown).
    found = _findings(foreign, OPENDMARC_DMARC, receiver="")
    assert [(f.code, f.server) for f in found] == [
        ("auth-results", "forger.example"),
        ("auth-dkim", "forger.example"),
    ]


def test_a_received_field_of_another_host_ends_the_block() -> None:
    """A field with the receiver's authserv-id below the Received field of the host that
    handed the message over was in the message before the receiver saw it."""
    forged = "Authentication-Results: mx.peer.test; dkim=pass header.d=bank.example\r\n"
    sender = "Received: from [192.0.2.7] by mail.example.com (Postfix); 4 Dec 2026\r\n"
    raw = (OPENDMARC_DMARC + RECEIVED + sender + forged + TAIL).encode()
    found = auth_results(raw, RECEIVER)
    assert [f.code for f in found] == ["auth-results", "auth-dmarc"], found
    assert "1 field of mx.peer.test below a Received field of another host" in found[0].message
    # The twin: the receiver's own Received field (Gmail writes its field below it) does
    # not end the block; a Received field's "by" inside a comment is not its host.
    own = "Received: from x (by mail.example.com) by mx.peer.test; 4 Dec 2026\r\n"
    raw = (OPENDMARC_DMARC + own + OPENDMARC_SPF + TAIL).encode()
    assert [f.code for f in auth_results(raw, RECEIVER)] == [
        "auth-results",
        "auth-dmarc",
        "auth-spf",
    ]


def test_fields_without_an_authserv_id_are_not_merged() -> None:
    """Microsoft 365 writes fields without an authserv-id (against RFC 8601 section 2.2),
    on the sending side too: such a field names no host, so only the picked one is read."""
    raw = (
        "Authentication-Results: spf=pass smtp.mailfrom=example.com; dmarc=pass"
        " action=none header.from=example.com\r\n"
        "Authentication-Results: dkim=none (message not signed) header.d=none\r\n" + TAIL
    ).encode()
    found = auth_results(raw, "")
    assert [f.code for f in found] == ["auth-results", "auth-spf", "auth-dmarc"], found


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


def test_rspamd_dmarc_failure_keeps_the_policy_comment() -> None:
    (dmarc,) = [message for code, _, message in _read(RSPAMD_FAIL) if code == "auth-dmarc"]
    assert dmarc == (
        "mx.peer.test: dmarc=fail (comment 'policy=reject', reason 'No valid SPF',"
        " header.from=example.com)"
    )


def test_every_comment_of_a_result_is_kept_and_no_other() -> None:
    """Comments before, between and after the properties are joined with "; "; a comment of
    the next result, or one inside a quoted string, is not taken."""
    field = (
        'Authentication-Results: mx.peer.test; dmarc=fail (first) reason="a (not) b"'
        " header.from=example.com (policy=reject (nested)); spf=pass (its own)"
        " smtp.mailfrom=example.com\r\n"
    )
    assert _read(field) == [
        (
            "auth-dmarc",
            WARN,
            "mx.peer.test: dmarc=fail (comment 'first; policy=reject (nested)',"
            " reason 'a (not) b', header.from=example.com)",
        ),
        (
            "auth-spf",
            INFO,
            "mx.peer.test: spf=pass (comment 'its own', smtp.mailfrom=example.com)",
        ),
    ]


def test_a_quoted_string_that_is_the_whole_comment_loses_its_quotes() -> None:
    (dkim, _, _, _) = _read(RSPAMD_FAIL)
    assert dkim[2].startswith("mx.peer.test: dkim=fail (comment 'body hash did not verify',")
    # The twin: quotes that are only part of a comment stay.
    field = 'Authentication-Results: mx.peer.test; dkim=fail (key "rt" revoked) header.d=a.test\r\n'
    assert _read(field) == [
        (
            "auth-dkim",
            WARN,
            "mx.peer.test: dkim=fail (comment 'key \"rt\" revoked', header.d=a.test)",
        )
    ]
