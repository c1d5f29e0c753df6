"""The pytest plugin as a user meets it: a throwaway project using the fixtures (pytester)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TEST = """
import smtplib, poplib, imaplib
import pytest

def send(mailstack, subject, to=None):
    sender = mailstack.user("example.com")
    rcpt = to or mailstack.user("example.org").address
    host, port = mailstack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=mailstack.client_context(), timeout=5) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [rcpt],
                      f"From: {sender.address}\\r\\nSubject: {subject}\\r\\n\\r\\nhi\\r\\n")

def test_send_and_wait(mailstack):
    send(mailstack, "welcome")
    msg = mailstack.wait_for("user@example.org", subject="welcome", timeout=5)
    assert msg.text == "hi\\r\\n" or msg.text.strip() == "hi"

def test_store_is_empty_for_each_test(mailstack):
    assert mailstack.messages() == []

def test_read_back_over_imap(mailstack):
    send(mailstack, "over imap")
    mailstack.wait_for("user@example.org", subject="over imap")  # the relay is asynchronous
    rcpt = mailstack.user("example.org")
    host, port = mailstack.endpoints("example.org").address("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=mailstack.client_context(), timeout=5) as imap:
        imap.login(rcpt.address, rcpt.password)
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", '"over imap"')
        assert data[0].split() == [b"1"]

@pytest.mark.mailstack(domains=["private.test"])
def test_private_stack(mailstack, mailstack_session):
    assert mailstack is not mailstack_session
    assert list(mailstack.domains) == ["private.test"]

def test_probe_fixture(mailstack_probe):
    result = mailstack_probe.assert_roundtrip("imap")
    assert result.ok and result.checks["exactly one copy"]
    assert mailstack_probe.roundtrip("pop3").ok

def test_factory(mailstack_factory):
    a = mailstack_factory(domains=["a.test"])
    b = mailstack_factory(domains=["b.test"])
    assert a.endpoints().ports["smtp"] != b.endpoints().ports["smtp"]

@pytest.mark.roundtrip_live
def test_only_live():
    raise AssertionError("must be skipped without --roundtrip-live")
"""


def test_plugin_fixtures_work_in_a_user_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=6, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "roundtrip: embedded on 127.0.0.1, domains example.com, "
            "example.org, tls both, timeout 10s",
            "*needs a real mail server: pass --roundtrip-live=URL*",
        ]
    )


def test_plugin_failing_wait_for_is_readable(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_fail="""
def test_nothing_arrives(mailstack):
    mailstack.wait_for("user@example.org", subject="Your invoice", timeout=0.2)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*NotDeliveredError: no message to user@example.org in INBOX with subject "
            "'Your invoice' arrived within 0.2 s.*",
            "*No message arrived in any mailbox.*",
        ]
    )


def test_plugin_ini_options_and_bad_values(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nroundtrip_domains =\n    one.test\n    two.test\nroundtrip_timeout = 3\n"
    )
    pytester.makepyfile(
        test_ini="def test_domains(mailstack):\n"
        "    assert list(mailstack.domains) == ['one.test', 'two.test']\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["roundtrip: *domains one.test, two.test*timeout 3s"])
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--roundtrip-tls=sometimes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(
        ["*roundtrip: tls='sometimes': choose one of starttls, implicit, both*"]
    )


def test_plugin_unknown_marker_key_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marker="""
import pytest

@pytest.mark.mailstack(colour="blue")
def test_x(mailstack):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown stack option(s) colour; valid:*"])


def test_plugin_server_error_fails_the_test_that_caused_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_crash="""
def test_causes_crash(mailstack):
    def broken(change):
        raise RuntimeError("adapter crashed")
    mailstack.store.add_listener(broken)
    try:
        mailstack.store.deliver("user@example.org", b"Subject: x\\r\\n\\r\\nx\\r\\n")
    finally:
        mailstack.store.remove_listener(broken)

def test_next_one_is_clean(mailstack):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_causes_crash*", "*RuntimeError: adapter crashed*"]
    )


#: A test module's helper: ``send(mailstack, subject)`` submits one message to its sender.
SEND_HELPER = """
import smtplib

def send(mailstack, subject):
    user = mailstack.user("example.com")
    host, port = mailstack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=mailstack.client_context(), timeout=5) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, [user.address], f"Subject: {subject}\\r\\n\\r\\nhi\\r\\n")
"""

CALLBACK_TESTS = (
    SEND_HELPER
    + """

def test_raising_callback_then_wait_for(mailstack):
    mailstack.on_delivery(lambda message: 1 / 0)
    send(mailstack, "hello")
    mailstack.wait_for(subject="hello", timeout=5)

def test_raising_callback_never_checked(mailstack):
    def broken(message):
        raise RuntimeError("callback failed unchecked")
    mailstack.on_delivery(broken)
    send(mailstack, "stored before the 250")

def test_passing_callback(mailstack):
    seen = []
    mailstack.on_delivery(lambda message: seen.append(message.subject))
    send(mailstack, "fine")
    mailstack.wait_for(subject="fine", timeout=5)
    assert seen == ["fine"]

def test_next_one_is_clean(mailstack):
    send(mailstack, "after")
    mailstack.wait_for(subject="after", timeout=5)
"""
)


def test_plugin_on_delivery_callback_error_fails_the_test_that_caused_it(
    pytester: pytest.Pytester,
) -> None:
    """A raising callback fails its test, in the call (wait_for) or at teardown; a passing
    one leaves its test passed, and neither touches the next test."""
    pytester.makepyfile(test_callbacks=CALLBACK_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=3, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*_ test_raising_callback_then_wait_for _*", "E*ZeroDivisionError: division by zero"]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_raising_callback_never_checked*",
            "E*RuntimeError: callback failed unchecked",
        ]
    )
    result.stdout.fnmatch_lines(["FAILED *::test_raising_callback_then_wait_for - *"])
    result.stdout.fnmatch_lines(["ERROR *::test_raising_callback_never_checked - *"])


CALLBACK_LIFETIME_TESTS = (
    SEND_HELPER
    + """
SEEN = []


def test_a_registers_a_callback(mailstack):
    def only_mine(message):
        SEEN.append(("A", message.subject))
        assert message.subject.startswith("A-"), message.subject
    mailstack.on_delivery(only_mine)
    send(mailstack, "A-mail")
    mailstack.wait_for(subject="A-mail", timeout=5)

def test_b_runs_only_its_own(mailstack):
    mailstack.on_delivery(lambda message: SEEN.append(("B", message.subject)))
    send(mailstack, "B-mail")
    mailstack.wait_for(subject="B-mail", timeout=5)
    assert SEEN == [("A", "A-mail"), ("B", "B-mail")]
"""
)


def test_plugin_on_delivery_callbacks_end_with_their_test(pytester: pytest.Pytester) -> None:
    """Test A's callback does not run for test B's mail; test B's own callback does."""
    pytester.makepyfile(test_lifetime=CALLBACK_LIFETIME_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_plugin_runs_under_xdist_without_port_clashes(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_par=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=6, skipped=1)
