"""A web view of a running stack: its mailboxes, messages, journeys and relay queue.

``roundtrip serve --web`` and the pytest plugin's ``--roundtrip-web`` start one; nothing
imports this package (or aiohttp, ``pip install roundtrip[web]``) otherwise. docs/web.md lists
the JSON API.

How it works
------------
The HTTP server is aiohttp's, on the stack's own event loop (the thread every server of the
stack runs on, ``roundtrip/servers/_runner.py``), bound to loopback and an ephemeral port by
default. The page is one static HTML file with its script and style sheet
(``roundtrip/web/static``), no build step and nothing fetched from elsewhere; it reads the
JSON API under ``/api/`` and listens to ``/api/events`` (server-sent events) for changes.

Safety
------
- Requests that change something (``DELETE``) carry the view's random token in the
  ``X-Roundtrip-Token`` header. A custom header cannot be sent cross-origin without a CORS
  preflight, which the view never grants, so another web page open in the same browser can
  neither send the request nor read the token.
- On an address beyond loopback, reading the API needs the token too (in the header, or in
  the ``token`` parameter for what the page has the browser fetch: downloads, the event
  stream), since anyone who can reach the port could read every mailbox. The message frame
  and its inline images are fetched with per-message, per-part capabilities instead
  (``_app.Capabilities``): the token never appears in anything a message can read.
- On a loopback address, the ``Host`` header must name the view's own address (127.0.0.1,
  ``localhost`` or ``[::1]`` with its port): a page whose name is rebound to 127.0.0.1 (DNS
  rebinding) is refused.
- Message HTML is hostile input. It is framed in an ``<iframe sandbox>`` without
  ``allow-scripts`` or ``allow-same-origin`` and served with a ``sandbox`` Content-Security-
  Policy of its own: no script runs, and the document has an opaque origin, so it can reach
  neither the page's DOM nor its storage. Remote images are blocked unless the page's switch
  allows them for one message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from ..errors import ConfigError, ServerStartError
from ..stack import MailStack
from ._app import TOKEN_HEADER, Events, build_app

__all__ = ["TOKEN_HEADER", "WebView", "is_loopback", "parse_address"]

_START_TIMEOUT = 10.0


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str | None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``PORT`` -> ``(host, port)``; the host
    defaults to 127.0.0.1 and the port to 0 (ephemeral).

    Raises:
        ConfigError: not an address, or a port outside 0-65535.
    """
    host, port_text = "127.0.0.1", "0"
    text = (text or "").strip()
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"--web {text!r}: expected [IPV6]:PORT")
        host, port_text = inner, rest[1:] or "0"
    elif text.isdigit():
        port_text = text
    elif text.count(":") == 1:
        host_part, _, port_text = text.partition(":")
        host = host_part or host
    elif text:
        if ":" in text:
            raise ConfigError(f"--web {text!r}: write an IPv6 address in brackets, [::1]:8025")
        host = text
    try:
        port = int(port_text or "0")
    except ValueError:
        raise ConfigError(f"--web {text!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--web {text!r}: the port must be between 0 and 65535")
    return host, port


class WebView:
    """The web view of one running stack.

    Args:
        stack: a started :class:`MailStack`.
        host: the address to bind (loopback by default; anything else exposes every
            mailbox to the network).
        port: the port (0: an ephemeral one, read back in :attr:`port`).
        token: the token state-changing requests need (a new random one by default).
        read_token: whether reading the API needs the token too; by default only when
            ``host`` is not a loopback address.

    Use as a context manager, or call ``start()`` and ``stop()``; stop it before the stack.
    """

    def __init__(
        self,
        stack: MailStack,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        read_token: bool | None = None,
    ) -> None:
        self.stack = stack
        self.host = host
        self.port = port
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.read_token = not is_loopback(host) if read_token is None else read_token
        self._runner: web.AppRunner | None = None
        self._events: Events | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._hosts: frozenset[str] | None = None

    def __enter__(self) -> WebView:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The page's address (``http://127.0.0.1:PORT/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def url_with_token(self) -> str:
        """The page's address with the token in its fragment, which the page reads (a
        fragment never reaches a server or a Referer)."""
        return f"{self.url}#token={self.token}"

    def start(self) -> WebView:
        """Bind the listener on the stack's loop; returns once it accepts connections.

        Raises:
            ServerStartError: the stack is not running, or the address cannot be bound.
        """
        if self._runner is not None:
            return self
        thread = self.stack.loop_thread
        if not self.stack.started or thread is None:
            raise ServerStartError("the web view needs a running stack: call start() first")
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="roundtrip-web")
        self._events = Events(thread.loop)
        try:
            thread.run(self._start(), timeout=_START_TIMEOUT)
        except OSError as exc:
            self._pool.shutdown(wait=False)
            raise ServerStartError(
                f"web view: cannot bind {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        except TimeoutError:
            self._pool.shutdown(wait=False)
            raise ServerStartError(
                f"web view: not listening within {_START_TIMEOUT:g} s on {self.host}"
            ) from None
        self.stack.store.add_listener(self._events.listener)
        return self

    async def _start(self) -> None:
        assert self._pool is not None and self._events is not None
        app = build_app(
            self.stack,
            token=self.token,
            pool=self._pool,
            events=self._events,
            allowed_hosts=lambda: self._hosts,
            read_token=self.read_token,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address: Any = runner.addresses[0]
        self.port = int(address[1])
        if is_loopback(self.host):
            names = {"127.0.0.1", "localhost", "[::1]", f"[{self.host}]", self.host}
            self._hosts = frozenset(f"{name.lower()}:{self.port}" for name in names)

    def stop(self) -> None:
        """Close the listener and every open stream. A second call does nothing."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._events is not None:
            self.stack.store.remove_listener(self._events.listener)
        thread = self.stack.loop_thread
        if thread is not None and thread.loop.is_running():
            try:
                thread.run(self._stop(runner), timeout=_START_TIMEOUT)
            except TimeoutError:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def _stop(self, runner: web.AppRunner) -> None:
        if self._events is not None:
            self._events.close()
        await asyncio.sleep(0)  # let each stream see its end before the server closes
        await runner.cleanup()
