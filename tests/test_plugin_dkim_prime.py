"""The plugin starts minting the session stack's DKIM keys as soon as collection shows a test
that needs a stack, so the first ``mailstack`` does not wait for RSA key generation.

Each case runs pytest in a fresh process (the keys are kept per process).
"""

from __future__ import annotations

import pytest

PROBE = """
import threading

from roundtrip.stack import _dkim


def test_before_any_stack():
    # No stack has started yet: whatever is minted or minting was the plugin's doing.
    with _dkim._KEYS_LOCK:
        known = set(_dkim._KEYS) | set(_dkim._PENDING)
    primed = any(t.name == "roundtrip-dkim-prime" for t in threading.enumerate())
    print(f"PRIMED={sorted(known)} THREAD={primed}")
    assert known or primed, "nothing was minted ahead of the first stack"
"""

USES_STACK = """

def test_with_a_stack(mailstack):
    assert set(mailstack.dkim_keys) == set(mailstack.config.domains)
"""


def test_plugin_mints_keys_ahead_when_a_test_needs_a_stack(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_prime=PROBE + USES_STACK)
    result = pytester.runpytest_subprocess("-q", "-s", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)


def test_plugin_mints_nothing_when_no_test_needs_a_stack(pytester: pytest.Pytester) -> None:
    """The twin: a session without a stack pays for no key."""
    pytester.makepyfile(test_prime=PROBE)
    result = pytester.runpytest_subprocess("-q", "-s", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*PRIMED=[[][]] THREAD=False*"])
