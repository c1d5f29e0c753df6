"""Shared fixtures. The roundtrip plugin itself is loaded through its entry point."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig


@pytest.fixture
def message_factory():  # type: ignore[no-untyped-def]
    return make_message


@pytest.fixture(scope="module")
def two_domains_running() -> Iterator[MailStack]:
    """A stack of example.com and example.org shared by a module's tests."""
    with MailStack(StackConfig(domains=("example.com", "example.org"))) as stack:
        yield stack


@pytest.fixture
def two_domains(two_domains_running: MailStack) -> MailStack:
    """``two_domains_running`` after ``reset()``: empty mailboxes, default behaviour."""
    two_domains_running.reset()
    return two_domains_running
