"""``ROUNDTRIP_LOOP=auto``: uvloop when it can be imported, else asyncio's loop (issue #17)."""

from __future__ import annotations

import asyncio
import importlib.util
import smtplib
import sys

import pytest

from roundtrip import MailStack
from roundtrip.errors import ServerStartError
from roundtrip.servers._runner import LOOP_CHOICES, LoopThread, loop_choice

_TIMEOUT = 5.0
_HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def _loop_module(thread: LoopThread) -> str:
    async def module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    try:
        return thread.run(module(), timeout=_TIMEOUT)
    finally:
        thread.stop()


def test_loop_auto_is_the_default() -> None:
    assert "auto" in LOOP_CHOICES
    assert loop_choice({"ROUNDTRIP_LOOP": " Auto "}) == "auto"
    assert loop_choice({}) == "auto"


def test_loop_unset_runs_uvloop_when_installed_and_asyncio_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ROUNDTRIP_LOOP", raising=False)
    assert _loop_module(LoopThread()) == ("uvloop" if _HAS_UVLOOP else "asyncio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert _loop_module(LoopThread()) == "asyncio"
    monkeypatch.setenv("ROUNDTRIP_LOOP", "asyncio")  # forcing asyncio where uvloop is
    monkeypatch.delitem(sys.modules, "uvloop")
    assert _loop_module(LoopThread()) == "asyncio"


@pytest.mark.skipif(not _HAS_UVLOOP, reason="uvloop not installed (pip install roundtrip[fast])")
def test_loop_auto_runs_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTRIP_LOOP", "auto")
    assert _loop_module(LoopThread()) == "uvloop"


def test_loop_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes "import uvloop" raise ImportError, as when it is absent.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert _loop_module(LoopThread(loop="auto")) == "asyncio"
    with pytest.raises(ServerStartError, match="pip install uvloop"):
        LoopThread(loop="uvloop")  # forcing it still says what is missing


def test_loop_auto_stack_takes_mail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTRIP_LOOP", "auto")
    with MailStack() as stack:
        assert stack.loop_thread is not None
        expected = "uvloop" if _HAS_UVLOOP else "asyncio"
        assert type(stack.loop_thread.loop).__module__.split(".")[0] == expected
        ep = stack.endpoint("submissions")
        with smtplib.SMTP_SSL(
            ep.host, ep.port, context=stack.client_context(), timeout=_TIMEOUT
        ) as smtp:
            smtp.login(ep.user, ep.password)
            smtp.sendmail(ep.user, [ep.user], b"Subject: auto loop\r\n\r\nhello\r\n")
        stack.wait_for(ep.user, subject="auto loop", timeout=_TIMEOUT)
        stack.check()
