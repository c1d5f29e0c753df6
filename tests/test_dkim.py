"""DKIM across the stack: submission signs, every MX verifies and says so in
Authentication-Results (RFC 6376, RFC 8463, RFC 8601)."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator

import dkim
import pytest
from _support import make_message
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from roundtrip import MailStack, StackConfig
from roundtrip.errors import ConfigError
from roundtrip.protocols.dns import Record

TIMEOUT = 5.0
SENDER_DOMAIN = "example.com"
RCPT = "user@example.org"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    config = StackConfig(
        domains=("example.com", "example.org", "quiet.test"),
        dkim=True,
        dkim_unsigned_domains=("quiet.test",),
        retry_delays=(0.05, 0.1),
    )
    with MailStack(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


def _submit(stack: MailStack, raw: bytes, *, domain: str = SENDER_DOMAIN, to: str = RCPT) -> None:
    user = stack.user(domain)
    host, port = stack.endpoints(domain).address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [to], raw)


def _send(stack: MailStack, subject: str, *, domain: str = SENDER_DOMAIN) -> None:
    sender = stack.user(domain).address
    _submit(stack, make_message(sender=sender, recipient=RCPT, subject=subject), domain=domain)


def _mx_send(stack: MailStack, raw: bytes, *, to: str = RCPT) -> None:
    """Hand ``raw`` to the recipient's MX directly, as an outside server would."""
    host, port = stack.endpoints(to.rpartition("@")[2]).address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail("someone@elsewhere.test", [to], raw)


def test_dkim_submission_signs_twice_and_mx_passes_both(stack: MailStack) -> None:
    _send(stack, "signed")
    (msg,) = stack.assert_delivered(RCPT, subject="signed", auth={"dkim": "pass"})
    assert msg.auth.authserv_id == stack.endpoints("example.org").hostname
    results = msg.auth.dkim
    assert [(r.result, r.properties["header.a"]) for r in results] == [
        ("pass", "ed25519-sha256"),
        ("pass", "rsa-sha256"),
    ]
    assert {r.properties["header.d"] for r in results} == {SENDER_DOMAIN}
    assert [r.properties["header.s"] for r in results] == ["rt-ed25519", "rt-rsa"]
    # One Authentication-Results field, the topmost, above this hop's Received.
    names = [name.lower() for name, _ in msg.headers.items()]
    assert names.count("authentication-results") == 1
    assert names.index("authentication-results") < names.index("received")
    signature = msg.headers.get_all("DKIM-Signature")[0]
    assert "c=relaxed/relaxed" in signature.replace(" ", "")
    # From oversigned: signed once more than it occurs.
    assert signature.replace(" ", "").count("from") >= 2


def test_dkim_altered_body_fails(stack: MailStack) -> None:
    stack.faults.alter_body = True
    _send(stack, "tampered")
    (msg,) = stack.assert_delivered(RCPT, subject="tampered", auth={"dkim": "fail"})
    assert {r.reason for r in msg.auth.dkim} == {"body hash did not verify"}


def test_dkim_bare_lf_message_is_signed_as_it_travels(stack: MailStack) -> None:
    """A client sending bare LF line ends (smtplib passes bytes unchanged): the signature
    covers the CRLF form every hop after submission carries, so it verifies."""
    sender = stack.user(SENDER_DOMAIN).address
    raw = make_message(sender=sender, recipient=RCPT, subject="unix lines")
    _submit(stack, raw.replace(b"\r\n", b"\n"))
    (msg,) = stack.assert_delivered(RCPT, subject="unix lines", auth={"dkim": "pass"})
    signature = msg.headers.get_all("DKIM-Signature")[0].replace(" ", "")
    assert "subject" in signature and "message-id" in signature


def test_dkim_auth_criterion_fails_when_a_result_differs(stack: MailStack) -> None:
    stack.faults.alter_body = True
    _send(stack, "tampered twin")
    with pytest.raises(AssertionError, match="dkim=pass") as info:
        stack.assert_delivered(RCPT, subject="tampered twin", auth={"dkim": "pass"}, timeout=1)
    assert "fail (body hash did not verify)" in str(info.value)
    stack.assert_not_delivered(RCPT, subject="tampered twin", auth={"dkim": "pass"})


def test_dkim_key_record_removed_is_permerror(stack: MailStack) -> None:
    records = [r for r in stack.default_dns_records() if "_domainkey" not in r.name]
    stack.set_dns_records(records)
    _send(stack, "no key")
    (msg,) = stack.assert_delivered(RCPT, subject="no key", auth={"dkim": "permerror"})
    assert {r.reason for r in msg.auth.dkim} == {"no key for signature"}


def test_dkim_revoked_key_is_permerror(stack: MailStack) -> None:
    stack.publish_dkim_key(SENDER_DOMAIN, "rt-rsa", "v=DKIM1; k=rsa; p=")
    _send(stack, "revoked")
    (msg,) = stack.assert_delivered(RCPT, subject="revoked")
    by_selector = {r.properties["header.s"]: r for r in msg.auth.dkim}
    assert by_selector["rt-ed25519"].result == "pass"
    assert by_selector["rt-rsa"].result == "permerror"
    assert "revoked" in (by_selector["rt-rsa"].reason or "")


def test_dkim_dns_refusal_is_temperror(stack: MailStack) -> None:
    # Key names outside every zone get REFUSED: the key could not be fetched this time. The
    # envelope is the stack domain's own (SPF passes, aligned), so DMARC passes and the MX
    # delivers with the temperror recorded rather than deferring (tests/test_auth_temperror.py).
    records = [r for r in stack.default_dns_records() if "_domainkey" not in r.name]
    stack.set_dns_records(records, refuse_outside=True)
    sender = stack.user(SENDER_DOMAIN).address
    raw = make_message(sender=sender, recipient=RCPT, subject="refused")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    signed = dkim.sign(raw, b"app", b"keys.elsewhere.test", pem) + raw
    host, port = stack.endpoints("example.org").address("smtp")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.sendmail(sender, [RCPT], signed)
    (msg,) = stack.assert_delivered(RCPT, subject="refused", auth={"dkim": "temperror"})
    assert [r.result for r in msg.auth.dmarc] == ["pass"]


def _app_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def test_dkim_app_key_published_passes(stack: MailStack) -> None:
    private, public = _app_key()
    stack.publish_dkim_key("quiet.test", "app2026", public)
    sender = stack.user("quiet.test").address
    raw = make_message(sender=sender, recipient=RCPT, subject="app signed")
    signed = dkim.sign(raw, b"app2026", b"quiet.test", private) + raw
    _submit(stack, signed, domain="quiet.test")
    (msg,) = stack.assert_delivered(RCPT, subject="app signed", auth={"dkim": "pass"})
    assert [(r.properties["header.d"], r.properties["header.s"]) for r in msg.auth.dkim] == [
        ("quiet.test", "app2026")
    ]


def test_dkim_app_key_not_published_is_permerror(stack: MailStack) -> None:
    private, _ = _app_key()
    sender = stack.user("quiet.test").address
    raw = make_message(sender=sender, recipient=RCPT, subject="app unpublished")
    signed = dkim.sign(raw, b"app2026", b"quiet.test", private) + raw
    _submit(stack, signed, domain="quiet.test")
    stack.assert_delivered(RCPT, subject="app unpublished", auth={"dkim": "permerror"})


def test_dkim_app_key_wrong_key_published_fails(stack: MailStack) -> None:
    private, _ = _app_key()
    _, other_public = _app_key()
    stack.publish_dkim_key("quiet.test", "app2026", other_public)
    sender = stack.user("quiet.test").address
    raw = make_message(sender=sender, recipient=RCPT, subject="app wrong key")
    _submit(stack, dkim.sign(raw, b"app2026", b"quiet.test", private) + raw, domain="quiet.test")
    stack.assert_delivered(RCPT, subject="app wrong key", auth={"dkim": "fail"})


def test_dkim_publish_rejects_what_is_not_a_key(stack: MailStack) -> None:
    with pytest.raises(ConfigError, match="not a DKIM public key"):
        stack.publish_dkim_key("example.com", "x", 42)


def test_dkim_unsigned_domain_arrives_with_none(stack: MailStack) -> None:
    _send(stack, "unsigned", domain="quiet.test")
    (msg,) = stack.assert_delivered(RCPT, subject="unsigned", auth={"dkim": "none"})
    assert msg.headers.get_all("DKIM-Signature") == []
    assert not any(
        "quiet.test" in r.name for r in stack.default_dns_records() if "_domainkey" in r.name
    )


MALFORMED = [
    "v=1; a=rsa-sha256; d=example.com; s=rt-rsa; h=from; bh=!!!; b=!!!",
    "this is not a tag list at all",
    "v=1; a=rsa-sha256; d=example.com",
    "v=1; a=rsa-sha256; c=relaxed/relaxed; d=exa\x7fmple..com; s=..; h=from; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha999; d=example.com; s=rt-rsa; h=from; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha256; d=example.com; s=rt-rsa; h=from; bh=AAAA; b=AAAA; x=1",
    "v=1; v=2; a=rsa-sha256; d=example.com; s=rt-rsa; h=from; bh=AAAA; b=AAAA",
]


@pytest.mark.parametrize("value", MALFORMED)
def test_dkim_malformed_signature_is_permerror_and_delivered(stack: MailStack, value: str) -> None:
    extra = f"DKIM-Signature: {value}\r\n"
    raw = make_message(sender="a@elsewhere.test", recipient=RCPT, subject="bad sig", extra=extra)
    _mx_send(stack, raw)
    (msg,) = stack.assert_delivered(RCPT, subject="bad sig", auth={"dkim": "permerror"})
    assert msg.auth.dkim[0].reason
    # The MX keeps serving: a well-signed message right after still passes.
    _send(stack, "after bad sig")
    stack.assert_delivered(RCPT, subject="after bad sig", auth={"dkim": "pass"})


@pytest.mark.parametrize(
    "record",
    [
        "v=DKIM1; k=rsa; p=!!!notbase64",
        "v=DKIM1; k=rsa; p=" + base64.b64encode(b"not a key").decode(),
        "v=DKIM2; k=rsa; p=AAAA",
        "v=DKIM1; k=rot13; p=AAAA",
        "v=DKIM1; k=ed25519; p=AAAA",
        "garbage without tags",
    ],
)
def test_dkim_malformed_key_record_is_permerror(stack: MailStack, record: str) -> None:
    records = [r for r in stack.default_dns_records() if not r.name.startswith("rt-rsa.")]
    stack.set_dns_records([*records, Record("rt-rsa._domainkey.example.com", "TXT", record)])
    _send(stack, "bad key")
    (msg,) = stack.assert_delivered(RCPT, subject="bad key")
    by_selector = {r.properties["header.s"]: r.result for r in msg.auth.dkim}
    assert by_selector == {"rt-ed25519": "pass", "rt-rsa": "permerror"}


def test_dkim_forged_results_for_our_host_are_replaced(stack: MailStack) -> None:
    mx = stack.endpoints("example.org").hostname
    extra = f"Authentication-Results: {mx}; dkim=pass header.d=example.com\r\n"
    raw = make_message(sender="a@elsewhere.test", recipient=RCPT, subject="forged", extra=extra)
    _mx_send(stack, raw)
    (msg,) = stack.assert_delivered(RCPT, subject="forged", auth={"dkim": "none"})
    assert len(msg.headers.get_all("Authentication-Results")) == 1


def test_dkim_mx_serves_after_garbage_in_headers(stack: MailStack) -> None:
    """Header bytes dkimpy cannot parse with a DKIM-Signature among them: still delivered."""
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=x; s=y; h=from; bh=AA==; b=AA==\r\n"
        b"\x01 not a header\r\nFrom: <a@elsewhere.test>\r\nSubject: garbage\r\n\r\nhi\r\n"
    )
    _mx_send(stack, raw)
    # The email package ends the header block at the junk line: match on the raw bytes.
    (msg,) = stack.assert_delivered(RCPT, match=lambda m: b"Subject: garbage" in m.raw)
    assert [r.result for r in msg.auth.dkim] == ["permerror"], msg.auth


def test_dkim_unsigned_domains_config() -> None:
    config = StackConfig(
        domains=("example.com", "example.org"), dkim_unsigned_domains=("Example.ORG.",)
    )
    assert config.dkim_unsigned_domains == ("example.org",)
    assert StackConfig(dkim_unsigned_domains="*").dkim_unsigned_domains == ("*",)
    assert StackConfig.from_strings({"dkim_unsigned_domains": "*"}).dkim_unsigned_domains == ("*",)
    with pytest.raises(ConfigError, match="not a domain of the stack"):
        StackConfig(domains=("example.com",), dkim_unsigned_domains=("other.test",))


def test_dkim_star_turns_signing_off_everywhere() -> None:
    with MailStack(StackConfig(dkim=True, dkim_unsigned_domains=("*",))) as quiet:
        assert quiet.dkim_keys == {}
        assert not [r for r in quiet.default_dns_records() if "_domainkey" in r.name]
        _send(quiet, "nobody signs")
        quiet.assert_delivered(RCPT, subject="nobody signs", auth={"dkim": "none"})


def test_dkim_on_by_default() -> None:
    """A stack configured with nothing signs and verifies: keys in DNS, dkim=pass."""
    assert StackConfig().dkim is True
    with MailStack(StackConfig()) as plain:
        assert set(plain.dkim_keys) == set(plain.config.domains)
        assert [r for r in plain.default_dns_records() if "_domainkey" in r.name]
        _send(plain, "default")
        [message] = plain.assert_delivered(RCPT, subject="default", auth={"dkim": "pass"})
        assert [r.result for r in message.auth.dkim] == ["pass", "pass"]


def test_dkim_off_adds_nothing() -> None:
    """With ``dkim=False`` the stack neither signs nor verifies: no keys, no DKIM-Signature,
    no dkim= verdict (the twin of every test above). SPF and DMARC still give theirs."""
    with MailStack(StackConfig(dkim=False)) as plain:
        assert plain.dkim_keys == {}
        assert not [r for r in plain.default_dns_records() if "_domainkey" in r.name]
        _send(plain, "plain")
        [message] = plain.assert_delivered(RCPT, subject="plain")
        assert b"DKIM-Signature:" not in message.raw
        assert [r.result for r in message.auth.dkim] in ([], ["none"])
        assert [r.result for r in message.auth.spf] == ["pass"]
