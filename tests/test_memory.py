"""Memory of a big message's round trip (issue "Performance": peak under 3x the message).

The stack runs in this process under ``tracemalloc``; the client (smtplib, imaplib, poplib)
runs in a child process, so the peak is the servers' alone. The helpers that make the path
cheap (``dot_stuff``, ``OutputBuffer``, the relay's ``normalize_line_endings``) are checked
against the straightforward implementations they replaced, on random input.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from _support import peak_growth
from hypothesis import given, settings
from hypothesis import strategies as st

from roundtrip import MailStack, StackConfig
from roundtrip.protocols._lines import OutputBuffer, dot_stuff
from roundtrip.servers.relay import normalize_line_endings
from roundtrip.stack import DeliveredMessage

SIZE = 20_000_000
#: The target: under 3x the message, same domain (about 2.0-2.1x here) and cross domain
#: (about 2.3x). Cross-domain goes through the relay, which holds its copy until the MX's
#: final 250 while the MX receives its own; the MX keeps the fields it adds apart from the
#: received bytes until the message is first read (``_HeadedMessage`` in roundtrip/store.py),
#: so no third copy is made while the relay's is alive (it was 3.06-3.16x while the MX
#: joined its Received field and then the filter's fields on arrival).
LIMIT = 3.0

# Lines made of the characters that matter to framing, so the edge cases come up often.
framing = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\n.", b"a", b"xyz"]), max_size=40
).map(b"".join)


def _reference_dot_stuff(raw: bytes) -> bytes:
    """The line-by-line implementation dot_stuff replaced (its behaviour is the contract)."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = bytearray()
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"."):
            out += b"."
        out += line + b"\r\n"
    return bytes(out)


def _reference_normalize(raw: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


# dot_stuff


@settings(max_examples=1000, deadline=None)
@given(st.one_of(framing, st.binary(max_size=200)))
def test_memory_dot_stuff_matches_line_by_line_reference(raw: bytes) -> None:
    assert dot_stuff(raw) == _reference_dot_stuff(raw)


def test_memory_dot_stuff_returns_a_clean_message_without_copying() -> None:
    raw = b"Subject: x\r\n\r\n" + b"line\r\n" * 10_000
    assert dot_stuff(raw) is raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b".lead\r\n", b"..lead\r\n"),
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n"),
        (b"bare\nlf", b"bare\r\nlf\r\n"),
        (b"mid\rcr\r", b"mid\rcr\r\n"),
        (b"", b""),
    ],
)
def test_memory_dot_stuff_copies_only_when_something_changes(raw: bytes, expected: bytes) -> None:
    out = dot_stuff(raw)
    assert out == expected
    assert out is not raw or raw == b""


# the relay's line endings


@settings(max_examples=1000, deadline=None)
@given(st.one_of(framing, st.binary(max_size=200)))
def test_memory_normalize_line_endings_matches_regex_reference(raw: bytes) -> None:
    assert normalize_line_endings(raw) == _reference_normalize(raw)


def test_memory_normalize_line_endings_keeps_a_clean_message() -> None:
    raw = b"a\r\nb\r\n" * 1000
    assert normalize_line_endings(raw) is raw
    stray = raw + b"c\nd"
    assert normalize_line_endings(stray) == raw + b"c\r\nd\r\n"


# OutputBuffer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=50), st.integers(16_000, 70_000)), max_size=12))
def test_memory_output_buffer_take_is_the_concatenation(writes: list[bytes | int]) -> None:
    pieces = [w if isinstance(w, bytes) else bytes([w % 251]) * w for w in writes]
    joined, chunked = OutputBuffer(), OutputBuffer()
    for piece in pieces:
        joined += piece
        chunked += piece
    assert len(joined) == sum(map(len, pieces))
    assert joined.take() == b"".join(pieces)
    assert b"".join(chunked.take_chunks()) == b"".join(pieces)
    assert joined.take() == b"" and chunked.take_chunks() == []


def test_memory_output_buffer_references_a_big_body() -> None:
    body = b"x" * 1_000_000
    out = OutputBuffer()
    out += b"* 1 FETCH (BODY[] {1000000}\r\n"
    out += body
    out += b")\r\n"
    chunks = out.take_chunks()
    assert len(chunks) == 3 and chunks[1] is body


def test_memory_output_buffer_copies_a_mutable_write() -> None:
    body = bytearray(b"y" * 100_000)
    out = OutputBuffer()
    out += body
    body[:] = b"z" * len(body)  # the caller reuses its buffer: what was written must not change
    assert out.take() == b"y" * 100_000


# the round trip

_CLIENT = r"""
import imaplib, json, poplib, smtplib, ssl, sys, time
job = json.loads(sys.argv[1])
line = b"x" * 76 + b"\r\n"
head = (
    f"From: <{job['sender']}>\r\nTo: <{job['rcpt']}>\r\nSubject: memory\r\n"
    f"Message-ID: <{job['tag']}@roundtrip.test>\r\n"
    "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n"
).encode()
msg = head + b".a dot-led line\r\n" + line * ((job["size"] - len(head)) // len(line))
ctx = ssl.create_default_context(cafile=job["ca"])
with smtplib.SMTP_SSL(job["host"], job["smtp"], context=ctx, timeout=60) as smtp:
    smtp.login(job["sender"], job["sender_pw"])
    smtp.sendmail(job["sender"], [job["rcpt"]], msg)
deadline = time.monotonic() + 60
if job["retrieve"] == "imap":
    imap = imaplib.IMAP4_SSL(job["host"], job["fetch"], ssl_context=ctx, timeout=60)
    imap.login(job["rcpt"], job["rcpt_pw"])
    while True:
        imap.select("INBOX")
        _, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"<{job["tag"]}@roundtrip.test>"')
        if data[0].split() or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # sleep-ok: a client process polls to a deadline
    uid = data[0].split()[0].decode()
    _, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
    got = data[0][1]
    imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
    imap.expunge()
    imap.logout()
else:
    while True:
        pop = poplib.POP3_SSL(job["host"], job["fetch"], context=ctx, timeout=60)
        pop.user(job["rcpt"])
        pop.pass_(job["rcpt_pw"])
        if pop.stat()[0] or time.monotonic() > deadline:
            break
        pop.quit()
        time.sleep(0.02)  # sleep-ok: a client process polls to a deadline
    _, lines, _ = pop.retr(1)
    got = b"\r\n".join(lines) + b"\r\n"
    pop.dele(1)
    pop.quit()
print(json.dumps({"sent": len(msg), "got": len(got), "same_tail": got.endswith(msg[-4096:])}))
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack(StackConfig()) as running:
        yield running


def test_memory_peak_measure_sees_copies() -> None:
    """The twin: three live copies of the payload read as at least 3x."""
    payload = b"m" * SIZE

    def copies() -> None:
        kept = [payload + b"1", payload + b"2", payload + b"3"]
        assert len(kept) == 3

    assert peak_growth(copies) / SIZE >= 3.0


def _job(stack: MailStack, dst: str, retrieve: str, tag: str) -> dict[str, object]:
    """What ``_CLIENT`` does: example.com's user sends to ``dst``'s and fetches it back."""
    sender, rcpt = stack.user("example.com"), stack.user(dst)
    host, smtp_port = stack.endpoints("example.com").address("submissions")
    _, fetch_port = stack.endpoints(dst).address("imaps" if retrieve == "imap" else "pop3s")
    return {
        "size": SIZE,
        "sender": sender.address,
        "sender_pw": sender.password,
        "rcpt": rcpt.address,
        "rcpt_pw": rcpt.password,
        "host": host,
        "smtp": smtp_port,
        "fetch": fetch_port,
        "ca": stack.ca.ca_file(),
        "retrieve": retrieve,
        "tag": tag,
    }


def _run_client(job: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLIENT, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("retrieve", ["imap", "pop3"])
@pytest.mark.parametrize("route", ["same-domain", "cross-domain"])
def test_memory_big_message_round_trip_peak(stack: MailStack, route: str, retrieve: str) -> None:
    dst = "example.com" if route == "same-domain" else "example.org"
    job = _job(stack, dst, retrieve, f"memory-{route}-{retrieve}")
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def run_client() -> None:
        result["proc"] = _run_client(job)

    ratio = peak_growth(run_client) / SIZE
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["same_tail"] and seen["got"] >= seen["sent"], seen
    stack.check()
    assert ratio < LIMIT, f"peak {ratio:.2f}x the message, expected < {LIMIT}x"


def test_memory_big_message_read_by_headers_beside_the_relay() -> None:
    """A delivery callback runs while the MX stores the message, before the relay lets its
    copy go (``roundtrip serve`` prints a line from one), and ``wait_for`` in the test's
    process may wake then too: reading the headers leaves the message unjoined (under 3x),
    and the message still reads whole afterwards."""
    dst = "example.org"
    tag = "memory-by-headers"
    wanted = f"<{tag}@roundtrip.test>"
    seen: list[str] = []
    result: dict[str, object] = {}
    with MailStack(StackConfig()) as stack:
        stack.on_delivery(lambda m: seen.append(f"{m.subject} {m.message_id} {m.size}"))
        rcpt = stack.user(dst)
        job = _job(stack, dst, "imap", tag)

        def run_both() -> None:
            waiter = threading.Thread(
                target=lambda: result.update(
                    msg=stack.wait_for(
                        rcpt.address, match=lambda m: m.message_id == wanted, timeout=120
                    )
                )
            )
            waiter.start()
            result["proc"] = _run_client(job)
            waiter.join(timeout=120)

        ratio = peak_growth(run_both) / SIZE
        stack.check()
    proc = result["proc"]
    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(seen) == 1 and seen[0].startswith(f"memory {wanted} ")
    assert int(seen[0].split()[-1]) > SIZE
    msg = result["msg"]
    assert isinstance(msg, DeliveredMessage) and msg.subject == "memory"
    assert ratio < LIMIT, f"peak {ratio:.2f}x the message, expected < {LIMIT}x"
    # The twin: the message is whole when read (the one copy made now, the relay's gone).
    assert msg.raw.startswith(b"X-Spam-") and msg.raw.endswith(b"x" * 76 + b"\r\n")
    assert msg.size == len(msg.raw) > SIZE
