"""drop_forged_auth_results: RFC 8601 section 5 at our MX."""

from __future__ import annotations

import time

import pytest

from roundtrip.protocols.smtp import authserv_id, drop_forged_auth_results

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


@pytest.mark.parametrize(
    "field",
    [
        # A comment glued to the id: authres (roundtrip/probes/_authres.py) reads
        # mail.example.org; the first whitespace token was "mail.example.org(ok)".
        b"Authentication-Results: mail.example.org(ok); dkim=pass header.d=example.com\r\n",
        b"Authentication-Results: (c) Mail.Example.Org(a(b)c) 1; dmarc=pass\r\n",
        b"Authentication-Results: (;)mail.example.org;dkim=pass\r\n",
        b'Authentication-Results: "mail.example.org"; dkim=pass\r\n',
    ],
)
def test_auth_results_claiming_us_behind_cfws_is_removed(field: bytes) -> None:
    raw = b"Received: x\r\n" + field + b"Subject: s\r\n\r\nbody\r\n"
    assert drop_forged_auth_results(raw, OURS) == b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"


def test_auth_results_claiming_us_after_70_kb_of_fields_is_removed() -> None:
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 900) for i in range(80))
    foreign = b"Authentication-Results: mx.elsewhere.example(ok); spf=pass\r\n"
    forged = b"Authentication-Results: mail.example.org; dkim=pass\r\n"
    raw = pad + forged + foreign + b"Subject: s\r\n\r\nbody\r\n"
    assert drop_forged_auth_results(raw, OURS) == pad + foreign + b"Subject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    "value",
    [
        b" mail.example.org.elsewhere.example; dkim=pass",
        b" mx.elsewhere.example (mail.example.org); dkim=pass",
        b' "mx.elsewhere.example" (mail.example.org); spf=pass',
    ],
)
def test_auth_results_twin_others_behind_cfws_stay(value: bytes) -> None:
    raw = b"Received: x\r\nAuthentication-Results:" + value + b"\r\nSubject: s\r\n\r\nb\r\n"
    assert drop_forged_auth_results(raw, OURS) is raw


def test_auth_results_authserv_id_reading_is_linear() -> None:
    """docs/security.md: client input is read in one pass; 100 kB of each shape at once."""
    for shape in (b"(", b")", b'"', b"\\", b"(\\", b"a ", b"a(", b";"):
        value = shape * (100_000 // len(shape))
        started = time.perf_counter()
        authserv_id(value)
        drop_forged_auth_results(b"Authentication-Results:" + value + b"\r\n\r\nb", OURS)
        assert time.perf_counter() - started < 1.0, shape
    assert authserv_id(b" (unclosed mail.example.org; x") == ""
