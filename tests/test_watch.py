"""Watchers: filters, snapshots, resume, projection, rate limiting, back-pressure,
async iteration and shutdown. Waits are bounded by generous timeouts, never asserted on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import (
    ASSET, TRACK, classification, latlon, make_entity, position, source, threat, track, unpack,
)
from meshstore import CursorExpiredError, Watcher
from meshstore.pb import entity_pb2 as pb

CREATED, UPDATED, DELETED = 1, 2, 3
TIMEOUT = 5.0


def next_events(watcher: Watcher, n: int, timeout: float = TIMEOUT) -> list:
    """Exactly the next ``n`` events (fails if they do not arrive in time)."""
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < n:
        event = watcher.get(timeout=max(deadline - time.monotonic(), 0.0))
        assert event is not None, f"got {len(events)} of {n} events: {events}"
        events.append(event)
    return events


def test_watcher_sees_created_updated_and_deleted(store):
    with store.watch() as w:
        store.put(track("t1", position=position(1, 2)))
        store.put(make_entity("t1", position=position(3, 4)))
        store.delete("t1")
        events = next_events(w, 3)
    assert [(e.type, e.entity_id) for e in events] == [(CREATED, "t1"), (UPDATED, "t1"), (DELETED, "t1")]
    assert latlon(events[1].entity) == (3, 4)
    assert [e.seq for e in events] == [1, 2, 3]
    assert all(e.origin_node == "node-a" for e in events)


def test_deleted_event_names_the_entity(store):
    store.put(track("t1", position=position(1, 2)))
    with store.watch() as w:
        store.delete("t1")
        (event,) = next_events(w, 1)
    assert (event.type, event.entity_id, event.entity.id) == (DELETED, "t1", "t1")


def test_type_filter(store):
    with store.watch(type_filter=TRACK) as w:
        store.put(make_entity("a1", ASSET, position=position(1, 1)))
        store.put(make_entity("t1", TRACK, position=position(1, 1)))
        store.put(make_entity("a2", ASSET, position=position(1, 1)))
        store.put(make_entity("t2", TRACK, position=position(1, 1)))
        events = next_events(w, 2)
        assert w.drain() == []
    assert [e.entity_id for e in events] == ["t1", "t2"]


def test_include_existing_sends_live_entities_first_then_changes(store):
    store.put(track("b", position=position(1, 1)))
    store.put(track("a", position=position(2, 2)))
    store.put(track("gone", position=position(0, 0)))
    store.delete("gone")
    with store.watch(include_existing=True) as w:
        store.put(make_entity("a", position=position(9, 9)))
        store.put(track("c", position=position(3, 3)))
        events = next_events(w, 4)
        assert w.drain() == []
    head = events[:2]
    assert {e.entity_id for e in head} == {"a", "b"}
    assert all(e.type == CREATED for e in head)
    assert [(e.type, e.entity_id) for e in events[2:]] == [(UPDATED, "a"), (CREATED, "c")]
    assert latlon(events[2].entity) == (9, 9)


def test_since_seq_resumes_without_missing_anything(store):
    for i in range(10):
        store.put(track(f"e{i}", position=position(i, 0)))
    with store.watch() as first:
        store.put(make_entity("e0", position=position(80, 0)))
        cursor = next_events(first, 1)[0].seq
    # While nobody watches: updates, a delete and new entities.
    for i in (3, 4, 5):
        store.put(make_entity(f"e{i}", position=position(i, 1)))
    store.delete("e7")
    store.put(track("new", position=position(0, 0)))
    store.put(make_entity("e3", position=position(3, 2)))

    with store.watch(since_seq=cursor) as resumed:
        backlog = resumed.drain()
        store.put(make_entity("e9", position=position(9, 9)))
        live = next_events(resumed, 1)
    by_id = {e.entity_id: e for e in backlog}
    assert set(by_id) == {"e3", "e4", "e5", "e7", "new"}
    assert by_id["e7"].type == DELETED
    assert latlon(by_id["e3"].entity) == (3, 2)  # the current state
    assert all(e.seq > cursor for e in backlog)
    assert live[0].entity_id == "e9"


def _resume_misses_nothing(store, watcher, received: list) -> None:
    """Closes ``watcher`` after the consumer handled ``received`` and resumes from the seq
    of the last of them (the documented resume cursor): the consumer must end up having
    seen the current state of every entity."""
    watcher.close()
    latest = {e.entity_id: e.entity for e in received}
    with store.watch(since_seq=received[-1].seq) as resumed:
        latest.update({e.entity_id: e.entity for e in resumed.drain()})
    for entity in store.list():
        assert latest.get(entity.id) == entity, f"the current state of {entity.id} was never delivered"


def test_resume_from_a_coalescing_watcher_misses_nothing(make_store):
    store = make_store(node_id="node-a", watch_queue=2)
    w = store.watch()
    store.put(track("A", source=source("1")))
    store.put(track("B", source=source("1")))
    store.put(make_entity("A", source=source("2")))  # queue full: folded into A's slot
    received = next_events(w, 1)  # the consumer handles one event, then stops
    _resume_misses_nothing(store, w, received)


def test_resume_from_a_rate_limited_watcher_misses_nothing(store):
    w = store.watch(min_interval=60)
    store.put(track("A", source=source("1")))
    store.put(make_entity("A", source=source("2")))  # held back by min_interval
    store.put(track("B", source=source("1")))
    received = next_events(w, 2)
    _resume_misses_nothing(store, w, received)


def test_since_seq_from_changes_since_cursor(store):
    store.put(track("t1", position=position(1, 1)))
    _, cursor = store.changes_since(0)
    store.put(track("t2", position=position(2, 2)))
    with store.watch(since_seq=cursor) as w:
        assert [e.entity_id for e in w.drain()] == ["t2"]


def test_cursor_older_than_a_collected_tombstone_is_refused(store):
    store.put(track("t1", position=position(1, 1)))
    store.put(track("t2", position=position(1, 1)))
    old = store.seq
    store.delete("t1")
    assert store.collect_tombstones(acked_seq=store.seq) == 1
    with pytest.raises(CursorExpiredError, match=str(old)):
        store.watch(since_seq=old)
    with pytest.raises(CursorExpiredError):
        store.changes_since(old)
    with store.watch(since_seq=store.seq) as w:  # a fresh cursor still works
        store.put(track("t3", position=position(1, 1)))
        assert next_events(w, 1)[0].entity_id == "t3"


def test_components_projection(store):
    store.put(track("t1", position=position(1, 2), threat=threat(pb.THREAT_LEVEL_LOW)))
    with store.watch(components=["position"], include_existing=True) as w:
        store.put(make_entity("t1", classification=classification("ship"), position=position(3, 4)))
        events = next_events(w, 2)
    for event in events:
        assert set(event.entity.components) == {"position"}
    assert latlon(events[-1].entity) == (3, 4)


@pytest.mark.parametrize("bad", ["position", [""], [1]])
def test_components_projection_refuses_bad_keys(store, bad):
    with pytest.raises(TypeError, match="components"):
        store.watch(components=bad)


def test_min_interval_coalesces_quick_updates_to_the_latest(store):
    store.put(track("t1", position=position(0, 0)))
    with store.watch(min_interval=0.5) as w:
        for i in range(1, 6):
            store.put(make_entity("t1", position=position(i, i)))
        events = []
        while not events or latlon(events[-1].entity) != (5, 5):
            event = w.get(timeout=TIMEOUT)
            assert event is not None, f"final state never arrived; got {events}"
            events.append(event)
    assert len(events) < 5
    assert all(e.entity_id == "t1" for e in events)
    assert w.closed


def test_min_interval_does_not_hold_back_other_entities(store):
    with store.watch(min_interval=60) as w:
        store.put(track("a", position=position(1, 1)))
        store.put(track("b", position=position(1, 1)))
        assert [e.entity_id for e in next_events(w, 2)] == ["a", "b"]


def test_slow_watcher_under_100k_updates_ends_on_the_true_state(make_store):
    store = make_store(node_id="node-a", watch_queue=1000)
    n_entities, n_rounds, capacity = 1000, 100, 1000
    w = store.watch()
    max_queued = 0
    for r in range(n_rounds):
        store.put_many([make_entity(f"e{i:04d}", TRACK, source=source(f"{i}-{r}")) for i in range(n_entities)])
        max_queued = max(max_queued, w.stats()["queued"])
    assert max_queued <= n_entities + capacity
    assert store.stats()["coalesced"] > 0

    first: dict[str, object] = {}
    last: dict[str, object] = {}
    while batch := w.drain():
        for event in batch:
            first.setdefault(event.entity_id, event)
            last[event.entity_id] = event
    w.close()
    assert len(last) == n_entities
    for i in range(n_entities):
        assert first[f"e{i:04d}"].type == CREATED  # queued before the watcher fell behind
        event = last[f"e{i:04d}"]
        assert unpack(event.entity, "source", pb.SourceComponent).sensor_id == f"{i}-{n_rounds - 1}"
    assert [e.entity for e in sorted(last.values(), key=lambda e: e.entity_id)] == store.list()


def test_queue_is_plain_again_after_draining(make_store):
    store = make_store(node_id="node-a", watch_queue=2)
    with store.watch() as w:
        for r in range(3):
            store.put_many([track(f"e{i}", source=source(str(r))) for i in range(3)])
        assert {e.entity_id for e in w.drain()} == {"e0", "e1", "e2"}
        assert w.stats()["coalescing"] is False
        store.put(make_entity("e0", source=source("x")))
        store.put(make_entity("e0", source=source("y")))
        events = next_events(w, 2)  # not coalesced any more: both arrive
    assert [unpack(e.entity, "source", pb.SourceComponent).sensor_id for e in events] == ["x", "y"]


def test_async_iteration_woken_by_writes_from_another_thread(store):
    w = store.watch()

    def writer():
        for i in range(5):
            time.sleep(0.05)
            store.put(track(f"t{i}", position=position(i, i)))

    async def main():
        ticks = 0
        got = []

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        async def consume():
            async for event in w:
                got.append(event.entity_id)
                if len(got) == 5:
                    break

        tick_task = asyncio.create_task(ticker())
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            await asyncio.wait_for(consume(), TIMEOUT)
        finally:
            tick_task.cancel()
            thread.join()
        return got, ticks

    got, ticks = asyncio.run(main())
    w.close()
    assert got == [f"t{i}" for i in range(5)]
    assert ticks > 1  # the loop kept running while the consumer waited


def test_async_iteration_with_min_interval_delivers_the_held_final_state(store):
    store.put(track("t1", position=position(0, 0)))
    w = store.watch(min_interval=0.3)
    for i in range(1, 6):
        store.put(make_entity("t1", position=position(i, i)))

    async def main():
        got = []

        async def consume():
            async for event in w:
                got.append(latlon(event.entity))
                if got[-1] == (5, 5):
                    break

        await asyncio.wait_for(consume(), TIMEOUT)
        return got

    got = asyncio.run(main())
    w.close()
    assert got[-1] == (5, 5) and len(got) < 5


def test_async_iteration_ends_when_closed(store):
    w = store.watch()

    async def main():
        got = []

        async def consume():
            async for event in w:
                got.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        w.close()
        await asyncio.wait_for(task, TIMEOUT)
        return got

    assert asyncio.run(main()) == []


def test_close_ends_a_blocked_iterator_in_another_thread(store):
    w = store.watch()
    got = []
    started = threading.Event()

    def consume():
        started.set()
        for event in w:
            got.append(event.entity_id)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    started.wait(TIMEOUT)
    store.put(track("t1", position=position(1, 1)))
    deadline = time.monotonic() + TIMEOUT
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the consumer is now blocked waiting for the next event
    w.close()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert got == ["t1"]
    assert w.closed and w.get(timeout=0) is None


def test_closed_watcher_gets_nothing_and_is_unregistered(store):
    w = store.watch()
    assert store.stats()["watchers"] == 1
    w.close()
    w.close()  # idempotent
    store.put(track("t1", position=position(1, 1)))
    assert w.drain() == []
    assert store.stats()["watchers"] == 0


def test_a_watcher_left_by_break_is_unregistered(store):
    store.put(track("t1", position=position(1, 1)))
    for _event in store.watch(include_existing=True):
        break
    assert store.stats()["watchers"] == 0

    async def first() -> str:
        async for event in store.watch(include_existing=True):
            return event.entity_id
        return ""

    assert asyncio.run(first()) == "t1"
    assert store.stats()["watchers"] == 0
    kept = store.watch(include_existing=True)
    for _event in kept:
        break
    assert store.stats()["watchers"] == 1 and kept.get(timeout=0) is None and not kept.closed


def test_replicated_change_reaches_a_watcher_with_its_origin(pair):
    a, b = pair
    with b.watch() as w:
        a.put(track("t1", position=position(1, 2)))
        for state in a.changes_since(0)[0]:
            b.merge(state)
        (event,) = next_events(w, 1)
    assert (event.type, event.entity_id, event.origin_node) == (CREATED, "t1", "node-a")


def test_state_from_a_clock_far_ahead_is_announced_at_once(make_store):
    a = make_store(node_id="a-fast")
    a._core.set_wall_offset(5.0)
    a.put(track("t1", position=position(1, 2)))
    b = make_store(node_id="b", max_clock_offset=0.5)
    with b.watch() as w:
        for state in a.changes_since(0)[0]:
            b.merge(state)
        (event,) = next_events(w, 1)  # merged at once, not held until b's clock catches up
    assert (event.type, event.entity_id) == (CREATED, "t1")
    assert b.stats()["skewed_stamps"] == 1


@pytest.mark.parametrize("bad", [{"min_interval": -1}, {"min_interval": float("nan")}, {"type_filter": 9},
                                 {"since_seq": -1}])
def test_watch_refuses_bad_arguments(store, bad):
    with pytest.raises(ValueError):
        store.watch(**bad)
    assert store.stats()["watchers"] == 0
