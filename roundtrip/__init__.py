"""roundtrip: prove e-mail works end to end.

A hermetic mail world on loopback for tests (SMTP submission and MX, DNS, IMAP, POP3, one
trustme CA), and a validator that runs the same round trip against real mail servers.

Public names are imported lazily, so that loading the pytest plugin stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AuthError": "errors",
    "CertificateAuthority": "certs",
    "ConfigError": "errors",
    "ConnectError": "errors",
    "DeliveredMessage": "stack",
    "Endpoint": "config",
    "Forward": "config",
    "MailStack": "stack",
    "MaildirStore": "maildir",
    "RoundtripOutcome": "testing",
    "assert_delivered": "assertions",
    "assert_not_delivered": "assertions",
    "body_contains": "assertions",
    "header_matches": "assertions",
    "roundtrip_eml": "testing",
    "MailboxError": "errors",
    "NotDeliveredError": "errors",
    "ProbeError": "errors",
    "ProbeResult": "probes.roundtrip",
    "ProtocolError": "errors",
    "ReceivedMessage": "message",
    "RejectedError": "errors",
    "RoundtripError": "errors",
    "RoundtripWarning": "errors",
    "ServerStartError": "errors",
    "StackConfig": "config",
    "StorageError": "errors",
    "Store": "store",
    "TLSError": "errors",
    "Timeouts": "config",
    "Transcript": "stack",
    "User": "config",
    "parse_endpoint": "config",
    "run_probe": "probes.roundtrip",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'roundtrip' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .assertions import (
        assert_delivered,
        assert_not_delivered,
        body_contains,
        header_matches,
    )
    from .certs import CertificateAuthority
    from .config import Endpoint, Forward, StackConfig, Timeouts, User, parse_endpoint
    from .errors import (
        AuthError,
        ConfigError,
        ConnectError,
        MailboxError,
        NotDeliveredError,
        ProbeError,
        ProtocolError,
        RejectedError,
        RoundtripError,
        RoundtripWarning,
        ServerStartError,
        StorageError,
        TLSError,
    )
    from .maildir import MaildirStore
    from .message import ReceivedMessage
    from .probes.roundtrip import ProbeResult, run_probe
    from .stack import DeliveredMessage, MailStack, Transcript
    from .store import Store
    from .testing import RoundtripOutcome, roundtrip_eml
