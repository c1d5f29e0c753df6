"""The README's sender-authentication example runs as written, in a pytest of its own.

The code block under "Sender authentication" is copied out of README.md and run by pytest
with the plugin: it must pass. Its twin changes one expected verdict and must fail, so the
example asserts something.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _example(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


EXAMPLE = _example("### Sender authentication")


def test_readme_auth_example_passes(pytester: pytest.Pytester) -> None:
    assert '"dkim": "pass"' in EXAMPLE
    pytester.makepyfile(test_readme_auth=EXAMPLE)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


def test_readme_auth_example_fails_when_a_verdict_differs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_readme_auth=EXAMPLE.replace('"dmarc": "pass"', '"dmarc": "fail"'))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*dmarc=fail*"])
