"""Messages queued together for one MX travel over parallel connections, within the bound.

The relay runs up to ``max_concurrent`` delivery attempts at once (Postfix's
default_destination_concurrency_limit is 20), each over its own connection; idle connections
are cached and carry later messages. The MX (``ChunkMX`` of test_relay_pipelining.py, a server
of our own on a loopback port) counts the connections open at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_relay_pipelining import ChunkMX, PipeWorld

MX = "mail.example.org"
MESSAGES = 40


@pytest.fixture
def world() -> Iterator[PipeWorld]:
    w = PipeWorld()
    yield w
    w.close()
    assert w.lt.take_errors() == []


def _burst(
    world: PipeWorld, *, max_concurrent: int, banner_after: int = 1, pipelining: bool = True
) -> ChunkMX:
    """Queue MESSAGES one-recipient messages at once and wait until all are delivered.

    The MX greets nobody before ``banner_after`` connections are open, so the first attempts
    all find no idle connection and dial.
    """
    world.down_mx("backup.example.org")
    mx = world.start_chunk_mx(ChunkMX(pipelining=pipelining, banner_after=banner_after))
    world.make_relay(require_tls=False, connection_cache_time=30, max_concurrent=max_concurrent)
    rcpts = [f"user{i}@example.org" for i in range(MESSAGES)]
    world.enqueue_together(rcpts)
    for rcpt in rcpts:
        world.wait_step(rcpt, "delivered")
    world.idle()
    delivered = sorted(r for rs in mx.delivered() for r in rs)
    assert delivered == sorted(f"<{r}>".encode() for r in rcpts)  # each exactly once
    assert not any(e.step in ("deferred", "bounced") for e in world.events)
    return mx


@pytest.mark.parametrize("pipelining", [True, False])
def test_relay_burst_uses_parallel_connections(world: PipeWorld, pipelining: bool) -> None:
    mx = _burst(world, max_concurrent=8, banner_after=8, pipelining=pipelining)
    # The first attempts all dial at once: no connection is cached yet.
    assert mx.open_most == 8
    # The rest ride those connections: none more was opened.
    assert len(mx.sessions) == 8
    assert sum(len(s.messages) for s in mx.sessions) == MESSAGES


def test_relay_burst_with_one_slot_uses_one_connection(world: PipeWorld) -> None:
    """Twin: with one attempt at a time, one connection carries every message in turn."""
    mx = _burst(world, max_concurrent=1)
    assert mx.open_most == 1
    (session,) = mx.sessions
    assert len(session.messages) == MESSAGES


def test_relay_burst_stays_within_the_bound(world: PipeWorld) -> None:
    """Three attempts at once: three connections, never a fourth, over 40 messages."""
    mx = _burst(world, max_concurrent=3, banner_after=3)
    assert mx.open_most == 3 and len(mx.sessions) == 3
