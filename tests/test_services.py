"""Unit tests of the pipeline services' rules (meshstore.services, meshstore.grpc.client).

Pure rules are tested as functions; the stateful parts (task-manager timers, classifier
writes against versions) against a real Store, and over a real in-process gRPC server
on 127.0.0.1:0 where the service's own I/O matters. Timeouts use an EventLoop with a
fake clock. Everything is seeded; waits poll with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import typer
from google.protobuf import any_pb2
from typer.testing import CliRunner

from conftest import eventually
from meshstore import Store
from meshstore.cli import demo as demo_commands
from meshstore.cli import services as service_commands
from meshstore.grpc.client import (
    Backoff,
    FailedPreconditionError,
    RpcError,
    StoreClient,
    StoreUnavailableError,
    error_from_rpc,
)
from meshstore.components import (
    APPROVAL, CLASSIFICATION, POSITION, SOURCE, TASK, TASK_CATALOG, THREAT, VELOCITY, EntityEncoder, make_entity, pack,
    unpack,
)
from meshstore.errors import (
    AlreadyExistsError, ClockSkewError, CursorExpiredError, InvalidEntityError, NotFoundError, StaleWriteError,
)
from meshstore.eventloop import EventLoop
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.services import ABSENT_NODE, timestamp
from meshstore.services import classifier as cl
from meshstore.services import task_manager as tm
from meshstore.services.fusion import (
    Correlator, Fusion, Obs, candidate_pairs_brute, candidate_pairs_grid, distance_m, fused_id, parse_sigmas,
)
from meshstore.services.radar_sim import RadarSim
from meshstore.services.scenario import KNOT_MPS, SCENARIO_EPOCH, BBox, Scenario, offset_position
from meshstore.services.sensor_sim import SensorSim

pytestmark = pytest.mark.timeout(60)

TRACK = pb.ENTITY_TYPE_TRACK
H = pb.THREAT_LEVEL_HIGH


def arun(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(store: Store) -> AsyncIterator[str]:
    async with Node(store=store, grace=0.2) as node:
        yield node.address


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def foreign(message: Any) -> any_pb2.Any:
    """An Any the store does not validate (another type URL host) but Python unpacks."""
    return any_pb2.Any(type_url=f"meshstore.test/{message.DESCRIPTOR.full_name}", value=message.SerializeToString())


# ---- scenario and sims ---------------------------------------------------------------------


def test_scenario_is_a_pure_function_of_its_parameters() -> None:
    a, b = Scenario(seed=11, count=10), Scenario(seed=11, count=10)
    for t in (0.0, 1.5, 3600.0, 2.5e8):
        assert a.states(t) == b.states(t)
    assert Scenario(seed=12, count=10).states(0.0) != a.states(0.0)
    # Target i does not depend on how many targets there are.
    assert Scenario(seed=11, count=4).states(123.0) == a.states(123.0)[:4]


def test_dead_reckoning_moves_each_target_at_its_speed() -> None:
    scenario = Scenario(seed=5, count=20, speed_min=50, speed_max=600)
    checked = 0
    for i in range(scenario.count):
        for t in (0.0, 1000.0, 7.3e7):
            s0, s1 = scenario.state(i, t), scenario.state(i, t + 1.0)
            if abs(s0.heading_deg - s1.heading_deg) > 1e-9:
                continue  # bounced in between
            metres = distance_m(s0.lat, s0.lon, s1.lat, s1.lon)
            assert metres == pytest.approx(s0.speed_kts * KNOT_MPS, rel=0.02)
            # ... along its heading
            bearing = math.degrees(math.atan2((s1.lon - s0.lon) * math.cos(math.radians(s0.lat)), s1.lat - s0.lat))
            assert (bearing - s0.heading_deg + 180) % 360 - 180 == pytest.approx(0, abs=1.0)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("edge", ["bounce", "wrap"])
def test_targets_stay_in_the_box(edge: str) -> None:
    box = BBox(10.0, 10.05, 20.0, 20.05)  # small box: ~5 km, crossed in seconds at these speeds
    scenario = Scenario(seed=2, count=8, bbox=box, speed_min=300, speed_max=900, edge=edge)
    step = 0.5
    lat_span, lon_span = box.max_lat - box.min_lat, box.max_lon - box.min_lon
    for i in range(scenario.count):
        prev = scenario.state(i, 0.0)
        turns = 0
        for k in range(1, 400):
            s = scenario.state(i, k * step)
            assert box.contains(s.lat, s.lon)
            moved_lat, moved_lon = abs(s.lat - prev.lat), abs(s.lon - prev.lon)
            if edge == "bounce":
                # Direction changes only at an edge, and positions never jump.
                assert moved_lat < 0.01 and moved_lon < 0.01
                if abs(s.heading_deg - prev.heading_deg) > 1e-9:
                    turns += 1
                    near = min(s.lat - box.min_lat, box.max_lat - s.lat, s.lon - box.min_lon, box.max_lon - s.lon)
                    assert near < 0.01
            else:
                assert s.heading_deg == pytest.approx(prev.heading_deg)
                # A wrap jumps across the whole box.
                if moved_lat > 0.01:
                    assert moved_lat == pytest.approx(lat_span, abs=0.01)
                    turns += 1
                if moved_lon > 0.01:
                    assert moved_lon == pytest.approx(lon_span, abs=0.01)
                    turns += 1
            prev = s
        assert turns > 0, f"target {i} never reached an edge"


def test_bbox_validation() -> None:
    for bad in ((2, 1, 0, 1), (0, 1, 0, float("nan")), (-95, 0, 0, 1), (0, 1, 10, 200)):
        with pytest.raises(ValueError):
            BBox(*bad)
    with pytest.raises(ValueError):
        Scenario(speed_min=100, speed_max=50)
    with pytest.raises(ValueError):
        Scenario(edge="teleport")


def test_entity_encoder_encodes_what_make_entity_builds_whatever_the_shape() -> None:
    encoder = EntityEncoder(pb.ENTITY_TYPE_TRACK)
    shapes = [
        {"position": pb.PositionComponent(lat=1, lon=2), "velocity": pb.VelocityComponent(speed=3)},
        {"position": pb.PositionComponent(lat=4, lon=5)},  # fewer keys: velocity must not stay
        {"source": pb.SourceComponent(sensor_id="s")},  # as many keys, another one
        {"position": pb.PositionComponent(lat=6), "velocity": pb.VelocityComponent(heading=7)},
    ]
    for i, components in enumerate(shapes):
        encoded = encoder.encode(f"t{i}", **components)
        assert pb.Entity.FromString(encoded) == make_entity(f"t{i}", pb.ENTITY_TYPE_TRACK, **components)


def test_sensor_sim_reports_the_ground_truth() -> None:
    scenario = Scenario(seed=4, count=3)
    sim = SensorSim(scenario=scenario, rate=2.0, sensor_id="eo-7", ttl=10)
    tick = 3_600_000_000  # 2.0 ticks/s: t = 1.8e9
    entities = [pb.Entity.FromString(b) for b in sim.observe(tick)]
    assert [e.id for e in entities] == ["eo-0", "eo-1", "eo-2"]
    t = tick / 2.0
    for e, truth in zip(entities, scenario.states(t - SCENARIO_EPOCH), strict=True):
        assert e.type == TRACK
        source = unpack(e, SOURCE, pb.SourceComponent)
        assert (source.sensor_id, source.sensor_type) == ("eo-7", "eo")
        pos, vel = unpack(e, POSITION, pb.PositionComponent), unpack(e, VELOCITY, pb.VelocityComponent)
        assert (pos.lat, pos.lon) == (truth.lat, truth.lon)
        assert (vel.speed, vel.heading) == (truth.speed_kts, truth.heading_deg)
        assert e.expiry_time.seconds == int(t + 10)
        assert set(e.components) == {POSITION, VELOCITY, SOURCE}
    with pytest.raises(ValueError):
        SensorSim(scenario=scenario, rate=0)


def test_radar_noise_is_deterministic_with_the_seed() -> None:
    scenario = Scenario(seed=9, count=50)
    a, b = RadarSim(scenario=scenario, noise_m=50), RadarSim(scenario=scenario, noise_m=50)
    tick = 3_500_000_000
    assert a.observe(tick) == b.observe(tick)
    assert a.noise(tick) != a.noise(tick + 1)
    assert RadarSim(scenario=Scenario(seed=10, count=50)).noise(tick) != a.noise(tick)
    plots = [pb.Entity.FromString(b) for b in a.observe(tick)]
    assert [p.id for p in plots[:2]] == ["radar-0", "radar-1"]
    assert all(VELOCITY not in p.components for p in plots)
    assert {unpack(p, SOURCE, pb.SourceComponent).sensor_type for p in plots} == {"radar"}
    # The error is Gaussian with the configured sigma per axis: RMS distance ~ sigma * sqrt(2).
    errors = []
    for k in range(20):
        truth = scenario.states(tick + k - SCENARIO_EPOCH)
        for plot, s in zip(a.observe(tick + k), truth, strict=True):
            p = unpack(pb.Entity.FromString(plot), POSITION, pb.PositionComponent)
            errors.append(distance_m(p.lat, p.lon, s.lat, s.lon))
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert rms == pytest.approx(50 * math.sqrt(2), rel=0.1)
    # offset_position is the inverse of the distance
    lat, lon = offset_position(50.0, 1.0, 30.0, 40.0)
    assert distance_m(50.0, 1.0, lat, lon) == pytest.approx(50.0, rel=1e-3)


# ---- classifier ---------------------------------------------------------------------------


@pytest.mark.parametrize(("speed", "label", "level"), [
    (0.0, "slow-mover", pb.THREAT_LEVEL_NONE),
    (29.99, "slow-mover", pb.THREAT_LEVEL_NONE),
    (30.0, "mover", pb.THREAT_LEVEL_LOW),
    (149.0, "mover", pb.THREAT_LEVEL_LOW),
    (150.0, "fast-mover", pb.THREAT_LEVEL_MEDIUM),
    (399.9, "fast-mover", pb.THREAT_LEVEL_MEDIUM),
    (400.0, "very-fast-mover", pb.THREAT_LEVEL_HIGH),
    (2000.0, "very-fast-mover", pb.THREAT_LEVEL_HIGH),
])
def test_classify_thresholds(speed: float, label: str, level: int) -> None:
    result = cl.classify(speed)
    assert (result.label, result.level) == (label, level)
    assert 0.5 <= result.confidence <= cl._f32(0.99)


def test_classify_confidence_and_bad_speeds() -> None:
    assert cl.classify(400.0).confidence == pytest.approx(0.5)
    assert cl.classify(1000.0).confidence == pytest.approx(0.99)
    assert cl.classify(90.0).confidence > cl.classify(35.0).confidence
    custom = cl.Thresholds(low=5, medium=10, high=20)
    assert cl.classify(12, custom).level == pb.THREAT_LEVEL_MEDIUM
    for bad in (float("nan"), float("inf"), -1.0, True, "fast"):
        assert cl.classify(bad) is None
    for bad in ((10, 5, 20), (0, 5, 10), (1, 2, float("inf"))):
        with pytest.raises(ValueError):
            cl.Thresholds(*bad)


def _read_track(store: Store, entity_id: str, **components: Any) -> pb.Entity:
    store.put(make_entity(entity_id, TRACK, **components))
    return store.get(entity_id)


def test_classifier_writes_only_its_keys_with_the_versions_it_read(store: Store) -> None:
    read = _read_track(store, "t1", position=pb.PositionComponent(lat=1, lon=2),
                       velocity=pb.VelocityComponent(speed=500, heading=0),
                       classification=pb.ClassificationComponent(label="old", confidence=0.1))
    write = cl.plan_write(read)
    assert set(write.components) == {CLASSIFICATION, THREAT}
    assert write.versions[CLASSIFICATION] == read.versions[CLASSIFICATION]
    assert write.versions[THREAT] == pb.Version(node=ABSENT_NODE)  # absent when read: older than any write
    assert unpack(write, CLASSIFICATION, pb.ClassificationComponent).label == "very-fast-mover"
    assert unpack(write, THREAT, pb.ThreatComponent).level == H

    # Meanwhile the sensor moves the track and an operator reclassifies it.
    store.update(make_entity("t1", position=pb.PositionComponent(lat=1.5, lon=2.5)))
    store.update(make_entity("t1", classification=pb.ClassificationComponent(label="operator", confidence=1.0)))
    result = store.update(write)
    assert result.stale == [CLASSIFICATION] and result.applied == [THREAT]
    now = store.get("t1")
    assert unpack(now, CLASSIFICATION, pb.ClassificationComponent).label == "operator"  # kept, not clobbered
    assert (unpack(now, POSITION, pb.PositionComponent).lat, unpack(now, THREAT, pb.ThreatComponent).level) == (1.5, H)

    # A threat written by someone else after the read is stale too (absent-base rule).
    read2 = _read_track(store, "t2", velocity=pb.VelocityComponent(speed=10))
    store.update(make_entity("t2", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_MEDIUM)))
    assert store.update(cl.plan_write(read2)).stale == [THREAT]


def test_a_write_retried_after_an_outage_counts_its_event_once(store: Store) -> None:
    from meshstore.pb import store_pb2

    async def scenario() -> None:
        async with serving(store) as addr:
            classifier = cl.Classifier(addr, backoff=Backoff(0.01, 0.05))
            store.put(make_entity("t1", TRACK, velocity=pb.VelocityComponent(speed=500, heading=0)))
            ev = store_pb2.EntityEvent(type=store_pb2.EVENT_TYPE_CREATED, entity=store.get("t1"))
            job = classifier.prepare(ev)
            assert job is not None and classifier.counters["events"] == 1

            async def unavailable() -> None:
                raise StoreUnavailableError("connection refused")

            await classifier.until_done(ev, unavailable)  # retried: prepared anew, written
            assert classifier.counters["retries"] == 1
            assert classifier.counters["events"] == 1
            assert unpack(store.get("t1"), CLASSIFICATION, pb.ClassificationComponent).label == "very-fast-mover"
            await classifier.client.close()

    arun(scenario())


def test_classifier_skips_what_would_change_nothing(store: Store) -> None:
    read = _read_track(store, "t1", velocity=pb.VelocityComponent(speed=200))
    store.update(cl.plan_write(read))
    again = store.get("t1")
    assert cl.plan_write(again) is None
    # the speed changes band: a write again
    store.update(make_entity("t1", velocity=pb.VelocityComponent(speed=450)))
    assert cl.plan_write(store.get("t1")) is not None
    # nothing to classify from: no velocity, a velocity of another type, a non-finite speed
    assert cl.plan_write(make_entity("r", TRACK, position=pb.PositionComponent(lat=1, lon=1))) is None
    odd = make_entity("x", TRACK)
    odd.components[VELOCITY].CopyFrom(pack(pb.PositionComponent(lat=1)))
    assert cl.plan_write(odd) is None
    nan = make_entity("n", TRACK)
    nan.components[VELOCITY].CopyFrom(foreign(pb.VelocityComponent(speed=float("nan"))))
    assert cl.plan_write(nan) is None


# ---- task-manager -------------------------------------------------------------------------


def _tm_entity(level: int | None, approval: int | None = None, requested_at: float = 100.0,
               timeout: int = 30) -> pb.Entity:
    comps: dict[str, Any] = {}
    if level is not None:
        comps[THREAT] = pb.ThreatComponent(level=level)
    if approval is not None:
        comps[APPROVAL] = pb.ApprovalComponent(state=approval, timeout_seconds=timeout,
                                               requested_at=timestamp(requested_at))
    return make_entity("e", TRACK, **comps)


@pytest.mark.parametrize(("level", "approval", "task", "writes_approval", "timer"), [
    (pb.THREAT_LEVEL_UNSPECIFIED, None, "idle", None, tm.CANCEL),
    (pb.THREAT_LEVEL_NONE, None, "idle", None, tm.CANCEL),
    (pb.THREAT_LEVEL_LOW, None, "investigate", None, tm.CANCEL),
    (pb.THREAT_LEVEL_MEDIUM, None, "track", None, tm.CANCEL),
    (H, None, "track", pb.APPROVAL_STATE_PENDING, 200.0 + 30),
    (H, pb.APPROVAL_STATE_UNSPECIFIED, "track", pb.APPROVAL_STATE_PENDING, 200.0 + 30),
    (H, pb.APPROVAL_STATE_PENDING, "track", None, 100.0 + 30),
    (H, pb.APPROVAL_STATE_APPROVED, "intercept", None, tm.CANCEL),
    (H, pb.APPROVAL_STATE_AUTO_APPROVED, "intercept", None, tm.CANCEL),
    (H, pb.APPROVAL_STATE_DENIED, "idle", None, tm.CANCEL),
    (H, pb.APPROVAL_STATE_TIMED_OUT, "track", None, tm.CANCEL),
    # the threat dropped below HIGH: the request / decision is withdrawn
    (pb.THREAT_LEVEL_MEDIUM, pb.APPROVAL_STATE_PENDING, "track", pb.APPROVAL_STATE_UNSPECIFIED, tm.CANCEL),
    (pb.THREAT_LEVEL_LOW, pb.APPROVAL_STATE_APPROVED, "investigate", pb.APPROVAL_STATE_UNSPECIFIED, tm.CANCEL),
])
def test_task_manager_state_machine(level: int, approval: int | None, task: str, writes_approval: int | None,
                                    timer: Any) -> None:
    p = tm.plan(_tm_entity(level, approval), now=200.0, timeout=30)
    assert p.task == task
    assert (None if p.approval is None else p.approval.state) == writes_approval
    assert p.deadline == timer
    if writes_approval == pb.APPROVAL_STATE_PENDING:
        assert p.approval.timeout_seconds == 30
        assert p.approval.requested_at.seconds == 200


def test_task_write_carries_the_catalog_and_versions(store: Store) -> None:
    read = _read_track(store, "e", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW),
                       position=pb.PositionComponent(lat=1, lon=1))
    write = tm.task_write(read, tm.plan(read, 5.0, 30), 5.0)
    assert set(write.components) == {TASK, TASK_CATALOG}
    assert all(write.versions[k] == pb.Version(node=ABSENT_NODE) for k in write.components)
    store.update(write)
    after = store.get("e")
    assert unpack(after, TASK, pb.TaskComponent).state == "investigate"
    assert tuple(unpack(after, TASK_CATALOG, pb.TaskCatalogComponent).available_tasks) == tm.CATALOGS["investigate"]
    assert tm.task_write(after, tm.plan(after, 6.0, 30), 6.0) is None  # nothing changes: nothing written
    assert set(tm.CATALOGS) == {"idle", "investigate", "track", "intercept"}
    assert "intercept" in tm.CATALOGS["intercept"]


def test_unknown_threat_and_approval_values_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("meshstore.services.test")
    weird = make_entity("w", TRACK)
    weird.components[THREAT].CopyFrom(foreign(pb.ThreatComponent(level=42)))
    with caplog.at_level(logging.WARNING, "meshstore.services.test"):
        assert tm.plan(weird, 1.0, 30, log) is None
        odd = _tm_entity(H)
        odd.components[APPROVAL].CopyFrom(foreign(pb.ApprovalComponent(state=77)))
        assert tm.plan(odd, 1.0, 30, log) is None
    assert "unknown threat level" in caplog.text and "unknown approval state" in caplog.text
    assert tm.plan(make_entity("n", TRACK, position=pb.PositionComponent(lat=1, lon=1)), 1.0, 30) is None


def test_approval_strategy_decides_concurrent_timeout_and_decisions(make_store: Any) -> None:
    """What the task-manager relies on: a TIMED_OUT written over the version it read merges
    with a concurrent operator decision by the approval order (DENIED > TIMED_OUT > APPROVED)."""
    for decision, winner in ((pb.APPROVAL_STATE_DENIED, pb.APPROVAL_STATE_DENIED),
                             (pb.APPROVAL_STATE_APPROVED, pb.APPROVAL_STATE_TIMED_OUT)):
        a, b = make_store(node_id="tm"), make_store(node_id="op")
        a.create(_tm_entity(H, pb.APPROVAL_STATE_PENDING))
        for state in a.changes_since(0)[0]:
            b.merge(state)
        for s, state in ((a, pb.APPROVAL_STATE_TIMED_OUT), (b, decision)):
            read = s.get("e")
            w = make_entity("e", approval=pb.ApprovalComponent(state=state))
            w.versions[APPROVAL].CopyFrom(read.versions[APPROVAL])
            assert s.update(w).applied == [APPROVAL]
        for src, dst in ((a, b), (b, a)):
            for state in src.changes_since(0)[0]:
                dst.merge(state)
        assert unpack(a.get("e"), APPROVAL, pb.ApprovalComponent).state == winner
        assert unpack(b.get("e"), APPROVAL, pb.ApprovalComponent).state == winner


def _state(store: Store, entity_id: str) -> tuple[str | None, int | None, tuple[str, ...]]:
    try:
        e = store.get(entity_id)
    except NotFoundError:
        return None, None, ()
    task = unpack(e, TASK, pb.TaskComponent)
    approval = unpack(e, APPROVAL, pb.ApprovalComponent)
    catalog = unpack(e, TASK_CATALOG, pb.TaskCatalogComponent)
    return (task.state if task else None, approval.state if approval else None,
            tuple(catalog.available_tasks) if catalog else ())


def test_task_manager_over_grpc_with_a_fake_clock(store: Store) -> None:
    clock = FakeClock()
    loop = EventLoop("test-task-manager", clock=clock).start()

    async def scenario() -> None:
        async with serving(store) as addr:
            manager = tm.TaskManager(addr, approval_timeout=30, event_loop=loop, clock=clock)
            task = asyncio.create_task(manager.run())
            client = StoreClient(addr)
            high = {"threat": pb.ThreatComponent(level=H), "position": pb.PositionComponent(lat=1, lon=1)}
            for name in ("approve-me", "deny-me", "time-me-out", "delete-me", "calm-down"):
                store.put(make_entity(name, TRACK, **high))
            store.put(make_entity("low", TRACK, threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW)))
            store.put(make_entity("no-threat", TRACK, position=pb.PositionComponent(lat=1, lon=1)))
            pending = ("track", pb.APPROVAL_STATE_PENDING, tm.CATALOGS["track"])
            for name in ("approve-me", "deny-me", "time-me-out", "delete-me", "calm-down"):
                await eventually(lambda n=name: _state(store, n) == pending, what=f"{name} pending")
                await eventually(lambda n=name: loop.deadline(manager.timer_key(n)) == pytest.approx(clock.now + 30))
            await eventually(lambda: _state(store, "low") == ("investigate", None, tm.CATALOGS["investigate"]))
            assert _state(store, "no-threat") == (None, None, ())
            assert loop.pending() == 5

            await client.approve("approve-me")
            await eventually(lambda: _state(store, "approve-me") ==
                        ("intercept", pb.APPROVAL_STATE_APPROVED, tm.CATALOGS["intercept"]), what="intercept")
            await client.deny("deny-me")
            await eventually(lambda: _state(store, "deny-me") == ("idle", pb.APPROVAL_STATE_DENIED, tm.CATALOGS["idle"]))
            with pytest.raises(FailedPreconditionError):
                await client.approve("deny-me")  # nothing pending any more
            store.delete("delete-me")
            await eventually(lambda: loop.deadline(manager.timer_key("delete-me")) is None, what="timer cancelled")
            store.update(make_entity("calm-down", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_MEDIUM)))
            await eventually(lambda: _state(store, "calm-down") == ("track", pb.APPROVAL_STATE_UNSPECIFIED,
                                                              tm.CATALOGS["track"]), what="request withdrawn")
            assert loop.deadline(manager.timer_key("calm-down")) is None
            assert loop.pending() == 1  # only time-me-out's timer is left

            clock.advance(29)
            loop.wake()
            await asyncio.sleep(0.2)
            assert _state(store, "time-me-out")[1] == pb.APPROVAL_STATE_PENDING
            clock.advance(2)
            loop.wake()
            await eventually(lambda: _state(store, "time-me-out") == ("track", pb.APPROVAL_STATE_TIMED_OUT,
                                                                tm.CATALOGS["track"]), what="timed out")
            # The store shows the write before the manager has its answer (and counts it).
            await eventually(lambda: manager.counters["approvals_timed_out"] == 1, what="time-out counted")
            assert manager.keys_written <= {TASK, TASK_CATALOG, APPROVAL}
            await manager.stop()
            await task
            await client.close()
            assert loop.pending() == 0

    try:
        arun(scenario())
    finally:
        loop.stop()


def test_a_restarted_task_manager_rebuilds_its_timers(store: Store) -> None:
    clock = FakeClock()
    loop = EventLoop("test-task-manager-restart", clock=clock).start()
    # Requests a previous task-manager made: one due in 20 s, one overdue.
    store.put(_tm_entity(H, pb.APPROVAL_STATE_PENDING, requested_at=clock.now - 10, timeout=30))
    store.put(make_entity("overdue", TRACK, threat=pb.ThreatComponent(level=H),
                          approval=pb.ApprovalComponent(state=pb.APPROVAL_STATE_PENDING, timeout_seconds=5,
                                                        requested_at=timestamp(clock.now - 100))))

    async def scenario() -> None:
        async with serving(store) as addr:
            manager = tm.TaskManager(addr, approval_timeout=30, event_loop=loop, clock=clock)
            task = asyncio.create_task(manager.run())
            await eventually(lambda: _state(store, "overdue")[1] == pb.APPROVAL_STATE_TIMED_OUT, what="overdue timed out")
            await eventually(lambda: loop.deadline(manager.timer_key("e")) is not None, what="timer rebuilt")
            assert loop.deadline(manager.timer_key("e")) == pytest.approx(clock.now + 20, abs=1e-3)
            assert _state(store, "e")[1] == pb.APPROVAL_STATE_PENDING
            clock.advance(21)
            loop.wake()
            await eventually(lambda: _state(store, "e")[1] == pb.APPROVAL_STATE_TIMED_OUT, what="rebuilt timer fired")
            await manager.stop()
            await task

    try:
        arun(scenario())
    finally:
        loop.stop()


# ---- fusion -------------------------------------------------------------------------------


def _random_tracks(seed: int, n: int, lat: tuple[float, float], lon: tuple[float, float],
                   kinds: tuple[str, ...] = ("eo", "radar")) -> list[Obs]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if out and rng.random() < 0.5:  # half near an earlier track, so pairs exist
            base = rng.choice(out)
            la, lo = offset_position(base.lat, base.lon, rng.gauss(0, 300), rng.gauss(0, 300))
            la = max(-90.0, min(90.0, la))
        else:
            la, lo = rng.uniform(*lat), rng.uniform(*lon)
        out.append(Obs(f"t{i}", rng.choice(kinds), la, lo))
    return out


@pytest.mark.parametrize(("seed", "lat", "lon"), [
    (1, (50.0, 50.2), (0.0, 0.3)),
    (2, (-10.0, -9.9), (179.9, 180.0)),  # across the antimeridian
    (3, (89.0, 89.999), (-180.0, 180.0)),  # near the pole: wide longitude cells
    (4, (0.0, 1.0), (-1.0, 1.0)),
])
def test_grid_correlation_equals_brute_force(seed: int, lat: tuple, lon: tuple) -> None:
    tracks = _random_tracks(seed, 600, lat, lon, ("eo", "radar", "ais"))
    for max_distance in (100.0, 500.0, 2000.0):
        grid = candidate_pairs_grid(tracks, max_distance)
        assert grid == candidate_pairs_brute(tracks, max_distance)
        assert all(tracks[i].sensor_type != tracks[j].sensor_type for _, i, j in grid)
    assert len(candidate_pairs_grid(tracks, 500.0)) > 20
    a, b = Correlator(500.0), Correlator(500.0)
    for t in tracks:
        a.upsert(t)
        b.upsert(t)
    assert a.correlate().fused == b.correlate(brute=True).fused


def test_fused_id_is_stable_and_distinct() -> None:
    assert fused_id(["radar-1", "eo-1"]) == fused_id(("eo-1", "radar-1")) == fused_id({"radar-1", "eo-1"})
    assert fused_id(["eo-1", "radar-2"]) != fused_id(["eo-1", "radar-1"])
    assert fused_id(["a", "bc"]) != fused_id(["ab", "c"])
    assert fused_id(["x"]).startswith("fused-") and len(fused_id(["x"])) == len("fused-") + 16
    assert fused_id(["eo-3", "radar-3"]) == "fused-" + __import__("hashlib").sha1(b"eo-3\x1fradar-3").hexdigest()[:16]


def test_fusion_weights_sources_by_accuracy() -> None:
    c = Correlator(500.0, sigmas={"eo": 10.0, "radar": 50.0})
    c.upsert(Obs("eo-1", "eo", 50.0, 1.0, 100.0))
    lat, lon = offset_position(50.0, 1.0, 100.0, 0.0)
    c.upsert(Obs("radar-1", "radar", lat, lon, 200.0))
    [(fid, f)] = c.correlate().fused.items()
    assert fid == fused_id(["eo-1", "radar-1"]) and f.source_ids == ("eo-1", "radar-1")
    w_eo, w_radar = 1 / 10**2, 1 / 50**2
    # 100 m apart: the fused point is 100 * w_radar / (w_eo + w_radar) = 3.85 m from the EO track
    assert distance_m(50.0, 1.0, f.lat, f.lon) == pytest.approx(100 * w_radar / (w_eo + w_radar), rel=1e-3)
    assert f.alt == pytest.approx((100 * w_eo + 200 * w_radar) / (w_eo + w_radar))
    assert f.sigma_m == pytest.approx(1 / math.sqrt(w_eo + w_radar))
    assert f.confidence == pytest.approx(round(1 - 100 / 750, 2))
    assert parse_sigmas("eo=10, radar=50 ,ais=20") == {"eo": 10.0, "radar": 50.0, "ais": 20.0}
    for bad in ("eo", "eo=x", "eo=-1", "=5", "eo=nan"):
        with pytest.raises(ValueError):
            parse_sigmas(bad)


def test_fusion_decorrelates_with_hysteresis_and_cascades_deletes() -> None:
    c = Correlator(500.0, hysteresis=1.5)

    def place(metres: float) -> None:
        c.upsert(Obs("eo-1", "eo", 10.0, 10.0))
        lat, lon = offset_position(10.0, 10.0, 0.0, metres)
        c.upsert(Obs("radar-1", "radar", lat, lon))

    place(700.0)  # beyond the distance: no pair forms
    assert c.correlate().fused == {}
    place(400.0)
    fid = next(iter(c.correlate().fused))
    place(700.0)  # 1.4x: kept (hysteresis)
    result = c.correlate()
    assert list(result.fused) == [fid] and result.removed == []
    place(800.0)  # 1.6x: split
    result = c.correlate()
    assert result.fused == {} and result.removed == [fid]
    place(100.0)
    assert list(c.correlate().fused) == [fid]  # the same pair, the same id
    assert c.remove("radar-1") == [fid]  # cascade
    assert c.correlate().fused == {} and c.groups == {}


def test_fusion_pairs_closest_first_one_track_per_sensor_type() -> None:
    c = Correlator(500.0)
    c.upsert(Obs("eo-1", "eo", 0.0, 0.0))
    for name, metres in (("radar-far", 300.0), ("radar-near", 50.0)):
        lat, lon = offset_position(0.0, 0.0, metres, 0.0)
        c.upsert(Obs(name, "radar", lat, lon))
    lat, lon = offset_position(0.0, 0.0, 0.0, 100.0)
    c.upsert(Obs("ais-1", "ais", lat, lon))
    fused = c.correlate().fused
    assert [f.source_ids for f in fused.values()] == [("ais-1", "eo-1", "radar-near")]


def _track(entity_id: str, kind: str | None, lat: float | None, lon: float | None = 0.0) -> pb.Entity:
    e = make_entity(entity_id, TRACK)
    if kind is not None:
        e.components[SOURCE].CopyFrom(pack(pb.SourceComponent(sensor_id=f"{kind}-1", sensor_type=kind)))
    if lat is not None:
        e.components[POSITION].CopyFrom(pack(pb.PositionComponent(lat=lat, lon=lon)))
    return e


def test_fusion_ignores_non_finite_positions_and_tracks_without_position_or_source(
        caplog: pytest.LogCaptureFixture) -> None:
    fusion = Fusion("127.0.0.1:1")  # never run: only its handling of entities
    with caplog.at_level(logging.WARNING, "meshstore.services.fusion"):
        fusion.take_listed(_track("eo-1", "eo", 10.0, 10.0))
        fusion.take_listed(_track("eo-1", "eo", float("nan"), 10.0))
        fusion.take_listed(_track("eo-1", "eo", 10.0, float("inf")))
        fusion.take_listed(_track("eo-2", "eo", float("-inf"), 1.0))
        fusion.take_listed(_track("eo-3", "eo", 95.0, 1.0))  # out of range
        fusion.take_listed(_track("no-source", None, 10.0, 10.0))
        fusion.take_listed(_track("no-position", "radar", None))
        odd = _track("odd", "radar", None)
        odd.components[POSITION].CopyFrom(pack(pb.VelocityComponent(speed=1)))
        fusion.take_listed(odd)
    assert set(fusion.correlator.tracks) == {"eo-1"}
    assert fusion.correlator.tracks["eo-1"].lat == 10.0  # the last valid position stands
    assert caplog.text.count("non-finite or out-of-range position") == 3  # once per entity, not per update
    assert "unexpected type" in caplog.text
    # A fused entity (a restart) is adopted, not correlated.
    fused = make_entity(fused_id(["eo-1", "radar-1"]), TRACK,
                        fusion=pb.FusionComponent(source_ids=["eo-1", "radar-1"]),
                        position=pb.PositionComponent(lat=10, lon=10))
    fusion.take_listed(fused)
    assert fusion.correlator.groups == {fused.id: ("eo-1", "radar-1")}
    assert fusion.correlator.correlate().removed == [fused.id]  # radar-1 is not there: dissolved


def test_correlator_refuses_bad_settings() -> None:
    for kwargs, why in (({"max_distance": 0.0}, "max distance must be > 0 metres"),
                        ({"max_distance": float("nan")}, "max distance must be > 0 metres"),
                        ({"max_distance": "far"}, "must be numbers"),
                        ({"hysteresis": 0.9}, "hysteresis must be >= 1")):
        with pytest.raises(ValueError, match=why):
            Fusion("127.0.0.1:1", **kwargs)


def test_correlator_refuses_a_track_without_a_valid_position() -> None:
    c = Correlator(500.0)
    c.upsert(Obs("eo-1", "eo", 10.0, 10.0))
    for lat, lon, alt in ((float("nan"), 1.0, 0.0), (95.0, 1.0, 0.0), (1.0, float("inf"), 0.0), (1.0, 1.0, float("nan"))):
        with pytest.raises(ValueError, match="not finite or out of range"):
            c.upsert(Obs("eo-1", "eo", lat, lon, alt))
    assert c.tracks == {"eo-1": Obs("eo-1", "eo", 10.0, 10.0)}
    tiny = Correlator(1e-300)  # cells at the edge of the grid's integers: no overflow
    tiny.upsert(Obs("eo-1", "eo", 10.0, 10.0))
    tiny.upsert(Obs("radar-1", "radar", 10.0, 10.0))
    assert list(tiny.correlate().fused) == [fused_id(["eo-1", "radar-1"])]


def test_fusion_refuses_a_watch_batch_that_does_not_parse_and_keeps_its_state(
        caplog: pytest.LogCaptureFixture) -> None:
    fusion = Fusion("127.0.0.1:1")  # never run: its intake only
    fusion.take_listed(_track("eo-1", "eo", 10.0, 10.0))
    before = fusion.correlator.tracks
    nested = b"\x0a\x7f" + b"\x12\x7d" * 60  # an event whose entity claims more bytes than there are
    with caplog.at_level(logging.ERROR, "meshstore.services.fusion"):
        for garbage in (b"\xff\xff\xff", nested, b"\x0a\x03\x12\x01\xff"):
            fusion.take_batch(garbage)
    assert fusion.counters["bad_batches"] == 3 and caplog.text.count("watch batch does not parse") == 3
    assert fusion.correlator.tracks == before and fusion.counters["events"] == 0


# ---- client -------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    b = Backoff(initial=0.1, maximum=2.0, multiplier=2.0, jitter=0.5)
    delays = [d for d, _ in zip(b.delays(random.Random(3)), range(10), strict=False)]
    assert delays == [d for d, _ in zip(b.delays(random.Random(3)), range(10), strict=False)]
    for k, d in enumerate(delays):
        top = min(2.0, 0.1 * 2**k)
        assert top * 0.5 <= d <= top
    assert len(set(delays)) == len(delays)  # jittered
    assert Backoff(jitter=0).delay(100) == 5.0
    with pytest.raises(ValueError):
        Backoff(initial=0)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details", "cls"), [
    (grpc.StatusCode.UNAVAILABLE, "connection refused", StoreUnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "", StoreUnavailableError),
    (grpc.StatusCode.NOT_FOUND, "entity 'x' not found", NotFoundError),
    (grpc.StatusCode.ALREADY_EXISTS, "x", AlreadyExistsError),
    (grpc.StatusCode.INVALID_ARGUMENT, "bad", InvalidEntityError),
    (grpc.StatusCode.ABORTED, "stale", StaleWriteError),
    (grpc.StatusCode.FAILED_PRECONDITION, "no pending approval", FailedPreconditionError),
    (grpc.StatusCode.OUT_OF_RANGE, "cursor 5 is older than a collected tombstone", CursorExpiredError),
    (grpc.StatusCode.OUT_OF_RANGE, "version 2.1s ahead of the clock", ClockSkewError),
    (grpc.StatusCode.INTERNAL, "boom", RpcError),
])
def test_grpc_errors_map_to_meshstore_errors(code: grpc.StatusCode, details: str, cls: type) -> None:
    err = error_from_rpc(_FakeRpcError(code, details), "GetEntity", "127.0.0.1:1")
    assert type(err) is cls
    assert details in str(err)


def test_client_helpers_over_grpc(store: Store) -> None:
    async def scenario() -> None:
        async with serving(store) as addr, StoreClient(addr, name="t") as client:
            info = await client.wait_ready(timeout=5)
            assert info.node_id == store.node_id
            await client.create(make_entity("a", TRACK, position=pb.PositionComponent(lat=1, lon=2)))
            with pytest.raises(AlreadyExistsError):
                await client.create(make_entity("a", TRACK))
            got = await client.get("a")
            assert POSITION in got.versions
            w = make_entity("a", position=pb.PositionComponent(lat=3, lon=4))
            w.versions[POSITION].CopyFrom(got.versions[POSITION])
            assert (await client.update(w)).applied == [POSITION]
            assert (await client.update(w)).stale == [POSITION]
            with pytest.raises(StaleWriteError):
                await client.update(w, strict=True)
            await client.put(make_entity("b", TRACK))
            with pytest.raises(InvalidEntityError):
                await client.put(make_entity("c", TRACK, position=pb.PositionComponent(lat=float("nan"))))
            assert [e.id for e in await client.list(TRACK)] == ["a", "b"]
            await client.delete("b")
            with pytest.raises(NotFoundError):
                await client.get("b")
        # Nothing listening: unavailable, and wait_ready gives up after its timeout.
        async with StoreClient("127.0.0.1:1", backoff=Backoff(0.01, 0.05)) as dead:
            with pytest.raises(StoreUnavailableError):
                await dead.get("a")
            with pytest.raises(TimeoutError):
                await dead.wait_ready(timeout=0.3)

    arun(scenario())


# ---- commands -----------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    service_commands.register(app)
    demo_commands.register(app)
    return app


@pytest.mark.parametrize(("command", "needles"), [
    ("sensor-sim", ["--bbox-min-lat", "MESHSTORE_BBOX_MAX_LON", "--rate", "--count", "--speed-min", "--speed-max", "--seed",
                    "MESHSTORE_ADDR", "dead reckoning"]),
    ("radar-sim", ["--noise", "MESHSTORE_RADAR_NOISE_M", "MESHSTORE_BBOX_MIN_LAT", "same seed"]),
    ("classifier", ["--low", "--medium", "--high", "MESHSTORE_CLASSIFIER_HIGH_KTS", "ONLY those two keys"]),
    ("task-manager", ["--approval-timeout", "MESHSTORE_APPROVAL_TIMEOUT", "meshstore approve ID", "intercept"]),
    ("fusion", ["--max-distance", "MESHSTORE_FUSION_MAX_DISTANCE_M", "--sigma", "--hysteresis", "spatial grid"]),
    ("demo", ["--duration", "--port", "--tracks", "--rate", "--seed", "--no-live", "meshstore approve ID"]),
])
def test_commands_explain_themselves(command: str, needles: list[str]) -> None:
    result = CliRunner().invoke(_app(), [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, f"{command} --help lacks {needle!r}"


def test_commands_refuse_bad_input_before_connecting() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["sensor-sim", "--bbox-min-lat", "60", "--bbox-max-lat", "50"])
    assert result.exit_code == 2 and "bbox latitudes" in result.output
    result = runner.invoke(_app(), ["fusion", "--sigma", "eo=fast"])
    assert result.exit_code == 2 and "not a number" in result.output
    for option, value, why in (("--max-distance", "0", "Invalid value"), ("--hysteresis", "0.5", "Invalid value"),
                               ("--max-distance", "nan", "max distance must be > 0 metres")):  # past the range check
        result = runner.invoke(_app(), ["fusion", option, value])
        assert result.exit_code == 2 and why in result.output and "Traceback" not in result.output
    result = runner.invoke(_app(), ["classifier", "--low", "500"])
    assert result.exit_code == 2 and "0 < low < medium < high" in result.output
    result = runner.invoke(_app(), ["radar-sim", "--speed-min", "900", "--speed-max", "10"], env={"MESHSTORE_BBOX_MIN_LAT": "x"})
    assert result.exit_code == 2
