"""Shared fixtures. The roundtrip plugin itself is loaded through its entry point."""

from __future__ import annotations

import pytest
from _support import make_message


@pytest.fixture
def message_factory():  # type: ignore[no-untyped-def]
    return make_message
