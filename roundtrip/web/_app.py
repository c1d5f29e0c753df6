"""The aiohttp application: routes, the token and Host checks, security headers, and the
server-sent events stream.

Every handler that reads or changes the store runs its ``_data`` function in the view's
worker thread, so parsing a large message never stalls the SMTP, IMAP and POP3 servers that
share the event loop. The events stream is fed by a store listener (``Store.add_listener``):
the listener runs on whichever thread changed the store and hands the change to the loop with
``call_soon_threadsafe``, so a stored message reaches the page within one loop iteration.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from aiohttp import web

from ..stack import MailStack
from ..store import StoreChange, StoredMessage
from . import _data

__all__ = [
    "CAPABILITY_PARAM",
    "PAGE_CSP",
    "TOKEN_HEADER",
    "Capabilities",
    "Events",
    "build_app",
    "html_csp",
]

T = TypeVar("T")
log = logging.getLogger("roundtrip.web")

#: The header every state-changing request carries the view's token in.
TOKEN_HEADER = "X-Roundtrip-Token"

#: The query parameter of a capability URL (:class:`Capabilities`): what the message's frame
#: and its inline images are fetched with on a view whose reads need the token.
CAPABILITY_PARAM = "cap"

#: The page's own policy: its scripts and styles only, nothing inline, nothing remote; the
#: message HTML is framed from this origin (and sandboxed, see html_csp).
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

# The static files the page is made of, and their types.
_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# Image types a message's HTML may show inline (cid: parts); anything else, SVG included
# (it can carry script), is only ever a download.
_INLINE_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# How long the events stream stays quiet before a comment line keeps proxies and the
# browser from timing it out.
_KEEPALIVE_SECONDS = 15.0
_SSE_BACKLOG = 1000  # changes queued for one slow client before it is dropped
# The only paths read with a capability (class Capabilities); nothing else ever is.
_CAPABILITY_PATHS = frozenset({"/api/message/html", "/api/message/attachment"})


def html_csp(*, remote_images: bool) -> str:
    """The policy of a message's HTML body (hostile input, RFC 2557 aside).

    ``sandbox`` without ``allow-scripts`` or ``allow-same-origin`` gives the document an
    opaque origin and no script even when it is opened outside the page's iframe;
    ``script-src 'none'`` says the same twice. Images load only from the view (``cid:``
    parts) or ``data:`` URLs unless ``remote_images``, so opening a message does not tell a
    tracking pixel anything.
    """
    images = "* data:" if remote_images else "'self' data:"
    return (
        f"sandbox; default-src 'none'; script-src 'none'; img-src {images}; "
        "style-src 'unsafe-inline'; font-src 'none'; form-action 'none'; base-uri 'none'; "
        "frame-ancestors 'self'"
    )


def _security_headers(response: web.StreamResponse, csp: str) -> None:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"


def _error(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    _security_headers(response, PAGE_CSP)
    return response


class Capabilities:
    """Read capabilities for a message's HTML and for one of its parts.

    Message HTML is hostile, and on a view whose reads need the token, the browser fetches
    the frame and its ``cid:`` images by URL, without a header. Whatever those URLs hold
    reaches the message: an image URL is in its markup (and its CSS can match it with
    attribute selectors and send what matched to a remote server), and the frame's own URL
    is the Referer of its requests (an ``<a>`` or ``<img>`` with
    ``referrerpolicy="unsafe-url"`` overrides the response's ``Referrer-Policy``). So those
    URLs carry no token, but a capability that grants exactly one thing: the HTML of one
    message, or one part of one message.

    A capability is an HMAC-SHA256 (RFC 2104) under a random key made when the view starts
    (so none outlives it), over what it grants (kind, user, mailbox, UID, part index) and the
    SHA-256 of the message's bytes: after ``MailStack.reset()`` gives the UID to another
    message, an old capability grants nothing.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    @staticmethod
    def _digest(stored: StoredMessage) -> bytes:
        cached = stored.cache.get("web-sha256")
        if isinstance(cached, bytes):
            return cached
        digest = hashlib.sha256(stored.raw).digest()
        stored.cache["web-sha256"] = digest
        return digest

    def make(self, kind: str, stored: StoredMessage, index: int | None = None) -> str:
        """The capability granting ``kind`` (``"html"`` or ``"part"``) of ``stored``."""
        what = json.dumps([kind, stored.user, stored.mailbox, stored.uid, index])
        mac = hmac.new(self._key, what.encode("utf-8", "surrogatepass"), hashlib.sha256)
        mac.update(self._digest(stored))
        return base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")

    def check(self, given: str, kind: str, stored: StoredMessage, index: int | None = None) -> bool:
        """Whether ``given`` grants ``kind`` (and part ``index``) of ``stored``."""
        expected = self.make(kind, stored, index).encode("ascii")
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


class Events:
    """Fan-out of store changes to every open events stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clients: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def listener(self, change: StoreChange) -> None:
        """A store listener: runs on the thread that changed the store; never blocks."""
        event = {
            "kind": change.kind,
            "user": change.user,
            "folder": change.mailbox,
            "uids": list(change.uids),
        }
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._publish, event)

    def _publish(self, event: dict[str, Any] | None) -> None:
        for client in list(self._clients):
            try:
                client.put_nowait(event)
            except asyncio.QueueFull:
                # A client this far behind is cut off: its stream ends, the browser
                # reconnects and the page reloads what it shows.
                self._clients.discard(client)
                while not client.empty():
                    client.get_nowait()
                client.put_nowait(None)

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        client: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(_SSE_BACKLOG)
        self._clients.add(client)
        return client

    def unsubscribe(self, client: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._clients.discard(client)

    def close(self) -> None:
        """End every stream (on the loop thread)."""
        for client in list(self._clients):
            try:
                client.put_nowait(None)
            except asyncio.QueueFull:
                pass
        self._clients.clear()


class _Handlers:
    def __init__(
        self,
        stack: MailStack,
        token: str,
        pool: ThreadPoolExecutor,
        events: Events,
        allowed_hosts: Callable[[], frozenset[str] | None],
        read_token: bool,
    ) -> None:
        self.stack = stack
        self.read_token = read_token
        self.token = token
        self.pool = pool
        self.events = events
        self.allowed_hosts = allowed_hosts
        self.capabilities = Capabilities()

    @staticmethod
    def _given_token(request: web.Request) -> str:
        return request.headers.get(TOKEN_HEADER) or request.query.get("token", "")

    def _token_ok(self, given: str) -> bool:
        # Header text may carry undecodable octets (surrogate escapes): compare bytes.
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode())

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    # the middleware: Host check (DNS rebinding), token on every state change, error mapping

    @web.middleware
    async def guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        allowed = self.allowed_hosts()
        if allowed is not None and (request.host or "").lower() not in allowed:
            # A page on another name resolving to 127.0.0.1 (DNS rebinding) would otherwise
            # read the mailboxes as a same-origin page.
            return _error(403, f"Host {request.host!r} is not this web view's address")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            given = request.headers.get(TOKEN_HEADER, "")
            if not self._token_ok(given):
                what = "a wrong" if given else "no"
                return _error(
                    403, f"{request.method} needs the view's token: {what} {TOKEN_HEADER}"
                )
        elif self.read_token and request.path.startswith("/api/"):
            # Beyond loopback anyone who can reach the port could read every mailbox, so
            # reads need the token too: in the header, or in the ``token`` parameter for
            # what the page has the browser fetch by itself (downloads, the event stream).
            # The message's frame and its images are fetched with a capability instead
            # (class Capabilities): the token must never reach the message.
            # A read with no token but a capability goes on only on a capability's path,
            # and its handler checks the capability against the message it names before it
            # reads anything (_granted).
            given = self._given_token(request)
            capable = CAPABILITY_PARAM in request.query and request.path in _CAPABILITY_PATHS
            if not self._token_ok(given) and (given or not capable):
                return _error(403, f"reading needs the view's token: {TOKEN_HEADER} or ?token=")
        try:
            return await handler(request)
        except _data.NotFoundError as exc:
            return _error(404, str(exc))
        except _BadRequestError as exc:
            return _error(400, str(exc))
        except _ForbiddenError as exc:
            return _error(403, str(exc))

    # query parameters

    @staticmethod
    def _where(request: web.Request) -> tuple[str, str]:
        user = request.query.get("user", "")
        if not user:
            raise _BadRequestError("the user parameter is required (a mailbox address)")
        return user, request.query.get("folder", "INBOX") or "INBOX"

    @staticmethod
    def _int(request: web.Request, name: str, default: int | None = None) -> int:
        value = request.query.get(name)
        if value is None:
            if default is None:
                raise _BadRequestError(f"the {name} parameter is required")
            return default
        try:
            return int(value)
        except ValueError:
            raise _BadRequestError(f"{name} must be an integer, not {value!r}") from None

    def _message(self, request: web.Request) -> tuple[str, str, int]:
        user, folder = self._where(request)
        return user, folder, self._int(request, "uid")

    async def _granted(
        self, request: web.Request, kind: str, index: int | None = None
    ) -> StoredMessage:
        """The message the request names; on a request the guard let through on its
        capability alone, only if the capability grants ``kind`` (and part ``index``) of
        that very message. Whether a message exists is not told to a wrong capability."""
        # The guard let a read without the token this far only on a capability's path.
        by_capability = self.read_token and not self._token_ok(self._given_token(request))
        try:
            stored = await self._run(_data.stored_message, self.stack, *self._message(request))
        except _data.NotFoundError:
            if by_capability:
                raise _ForbiddenError("this capability grants nothing here") from None
            raise
        if by_capability:
            given = request.query.get(CAPABILITY_PARAM, "")
            if not await self._run(self.capabilities.check, given, kind, stored, index):
                raise _ForbiddenError("this capability grants nothing here")
        return stored

    def _html_url(self, stored: StoredMessage) -> str:
        """The frame's URL of a message's HTML: with a capability for that alone (never the
        token) when reads need one."""
        params: dict[str, Any] = {"user": stored.user, "folder": stored.mailbox, "uid": stored.uid}
        if self.read_token:
            params[CAPABILITY_PARAM] = self.capabilities.make("html", stored)
        return f"/api/message/html?{urlencode(params)}"

    # the page

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        if name not in _STATIC:
            return _error(404, f"no file {name!r}")
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        response = web.Response(body=body, headers={"Content-Type": _STATIC[name]})
        _security_headers(response, PAGE_CSP)
        response.headers["X-Frame-Options"] = "DENY"
        return response

    # the API

    async def mailboxes(self, request: web.Request) -> web.StreamResponse:
        return self._json(await self._run(_data.mailboxes, self.stack))

    async def queue(self, request: web.Request) -> web.StreamResponse:
        return self._json(await self._run(_data.queue, self.stack))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        user, folder = self._where(request)
        page = await self._run(
            _data.message_list,
            self.stack,
            user,
            folder,
            offset=self._int(request, "offset", 0),
            limit=self._int(request, "limit", _data.DEFAULT_PAGE),
            query=request.query.get("q", ""),
        )
        return self._json(page)

    async def empty(self, request: web.Request) -> web.StreamResponse:
        user, folder = self._where(request)
        removed = await self._run(_data.empty_mailbox, self.stack, user, folder)
        return self._json({"removed": removed})

    async def message(self, request: web.Request) -> web.StreamResponse:
        where = self._message(request)

        def detail() -> dict[str, Any]:
            doc = _data.message_detail(self.stack, *where)
            stored = _data.stored_message(self.stack, *where)
            doc["html_url"] = self._html_url(stored) if doc["has_html"] else None
            return doc

        return self._json(await self._run(detail))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        await self._run(_data.delete_message, self.stack, *self._message(request))
        return self._json({"removed": 1})

    async def raw(self, request: web.Request) -> web.StreamResponse:
        stored = await self._run(_data.stored_message, self.stack, *self._message(request))
        # text/plain and nosniff: the browser shows the source, it never renders it.
        response = web.Response(body=stored.raw, content_type="text/plain", charset="utf-8")
        _security_headers(response, html_csp(remote_images=False))
        return response

    async def html(self, request: web.Request) -> web.StreamResponse:
        stored = await self._granted(request, "html")
        where: dict[str, Any] = {"user": stored.user, "folder": stored.mailbox, "uid": stored.uid}

        def part_url(index: int) -> str:
            # Written into the message's own HTML: a capability for this part at most,
            # never the token (class Capabilities).
            params = {**where, "index": index}
            if self.read_token:  # the frame fetches the images itself: no header
                params[CAPABILITY_PARAM] = self.capabilities.make("part", stored, index)
            return f"/api/message/attachment?{urlencode(params)}&inline=1"

        body = await self._run(_data.html_of, stored, part_url)
        response = web.Response(text=body, content_type="text/html", charset="utf-8")
        remote = request.query.get("remote") == "1"
        _security_headers(response, html_csp(remote_images=remote))
        return response

    async def attachment(self, request: web.Request) -> web.StreamResponse:
        index = self._int(request, "index")
        stored = await self._granted(request, "part", index)
        part = await self._run(_data.part_of, stored, index)
        inline = request.query.get("inline") == "1" and part.content_type in _INLINE_IMAGES
        # Anything but an inline image is a download: never rendered in the view's origin.
        response = web.Response(
            body=part.data,
            content_type=part.content_type if inline else "application/octet-stream",
        )
        filename = part.filename or f"part-{index}"
        quoted = filename.replace("\\", "_").replace('"', "_")
        ascii_name = quoted.encode("ascii", "replace").decode().replace("?", "_")
        disposition = "inline" if inline else "attachment"
        # RFC 6266: a plain ASCII name for old clients, the exact one in filename*.
        response.headers["Content-Disposition"] = (
            f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{_rfc5987(filename)}"
        )
        _security_headers(response, html_csp(remote_images=False))
        return response

    async def journey(self, request: web.Request) -> web.StreamResponse:
        stored = await self._run(_data.stored_message, self.stack, *self._message(request))
        return self._json(await self._run(_data.journey, self.stack, stored))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        _security_headers(response, PAGE_CSP)
        client = self.events.subscribe()
        try:
            await response.prepare(request)
            await response.write(b": roundtrip events\nretry: 1000\n\n")
            while True:
                try:
                    event = await asyncio.wait_for(client.get(), _KEEPALIVE_SECONDS)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                data = json.dumps(event, separators=(",", ":"))
                await response.write(f"event: store\ndata: {data}\n\n".encode())
        except ConnectionResetError:  # the browser went away
            pass
        finally:
            self.events.unsubscribe(client)
        return response

    @staticmethod
    def _json(doc: Any) -> web.Response:
        response = web.json_response(doc, dumps=functools.partial(json.dumps, default=str))
        _security_headers(response, PAGE_CSP)
        return response


class _BadRequestError(Exception):
    pass


class _ForbiddenError(Exception):
    pass


def _rfc5987(value: str) -> str:
    return quote(value, safe="")


def build_app(
    stack: MailStack,
    *,
    token: str,
    pool: ThreadPoolExecutor,
    events: Events,
    allowed_hosts: Callable[[], frozenset[str] | None],
    read_token: bool = False,
) -> web.Application:
    """The application: ``/`` and its static files, the JSON API under ``/api/``.

    ``read_token``: reading the API needs the token too (a view beyond loopback).
    """
    handlers = _Handlers(stack, token, pool, events, allowed_hosts, read_token)
    app = web.Application(middlewares=[handlers.guard])
    app.router.add_get("/", handlers.static)
    app.router.add_get("/static/{name}", handlers.static)
    app.router.add_get("/api/mailboxes", handlers.mailboxes)
    app.router.add_get("/api/queue", handlers.queue)
    app.router.add_get("/api/messages", handlers.messages)
    app.router.add_delete("/api/messages", handlers.empty)
    app.router.add_get("/api/message", handlers.message)
    app.router.add_delete("/api/message", handlers.delete)
    app.router.add_get("/api/message/raw", handlers.raw)
    app.router.add_get("/api/message/html", handlers.html)
    app.router.add_get("/api/message/attachment", handlers.attachment)
    app.router.add_get("/api/message/journey", handlers.journey)
    app.router.add_get("/api/events", handlers.stream)
    return app
