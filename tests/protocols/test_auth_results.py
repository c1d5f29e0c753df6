"""drop_forged_auth_results: RFC 8601 section 5 at our MX."""

from __future__ import annotations

import pytest

from roundtrip.protocols.smtp import drop_forged_auth_results

OURS = ["mail.example.org"]


@pytest.mark.parametrize(
    "field",
    [
        b"Authentication-Results: mail.example.org; dkim=pass\r\n",
        b"authentication-results:MAIL.EXAMPLE.ORG. ; spf=pass\r\n",
        b"Authentication-Results: mail.example.org 1;\r\n\tdkim=pass header.d=x\r\n",
    ],
)
def test_auth_results_claiming_us_is_removed(field: bytes) -> None:
    raw = b"Received: x\r\n" + field + b"Subject: s\r\n\r\nbody\r\n"
    assert drop_forged_auth_results(raw, OURS) == b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"Authentication-Results: mx.elsewhere.example; spf=pass\r\nSubject: s\r\n\r\nb\r\n",
        b"Subject: s\r\n\r\nAuthentication-Results: mail.example.org; dkim=pass\r\n",
        b"X-Authentication-Results: mail.example.org; dkim=pass\r\n\r\nb\r\n",
        b"Subject: no body separator\r\n",
    ],
)
def test_auth_results_of_others_or_in_the_body_stay(raw: bytes) -> None:
    assert drop_forged_auth_results(raw, OURS) is raw
