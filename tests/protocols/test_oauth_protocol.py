"""The pure parts of XOAUTH2 / OAUTHBEARER (RFC 7628): parsing, the token table, the exchange."""

from __future__ import annotations

import base64
import json

import pytest

from roundtrip.protocols._oauth import (
    BearerCredentials,
    BearerExchange,
    SASLSyntaxError,
    TokenTable,
    error_status,
    parse_response,
)


def test_oauth_parse_xoauth2() -> None:
    got = parse_response("xoauth2", b"user=a@example.com\x01auth=Bearer tok.en-1\x01\x01")
    assert got == BearerCredentials("a@example.com", "tok.en-1")
    assert "tok.en-1" not in repr(got)


@pytest.mark.parametrize(
    "data",
    [
        b"user=a@example.com\x01auth=Bearer tok\x01",  # no final ^A^A
        b"user=a@example.com\x01auth=Basic tok\x01\x01",  # another scheme
        b"auth=Bearer tok\x01\x01",  # no user
        b"user=a@example.com\x01auth=Bearer to ken\x01\x01",  # not a b64token
        b"",
    ],
)
def test_oauth_parse_xoauth2_malformed(data: bytes) -> None:
    assert parse_response("XOAUTH2", data) is None


def test_oauth_parse_oauthbearer_gs2_header() -> None:
    data = b"n,a=a=2Cb=3Dc@example.com,\x01host=h\x01port=993\x01auth=Bearer t0k\x01\x01"
    assert parse_response("OAUTHBEARER", data) == BearerCredentials("a,b=c@example.com", "t0k")


@pytest.mark.parametrize(
    "data",
    [
        b"n,,\x01auth=Bearer t0k\x01\x01",  # no authzid: not supported
        b"p=tls-unique,a=u@x,\x01auth=Bearer t0k\x01\x01",  # channel binding
        b"n,a=u,x,\x01auth=Bearer t0k\x01\x01",  # a bare comma in the saslname
        b"n,a=u@x,\x01host=h\x01\x01",  # no auth pair
    ],
)
def test_oauth_parse_oauthbearer_malformed(data: bytes) -> None:
    assert parse_response("OAUTHBEARER", data) is None


def test_oauth_token_table_binds_user_and_expiry() -> None:
    now = [1000.0]
    table = TokenTable(lambda: now[0])
    table.issue("A@Example.com", "t1", lifetime=60)
    assert table.check("a@example.com", "t1")
    assert not table.check("b@example.com", "t1")
    assert not table.check("a@example.com", "t2")
    now[0] += 60
    assert not table.check("a@example.com", "t1")


def test_oauth_exchange_error_flow() -> None:
    exchange = BearerExchange("XOAUTH2", lambda user, token: token == "good")
    bad = base64.b64encode(b"user=u@x\x01auth=Bearer bad\x01\x01")
    challenge = exchange.step(bad)
    assert isinstance(challenge, bytes)
    assert json.loads(base64.b64decode(challenge)) == json.loads(error_status())
    assert json.loads(error_status())["status"] == "invalid_token"
    # Whatever follows the status, even a good response, fails the exchange.
    assert exchange.step(base64.b64encode(b"user=u@x\x01auth=Bearer good\x01\x01")) is None


def test_oauth_exchange_success_and_bad_base64() -> None:
    exchange = BearerExchange("XOAUTH2", lambda user, token: token == "good")
    assert exchange.step(base64.b64encode(b"user=u@x\x01auth=Bearer good\x01\x01")) == "u@x"
    with pytest.raises(SASLSyntaxError):
        BearerExchange("XOAUTH2", None).step(b"not base64!")
    assert BearerExchange("XOAUTH2", None).step(b"=") is None
