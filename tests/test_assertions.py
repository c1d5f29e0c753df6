"""roundtrip.assertions and roundtrip.testing: each helper passes, and fails readably (twins)."""

from __future__ import annotations

import re
import ssl
import textwrap
from pathlib import Path

import pytest

from roundtrip.assertions import (
    MAX_SHOWN,
    Criteria,
    assert_delivered,
    assert_not_delivered,
    body_contains,
    header_matches,
)
from roundtrip.config import Endpoint, Forward
from roundtrip.corpus import corpus_params
from roundtrip.errors import NotDeliveredError
from roundtrip.message import ReceivedMessage
from roundtrip.protocols.filter import default_filter
from roundtrip.stack import MailStack
from roundtrip.testing import (
    RoundtripOutcome,
    relayed_form,
    roundtrip_eml,
    send_eml,
    smtp_options,
    split_added_headers,
)

ALICE = "user@example.com"
BOB = "user@example.org"


def msg(
    subject: str,
    *,
    to: str = BOB,
    sender: str = ALICE,
    body: str = "Hello Bob,\r\nyour code is 123456.\r\n",
    extra: str = "",
) -> ReceivedMessage:
    raw = (
        f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 03 Jun 2024 12:00:00 +0000\r\n{extra}\r\n{body}"
    ).encode()
    return ReceivedMessage(raw)


@pytest.fixture
def inbox() -> list[ReceivedMessage]:
    return [
        msg("Newsletter", extra="X-Spam-Flag: YES\r\n"),
        msg("Welcome aboard", extra="X-Spam-Flag: NO\r\nX-Campaign: onboarding-7\r\n"),
        msg("Invoice 42", to="carol@example.org"),
    ]


# -- assert_delivered ------------------------------------------------------------------------


def test_assert_delivered_returns_the_match(inbox: list[ReceivedMessage]) -> None:
    found = assert_delivered(inbox, to=BOB, subject="Welcome aboard", sender=ALICE)
    assert found == [inbox[1]]


def test_assert_delivered_reports_what_arrived_when_nothing_matches() -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered([msg("Newsletter")], subject="Password reset")
    text = str(info.value)
    assert text.startswith(
        "expected exactly 1 message to anyone with subject 'Password reset', but 0 matched."
    )
    assert "What did arrive (1):" in text
    assert f"from {ALICE} to {BOB} subject 'Newsletter' at 2024-06-03 12:00:00 +0000" in text
    assert "Closest candidate" not in text  # not similar enough to be a near miss


def test_assert_delivered_on_an_empty_mailbox_says_so() -> None:
    with pytest.raises(AssertionError, match="Nothing arrived"):
        assert_delivered([], to=BOB)


def test_assert_delivered_near_miss_subject_shows_a_diff(inbox: list[ReceivedMessage]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, to=BOB, subject="Welcome abord")
    text = str(info.value)
    assert "Closest candidate (only subject differs): from user@example.com" in text
    assert "diff of subject (- expected, + actual):" in text
    assert "- Welcome abord" in text
    assert "+ Welcome aboard" in text
    assert "?" in text  # ndiff's marker line points at the changed characters


def test_assert_delivered_near_miss_recipient(inbox: list[ReceivedMessage]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, to="carl@example.org", subject="Invoice 42")
    text = str(info.value)
    assert "Closest candidate (only to differs)" in text
    assert "it went to carol@example.org, not carl@example.org" in text
    assert "- carl@example.org" in text
    assert "+ carol@example.org" in text


def test_assert_delivered_near_miss_sender(inbox: list[ReceivedMessage]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, subject="Invoice 42", sender="user@example.net")
    assert "it came from user@example.com, not user@example.net" in str(info.value)


def test_assert_delivered_count_mismatch_lists_the_matches(
    inbox: list[ReceivedMessage],
) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, to=BOB, count=1)
    text = str(info.value)
    assert text.splitlines()[0] == (f"expected exactly 1 message to {BOB}, but 2 matched:")
    assert "subject 'Newsletter'" in text
    assert "subject 'Welcome aboard'" in text
    assert "Invoice 42" not in text


def test_assert_delivered_count_and_at_least_one(inbox: list[ReceivedMessage]) -> None:
    assert len(assert_delivered(inbox, to=BOB, count=2)) == 2
    assert len(assert_delivered(inbox, count=None)) == 3
    assert assert_delivered(inbox, subject="nope", count=0) == []
    with pytest.raises(AssertionError, match=r"expected exactly 0 messages .* but 1 matched"):
        assert_delivered(inbox, subject="Newsletter", count=0)
    with pytest.raises(AssertionError, match="expected at least 1 message"):
        assert_delivered(inbox, subject="nope", count=None)
    with pytest.raises(ValueError, match="count must be"):
        assert_delivered(inbox, count=-1)


def test_assert_delivered_subject_regex(inbox: list[ReceivedMessage]) -> None:
    assert assert_delivered(inbox, subject=re.compile(r"^Invoice \d+$")) == [inbox[2]]
    with pytest.raises(AssertionError, match=r"with subject ~ '\^Receipt'"):
        assert_delivered(inbox, subject=re.compile(r"^Receipt"))


def test_assert_delivered_headers_mapping(inbox: list[ReceivedMessage]) -> None:
    found = assert_delivered(
        inbox, headers={"x-spam-flag": "NO", "X-Campaign": re.compile(r"onboarding-\d")}
    )
    assert found == [inbox[1]]


def test_assert_delivered_headers_mapping_fails_with_the_values(
    inbox: list[ReceivedMessage],
) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, subject="Welcome aboard", headers={"X-Campaign": "onboarding-8"})
    text = str(info.value)
    assert "with header X-Campaign = 'onboarding-8'" in text
    assert "Closest candidate (only header X-Campaign differs)" in text
    assert "X-Campaign: ['onboarding-7']" in text


def test_assert_delivered_body_contains(inbox: list[ReceivedMessage]) -> None:
    assert assert_delivered(inbox, subject="Welcome aboard", body_contains="123456")


def test_assert_delivered_body_contains_near_miss(inbox: list[ReceivedMessage]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, subject="Invoice 42", body_contains="your code is 123465.")
    text = str(info.value)
    assert "with body containing 'your code is 123465.'" in text
    assert "Closest candidate (only body differs)" in text
    assert "- your code is 123465." in text
    assert "+ your code is 123456." in text


def test_matchers_pass(inbox: list[ReceivedMessage]) -> None:
    assert assert_delivered(inbox, match=header_matches("X-Spam-Flag", "^YES$")) == [inbox[0]]
    assert len(assert_delivered(inbox, match=body_contains("Hello Bob"), count=3)) == 3


def test_matchers_describe_themselves_when_failing(inbox: list[ReceivedMessage]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_delivered(inbox, match=header_matches("X-Spam-Score", r"^\d"))
    assert "matching header X-Spam-Score ~ '^\\\\d'" in str(info.value)
    with pytest.raises(AssertionError, match="matching body containing 'Goodbye'"):
        assert_delivered(inbox, match=body_contains("Goodbye"))

    def is_urgent(message: ReceivedMessage) -> bool:
        return "URGENT" in message.subject

    with pytest.raises(AssertionError, match=r"matching is_urgent\(\)"):
        assert_delivered(inbox, match=is_urgent)
    with pytest.raises(AssertionError, match="matching the given predicate"):
        assert_delivered(inbox, match=lambda m: False)


def test_assert_delivered_shows_at_most_twenty_arrivals() -> None:
    many = [msg(f"Bulk mail number {i}") for i in range(50)]
    with pytest.raises(AssertionError) as info:
        assert_delivered(many, subject="Password reset")
    text = str(info.value)
    assert "What did arrive (50):" in text
    assert "(30 earlier not shown)" in text
    assert sum(line.startswith("  - ") for line in text.splitlines()) == MAX_SHOWN
    assert "Bulk mail number 49" in text
    assert "Bulk mail number 29'" not in text
    assert len(text.splitlines()) < 30


# -- assert_not_delivered --------------------------------------------------------------------


def test_assert_not_delivered_passes(inbox: list[ReceivedMessage]) -> None:
    assert_not_delivered(inbox, subject="Password reset")
    assert_not_delivered(inbox, to="carol@example.org", match=header_matches("X-Spam-Flag", "."))
    assert_not_delivered([])


def test_assert_not_delivered_fails_listing_the_matches(inbox: list[ReceivedMessage]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_not_delivered(inbox, to=BOB)
    text = str(info.value)
    assert text.splitlines()[0] == f"expected no message to {BOB}, but 2 matched:"
    assert "Newsletter" in text and "Welcome aboard" in text
    with pytest.raises(AssertionError, match="expected no message to anyone, but 3 matched"):
        assert_not_delivered(inbox)


def test_criteria_select_and_describe(inbox: list[ReceivedMessage]) -> None:
    criteria = Criteria(to=BOB, subject="Welcome aboard", body_contains="code")
    assert criteria.select(inbox) == [inbox[1]]
    assert criteria.failures(inbox[2]) == ["to", "subject"]
    assert criteria.describe() == (
        f"to {BOB} with subject 'Welcome aboard' with body containing 'code'"
    )


# -- against a running stack -----------------------------------------------------------------


def test_assert_delivered_on_stack_messages(mailstack: MailStack) -> None:
    raw = corpus_params()[0].raw
    outcome = roundtrip_eml(mailstack, raw)
    found = assert_delivered(mailstack.messages(), to=BOB, subject="Plain ASCII status note")
    assert found == [outcome.message]
    assert found[0].stored.mailbox == "INBOX"
    # The filter's fields are headers like any other.
    assert_delivered(mailstack.messages(), to=BOB, headers={"X-Spam-Flag": "NO"})


def test_assert_delivered_on_stack_messages_fails_with_mailbox_and_time(
    mailstack: MailStack,
) -> None:
    roundtrip_eml(mailstack, corpus_params()[0].raw)
    with pytest.raises(AssertionError) as info:
        assert_delivered(mailstack.messages(), to=BOB, subject="Plain ASCII status nte")
    text = str(info.value)
    assert "[INBOX]" in text
    assert re.search(r"at \d\d:\d\d:\d\d", text)
    assert "+ Plain ASCII status note" in text


# -- roundtrip.testing -----------------------------------------------------------------------


def test_testing_relayed_form() -> None:
    assert relayed_form(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert relayed_form(b"a\nb\rc") == b"a\r\nb\r\nc\r\n"
    # smtplib appends CRLF after a final bare LF; the relay then makes that LF a CRLF too.
    assert relayed_form(b"a\n") == b"a\r\n\r\n"


def test_testing_smtp_options() -> None:
    assert smtp_options(b"Subject: hi\r\n\r\nplain\r\n") == []
    assert smtp_options(b"Subject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n") == ["BODY=8BITMIME"]
    assert smtp_options(b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nx\r\n") == [
        "SMTPUTF8",
        "BODY=8BITMIME",
    ]
    assert smtp_options(b"Subject: x\r\n\r\nx\r\n", "j\u00fcrgen@example.com")[0] == "SMTPUTF8"


def test_testing_split_added_headers_keeps_the_messages_own_received() -> None:
    own = b"Received: from a by b; Mon, 3 Jun 2024 12:00:00 +0000\r\nSubject: x\r\n\r\nbody\r\n"
    added = b"X-Spam-Flag: NO\r\nReceived: from c\r\n\tby d; Mon, 3 Jun 2024 12:00:01 +0000\r\n"
    assert split_added_headers(added + own, own) == (added, own)
    outcome = RoundtripOutcome.build(own, added + own, {"imap": added + own})
    assert outcome.identical
    assert outcome.added_fields == ["X-Spam-Flag", "Received"]
    assert outcome.diff() == "identical"


def test_testing_outcome_reports_a_download_that_differs() -> None:
    own = b"Subject: x\r\n\r\nbody\r\n"
    stored = b"Received: by d\r\n" + own
    outcome = RoundtripOutcome.build(own, stored, {"imap": stored, "pop3": stored[:-3] + b"\r\n"})
    assert not outcome.identical
    assert not outcome.equivalent
    text = outcome.diff()
    assert "POP3 download vs stored: first difference at byte" in text
    assert "IMAP" not in text


def test_roundtrip_eml_over_pop3_and_both(mailstack: MailStack) -> None:
    raw = corpus_params()[1].raw
    outcome = roundtrip_eml(mailstack, raw, retrieve="pop3")
    assert outcome.identical, outcome.diff()
    assert list(outcome.fetched_by) == ["pop3"]
    both = roundtrip_eml(mailstack, raw, retrieve="both")
    assert list(both.fetched_by) == ["imap", "pop3"]
    assert both.identical, both.diff()
    assert both.message is not None and outcome.message is not None
    assert both.message.stored.uid > outcome.message.stored.uid


def test_roundtrip_eml_refuses_bad_arguments(mailstack: MailStack) -> None:
    with pytest.raises(ValueError, match="retrieve must be"):
        roundtrip_eml(mailstack, b"Subject: x\r\n\r\nx\r\n", retrieve="smtp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="POP3 reads only the INBOX"):
        roundtrip_eml(mailstack, b"Subject: x\r\n\r\nx\r\n", retrieve="pop3", mailbox="Junk")
    with pytest.raises(ValueError, match="not a user of this stack"):
        roundtrip_eml(mailstack, b"Subject: x\r\n\r\nx\r\n", sender="nobody@example.com")
    with pytest.raises(ValueError, match=r"'nobody@example\.org' is not a user"):
        roundtrip_eml(mailstack, b"Subject: x\r\n\r\nx\r\n", recipient="nobody@example.org")


def test_send_eml_to_an_endpoint_over_starttls(mailstack: MailStack) -> None:
    alice = mailstack.user("example.com")
    ep = mailstack.endpoints("example.com")
    endpoint = Endpoint(
        "smtp", "starttls", ep.host, ep.ports["submission"], alice.address, alice.password
    )
    refused = send_eml(
        endpoint,
        b"Subject: via 587\r\n\r\nhi\r\n",
        recipient=BOB,
        context=mailstack.client_context(),
        timeout=5,
    )
    assert refused == {}
    assert_delivered([mailstack.wait_for(BOB, subject="via 587")], subject="via 587")


def test_send_eml_to_an_endpoint_verifies_the_certificate(mailstack: MailStack) -> None:
    alice = mailstack.user("example.com")
    ep = mailstack.endpoints("example.com")
    endpoint = Endpoint(
        "smtp", "implicit", ep.host, ep.ports["submissions"], alice.address, alice.password
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        send_eml(endpoint, b"Subject: x\r\n\r\nx\r\n", recipient=BOB, timeout=5)
    assert mailstack.messages() == []


# -- user style: parametrise over your own directory of .eml files ---------------------------

EMAILS = {
    "welcome.eml": b"From: <user@example.com>\r\nTo: <user@example.org>\r\n"
    b"Subject: Welcome\r\nDate: Mon, 03 Jun 2024 12:00:00 +0000\r\n"
    b"Message-ID: <w@example.com>\r\n\r\nHello!\r\n",
    "receipt.eml": b"From: <user@example.com>\r\nTo: <user@example.org>\r\n"
    b"Subject: =?utf-8?q?Quittung_f=C3=BCr_Bestellung?=\r\n"
    b"Date: Mon, 03 Jun 2024 12:00:00 +0000\r\nMessage-ID: <r@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nVielen Dank f\xc3\xbcr Ihre Bestellung.\r\n"
    b".leading dot\r\n",
    "report.eml": b"From: <user@example.com>\r\nTo: <user@example.org>\r\nSubject: Report\r\n"
    b"Date: Mon, 03 Jun 2024 12:00:00 +0000\r\nMessage-ID: <p@example.com>\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
    b'Content-Type: application/octet-stream; name="r.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--b--\r\n",
}

USER_TEST = textwrap.dedent(
    """
    from pathlib import Path

    import pytest

    from roundtrip.corpus import corpus_params
    from roundtrip.testing import roundtrip_eml

    HERE = Path(__file__).parent


    @pytest.mark.parametrize("eml", corpus_params(HERE / "emails"), ids=str)
    def test_email_survives(mailstack, eml):
        outcome = roundtrip_eml(mailstack, eml.raw)
        assert outcome.identical, outcome.diff()


    @pytest.mark.parametrize("eml", corpus_params(HERE / "unix"), ids=str)
    def test_unix_email_survives(mailstack, eml):
        outcome = roundtrip_eml(mailstack, eml.raw, retrieve="pop3", canonicalize=False)
        assert outcome.identical, outcome.diff()
    """
)


def test_user_style_parametrised_directory(pytester: pytest.Pytester) -> None:
    emails = pytester.mkdir("emails")
    for name, raw in EMAILS.items():
        (Path(emails) / name).write_bytes(raw)
    unix = pytester.mkdir("unix")
    (Path(unix) / "saved.eml").write_bytes(EMAILS["welcome.eml"].replace(b"\r\n", b"\n"))
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_inprocess("-v", "-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*test_email_survives?receipt.eml? PASSED*",
            "*test_email_survives?report.eml? PASSED*",
            "*test_email_survives?welcome.eml? PASSED*",
            "FAILED *test_unix_email_survives?saved.eml?*",
        ]
    )
    output = result.stdout.str()
    assert "stored message after 9 prepended field(s) vs submitted" in output
    assert "(equal after line-ending normalisation)" in output
    assert "first difference at byte" in output


# -- MailStack.assert_delivered / assert_not_delivered (delegating to roundtrip.assertions) ---


def test_stack_assert_delivered_waits_and_returns(mailstack: MailStack) -> None:
    send_eml(mailstack, b"Subject: Hello there\r\n\r\nbody text\r\n", timeout=5)
    (found,) = mailstack.assert_delivered(BOB, subject="Hello there", body_contains="body")
    assert found.stored.user == BOB


def test_stack_assert_delivered_fails_with_a_near_miss(mailstack: MailStack) -> None:
    send_eml(mailstack, b"Subject: Hello there\r\n\r\nbody text\r\n", timeout=5)
    mailstack.assert_delivered(BOB, subject="Hello there")
    with pytest.raises(AssertionError, match=r"(?s)only subject differs.*- Hello thera"):
        mailstack.assert_delivered(BOB, subject="Hello thera", timeout=0.2)


def test_stack_assert_not_delivered(mailstack: MailStack) -> None:
    send_eml(mailstack, b"Subject: Hello there\r\n\r\nbody text\r\n", timeout=5)
    mailstack.assert_not_delivered(subject="Other")
    with pytest.raises(AssertionError, match=f"expected no message to {BOB}, but 1 matched"):
        mailstack.assert_not_delivered(BOB)


# -- what the stack wrote, not what the sender wrote -----------------------------------------

FORGED_AUTH = (
    "Authentication-Results: mail.example.com; dkim=pass header.d=evil.test; spf=pass\r\n"
    "Authentication-Results: mx.elsewhere.test; dkim=pass header.d=evil.test\r\n"
)


def test_stack_auth_refuses_a_field_the_client_wrote_on_same_domain_mail(
    mailstack: MailStack,
) -> None:
    raw = f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: forged\r\n{FORGED_AUTH}\r\nhi\r\n"
    send_eml(mailstack, raw.encode(), recipient=ALICE, timeout=5)
    msg = mailstack.wait_for(ALICE, subject="forged", timeout=5)
    # Submission dropped the field in the stack's name (RFC 8601 section 5); the other
    # one is trace data and stays, but no MX of the stack wrote it.
    values = msg.headers.get_all("Authentication-Results")
    assert values == ["mx.elsewhere.test; dkim=pass header.d=evil.test"]
    assert msg.auth.authserv_id == "" and not msg.auth.results
    with pytest.raises(AssertionError) as info:
        mailstack.assert_delivered(ALICE, subject="forged", auth={"dkim": "pass"}, timeout=0.2)
    assert "no Authentication-Results field of the stack" in str(info.value)
    assert "no receiving MX of the stack checked it" in str(info.value)
    mailstack.assert_not_delivered(ALICE, auth={"dkim": "pass"}, timeout=0.2)


def test_stack_auth_reads_the_field_the_receiving_mx_added(mailstack: MailStack) -> None:
    """The twin: cross-domain mail gets the MX's own field, on top of the forged ones."""
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: checked\r\n{FORGED_AUTH}\r\nhi\r\n"
    send_eml(mailstack, raw.encode(), recipient=BOB, timeout=5)
    (msg,) = mailstack.assert_delivered(BOB, subject="checked", auth={"dkim": "pass"})
    assert msg.auth.authserv_id == "mail.example.org"
    assert not any("evil.test" in v for v in msg.stack_headers.get_all("Authentication-Results"))


def test_stack_auth_is_not_fooled_by_a_pass_the_sender_wrote_below(mailstack: MailStack) -> None:
    mailstack.faults.alter_body = True  # DKIM fails at the MX
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: altered\r\n{FORGED_AUTH}\r\nhello\r\n"
    send_eml(mailstack, raw.encode(), recipient=BOB, timeout=5)
    (msg,) = mailstack.assert_delivered(BOB, subject="altered", auth={"dkim": "fail"})
    with pytest.raises(AssertionError, match=r"dkim=fail"):
        mailstack.assert_delivered(BOB, subject="altered", auth={"dkim": "pass"}, timeout=0.2)
    assert [r.result for r in msg.auth.dkim] == ["fail", "fail"]


def test_stack_headers_match_the_filters_flag_not_the_senders(mailstack: MailStack) -> None:
    from roundtrip.protocols.filter import GTUBE

    raw = (
        (
            f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: cheap\r\nX-Spam-Flag: NO\r\n"
            "X-Campaign: spring\r\nX-Campaign: summer\r\n\r\n"
        ).encode()
        + GTUBE
        + b"\r\n"
    )
    send_eml(mailstack, raw, recipient=BOB, timeout=5)
    (msg,) = mailstack.assert_delivered(BOB, subject="cheap", headers={"X-Spam-Flag": "YES"})
    assert msg.headers.get_all("X-Spam-Flag") == ["YES", "NO"]  # both are in the message
    with pytest.raises(AssertionError) as info:
        mailstack.assert_delivered(BOB, subject="cheap", headers={"X-Spam-Flag": "NO"}, timeout=0.2)
    text = str(info.value)
    assert "X-Spam-Flag: ['YES']" in text
    assert "not the stack's, so not matched: X-Spam-Flag: ['NO']" in text
    mailstack.assert_not_delivered(BOB, headers={"X-Spam-Flag": "NO"}, timeout=0.2)
    assert_not_delivered(mailstack.messages(), match=header_matches("X-Spam-Flag", "NO"))
    # A field the stack never writes: any occurrence, as documented.
    mailstack.assert_delivered(BOB, subject="cheap", headers={"X-Campaign": "summer"})
    assert_delivered(mailstack.messages(), match=header_matches("X-Campaign", "^spring$"))


def test_stack_headers_on_same_domain_mail_have_no_spam_verdict(mailstack: MailStack) -> None:
    """Submission stores mail for its own domain without the MX's filter: the sender's
    X-Spam-Flag is all there is, and it is not the stack's."""
    raw = f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: own\r\nX-Spam-Flag: NO\r\n\r\nhi\r\n"
    send_eml(mailstack, raw.encode(), recipient=ALICE, timeout=5)
    mailstack.wait_for(ALICE, subject="own", timeout=5)
    with pytest.raises(AssertionError, match="the stack added no X-Spam-Flag field"):
        mailstack.assert_delivered(ALICE, subject="own", headers={"X-Spam-Flag": "NO"}, timeout=0.2)
    # The twin: the stack's own fields on that copy match (its Received, its DKIM signature).
    (msg,) = mailstack.assert_delivered(
        ALICE,
        subject="own",
        headers={"Received": re.compile(r"by mail\.example\.com .*ESMTPSA")},
    )
    assert msg.stack_headers.get("DKIM-Signature") is not None


# -- the relay: mail still on its way counts --------------------------------------------------


def _defer_at_the_mx(mailstack: MailStack) -> None:
    """example.org's MX answers 451 to every message until the filter is reset."""
    from roundtrip.protocols.filter import Verdict

    mailstack.content_filter = lambda message: Verdict(
        action="reject", reply="451 4.7.1 Try again later"
    )


def _send_held(mailstack: MailStack, subject: str) -> None:
    """ALICE -> BOB, held in the relay queue for a retry by a 451 at the MX."""
    _defer_at_the_mx(mailstack)
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    send_eml(mailstack, raw, recipient=BOB, timeout=5)
    mailstack.wait_relay(lambda q: any("451 4.7.1" in m.last_error for m in q), 5)


def test_stack_assert_not_delivered_fails_while_a_retry_is_pending(mailstack: MailStack) -> None:
    _send_held(mailstack, "later")
    with pytest.raises(AssertionError) as info:
        mailstack.assert_not_delivered(BOB, subject="later", timeout=0.3)
    text = str(info.value)
    assert "none matched yet, but it may still be delivered" in text
    assert f"Still in the relay queue for {BOB} (1)" in text
    assert re.search(r"1 attempt made, next attempt in \d+\.\d s \(at \d\d:\d\d:\d\d\)", text)
    assert "451 4.7.1 Try again later" in text
    # An exact count is not final either, 0 included.
    with pytest.raises(AssertionError, match="the count is not final"):
        mailstack.assert_delivered(BOB, subject="later", count=0, timeout=0.3)


def test_stack_assert_not_delivered_twins_around_a_pending_retry(mailstack: MailStack) -> None:
    _send_held(mailstack, "later")
    # Queued for BOB only: another recipient's assertions are not held up.
    send_eml(
        mailstack, f"Subject: mine\r\nTo: {ALICE}\r\n\r\nx\r\n".encode(), recipient=ALICE, timeout=5
    )
    mailstack.assert_not_delivered(ALICE, subject="later", timeout=5)
    mailstack.assert_delivered(ALICE, subject="mine", count=1, timeout=5)
    # The MX accepts again: the retry delivers, which the wait sees.
    mailstack.content_filter = default_filter
    with pytest.raises(AssertionError, match=f"expected no message to {BOB} .* but 1 matched"):
        mailstack.assert_not_delivered(BOB, subject="later", timeout=10)
    assert not mailstack.relay_queue()


def test_stack_assert_delivered_count_zero_waits_for_mail_in_flight(mailstack: MailStack) -> None:
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: inflight\r\n\r\nhi\r\n".encode()
    send_eml(mailstack, raw, recipient=BOB, timeout=5)
    with pytest.raises(AssertionError, match=r"exactly 0 messages .* but 1 matched"):
        mailstack.assert_delivered(BOB, subject="inflight", count=0, timeout=5)
    # The twin: nothing with that subject is on its way.
    mailstack.assert_delivered(BOB, subject="never sent", count=0, timeout=5)


def test_stack_assert_delivered_count_sees_a_duplicate_in_flight(mailstack: MailStack) -> None:
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: once\r\n\r\nhi\r\n".encode()
    send_eml(mailstack, raw, recipient=BOB, timeout=5)
    mailstack.wait_for(BOB, subject="once", timeout=5)
    send_eml(mailstack, raw, recipient=BOB, timeout=5)  # the application's duplicate
    with pytest.raises(AssertionError, match=r"exactly 1 message .* but 2 matched"):
        mailstack.assert_delivered(BOB, subject="once", count=1, timeout=5)
    assert len(mailstack.assert_delivered(BOB, subject="once", count=2, timeout=5)) == 2


# Two chains of aliases across both domains: team@ reaches BOB through list@example.org,
# staff@ reaches ALICE through crew@example.org (StackConfig.forwards).
_CHAINS = (
    Forward("team@example.com", ("list@example.org",)),
    Forward("list@example.org", (BOB,)),
    Forward("staff@example.com", ("crew@example.org",)),
    Forward("crew@example.org", (ALICE,)),
)


def _send_held_to_alias(mailstack: MailStack, alias: str, subject: str) -> None:
    """Mail to ``alias``, held in the relay queue (for the alias, its first hop) by a 451."""
    _defer_at_the_mx(mailstack)
    raw = f"From: {ALICE}\r\nTo: {alias}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    send_eml(mailstack, raw, recipient=alias, timeout=5)
    mailstack.wait_relay(
        lambda q: any(m.rcpt == (alias,) and "451 4.7.1" in m.last_error for m in q), 5
    )


@pytest.mark.mailstack(forwards=_CHAINS)
def test_stack_assert_not_delivered_follows_a_chain_of_aliases(mailstack: MailStack) -> None:
    """Queued for team@, the message reaches BOB through two aliases: not final for BOB."""
    _send_held_to_alias(mailstack, "team@example.com", "chained")
    with pytest.raises(AssertionError) as info:
        mailstack.assert_not_delivered(BOB, subject="chained", timeout=0.3)
    assert f"Still in the relay queue for {BOB} (1)" in str(info.value)
    # The MX accepts again: the chain delivers, which the wait sees.
    mailstack.content_filter = default_filter
    with pytest.raises(AssertionError, match=f"expected no message to {BOB} .* but 1 matched"):
        mailstack.assert_not_delivered(BOB, subject="chained", timeout=10)


@pytest.mark.mailstack(forwards=_CHAINS)
def test_stack_assert_not_delivered_twin_a_chain_to_someone_else(mailstack: MailStack) -> None:
    """Queued for staff@, whose chain ends at ALICE: BOB's assertion passes at once, and
    ALICE's does not."""
    _send_held_to_alias(mailstack, "staff@example.com", "elsewhere")
    mailstack.assert_not_delivered(BOB, subject="elsewhere", timeout=5)
    with pytest.raises(AssertionError, match=f"Still in the relay queue for {ALICE} \\(1\\)"):
        mailstack.assert_not_delivered(ALICE, subject="elsewhere", timeout=0.3)


# -- folders ---------------------------------------------------------------------------------


def _quarantined(mailstack: MailStack, subject: str) -> None:
    from roundtrip.protocols.filter import Verdict

    mailstack.content_filter = lambda message: Verdict(action="quarantine")
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    send_eml(mailstack, raw, recipient=BOB, timeout=5)
    assert mailstack.wait_for(BOB, subject=subject, mailbox="Junk", timeout=5)


def test_stack_assertions_refuse_a_folder_that_does_not_exist(mailstack: MailStack) -> None:
    from roundtrip.errors import ConfigError

    _quarantined(mailstack, "junky")
    for name in ("junk", "Spam"):
        with pytest.raises(ConfigError) as info:
            mailstack.assert_not_delivered(BOB, subject="junky", mailbox=name, timeout=5)
        assert f"mailbox={name!r}: no such folder; {BOB}'s folders: INBOX, Drafts, Junk" in str(
            info.value
        )
        with pytest.raises(ConfigError, match="the users' folders: INBOX"):
            mailstack.assert_delivered(subject="junky", mailbox=name, timeout=5)
    with pytest.raises(ConfigError, match="outbound capture's INBOX"):
        mailstack.assert_not_delivered("carol@gmail.com", mailbox="Junk", timeout=5)
    # wait_for refuses it too (a ConfigError, not a NotDeliveredError after its timeout).
    with pytest.raises(ConfigError, match=f"mailbox='spam': no such folder; {BOB}'s folders"):
        mailstack.wait_for(BOB, subject="junky", mailbox="spam", timeout=30)
    with pytest.raises(ConfigError, match="the users' folders"):
        mailstack.wait_for(subject="junky", mailbox="Spam", timeout=30)


def test_stack_assertions_take_folders_that_exist(mailstack: MailStack) -> None:
    """The twin: the real name, and INBOX in any case (RFC 3501 section 5.1)."""
    _quarantined(mailstack, "junky")
    with pytest.raises(AssertionError, match=r"but 1 matched"):
        mailstack.assert_not_delivered(BOB, subject="junky", mailbox="Junk", timeout=5)
    mailstack.assert_not_delivered(BOB, subject="junky", mailbox="inbox", timeout=5)
    mailstack.assert_delivered(BOB, subject="junky", mailbox="Junk", timeout=5)
    assert mailstack.wait_for(BOB, subject="junky", mailbox="Junk", timeout=5)
    with pytest.raises(NotDeliveredError):  # "inbox" is INBOX (RFC 3501 5.1): nothing there
        mailstack.wait_for(BOB, subject="junky", mailbox="inbox", timeout=0.2)


def test_stack_assert_delivered_lists_what_arrived_in_other_folders(mailstack: MailStack) -> None:
    _quarantined(mailstack, "junky")
    with pytest.raises(AssertionError) as info:
        mailstack.assert_delivered(BOB, subject="junky", mailbox="INBOX", timeout=0.2)
    text = str(info.value)
    assert "Nothing arrived in INBOX." in text
    assert "In other folders than INBOX (1, not searched): 1 of them meet every criterion:" in text
    assert f"to {BOB} [Junk] subject 'junky'" in text
    # Without a folder every one is searched: the quarantined copy counts.
    mailstack.assert_delivered(BOB, subject="junky", timeout=5)


# -- addresses: one normalisation for wait_for, messages() and the assertions ----------------


def test_stack_assertions_trim_to_and_sender_as_wait_for_does(mailstack: MailStack) -> None:
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: hello\r\n\r\nhi\r\n".encode()
    send_eml(mailstack, raw, recipient=BOB, timeout=5)
    padded = f" {BOB.upper()}\n"
    found = mailstack.wait_for(padded, subject="hello", timeout=5)
    assert mailstack.messages(padded) == [found]
    assert mailstack.assert_delivered(padded, subject="hello", sender=f"\t{ALICE} ") == [found]
    with pytest.raises(AssertionError, match=f"expected no message to {BOB} with subject"):
        mailstack.assert_not_delivered(padded, subject="hello", timeout=5)
    with pytest.raises(AssertionError, match="but 1 matched"):
        assert_not_delivered(mailstack.messages(), to=padded, sender=f" {ALICE}\r\n")
    # The twin: another address, padded alike, has nothing.
    mailstack.assert_not_delivered(f" {ALICE}\n", subject="hello", timeout=5)


def test_assertions_refuse_an_address_that_is_not_bare(inbox: list[ReceivedMessage]) -> None:
    from roundtrip.errors import ConfigError

    for value in (f"Bob <{BOB}>", f"<{BOB}>", f"{BOB}, {ALICE}", "  "):
        with pytest.raises(ConfigError, match="is not a bare address"):
            assert_not_delivered(inbox, to=value)
        with pytest.raises(ConfigError, match="is not a bare address"):
            Criteria(sender=value)
    assert Criteria(to=f" {BOB.upper()} ").to == BOB


# -- an APPEND is no delivery ------------------------------------------------------------------


def _append_to_sent(mailstack: MailStack, subject: str) -> None:
    import imaplib

    alice = mailstack.user("example.com")
    host, port = mailstack.endpoints("example.com").address("imaps")
    raw = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    context = mailstack.client_context()
    with imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=5) as imap:
        imap.login(alice.address, alice.password)
        typ, _ = imap.append("Sent", "(\\Seen)", None, raw)
        assert typ == "OK"


def test_stack_a_copy_only_appended_to_sent_is_not_delivered_to_its_owner(
    mailstack: MailStack,
) -> None:
    _append_to_sent(mailstack, "invoice 42")
    (stored,) = mailstack.messages(ALICE, mailbox="Sent")
    assert stored.envelope_to == ()
    with pytest.raises(AssertionError, match="but 0 matched"):
        mailstack.assert_delivered(ALICE, subject="invoice 42", timeout=0.2)
    mailstack.assert_not_delivered(ALICE, subject="invoice 42", timeout=5)
    mailstack.assert_not_delivered(BOB, subject="invoice 42", timeout=5)
    # The twin: a copy submission delivered to her, in the same folder or not, is hers.
    send_eml(mailstack, b"Subject: invoice 43\r\n\r\nhi\r\n", recipient=ALICE, timeout=5)
    mailstack.assert_delivered(ALICE, subject="invoice 43", timeout=5)
    with pytest.raises(AssertionError, match="but 1 matched"):
        mailstack.assert_not_delivered(ALICE, subject="invoice 43", timeout=5)


@pytest.mark.mailstack(catch_all=("example.org",))
def test_stack_catch_all_mail_is_still_its_owners(mailstack: MailStack) -> None:
    """Catch-all mail has an envelope recipient: it counts for that address and for the
    domain's user who receives it."""
    send_eml(mailstack, b"Subject: caught\r\n\r\nhi\r\n", recipient="sales@example.org", timeout=5)
    mailstack.assert_delivered("sales@example.org", subject="caught", timeout=5)
    (msg,) = mailstack.assert_delivered(BOB, subject="caught", timeout=5)
    assert msg.stored.user == BOB and msg.envelope_to == ("sales@example.org",)
    mailstack.assert_not_delivered("other@example.org", subject="caught", timeout=5)
