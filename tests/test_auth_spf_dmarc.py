"""SPF and DMARC at every MX of a running stack (RFC 7208, RFC 7489, RFC 8601), driven with
smtplib: the verdicts in Authentication-Results, 550 for p=reject, Junk for p=quarantine."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.errors import ConfigError
from roundtrip.probes._authres import auth_results
from roundtrip.protocols.dmarc import DMARCResult
from roundtrip.protocols.dns import Record, default_records
from roundtrip.stack._auth import SenderVerdict, sender_auth_records

TIMEOUT = 5.0
RCPT = "user@example.org"
PARTNER = "partner.test"  # a domain outside the stack whose records a test sets


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        domains=("example.com", "example.org", "junk.test"),
        sender_auth=True,
        dkim=False,  # SPF and DMARC alone here; DKIM is tests/test_dkim.py's
        dmarc_policy={"junk.test": "quarantine"},
        retry_delays=(0.05, 0.1),
    )
    with MailStack(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _submit(stack: MailStack, raw: bytes, *, domain: str = "example.com", to: str = RCPT) -> None:
    user = stack.user(domain)
    host, port = stack.endpoints(domain).address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [to], raw)


def _mx_send(
    stack: MailStack, mail_from: str, raw: bytes, *, to: str = RCPT, helo: str | None = None
) -> None:
    """Hand ``raw`` to the recipient's MX directly, as an outside server would."""
    host, port = stack.endpoints(to.rpartition("@")[2]).address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT, local_hostname=helo) as smtp:
        smtp.sendmail(mail_from, [to], raw)


def _world(stack: MailStack, *records: Record, replace: tuple[str, ...] = ()) -> None:
    """The stack's records, minus the TXT records at the names in ``replace``, plus
    ``records`` and a zone for :data:`PARTNER` (whose own TXT records the test gives)."""
    kept = [
        r
        for r in stack.default_dns_records()
        if not (r.rtype == "TXT" and r.name.rstrip(".").lower() in replace)
    ]
    partner = [r for r in default_records(PARTNER, "127.0.0.1") if r.rtype != "TXT"]
    # Hosts that exist but never match the stack's 127.0.0.1 (look-ups that are not void).
    partner += [Record(f"h{i}.{PARTNER}", "A", "192.0.2.1") for i in range(11)]
    stack.set_dns_records([*kept, *partner, *records])


def _partner(spf: str | list[str] | None, dmarc: str | list[str] | None) -> list[Record]:
    out = []
    for value in [spf] if isinstance(spf, str) else spf or []:
        out.append(Record(PARTNER, "TXT", value))
    for value in [dmarc] if isinstance(dmarc, str) else dmarc or []:
        out.append(Record(f"_dmarc.{PARTNER}", "TXT", value))
    return out


def _msg(sender: str, subject: str, to: str = RCPT) -> bytes:
    return make_message(sender=sender, recipient=to, subject=subject)


# Mail between stack domains, and its twin


def test_auth_stack_mail_passes_spf_and_dmarc(stack: MailStack) -> None:
    _submit(stack, _msg("user@example.com", "between stack domains"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="between stack domains", auth={"spf": "pass", "dmarc": "pass"}
    )
    assert msg.auth.authserv_id == "mail.example.org"
    assert msg.auth.spf[0].properties["smtp.mailfrom"] == "example.com"
    assert msg.auth.dmarc[0].properties == {"header.from": "example.com", "policy.dmarc": "reject"}
    # One field, the MX's own, on top of its Received line; no dkim= (DKIM is off here).
    names = [name.lower() for name, _ in msg.headers.items()]
    assert names.count("authentication-results") == 1
    assert names.index("authentication-results") < names.index("received")
    assert msg.auth.dkim == []
    assert ("_dmarc.example.com.", "TXT", "NOERROR") in stack.dns.query_log  # type: ignore[union-attr]


def test_auth_spf_record_that_excludes_the_relay_fails(stack: MailStack) -> None:
    _world(
        stack,
        Record("example.com", "TXT", "v=spf1 ip4:192.0.2.1 -all"),
        Record("_dmarc.example.com", "TXT", "v=DMARC1; p=none"),
        replace=("example.com", "_dmarc.example.com"),
    )
    _submit(stack, _msg("user@example.com", "excluded relay"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="excluded relay", auth={"spf": "fail", "dmarc": "fail"}
    )
    assert msg.auth.spf[0].reason == "matched all in example.com"
    assert msg.auth.dmarc[0].properties["policy.dmarc"] == "none"
    with pytest.raises(AssertionError, match="spf=pass"):
        stack.assert_delivered(RCPT, subject="excluded relay", auth={"spf": "pass"}, timeout=0.5)


def test_auth_published_records_are_the_configured_policies(stack: MailStack) -> None:
    records = {(r.name, r.value) for r in stack.default_dns_records() if r.rtype == "TXT"}
    assert ("_dmarc.example.com", "v=DMARC1; p=reject") in records
    assert ("_dmarc.junk.test", "v=DMARC1; p=quarantine") in records


# p=reject


def test_auth_forged_stack_from_is_refused_with_550(stack: MailStack) -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, "someone@elsewhere.test", _msg("user@example.com", "forged from"))
    assert info.value.smtp_code == 550
    assert info.value.smtp_error.startswith(b"5.7.1 ")
    assert b"example.com" in info.value.smtp_error
    stack.assert_not_delivered(subject="forged from")


def test_auth_foreign_domain_without_records_is_delivered(stack: MailStack) -> None:
    """The twin: a From domain that publishes nothing is not refused (dmarc=none)."""
    _mx_send(stack, "someone@elsewhere.test", _msg("x@elsewhere.test", "foreign from"))
    stack.assert_delivered(
        RCPT, subject="foreign from", mailbox="INBOX", auth={"spf": "none", "dmarc": "none"}
    )


def test_auth_relay_bounces_mail_refused_by_dmarc(stack: MailStack) -> None:
    """Submission lets a user write another stack domain into From (from_header_policy=accept);
    that domain's MX refuses it at end of DATA, and the relay bounces it to the sender."""
    _submit(stack, _msg("ceo@example.org", "not yours"))
    bounce = stack.wait_for("user@example.com", subject="Undelivered Mail Returned to Sender")
    assert b"5.7.1" in bounce.raw
    stack.assert_not_delivered(RCPT, subject="not yours")


def test_auth_external_domain_with_records_passes_and_its_forgery_is_refused(
    stack: MailStack,
) -> None:
    _world(stack, *_partner("v=spf1 ip4:127.0.0.0/8 -all", "v=DMARC1; p=reject"))
    _mx_send(stack, f"bob@{PARTNER}", _msg(f"bob@{PARTNER}", "partner mail"))
    stack.assert_delivered(RCPT, subject="partner mail", auth={"spf": "pass", "dmarc": "pass"})
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, "someone@elsewhere.test", _msg(f"bob@{PARTNER}", "partner forged"))
    assert info.value.smtp_code == 550
    stack.assert_not_delivered(subject="partner forged")


def test_auth_bounce_is_checked_by_its_helo_name(stack: MailStack) -> None:
    helo = f"mta.{PARTNER}"
    _world(
        stack,
        *_partner(None, "v=DMARC1; p=none"),
        Record(helo, "TXT", "v=spf1 ip4:127.0.0.1 -all"),
    )
    _mx_send(stack, "", _msg(f"mailer-daemon@{helo}", "helo pass"), helo=helo)
    (msg,) = stack.assert_delivered(RCPT, subject="helo pass", auth={"spf": "pass"})
    assert msg.auth.spf[0].properties == {"smtp.helo": helo}
    _world(stack, *_partner(None, "v=DMARC1; p=none"), Record(helo, "TXT", "v=spf1 -all"))
    _mx_send(stack, "", _msg(f"mailer-daemon@{helo}", "helo fail"), helo=helo)
    stack.assert_delivered(RCPT, subject="helo fail", auth={"spf": "fail", "dmarc": "fail"})


# p=quarantine


def test_auth_quarantine_files_into_junk(stack: MailStack) -> None:
    _mx_send(stack, "someone@elsewhere.test", _msg("user@junk.test", "quarantined"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="quarantined", mailbox="Junk", auth={"dmarc": "fail"}
    )
    assert msg.auth.dmarc[0].properties["policy.dmarc"] == "quarantine"
    stack.assert_not_delivered(RCPT, subject="quarantined", mailbox="INBOX")
    junk = [b for b in stack.store.mailboxes(RCPT) if b.name == "Junk"]
    assert junk and junk[0].special_use == "\\Junk"


def test_auth_quarantine_twin_authenticated_mail_goes_to_inbox(stack: MailStack) -> None:
    _submit(stack, _msg("user@junk.test", "from junk.test"), domain="junk.test")
    stack.assert_delivered(RCPT, subject="from junk.test", mailbox="INBOX", auth={"dmarc": "pass"})


def test_auth_quarantine_recreates_a_deleted_junk_folder(stack: MailStack) -> None:
    stack.store.delete_mailbox(RCPT, "Junk")
    _mx_send(stack, "someone@elsewhere.test", _msg("user@junk.test", "junk again"))
    stack.assert_delivered(RCPT, subject="junk again", mailbox="Junk")


# Malformed records: the RFC's result, never a crash and never a pass


@pytest.mark.parametrize(
    ("spf", "reason"),
    [
        (["v=spf1 ip4:127.0.0.1 -all", "v=spf1 +all"], "2 SPF records"),
        ("v=spf1 ip4:127.0.0.1 bogus:x -all", "unknown mechanism"),
        (f"v=spf1 include:{PARTNER} ip4:127.0.0.1 -all", "more than 10 DNS look-ups"),
        (
            "v=spf1 " + " ".join(f"exists:v{i}.{PARTNER}" for i in range(3)) + " +all",
            "void look-ups",
        ),
        (
            "v=spf1 " + " ".join(f"a:h{i}.{PARTNER}" for i in range(11)) + " +all",
            "more than 10 DNS look-ups",
        ),
    ],
)
def test_auth_malformed_spf_is_a_permerror(
    stack: MailStack, spf: str | list[str], reason: str
) -> None:
    _world(stack, *_partner(spf, "v=DMARC1; p=none"))
    _mx_send(stack, f"bob@{PARTNER}", _msg(f"bob@{PARTNER}", "bad spf"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="bad spf", auth={"spf": "permerror", "dmarc": "fail"}
    )
    assert reason in (msg.auth.spf[0].reason or "")


@pytest.mark.parametrize(
    "dmarc",
    [
        ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        "v=DMARC1; p=bogus",
        "v=DMARC1; p=reject; sp=bogus",
        "v=DMARC1; p=reject; broken",
    ],
)
def test_auth_malformed_dmarc_is_a_permerror_and_applies_no_policy(
    stack: MailStack, dmarc: str | list[str]
) -> None:
    _world(stack, *_partner("v=spf1 -all", dmarc))
    _mx_send(stack, f"bob@{PARTNER}", _msg(f"bob@{PARTNER}", "bad dmarc"))
    stack.assert_delivered(RCPT, subject="bad dmarc", auth={"spf": "fail", "dmarc": "permerror"})


def test_auth_two_from_fields_cannot_hide_a_forged_one(stack: MailStack) -> None:
    raw = _msg("x@elsewhere.test", "two froms").replace(
        b"\r\nTo:", b"\r\nFrom: <user@example.com>\r\nTo:", 1
    )
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, "x@elsewhere.test", raw)
    assert info.value.smtp_code == 550


def _with_from(value: str, subject: str) -> bytes:
    return _msg("placeholder@example.net", subject).replace(
        b"From: <placeholder@example.net>", f"From: {value}".encode(), 1
    )


@pytest.mark.parametrize(
    "value",
    [
        # email.utils.getaddresses read example.comx.partner.test (org partner.test: pass).
        f"user@example.com (,) x.{PARTNER}",
        # ... and no domain at all here (permerror, no policy).
        f"user@example.com (,) bob@{PARTNER}",
        f'"a" <bob@{PARTNER}>, "b\\" <user@example.com>',
    ],
)
def test_auth_malformed_from_cannot_escape_the_shown_domains_reject(
    stack: MailStack, value: str
) -> None:
    """RFC 7489 sections 3.1 and 6.6.1: readers show user@example.com (p=reject); the MX
    must not evaluate a domain a lenient parser glued together, nor pass the message."""
    _world(stack, *_partner("v=spf1 ip4:127.0.0.0/8 -all", "v=DMARC1; p=none"))
    with pytest.raises(smtplib.SMTPDataError) as info:
        _mx_send(stack, f"bob@{PARTNER}", _with_from(value, "malformed from"))
    assert info.value.smtp_code == 550
    assert info.value.smtp_error == (
        b"5.7.1 Rejected by DMARC policy of example.com: malformed From field (RFC 5322 3.6.2)"
    )
    stack.assert_not_delivered(subject="malformed from")


def test_auth_malformed_from_twin_well_formed_comment_passes(stack: MailStack) -> None:
    _world(stack, *_partner("v=spf1 ip4:127.0.0.0/8 -all", "v=DMARC1; p=reject"))
    _mx_send(stack, f"bob@{PARTNER}", _with_from(f"Bob (work) <bob@{PARTNER}>", "comment from"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="comment from", mailbox="INBOX", auth={"spf": "pass", "dmarc": "pass"}
    )
    assert msg.auth.dmarc[0].properties["header.from"] == PARTNER
    _submit(stack, _with_from("User (work) <user@example.com>", "comment submitted"))
    stack.assert_delivered(RCPT, subject="comment submitted", auth={"dmarc": "pass"})


def test_auth_malformed_from_that_authenticates_is_delivered_but_not_a_pass(
    stack: MailStack,
) -> None:
    """Every candidate (example.com) passes SPF aligned: nothing to reject, still no pass."""
    _submit(stack, _with_from("user@example.com (,) x", "malformed but ours"))
    (msg,) = stack.assert_delivered(
        RCPT, subject="malformed but ours", mailbox="INBOX", auth={"dmarc": "permerror"}
    )
    assert msg.auth.dmarc[0].properties["header.from"] == "example.com"
    assert "malformed From field" in (msg.auth.dmarc[0].reason or "")
    stack.assert_not_delivered(RCPT, subject="malformed but ours", auth={"dmarc": "pass"})


def test_auth_message_without_from_is_a_dmarc_permerror_and_delivered(stack: MailStack) -> None:
    _mx_send(stack, "x@elsewhere.test", b"Subject: no from\r\n\r\nbody\r\n")
    stack.assert_delivered(RCPT, subject="no from", auth={"dmarc": "permerror"})


def test_auth_forged_authentication_results_cannot_claim_a_pass(stack: MailStack) -> None:
    forged = "Authentication-Results: mail.example.org; spf=pass; dmarc=pass\r\n"
    raw = forged.encode() + _msg("x@elsewhere.test", "forged ar 2")
    _mx_send(stack, "x@elsewhere.test", raw)
    (msg,) = stack.assert_delivered(RCPT, subject="forged ar 2", auth={"spf": "none"})
    assert msg.raw.count(b"Authentication-Results:") == 1
    stack.assert_not_delivered(RCPT, subject="forged ar 2", auth={"dmarc": "pass"})


@pytest.mark.parametrize("variant", ["glued comment", "after 70 kB of fields"])
def test_auth_forged_authentication_results_behind_cfws_or_far_down_are_dropped(
    stack: MailStack, variant: str
) -> None:
    """RFC 8601 section 5: the MX drops fields in its name however they are written and
    wherever they sit in the header; a foreign server's field stays (the twin)."""
    forged = b"Authentication-Results: mail.example.org; dkim=pass header.d=example.com;"
    forged += b" dmarc=pass header.from=example.com\r\n"
    pad = b""
    if variant == "glued comment":
        forged = forged.replace(b"mail.example.org;", b"mail.example.org(ok);", 1)
    else:
        pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 900) for i in range(80))
    foreign = b"Authentication-Results: mx.elsewhere.test; spf=pass smtp.mailfrom=x\r\n"
    subject = f"forged ar {variant}"
    _mx_send(stack, "x@elsewhere.test", pad + forged + foreign + _msg("x@elsewhere.test", subject))
    (msg,) = stack.assert_delivered(RCPT, subject=subject, auth={"spf": "none"})
    fields = msg.headers.get_all("Authentication-Results")
    assert len(fields) == 2
    assert fields[0].startswith("mail.example.org;")  # the MX's own, on top
    assert fields[1] == "mx.elsewhere.test; spf=pass smtp.mailfrom=x"
    ours = [f for f in auth_results(msg.raw, "mail.example.org") if f.server == "mail.example.org"]
    assert {f.code for f in ours} >= {"auth-results", "auth-spf", "auth-dmarc"}
    assert not [f for f in ours if "=pass" in f.message]


# DKIM, SPF and DMARC together; the switch; the configuration


def test_auth_dkim_alignment_rescues_a_failed_spf_and_its_twin() -> None:
    config = StackConfig(
        domains=("example.com", "example.org"),
        sender_auth=True,
        dkim=True,
        retry_delays=(0.05, 0.1),
    )
    with MailStack(config) as stack:
        _world(
            stack,
            Record("example.com", "TXT", "v=spf1 -all"),
            replace=("example.com",),
        )
        _submit(stack, _msg("user@example.com", "dkim rescues"))
        (msg,) = stack.assert_delivered(
            RCPT, subject="dkim rescues", auth={"dkim": "pass", "spf": "fail", "dmarc": "pass"}
        )
        assert [r.method for r in msg.auth.results] == ["dkim", "dkim", "spf", "dmarc"]
        assert msg.raw.count(b"Authentication-Results:") == 1
        # The twin: the body altered in transit breaks DKIM too, and p=reject refuses it.
        stack.faults.alter_body = True
        _submit(stack, _msg("user@example.com", "nothing rescues"))
        bounce = stack.wait_for("user@example.com", subject="Undelivered Mail Returned to Sender")
        assert b"5.7.1" in bounce.raw
        stack.assert_not_delivered(RCPT, subject="nothing rescues")
        stack.check()


def test_auth_off_writes_nothing_and_refuses_nothing() -> None:
    assert StackConfig().sender_auth is True
    config = StackConfig(retry_delays=(0.05,), sender_auth=False, dkim=False)
    with MailStack(config) as plain:
        assert not [r for r in plain.default_dns_records() if r.name.startswith("_dmarc.")]
        _mx_send(plain, "someone@elsewhere.test", _msg("user@example.com", "not checked"))
        (msg,) = plain.assert_delivered(RCPT, subject="not checked")
        assert b"Authentication-Results:" not in msg.raw
        plain.check()


def test_auth_config_dmarc_policy() -> None:
    config = StackConfig(dmarc_policy={"Example.ORG": "Quarantine", "*": "none"})
    assert config.dmarc_policy == (("*", "none"), ("example.org", "quarantine"))
    record = "v=DMARC1; p=reject; adkim=s"
    assert StackConfig(dmarc_policy=[("example.com", record)]).dmarc_policy == (
        ("example.com", record),
    )
    parsed = StackConfig.from_strings(
        {"sender_auth": "yes", "dmarc_policy": "example.org=quarantine, none"}
    )
    assert parsed.sender_auth is True
    assert parsed.dmarc_policy == (("*", "none"), ("example.org", "quarantine"))
    with pytest.raises(ConfigError, match="choose one of none, quarantine, reject"):
        StackConfig(dmarc_policy={"example.org": "block"})
    with pytest.raises(ConfigError, match="not a domain of the stack"):
        StackConfig(dmarc_policy={"elsewhere.test": "reject"})
    with pytest.raises(ConfigError, match="expected true or false"):
        StackConfig.from_strings({"sender_auth": "maybe"})


def test_auth_domains_on_other_loopback_addresses_list_the_relay_source() -> None:
    """With ports="standard" every domain listens on its own 127.0.0.N and the relay's
    connections leave from 127.0.0.1: each SPF record names both."""
    config = StackConfig(domains=("example.com", "example.org"), sender_auth=True)
    records = [
        *default_records("example.com", "127.0.0.1"),
        *default_records("example.org", "127.0.0.2"),
    ]
    served = {r.name: r.value for r in sender_auth_records(config, records) if r.rtype == "TXT"}
    assert served["example.com"] == "v=spf1 ip4:127.0.0.1 -all"
    assert served["example.org"] == "v=spf1 ip4:127.0.0.1 ip4:127.0.0.2 -all"
    assert served["_dmarc.example.org"] == "v=DMARC1; p=reject"
    # The twin: without sender_auth the records are served as they are.
    plain = StackConfig(domains=("example.com", "example.org"), sender_auth=False)
    assert sender_auth_records(plain, records) == records


def test_auth_ipv6_stack_mail_passes_spf() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 cannot be bound on this machine")
    config = StackConfig(host="::1", sender_auth=True, retry_delays=(0.05,))
    with MailStack(config) as v6:
        _submit(v6, _msg("user@example.com", "over ipv6"))
        (msg,) = v6.assert_delivered(
            RCPT, subject="over ipv6", auth={"spf": "pass", "dmarc": "pass"}
        )
        assert "::1" in msg.received_chain[0].raw
        v6.check()


def test_auth_reject_reply_carries_no_message_bytes_but_name_characters() -> None:
    nasty = DMARCResult("fail", "", "exa\r\n250 mple.org\x00", "reject", "reject")
    reply = SenderVerdict(b"", None, nasty).reject_reply
    assert reply == "550 5.7.1 Rejected by DMARC policy of exa??250?mple.org?"
    # The twin: a plain domain is named as it is; no reply without a reject disposition.
    plain = DMARCResult("fail", "", "example.org", "reject", "reject")
    assert SenderVerdict(b"", None, plain).reject_reply == (
        "550 5.7.1 Rejected by DMARC policy of example.org"
    )
    quarantined = DMARCResult("fail", "", "example.org", "quarantine", "quarantine")
    assert SenderVerdict(b"", None, quarantined).reject_reply is None
