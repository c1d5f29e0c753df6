"""What a listener of the relay sees of its queue, and when it hears of a change.

The stack's ``relay_queue()`` and ``wait_relay()`` are built on these hooks: a "queued"
event seen before the message is in ``queue()`` made ``wait_relay(lambda q: not q)`` hold at
once (a false pass), and a message leaving the queue without a word made it wait in vain.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from test_relay import World

from roundtrip.servers.relay import RelayEvent

TIMEOUT = 10.0


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()
    assert w.lt.take_errors() == []


class QueueWatch:
    """Records ``queue()`` as seen from inside each event and each queue change."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.at_event: list[tuple[str, list[str]]] = []
        self.at_change: list[list[str]] = []
        self.changed = threading.Condition()

    def ids(self) -> list[str]:
        assert self.world.relay is not None
        return [q.id for q in self.world.relay.queue()]

    def on_event(self, event: RelayEvent) -> None:
        self.at_event.append((event.step, self.ids()))
        with self.world._cond:  # what World's own listener does, for wait_step()
            self.world.events.append(event)
            self.world._cond.notify_all()

    def on_change(self) -> None:
        with self.changed:
            self.at_change.append(self.ids())
            self.changed.notify_all()

    def wait_empty(self) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.at_change and not self.at_change[-1], TIMEOUT)


def test_a_queued_message_is_in_the_queue_at_its_first_event(world: World) -> None:
    world.start_mx("mail.example.org")
    watch = QueueWatch(world)
    world.make_relay(on_event=watch.on_event, on_queue_change=watch.on_change)
    queued = world.enqueue(["bob@example.org"])
    assert watch.wait_empty()
    world.idle()
    first_step, first_queue = watch.at_event[0]
    assert (first_step, first_queue) == ("queued", [queued.id])


def test_a_captured_only_message_never_enters_the_queue(world: World) -> None:
    """The twin: nothing to deliver over the network, so nothing is queued."""
    watch = QueueWatch(world)
    world.make_relay(on_event=watch.on_event, on_queue_change=watch.on_change)
    world.enqueue(["someone@elsewhere.example"])
    assert [step for step, _ in watch.at_event] == ["queued", "captured"]
    assert all(queue == [] for _, queue in watch.at_event)
    assert world.relay is not None and world.relay.queue() == []


def test_a_delivered_message_leaving_the_queue_is_announced(world: World) -> None:
    mx = world.start_mx("mail.example.org")
    watch = QueueWatch(world)
    world.make_relay(on_event=watch.on_event, on_queue_change=watch.on_change)
    queued = world.enqueue(["bob@example.org"])
    assert watch.wait_empty(), f"no announcement of an empty queue: {watch.at_change}"
    assert len(mx.messages) == 1
    # The last event (delivered) still saw the message queued: only the change hook tells
    # a listener that it has left.
    assert watch.at_event[-1] == ("delivered", [queued.id])


def test_a_deferred_message_stays_queued_with_a_retry_time(world: World) -> None:
    """The twin: a 4xx leaves the message queued, and the listener hears its retry time."""
    mx = world.start_mx("mail.example.org")
    world.down_mx("backup.example.org")
    mx.rcpt_replies["bob@example.org"] = ["451 4.3.0 try later"]
    watch = QueueWatch(world)
    world.make_relay(on_event=watch.on_event, on_queue_change=watch.on_change, retry_delays=(60,))
    queued = world.enqueue(["bob@example.org"])
    world.wait_step("bob@example.org", "deferred")
    world.idle()
    assert world.relay is not None
    (entry,) = world.relay.queue()
    assert entry.id == queued.id and entry.next_attempt is not None
    assert watch.at_change and watch.at_change[-1] == [queued.id]
