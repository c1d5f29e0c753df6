"""The public API is exactly what roundtrip/__init__.py exports, and every name resolves."""

from __future__ import annotations

import pytest

import roundtrip

EXPECTED = [
    "AuthError",
    "CertificateAuthority",
    "ConfigError",
    "ConnectError",
    "DeliveredMessage",
    "Endpoint",
    "Forward",
    "MailStack",
    "MailboxError",
    "MaildirStore",
    "NotDeliveredError",
    "ProbeError",
    "ProbeResult",
    "ProtocolError",
    "ReceivedMessage",
    "RejectedError",
    "RoundtripError",
    "RoundtripOutcome",
    "RoundtripWarning",
    "ServerStartError",
    "StackConfig",
    "StorageError",
    "Store",
    "TLSError",
    "Timeouts",
    "Transcript",
    "User",
    "__version__",
    "assert_delivered",
    "assert_not_delivered",
    "body_contains",
    "header_matches",
    "parse_endpoint",
    "roundtrip_eml",
    "run_probe",
]


def test_public_api_all_is_pinned_and_sorted() -> None:
    assert roundtrip.__all__ == EXPECTED
    assert roundtrip.__all__ == sorted(roundtrip.__all__)


@pytest.mark.parametrize("name", EXPECTED)
def test_public_api_name_resolves(name: str) -> None:
    assert getattr(roundtrip, name) is not None


def test_public_api_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        roundtrip.Nope  # noqa: B018


def test_public_api_errors_form_one_tree() -> None:
    for name in EXPECTED:
        obj = getattr(roundtrip, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and name != "RoundtripWarning":
            assert issubclass(obj, roundtrip.RoundtripError), name
    assert issubclass(roundtrip.NotDeliveredError, AssertionError)
