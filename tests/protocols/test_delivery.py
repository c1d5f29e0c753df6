"""The relay's delivery rules without a loop or a socket: plain values in, outcomes out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip.protocols import delivery
from roundtrip.protocols._lines import dot_stuff
from roundtrip.protocols.delivery import (
    NO_POLICY,
    REQUIRED,
    DomainAttempt,
    Permanent,
    RetrySchedule,
    Temporary,
    bounce_message,
    check_address,
    conclude_route,
    dot_stuffed_slices,
    expiry,
    normalize_line_endings,
    order_mx,
    policy_for,
    reply_outcome,
    tls_failure,
)
from roundtrip.protocols.tlspolicy import ResultType, TLSPolicy

# -- envelope and content --------------------------------------------------------------------


def test_delivery_check_address_passes_a_plain_address() -> None:
    assert check_address("bob@example.org", what="recipient") == "bob@example.org"


@pytest.mark.parametrize("bad", ["bob@example.org\r\nRCPT TO:<x@y>", "a\x00@b", "<a@b>", "a\n@b"])
def test_delivery_check_address_refuses_command_injection(bad: str) -> None:
    with pytest.raises(ValueError, match=r"recipient .* contains CR, LF, NUL or angle brackets"):
        check_address(bad, what="recipient")


def test_delivery_normalize_line_endings_keeps_a_clean_message_uncopied() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    assert normalize_line_endings(raw) is raw


def test_delivery_normalize_line_endings_rewrites_stray_cr_and_lf() -> None:
    assert normalize_line_endings(b"a\rb\nc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"


content = st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b"x."])).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(content, st.integers(1, 9))
def test_delivery_dot_stuffed_slices_agree_with_lines_dot_stuff(raw: bytes, size: int) -> None:
    """The streaming stuffer and ``protocols/_lines.dot_stuff`` are one rule (RFC 5321 §4.5.2)."""
    data = normalize_line_endings(raw) if raw else raw
    stuffed = b"".join(dot_stuffed_slices(data, size))
    assert stuffed.endswith(b".\r\n")
    assert stuffed[:-3] == dot_stuff(data)


def test_delivery_dot_stuffed_slices_refuse_an_empty_slice() -> None:
    with pytest.raises(ValueError, match="slice size"):
        list(dot_stuffed_slices(b".\r\n", 0))


# -- routing ------------------------------------------------------------------------------------


def test_delivery_order_mx_by_preference_then_name() -> None:
    records = [(20, "B.example.org."), (10, "mx2.example.org."), (10, "mx1.example.org.")]
    assert order_mx("example.org", records) == [
        "mx1.example.org",
        "mx2.example.org",
        "b.example.org",
    ]


def test_delivery_order_mx_lists_a_host_once() -> None:
    records = [(10, "mx.example.org."), (20, "MX.example.org.")]
    assert order_mx("example.org", records) == ["mx.example.org"]


def test_delivery_order_mx_without_records_is_the_implicit_mx() -> None:
    """RFC 5321 §5.1: no MX record, so the domain itself is the MX."""
    assert order_mx("example.org", None) == ["example.org"]


def test_delivery_order_mx_null_mx_bounces_5_1_10() -> None:
    """RFC 7505 §3, even next to an ordinary record (a misconfiguration that still says no)."""
    outcome = order_mx("example.org", [(0, "."), (10, "mx.example.org.")])
    assert isinstance(outcome, Permanent)
    assert outcome.status == "5.1.10" and "null MX" in outcome.diagnostic


def test_delivery_nxdomain_and_lookup_failure() -> None:
    assert delivery.no_such_domain("nowhere.test").status == "5.1.2"
    assert delivery.lookup_failed("example.org", "timed out") == Temporary(
        "MX lookup for example.org failed: timed out"
    )


def test_delivery_conclude_route_keeps_hosts_with_addresses_in_order() -> None:
    hosts = ["mx1.example.org", "mx2.example.org", "mx3.example.org"]
    found = {"mx1.example.org": [], "mx2.example.org": ["192.0.2.2"], "mx3.example.org": ["::1"]}
    route = conclude_route("example.org", hosts, found, ["A lookup for mx1 failed"], implicit=False)
    assert route == [("mx2.example.org", ["192.0.2.2"]), ("mx3.example.org", ["::1"])]
    assert delivery.route_detail(route) == "mx2.example.org=192.0.2.2, mx3.example.org=::1"


def test_delivery_conclude_route_defers_when_a_lookup_failed() -> None:
    route = conclude_route("example.org", ["mx.example.org"], {}, ["A: SERVFAIL"], implicit=False)
    assert route == Temporary("A: SERVFAIL")


@pytest.mark.parametrize(("implicit", "status"), [(True, "5.1.2"), (False, "5.4.4")])
def test_delivery_conclude_route_without_any_address_bounces(implicit: bool, status: str) -> None:
    route = conclude_route("example.org", ["example.org"], {}, [], implicit=implicit)
    assert isinstance(route, Permanent) and route.status == status
    assert delivery.route_detail(route) == route.diagnostic


# -- replies ------------------------------------------------------------------------------------


def test_delivery_reply_outcome_5xx_keeps_its_enhanced_status() -> None:
    outcome = reply_outcome(550, "5.1.1   no such\n user", "mx.example.org")
    assert outcome == Permanent("5.1.1", "smtp; 550 5.1.1 no such user", "mx.example.org")


@pytest.mark.parametrize(("message", "status"), [("4.2.2 full", "5.2.2"), ("go away", "5.0.0")])
def test_delivery_reply_outcome_5xx_status_is_class_5(message: str, status: str) -> None:
    outcome = reply_outcome(554, message, "mx")
    assert isinstance(outcome, Permanent) and outcome.status == status


@pytest.mark.parametrize("code", [421, 450, 451, 250, 354])
def test_delivery_reply_outcome_anything_else_is_temporary(code: int) -> None:
    """A 4xx, or a reply out of step, never bounces and never counts as delivered."""
    assert reply_outcome(code, "4.3.0 busy", "mx") == Temporary(f"mx: {code} 4.3.0 busy")


def test_delivery_attempt_moves_on_after_4xx_and_settles_once() -> None:
    attempt = DomainAttempt("example.org", ["a@example.org", "b@example.org"])
    attempt.host_answered(
        {"a@example.org": Temporary("mx1: 451 later"), "b@example.org": Permanent("5.1.1", "x")}
    )
    assert attempt.remaining == ["a@example.org"]
    attempt.host_answered({"a@example.org": None})
    assert attempt.remaining == []
    assert attempt.finish() == {"b@example.org": Permanent("5.1.1", "x"), "a@example.org": None}


def test_delivery_attempt_defers_with_every_hosts_reason() -> None:
    attempt = DomainAttempt("example.org", ["a@example.org"])
    assert attempt.host_failed("mx1", "192.0.2.1", "TLS failed") == "mx1[192.0.2.1]: TLS failed"
    attempt.host_answered({"a@example.org": Temporary("mx2: 421 bye")})
    assert attempt.finish() == {
        "a@example.org": Temporary("mx1[192.0.2.1]: TLS failed; mx2: 421 bye")
    }


def test_delivery_attempt_without_any_answer_says_so() -> None:
    attempt = DomainAttempt("example.org", ["a@example.org"])
    assert attempt.finish() == {"a@example.org": Temporary("no MX host of example.org answered")}


# -- retries and expiry -------------------------------------------------------------------------


def test_delivery_retry_schedule_backs_off_and_repeats_the_last_delay() -> None:
    schedule = RetrySchedule((1, 5, 30), lifetime=600)
    assert [schedule.delay(n, waited=0) for n in (1, 2, 3, 4, 9)] == [1, 5, 30, 30, 30]
    assert not schedule.expired(599.9)


def test_delivery_retry_schedule_never_sleeps_past_the_expiry() -> None:
    schedule = RetrySchedule((120,), lifetime=600)
    assert schedule.delay(3, waited=590) == 10
    assert schedule.expired(600)


def test_delivery_retry_schedule_needs_a_delay() -> None:
    with pytest.raises(ValueError, match="at least one delay"):
        RetrySchedule((), lifetime=600)


def test_delivery_expiry_bounces_4_4_7_with_the_last_error() -> None:
    assert expiry("mx: 451 later") == Permanent(
        "4.4.7", "X-Roundtrip; queue lifetime expired: mx: 451 later"
    )
    assert expiry("").diagnostic.endswith("no attempt succeeded")


# -- bounces ------------------------------------------------------------------------------------

RAW = b"Subject: hi\r\nMessage-ID: <m@example.net>\r\n\r\nbody\r\n"


def test_delivery_bounce_message_is_a_dsn_with_a_null_return_path() -> None:
    dsn = bounce_message(
        original=RAW,
        mail_from="alice@example.net",
        recipient="bob@example.org",
        outcome=Permanent("5.1.1", "smtp; 550 5.1.1 no such user", "mx.example.org"),
        reporting_mta="relay.example.net",
        arrival_date=1_700_000_000,
        now=1_700_000_060,
    )
    assert dsn is not None and dsn.startswith(b"Return-Path: <>\r\n")
    assert b"Status: 5.1.1" in dsn and b"Final-Recipient: rfc822; bob@example.org" in dsn


def test_delivery_bounce_message_never_bounces_a_bounce() -> None:
    """RFC 3464 §2: a message with a null sender gets no DSN."""
    outcome = Permanent("5.1.1", "smtp; 550 no")
    dsn = bounce_message(
        original=RAW,
        mail_from="",
        recipient="bob@example.org",
        outcome=outcome,
        reporting_mta="relay.example.net",
        arrival_date=0,
        now=0,
    )
    assert dsn is None


# -- outbound TLS -------------------------------------------------------------------------------


def test_delivery_policy_for_takes_the_hooks_answer() -> None:
    testing = TLSPolicy(mode="testing")
    assert policy_for(testing, hooked=True, require_tls=True) is testing
    assert policy_for(None, hooked=True, require_tls=True) is NO_POLICY


def test_delivery_policy_for_without_a_hook_follows_require_tls() -> None:
    assert policy_for(None, hooked=False, require_tls=True) is REQUIRED
    assert policy_for(None, hooked=False, require_tls=False) is NO_POLICY


def test_delivery_tls_failure_under_testing_lets_the_delivery_go_on() -> None:
    words = tls_failure(
        ResultType.STARTTLS_NOT_SUPPORTED,
        "STARTTLS not offered",
        where="mx[192.0.2.1]",
        policy=TLSPolicy(mode="testing"),
        domain="example.org",
        fallback="delivering without TLS",
    )
    assert words.deferral is None
    assert words.event == (
        "starttls-not-supported: mx[192.0.2.1]: STARTTLS not offered "
        "(TLS policy of example.org: testing; delivering without TLS)"
    )


def test_delivery_tls_failure_under_enforce_defers_the_host() -> None:
    words = tls_failure(
        ResultType.CERTIFICATE_EXPIRED,
        "certificate has expired",
        where="mx[192.0.2.1]",
        policy=REQUIRED,
        domain="example.org",
        fallback="delivering anyway",
    )
    assert words.deferral == (
        "certificate-expired: certificate has expired "
        "(TLS policy of example.org: enforce; deferred, no plaintext)"
    )
    assert "mx[192.0.2.1]" in words.event and "delivering anyway" not in words.event


def test_delivery_mx_mismatch_names_the_patterns() -> None:
    policy = TLSPolicy(mode="enforce", mx=("*.example.org",))
    assert not policy.mx_allowed("mx.elsewhere.test")
    assert delivery.mx_mismatch(policy, "mx.elsewhere.test") == (
        "MX host mx.elsewhere.test matches no mx pattern of the policy (*.example.org)"
    )
