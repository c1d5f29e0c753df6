"""roundtrip.testing: saved mail (LF line endings, leading trace fields, no Date or
Message-ID) round-trips as ``identical``, and a message changed in transit still fails.

The pure tests build outcomes from bytes; the stack tests submit through a real stack
(465 -> relay -> MX -> IMAP) with smtplib and download with imaplib.
"""

from __future__ import annotations

import smtplib

import pytest

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
