"""Threads sharing one store: nothing is lost, interleaved or half-applied."""

from __future__ import annotations

import threading

import pytest
from google.protobuf import wrappers_pb2

from conftest import make_entity, pack, push, source, sync, unpack
from meshstore import StaleWriteError
from meshstore.pb import entity_pb2 as pb

N_ENTITIES = 1000
N_THREADS = 4
N_ROUNDS = 5
JOIN_TIMEOUT = 60


def run_threads(target, n: int) -> None:
    """Runs ``target(i)`` on ``n`` threads started together; re-raises the first error."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    if errors:
        raise errors[0]


def value(thread: int, round_: int) -> str:
    return f"thread{thread}-round{round_}"


def sensor_id(entity: pb.Entity, key: str) -> str:
    return unpack(entity, key, pb.SourceComponent).sensor_id


@pytest.mark.parametrize("mode", ["put", "put_many"])
def test_threads_writing_different_keys_of_the_same_entities_lose_nothing(store, mode):
    def writer(t: int) -> None:
        key = f"k{t}"
        for r in range(N_ROUNDS):
            entities = [make_entity(f"e{i:04d}", **{key: source(value(t, r))}) for i in range(N_ENTITIES)]
            if mode == "put":
                for e in entities:
                    store.put(e)
            else:
                for start in range(0, N_ENTITIES, 100):
                    store.put_many(entities[start:start + 100])

    run_threads(writer, N_THREADS)
    entities = store.list()
    assert len(entities) == N_ENTITIES == store.stats()["entities"]
    last = N_ROUNDS - 1
    for e in entities:
        assert {k: sensor_id(e, k) for k in e.components} == {f"k{t}": value(t, last) for t in range(N_THREADS)}, e.id


def test_strict_read_modify_write_counts_every_increment(store):
    store.put(make_entity("counter", n=wrappers_pb2.UInt64Value(value=0)))
    increments = 50

    def incrementer(_: int) -> None:
        done = 0
        while done < increments:
            read = store.get("counter")
            n = unpack(read, "n", wrappers_pb2.UInt64Value).value
            read.components["n"].CopyFrom(pack(wrappers_pb2.UInt64Value(value=n + 1)))
            try:
                store.update(read, strict=True)
            except StaleWriteError:
                continue  # someone else got there first: read again
            done += 1

    run_threads(incrementer, N_THREADS)
    assert unpack(store.get("counter"), "n", wrappers_pb2.UInt64Value).value == N_THREADS * increments


def test_watcher_consuming_during_concurrent_writes_ends_on_the_final_state(make_store):
    store = make_store(node_id="node-a", watch_queue=64)
    watcher = store.watch()
    latest: dict[str, pb.Entity] = {}
    writers_done = threading.Event()

    def consume() -> None:
        while True:
            finished = writers_done.is_set()  # read before draining: nothing can follow
            batch = watcher.drain()
            for event in batch:
                latest[event.entity_id] = event.entity
            if finished and not batch:
                return
            if not batch and (event := watcher.get(timeout=0.05)) is not None:
                latest[event.entity_id] = event.entity

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def writer(t: int) -> None:
        for r in range(N_ROUNDS):
            store.put_many([make_entity(f"e{i:03d}", **{f"k{t}": source(value(t, r))}) for i in range(200)])

    run_threads(writer, N_THREADS)
    writers_done.set()
    consumer.join(JOIN_TIMEOUT)
    assert not consumer.is_alive()
    watcher.close()
    assert [latest[e.id] for e in store.list()] == store.list()


def test_concurrent_writes_on_two_replicas_with_a_syncing_thread_converge(pair):
    a, b = pair
    stop = threading.Event()

    def syncer() -> None:
        cursors = [0, 0]
        while not stop.is_set():
            cursors[0] = push(a, b, cursors[0])
            cursors[1] = push(b, a, cursors[1])

    sync_thread = threading.Thread(target=syncer, daemon=True)
    sync_thread.start()

    def writer(t: int) -> None:
        replica = (a, b)[t % 2]
        for r in range(N_ROUNDS):
            replica.put_many([make_entity(f"e{i:03d}", **{f"k{t}": source(value(t, r))}) for i in range(200)])

    try:
        run_threads(writer, N_THREADS)
    finally:
        stop.set()
        sync_thread.join(JOIN_TIMEOUT)
    sync(a, b)
    assert a.list() == b.list()
    last = N_ROUNDS - 1
    for e in a.list():
        assert {k: sensor_id(e, k) for k in e.components} == {f"k{t}": value(t, last) for t in range(N_THREADS)}
