"""The web view's JSON API (roundtrip/web, docs/web.md) over real sockets, against a real
MailStack fed through submission on 465. The browser tests are in test_web_browser.py."""

from __future__ import annotations

import email.utils
import html
import http.client
import json
import re
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the web view needs aiohttp (pip install roundtrip[web])")

from roundtrip.errors import ConfigError, ServerStartError
from roundtrip.protocols.dns import Record
from roundtrip.stack import OUTBOUND_ADDRESS, MailStack
from roundtrip.web import TOKEN_HEADER, WebView, parse_address

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(scope="module")
def view(stack: MailStack) -> Iterator[WebView]:
    with WebView(stack) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(stack: MailStack) -> Iterator[None]:
    stack.reset()
    yield
    stack.check()


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    view: WebView,
    path: str,
    params: dict[str, Any] | None = None,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> Reply:
    url = view.url.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())


def submit(stack: MailStack, raw: bytes, *, to: str) -> None:
    sender = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [to], raw)


def rich_message(stack: MailStack, subject: str, *, to: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = stack.user("example.com").address
    msg["To"] = to or stack.user("example.org").address
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="example.com")
    msg["Date"] = email.utils.formatdate()
    msg.set_content("plain words for the search\n")
    msg.add_alternative("<p>Hello <b>HTML</b> <img src='cid:logo@x'></p>", subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG-logo", "image", "png", cid="<logo@x>")
    msg.add_attachment(b"col1,col2\n1,2\n", maintype="text", subtype="csv", filename="data.csv")
    return msg.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def deliver(stack: MailStack, subject: str) -> tuple[str, int]:
    rcpt = stack.user("example.org").address
    submit(stack, rich_message(stack, subject), to=rcpt)
    found = stack.wait_for(rcpt, subject=subject, timeout=TIMEOUT)
    return rcpt, found.stored.uid


# -- mailboxes, lists ------------------------------------------------------------------------


def test_web_mailboxes_lists_every_domain_user_and_unread_count(
    stack: MailStack, view: WebView
) -> None:
    deliver(stack, "counted")
    # The relay leaves its queue just after the recipient's MX stored the message.
    stack.wait_relay(lambda queue: not queue, timeout=TIMEOUT)
    doc = call(view, "/api/mailboxes").json()
    assert [d["name"] for d in doc["domains"]] == ["example.com", "example.org"]
    org = {(b["user"], b["folder"]): b for b in doc["domains"][1]["mailboxes"]}
    inbox = org[(stack.user("example.org").address, "INBOX")]
    assert (inbox["total"], inbox["unread"]) == (1, 1)
    assert [b["user"] for b in doc["outbound"]] == [OUTBOUND_ADDRESS] * len(doc["outbound"])
    assert doc["queue"] == []


def test_web_messages_of_an_unknown_mailbox_is_404(view: WebView) -> None:
    reply = call(view, "/api/messages", {"user": "nobody@example.org"})
    assert reply.status == 404
    assert "nobody@example.org" in reply.json()["error"]
    assert call(view, "/api/messages", {"user": "user@example.org", "folder": "Nope"}).status == 404
    assert call(view, "/api/messages").status == 400  # no user at all


def test_web_messages_newest_first_paged_and_searchable(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    for n in range(5):
        stack.store.deliver(
            rcpt, f"Subject: number {n}\r\nFrom: a{n}@x.test\r\n\r\nbody {n}\r\n".encode()
        )
    page = call(view, "/api/messages", {"user": rcpt, "limit": 2}).json()
    assert (page["total"], [m["subject"] for m in page["messages"]]) == (
        5,
        ["number 4", "number 3"],
    )
    page = call(view, "/api/messages", {"user": rcpt, "limit": 2, "offset": 4}).json()
    assert [m["subject"] for m in page["messages"]] == ["number 0"]
    found = call(view, "/api/messages", {"user": rcpt, "q": "A2@X.TEST"}).json()
    assert [m["subject"] for m in found["messages"]] == ["number 2"]
    found = call(view, "/api/messages", {"user": rcpt, "q": "body 3"}).json()
    assert [m["subject"] for m in found["messages"]] == ["number 3"]


def test_web_messages_search_without_match_and_bad_paging(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(rcpt, b"Subject: present\r\n\r\nbody\r\n")
    empty = call(view, "/api/messages", {"user": rcpt, "q": "absent"}).json()
    assert (empty["total"], empty["messages"]) == (0, [])
    reply = call(view, "/api/messages", {"user": rcpt, "limit": "ten"})
    assert reply.status == 400
    assert "limit" in reply.json()["error"]


def test_web_list_and_search_read_encoded_words_and_bodies(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(
        rcpt,
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nFrom: =?utf-8?q?Zo=C3=A9?= <zoe@x.test>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nna=C3=AFve words\r\n",
    )
    [row] = call(view, "/api/messages", {"user": rcpt}).json()["messages"]
    assert (row["subject"], row["from"], row["preview"]) == ("café", "zoe@x.test", "naïve words")
    assert call(view, "/api/messages", {"user": rcpt, "q": "NAÏVE"}).json()["total"] == 1
    assert call(view, "/api/messages", {"user": rcpt, "q": "Café"}).json()["total"] == 1


def test_web_search_does_not_match_the_encoded_form(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(
        rcpt,
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\nna=C3=AFve\r\n",
    )
    for encoded in ("=C3=AF", "utf-8?q"):
        assert call(view, "/api/messages", {"user": rcpt, "q": encoded}).json()["total"] == 0


def test_web_search_finds_decoded_display_names(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    sender = stack.user("example.com").address
    submit(
        stack,
        f"Subject: invoice\r\nFrom: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <{sender}>\r\n"
        f'To: Bob Builder <{rcpt}>\r\nCc: "Doe, Jane" <jane@x.test>\r\n\r\nhi\r\n'.encode(),
        to=rcpt,
    )
    stack.wait_for(rcpt, subject="invoice", timeout=TIMEOUT)
    for name in ("Jürgen", "müller", "BOB BUILDER", "Doe, Jane"):
        found = call(view, "/api/messages", {"user": rcpt, "q": name}).json()
        assert [m["subject"] for m in found["messages"]] == ["invoice"], name
    # The row still shows the address; a comma in a decoded name does not split the field.
    [row] = call(view, "/api/messages", {"user": rcpt}).json()["messages"]
    assert (row["from"], row["to"], row["cc"]) == (sender, [rcpt], ["jane@x.test"])


def test_web_search_for_a_display_name_not_there_finds_nothing(
    stack: MailStack, view: WebView
) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(
        rcpt,
        b"Subject: invoice\r\nFrom: =?utf-8?q?J=C3=BCrgen?= <j@x.test>\r\n"
        b"To: Bob Builder <b@x.test>\r\n\r\nhi\r\n",
    )
    assert call(view, "/api/messages", {"user": rcpt, "q": "Jürgen"}).json()["total"] == 1
    for absent in ("Günther", "Bob Baumeister", "J=C3=BC"):
        assert call(view, "/api/messages", {"user": rcpt, "q": absent}).json()["total"] == 0


def test_web_list_shows_raw_utf8_headers_beside_ascii_messages(
    stack: MailStack, view: WebView
) -> None:
    # RFC 6532: UTF-8 straight in the Subject and in a display name. compat32, which the
    # list's quick parse uses, hands such a value over as an email.header.Header.
    rcpt = stack.user("example.org").address
    submit(stack, b"Subject: ascii before\r\n\r\nfirst\r\n", to=rcpt)
    submit(
        stack,
        "Subject: Grüße aus Köln\r\nFrom: Jürgen Müller <j@example.com>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhallo\r\n".encode(),
        to=rcpt,
    )
    submit(stack, b"Subject: ascii after\r\n\r\nlast\r\n", to=rcpt)
    stack.wait_for(rcpt, subject="ascii after", timeout=TIMEOUT)
    stack.wait_for(rcpt, subject="Grüße aus Köln", timeout=TIMEOUT)
    reply = call(view, "/api/messages", {"user": rcpt})
    assert reply.status == 200, reply.body
    rows = reply.json()["messages"]
    assert {r["subject"] for r in rows} == {"ascii before", "Grüße aus Köln", "ascii after"}
    [utf8] = [r for r in rows if r["subject"] == "Grüße aus Köln"]
    assert (utf8["from"], utf8["preview"]) == ("j@example.com", "hallo")
    assert call(view, "/api/messages", {"user": rcpt, "q": "köln"}).json()["total"] == 1
    # The ASCII messages beside it are still found, and nothing is found that is not there.
    assert call(view, "/api/messages", {"user": rcpt, "q": "ascii"}).json()["total"] == 2
    assert call(view, "/api/messages", {"user": rcpt, "q": "münchen"}).json()["total"] == 0


def test_web_list_survives_undecodable_octets_and_broken_encoded_words(
    stack: MailStack, view: WebView
) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(rcpt, b"Subject: plain one\r\n\r\nx\r\n")
    # Latin-1 octets where UTF-8 is expected, an unknown charset, base64 that is not, a
    # word cut short, and an 8-bit display name that is not UTF-8 either.
    odd = stack.store.deliver(
        rcpt,
        b"Subject: caf\xe9 =?no-such-charset?q?abc?= =?utf-8?b?###?= =?utf-8?q?half\r\n"
        b"From: Fran\xe7ois <f@x.test>, =?utf-8?q?broken <g@x.test>\r\n"
        b"Cc: \xff\xfe\r\nDate: \xe9\xe9\r\n\r\nbody\r\n",
    ).uid
    reply = call(view, "/api/messages", {"user": rcpt})
    assert reply.status == 200, reply.body
    rows = {r["uid"]: r for r in reply.json()["messages"]}
    assert len(rows) == 2
    assert rows[odd]["subject"].startswith("caf\ufffd ")  # the bad octet is replaced
    assert rows[odd]["from"] == "f@x.test" and rows[odd]["date"] is None
    assert call(view, "/api/message", {"user": rcpt, "uid": odd}).status == 200
    assert call(view, "/api/messages", {"user": rcpt, "q": "plain one"}).json()["total"] == 1
    assert call(view, "/api/messages", {"user": rcpt, "q": "absent"}).json()["total"] == 0


def test_web_a_message_that_cannot_be_summarised_is_listed_with_its_envelope(
    stack: MailStack, view: WebView, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No known input makes the quick parse raise any more; this stands for the next one.
    from roundtrip.web import _data

    real = _data._read_light

    def failing(stored: Any) -> dict[str, Any]:
        if b"poison" in stored.raw:
            raise RuntimeError("a parser bug")
        return real(stored)

    monkeypatch.setattr(_data, "_read_light", failing)
    rcpt = stack.user("example.org").address
    stack.store.deliver(rcpt, b"Subject: fine\r\n\r\nx\r\n")
    bad = stack.store.deliver(
        rcpt, b"Subject: poison pill\r\n\r\nx\r\n", envelope_from="s@x.test"
    ).uid
    reply = call(view, "/api/messages", {"user": rcpt})
    assert reply.status == 200, reply.body
    rows = {r["uid"]: r for r in reply.json()["messages"]}
    assert {r["subject"] for r in rows.values()} == {"fine", "poison pill"}
    assert (rows[bad]["from"], rows[bad]["envelope_from"]) == (None, "s@x.test")
    assert call(view, "/api/messages", {"user": rcpt, "q": "s@x.test"}).json()["total"] == 1
    assert call(view, "/api/messages", {"user": rcpt, "q": "fine"}).json()["total"] == 1


# -- one message ------------------------------------------------------------------------------


def test_web_message_detail_is_the_python_apis_data(stack: MailStack, view: WebView) -> None:
    rcpt, uid = deliver(stack, "detailed")
    [python] = stack.messages(rcpt)
    doc = call(view, "/api/message", {"user": rcpt, "uid": uid}).json()
    assert doc["subject"] == python.subject == "detailed"
    assert doc["text"] == python.text
    assert doc["has_html"] is True
    assert doc["headers"] == [list(item) for item in python.headers.items()]
    assert [(p["filename"], p["inline"]) for p in doc["parts"]] == [
        ("data.csv", False),
        (None, True),
    ]
    assert doc["mime"]["content_type"] == "multipart/mixed"
    kinds = [c["content_type"] for c in doc["mime"]["children"]]
    assert kinds == ["multipart/alternative", "text/csv"]
    steps = [s["step"] for s in doc["journey"]["steps"]]
    assert steps == [h.step for h in stack.journey(python.message_id or "")]
    assert "submissions accepted" in steps and "stored" in steps
    hops = doc["journey"]["received"]
    assert [h["by"] for h in hops] == ["mail.example.com", "mail.example.org"]
    assert all(h["tls"] and h["tls_version"] and h["cipher"] for h in hops), hops
    assert doc["journey"]["spam"]["X-Spam-Flag"] == "NO"
    journey = call(view, "/api/message/journey", {"user": rcpt, "uid": uid}).json()
    assert journey == doc["journey"]


def test_web_message_unknown_uid_or_user_is_404(stack: MailStack, view: WebView) -> None:
    rcpt, uid = deliver(stack, "exists")
    for path in ("/api/message", "/api/message/raw", "/api/message/journey"):
        assert call(view, path, {"user": rcpt, "uid": uid + 100}).status == 404
        assert call(view, path, {"user": "nobody@example.org", "uid": uid}).status == 404
        assert call(view, path, {"user": rcpt, "uid": "x"}).status == 400


def test_web_raw_is_the_stored_bytes_as_plain_text(stack: MailStack, view: WebView) -> None:
    rcpt, uid = deliver(stack, "raw bytes")
    reply = call(view, "/api/message/raw", {"user": rcpt, "uid": uid})
    assert reply.body == stack.messages(rcpt)[0].raw
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_web_attachment_download_is_the_part(stack: MailStack, view: WebView) -> None:
    rcpt, uid = deliver(stack, "with file")
    reply = call(view, "/api/message/attachment", {"user": rcpt, "uid": uid, "index": 0})
    assert reply.body == b"col1,col2\r\n1,2\r\n" or reply.body == b"col1,col2\n1,2\n"
    assert reply.body == stack.messages(rcpt)[0].attachments[0].data
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Content-Disposition"].startswith('attachment; filename="data.csv"')


def test_web_attachment_index_out_of_range_is_404(stack: MailStack, view: WebView) -> None:
    rcpt, uid = deliver(stack, "two parts")
    reply = call(view, "/api/message/attachment", {"user": rcpt, "uid": uid, "index": 2})
    assert reply.status == 404
    assert "2 part(s)" in reply.json()["error"]
    assert call(view, "/api/message/attachment", {"user": rcpt, "uid": uid}).status == 400


def test_web_html_body_is_sandboxed_and_blocks_remote_images(
    stack: MailStack, view: WebView
) -> None:
    rcpt, uid = deliver(stack, "html")
    reply = call(view, "/api/message/html", {"user": rcpt, "uid": uid})
    csp = reply.headers["Content-Security-Policy"]
    assert csp.startswith("sandbox;")
    assert "script-src 'none'" in csp and "img-src 'self' data:;" in csp
    # The cid: image points at the message's own inline part.
    assert b"cid:" not in reply.body
    assert b"/api/message/attachment?" in reply.body and b"index=1" in reply.body
    image = call(
        view, "/api/message/attachment", {"user": rcpt, "uid": uid, "index": 1, "inline": 1}
    )
    assert (image.headers["Content-Type"], image.body) == ("image/png", b"\x89PNG-logo")


def test_web_html_body_allows_remote_images_only_when_asked(
    stack: MailStack, view: WebView
) -> None:
    rcpt, uid = deliver(stack, "remote")
    reply = call(view, "/api/message/html", {"user": rcpt, "uid": uid, "remote": 1})
    csp = reply.headers["Content-Security-Policy"]
    assert "img-src * data:" in csp and csp.startswith("sandbox;")
    plain = rcpt, stack.store.deliver(rcpt, b"Subject: text only\r\n\r\nno html\r\n").uid
    assert call(view, "/api/message/html", {"user": plain[0], "uid": plain[1]}).status == 404


def test_web_svg_part_is_never_served_inline(stack: MailStack, view: WebView) -> None:
    msg = EmailMessage()
    msg["Subject"] = "svg"
    msg.set_content("see the picture")
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    msg.add_attachment(svg, maintype="image", subtype="svg+xml", filename="x.svg")
    rcpt = stack.user("example.org").address
    uid = stack.store.deliver(rcpt, msg.as_bytes()).uid
    params = {"user": rcpt, "uid": uid, "index": 0, "inline": 1}
    reply = call(view, "/api/message/attachment", params)
    assert reply.body == svg
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Content-Disposition"].startswith("attachment;")


def test_web_token_with_undecodable_octets_is_403(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(rcpt, b"Subject: stays\r\n\r\nx\r\n")
    conn = http.client.HTTPConnection("127.0.0.1", view.port, timeout=TIMEOUT)
    try:
        conn.putrequest("DELETE", "/api/messages?" + urllib.parse.urlencode({"user": rcpt}))
        conn.putheader(TOKEN_HEADER, b"\xff\xfe" + view.token.encode())
        conn.endheaders()
        assert conn.getresponse().status == 403
    finally:
        conn.close()
    assert len(stack.messages(rcpt)) == 1


# -- changes need the token ---------------------------------------------------------------------


def test_web_delete_message_with_token(stack: MailStack, view: WebView) -> None:
    rcpt, uid = deliver(stack, "to delete")
    reply = call(
        view,
        "/api/message",
        {"user": rcpt, "uid": uid},
        method="DELETE",
        headers={TOKEN_HEADER: view.token},
    )
    assert (reply.status, reply.json()) == (200, {"removed": 1})
    assert stack.messages(rcpt) == []
    again = call(
        view,
        "/api/message",
        {"user": rcpt, "uid": uid},
        method="DELETE",
        headers={TOKEN_HEADER: view.token},
    )
    assert again.status == 404


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_web_delete_message_without_the_token_is_403(
    stack: MailStack, view: WebView, token: str | None
) -> None:
    rcpt, uid = deliver(stack, "kept")
    headers = {} if token is None else {TOKEN_HEADER: token}
    reply = call(view, "/api/message", {"user": rcpt, "uid": uid}, method="DELETE", headers=headers)
    assert reply.status == 403
    assert TOKEN_HEADER in reply.json()["error"]
    assert [m.subject for m in stack.messages(rcpt)] == ["kept"]


def test_web_empty_mailbox_with_token(stack: MailStack, view: WebView) -> None:
    rcpt = stack.user("example.org").address
    for n in range(3):
        stack.store.deliver(rcpt, f"Subject: {n}\r\n\r\nx\r\n".encode())
    other = stack.user("example.com").address
    stack.store.deliver(other, b"Subject: elsewhere\r\n\r\nx\r\n")
    reply = call(
        view, "/api/messages", {"user": rcpt}, method="DELETE", headers={TOKEN_HEADER: view.token}
    )
    assert reply.json() == {"removed": 3}
    assert stack.messages(rcpt) == []
    assert [m.subject for m in stack.messages(other)] == ["elsewhere"]


def test_web_empty_mailbox_without_token_is_403_and_unknown_is_404(
    stack: MailStack, view: WebView
) -> None:
    rcpt = stack.user("example.org").address
    stack.store.deliver(rcpt, b"Subject: stays\r\n\r\nx\r\n")
    assert call(view, "/api/messages", {"user": rcpt}, method="DELETE").status == 403
    assert len(stack.messages(rcpt)) == 1
    unknown = call(
        view,
        "/api/messages",
        {"user": "nobody@example.org"},
        method="DELETE",
        headers={TOKEN_HEADER: view.token},
    )
    assert unknown.status == 404


# -- the relay queue ----------------------------------------------------------------------------


def test_web_queue_shows_a_deferred_entry_with_its_last_error(
    stack: MailStack, view: WebView
) -> None:
    # The MX of example.org moves to 127.0.0.2, where nothing listens: the relay defers.
    records = [r for r in stack.default_dns_records() if r.name.rstrip(".") != "mail.example.org"]
    stack.set_dns_records([*records, Record("mail.example.org", "A", "127.0.0.2")])
    try:
        submit(stack, rich_message(stack, "deferred"), to=stack.user("example.org").address)
        # attempts counts an attempt from its start, last_error is set when it has failed and
        # next_attempt when the retry is scheduled: wait for the end of the whole attempt.
        stack.wait_relay(
            lambda q: any(e.last_error and e.next_attempt is not None for e in q), timeout=TIMEOUT
        )
        [entry] = call(view, "/api/queue").json()["queue"]
        assert entry["rcpt"] == [stack.user("example.org").address]
        assert entry["attempts"] >= 1 and "127.0.0.2" in entry["last_error"]
        assert entry["next_attempt"] is not None and entry["next_attempt_in"] is not None
        assert [e["id"] for e in call(view, "/api/mailboxes").json()["queue"]] == [entry["id"]]
    finally:
        stack.reset()
    assert call(view, "/api/queue").json() == {"queue": []}


# -- live events --------------------------------------------------------------------------------


class Events:
    """An open /api/events stream, read line by line over a real socket."""

    def __init__(self, view: WebView) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", view.port, timeout=TIMEOUT)
        self.conn.request("GET", "/api/events")
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.headers["Content-Type"] == "text/event-stream"
        assert self.response.readline().startswith(b": roundtrip events")
        assert self.response.readline() == b"retry: 1000\n"
        assert self.response.readline() == b"\n"

    def close(self) -> None:
        self.response.close()
        self.conn.close()


def _next_event(events: Events) -> dict[str, Any]:
    name = None
    while True:
        line = events.response.readline()
        assert line, "the events stream ended"
        if line.startswith(b"event: "):
            name = line[7:].strip()
        elif line.startswith(b"data: ") and name == b"store":
            event: dict[str, Any] = json.loads(line[6:])
            return event


def test_web_events_announce_a_stored_message_within_100ms(stack: MailStack, view: WebView) -> None:
    stored_at: list[float] = []
    stack.on_delivery(lambda m: stored_at.append(time.monotonic()))
    events = Events(view)
    try:
        rcpt = stack.user("example.org").address
        submit(stack, rich_message(stack, "live"), to=rcpt)
        event = _next_event(events)
        arrived = time.monotonic()
        assert event["kind"] == "added" and event["user"] == rcpt and event["folder"] == "INBOX"
        assert stored_at, "on_delivery did not run before the event arrived"
        assert arrived - stored_at[0] < 0.1, f"event after {arrived - stored_at[0]:.3f} s"
    finally:
        events.close()


def test_web_events_stream_ends_when_the_view_stops(stack: MailStack) -> None:
    with WebView(stack) as own:
        events = Events(own)
    try:
        assert events.response.read() == b""  # the stream closed; nothing more came
    finally:
        events.close()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", own.port, timeout=TIMEOUT).request("GET", "/")


def test_web_reads_need_the_token_when_asked(stack: MailStack) -> None:
    rcpt, uid = deliver(stack, "guarded")
    with WebView(stack, read_token=True) as guarded:
        assert call(guarded, "/").status == 200  # the page itself holds no mail
        reply = call(guarded, "/api/mailboxes")
        assert reply.status == 403 and "token" in reply.json()["error"]
        assert call(guarded, "/api/mailboxes", headers={TOKEN_HEADER: "wrong"}).status == 403
        assert call(guarded, "/api/mailboxes", headers={TOKEN_HEADER: guarded.token}).status == 200
        params = {"user": rcpt, "uid": uid, "token": guarded.token}
        assert call(guarded, "/api/message/html", params).status == 200
        assert call(guarded, "/api/message/html", {"user": rcpt, "uid": uid}).status == 403


def _image_urls(body: bytes) -> list[str]:
    """Every view URL written into a message's HTML, as the browser reads it."""
    return [html.unescape(m.decode()) for m in re.findall(rb"""["'](/api/[^"']*)["']""", body)]


def _guarded_html(view: WebView, rcpt: str, uid: int, folder: str = "INBOX") -> tuple[str, Reply]:
    """The frame URL the page is given for a message, and what it serves (no token)."""
    detail = call(
        view,
        "/api/message",
        {"user": rcpt, "folder": folder, "uid": uid},
        headers={TOKEN_HEADER: view.token},
    )
    assert detail.status == 200, detail.body
    url = detail.json()["html_url"]
    return url, call(view, url + "&remote=1")


def test_web_guarded_view_never_writes_its_token_into_message_html(stack: MailStack) -> None:
    rcpt, uid = deliver(stack, "capabilities")
    with WebView(stack, read_token=True) as guarded:
        url, frame = _guarded_html(guarded, rcpt, uid)
        # The frame's URL and every byte of the HTML are the message's to read (its CSS can
        # match attribute values, its links and images send the frame's URL as Referer).
        assert guarded.token not in url and "token" not in url and "cap=" in url
        assert frame.status == 200, frame.body
        assert guarded.token.encode() not in frame.body and b"token" not in frame.body
        assert all(guarded.token not in value for value in frame.headers.values())
        [image_url] = _image_urls(frame.body)
        assert "cap=" in image_url and "index=1" in image_url
        # The image still loads, with its capability and nothing else.
        image = call(guarded, image_url)
        assert (image.status, image.headers["Content-Type"]) == (200, "image/png")
        assert image.body == b"\x89PNG-logo"


def _with(url: str, **changes: Any) -> str:
    path, _, query = url.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    params.update({k: str(v) for k, v in changes.items()})
    return f"{path}?{urllib.parse.urlencode(params)}"


def test_web_capability_grants_its_part_only(stack: MailStack) -> None:
    rcpt, uid = deliver(stack, "one part")
    other_rcpt, other_uid = deliver(stack, "another message")
    assert other_rcpt == rcpt and other_uid != uid
    alice = stack.user("example.com").address
    submit(stack, rich_message(stack, "alice's", to=alice), to=alice)
    alice_uid = stack.wait_for(alice, subject="alice's", timeout=TIMEOUT).stored.uid
    with WebView(stack, read_token=True) as guarded:
        url, frame = _guarded_html(guarded, rcpt, uid)
        [image_url] = _image_urls(frame.body)
        cap = dict(urllib.parse.parse_qsl(image_url.partition("?")[2]))["cap"]
        assert call(guarded, image_url).status == 200
        tampered = cap[:-1] + ("A" if cap[-1] != "A" else "B")
        refused = [
            _with(image_url, cap=tampered),
            _with(image_url, cap=""),
            _with(image_url, index=0),  # the attachment beside the image
            _with(image_url, uid=other_uid),  # the same part of another message
            _with(image_url, user=alice, uid=alice_uid),  # another user's message
            _with(image_url, uid=uid + 1000),  # no such message: 403, not 404
            _with(image_url, folder="Sent"),
            # The frame's capability grants the HTML, not a part, and the other way round.
            _with(image_url, cap=dict(urllib.parse.parse_qsl(url.partition("?")[2]))["cap"]),
            _with(url.replace("/api/message/html", "/api/message/attachment"), index=1),
            _with(url, cap=cap),
            # Nothing but the HTML and its parts is ever read with a capability.
            _with(url.replace("/html", ""), cap=cap),
            _with(url.replace("/html", "/raw")),
            _with(url.replace("/html", "/journey")),
            "/api/mailboxes?" + urllib.parse.urlencode({"cap": cap}),
            "/api/messages?" + urllib.parse.urlencode({"user": rcpt, "cap": cap}),
        ]
        for target in refused:
            reply = call(guarded, target)
            assert reply.status == 403, (target, reply.status, reply.body)
        deleting = call(guarded, image_url, method="DELETE")
        assert deleting.status in (403, 405)
        assert len(stack.messages(rcpt)) == 2
    # A capability dies with the view that made it (its key is made when the view starts).
    with WebView(stack, read_token=True) as another:
        assert call(another, image_url).status == 403
        assert call(another, url).status == 403


def test_web_capability_of_a_message_gone_grants_nothing_to_its_uids_next_owner(
    stack: MailStack,
) -> None:
    # A mailbox deleted and created again (IMAP DELETE, CREATE) starts its UIDs at 1 again.
    rcpt = stack.user("example.org").address
    stack.store.create_mailbox(rcpt, "Lab")
    first = stack.store.deliver(rcpt, rich_message(stack, "first life"), mailbox="Lab").uid
    with WebView(stack, read_token=True) as guarded:
        url, frame = _guarded_html(guarded, rcpt, first, "Lab")
        assert "folder=Lab" in url
        [image_url] = _image_urls(frame.body)
        assert call(guarded, image_url).status == 200
        stack.store.delete_mailbox(rcpt, "Lab")
        stack.store.create_mailbox(rcpt, "Lab")
        again = stack.store.deliver(rcpt, rich_message(stack, "second life"), mailbox="Lab").uid
        assert again == first  # the same UID, another message: the capability named the first
        assert call(guarded, image_url).status == 403
        assert call(guarded, url).status == 403
        url, frame = _guarded_html(guarded, rcpt, again, "Lab")
        assert call(guarded, url).status == 200
        assert call(guarded, _image_urls(frame.body)[0]).status == 200


def test_web_loopback_view_frames_without_token_or_capability(
    stack: MailStack, view: WebView
) -> None:
    rcpt, uid = deliver(stack, "open reads")
    url = call(view, "/api/message", {"user": rcpt, "uid": uid}).json()["html_url"]
    assert "cap=" not in url and "token" not in url
    frame = call(view, url)
    [image_url] = _image_urls(frame.body)
    assert "cap=" not in image_url and "token" not in image_url
    assert call(view, image_url).body == b"\x89PNG-logo"
    plain = stack.store.deliver(rcpt, b"Subject: no html\r\n\r\ntext\r\n").uid
    assert call(view, "/api/message", {"user": rcpt, "uid": plain}).json()["html_url"] is None


def test_web_reads_are_open_on_loopback_and_guarded_beyond(stack: MailStack, view: WebView) -> None:
    assert not view.read_token and call(view, "/api/mailboxes").status == 200
    assert WebView(stack, host="0.0.0.0").read_token  # not started: nothing is bound
    assert not WebView(stack, host="::1").read_token


# -- the page, hosts, startup -------------------------------------------------------------------


def test_web_page_is_served_with_a_strict_policy(view: WebView) -> None:
    page = call(view, "/")
    assert page.status == 200 and b'<script src="/static/app.js"' in page.body
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert call(view, "/static/app.js").headers["Content-Type"].startswith("text/javascript")
    assert call(view, "/static/app.css").status == 200
    assert call(view, "/static/../__init__.py").status == 404
    assert call(view, "/static/nothing.js").status == 404


def test_web_host_header_of_another_name_is_refused(view: WebView) -> None:
    for host in ("evil.example:%d", "127.0.0.1:1"):
        conn = http.client.HTTPConnection("127.0.0.1", view.port, timeout=TIMEOUT)
        try:
            conn.request(
                "GET", "/api/mailboxes", headers={"Host": host.replace("%d", str(view.port))}
            )
            assert conn.getresponse().status == 403
        finally:
            conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", view.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/api/mailboxes", headers={"Host": f"localhost:{view.port}"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_web_view_needs_a_running_stack() -> None:
    with pytest.raises(ServerStartError, match="running stack"):
        WebView(MailStack()).start()


def test_web_view_reports_an_address_it_cannot_bind(stack: MailStack, view: WebView) -> None:
    with pytest.raises(ServerStartError, match="cannot bind"):
        WebView(stack, port=view.port).start()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ("127.0.0.1", 0)),
        ("8025", ("127.0.0.1", 8025)),
        ("127.0.0.2:8025", ("127.0.0.2", 8025)),
        (":8025", ("127.0.0.1", 8025)),
        ("0.0.0.0", ("0.0.0.0", 0)),
        ("[::1]:8025", ("::1", 8025)),
        ("[::1]", ("::1", 0)),
    ],
)
def test_web_parse_address(text: str | None, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:port", "::1:80", "127.0.0.1:70000", "[::1"])
def test_web_parse_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--web"):
        parse_address(text)


def test_web_is_not_imported_without_web() -> None:
    code = (
        "import sys, roundtrip, roundtrip.cli, roundtrip.pytest_plugin, roundtrip.stack\n"
        "print(sorted(m for m in sys.modules if m == 'aiohttp' or m.startswith('roundtrip.web')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_web_import_check_sees_the_web_package() -> None:
    code = "import sys, roundtrip.web\nprint('aiohttp' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "True"


def _shipped(relative: str) -> bool:
    """Whether pyproject's package-data for ``roundtrip`` matches ``relative``."""
    import fnmatch
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["roundtrip"]
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def test_web_static_files_ship_in_the_wheel() -> None:
    from roundtrip.web import _app

    for name in _app._STATIC:
        assert _shipped(f"web/static/{name}"), name


def test_web_static_check_sees_a_file_not_shipped() -> None:
    assert not _shipped("web/templates/index.html")


def test_web_benchmark_runs_on_a_small_mailbox() -> None:
    from benchmarks.web import measure

    rows = measure(60, 3)
    names = [what for what, _, _ in rows]
    assert names[2:4] == ["list first page, first request", "list first page, median"]
    assert all(seconds >= 0 for _, seconds, _ in rows)


def test_web_events_a_client_too_far_behind_is_cut_off(stack: MailStack) -> None:
    from roundtrip.web import _app

    loop = stack.loop_thread.loop  # type: ignore[union-attr]

    async def overflow() -> tuple[list[Any], list[Any]]:
        events = _app.Events(loop)
        slow, fast = events.subscribe(), events.subscribe()
        for n in range(_app._SSE_BACKLOG + 1):
            events._publish({"n": n})
            if not fast.empty():
                fast.get_nowait()
        return [slow.get_nowait() for _ in range(slow.qsize())], [events._clients]

    drained, [clients] = stack.loop_thread.run(overflow(), timeout=TIMEOUT)  # type: ignore[union-attr]
    assert drained == [None]  # its stream ends, the browser reconnects and reloads
    assert len(clients) == 1  # the client that kept up still listens
