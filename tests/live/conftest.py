"""Fixtures for tests that run against real mail server software.

The Postfix + Dovecot driver lives in ``benchmarks/_realstack.py`` (it is not part of the
installed package); ``pythonpath`` in pyproject.toml puts the checkout's root on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks._realstack import RealMailServer


@pytest.fixture(scope="session")
def real_mailserver() -> Iterator[RealMailServer]:
    """A loopback Postfix + Dovecot, started once per session (skipped when not installed)."""
    ok, reason = RealMailServer.is_available()
    if not ok:
        pytest.skip(f"Postfix + Dovecot harness unavailable: {reason}")
    with RealMailServer() as server:
        yield server
