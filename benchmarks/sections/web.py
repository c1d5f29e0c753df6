"""The web view of ``roundtrip serve --web`` over a full mailbox (issue #16).

``benchmarks.web.measure`` fills one mailbox through the store, then times the page's
requests over loopback: the list's first page, a message never viewed before, a search, and
a server-sent event after a delivery. ``python -m benchmarks.web`` prints the same figures
alone. The quick run uses 1,000 messages instead of 10,000.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import Plan
from benchmarks._report import Results

METRICS: tuple[str, ...] = ()

MS = 1000.0


def measure(plan: Plan) -> dict[str, Any]:
    from benchmarks.web import measure as web_measure

    messages, rounds = (1_000, 10) if plan.quick else (10_000, 50)
    measured = web_measure(messages, rounds)
    return {"messages": messages, "rows": [list(row) for row in measured]}


def rows(res: Results, data: dict[str, Any]) -> None:
    web = data.get("web")
    if not web:
        return
    for what, seconds, target in web["rows"]:
        if what.startswith("fill "):
            continue  # filling the mailbox is set-up, not the view
        res.add(
            "web view",
            f"{what} ({web['messages']:,} messages)",
            seconds * MS,
            "ms",
            note=f"target {target}" if target else "",
        )
