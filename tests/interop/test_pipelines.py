"""The seed system's Go services (unchanged) writing to and consuming from
``meshstore serve``, alone and mixed with meshstore's own services, and the seed's
read-modify-write scenario with an old client.

What every pipeline must reach, whoever runs which part:
- every track with a velocity (the only ones either classifier can classify: radar
  plots and fused tracks carry no speed, in both systems) has classification, threat
  and task components;
- tracks of both sensors get fused (an entity with a fusion component);
- every HIGH track is PENDING approval; ``lattice-cli approve`` moves one to APPROVED
  and ``meshstore get`` shows it, with the intercept task.

The seed's task-manager keeps its approval gate in its own memory (its store answers
ApproveAction with UNIMPLEMENTED) and writes only a task catalog, for non-NONE threats:
the approval state an operator acts on is what meshstore's task-manager writes, so it
runs in every pipeline, next to the Go task-manager when that one runs.
"""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest

from conftest import Interop, Proc, entities, eventually, meshstore_get, ok
from meshstore.components import (
    APPROVAL, CLASSIFICATION, FUSION, POSITION, TASK, THREAT, VELOCITY, unpack,
)
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from test_cli import TIMEOUT, Served

pytestmark = pytest.mark.timeout(180)

RUN_SECONDS = 20.0
# The Go sims draw each track's speed from 100-500 kn with a fresh random seed, and every
# pipeline needs a HIGH track (above 350 kn): with 20 tracks none is that fast once in
# about 12,000 runs (0.625^20); with 12 it was once in 280.
TRACKS = 20
GO_LABELS = {"civilian", "aircraft", "military"}  # the seed classifier's
MESHSTORE_LABELS = {"slow-mover", "mover", "fast-mover", "very-fast-mover"}
# meshstore's classifier with the seed's bands (HIGH above 350 kn).
MESHSTORE_CLASSIFIER = ("--low", "150", "--medium", "250", "--high", "350")
# meshstore's sims over the seed's speed range and box, same scenario seed.
MESHSTORE_SIM = ("--count", str(TRACKS), "--rate", "2", "--seed", "7", "--speed-min", "100", "--speed-max", "500",
                 "--bbox-min-lat", "38.8", "--bbox-max-lat", "39.0", "--bbox-min-lon", "-77.2", "--bbox-max-lon", "-76.9")
GO_SIM = {"INTERVAL": "500ms", "NUM_TRACKS": TRACKS}


def go_sims(interop: Interop, addr: str) -> None:
    interop.go("sensor-sim", addr, **GO_SIM)
    interop.go("radar-sim", addr, **GO_SIM)


def meshstore_sims(interop: Interop, addr: str) -> None:
    interop.meshstore("sensor-sim", addr, *MESHSTORE_SIM)
    interop.meshstore("radar-sim", addr, *MESHSTORE_SIM)


def approval_gate(interop: Interop, addr: str) -> None:
    interop.meshstore("task-manager", addr, "--approval-timeout", "600")


def level(entity: pb.Entity) -> int:
    return unpack(entity, THREAT, pb.ThreatComponent).level


def outcome(server: Served, labels: set[str]) -> list[str]:
    """Asserts the pipeline's outcome; returns the HIGH tracks' ids."""
    tracks = [e for e in entities(server).values() if e.type == pb.ENTITY_TYPE_TRACK]
    moving = [e for e in tracks if VELOCITY in e.components]
    assert len(moving) >= TRACKS, f"{len(moving)} tracks with a velocity"
    for e in moving:
        missing = {CLASSIFICATION, THREAT, TASK} - set(e.components)
        assert not missing, f"{e.id} lacks {missing}"
        assert unpack(e, CLASSIFICATION, pb.ClassificationComponent).label in labels
    assert any(FUSION in e.components for e in tracks), "no fused track"
    high = sorted(e.id for e in moving if level(e) == pb.THREAT_LEVEL_HIGH)
    assert high, (f"no HIGH track; speeds (kn) {sorted(round(unpack(e, VELOCITY, pb.VelocityComponent).speed) for e in moving)}"
                  f", levels {sorted(level(e) for e in moving)}")
    for e in moving:
        if e.id in high:
            state = unpack(e, APPROVAL, pb.ApprovalComponent)
            assert state is not None and state.state == pb.APPROVAL_STATE_PENDING, f"{e.id}: {state}"
    return high


def run_pipeline(interop: Interop, server: Served, labels: set[str]) -> None:
    """Lets the pipeline run RUN_SECONDS, checks the outcome, approves one HIGH track
    with lattice-cli and reads the result back with meshstore get."""
    started = time.monotonic()
    eventually(lambda: outcome(server, labels), RUN_SECONDS + 15, "pipeline outcome")
    time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))
    high = eventually(lambda: outcome(server, labels), 15, "pipeline outcome after the run")

    chosen = high[0]
    assert ok(interop.cli(server.addr, "approve", chosen)).strip() == f"Approved: {chosen} (type=ENTITY_TYPE_TRACK)"

    def approved() -> None:
        shown = meshstore_get(server.addr, chosen)["components"]
        assert shown["approval"]["state"] == "APPROVAL_STATE_APPROVED"
        assert shown["task"]["state"] == "intercept"
    eventually(approved, 10, f"{chosen} approved and intercepting")
    assert_services_healthy(interop)


# Errors the seed's services log by design: its classifier cannot classify tracks
# without a velocity (radar plots, fused tracks); a write in flight when a service is
# stopped is cancelled.
EXPECTED_GO_ERRORS = ("no velocity component", "code = Canceled desc = context canceled")


def assert_services_healthy(interop: Interop) -> None:
    for proc in interop.procs:
        assert proc.proc.poll() is None, f"{proc.name} exited:\n{proc.text()}"
    assert_logs_clean(interop.procs)


def assert_logs_clean(procs: list[Proc]) -> None:
    for proc in procs:
        for line in proc.lines:
            assert "Traceback" not in line and "level=error" not in line, f"{proc.name}: {line}"
            if " ERROR " in line:
                assert any(e in line for e in EXPECTED_GO_ERRORS), f"{proc.name}: {line}"


def test_go_services_end_to_end(interop: Interop) -> None:
    server = interop.serve()
    addr = server.addr
    for name in ("classifier", "task-manager"):
        interop.go(name, addr)
    interop.go("fusion", addr, DIST_THRESHOLD="0.1")
    approval_gate(interop, addr)
    go_sims(interop, addr)
    run_pipeline(interop, server, GO_LABELS)
    # The Go task-manager's whole-entity writes of its task catalogs went through (it
    # logs this after a successful UpdateEntity, an ERROR line otherwise).
    assert any("task-manager assigned tasks" in line for p in interop.procs if p.name == "task-manager"
               for line in p.lines)


def test_go_sims_with_meshstore_consumers(interop: Interop) -> None:
    server = interop.serve()
    addr = server.addr
    interop.meshstore("classifier", addr, *MESHSTORE_CLASSIFIER)
    interop.meshstore("fusion", addr, "--max-distance", "10000")
    approval_gate(interop, addr)
    go_sims(interop, addr)
    run_pipeline(interop, server, MESHSTORE_LABELS)


def test_meshstore_sims_with_go_classifier(interop: Interop) -> None:
    server = interop.serve()
    addr = server.addr
    interop.go("classifier", addr)
    interop.go("fusion", addr, DIST_THRESHOLD="0.1")
    approval_gate(interop, addr)
    meshstore_sims(interop, addr)
    run_pipeline(interop, server, GO_LABELS)


# ---- the seed's scenario: an old client's read-modify-write -----------------------------

# The Go sensor-sim logs each write after it succeeded.
WRITE_LINE = re.compile(r"(?:created|updated) track track_id=(\S+) lat=(\S+) lon=(\S+)")


def positions_watched(server: Served, stop: threading.Event, seen: list[tuple[str, tuple[float, float]]]) -> None:
    call = server.stub.WatchEntities(store_pb2.WatchEntitiesRequest(type_filter=pb.ENTITY_TYPE_TRACK))
    threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True).start()
    try:
        for ev in call:
            p = unpack(ev.entity, POSITION, pb.PositionComponent)
            if p is not None:
                seen.append((ev.entity.id, (p.lat, p.lon)))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.CANCELLED, exc


def test_go_classifier_read_modify_write_never_clobbers_a_newer_position(interop: Interop) -> None:
    """The Go classifier reads each track from its watch, adds classification and
    threat, and writes the whole entity back (the position it read included, with the
    entity-level HLC it read) while the Go sensor writes new positions as fast as it can
    (a 2 ms tick), so the classifier reads fall behind.
    Every position the store ever shows must be the sensor's latest-so-far.
    The server acknowledges at once (interval durability): with every write waiting for
    its commit, the classifier can keep up and the race this test needs may not happen."""
    server = interop.serve("--durability", "interval")
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=positions_watched, args=(server, stop, seen), daemon=True)
    watcher.start()
    classifier = interop.go("classifier", server.addr)
    sensor = interop.go("sensor-sim", server.addr, INTERVAL="2ms", NUM_TRACKS=5)
    time.sleep(8)
    sensor.stop()
    time.sleep(1)  # the classifier's last writes land
    classifier.stop()
    final = {e.id: e for e in entities(server).values()}
    stop.set()
    watcher.join(TIMEOUT)

    written: dict[str, dict[tuple[float, float], int]] = {}
    for line in sensor.lines:
        if m := WRITE_LINE.search(line):
            order = written.setdefault(m.group(1), {})
            order.setdefault((float(m.group(2)), float(m.group(3))), len(order))
    assert len(written) == 5 and all(len(order) > 100 for order in written.values())
    for track_id, order in written.items():
        shown = [pos for tid, pos in seen if tid == track_id]
        # The sensor's last write may have been applied as it was stopped, unlogged.
        if shown and shown[-1] not in order:
            shown = shown[:-1]
        indices = [order.get(pos) for pos in shown]
        assert None not in indices, f"{track_id}: the store showed a position the sensor never wrote"
        regressions = [(a, b) for a, b in zip(indices, indices[1:]) if b < a]
        assert not regressions, f"{track_id}: an older position came back after a newer one: {regressions[:5]}"
        entity = final[track_id]
        p = unpack(entity, POSITION, pb.PositionComponent)
        assert (p.lat, p.lon) == [pos for tid, pos in seen if tid == track_id][-1]
        assert unpack(entity, CLASSIFICATION, pb.ClassificationComponent).label in GO_LABELS
    stats = dict(server.stub.GetStats(store_pb2.GetStatsRequest(), timeout=TIMEOUT).values)
    # The race happened: the classifier wrote back positions that were no longer the
    # latest, and each was refused as stale while its classification went in.
    assert stats["stale_keys"] > 0, stats
    assert_logs_clean(interop.procs)
