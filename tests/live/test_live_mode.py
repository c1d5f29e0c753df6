"""One user test file, two targets: the embedded stack, and with ``--roundtrip-live`` a real
Postfix + Dovecot. Tests marked ``roundtrip_live`` run only in the second mode.

The user project runs in a subprocess (``runpytest_subprocess``), as a user's CI would run it;
passwords reach it through the environment only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks._realstack import RealMailServer

pytest_plugins = ["pytester"]

_AVAILABLE, _REASON = RealMailServer.is_available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"Postfix + Dovecot: {_REASON}")

USER_TESTS = """
import pytest


def test_roundtrip_over_imap(mailstack_probe):
    result = mailstack_probe.assert_roundtrip("imap")
    assert result.checks["exactly one copy"] and result.checks["body unchanged"]
    assert result.time_to_visible is not None


def test_roundtrip_over_pop3(mailstack_probe):
    result = mailstack_probe.assert_roundtrip("pop3")
    assert result.checks["Message-ID unchanged"]


@pytest.mark.roundtrip_live
def test_only_against_a_real_server(mailstack_probe):
    assert mailstack_probe.live
    print("LIVE TARGET", mailstack_probe.smtp.url)
"""

_RUN = ("-p", "no:cacheprovider", "-W", "error", "-s")


def _quote(address: str) -> str:
    return address.replace("@", "%40")


def _live_args(server: RealMailServer) -> list[str]:
    alice, bob = list(server.users)
    host = server.host
    return [
        f"--roundtrip-live=smtps://{_quote(alice)}@{host}:{server.ports['submissions']}",
        f"--roundtrip-live-imap=imaps://{_quote(bob)}@{host}:{server.ports['imaps']}",
        f"--roundtrip-live-pop3=pop3s://{_quote(bob)}@{host}:{server.ports['pop3s']}",
        f"--roundtrip-live-cafile={server.ca.ca_file()}",
        "--roundtrip-timeout=10",
    ]


def _passwords(server: RealMailServer, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = list(server.users)
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", server.users[alice])
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", server.users[bob])
    monkeypatch.setenv("ROUNDTRIP_POP3_PASSWORD", server.users[bob])


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_live_mode_same_file_passes_embedded_and_live(
    user_project: pytest.Pytester,
    real_mailserver: RealMailServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    embedded = user_project.runpytest_subprocess(*_RUN, timeout=120)
    embedded.assert_outcomes(passed=2, skipped=1)
    assert "LIVE TARGET" not in embedded.stdout.str()
    embedded.stdout.fnmatch_lines(["*roundtrip: embedded on 127.0.0.1*"])

    _passwords(real_mailserver, monkeypatch)
    live = user_project.runpytest_subprocess(*_RUN, *_live_args(real_mailserver), timeout=120)
    live.assert_outcomes(passed=3)
    live.stdout.fnmatch_lines(
        [
            "*roundtrip: live smtps://*",
            f"*LIVE TARGET smtps://*:{real_mailserver.ports['submissions']}",
        ]
    )
    output = live.stdout.str() + live.stderr.str()
    for password in real_mailserver.users.values():
        assert password not in output


@pytest.fixture
def altering_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[RealMailServer]:
    with RealMailServer(alter_body=True) as server:
        _passwords(server, monkeypatch)
        try:
            yield server
        finally:
            server.ca.cleanup()


def test_live_mode_broken_server_fails_the_same_file(
    user_project: pytest.Pytester, altering_server: RealMailServer
) -> None:
    result = user_project.runpytest_subprocess(*_RUN, *_live_args(altering_server), timeout=120)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*round trip over imap failed at VERIFY*body unchanged*"])


def test_live_mode_without_password_is_a_usage_error(
    user_project: pytest.Pytester,
    real_mailserver: RealMailServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _passwords(real_mailserver, monkeypatch)
    monkeypatch.delenv("ROUNDTRIP_IMAP_PASSWORD")
    result = user_project.runpytest_subprocess(*_RUN, *_live_args(real_mailserver), timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*set ROUNDTRIP_IMAP_PASSWORD to the password of*"])
