"""config.py: the only parser of option strings; bad values name the valid choices."""

from __future__ import annotations

import pytest

from roundtrip.config import (
    Endpoint,
    StackConfig,
    User,
    parse_endpoint,
    parse_user,
)
from roundtrip.errors import ConfigError


def test_config_defaults_two_domains_one_user_each() -> None:
    config = StackConfig()
    assert config.domains == ("example.com", "example.org")
    assert [u.address for u in config.users] == ["user@example.com", "user@example.org"]
    assert all(len(u.password) >= 12 for u in config.users)
    assert config.users[0].password != config.users[1].password


def test_config_password_not_in_repr() -> None:
    user = User("a@example.com", "s3cret-pass")
    assert "s3cret-pass" not in repr(user)
    assert "s3cret-pass" not in repr(StackConfig(domains=("example.com",), users=(user,)))


def test_config_from_strings_parses_ini_values() -> None:
    config = StackConfig.from_strings(
        {
            "domains": ["a.test", "B.Test."],
            "users": "x@a.test:pw1, y@b.test",
            "timeout": "2.5",
            "tls": "implicit",
            "host": "127.0.0.2",
        }
    )
    assert config.domains == ("a.test", "b.test")
    assert config.users[0] == User("x@a.test", "pw1")
    assert config.users[1].address == "y@b.test"
    assert config.timeouts.wait_timeout == 2.5
    assert config.tls == "implicit"
    assert config.host == "127.0.0.2"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"domains": "not a domain!"}, "not a valid mail domain"),
        ({"tls": "sometimes"}, "choose one of starttls, implicit, both"),
        ({"ports": "lots"}, "choose one of ephemeral, standard"),
        ({"timeout": "soon"}, "expected a number of seconds"),
        ({"timeout": "-1"}, "must be greater than 0"),
        ({"users": "x@bad_domain!"}, "not a valid mail domain"),
        ({"catch_all": "elsewhere.test"}, "not a domain of the stack"),
        ({"users": "nodomain"}, "not of the form local@domain"),
        ({"users": "x@example.com:"}, "empty password"),
        ({"colour": "blue"}, "unknown option"),
    ],
)
def test_config_bad_values_raise_config_error(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StackConfig.from_strings(values)


def test_config_replace_lists_valid_keys_on_unknown() -> None:
    with pytest.raises(ConfigError, match=r"unknown stack option\(s\) colour; valid: .*domains"):
        StackConfig().replace(colour="blue")


def test_config_replace_domains_regenerates_users_and_timeouts() -> None:
    config = StackConfig().replace(domains=["one.test"], wait_timeout=1)
    assert [u.address for u in config.users] == ["user@one.test"]
    assert config.timeouts.wait_timeout == 1.0


def test_config_parse_user_generates_password() -> None:
    assert parse_user("a@b.test").password
    assert parse_user("a@b.test:pw").password == "pw"


@pytest.mark.parametrize(
    ("url", "protocol", "tls", "port"),
    [
        ("smtps://u%40example.com@mail.example.com", "smtp", "implicit", 465),
        ("smtp://u@mail.example.com:2525", "smtp", "starttls", 2525),
        ("imaps://u@h", "imap", "implicit", 993),
        ("imap://u@h", "imap", "starttls", 143),
        ("pop3s://u@h", "pop3", "implicit", 995),
        ("pop3://u@[::1]", "pop3", "starttls", 110),
    ],
)
def test_config_parse_endpoint_schemes(url: str, protocol: str, tls: str, port: int) -> None:
    endpoint = parse_endpoint(url, env={})
    assert (endpoint.protocol, endpoint.tls, endpoint.port) == (protocol, tls, port)


def test_config_parse_endpoint_decodes_user_and_reads_password_from_env() -> None:
    env = {"ROUNDTRIP_SMTP_PASSWORD": "pw-from-env"}
    endpoint = parse_endpoint("smtps://u%40example.com@mail.example.com", env=env)
    assert endpoint.user == "u@example.com"
    assert endpoint.password == "pw-from-env"
    assert "pw-from-env" not in repr(endpoint)
    assert endpoint.url == "smtps://u%40example.com@mail.example.com:465"


@pytest.mark.parametrize(
    ("url", "expect", "message"),
    [
        ("smtps://u:secret@h", "smtp", "put no password in the URL"),
        ("http://u@h", None, "unknown scheme"),
        ("imaps://u@h", "smtp", "expected a SMTP URL"),
        ("smtps://u@h:notaport", None, "smtps://u@h:notaport"),
        ("smtps://", None, "no host"),
        ("smtps://u@h/path", None, "unexpected path"),
    ],
)
def test_config_parse_endpoint_rejects(url: str, expect: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_endpoint(url, expect=expect, env={})


def test_config_password_error_does_not_echo_secret() -> None:
    with pytest.raises(ConfigError) as info:
        parse_endpoint("smtps://u:topsecret@h", env={})
    assert "topsecret" not in str(info.value)


def test_config_endpoint_ipv6_address_in_brackets() -> None:
    assert Endpoint("imap", "implicit", "::1", 993).address == "[::1]:993"


def test_config_relay_connection_cache_must_not_be_negative() -> None:
    assert StackConfig(relay_connection_cache=0).relay_connection_cache == 0
    with pytest.raises(ConfigError, match="relay_connection_cache must not be negative"):
        StackConfig(relay_connection_cache=-1)
