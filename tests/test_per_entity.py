"""meshstore.services.PerEntity (events handled concurrently across entities, in order
per entity, the latest waiting one kept, no task for an event that needs nothing) and
what the classifier builds on it: its own echo dropped, its lag recorded, over a real
server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from conftest import eventually
from meshstore import Store
from meshstore.components import VELOCITY, make_entity
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.services import PerEntity, Service
from meshstore.services.classifier import Classifier


def arun(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Recorder(Service):
    """Its events are their own jobs (None: an event that needs nothing); ``prepared``
    lists the events it looked at, in order."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__(client=object())  # never talks to a store
        self.log.setLevel(logging.CRITICAL)
        self.prepared: list[Any] = []

    def prepare(self, ev: Any) -> Any:
        self.prepared.append(ev)
        if ev == "bug":
            raise ValueError("a bug in one look")
        return ev


def test_entities_run_concurrently_each_in_order_keeping_the_latest_waiting_event() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        workers = PerEntity(recorder, limit=8)
        gates = {key: asyncio.Event() for key in "ab"}
        done: list[tuple[str, int]] = []
        running: set[str] = set()
        overlap = []

        def job(key: str, n: int) -> Any:
            async def run() -> None:
                running.add(key)
                overlap.append(len(running))
                await gates[key].wait()
                done.append((key, n))
                running.discard(key)
            return run

        a1, b1, a2, a3 = job("a", 1), job("b", 1), job("a", 2), job("a", 3)
        await workers.submit("a", a1)
        await workers.submit("b", b1)
        await workers.submit("a", a2)  # waits behind a1...
        await workers.submit("a", a3)  # ...and replaces a2: it carried an older state
        await eventually(lambda: len(running) == 2, what="a and b at once")
        gates["a"].set()
        gates["b"].set()
        await workers.drain()
        assert max(overlap) == 2
        assert [d for d in done if d[0] == "a"] == [("a", 1), ("a", 3)]
        assert workers.superseded == 1
        assert recorder.prepared == [a1, b1, a3]  # a3 looked at once a1 was done; a2 never
        # An event that needs nothing costs no task; a bug in a look is counted, stops nothing.
        tasks = len(asyncio.all_tasks())
        await workers.submit("c", None)
        await workers.submit("d", "bug")
        assert len(asyncio.all_tasks()) == tasks and not workers._running and workers.failed == 1

    arun(scenario())


def test_the_limit_holds_back_the_watch_and_a_failing_job_stops_nothing() -> None:
    async def scenario() -> None:
        workers = PerEntity(Recorder(), limit=2)
        release = asyncio.Event()
        finished: list[str] = []

        def job(key: str) -> Any:
            async def run() -> None:
                await release.wait()
                if key == "bad":
                    raise RuntimeError("a bug in one handler")
                finished.append(key)
            return run

        await workers.submit("bad", job("bad"))
        await workers.submit("x", job("x"))
        third = asyncio.create_task(workers.submit("y", job("y")))
        await asyncio.sleep(0.05)
        assert not third.done(), "a third entity waits for a free slot"
        release.set()
        await third
        await workers.drain()
        assert sorted(finished) == ["x", "y"] and workers.failed == 1

    arun(scenario())


def test_the_classifier_ignores_its_own_echo_and_reports_its_lag() -> None:
    async def scenario() -> None:
        with Store() as store:
            async with Node(store=store, grace=0.2) as node:
                classifier = Classifier(node.address)
                task = asyncio.create_task(classifier.run())
                try:
                    store.put(make_entity("t1", pb.ENTITY_TYPE_TRACK, velocity=pb.VelocityComponent(speed=500)))
                    await eventually(lambda: classifier.counters["writes"] == 1, what="classified")
                    # Its own write comes back as an event: dropped as an echo, not re-planned.
                    await eventually(lambda: classifier.counters["skipped_echo"] == 1, what="echo seen")
                    store.put(make_entity("t1", velocity=pb.VelocityComponent(speed=10)))  # a new band
                    await eventually(lambda: classifier.counters["writes"] == 2, what="reclassified")
                    stats = classifier.stats()
                    assert stats["lag_samples"] == 2
                    assert 0 <= stats["lag_ms_p50"] <= stats["lag_ms_p99"] < 10_000
                    assert VELOCITY in store.get("t1").components
                finally:
                    await classifier.stop()
                    await task

    arun(scenario())


def test_the_task_manager_measures_its_lag_once_per_threat_it_answers() -> None:
    from meshstore.services.task_manager import TaskManager

    async def scenario() -> None:
        with Store() as store:
            async with Node(store=store, grace=0.2) as node:
                manager = TaskManager(node.address, approval_timeout=0.3)
                task = asyncio.create_task(manager.run())
                try:
                    store.put(make_entity("t1", pb.ENTITY_TYPE_TRACK, threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW)))
                    await eventually(lambda: manager.stats().get("lag_samples") == 1, what="the task answers the threat")
                    store.put(make_entity("t1", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH)))
                    # HIGH: a task and an approval request answer it; the request times out
                    # later and is written again: that write answers no new threat.
                    await eventually(lambda: manager.counters["approvals_timed_out"] == 1, what="time-out")
                    stats = manager.stats()
                    assert stats["lag_samples"] == 2 and stats["lag_ms_p99"] < 300
                finally:
                    await manager.stop()
                    await task

    arun(scenario())
