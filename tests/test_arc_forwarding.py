"""Forwarding aliases and ARC across a running stack (RFC 8617, RFC 7489 section 6.7).

A forwarding alias of example.com changes what it forwards as a mailing list does, which breaks
the author's DKIM signature; the relay then sends from an address the author's SPF record does
not name, so DMARC fails at the final MX. The alias ARC-seals what it forwards, and the final
MX lets the message in on the trusted sealer's word. Driven with smtplib (submission and MX)
and imapclient (the recipient's INBOX).
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterator

import pytest
from _support import make_message
from imapclient import IMAPClient

from roundtrip import Forward, MailStack, StackConfig
from roundtrip.config import SMTPLimits, User
from roundtrip.errors import ConfigError
from roundtrip.protocols.dns import Record
from roundtrip.stack._delivery import list_rewrite

TIMEOUT = 5.0
AUTHOR = "user@example.net"
RCPT = "user@example.org"
OTHER = "other@example.org"
LIST = "list@example.com"  # rewrites: subject prefix and footer
ALIAS = "alias@example.com"  # forwards as it is
FOOTER = "--\nYou are subscribed to list@example.com"
BOUNCE = "Undelivered Mail Returned to Sender"


def _config(**overrides: object) -> StackConfig:
    config = StackConfig(
        domains=("example.com", "example.org", "example.net"),
        users=(
            User("user@example.com"),
            User(RCPT),
            User(OTHER),
            User(AUTHOR),
        ),
        dkim=True,
        sender_auth=True,
        retry_delays=(0.05, 0.1),
        smtp_limits=SMTPLimits(max_hops=8),
        forwards=(
            Forward(LIST, (RCPT,), subject_prefix="[list] ", footer=FOOTER),
            Forward(ALIAS, (RCPT,)),
            Forward("loop-a@example.com", ("loop-b@example.org",)),
            Forward("loop-b@example.org", ("loop-a@example.com",)),
        ),
    )
    return config.replace(**overrides)


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(_config()) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _spf_excludes_the_relay(stack: MailStack) -> None:
    """example.net's SPF names an address the relay never sends from: its mail passes DMARC
    by its DKIM signature only, as mail from a domain whose forwarders are not listed."""
    kept = [
        r
        for r in stack.default_dns_records()
        if not (r.rtype == "TXT" and r.name.rstrip(".").lower() == "example.net")
    ]
    stack.set_dns_records([*kept, Record("example.net", "TXT", "v=spf1 ip4:192.0.2.1 -all")])


def _submit(stack: MailStack, to: str, subject: str) -> None:
    user = stack.user(AUTHOR)
    host, port = stack.endpoints("example.net").address("submissions")
    raw = make_message(sender=AUTHOR, recipient=to, subject=subject, body="The text.\r\n")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [to], raw)


def _mx_send(stack: MailStack, raw: bytes, to: str) -> None:
    """Hand ``raw`` to the recipient's MX directly, from the relay's address."""
    host, port = stack.endpoints(to.rpartition("@")[2]).address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail(AUTHOR, [to], raw)


def _inbox_subjects(stack: MailStack, address: str) -> list[str]:
    host, port = stack.endpoints(address.rpartition("@")[2]).address("imaps")
    user = stack.user(address)
    context: ssl.SSLContext = stack.client_context()
    with IMAPClient(host, port=port, ssl=True, ssl_context=context, timeout=TIMEOUT) as client:
        client.login(user.address, user.password)
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        return [
            data[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode().strip().removeprefix("Subject: ")
            for data in fetched.values()
        ]


def _field(raw: bytes, name: str) -> str:
    """The first ``name`` field of ``raw``, unfolded."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    found = re.search(rf"(?im)^{name}:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    assert found is not None, f"no {name} field"
    return re.sub(r"\r\n[ \t]+", " ", found.group(1)).strip()


# A list that rewrites: DKIM breaks, ARC carries the forwarder's verdicts


def test_forward_with_footer_is_let_in_by_a_trusted_arc_seal(stack: MailStack) -> None:
    _spf_excludes_the_relay(stack)
    _submit(stack, LIST, "list post")
    (msg,) = stack.assert_delivered(
        RCPT,
        subject="[list] list post",
        mailbox="INBOX",
        auth={"dkim": "fail", "spf": "fail", "dmarc": "fail", "arc": "pass"},
    )
    assert "You are subscribed to list@example.com" in msg.raw.decode()
    results = _field(msg.raw, "Authentication-Results")
    assert "dmarc=fail (p=reject dis=none; override local_policy: arc=pass i=1 d=example.com)" in (
        results
    )
    assert msg.auth.arc[0].result == "pass"
    # The sealer's results, as the list saw the message: everything passed there but SPF.
    aar = _field(msg.raw, "ARC-Authentication-Results")
    assert aar.startswith("i=1; mail.example.com;")
    assert "dkim=pass" in aar and "dmarc=pass" in aar and "arc=none" in aar
    assert _inbox_subjects(stack, RCPT) == ["[list] list post"]
    # Every hop's checks are on the journey; only the final MX saw an ARC set.
    hops = [h for h in stack.journey(msg.message_id) if h.auth is not None]
    assert [(h.host, h.auth.dmarc, h.auth.arc) for h in hops if h.auth] == [
        ("mail.example.com", "pass", None),
        ("mail.example.org", "fail", "pass"),
    ]


def test_forward_without_a_trusted_sealer_is_refused_and_bounced() -> None:
    """The twin: the same forward at a stack whose MXs trust no sealer's word. The final MX
    answers 550 (p=reject), and the list's relay bounces the message to its author."""
    with MailStack(_config(arc_trusted_sealers=())) as untrusting:
        _spf_excludes_the_relay(untrusting)
        _submit(untrusting, LIST, "list post")
        bounce = untrusting.wait_for(AUTHOR, subject=BOUNCE, timeout=10)
        assert b"5.7.1" in bounce.raw
        assert b"Rejected by DMARC policy of example.net" in bounce.raw
        untrusting.assert_not_delivered(RCPT, subject="[list] list post")
        assert _inbox_subjects(untrusting, RCPT) == []
        untrusting.check()


def test_forward_refused_when_the_authors_dmarc_failed_at_the_list(stack: MailStack) -> None:
    """The other twin: a trusted seal only vouches for what the sealer saw. Mail that failed
    DMARC at the list (no signature, SPF excluded, p=none there so the list takes it) keeps
    failing at the final MX, where example.net's p=reject now applies."""
    kept = [
        r for r in stack.default_dns_records() if r.rtype != "TXT" or "example.net" not in r.name
    ]
    stack.set_dns_records(
        [
            *kept,
            Record("example.net", "TXT", "v=spf1 ip4:192.0.2.1 -all"),
            Record("_dmarc.example.net", "TXT", "v=DMARC1; p=quarantine"),
        ]
    )
    # Handed to the list's MX directly, unsigned: DMARC fails there, quarantine keeps it ...
    _mx_send(stack, make_message(sender=AUTHOR, recipient=LIST, subject="unsigned post"), LIST)
    # ... and the final MX files it into Junk: the seal says dmarc=fail, no override.
    (msg,) = stack.assert_delivered(
        RCPT, subject="[list] unsigned post", mailbox="Junk", auth={"dmarc": "fail", "arc": "pass"}
    )
    assert "override" not in _field(msg.raw, "Authentication-Results")


# An alias that forwards as it is


def test_plain_alias_keeps_dkim_passing(stack: MailStack) -> None:
    _spf_excludes_the_relay(stack)
    _submit(stack, ALIAS, "plain forward")
    (msg,) = stack.assert_delivered(
        RCPT,
        subject="plain forward",
        mailbox="INBOX",
        auth={"dkim": "pass", "spf": "fail", "dmarc": "pass", "arc": "pass"},
    )
    assert "override" not in _field(msg.raw, "Authentication-Results")
    # The list's MX took it in, then the final MX: two hops on the trace.
    assert b"by mail.example.com" in msg.raw and b"by mail.example.org" in msg.raw


def test_submission_to_an_alias_of_its_own_domain_goes_through_the_mx(stack: MailStack) -> None:
    user = stack.user("user@example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    raw = make_message(sender=user.address, recipient=ALIAS, subject="own alias")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [ALIAS], raw)
    stack.assert_delivered(RCPT, subject="own alias", auth={"dmarc": "pass", "arc": "pass"})
    stack.assert_not_delivered("user@example.com", subject="own alias", timeout=0.2)


# A chain that was tampered with


def _flip(value: bytes, at: int) -> bytes:
    char = value[at : at + 1]
    return value[:at] + (b"B" if char != b"B" else b"C") + value[at + 1 :]


def _forwarded_copy(stack: MailStack, subject: str) -> bytes:
    _submit(stack, ALIAS, subject)
    (msg,) = stack.assert_delivered(RCPT, subject=subject, auth={"arc": "pass"})
    return msg.raw


def test_tampered_seal_is_an_arc_fail(stack: MailStack) -> None:
    raw = _forwarded_copy(stack, "tamper seal")
    seal = raw.index(b"ARC-Seal:")
    found = re.compile(rb"[ \t;]b=").search(raw, seal)
    assert found is not None
    _mx_send(stack, _flip(raw, found.end() + 10), OTHER)
    (msg,) = stack.assert_delivered(OTHER, subject="tamper seal", auth={"arc": "fail"})
    assert msg.auth.dkim[0].result == "pass"  # the author's signature did not change
    # The twin: the same copy untouched validates at the same MX.
    _mx_send(stack, raw, "user@example.com")
    stack.assert_delivered("user@example.com", subject="tamper seal", auth={"arc": "pass"})


def test_tampered_arc_results_are_an_arc_fail(stack: MailStack) -> None:
    """Changing what the sealer said (its ARC-Authentication-Results, under the seal) breaks
    the chain, so a forger cannot turn a seal's dmarc=fail into a pass."""
    raw = _forwarded_copy(stack, "tamper results")
    aar = raw.index(b"ARC-Authentication-Results:")
    end = raw.index(b"\r\nARC-", aar) if b"\r\nARC-" in raw[aar:] else len(raw)
    tampered = raw[:aar] + raw[aar:end].replace(b"spf=pass", b"spf=none", 1) + raw[end:]
    assert tampered != raw
    _mx_send(stack, tampered, OTHER)
    stack.assert_delivered(OTHER, subject="tamper results", auth={"arc": "fail"})


def test_forged_sealer_name_cannot_write_results_into_ours(stack: MailStack) -> None:
    """A seal's d= is message text: quoted into our Authentication-Results it must not close
    the comment and add results in our name (RFC 8601 section 5)."""
    arc_set = (
        "ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test) dkim=pass (; s=s; b=AAAA\r\n"
        "ARC-Message-Signature: i=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AAAA; b=AAAA\r\n"
        "ARC-Authentication-Results: i=1; mx.x.test; dmarc=pass header.from=example.net\r\n"
    )
    raw = make_message(sender="a@elsewhere.test", recipient=OTHER, subject="forged d=")
    _mx_send(stack, arc_set.encode() + raw, OTHER)
    (msg,) = stack.assert_delivered(OTHER, subject="forged d=", auth={"arc": "fail"})
    assert msg.auth.error is None
    assert [r.result for r in msg.auth.dkim] == ["none"]
    # The twin: the same message without the ARC set has no arc= result at all.
    _mx_send(stack, raw, RCPT)
    (plain,) = stack.assert_delivered(RCPT, subject="forged d=")
    assert plain.auth.arc == []


def test_arc_set_numbered_zero_is_an_arc_fail_and_the_message_is_delivered(
    stack: MailStack,
) -> None:
    """i= runs from 1 to 50 (RFC 8617 section 4.2.1): a set with i=0, from any sender, makes
    the chain fail (section 5.2) and the MX takes the message in as usual (250, INBOX),
    with or without a valid chain beside it."""
    zero = (
        b"ARC-Seal: i=0; a=rsa-sha256; cv=none; d=example.com; s=x; b=AAAA\r\n"
        b"ARC-Message-Signature: i=0; a=rsa-sha256; d=example.com; s=x; h=from; bh=AAAA;"
        b" b=AAAA\r\n"
        b"ARC-Authentication-Results: i=0; mx.x.test; dmarc=pass header.from=example.net\r\n"
    )
    raw = make_message(sender="a@elsewhere.test", recipient=OTHER, subject="arc zero")
    _mx_send(stack, zero + raw, OTHER)
    (msg,) = stack.assert_delivered(
        OTHER, subject="arc zero", mailbox="INBOX", auth={"arc": "fail"}
    )
    assert msg.auth.error is None
    assert msg.auth.arc[0].result == "fail"
    assert 'reason="instance 0 below 1"' in _field(msg.raw, "Authentication-Results")
    # A valid chain (the alias's seal, arc=pass at RCPT) fails with an i=0 set added ...
    forwarded = _forwarded_copy(stack, "arc zero beside")
    _mx_send(stack, zero + forwarded, "user@example.com")
    stack.assert_delivered(
        "user@example.com", subject="arc zero beside", mailbox="INBOX", auth={"arc": "fail"}
    )
    # ... and the twin: the same copy as it came passes at the same MX.
    _mx_send(stack, forwarded, "user@example.com")
    stack.assert_delivered("user@example.com", subject="arc zero beside", auth={"arc": "pass"})


# Loops and configuration


def test_alias_loop_ends_at_the_hop_limit_and_bounces(stack: MailStack) -> None:
    _submit(stack, "loop-a@example.com", "round and round")
    bounce = stack.wait_for(AUTHOR, subject=BOUNCE, timeout=10)
    assert b"5.4.6" in bounce.raw
    stack.assert_not_delivered(subject="round and round", timeout=0.2)


def test_forwards_config_errors_name_the_field() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("forwards: 'list@elsewhere.test' is not in a domain")
    ):
        StackConfig(forwards=(Forward("list@elsewhere.test", ("a@example.org",)),))
    with pytest.raises(
        ConfigError, match=re.escape("forwards: 'user@example.com' is a user's mailbox")
    ):
        StackConfig(forwards=(Forward("user@example.com", ("a@example.org",)),))
    with pytest.raises(
        ConfigError, match=re.escape("forwards: 'l@example.com' has no 'to' address")
    ):
        Forward("l@example.com", ())
    with pytest.raises(ConfigError, match="given twice"):
        StackConfig(
            forwards=(Forward("l@example.com", "a@x.test"), Forward("L@EXAMPLE.COM", "b@x.test"))
        )
    with pytest.raises(ConfigError, match="subject_prefix"):
        Forward("l@example.com", "a@example.org", subject_prefix="[x]\r\nBcc: evil")
    with pytest.raises(
        ConfigError, match=r"arc_trusted_sealers: .not a domain. is not a valid mail domain"
    ):
        StackConfig(arc_trusted_sealers=("not a domain",))
    # The twins: a good alias is kept, and the sealers default to the stack's domains.
    config = StackConfig(forwards=(Forward("l@example.com", "a@example.org"),))
    assert config.forwards[0].to == ("a@example.org",)
    assert config.arc_trusted_sealers is None


# The rewrite itself


def test_list_rewrite_prefixes_once_and_appends_the_footer() -> None:
    raw = b"From: a@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    once = list_rewrite(raw, subject_prefix="[l] ", footer="bye")
    assert once == b"From: a@example.net\r\nSubject: [l] hi\r\n\r\nbody\r\nbye\r\n"
    assert list_rewrite(once, subject_prefix="[l] ") == once
    assert list_rewrite(raw) == raw  # nothing to do: not a byte changes


def test_list_rewrite_footer_in_multipart_and_quoted_printable() -> None:
    multipart = (
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b1--\r\n"
    )
    out = list_rewrite(multipart, footer="bye=now")
    assert out.endswith(
        b"<p>x</p>\r\n--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Disposition: inline\r\n\r\nbye=now\r\n--b1--\r\n"
    )
    qp = b"Content-Transfer-Encoding: quoted-printable\r\n\r\nx=3D1\r\n"
    assert list_rewrite(qp, footer="a=b").endswith(b"x=3D1\r\na=3Db\r\n")
    base64_body = b"Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n"
    assert list_rewrite(base64_body, footer="bye") == base64_body  # left alone
