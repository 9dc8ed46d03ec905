"""The pipeline end to end: a real node (gRPC server) on 127.0.0.1:0 (in-process), the sims,
classifier, task-manager and fusion talking to it over gRPC, approvals through the real
``meshstore`` CLI in a subprocess; then bad input and a store that goes away mid-run.

Fast ticks (10/s), seeded scenarios, polling with timeouts (no fixed sleeps for results).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import any_pb2

from conftest import eventually
from meshstore import Store
from meshstore.components import (
    APPROVAL, CLASSIFICATION, FUSION, POSITION, SOURCE, TASK, TASK_CATALOG, THREAT, make_entity, unpack,
)
from meshstore.errors import InvalidEntityError, NotFoundError
from meshstore.eventloop import EventLoop
from meshstore.grpc.client import Backoff, StoreClient
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.services import Service
from meshstore.services.classifier import Classifier, classify
from meshstore.services.fusion import Fusion, distance_m, fused_id
from meshstore.services.radar_sim import RadarSim
from meshstore.services.scenario import SCENARIO_EPOCH, Scenario, offset_position
from meshstore.services.sensor_sim import SensorSim
from meshstore.services.task_manager import CATALOGS, TaskManager

pytestmark = pytest.mark.timeout(90)

TRACK = pb.ENTITY_TYPE_TRACK
RATE = 10.0
FAST = Backoff(initial=0.05, maximum=0.5)


def component(store: Store, entity_id: str, key: str, cls: type) -> Any:
    try:
        return unpack(store.get(entity_id), key, cls)
    except NotFoundError:
        return None


def task_state(store: Store, entity_id: str) -> tuple[str | None, int | None, tuple[str, ...]]:
    task = component(store, entity_id, TASK, pb.TaskComponent)
    approval = component(store, entity_id, APPROVAL, pb.ApprovalComponent)
    catalog = component(store, entity_id, TASK_CATALOG, pb.TaskCatalogComponent)
    return (task.state if task else None, approval.state if approval else None,
            tuple(catalog.available_tasks) if catalog else ())


def manual(entity_id: str, lat: float, lon: float, *, speed: float | None = None, kind: str = "eo") -> pb.Entity:
    comps: dict[str, Any] = {"position": pb.PositionComponent(lat=lat, lon=lon),
                             "source": pb.SourceComponent(sensor_id=f"manual-{kind}", sensor_type=kind)}
    if speed is not None:
        comps["velocity"] = pb.VelocityComponent(speed=speed, heading=90)
    return make_entity(entity_id, TRACK, **comps)


async def cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meshstore.cli", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode()


class Running:
    """Services started as tasks; ``stop`` stops them all and re-raises a service failure."""

    def __init__(self) -> None:
        self.tasks: dict[Service, asyncio.Task] = {}

    def start(self, *services: Service) -> None:
        for s in services:
            self.tasks[s] = asyncio.create_task(s.run(), name=s.name)

    def assert_alive(self) -> None:
        for s, t in self.tasks.items():
            assert not t.done(), f"{s.name} ended: {t.exception() if not t.cancelled() else 'cancelled'}"

    async def stop(self, *services: Service) -> None:
        for s in services or list(self.tasks):
            await s.stop()
            task = self.tasks.pop(s)
            await task  # raises if the service failed


@contextlib.asynccontextmanager
async def pipeline_server(store: Store, port: int = 0) -> AsyncIterator[Any]:
    async with Node(store=store, port=port, grace=0.2) as node:
        yield node


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {}) or {}
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()} "
                          + " ".join(f"{k}={v}" for k, v in fields.items()))

    def has(self, *fragments: str) -> bool:
        return any(all(f in line for f in fragments) for line in self.lines)


@contextlib.contextmanager
def captured_logs() -> Any:
    records = Records()
    logger = logging.getLogger("meshstore")
    old_level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)


def test_pipeline_end_to_end(make_store: Any) -> None:
    store = make_store(node_id="pipeline")
    scenario = Scenario(seed=21, count=6)
    timers = EventLoop("test-pipeline").start()

    async def run() -> None:
        async with pipeline_server(store) as server:
            addr = server.address
            sensor = SensorSim(addr, scenario, rate=RATE, backoff=FAST)
            radar = RadarSim(addr, scenario, rate=RATE, noise_m=20, backoff=FAST)
            classifier = Classifier(addr, backoff=FAST)
            manager = TaskManager(addr, approval_timeout=30, event_loop=timers, backoff=FAST)
            fusion = Fusion(addr, max_distance=300, interval=0.2, backoff=FAST)
            running = Running()
            watcher = store.watch(TRACK)  # everything the store emits, to check positions afterwards
            first_tick = int(time.time() * RATE)
            running.start(sensor, radar, classifier, manager, fusion)
            client = StoreClient(addr, backoff=FAST)

            # Tracks appear and the EO ones are classified by their speed.
            eo_ids = [f"eo-{i}" for i in range(scenario.count)]
            radar_ids = [f"radar-{i}" for i in range(scenario.count)]
            await eventually(lambda: all(component(store, i, SOURCE, pb.SourceComponent) for i in eo_ids + radar_ids),
                        what="tracks created")
            expected = {f"eo-{s.index}": classify(s.speed_kts) for s in scenario.states(0)}

            def classified() -> bool:
                for i, want in expected.items():
                    got = component(store, i, CLASSIFICATION, pb.ClassificationComponent)
                    threat = component(store, i, THREAT, pb.ThreatComponent)
                    if got is None or threat is None or (got.label, threat.level) != (want.label, want.level):
                        return False
                return True
            await eventually(classified, what="every EO track classified")
            assert all(component(store, i, CLASSIFICATION, pb.ClassificationComponent) is None for i in radar_ids)

            # EO and radar tracks of the same target are fused (20 m noise, 300 m gate).
            def fused_pairs() -> set[tuple[str, ...]]:
                return {tuple(unpack(e, FUSION, pb.FusionComponent).source_ids)
                        for e in store.list(TRACK) if FUSION in e.components}
            await eventually(lambda: len(fused_pairs() & {(f"eo-{i}", f"radar-{i}") for i in range(6)}) >= 5,
                        what="EO/radar pairs fused")

            # A fast track reaches PENDING; the CLI approves one and denies another.
            store.put(manual("fast-approve", 10.0, 10.0, speed=900))
            store.put(manual("fast-deny", 10.0, 10.2, speed=900))
            pending = ("track", pb.APPROVAL_STATE_PENDING, CATALOGS["track"])
            for name in ("fast-approve", "fast-deny"):
                await eventually(lambda n=name: task_state(store, n) == pending, what=f"{name} pending")
            code, out = await cli("approve", "fast-approve", "--store", addr)
            assert code == 0, out
            await eventually(lambda: task_state(store, "fast-approve") ==
                        ("intercept", pb.APPROVAL_STATE_APPROVED, CATALOGS["intercept"]), what="intercept")
            code, out = await cli("deny", "fast-deny", "--store", addr)
            assert code == 0, out
            await eventually(lambda: task_state(store, "fast-deny") == ("idle", pb.APPROVAL_STATE_DENIED, CATALOGS["idle"]),
                        what="denied -> idle")

            # Co-located EO and radar tracks: one fused entity, cascade-deleted with a source.
            lat, lon = offset_position(20.0, 20.0, 40.0, 0.0)
            store.put(manual("co-eo", 20.0, 20.0))
            store.put(manual("co-radar", lat, lon, kind="radar"))
            fid = fused_id(["co-eo", "co-radar"])
            fusion_c = await eventually(lambda: component(store, fid, FUSION, pb.FusionComponent), what="co-located fused")
            assert list(fusion_c.source_ids) == ["co-eo", "co-radar"]
            assert distance_m(20.0, 20.0, fusion_c.fused_lat, fusion_c.fused_lon) < 5.0  # weighted toward EO
            assert [e.id for e in store.list(TRACK) if FUSION in e.components
                    and "co-eo" in unpack(e, FUSION, pb.FusionComponent).source_ids] == [fid]
            await client.delete("co-eo")
            await eventually(lambda: component(store, fid, FUSION, pb.FusionComponent) is None, what="cascade delete")
            passes = fusion.counters["passes"]
            await eventually(lambda: fusion.counters["passes"] >= passes + 3, what="more fusion passes")
            assert component(store, fid, FUSION, pb.FusionComponent) is None  # and it stays deleted
            # ... and when a source expires (its TTL passes: a DELETED event too).
            store.put(manual("ttl-eo", 21.0, 21.0))
            store.put(manual("ttl-radar", 21.0, 21.0001, kind="radar"))
            fid2 = fused_id(["ttl-eo", "ttl-radar"])
            await eventually(lambda: component(store, fid2, FUSION, pb.FusionComponent), what="second pair fused")
            store.set_ttl("ttl-radar", 0.3)
            await eventually(lambda: component(store, fid2, FUSION, pb.FusionComponent) is None, what="cascade on expiry")
            assert component(store, "ttl-eo", SOURCE, pb.SourceComponent) is not None

            # Restart the task-manager with a 1 s timeout: it rebuilds the pending timer of
            # a request made by the first one (30 s), and times out a new request.
            store.put(manual("fast-pending", 10.0, 10.4, speed=900))
            await eventually(lambda: task_state(store, "fast-pending") == pending, what="fast-pending pending")
            requested = component(store, "fast-pending", APPROVAL, pb.ApprovalComponent).requested_at
            await running.stop(manager)
            manager2 = TaskManager(addr, approval_timeout=1, event_loop=timers, backoff=FAST)
            running.start(manager2)
            await eventually(lambda: timers.deadline(manager2.timer_key("fast-pending")), what="timer rebuilt")
            assert timers.deadline(manager2.timer_key("fast-pending")) == pytest.approx(
                requested.seconds + requested.nanos / 1e9 + 30, abs=1e-3)
            store.put(manual("fast-timeout", 10.0, 10.6, speed=900))
            await eventually(lambda: task_state(store, "fast-timeout")[1] == pb.APPROVAL_STATE_PENDING)
            assert component(store, "fast-timeout", APPROVAL, pb.ApprovalComponent).timeout_seconds == 1
            await eventually(lambda: task_state(store, "fast-timeout") == ("track", pb.APPROVAL_STATE_TIMED_OUT,
                                                                     CATALOGS["track"]), timeout=5, what="timed out")
            assert task_state(store, "fast-pending")[1] == pb.APPROVAL_STATE_PENDING

            # Sensor positions keep advancing; nobody else ever wrote one.
            before = component(store, "eo-0", POSITION, pb.PositionComponent)
            await eventually(lambda: component(store, "eo-0", POSITION, pb.PositionComponent) != before,
                        what="positions advance")
            running.assert_alive()
            await running.stop()
            await client.close()
            last_tick = int(time.time() * RATE) + 1

            assert classifier.keys_written == {CLASSIFICATION, THREAT}
            assert manager.keys_written <= {TASK, TASK_CATALOG, APPROVAL}
            assert manager2.keys_written <= {TASK, TASK_CATALOG, APPROVAL}
            # Every position an EO track ever showed is the ground truth at a tick, and
            # the ticks only move forward: no write ever put an older position back.
            truth = {}
            for tick in range(first_tick - 2, last_tick + 2):
                for s in scenario.states(tick / RATE - SCENARIO_EPOCH):
                    truth[(f"eo-{s.index}", s.lat, s.lon)] = tick
            seen: dict[str, list[int]] = {}
            for ev in watcher.drain():
                if ev.entity_id in expected and ev.type != 3:
                    p = unpack(ev.entity, POSITION, pb.PositionComponent)
                    tick = truth.get((ev.entity_id, p.lat, p.lon))
                    assert tick is not None, f"{ev.entity_id} showed a position that is no sensor report"
                    seen.setdefault(ev.entity_id, []).append(tick)
            watcher.close()
            assert set(seen) == set(expected)
            for entity_id, ticks in seen.items():
                assert ticks == sorted(ticks), f"{entity_id} went back in time"
                assert len(set(ticks)) > 5

    try:
        asyncio.run(asyncio.wait_for(run(), 80))
    finally:
        timers.stop()


def test_services_log_each_track_at_debug_and_their_progress_at_info(make_store: Any) -> None:
    """A burst of new tracks must not flood an INFO log: what a service did to one track
    is a DEBUG line; INFO gets one ``progress`` line per period with what changed."""
    store = make_store(node_id="progress")

    async def run() -> None:
        with captured_logs() as logs:
            async with pipeline_server(store) as server:
                classifier = Classifier(server.address, backoff=FAST)
                classifier.progress_every = 0.2
                running = Running()
                running.start(classifier)
                for i in range(5):
                    store.put(manual(f"t{i}", 10.0 + i, 10.0, speed=60 * (i + 1)))
                def progress() -> list[str]:
                    return [line for line in logs.lines if " INFO progress " in line]
                await eventually(lambda: sum(int(line.split("writes=")[1].split()[0]) for line in progress()
                                             if "writes=" in line) == 5, what="progress lines adding up to 5 writes")
                assert any("lag_ms_p99=" in line for line in progress())
                await asyncio.sleep(5 * classifier.progress_every)  # the echoes of its writes come in
                reported = len(progress())
                await asyncio.sleep(3 * classifier.progress_every)
                assert len(progress()) == reported, "a progress line without news"
                await running.stop(classifier)
        info = [line for line in logs.lines if line.startswith("meshstore.services.classifier INFO")]
        assert not any(" classified " in line for line in info), info
        assert sum(logs.has("DEBUG classified", f"entity_id=t{i}") for i in range(5)) == 5

    asyncio.run(run())


def test_bad_input_and_a_store_that_goes_away(make_store: Any) -> None:
    store = make_store(node_id="outage")
    scenario = Scenario(seed=5, count=3)
    timers = EventLoop("test-outage").start()

    def foreign(message: Any) -> any_pb2.Any:  # a type URL the store does not validate
        return any_pb2.Any(type_url=f"meshstore.test/{message.DESCRIPTOR.full_name}",
                           value=message.SerializeToString())

    async def run() -> None:
        with captured_logs() as logs:
            server = await Node(store=store).start()
            port, addr = server.port, server.address
            sensor = SensorSim(addr, scenario, rate=RATE, backoff=FAST)
            classifier = Classifier(addr, backoff=FAST)
            manager = TaskManager(addr, approval_timeout=30, event_loop=timers, backoff=FAST)
            fusion = Fusion(addr, max_distance=300, interval=0.2, backoff=FAST)
            running = Running()
            running.start(sensor, classifier, manager, fusion)
            client = StoreClient(addr, backoff=FAST)
            await eventually(lambda: component(store, "eo-2", CLASSIFICATION, pb.ClassificationComponent),
                        what="pipeline up")

            # Bad input: no position, no source, non-finite values, unknown threat values.
            no_position = make_entity("no-position", TRACK, velocity=pb.VelocityComponent(speed=50),
                                      source=pb.SourceComponent(sensor_id="x", sensor_type="eo"))
            store.put(no_position)
            store.put(make_entity("no-source", TRACK, position=pb.PositionComponent(lat=30, lon=30)))
            with pytest.raises(InvalidEntityError):  # the store itself refuses NaN positions
                await client.put(manual("nan", float("nan"), 30.0))
            nan_eo = manual("nan-eo", 30.0, 30.0)
            nan_eo.components[POSITION].CopyFrom(foreign(pb.PositionComponent(lat=float("nan"), lon=30.0)))
            store.put(nan_eo)
            store.put(manual("nan-partner", 30.0, 30.0, kind="radar"))
            weird = manual("weird-threat", 40.0, 40.0)
            weird.components[THREAT].CopyFrom(foreign(pb.ThreatComponent(level=42)))
            store.put(weird)
            await eventually(lambda: logs.has("fusion", "non-finite", "nan-eo"), what="NaN warning")
            await eventually(lambda: logs.has("unknown threat level", "weird-threat"), what="unknown threat warning")
            await eventually(lambda: task_state(store, "no-position")[0] == "investigate", what="no-position classified")
            passes = fusion.counters["passes"]
            await eventually(lambda: fusion.counters["passes"] >= passes + 3)
            fused_sources = [unpack(e, FUSION, pb.FusionComponent).source_ids
                             for e in store.list(TRACK) if FUSION in e.components]
            assert not any({"nan-eo", "nan-partner", "no-source", "no-position"} & set(s) for s in fused_sources)
            assert task_state(store, "weird-threat") == (None, None, ())
            assert component(store, "no-source", CLASSIFICATION, pb.ClassificationComponent) is None
            running.assert_alive()

            # The store goes away: services keep running, log, and retry with backoff.
            resumes = classifier.stream.resumes
            await server.stop(0)
            outage_started = time.monotonic()
            await eventually(lambda: logs.has("store unavailable") and logs.has("watch interrupted"), what="outage logged")
            await asyncio.sleep(0.5)  # an outage of some length, with retries
            running.assert_alive()
            position = component(store, "eo-0", POSITION, pb.PositionComponent)

            # ... and comes back on the same port: everyone reconnects and resumes.
            server = await Node(store=store, port=port).start()
            try:
                await eventually(lambda: component(store, "eo-0", POSITION, pb.PositionComponent) != position,
                            what="the sensor publishes again")
                store.put(manual("after-restart", 45.0, 45.0, speed=200))
                await eventually(lambda: task_state(store, "after-restart")[0] == "track", what="new track handled")
                assert component(store, "after-restart", THREAT, pb.ThreatComponent).level == pb.THREAT_LEVEL_MEDIUM
                lat, lon = offset_position(46.0, 46.0, 20.0, 0.0)
                store.put(manual("late-eo", 46.0, 46.0))
                store.put(manual("late-radar", lat, lon, kind="radar"))
                await eventually(lambda: component(store, fused_id(["late-eo", "late-radar"]), FUSION, pb.FusionComponent),
                            what="fusion resumed")
                assert classifier.stream.resumes > resumes and classifier.stream.resets == 0  # resumed, not re-snapshot
                assert manager.stream.resumes >= 1 and fusion.stream.resumes >= 1
                assert logs.has("store reachable again") and logs.has("watch resumed", "since_seq=")
                assert time.monotonic() - outage_started < 30
                running.assert_alive()
                await running.stop()
                await client.close()
            finally:
                await server.stop(0.2)

    try:
        asyncio.run(asyncio.wait_for(run(), 80))
    finally:
        timers.stop()
