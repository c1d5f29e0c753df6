"""Benchmark client child: full probe round trips in a loop, for the throughput figures.

Reads one JSON line (the job), prints ``ready``, waits for a ``go`` line, then runs
``threads`` threads, each doing ``run_probe`` round trips back to back until ``duration``
seconds have passed, and prints one JSON line with the counts. Only round trips that finished
inside the window count; the window opens ``warmup`` seconds after ``go``, so
the figure is the steady state, not the ramp. Run as ``python -m benchmarks._client``.
"""

from __future__ import annotations

import inspect
import json
import ssl
import sys
import threading
import time
from typing import Any

from roundtrip.config import Endpoint
from roundtrip.probes.roundtrip import run_probe


def _endpoint(data: dict[str, Any]) -> Endpoint:
    return Endpoint(**data)


def main() -> None:
    job = json.loads(sys.stdin.readline())
    smtp = _endpoint(job["smtp"])
    retrieve = _endpoint(job["retrieve"])
    context = ssl.create_default_context(cafile=job["ca_file"])
    threads = int(job["threads"])
    duration = float(job["duration"])
    warmup = float(job.get("warmup", 0.0))
    # No "settle" wait after the message shows: it is not delivery time (see _common.py).
    options: dict[str, Any] = (
        {"settle": 0.0} if "settle" in inspect.signature(run_probe).parameters else {}
    )
    lock = threading.Lock()
    done: list[float] = []
    errors: list[str] = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        return
    window_start = time.monotonic() + warmup
    deadline = window_start + duration

    def worker() -> None:
        while time.monotonic() < deadline:
            result = run_probe(
                smtp,
                retrieve,
                context=context,
                mail_from=job["mail_from"],
                rcpt_to=job["rcpt_to"],
                timeout=15.0,
                **options,
            )
            finished = time.monotonic()
            with lock:
                if not result.ok:
                    errors.append(f"{result.error_step}: {result.error}"[:300])
                elif window_start <= finished <= deadline:
                    done.append(result.total_seconds)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(warmup + duration + 30)
    sys.stdout.write(
        json.dumps(
            {"done": len(done), "errors": errors[:5], "n_errors": len(errors), "latencies": done}
        )
        + "\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
