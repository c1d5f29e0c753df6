"""One asyncio event loop in a background thread, shared by every server of a stack.

Synchronous code (tests, the CLI) submits coroutines with ``run()``; errors raised by server
code on the loop are recorded with ``record_error()`` and re-raised by ``check()`` in the thread
that asks, so a crash in an adapter fails the test that caused it.

The loop implementation
-----------------------
``ROUNDTRIP_LOOP`` chooses the event loop every ``LoopThread`` (so every stack) runs on:

- ``auto`` (the default, also when the variable is unset or empty): uvloop when it can be
  imported (``pip install 'roundtrip[fast]'``), else asyncio's loop, silently;
- ``asyncio``: the standard library's loop, ``asyncio.new_event_loop()``, even where uvloop
  is installed;
- ``uvloop``: ``uvloop.new_event_loop()`` (without it ``LoopThread()`` raises
  ``ServerStartError`` saying so).

uvloop is taken when installed, as the issue "Performance, round two" asks: measured side by
side in the test's process (``python -m benchmarks.run --only inprocess``,
docs/benchmarks.md), it took 0.87-0.96x asyncio's time per round trip on 2026-12-03 and
0.92x and 0.86x in two runs on 2026-12-04 (geometric means of the section's rows), and
10,000 relayed messages went through 3 % faster end to end and 12 % faster at submission.

Any other value is a ``ConfigError`` listing the valid ones. The servers use only the public
transport API (``get_extra_info("ssl_object")``, ``"peercert"``, ``"cipher"``), so they behave
the same on both; ``tox -e uvloop`` runs the whole suite on uvloop. ``config.loop_choice()``
reads the variable (only config.py reads the environment); ``LoopThread(loop=...)`` overrides
it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..config import LOOP_CHOICES, loop_choice
from ..errors import ServerStartError

__all__ = ["LOOP_CHOICES", "LoopThread", "loop_choice", "new_event_loop"]

T = TypeVar("T")
log = logging.getLogger("roundtrip.servers")


def new_event_loop(choice: str | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``choice`` names (default: ``loop_choice()``).

    Raises:
        ConfigError: ``choice`` is not one of ``LOOP_CHOICES``.
        ServerStartError: uvloop was asked for and is not installed.
    """
    choice = loop_choice() if choice is None else loop_choice({"ROUNDTRIP_LOOP": choice})
    if choice == "asyncio":
        return asyncio.new_event_loop()
    try:
        # Imported by name: uvloop is optional, and the type check must pass without it.
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "auto":
            return asyncio.new_event_loop()
        raise ServerStartError(
            "ROUNDTRIP_LOOP=uvloop, but uvloop is not installed: pip install uvloop "
            "(or unset ROUNDTRIP_LOOP to use asyncio's own loop)"
        ) from exc
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class LoopThread:
    """An event loop running in a daemon thread until ``stop()``.

    Args:
        name: the thread's name.
        loop: ``"asyncio"``, ``"uvloop"`` or ``"auto"``; None: as ``ROUNDTRIP_LOOP`` says.

    Raises:
        ConfigError: an unknown loop name.
        ServerStartError: uvloop was asked for and is not installed.
    """

    def __init__(self, name: str = "roundtrip-loop", *, loop: str | None = None) -> None:
        self.loop = new_event_loop(loop)
        self.loop.set_exception_handler(self._loop_exception)
        self._errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = threading.Event()
        self._stopped = False
        self._thread.start()
        self._started.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for its result from another thread.

        Raises:
            TimeoutError: it did not finish within ``timeout`` seconds (it is cancelled).
        """
        if self.in_loop_thread:
            raise RuntimeError("LoopThread.run() called from the loop thread: it would deadlock")
        future = asyncio.run_coroutine_threadsafe(_as_coro(coro), self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"loop task did not finish within {timeout:g} s") from None

    def call_wait(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result once it has run.

        For a change the caller relies on at once (the records the DNS server answers with):
        :meth:`call` only schedules, and a query sent right after it may be answered first
        (uvloop runs callbacks from other threads after the I/O already waiting).
        """
        if self.in_loop_thread:
            return fn(*args)

        async def invoke() -> T:
            return fn(*args)

        return self.run(invoke(), timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop thread, from any thread."""
        if self.in_loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def record_error(self, exc: BaseException) -> None:
        """Remember an exception raised by server code; ``check()`` re-raises it."""
        log.error("server error: %r", exc, exc_info=exc)
        with self._errors_lock:
            self._errors.append(exc)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, OSError, asyncio.CancelledError)):
            # A peer went away mid-write or mid-handshake: not a server bug.
            log.debug("connection-level error: %s", context.get("message"))
            return
        self.record_error(exc or RuntimeError(str(context.get("message"))))

    def errors(self) -> list[BaseException]:
        with self._errors_lock:
            return list(self._errors)

    def take_errors(self) -> list[BaseException]:
        with self._errors_lock:
            errors, self._errors = self._errors, []
        return errors

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and join the thread. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ServerStartError(f"event loop thread did not stop within {timeout:g} s")


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw
