"""The report section "roundtrip transcripts": a failing test shows its own connections.

Each test runs an inner pytest session (pytester) whose tests use the plugin's ``mailstack``
fixture and real smtplib clients; the outer test reads the inner report.
"""

from __future__ import annotations

import pytest

TESTS = """
import smtplib

def _ehlo(mailstack, name):
    host, port = mailstack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=mailstack.client_context(), timeout=5) as c:
        c.ehlo(name)

def test_neighbour(mailstack):
    _ehlo(mailstack, "neighbour.example")

def test_fails(mailstack):
    _ehlo(mailstack, "failing.example")
    user = mailstack.user("example.com")
    host, port = mailstack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=mailstack.client_context(), timeout=5) as c:
        c.login(user.address, user.password)
        c.sendmail(user.address, ["user@example.org"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
    mailstack.wait_for(to="user@example.org", timeout=5)
    assert False, "wanted mail for user@example.org"

def test_passes(mailstack):
    _ehlo(mailstack, "passing.example")

def test_without_stack():
    assert False, "no stack here"
"""


def _section(output: str, test: str) -> str:
    """The "roundtrip transcripts" section printed under ``test``'s failure ("" if none)."""
    start = output.find(f"_ {test} _")
    if start < 0:
        return ""
    end = output.find("\n____", start + 1)
    block = output[start : end if end > 0 else len(output)]
    marker = block.find("roundtrip transcripts")
    return block[marker:] if marker >= 0 else ""


def test_transcripts_plugin_failing_test_gets_its_own_connections(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(TESTS)
    # -rP prints the sections of passing tests too: they must have none.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rP")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    section = _section(out, "test_fails")
    assert "ehlo failing.example" in section
    assert "AUTH PLAIN ****" in section and "\nrelay " in section and "dns (" in section
    # Only this test's connections: none of the neighbour's, run just before it.
    assert "neighbour.example" not in section and "passing.example" not in section
    # The connections about the address the assertion names come first.
    blocks = [b for b in section.split("\n\n") if b.strip()]
    titles = [b.splitlines()[0] for b in blocks]
    about = ["user@example.org" in t for t in titles if not t.startswith(("dns", "roundtrip"))]
    assert about == sorted(about, reverse=True) and about[0] and not about[-1], titles
    # Passing tests and a test without the stack add nothing.
    assert out.count("roundtrip transcripts") == 1, out
    assert _section(out, "test_passes") == "" and _section(out, "test_without_stack") == ""


def test_transcripts_plugin_option_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--roundtrip-transcripts=off")
    result.assert_outcomes(passed=2, failed=2)
    assert "roundtrip transcripts" not in result.stdout.str()


def test_transcripts_plugin_ini_off(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nroundtrip_transcripts = off\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    assert "roundtrip transcripts" not in result.stdout.str()


def test_transcripts_plugin_all_shows_passing_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rP", "--roundtrip-transcripts=all", "-k", "passes"
    )
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "roundtrip transcripts" in out and "ehlo passing.example" in out


def test_transcripts_plugin_bad_mode_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nroundtrip_transcripts = sometimes\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*roundtrip_transcripts='sometimes'*failed, all, off*"])
