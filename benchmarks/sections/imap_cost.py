"""Section "IMAP cost": SELECT, UID SEARCH and UID FETCH against the mailbox's size.

One user's INBOX is filled to each size of the plan with 4 KB messages (``store.deliver`` in
the server child; for Dovecot, Maildir files, see ``sections.postfix``). Over IMAPS
(``imaplib``, TCP_NODELAY): SELECT, UID SEARCH HEADER Message-ID of the middle message, and
UID FETCH BODY.PEEK[] of it, each once cold and then ``imap_repeat`` times (p50); then
``FETCH 1:* (FLAGS)`` (a client syncing the folder; its answer read as bytes,
:func:`fetch_all_flags`) and a SEARCH SUBJECT (a client polling), each once cold and then at
most five times.
"""

from __future__ import annotations

import contextlib
import imaplib
import ssl
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import DOMAINS, IMAP_USER, MS, Plan, pct, ratio, server_child, tune
from benchmarks._report import Results

METRICS = (
    "imap_cost.fetch_largest_vs_smallest",
    "imap_cost.search_largest_vs_dovecot",
    "imap_cost.slowest_vs_dovecot",
)

_OPS = (
    ("select", "SELECT"),
    ("search", "UID SEARCH HEADER Message-ID"),
    ("fetch", "UID FETCH one message BODY.PEEK[]"),
    ("fetch_flags", "FETCH 1:* (FLAGS), every message"),
    ("search_subject", "SEARCH SUBJECT, repeated"),
)
#: Operations over the whole mailbox are repeated at most this often (100,000 messages: about
#: a second each for FETCH 1:* over imaplib, either server).
_WHOLE_MAILBOX_REPEAT = 5


def open_imap(host: str, port: int, ca_file: str, hostname: str, user: str, pw: str) -> Any:
    """A logged-in ``imaplib.IMAP4_SSL``.

    imaplib verifies against the host it dials; our certificates name 127.0.0.1 as well, so
    ``hostname`` is not needed (kept for the callers' symmetry).
    """
    ctx = ssl.create_default_context(cafile=ca_file)
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=120)
    tune(imap.sock)
    imap.login(user, pw)
    return imap


def check_ok(reply: tuple[str, Any]) -> None:
    if reply[0] != "OK":
        raise RuntimeError(f"IMAP command failed: {reply!r}")


#: The tag of the FETCH that :func:`fetch_all_flags` sends itself (imaplib's are A0001...).
_RAW_TAG = b"RAW1"


def fetch_all_flags(imap: Any) -> int:
    """``FETCH 1:* (FLAGS)`` with the answer read as bytes until its tagged OK; the number
    of FETCH responses in it.

    Parsing 100,000 untagged responses costs imaplib about 400 ms, the same against either
    server, which would make the row measure the client (docs/benchmarks.md, "IMAP cost"):
    the time here is the server's answer arriving. Sent on imaplib's socket between two of
    its commands, with a tag of its own, and read through imaplib's buffered reader, so
    imaplib finds the connection as it left it.
    """
    imap.sock.sendall(_RAW_TAG + b" FETCH 1:* (FLAGS)\r\n")
    answer = bytearray(b"\r\n")  # so a tagged line first in the answer is found too
    done = b"\r\n" + _RAW_TAG + b" "
    at = -1
    while at < 0 or not answer.endswith(b"\r\n"):  # the tagged line, whole
        chunk = imap.file.read1(1 << 18)
        if not chunk:
            raise RuntimeError("connection closed during FETCH 1:* (FLAGS)")
        scanned = len(answer)
        answer += chunk
        if at < 0:
            at = answer.find(done, max(0, scanned - len(done)))
    status = bytes(answer[at + len(done) :]).split(None, 1)[0]
    if status != b"OK":
        raise RuntimeError(f"FETCH 1:* (FLAGS) answered {bytes(answer[at + 2 :])[:200]!r}")
    return answer.count(b" FETCH (")


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(first call, p50 of the following ``repeat`` calls)."""
    started = time.perf_counter()
    fn()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return first, pct(times, 50)


def _costs_at(imap: Any, size: int, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["select_first"], out["select_p50"] = _timed(lambda: check_ok(imap.select("INBOX")), repeat)
    target = f"<bench-{size // 2}@roundtrip.bench>"
    found: list[bytes] = []

    def search() -> None:
        typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{target}"')
        check_ok((typ, data))
        found[:] = data[0].split()

    out["search_first"], out["search_p50"] = _timed(search, repeat)
    if len(found) != 1:
        raise RuntimeError(f"SEARCH at {size} found {found!r}, expected one message")
    uid = found[0].decode()

    def fetch() -> None:
        typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        check_ok((typ, data))
        if not isinstance(data[0], tuple) or len(data[0][1]) < 4000:
            raise RuntimeError(f"UID FETCH {uid} returned {str(data)[:200]}")

    out["fetch_first"], out["fetch_p50"] = _timed(fetch, repeat)

    def fetch_flags() -> None:
        count = fetch_all_flags(imap)
        if count < size:
            raise RuntimeError(f"FETCH 1:* (FLAGS) at {size} gave {count} responses")

    whole = min(repeat, _WHOLE_MAILBOX_REPEAT)
    out["fetch_flags_first"], out["fetch_flags_p50"] = _timed(fetch_flags, whole)
    # A client polling for new mail repeats one search: the first reads every header block.
    wanted = f'"benchmark message {size // 2}"'

    def search_subject() -> None:
        typ, data = imap.search(None, "SUBJECT", wanted)
        check_ok((typ, data))
        if not data[0]:
            raise RuntimeError(f"SEARCH SUBJECT {wanted} at {size} found nothing")

    out["search_subject_first"], out["search_subject_p50"] = _timed(search_subject, whole)
    return out


def imap_costs(
    imap_factory: Callable[[], Any],
    fill: Callable[[int, int], Any],
    sizes: tuple[int, ...],
    repeat: int,
) -> dict[str, Any]:
    """The three costs at each size; ``fill(first, count)`` tops the mailbox up in between."""
    out: dict[str, Any] = {}
    have = 0
    for size in sizes:
        fill(have, size - have)
        have = size
        imap = imap_factory()
        try:
            out[str(size)] = _costs_at(imap, size, repeat)
            imap.logout()
        finally:
            with contextlib.suppress(OSError):
                imap.sock.close()
    return out


def measure(plan: Plan, users: list[str]) -> dict[str, Any]:
    """Against a stack child: ``IMAP_USER``'s INBOX, filled in the child."""
    with server_child() as child:
        start = child.call("start", domains=list(DOMAINS), users=users)
        users_pw = {u["address"]: u["password"] for u in start["describe"]["users"]}
        ep = start["endpoints"][DOMAINS[0]]

        def fill(first: int, count: int) -> None:
            if count > 0:
                child.call("fill", user=IMAP_USER, first=first, count=count, size=plan.fill_size)

        return imap_costs(
            lambda: open_imap(
                ep["host"],
                ep["ports"]["imaps"],
                start["describe"]["ca_file"],
                ep["hostname"],
                IMAP_USER,
                users_pw[IMAP_USER],
            ),
            fill,
            plan.imap_sizes,
            plan.imap_repeat,
        )


def rows(res: Results, data: dict[str, Any]) -> None:
    costs = data["imap_costs"]
    pd = data.get("postfix_dovecot") or {}
    pd_costs = pd.get("imap_costs", {}) if "skipped" not in pd else {}
    sizes = [str(s) for s in data["plan"]["imap_sizes"]]
    for op, label in _OPS:
        for size in sizes:
            ours = costs[size][f"{op}_p50"]
            theirs = pd_costs[size][f"{op}_p50"] if size in pd_costs else None
            value, ratio_of, metric = ratio(theirs, ours), "x faster", ""
            if op == "fetch" and size == sizes[-1]:
                value = ours / costs[sizes[0]]["fetch_p50"]
                ratio_of = f"x the {sizes[0]}-message cost"
                metric = "imap_cost.fetch_largest_vs_smallest"
            if op == "search" and size == sizes[-1]:
                metric = "imap_cost.search_largest_vs_dovecot"
            note = f"first {costs[size][f'{op}_first'] * MS:.2f} ms"
            if theirs is not None:
                note += f"; Dovecot first {pd_costs[size][f'{op}_first'] * MS:.2f} ms"
            res.add(
                "IMAP cost",
                f"{label} at {int(size):,} messages",
                ours * MS,
                "ms",
                postfix_dovecot=theirs * MS if theirs is not None else None,
                ratio=value,
                ratio_of=ratio_of,
                note=note,
                metric=metric,
            )
    # Every operation at the largest size against Dovecot's: the slowest of ours decides.
    largest = sizes[-1]
    against = [
        (pd_costs[largest][f"{op}_p50"] / costs[largest][f"{op}_p50"], label)
        for op, label in _OPS
        if largest in pd_costs and costs[largest][f"{op}_p50"] > 0
    ]
    worst = min(against) if against else None
    res.add(
        "IMAP cost",
        f"slowest operation vs Dovecot at {int(largest):,} messages",
        None,
        "x faster",
        ratio=worst[0] if worst is not None else None,
        ratio_of="x faster",
        note=f"slowest: {worst[1]}" if worst is not None else "Dovecot not measured",
        metric="imap_cost.slowest_vs_dovecot",
    )
