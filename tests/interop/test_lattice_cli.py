"""The seed system's operator CLI (lattice-cli, unchanged) against ``meshstore serve``:
list, list -t track, get, approve, deny, watch; and watch on one node of a 3-node mesh
while the writes and deletes happen on the others."""

from __future__ import annotations

import re

import pytest

from conftest import Interop, entities, eventually, meshstore_get, ok
from meshstore.components import make_entity
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from test_cli import TIMEOUT, Served, free_port

pytestmark = pytest.mark.timeout(120)

TRACK, ASSET = pb.ENTITY_TYPE_TRACK, pb.ENTITY_TYPE_ASSET
URL = "type.googleapis.com/entity.v1."
# lattice-cli watch prints "[TYPE] ID  components=a,b" (map order: any)
EVENT_LINE = re.compile(r"^\[(EVENT_TYPE_[A-Z]+)\] (\S+)  components=(\S+)$")


def pending() -> pb.ApprovalComponent:
    return pb.ApprovalComponent(state=pb.APPROVAL_STATE_PENDING, timeout_seconds=60)


def create(server: Served, entity: pb.Entity) -> pb.Entity:
    return server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=entity), timeout=TIMEOUT)


def table(stdout: str) -> dict[str, tuple[str, set[str], str]]:
    """lattice-cli list's rows: id -> (type, component keys, updated)."""
    lines = stdout.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["ID", "TYPE", "COMPONENTS", "UPDATED"]
    rows = {}
    for line in lines[1:]:
        entity_id, kind, comps, updated = re.split(r"\s{2,}", line.strip())
        rows[entity_id] = (kind, set(comps.split(",")), updated)
    return rows


def test_list_get_approve_deny(interop: Interop) -> None:
    server = interop.serve()
    addr = server.addr
    create(server, make_entity("t1", TRACK, position=pb.PositionComponent(lat=1.5, lon=2.5),
                               threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW)))
    create(server, make_entity("t2", TRACK, approval=pending()))
    create(server, make_entity("t3", TRACK, approval=pending()))
    create(server, make_entity("a1", ASSET, task_catalog=pb.TaskCatalogComponent(available_tasks=["survey"])))

    rows = table(ok(interop.cli(addr, "list")))
    assert {k: v[:2] for k, v in rows.items()} == {
        "t1": ("ENTITY_TYPE_TRACK", {"position", "threat"}),
        "t2": ("ENTITY_TYPE_TRACK", {"approval"}),
        "t3": ("ENTITY_TYPE_TRACK", {"approval"}),
        "a1": ("ENTITY_TYPE_ASSET", {"task_catalog"}),
    }
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", updated) for _, _, updated in rows.values())
    assert set(table(ok(interop.cli(addr, "list", "-t", "track")))) == {"t1", "t2", "t3"}

    stored = entities(server)["t1"]
    lines = ok(interop.cli(addr, "get", "t1")).splitlines()
    assert lines[:5] == [
        "ID:      t1",
        "Type:    ENTITY_TYPE_TRACK",
        f"Created: {stored.created_at.ToDatetime():%Y-%m-%d %H:%M:%S}",
        f"Updated: {stored.updated_at.ToDatetime():%Y-%m-%d %H:%M:%S}",
        "Components:",
    ]
    assert sorted(lines[5:]) == [f"  position: {URL}PositionComponent", f"  threat: {URL}ThreatComponent"]
    missing = interop.cli(addr, "get", "nope")
    assert missing.returncode == 1 and "code = NotFound" in missing.stderr and "'nope' not found" in missing.stderr

    assert ok(interop.cli(addr, "approve", "t2")).strip() == "Approved: t2 (type=ENTITY_TYPE_TRACK)"
    assert meshstore_get(addr, "t2")["components"]["approval"]["state"] == "APPROVAL_STATE_APPROVED"
    assert ok(interop.cli(addr, "deny", "t3")).strip() == "Denied: t3 (type=ENTITY_TYPE_TRACK)"
    assert meshstore_get(addr, "t3")["components"]["approval"]["state"] == "APPROVAL_STATE_DENIED"
    refused = interop.cli(addr, "approve", "t1")
    assert refused.returncode == 1 and "code = FailedPrecondition" in refused.stderr
    assert "no pending approval on entity 't1'" in refused.stderr


def watched(proc, start: int, entity_id: str, kind: str, components: set[str]) -> int:
    """Waits for lattice-cli watch to print the event; returns the line after it."""
    def match(line: str) -> bool:
        m = EVENT_LINE.match(line)
        return bool(m) and m.group(1, 2) == (kind, entity_id) and set(m.group(3).split(",")) == components
    return proc.wait_line(match, start=start) + 1


def assert_every_event_line_parses(proc) -> list[tuple[str, str]]:
    events = []
    for line in proc.lines[1:]:  # after the banner
        m = EVENT_LINE.match(line)
        assert m, f"unparsed watch line: {line!r}"
        events.append(m.group(1, 2))
    return events


def test_watch(interop: Interop) -> None:
    server = interop.serve()
    watch = interop.watch(server.addr)
    create(server, make_entity("w1", TRACK, position=pb.PositionComponent(lat=1, lon=1)))
    at = watched(watch, 1, "w1", "EVENT_TYPE_CREATED", {"position"})
    create(server, make_entity("a2", ASSET, position=pb.PositionComponent(lat=1, lon=1)))  # not a track
    update = make_entity("w1", TRACK, position=pb.PositionComponent(lat=2, lon=2),
                         threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH))
    server.stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=update), timeout=TIMEOUT)
    at = watched(watch, at, "w1", "EVENT_TYPE_UPDATED", {"position", "threat"})
    server.stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="w1"), timeout=TIMEOUT)
    watched(watch, at, "w1", "EVENT_TYPE_DELETED", {"-"})
    assert assert_every_event_line_parses(watch) == [
        ("EVENT_TYPE_CREATED", "w1"), ("EVENT_TYPE_UPDATED", "w1"), ("EVENT_TYPE_DELETED", "w1")]


def test_watch_on_a_mesh_node_sees_replicated_writes_and_deletes(interop: Interop) -> None:
    ports = [free_port() for _ in range(3)]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    nodes = []
    for i, name in enumerate("abc"):
        peers = [arg for j, a in enumerate(addrs) if j != i for arg in ("--peer", a)]
        nodes.append(interop.serve("--node-id", f"node-{name}", "--port", str(ports[i]), *peers))
    a, b, c = nodes
    watch = interop.watch(c.addr)

    create(a, make_entity("m1", TRACK, position=pb.PositionComponent(lat=1, lon=1)))
    at = watched(watch, 1, "m1", "EVENT_TYPE_CREATED", {"position"})
    create(b, make_entity("m2", TRACK, velocity=pb.VelocityComponent(speed=420, heading=90)))
    at = watched(watch, at, "m2", "EVENT_TYPE_CREATED", {"velocity"})
    create(a, make_entity("x1", ASSET, position=pb.PositionComponent(lat=1, lon=1)))  # not a track
    # b updates the track a created, once b has it.
    eventually(lambda: entities(b)["m1"], 10, "m1 replicated to b")
    update = make_entity("m1", TRACK, threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW))
    b.stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=update), timeout=TIMEOUT)
    at = watched(watch, at, "m1", "EVENT_TYPE_UPDATED", {"position", "threat"})
    a.stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="m2"), timeout=TIMEOUT)
    at = watched(watch, at, "m2", "EVENT_TYPE_DELETED", {"-"})
    b.stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="m1"), timeout=TIMEOUT)
    watched(watch, at, "m1", "EVENT_TYPE_DELETED", {"-"})

    assert assert_every_event_line_parses(watch) == [
        ("EVENT_TYPE_CREATED", "m1"), ("EVENT_TYPE_CREATED", "m2"), ("EVENT_TYPE_UPDATED", "m1"),
        ("EVENT_TYPE_DELETED", "m2"), ("EVENT_TYPE_DELETED", "m1")]
    # c applied them as merges from its peers, not as its own writes.
    stats = dict(c.stub.GetStats(store_pb2.GetStatsRequest(), timeout=TIMEOUT).values)
    assert stats["merges_changed"] >= 5 and stats["writes"] == 0
