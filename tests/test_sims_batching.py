"""The sims publish one batch per tick: ``StoreClient.publish`` cuts a batch into a few
PublishRequests (``entities``, by count and size) on one stream, the sims call it once
per tick, and a sim skips ticks only when more than a tick behind, counting and logging
them (rate-limited).

Messages are counted by a recording gRPC server (the real client on the wire); the
Rust server's own counters check one PublishEntities stream per tick; the tick loop runs
against a recording client on a virtual clock, so its skips are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from helpers import eventually

from meshstore.components import POSITION, make_entity
from meshstore.grpc.client import (
    PUBLISH_MAX_BYTES,
    PUBLISH_MAX_ENTITIES,
    Backoff,
    StoreClient,
    StoreUnavailableError,
    publish_chunks,
)
from meshstore.node import Node, NodeOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2, store_pb2_grpc
from meshstore.services import timestamp_seconds
from meshstore.services import sensor_sim
from meshstore.services.radar_sim import RadarSim
from meshstore.services.scenario import Scenario
from meshstore.services.sensor_sim import SensorSim

pytestmark = pytest.mark.timeout(120)

TRACK = pb.ENTITY_TYPE_TRACK
PUBLISH_METHOD = "/store.v1.EntityStoreService/PublishEntities"


def arun(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def padded(entity_id: str, size: int) -> pb.Entity:
    """A track whose encoding is a little over ``size`` bytes."""
    entity = make_entity(entity_id, TRACK, position=pb.PositionComponent(lat=1, lon=2))
    entity.components["padding"].type_url = "type.googleapis.com/google.protobuf.BytesValue"
    entity.components["padding"].value = b"x" * size
    return entity


# ---- cutting a batch ----------------------------------------------------------------------


def test_publish_chunks_cut_by_count_then_by_size_in_order() -> None:
    small = [make_entity(f"t-{i}", TRACK).SerializeToString() for i in range(2500)]
    chunks = list(publish_chunks(small))
    assert [len(c) for c in chunks] == [PUBLISH_MAX_ENTITIES, PUBLISH_MAX_ENTITIES, 2500 - 2 * PUBLISH_MAX_ENTITIES]
    assert [e for c in chunks for e in c] == small

    big = [padded(f"b-{i}", 300_000).SerializeToString() for i in range(7)]  # three fit in 1 MiB, four do not
    chunks = list(publish_chunks(big))
    assert [len(c) for c in chunks] == [3, 3, 1]
    for chunk in chunks:
        assert store_pb2.PublishRequestView(entities=chunk).ByteSize() <= PUBLISH_MAX_BYTES

    huge = padded("huge", 2 * PUBLISH_MAX_BYTES).SerializeToString()  # bigger than a message: alone, not dropped
    assert list(publish_chunks([small[0], huge, small[1]])) == [[small[0]], [huge], [small[1]]]
    assert list(publish_chunks([])) == []


# ---- on the wire: a recording server --------------------------------------------------------


class Recording(store_pb2_grpc.EntityStoreServiceServicer):
    """Records every PublishRequest of every stream: (entities in ``entities``, whether
    the single ``entity`` field was used, encoded size). ``fail_after``: abort each
    stream UNAVAILABLE after that many messages."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.streams: list[list[tuple[int, bool, int]]] = []
        self.fail_after = fail_after

    async def GetStats(self, request: Any, context: Any) -> store_pb2.GetStatsResponse:
        return store_pb2.GetStatsResponse(node_id="recording", values={"seq": 0.0})

    async def PublishEntities(self, request_iterator: Any, context: Any) -> store_pb2.PublishSummary:
        messages: list[tuple[int, bool, int]] = []
        self.streams.append(messages)
        async for request in request_iterator:
            messages.append((len(request.entities), request.HasField("entity"), request.ByteSize()))
            if self.fail_after is not None and len(messages) >= self.fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "recording server going away")
        return store_pb2.PublishSummary(applied=sum(n + one for n, one, _ in messages))


@contextlib.asynccontextmanager
async def recording(servicer: Recording) -> AsyncIterator[str]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    store_pb2_grpc.add_EntityStoreServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def run_for_ticks(sim: SensorSim, ticks: int) -> None:
    task = asyncio.create_task(sim.run())
    try:
        await eventually(lambda: sim.counters["ticks"] >= ticks, timeout=30, what=f"{ticks} ticks")
    finally:
        await sim.stop()
        await task


@pytest.mark.parametrize("sim_class", [SensorSim, RadarSim])
def test_a_sim_sends_each_tick_as_one_stream_of_ceil_n_over_chunk_messages(sim_class: type[SensorSim]) -> None:
    tracks = 2500

    async def scenario() -> None:
        servicer = Recording()
        async with recording(servicer) as address:
            sim = sim_class(address, Scenario(seed=3, count=tracks), rate=5.0)
            await run_for_ticks(sim, 2)
            # One stream per tick (a stream cut short by the stop would be the last one).
            done = servicer.streams[:sim.counters["ticks"]]
            assert len(done) == sim.counters["ticks"] >= 2
            for messages in done:
                assert len(messages) == math.ceil(tracks / PUBLISH_MAX_ENTITIES) == 3
                assert [n for n, _, _ in messages] == [1024, 1024, 452]
                assert not any(one for _, one, _ in messages)  # all in `entities`, none in `entity`
                assert all(size <= PUBLISH_MAX_BYTES for _, _, size in messages)
            assert sim.counters["published"] == tracks * sim.counters["ticks"]

    arun(scenario())


def test_publish_cuts_big_entities_by_size_and_reports_a_stream_cut_short() -> None:
    async def scenario() -> None:
        servicer = Recording()
        async with recording(servicer) as address, StoreClient(address) as client:
            summary = await client.publish(padded(f"b-{i}", 300_000) for i in range(7))
            assert summary.applied == 7
            assert [n for n, _, _ in servicer.streams[-1]] == [3, 3, 1]
            assert all(size <= PUBLISH_MAX_BYTES for _, _, size in servicer.streams[-1])
            assert (await client.publish([])).applied == 0  # an empty batch: a stream with no message
            assert servicer.streams[-1] == []
        # A store that ends the stream midway: unavailable (whether grpc.aio saw its
        # status or only the refused write), so a sim retries once the store answers.
        failing = Recording(fail_after=1)
        async with recording(failing) as address, StoreClient(address) as client:
            for _ in range(5):
                with pytest.raises(StoreUnavailableError):
                    await client.publish(make_entity(f"t-{i}", TRACK) for i in range(5000))
                assert len(failing.streams[-1]) == 1
        async with StoreClient("127.0.0.1:1", backoff=Backoff(0.01, 0.05)) as dead:
            with pytest.raises(StoreUnavailableError):
                await dead.publish([make_entity("t", TRACK)])

    arun(scenario())


# ---- against the Rust server ----------------------------------------------------------------


def test_against_the_server_one_publish_stream_per_tick_and_every_track_applied() -> None:
    tracks = 2500

    async def scenario() -> None:
        async with Node(NodeOptions(port=0)) as node:
            async with StoreClient(node.address) as client:
                entities = [make_entity(f"t-{i}", TRACK, position=pb.PositionComponent(lat=1, lon=i / 1e4))
                            for i in range(tracks)]
                entities[1500].components[POSITION].value = b"\xff"  # one bad entity: counted, the rest applied
                summary = await client.publish(entities)
                assert (summary.applied, summary.rejected) == (tracks - 1, 1)
                assert node.stats()["server"]["methods"][PUBLISH_METHOD]["calls"] == 1
            sim = SensorSim(node.address, Scenario(seed=3, count=tracks), rate=2.0, id_prefix="eo")
            await run_for_ticks(sim, 3)
            calls = node.stats()["server"]["methods"][PUBLISH_METHOD]["calls"] - 1
            # One stream per published tick, plus at most the one the stop cut short.
            assert sim.counters["ticks"] <= calls <= sim.counters["ticks"] + 1
            assert sim.counters["published"] == tracks * sim.counters["ticks"]
            eo = [e for e in node.store.list(TRACK) if e.id.startswith("eo-")]
            assert len(eo) == tracks

    arun(scenario())


# ---- the tick loop: skips only when more than a tick behind ----------------------------------


class VirtualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SlowStore:
    """A recording client whose publish takes ``cost`` seconds of the virtual clock;
    records (tick, clock at the start) of each publish; the ``limit``-th never returns
    (the sim is stopped in it)."""

    def __init__(self, clock: VirtualClock, rate: float, ttl: float, cost: float, limit: int) -> None:
        self.clock, self.rate, self.ttl, self.cost, self.limit = clock, rate, ttl, cost, limit
        self.published: list[tuple[int, float]] = []

    async def wait_ready(self) -> None:
        return None

    async def publish(self, entities: Any) -> store_pb2.PublishSummary:
        entities = [pb.Entity.FromString(e) for e in entities]
        tick = round((timestamp_seconds(entities[0].expiry_time) - self.ttl) * self.rate)
        self.published.append((tick, self.clock.now))
        if len(self.published) >= self.limit:
            await asyncio.Event().wait()
        self.clock.now += self.cost
        await asyncio.sleep(0)
        return store_pb2.PublishSummary(applied=len(entities))

    async def close(self) -> None:
        return None


def run_slow(cost: float, limit: int) -> tuple[SensorSim, list[int], list[float]]:
    """A sim at 1 Hz whose every publish takes ``cost`` seconds, until its ``limit``-th
    publish: (sim, ticks published, when each started), relative to the first tick."""
    start = 1_000_000
    clock = VirtualClock(float(start))
    store = SlowStore(clock, rate=1.0, ttl=30.0, cost=cost, limit=limit)
    sim = SensorSim(scenario=Scenario(seed=1, count=3), rate=1.0, ttl=30.0, clock=clock, client=store)

    async def scenario() -> None:
        task = asyncio.create_task(sim.run())
        await eventually(lambda: len(store.published) >= limit, timeout=20, what=f"{limit} publishes")
        await sim.stop()
        await task

    arun(scenario())
    return sim, [tick - start for tick, _ in store.published], [at - start for _, at in store.published]


def test_a_late_tick_is_published_late_not_skipped() -> None:
    sim, ticks, started = run_slow(cost=1.5, limit=4)
    # Each publish ends half a tick later than the one before: ticks 1-3 go out late
    # (by up to 1.5 s), none is skipped: the stream's pace is the sim's pace.
    assert (ticks, started) == ([0, 1, 2, 3], [0.0, 1.5, 3.0, 4.5])
    assert sim.counters["ticks_skipped"] == 0


def test_more_than_a_tick_behind_the_sim_skips_to_the_present_counts_and_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshstore.services.sensor-sim")
    sim, ticks, started = run_slow(cost=2.5, limit=11)
    # Tick 0 ends at 2.5; tick 1, one tick late, is published (ends at 5); at 5 the sim
    # is more than a tick behind: 2, 3, 4 are skipped and 5 published; and so on.
    assert ticks == [0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25]
    assert all(at < tick + 2 for tick, at in zip(ticks, started))  # never more than a tick late
    assert sim.counters["ticks_skipped"] == 15 == (ticks[-1] - ticks[0] + 1) - len(ticks)
    assert sim.stats()["ticks_skipped"] == 15
    # Skips at t=5, 10, 15, 20, 25: warned at 5, 15 and 25 (SKIP_LOG_INTERVAL = 10 s),
    # each with the count since the previous warning.
    assert sensor_sim.SKIP_LOG_INTERVAL == 10.0
    warnings = [r for r in caplog.records if r.getMessage() == "falling behind: ticks skipped"]
    assert [(r.fields["skipped"], r.fields["total"]) for r in warnings] == [(3, 3), (6, 9), (6, 15)]
