"""A failing mail assertion points at the test's own line, not at roundtrip's internals.

pytest hides a frame whose locals hold ``__tracebackhide__ = True`` (as its own helpers and
pytest-httpserver do); ``--full-trace`` shows everything again.
"""

from __future__ import annotations

import re

import pytest

FAILING = """
import smtplib

def test_invoice(mailstack):
    alice, bob = mailstack.user("example.com"), mailstack.user("example.org")
    host, port = mailstack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=mailstack.client_context(), timeout=5) as smtp:
        smtp.login(alice.address, alice.password)
        smtp.sendmail(alice.address, [bob.address], b"Subject: Your invoce\\r\\n\\r\\nhi\\r\\n")
    mailstack.assert_delivered(bob.address, subject="Your invoice", timeout=2)

def test_waiting(mailstack):
    mailstack.wait_for("user@example.org", subject="Nothing", timeout=0.2)
"""


def _failures(result: pytest.RunResult) -> str:
    out = result.stdout.str()
    return out[out.index("= FAILURES =") : out.index("short test summary")]


def test_tracebacks_show_the_test_line_and_the_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mail=FAILING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    failures = _failures(result)
    assert 'mailstack.assert_delivered(bob.address, subject="Your invoice", timeout=2)' in failures
    assert "expected exactly 1 message to user@example.org with subject 'Your invoice'" in failures
    assert "Your invoce" in failures  # the near miss and its diff are still there
    assert 'mailstack.wait_for("user@example.org", subject="Nothing", timeout=0.2)' in failures
    for internal in ("roundtrip/stack/", "roundtrip/assertions.py", "def assert_delivered("):
        assert internal not in failures, f"{internal} shown:\n{failures}"
    # The transcripts section follows each traceback (what the servers said); the traceback
    # itself stays short.
    assert "roundtrip transcripts" in failures
    tracebacks = re.sub(r"(?s)-+ roundtrip transcripts -+\n.*?(?=\n_{3,} |\Z)", "", failures)
    assert len(tracebacks.splitlines()) < 60, tracebacks


def test_tracebacks_full_trace_shows_the_internals(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mail=FAILING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--full-trace")
    result.assert_outcomes(failed=2)
    failures = _failures(result)
    assert "roundtrip/stack/__init__.py" in failures
    assert "roundtrip/assertions.py" in failures
