"""Fixtures for tests that run against real mail server software.

The Postfix + Dovecot driver lives in ``benchmarks/_realstack.py`` (it is not part of the
installed package). ``python -m pytest`` from the repository root finds ``benchmarks`` on its
own; the bare ``pytest`` command does not put the root on ``sys.path``, so it is added here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)

from benchmarks._realstack import RealMailServer  # noqa: E402


@pytest.fixture(scope="session")
def real_mailserver() -> Iterator[RealMailServer]:
    """A loopback Postfix + Dovecot, started once per session (skipped when not installed)."""
    ok, reason = RealMailServer.is_available()
    if not ok:
        pytest.skip(f"Postfix + Dovecot harness unavailable: {reason}")
    with RealMailServer() as server:
        yield server
