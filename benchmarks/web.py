"""The web view under a full mailbox (issue "A web view for roundtrip serve", Performance).

Usage (from the repository root)::

    python -m benchmarks.web [--messages 10000] [--rounds 50]

Fills one mailbox through the store API (``Store.deliver``, no SMTP: the figure is the web
view's, not the MX's), starts a stack and its web view, and times over loopback, with one
keep-alive HTTP/1.1 connection:

- the mailboxes (``GET /api/mailboxes``), which the page asks for first;
- the list's first page (``GET /api/messages``, 50 newest): the first request (each message
  of the page parsed for the first time) and the median of the next ones;
- one message's view (``GET /api/message``): a different message each time, never viewed
  before (so always parsed), median and worst;
- a search across the whole mailbox (``q=``), first (every message parsed) and again;
- the live update: ``Store.deliver`` to the ``event: store`` line on an open
  ``/api/events`` stream, median and worst.

Client and server share this process (and its GIL), as in a test session using the plugin's
``--roundtrip-web``; the targets are 50 ms for a page or a view, 100 ms for an event.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
import urllib.parse
from typing import Any

from roundtrip.stack import MailStack
from roundtrip.web import WebView

TIMEOUT = 30.0
TARGETS = {"page": 0.050, "view": 0.050, "event": 0.100}


def _message(n: int) -> bytes:
    body = "".join(f"line {i} of message {n}, some words to search through\r\n" for i in range(30))
    return (
        f"From: sender{n % 97}@example.com\r\nTo: user@example.org\r\n"
        f"Subject: benchmark message {n}\r\nMessage-ID: <bench-{n}@example.com>\r\n"
        f"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def _get(conn: http.client.HTTPConnection, path: str, params: dict[str, Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    conn.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    assert response.status == 200, (response.status, body[:200])
    return elapsed, json.loads(body)


def measure(messages: int, rounds: int) -> list[tuple[str, float, str]]:
    """Rows of (what, seconds, target text)."""
    rows: list[tuple[str, float, str]] = []
    with MailStack() as stack, WebView(stack) as view:
        user = stack.user("example.org").address
        started = time.perf_counter()
        for n in range(messages):
            stack.store.deliver(user, _message(n))
        fill = time.perf_counter() - started
        rows.append((f"fill {messages} messages (Store.deliver)", fill, ""))
        conn = http.client.HTTPConnection("127.0.0.1", view.port, timeout=TIMEOUT)
        try:
            # The page asks for the mailboxes first: that request also starts the view's
            # worker thread, which the first page would otherwise pay for.
            rows.append(
                ("mailboxes (the page's first request)", _get(conn, "/api/mailboxes", {})[0], "")
            )
            params = {"user": user, "limit": 50}
            first, page = _get(conn, "/api/messages", params)
            assert page["total"] == messages and len(page["messages"]) == 50
            rows.append(("list first page, first request", first, "< 50 ms"))
            warm = [_get(conn, "/api/messages", params)[0] for _ in range(rounds)]
            rows.append(("list first page, median", statistics.median(warm), "< 50 ms"))

            uids = [m.uid for m in stack.store.mailbox(user)][: rounds * 10 : 10]
            views = [_get(conn, "/api/message", {"user": user, "uid": u})[0] for u in uids]
            rows.append(
                ("message view (never viewed), median", statistics.median(views), "< 50 ms")
            )
            rows.append(("message view (never viewed), worst", max(views), "< 50 ms"))

            search = {"user": user, "q": "sender13@", "limit": 50}
            cold, found = _get(conn, "/api/messages", search)
            rows.append((f"search, first ({found['total']} hits)", cold, ""))
            rows.append(("search, again", _get(conn, "/api/messages", search)[0], ""))
        finally:
            conn.close()

        events = http.client.HTTPConnection("127.0.0.1", view.port, timeout=TIMEOUT)
        try:
            events.request("GET", "/api/events")
            stream = events.getresponse()
            while stream.readline() not in (b"\n", b""):  # the stream's preamble
                pass
            delays = []
            for n in range(rounds):
                started = time.perf_counter()
                stack.store.deliver(user, _message(messages + n))
                while not stream.readline().startswith(b"data: "):
                    pass
                delays.append(time.perf_counter() - started)
            rows.append(("live event after a store, median", statistics.median(delays), "< 100 ms"))
            rows.append(("live event after a store, worst", max(delays), "< 100 ms"))
        finally:
            events.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    rows = measure(args.messages, args.rounds)
    width = max(len(what) for what, _, _ in rows)
    print(f"{'web view':<{width}}  {'time':>10}  target")
    for what, seconds, target in rows:
        shown = f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"
        print(f"{what:<{width}}  {shown:>10}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
