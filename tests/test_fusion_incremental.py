"""Fusion's incremental passes and its watch intake: seeded random runs where every
incremental pass must equal a full pass on the same inputs, and the service against a
real node (gRPC server on 127.0.0.1:0, in-process): the store ends up holding what full
passes over the same tracks give, echoes and writes to keys fusion does not read wake
nothing, lag is measured from the sensor's write, neither a publish in flight nor a
late echo brings back a fused track deleted meanwhile, a failed publish is retried, and
a fused track someone else deletes is written again while its group stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import eventually
from meshstore import Store
from meshstore.components import CLASSIFICATION, FUSION, POSITION, SOURCE, make_entity, unpack
from meshstore.grpc.client import Backoff, StoreUnavailableError
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from meshstore.services import Lag
from meshstore.services.fusion import Correlator, Fusion, FusedTrack, Obs, distance_m, fused_id
from meshstore.services.scenario import offset_position

pytestmark = pytest.mark.timeout(120)

TRACK = pb.ENTITY_TYPE_TRACK
KINDS = ("eo", "radar", "ais")
FAST = Backoff(initial=0.05, maximum=0.5)


# ---- the correlator: incremental == full ---------------------------------------------------


def _clamp(lat: float, lon: float) -> tuple[float, float]:
    return max(-90.0, min(90.0, lat)), (lon + 180.0) % 360.0 - 180.0


class World:
    """Targets seen by one to three sensor types (noisy), plus clutter; ``step`` moves,
    adds, removes, retypes and adopts at random, on two correlators at once."""

    def __init__(self, seed: int, lat: tuple[float, float], lon: tuple[float, float], targets: int = 150) -> None:
        self.rng = random.Random(seed)
        self.box = lat, lon
        self.tracks: dict[str, Obs] = {}
        self.serial = 0
        for _ in range(targets):
            self.add_target()

    def spot(self) -> tuple[float, float]:
        (la0, la1), (lo0, lo1) = self.box
        return self.rng.uniform(la0, la1), self.rng.uniform(lo0, lo1)

    def near(self, lat: float, lon: float, metres: float) -> tuple[float, float]:
        return _clamp(*offset_position(lat, lon, self.rng.gauss(0, metres), self.rng.gauss(0, metres)))

    def new_track(self, kind: str, lat: float, lon: float) -> Obs:
        self.serial += 1
        obs = Obs(f"{kind}-{self.serial}", kind, lat, lon, self.rng.uniform(0, 500))
        self.tracks[obs.id] = obs
        return obs

    def add_target(self) -> None:
        lat, lon = self.spot()
        for kind in self.rng.sample(KINDS, self.rng.choice((1, 2, 2, 3))):
            self.new_track(kind, *self.near(lat, lon, 150))

    def moved(self, obs: Obs, metres: float) -> Obs:
        return Obs(obs.id, obs.sensor_type, *self.near(obs.lat, obs.lon, metres), obs.alt, obs.sensor_id)

    def step(self, correlators: tuple[Correlator, ...], adopting: bool = True) -> set[str]:
        """One round of random changes applied to every correlator (``adopting``: fused
        entities found in the store too); returns the ids touched."""
        rng, touched = self.rng, set()

        def upsert(obs: Obs) -> None:
            self.tracks[obs.id] = obs
            touched.add(obs.id)
            for c in correlators:
                c.upsert(obs)

        if rng.random() < 0.15:
            return touched  # a quiet round
        ids = sorted(self.tracks)
        for tid in rng.sample(ids, int(len(ids) * rng.choice((0.01, 0.05, 0.2, 0.6)))):
            upsert(self.moved(self.tracks[tid], rng.choice((20, 100, 300))))
        for tid in rng.sample(ids, 2):  # jumps anywhere in the box, or far beyond it (the grid's bound grows)
            obs = self.tracks[tid]
            lat, lon = self.spot() if rng.random() < 0.8 else _clamp(rng.uniform(-89.9, 89.9), rng.uniform(-180, 180))
            upsert(Obs(obs.id, obs.sensor_type, lat, lon, obs.alt))
        for _ in range(rng.randint(0, 3)):
            anchor = self.tracks[rng.choice(ids)]
            upsert(self.new_track(rng.choice(KINDS), *self.near(anchor.lat, anchor.lon, 200)))
        for tid in rng.sample(ids, rng.randint(0, 3)):
            del self.tracks[tid]
            touched.add(tid)
            gone = [c.remove(tid) for c in correlators]
            assert all(g == gone[0] for g in gone), f"remove({tid}) cascades differently: {gone}"
        if rng.random() < 0.2:
            tid = rng.choice(sorted(self.tracks))
            obs = self.tracks[tid]
            upsert(Obs(obs.id, rng.choice([k for k in KINDS if k != obs.sensor_type]), obs.lat, obs.lon, obs.alt))
        if adopting and rng.random() < 0.4:
            # A fused entity found in the store (another fusion's): a track and others
            # near it, so it often overlaps a group; sometimes with a source long gone.
            t = self.tracks[rng.choice(sorted(self.tracks))]
            close = [u.id for u in self.tracks.values()
                     if u.id != t.id and distance_m(t.lat, t.lon, u.lat, u.lon) < 700]
            some = [t.id, *rng.sample(close, min(len(close), rng.choice((1, 1, 2))))]
            if rng.random() < 0.2:
                some.append("gone-1")
            for c in correlators:
                c.adopt(fused_id(some), some)
        if rng.random() < 0.05:  # a new snapshot: every track again
            for c in correlators:
                c.clear_tracks()
                for obs in self.tracks.values():
                    c.upsert(obs)
        return touched


@pytest.mark.parametrize(("seed", "lat", "lon"), [
    (11, (50.0, 50.3), (0.0, 0.5)),
    (12, (-10.0, -9.8), (179.8, 180.0)),  # across the antimeridian
    (13, (88.5, 89.99), (-180.0, 180.0)),  # near the pole: wide longitude cells
    (14, (0.0, 0.2), (-0.2, 0.2)),  # crowded: groups compete
    (15, (30.0, 30.3), (30.0, 30.3)),
])
def test_incremental_passes_equal_full_passes(seed: int, lat: tuple, lon: tuple) -> None:
    world = World(seed, lat, lon)
    inc, full = Correlator(500.0), Correlator(500.0)
    for obs in world.tracks.values():
        inc.upsert(obs)
        full.upsert(obs)
    before: dict[str, FusedTrack] = {}
    less_work = incremental = dissolved = formed = 0
    for step in range(60):
        touched = world.step((inc, full)) if step else set(world.tracks)
        a, b = inc.correlate(), full.correlate(full=True)
        where = f"seed {seed}, step {step}"
        assert a.fused == b.fused, where
        assert list(inc.groups.items()) == list(full.groups.items()), where  # same groups, same order
        assert sorted(a.removed) == sorted(b.removed), where
        assert a.candidates == b.candidates, where
        assert b.full
        # Nothing that changed is missing from what the incremental pass says it (re)computed.
        assert {fid for fid, f in a.fused.items() if before.get(fid) != f} <= set(a.changed), where
        if not touched and not a.removed:
            assert a.changed == [], where
        incremental += not a.full  # full after a snapshot (clear_tracks)
        less_work += len(a.changed) < len(b.changed)
        dissolved += len(a.removed)
        formed += len(set(a.fused) - set(before))
        before = a.fused
    assert len(before) > 20 and dissolved > 10 and formed > 30  # the runs exercised all of it
    assert incremental > 50 and less_work > 20  # and the incremental passes mostly looked at less


def test_an_untouched_world_costs_nothing_and_one_move_costs_its_group() -> None:
    rng = random.Random(3)
    c = Correlator(500.0)
    for i in range(1000):
        lat, lon = rng.uniform(50.0, 51.0), rng.uniform(0.0, 1.0)
        c.upsert(Obs(f"eo-{i}", "eo", lat, lon))
        c.upsert(Obs(f"radar-{i}", "radar", *offset_position(lat, lon, rng.gauss(0, 30), rng.gauss(0, 30))))
    first = c.correlate()
    assert len(first.fused) > 900 and len(first.changed) == len(first.fused)
    quiet = c.correlate()
    assert quiet.changed == [] and quiet.removed == [] and quiet.candidates == 0 and quiet.fused == first.fused
    moved = c.tracks["radar-7"]
    c.upsert(Obs(moved.id, moved.sensor_type, *offset_position(moved.lat, moved.lon, 5.0, 5.0)))
    one = c.correlate()
    assert one.changed == [fused_id(["eo-7", "radar-7"])] and one.removed == []
    assert one.fused[one.changed[0]] != first.fused[one.changed[0]]
    assert c.correlate(full=True).fused == one.fused


# ---- the service against a real node -------------------------------------------------------


@contextlib.asynccontextmanager
async def running_fusion(store: Store, **kwargs: Any) -> AsyncIterator[Fusion]:
    """A node serving ``store`` and a Fusion that passes only when the test says so
    (after the one at start, on the snapshot)."""
    async with Node(store=store, port=0, grace=0.2) as node:
        fusion = Fusion(node.address, max_distance=500, interval=3600, backoff=FAST, **kwargs)
        task = asyncio.create_task(fusion.run())
        try:
            await eventually(lambda: fusion.stream is not None and fusion.stream.connected
                             and fusion.counters["passes"] == 1, what="fusion watching")
            assert fusion.last_pass.full  # the first pass after a snapshot
            yield fusion
        finally:
            await fusion.stop()
            await task


def _entity(obs: Obs) -> pb.Entity:
    return make_entity(obs.id, TRACK, position=pb.PositionComponent(lat=obs.lat, lon=obs.lon, alt=obs.alt),
                       source=pb.SourceComponent(sensor_id=obs.sensor_id, sensor_type=obs.sensor_type))


def _stored_fused(store: Store) -> dict[str, tuple]:
    out = {}
    for e in store.list(TRACK):
        if FUSION in e.components:
            f = unpack(e, FUSION, pb.FusionComponent)
            out[e.id] = (tuple(f.source_ids), f.fused_lat, f.fused_lon, f.confidence)
    return out


def _as_stored(fused: dict[str, FusedTrack]) -> dict[str, tuple]:
    """As ``_stored_fused`` has them (confidence is a float32 on the wire)."""
    return {fid: (f.source_ids, f.lat, f.lon, pb.FusionComponent(confidence=f.confidence).confidence)
            for fid, f in fused.items()}


def test_the_service_writes_what_full_passes_give(make_store: Any) -> None:
    store = make_store(node_id="fusion-inc")
    world = World(21, (40.0, 40.2), (10.0, 10.3), targets=120)
    reference = Correlator(500.0)

    async def run() -> None:
        async with running_fusion(store) as fusion:
            for step in range(8):
                if step:
                    touched = world.step((reference,), adopting=False)
                else:
                    touched = set(world.tracks)
                    for obs in world.tracks.values():
                        reference.upsert(obs)
                store.put_many([_entity(world.tracks[t]) for t in sorted(touched) if t in world.tracks])
                for tid in sorted(touched - set(world.tracks)):
                    store.delete(tid)
                await eventually(lambda: fusion.correlator.tracks == world.tracks, what=f"step {step} taken in")
                expected = reference.correlate(full=True)
                result = await fusion.run_pass()
                assert not result.full
                assert _as_stored(fusion.correlator.fused) == _as_stored(expected.fused), f"step {step}"
                assert _stored_fused(store) == _as_stored(expected.fused), f"step {step}: the store"
            assert fusion.counters["deleted_dissolved"] + fusion.counters["deleted_cascade"] > 0
            assert fusion.counters["fused_created"] > 50
    asyncio.run(asyncio.wait_for(run(), 100))


def test_echoes_and_keys_fusion_does_not_read_wake_nothing_and_lag_is_measured(make_store: Any) -> None:
    store = make_store(node_id="fusion-echo")

    async def run() -> None:
        async with running_fusion(store) as fusion:
            eo = Obs("eo-1", "eo", 45.0, 7.0)
            radar = Obs("radar-1", "radar", *offset_position(45.0, 7.0, 60.0, 0.0))
            store.put_many([_entity(eo), _entity(radar)])
            await eventually(lambda: len(fusion.correlator.tracks) == 2, what="tracks taken in")
            await fusion.run_pass()
            fid = fused_id(["eo-1", "radar-1"])
            assert fid in _stored_fused(store)
            await eventually(lambda: fusion.counters["skipped_echo"] >= 1, what="the echo of the fused write")
            # Another service writes a key fusion does not read: its watch is projected, so
            # the store does not even tell it (the move below is the only event it gets).
            events = fusion.counters["events"]
            store.put(make_entity("eo-1", TRACK, classification=pb.ClassificationComponent(label="slow")))
            assert CLASSIFICATION in store.get("eo-1").components
            quiet = await fusion.run_pass()
            assert quiet.changed == [] and quiet.candidates == 0 and fusion.counters["writes"] == 1
            # Lag: from the radar's position write to the fused write answering it.
            fusion.lag = Lag()
            moved = Obs("radar-1", "radar", *offset_position(45.0, 7.0, 80.0, 0.0))
            written_from = time.time_ns()
            store.put(_entity(moved))
            written_by = time.time_ns()
            await eventually(lambda: fusion.correlator.tracks["radar-1"] == moved, what="the move taken in")
            assert fusion.counters["events"] == events + 1, "the classification never reached fusion"
            await asyncio.sleep(0.2)
            passed_from = time.time_ns()
            moved_pass = await fusion.run_pass()
            passed_by = time.time_ns()
            assert moved_pass.changed == [fid]
            stats = fusion.stats()
            assert stats["lag_samples"] == 1
            assert (passed_from - written_by) / 1e6 - 1 <= stats["lag_ms_p50"] <= (passed_by - written_from) / 1e6 + 1
            assert stats["lag_ms_p50"] >= 200
    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_late_echo_of_a_deleted_fused_track_is_not_adopted_back() -> None:
    fusion = Fusion("127.0.0.1:1")  # never run: its intake and correlator only
    c = fusion.correlator
    writes = iter(range(1, 100))

    def event(obs: Obs) -> store_pb2.EntityEvent:
        entity = _entity(obs)
        for key in (POSITION, SOURCE):  # a new write of each key: its own dot
            entity.versions[key].CopyFrom(pb.Version(node="n", incarnation=1, counter=next(writes)))
        return store_pb2.EntityEvent(type=store_pb2.EVENT_TYPE_UPDATED, entity=entity)

    fusion.take(event(Obs("eo-1", "eo", 10.0, 10.0)))
    fusion.take(event(Obs("radar-1", "radar", *offset_position(10.0, 10.0, 0.0, 100.0))))
    [(fid, written)] = c.correlate().fused.items()
    echo = store_pb2.EntityEvent(type=store_pb2.EVENT_TYPE_UPDATED, entity=make_entity(
        fid, TRACK, fusion=pb.FusionComponent(source_ids=written.source_ids, fused_lat=written.lat,
                                              fused_lon=written.lon),
        position=pb.PositionComponent(lat=written.lat, lon=written.lon)))
    fusion.take(event(Obs("radar-1", "radar", *offset_position(10.0, 10.0, 0.0, 800.0))))
    assert c.correlate().removed == [fid]  # 1.6x apart: dissolved (and deleted)
    # Back to 600 m: within the hysteresis of a standing pair, too far for a new one.
    fusion.take(event(Obs("radar-1", "radar", *offset_position(10.0, 10.0, 0.0, 600.0))))
    fusion.take(echo)  # the echo of the write made before the delete, late
    assert fusion.counters["skipped_echo"] == 1
    assert fid not in c.groups and c.correlate().fused == {}


def test_a_publish_in_flight_never_brings_back_a_cascade_deleted_fused_track(make_store: Any) -> None:
    store = make_store(node_id="fusion-race")

    async def run() -> None:
        async with running_fusion(store) as fusion:
            store.put_many([_entity(Obs("eo-1", "eo", 20.0, 20.0)),
                            _entity(Obs("radar-1", "radar", *offset_position(20.0, 20.0, 30.0, 0.0)))])
            await eventually(lambda: len(fusion.correlator.tracks) == 2, what="tracks taken in")
            fid = fused_id(["eo-1", "radar-1"])
            entered, gate = asyncio.Event(), asyncio.Event()
            publish = fusion.client.publish

            async def held(entities: Any) -> Any:
                entered.set()
                await gate.wait()
                return await publish(entities)

            fusion.client.publish = held
            passing = asyncio.create_task(fusion.run_pass())
            await entered.wait()
            store.delete("eo-1")  # the source goes while the fused write is in flight
            await eventually(lambda: fid not in fusion.correlator.groups, what="the DELETED event taken in")
            gate.set()
            await passing
            await eventually(lambda: fid not in _stored_fused(store), what="cascade delete after the write")
            assert fusion.counters["deleted_cascade"] == 1
            await eventually(lambda: fusion.counters["skipped_echo"] >= 1, what="the late echo of the write")
            for _ in range(3):
                await fusion.run_pass()
            assert fid not in _stored_fused(store) and fid not in fusion.correlator.groups
    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_failed_publish_is_written_by_the_next_pass(make_store: Any) -> None:
    store = make_store(node_id="fusion-retry")

    async def run() -> None:
        async with running_fusion(store) as fusion:
            store.put_many([_entity(Obs("eo-1", "eo", 30.0, 30.0)),
                            _entity(Obs("radar-1", "radar", *offset_position(30.0, 30.0, 30.0, 0.0)))])
            await eventually(lambda: len(fusion.correlator.tracks) == 2, what="tracks taken in")
            publish = fusion.client.publish

            async def unavailable(entities: Any) -> Any:
                raise StoreUnavailableError("the store went away (test)")

            fusion.client.publish = unavailable
            with pytest.raises(StoreUnavailableError):
                await fusion.run_pass()
            assert _stored_fused(store) == {}
            fusion.client.publish = publish
            retry = await fusion.run_pass()
            assert retry.changed == []  # nothing new to correlate: the write was still owed
            assert list(_stored_fused(store)) == [fused_id(["eo-1", "radar-1"])]
    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_fused_track_deleted_by_someone_else_is_written_again_while_its_group_stands(make_store: Any) -> None:
    store = make_store(node_id="fusion-owner")

    async def run() -> None:
        async with running_fusion(store) as fusion:
            store.put_many([_entity(Obs("eo-1", "eo", 35.0, 35.0)),
                            _entity(Obs("radar-1", "radar", *offset_position(35.0, 35.0, 30.0, 0.0)))])
            await eventually(lambda: len(fusion.correlator.tracks) == 2, what="tracks taken in")
            await fusion.run_pass()
            fid = fused_id(["eo-1", "radar-1"])
            await eventually(lambda: fusion.counters["skipped_echo"] >= 1, what="the echo of the fused write")
            seen = fusion.stream.events
            store.delete(fid)
            await eventually(lambda: fusion.stream.events > seen, what="the DELETED event taken in")
            assert (await fusion.run_pass()).changed == []  # nothing moved ...
            assert fid in _stored_fused(store)  # ... but fusion's output has it
    asyncio.run(asyncio.wait_for(run(), 60))
