"""Fixtures for tests that run against real mail server software."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from roundtrip.realstack import RealMailServer


@pytest.fixture(scope="session")
def real_mailserver() -> Iterator[RealMailServer]:
    """A loopback Postfix + Dovecot, started once per session (skipped when not installed)."""
    ok, reason = RealMailServer.is_available()
    if not ok:
        pytest.skip(f"Postfix + Dovecot harness unavailable: {reason}")
    with RealMailServer() as server:
        yield server
