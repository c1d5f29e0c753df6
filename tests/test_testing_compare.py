"""roundtrip.testing: saved mail (LF line endings, leading trace fields, no Date or
Message-ID) round-trips as ``identical``, and a message changed in transit still fails.

The pure tests build outcomes from bytes; the stack tests submit through a real stack
(465 -> relay -> MX -> IMAP) with smtplib and download with imaplib.
"""

from __future__ import annotations

import email.policy
import re
import smtplib
from email import message_from_bytes

import pytest

from roundtrip.corpus import corpus_params
from roundtrip.stack import MailStack
from roundtrip.testing import (
    SUBMISSION_FIELDS,
    RoundtripOutcome,
    canonical_form,
    roundtrip_eml,
    send_eml,
    split_added_headers,
)

# What the stack prepends: the filter's fields, then one Received per SMTP hop.
PREPENDED = (
    b"X-Spam-Flag: NO\r\n"
    b"Received: from mail.example.com by mail.example.org with ESMTPS id Q1;\r\n"
    b"\tMon, 3 Jun 2024 12:00:02 +0000\r\n"
    b"Received: from client by mail.example.com with ESMTPSA id Q0;\r\n"
    b"\tMon, 3 Jun 2024 12:00:01 +0000\r\n"
)
SUBMISSION = b"Message-ID: <Q0@example.com>\r\nDate: Mon, 03 Jun 2024 12:00:01 -0000\r\n"

# A message as saved on a Unix system: LF endings, its own trace fields first, no Date and
# no Message-ID, one body line longer than 1,000 octets once the LFs are gone.
SAVED = (
    b"Delivered-To: list-owner@example.org\n"
    b"Received: from relay.example.net by mx.example.org; Tue, 26 Sep 2000 12:23:03 -0500\n"
    b"From: Anne <user@example.com>\n"
    b"To: user@example.org\n"
    b"Subject: Limiting CPU use\n"
    b"\n" + b"".join(b"line %03d of a long saved message\n" % i for i in range(60))
)


def _stored(canonical: bytes, inserted: bytes = SUBMISSION) -> bytes:
    """What the stack stores for ``canonical``: prepended fields, then the submission's."""
    split = canonical.index(b"\r\n\r\n") + 2
    return PREPENDED + canonical[:split] + inserted + canonical[split:]


# -- canonical form --------------------------------------------------------------------------


def test_testing_canonical_form_converts_bare_lf_and_cr() -> None:
    assert canonical_form(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    # LF CR is two line ends, CR CR LF a bare CR then a CRLF.
    assert canonical_form(b"a\n\rb\r\r\n") == b"a\r\n\r\nb\r\n\r\n"
    assert canonical_form(b"a\n") == b"a\r\n"
    assert canonical_form(b"") == b"\r\n"


def test_testing_canonical_form_keeps_a_canonical_message() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    assert canonical_form(raw) is raw


# -- locating what was added (pure) ----------------------------------------------------------


def test_testing_outcome_saved_mail_with_its_own_trace_fields_is_identical() -> None:
    canonical = canonical_form(SAVED)
    stored = _stored(canonical)
    outcome = RoundtripOutcome.build(canonical, stored, {"imap": stored}, original=SAVED)
    assert outcome.identical, outcome.diff()
    assert outcome.added_headers == PREPENDED
    assert outcome.added_fields == ["X-Spam-Flag", "Received", "Received"]
    assert outcome.submission_fields == ["Message-ID", "Date"]
    assert outcome.delivered == canonical
    assert outcome.diff() == (
        "identical (line endings converted to CRLF for submission (66 bare LF); "
        "added by the submission server, as the message lacked them (RFC 6409 section 8): "
        "Message-ID, Date)"
    )
    # The message's own Delivered-To and Received stay part of the message.
    assert split_added_headers(stored, canonical) == (PREPENDED, stored[len(PREPENDED) :])


def test_testing_outcome_one_submission_field_when_only_one_is_missing() -> None:
    canonical = canonical_form(SAVED).replace(
        b"To:", b"Date: Tue, 26 Sep 2000 12:23:03 -0500\r\nTo:"
    )
    stored = _stored(canonical, b"Message-ID: <Q0@example.com>\r\n")
    outcome = RoundtripOutcome.build(canonical, stored, {"imap": stored})
    assert outcome.identical, outcome.diff()
    assert outcome.submission_fields == ["Message-ID"]
    assert outcome.diff().startswith("identical (added by the submission server")


@pytest.mark.parametrize(
    ("inserted", "shown"),
    [
        (b"Date: Mon, 03 Jun 2024 12:00:01 -0000\r\n", "Date: Mon, 03 Jun 2024 12:00:01 -0000"),
        (b"X-Rewritten: yes\r\n", "X-Rewritten: yes"),
        (b"Message-ID: <a@x>\r\nMessage-ID: <b@x>\r\n", "Message-ID: <b@x>"),
    ],
    ids=["already-has-date", "not-a-submission-field", "added-twice"],
)
def test_testing_outcome_inserted_fields_the_server_may_not_add_fail(
    inserted: bytes, shown: str
) -> None:
    canonical = b"From: <user@example.com>\r\nDate: Mon, 3 Jun 2024 12:00:00 +0000\r\n\r\nhi\r\n"
    stored = _stored(canonical, inserted)
    outcome = RoundtripOutcome.build(canonical, stored, {"imap": stored})
    assert not outcome.identical
    assert not outcome.equivalent
    assert outcome.added_headers == PREPENDED
    text = outcome.diff()
    assert "vs submitted bytes: first difference at byte 64" in text
    assert f"+{shown}\\r\\n" in text


def test_testing_outcome_a_lost_leading_trace_field_of_the_message_fails() -> None:
    """The twin of the leading-Delivered-To case: a path that drops it changed the message."""
    canonical = canonical_form(SAVED)
    stored = _stored(canonical)
    own_first = canonical[: canonical.index(b"\r\n") + 2]
    damaged = stored.replace(own_first, b"", 1)
    outcome = RoundtripOutcome.build(canonical, damaged, {"imap": damaged}, original=SAVED)
    assert not outcome.identical
    assert not outcome.equivalent
    text = outcome.diff()
    assert text.startswith("note: line endings converted to CRLF for submission (66 bare LF)")
    assert "-Delivered-To: list-owner@example.org" in text


def test_testing_outcome_compares_against_the_bytes_submitted() -> None:
    """The twin: an outcome is checked against the submission, not against what came back."""
    canonical = canonical_form(SAVED)
    stored = _stored(canonical)
    other = canonical.replace(b"line 042", b"line 024")
    outcome = RoundtripOutcome.build(other, stored, {"imap": stored}, original=SAVED)
    assert not outcome.identical
    assert outcome.submission_fields == ["Message-ID", "Date"]
    text = outcome.diff()
    assert "-line 024 of a long saved message" in text
    assert "+line 042 of a long saved message" in text


def test_testing_submission_fields_are_what_the_stack_adds() -> None:
    from roundtrip.protocols.smtp import add_missing_headers

    raw = b"From: <user@example.com>\r\n\r\nhi\r\n"
    added = add_missing_headers(raw, domain="example.com", queue_id="Q", timestamp=0.0)
    outcome = RoundtripOutcome.build(raw, PREPENDED + added, {"imap": PREPENDED + added})
    assert outcome.identical, outcome.diff()
    assert sorted(outcome.submission_fields) == sorted(SUBMISSION_FIELDS)


def test_testing_submission_fields_after_an_empty_header() -> None:
    raw = b"\r\nbody only\r\n"
    stored = PREPENDED + SUBMISSION + raw
    outcome = RoundtripOutcome.build(raw, stored, {"imap": stored})
    assert outcome.identical, outcome.diff()
    assert outcome.added_headers == PREPENDED
    assert outcome.submission_fields == ["Message-ID", "Date"]


# -- what the added blocks must be: whole header fields (pure) -------------------------------

# Corpus messages: one in SMTP's canonical form (CRLF, a PDF attachment), one saved with bare
# LF and stored so (a store that keeps a file's line endings), both with Date and Message-ID.
(CRLF_MESSAGE,) = [m for m in corpus_params() if m.name == "11-attachment-pdf.eml"]
(LF_MESSAGE,) = [m for m in corpus_params() if m.name == "22-bare-lf-unix.eml"]
_DATE = b"Mon, 3 Jun 2024 12:00:02 +0000"


def _honest(eol: bytes) -> bytes:
    """What a hop prepends, folded as MTAs fold (RFC 5322 section 2.2.3), lines ending ``eol``."""
    lines = [
        b"X-Spam-Flag: NO",
        b"Authentication-Results: mail.example.org;",
        b"\tdkim=pass header.d=example.com header.s=rt-ed25519;",
        b"\tspf=pass smtp.mailfrom=example.com",
        b"Received: from mail.example.com (mail.example.com [127.0.0.1])",
        b"\tby mail.example.org with ESMTPS id Q1; " + _DATE,
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;",
        b"\ts=rt-rsa; h=from:to:subject:date:message-id;",
        b"\t bh=AAAA; b=BBBB",
        b"Return-Path: <user@example.com>",
        b"Received: from client by mail.example.com with ESMTPSA id Q0; " + _DATE,
    ]
    return b"".join(line + eol for line in lines)


@pytest.mark.parametrize(
    ("raw", "eol"),
    [(CRLF_MESSAGE.raw, b"\r\n"), (LF_MESSAGE.raw, b"\n")],
    ids=["crlf", "bare-lf"],
)
def test_testing_outcome_honest_added_fields_are_identical(raw: bytes, eol: bytes) -> None:
    stored = _honest(eol) + raw
    outcome = RoundtripOutcome.build(raw, stored, {"imap": stored})
    assert outcome.identical, outcome.diff()
    assert outcome.equivalent
    assert outcome.malformed_added == []
    assert outcome.added_fields == [
        "X-Spam-Flag",
        "Authentication-Results",
        "Received",
        "DKIM-Signature",
        "Return-Path",
        "Received",
    ]
    assert outcome.diff() == "identical"


_RECEIVED = b"Received: from a by b; " + _DATE


@pytest.mark.parametrize(
    ("raw", "prepended", "reason", "quoted", "names"),
    [
        # An empty line: the message's own header (From, MIME structure) becomes body.
        (
            CRLF_MESSAGE.raw,
            _RECEIVED + b"\r\n\r\n",
            "line 2 is empty (an empty line ends the header block",
            r"b'\r\n'",
            [],
        ),
        (
            LF_MESSAGE.raw,
            _RECEIVED + b"\n\n",
            "line 2 is empty (an empty line ends the header block",
            r"b'\n'",
            [],
        ),
        # A lone CR: a new Content-Type for parsers that end lines at CR.
        (
            CRLF_MESSAGE.raw,
            _RECEIVED + b"\rContent-Type: text/plain\r\n",
            "line 1 has a CR that does not end the line",
            r"\rContent-Type: text/plain\r\n'",
            [],
        ),
        (
            LF_MESSAGE.raw,
            _RECEIVED + b"\rContent-Type: text/plain\n",
            "line 1 has a CR that does not end the line",
            r"\rContent-Type: text/plain\n'",
            [],
        ),
        # A lone LF in a CRLF message, and CRLF in a message whose lines end in LF.
        (
            CRLF_MESSAGE.raw,
            _RECEIVED + b"\nContent-Type: text/plain\r\n",
            "line 1 has an LF that does not end the line",
            r"\nContent-Type: text/plain\r\n'",
            ["Content-Type"],
        ),
        (
            LF_MESSAGE.raw,
            _RECEIVED + b"\r\n",
            "line 1 ends in CRLF where the message's lines end in LF",
            r"+0000\r\n'",
            [],
        ),
        # Lines that are neither a field nor a continuation of one.
        (
            CRLF_MESSAGE.raw,
            _RECEIVED + b"\r\n \t\r\n",
            "line 2 is white space only",
            r"b' \t\r\n'",
            [],
        ),
        (
            CRLF_MESSAGE.raw,
            b"\tby b; " + _DATE + b"\r\n" + _RECEIVED + b"\r\n",
            "line 1 continues a field that is not there",
            r"b'\tby b; Mon",
            ["by b; Mon, 3 Jun 2024 12"],
        ),
        (
            LF_MESSAGE.raw,
            _RECEIVED + b"\nno colon here\n",
            "line 2 is neither a field (name and colon) nor a continuation",
            r"b'no colon here\n'",
            ["no colon here"],
        ),
    ],
    ids=[
        "empty-line-crlf",
        "empty-line-lf",
        "lone-cr-crlf",
        "lone-cr-lf",
        "lone-lf-crlf",
        "crlf-in-lf",
        "white-space-line",
        "leading-continuation",
        "not-a-field",
    ],
)
def test_testing_outcome_damaged_added_fields_are_not_identical(
    raw: bytes, prepended: bytes, reason: str, quoted: str, names: list[str]
) -> None:
    """Allowed field names are not enough: what a hop prepends must be header fields. In
    most cases the names read at LF are all allowed (``names`` empty)."""
    stored = prepended + raw
    outcome = RoundtripOutcome.build(raw, stored, {"imap": stored})
    assert outcome.delivered == raw  # the message's own bytes are all there
    assert outcome.unexpected_added == names
    assert not outcome.identical
    assert not outcome.equivalent
    (problem,) = outcome.malformed_added
    assert problem.startswith(f"prepended fields, {reason}")
    assert quoted in problem
    assert f"added fields that are not well-formed header fields: {problem}" in outcome.diff()


def test_testing_outcome_an_empty_line_on_top_hides_the_message_header() -> None:
    """Why the empty line matters: a reader finds no From and no attachment any more."""
    stored = _RECEIVED + b"\r\n\r\n" + CRLF_MESSAGE.raw
    parsed = message_from_bytes(stored, policy=email.policy.default)
    assert parsed["From"] is None and not parsed.is_multipart()
    assert not RoundtripOutcome.build(CRLF_MESSAGE.raw, stored, {"imap": stored}).identical
    # The twin: with the field only, the reader sees the message as sent.
    stored = _RECEIVED + b"\r\n" + CRLF_MESSAGE.raw
    assert message_from_bytes(stored, policy=email.policy.default).is_multipart()
    assert RoundtripOutcome.build(CRLF_MESSAGE.raw, stored, {"imap": stored}).identical


@pytest.mark.parametrize(
    ("inserted", "shown"),
    [
        (
            b"Date: Mon, 3 Jun 2024 12:00:01 -0000\rContent-Type: text/plain\r\n",
            ["+Date: Mon, 3 Jun 2024 12:00:01 -0000\\r", "+Content-Type: text/plain\\r\\n"],
        ),
        (b"Date: Mon, 3 Jun 2024 12:00:01 -0000\r\n\r\n", ["+\\r\\n"]),
        (
            b"Date: Mon, 3 Jun 2024 12:00:01 -0000\r\n \r\n",
            ["+Date: Mon, 3 Jun 2024 12:00:01 -0000\\r\\n", "+ \\r\\n"],
        ),
    ],
    ids=["lone-cr", "empty-line", "white-space-line"],
)
def test_testing_outcome_damaged_submission_fields_are_not_identical(
    inserted: bytes, shown: list[str]
) -> None:
    """The fields added at the end of the header must be header fields too: what is not
    stays part of the message, and the diff quotes it."""
    canonical = b"From: <user@example.com>\r\nMessage-ID: <m@example.com>\r\n\r\nhi\r\n"
    stored = _stored(canonical, inserted)
    outcome = RoundtripOutcome.build(canonical, stored, {"imap": stored})
    assert not outcome.identical
    assert not outcome.equivalent
    text = outcome.diff()
    assert "vs submitted bytes: first difference at byte" in text
    for line in shown:
        assert f"\n  {line}\n" in text
    # The twin: the same Date field, well formed, is the submission server's addition.
    good = _stored(canonical, b"Date: Mon, 3 Jun 2024 12:00:01 -0000\r\n")
    outcome = RoundtripOutcome.build(canonical, good, {"imap": good})
    assert outcome.identical, outcome.diff()
    assert outcome.submission_fields == ["Date"]


def test_testing_outcome_submission_fields_of_a_bare_lf_message_are_identical() -> None:
    """A message stored with bare LF gets its Date in LF too; CRLF there is a change."""
    raw = re.sub(rb"(?m)^Date: [^\n]*\n", b"", LF_MESSAGE.raw, count=1)
    split = raw.index(b"\n\n") + 1
    date = b"Date: Mon, 3 Jun 2024 12:00:01 -0000"
    stored = _honest(b"\n") + raw[:split] + date + b"\n" + raw[split:]
    outcome = RoundtripOutcome.build(raw, stored, {"imap": stored})
    assert outcome.identical, outcome.diff()
    assert outcome.submission_fields == ["Date"]
    mixed = _honest(b"\n") + raw[:split] + date + b"\r\n" + raw[split:]
    assert not RoundtripOutcome.build(raw, mixed, {"imap": mixed}).identical


# -- through the stack -----------------------------------------------------------------------


def test_roundtrip_eml_saved_mail_is_identical(mailstack: MailStack) -> None:
    assert max(len(line) for line in SAVED.split(b"\r")) > 1000  # one "line" to SMTP as is
    outcome = roundtrip_eml(mailstack, SAVED, retrieve="both")
    assert outcome.identical, outcome.diff()
    assert outcome.original == SAVED
    assert outcome.submitted == canonical_form(SAVED)
    assert outcome.submission_fields == ["Message-ID", "Date"]
    assert outcome.added_fields[-4:] == ["Received", "DKIM-Signature", "DKIM-Signature", "Received"]
    assert outcome.delivered.startswith(b"Delivered-To: list-owner@example.org\r\nReceived:")
    assert "line endings converted to CRLF for submission (66 bare LF)" in outcome.diff()


def test_roundtrip_eml_without_canonicalize_sends_the_bytes_as_they_are(
    mailstack: MailStack,
) -> None:
    """The twin: unconverted, the LF-only message is one 2,000-octet line, refused by SMTP."""
    with pytest.raises(smtplib.SMTPDataError) as info:
        roundtrip_eml(mailstack, SAVED, canonicalize=False, timeout=5)
    assert info.value.smtp_code == 500
    assert b"Line too long" in info.value.smtp_error
    assert mailstack.messages() == []


def test_roundtrip_eml_without_canonicalize_is_only_equivalent(mailstack: MailStack) -> None:
    raw = b"Subject: short\nFrom: <user@example.com>\n\nbare LF body\n"
    outcome = roundtrip_eml(mailstack, raw, canonicalize=False)
    assert outcome.original is None
    assert outcome.submitted == raw
    assert not outcome.identical
    assert outcome.equivalent, outcome.diff()
    assert "converted" not in outcome.diff()
    assert "(equal after line-ending normalisation)" in outcome.diff()


def test_roundtrip_eml_detects_a_body_altered_in_transit(mailstack: MailStack) -> None:
    mailstack.faults.alter_body = True
    outcome = roundtrip_eml(mailstack, SAVED)
    assert outcome.downloads_match
    assert outcome.submission_fields == ["Message-ID", "Date"]
    assert not outcome.identical
    assert not outcome.equivalent
    text = outcome.diff()
    assert "note: line endings converted to CRLF for submission (66 bare LF)" in text
    assert "vs submitted canonical form: first difference at byte" in text


def test_send_eml_converts_line_endings_unless_told_not_to(mailstack: MailStack) -> None:
    body = b"x" * 600 + b"\n" + b"y" * 600 + b"\n"
    send_eml(mailstack, b"Subject: one\n\n" + body, timeout=5)
    stored = mailstack.wait_for("user@example.org", subject="one", timeout=5).raw
    assert stored.endswith(b"\r\n\r\n" + body.replace(b"\n", b"\r\n"))
    with pytest.raises(smtplib.SMTPDataError) as info:
        send_eml(mailstack, b"Subject: two\n\n" + body, canonicalize=False, timeout=5)
    assert info.value.smtp_code == 500
