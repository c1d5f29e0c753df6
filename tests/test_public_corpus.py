"""The README recipe over messages shaped like real saved mail (tests/data/public-corpus).

LF line endings, leading Delivered-To/Received/Return-Path, no Date or Message-ID, legacy
charsets, MIME oddities: every file must round-trip through a real stack as ``identical``
(465 -> relay -> DNS MX -> MX -> IMAP ``BODY[]``), and a message changed in transit must not.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import pytest

from roundtrip.corpus import CorpusMessage, corpus_params, iter_corpus
from roundtrip.stack import MailStack
from roundtrip.testing import SUBMISSION_FIELDS, canonical_form, roundtrip_eml

PUBLIC = Path(__file__).parent / "data" / "public-corpus"
MESSAGES = iter_corpus(PUBLIC)
BARE_LF = re.compile(rb"(?<!\r)\n")


def _head(raw: bytes) -> bytes:
    return re.split(rb"\n\r?\n", raw, maxsplit=1)[0]


def _has(raw: bytes, name: bytes) -> bool:
    return re.search(rb"(?im)^" + re.escape(name) + rb"[ \t]*:", _head(raw)) is not None


# -- the corpus as data ----------------------------------------------------------------------


def test_public_corpus_has_20_to_40_indexed_messages() -> None:
    assert 20 <= len(MESSAGES) <= 40
    assert all(m.description for m in MESSAGES), "every file is described in INDEX.tsv"
    on_disk = {p.name for p in PUBLIC.glob("*.eml")}
    assert {m.name for m in MESSAGES} == on_disk
    assert (PUBLIC / "README.md").read_text(encoding="utf-8").count("written for this project")


@pytest.mark.parametrize("message", MESSAGES, ids=str)
def test_public_corpus_is_saved_mail_not_canonical(message: CorpusMessage) -> None:
    assert BARE_LF.search(message.raw), "every file uses LF line endings"
    assert canonical_form(message.raw) != message.raw
    assert "bare-lf" in message.flags
    longest = max(len(line) for line in re.split(rb"\r\n|\n|\r", message.raw))
    assert longest <= 998
    assert email.message_from_bytes(message.raw, policy=email.policy.default)["From"]


def test_public_corpus_covers_the_cases_of_saved_mail() -> None:
    first = {m.name: _head(m.raw).split(b":", 1)[0].lower() for m in MESSAGES}
    assert {b"delivered-to", b"received", b"return-path"} <= set(first.values())
    lacking = {
        name.lower(): [m.name for m in MESSAGES if not _has(m.raw, name.encode())]
        for name in SUBMISSION_FIELDS
    }
    assert lacking["date"] and lacking["message-id"]
    assert set(lacking["date"]) & set(lacking["message-id"]), "one lacks both"
    assert any(len(m.raw) > 1000 for m in MESSAGES), "one is too long to be one SMTP line"
    assert any(re.search(rb"\n[ \t]", _head(m.raw)) for m in MESSAGES), "folded headers"
    assert any("8bitmime" in m.flags for m in MESSAGES)
    assert any("no-final-newline" in m.flags for m in MESSAGES)
    assert any("bare-cr" in m.flags for m in MESSAGES)


# -- the README recipe -----------------------------------------------------------------------


@pytest.mark.parametrize("eml", corpus_params(PUBLIC), ids=str)
def test_public_corpus_email_survives(mailstack: MailStack, eml: CorpusMessage) -> None:
    outcome = roundtrip_eml(mailstack, eml.raw)  # 465 -> relay -> MX -> IMAP BODY[]
    assert outcome.identical, outcome.diff()
    assert outcome.original == eml.raw
    assert outcome.delivered == canonical_form(eml.raw)
    added = {name.lower() for name in outcome.submission_fields}
    missing = {name.lower() for name in SUBMISSION_FIELDS if not _has(eml.raw, name.encode())}
    assert added == missing


def test_public_corpus_email_altered_in_transit_fails(mailstack: MailStack) -> None:
    """The twin: the same recipe on a stack that changes one body byte fails, with a diff."""
    (eml,) = [m for m in MESSAGES if m.name.startswith("01-")]
    mailstack.faults.alter_body = True
    outcome = roundtrip_eml(mailstack, eml.raw)
    assert not outcome.identical
    assert not outcome.equivalent
    text = outcome.diff()
    assert "note: line endings converted to CRLF for submission" in text
    assert "vs submitted canonical form: first difference at byte" in text
    assert outcome.added_fields[-1] == "Received"
    assert outcome.delivered.startswith(b"Delivered-To: sam@example.org\r\n")
