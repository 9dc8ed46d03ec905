"""The node's HTTP side (meshstore.http, docs/http.md): every endpoint, the SSE feed, the
decisions (checked through gRPC), bad input, and the node's lifecycle with HTTP.

Real parts only: each scenario runs a real ``Node`` on 127.0.0.1 (gRPC port 0,
``http_port=0``) on its own event loop (``partition.run``) and talks to it with an
aiohttp client over TCP; no mocks of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import pytest
from google.protobuf import timestamp_pb2

from meshstore import CursorExpiredError, Store, StoreOptions
from meshstore.components import make_entity
from meshstore.http import entity_json
from meshstore.http.server import HttpListenError, HttpServer
from meshstore.node import Node, NodeOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2, store_pb2_grpc
from partition import eventually, run

pytestmark = pytest.mark.timeout(60)

TRACK, ASSET, GEO = pb.ENTITY_TYPE_TRACK, pb.ENTITY_TYPE_ASSET, pb.ENTITY_TYPE_GEO
PENDING, APPROVED, DENIED = pb.APPROVAL_STATE_PENDING, pb.APPROVAL_STATE_APPROVED, pb.APPROVAL_STATE_DENIED


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=round((seconds - whole) * 1e9))


def full_track(entity_id: str, requested_at: float = 1_800_000_000.0) -> pb.Entity:
    """A track with every component the summary view reads."""
    return make_entity(
        entity_id, TRACK,
        position=pb.PositionComponent(lat=51.50123456, lon=-0.12, alt=100.0),
        velocity=pb.VelocityComponent(speed=420.0, heading=87.5),
        threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH),
        classification=pb.ClassificationComponent(label="fast-mover", confidence=0.9),
        task=pb.TaskComponent(state="track", updated_at=ts(requested_at)),
        approval=pb.ApprovalComponent(state=PENDING, timeout_seconds=30, requested_at=ts(requested_at)),
        source=pb.SourceComponent(sensor_id="eo-1", sensor_type="eo"),
    )


def pending_track(entity_id: str, requested_at: float, timeout: int = 60, level: int = pb.THREAT_LEVEL_HIGH) -> pb.Entity:
    return make_entity(entity_id, TRACK, threat=pb.ThreatComponent(level=level),
                       task=pb.TaskComponent(state="track"),
                       approval=pb.ApprovalComponent(state=PENDING, timeout_seconds=timeout, requested_at=ts(requested_at)))


@contextlib.asynccontextmanager
async def serving(store: Store | StoreOptions | None = None, **options: Any) -> AsyncIterator[tuple[Node, str, aiohttp.ClientSession]]:
    """A started node with HTTP on port 0, its base URL and a client session."""
    node = Node(NodeOptions(port=0, http_port=0, **options), store=store)
    await node.start()
    try:
        async with aiohttp.ClientSession(f"http://{node.http_address}") as session:
            yield node, f"http://{node.http_address}", session
    finally:
        await node.stop(grace=1.0)


async def get_json(session: aiohttp.ClientSession, path: str, status: int = 200, **kwargs: Any) -> Any:
    async with session.get(path, **kwargs) as response:
        body = await response.text()
        assert response.status == status, (path, response.status, body)
        assert response.content_type in ("application/json", "application/geo+json"), response.content_type
        return json.loads(body)


async def post_json(session: aiohttp.ClientSession, path: str, status: int = 200, **kwargs: Any) -> Any:
    async with session.post(path, **kwargs) as response:
        body = await response.text()
        assert response.status == status, (path, response.status, body)
        assert response.content_type == "application/json"
        return json.loads(body)


async def grpc_get(address: str, entity_id: str) -> pb.Entity:
    async with grpc.aio.insecure_channel(address) as channel:
        return await store_pb2_grpc.EntityStoreServiceStub(channel).GetEntity(
            store_pb2.GetEntityRequest(id=entity_id), timeout=5)


# ---- SSE ------------------------------------------------------------------------------------


@dataclass
class Message:
    event: str
    data: Any
    id: str | None


@dataclass
class Feed:
    """An open ``/api/events`` stream, parsed as it arrives (messages and comments)."""

    response: aiohttp.ClientResponse
    messages: asyncio.Queue = field(default_factory=asyncio.Queue)
    comments: list[str] = field(default_factory=list)
    task: asyncio.Task | None = None

    async def _read(self) -> None:
        event, data, ident = "message", [], None
        while raw := await self.response.content.readline(max_line_length=1 << 30):  # a snapshot is one line
            line = raw.decode().rstrip("\n")
            if not line:
                if data:
                    await self.messages.put(Message(event, json.loads("\n".join(data)), ident))
                event, data, ident = "message", [], None
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    ident = value

    async def next(self, timeout: float = 5.0) -> Message:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def until(self, predicate: Any, timeout: float = 5.0) -> list[Message]:
        """Messages until ``predicate(messages so far)`` holds."""
        seen: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            seen.append(await self.next(max(0.01, deadline - time.monotonic())))
            if predicate(seen):
                return seen

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.response.close()


@contextlib.asynccontextmanager
async def feed(session: aiohttp.ClientSession, path: str = "/api/events", **kwargs: Any) -> AsyncIterator[Feed]:
    async with session.get(path, timeout=aiohttp.ClientTimeout(total=None, sock_read=None), **kwargs) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        stream = Feed(response)
        stream.task = asyncio.create_task(stream._read())
        try:
            yield stream
        finally:
            stream.close()


def batch_events(messages: list[Message]) -> list[dict[str, Any]]:
    return [e for m in messages if m.event == "batch" for e in m.data["events"]]


# ---- the summary view (entity_json) ---------------------------------------------------------


def test_summary_view_has_every_field_of_the_contract() -> None:
    e = full_track("t1", requested_at=1_800_000_000.25)
    e.updated_at.CopyFrom(ts(1_800_000_001.5))
    e.origin_node = "a"
    assert entity_json.summary(e) == {
        "id": "t1", "type": "TRACK",
        "position": {"lat": 51.50123456, "lon": -0.12, "alt": 100.0},
        "velocity": {"speed": 420.0, "heading": 87.5},
        "threat": "HIGH",
        "classification": {"label": "fast-mover", "confidence": 0.9},
        "task": {"task": "track", "updated_at": "2027-01-15T08:00:00.250Z"},
        "approval": {"state": "PENDING", "requested_at": "2027-01-15T08:00:00.250Z", "timeout_seconds": 30,
                     "deadline": "2027-01-15T08:00:30.250Z", "decided_by": ""},
        "source": {"sensor_id": "eo-1", "sensor_type": "eo"},
        "fusion": None,
        "expires_at": None,
        "updated_at": "2027-01-15T08:00:01.500Z",
        "origin_node": "a",
    }
    fused = make_entity("f1", TRACK, fusion=pb.FusionComponent(source_ids=["a", "b"], fused_lat=1.0, fused_lon=2.0,
                                                                confidence=0.5))
    assert entity_json.summary(fused)["fusion"] == {"source_ids": ["a", "b"], "fused_lat": 1.0, "fused_lon": 2.0,
                                                    "confidence": 0.5}
    bare = entity_json.summary(pb.Entity(id="x"))
    assert bare["type"] == "UNSPECIFIED" and all(bare[k] is None for k in bare if k not in ("id", "type"))


def test_summary_view_never_fails_on_odd_components() -> None:
    e = make_entity("odd", GEO, position=pb.PositionComponent(lat=math.nan, lon=1.0),
                    velocity=pb.VelocityComponent(speed=math.inf, heading=1.0),
                    threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_UNSPECIFIED))
    e.components["approval"].Pack(pb.PositionComponent(lat=1))  # the wrong type under a known key
    e.components["classification"].type_url = "type.googleapis.com/entity.v1.ClassificationComponent"
    e.components["classification"].value = b"\xff\xff"  # does not parse
    out = entity_json.summary(e)
    assert out["position"] is None and out["velocity"] == {"speed": None, "heading": 1.0}
    assert out["threat"] is None and out["approval"] is None and out["classification"] is None
    json.dumps(out, allow_nan=False)


# ---- reads ----------------------------------------------------------------------------------


def test_list_entities_sorted_with_summaries_and_type_filter() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            for e in (full_track("t2"), make_entity("t1", TRACK), make_entity("a1", ASSET), make_entity("g1", GEO)):
                node.store.put(e)
            body = await get_json(http, "/api/entities")
            assert body["seq"] == node.store.seq
            assert [e["id"] for e in body["entities"]] == ["a1", "g1", "t1", "t2"]
            assert body["entities"][3] == entity_json.summary(node.store.get("t2"))
            for query, ids in (("track", ["t1", "t2"]), ("ASSET", ["a1"]), ("Geo", ["g1"]), ("", ["a1", "g1", "t1", "t2"])):
                body = await get_json(http, f"/api/entities?type={query}")
                assert [e["id"] for e in body["entities"]] == ids, query

    run(scenario())


def test_get_entity_detail_with_components_versions_and_siblings() -> None:
    async def scenario() -> None:
        store = Store(node_id="a")
        other = Store(node_id="b")
        try:
            async with serving(store) as (node, _, http):
                e = full_track("t1")
                e.components["custom"].type_url = "type.googleapis.com/not.known.Type"
                e.components["custom"].value = b"\x08\x01"
                store.put(e)
                # A concurrent write of the same key on another replica: both values are kept.
                other.put(make_entity("t1", TRACK, position=pb.PositionComponent(lat=9.0, lon=9.0)))
                for state in other.changes_since(0)[0]:
                    store.merge(state)
                body = await get_json(http, "/api/entities/t1")
                assert {k: body[k] for k in entity_json.summary(store.get("t1"))} == entity_json.summary(store.get("t1"))
                position = body["components"]["position"]
                assert position["type_url"] == "type.googleapis.com/entity.v1.PositionComponent"
                assert position["bytes"] > 0 and set(position["value"]) <= {"lat", "lon", "alt"}
                assert body["components"]["threat"]["value"] == {"level": "THREAT_LEVEL_HIGH"}
                assert body["components"]["custom"] == {"type_url": "type.googleapis.com/not.known.Type",
                                                        "value": None, "bytes": 2}
                version = body["versions"]["velocity"]
                assert version["node"] == "a" and version["physical_ns"] > 0 and version["counter"] >= 1
                assert version["incarnation"] == f"{store.incarnation:016x}" and version["concurrent"] == 0
                assert body["versions"]["position"]["concurrent"] == 1
                siblings = [s for s in body["siblings"] if s["key"] == "position"]
                assert len(siblings) == 1
                assert {siblings[0]["node"], body["versions"]["position"]["node"]} == {"a", "b"}
                assert siblings[0]["value"]["lat"] in (9.0, 51.50123456)
                assert len(siblings[0]["incarnation"]) == 16 and siblings[0]["counter"] >= 1
        finally:
            store.close()
            other.close()

    run(scenario())


def test_get_entity_errors_and_encoded_ids() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(make_entity("a/b c", TRACK))
            body = await get_json(http, "/api/entities/" + quote("a/b c", safe=""))
            assert body["id"] == "a/b c" and body["siblings"] == []
            missing = await get_json(http, "/api/entities/ghost", 404)
            assert missing == {"error": "entity 'ghost' not found"}
            long_id = "x" * 1025
            too_long = await get_json(http, f"/api/entities/{long_id}", 400)
            assert "1025 bytes, over the limit of 1024" in too_long["error"]
            await get_json(http, "/api/entities/" + "x" * 1024, 404)  # at the limit: just not there

    run(scenario())


def test_geojson_has_a_point_per_positioned_entity() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(full_track("t1"))
            node.store.put(make_entity("t2", TRACK))  # no position: left out
            node.store.put(make_entity("a1", ASSET, position=pb.PositionComponent(lat=1.0, lon=2.0)))
            async with http.get("/api/entities.geojson") as response:
                assert response.status == 200 and response.content_type == "application/geo+json"
                body = await response.json(content_type=None)
            assert body["type"] == "FeatureCollection"
            assert [f["id"] for f in body["features"]] == ["a1", "t1"]
            t1 = body["features"][1]
            assert t1["type"] == "Feature" and t1["geometry"] == {"type": "Point", "coordinates": [-0.12, 51.50123456]}
            assert t1["properties"] == entity_json.summary(node.store.get("t1"))
            tracks = await get_json(http, "/api/entities.geojson?type=track")
            assert [f["id"] for f in tracks["features"]] == ["t1"]

    run(scenario())


def test_pending_lists_waiting_approvals_oldest_first() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            now = time.time()
            node.store.put(pending_track("late", now - 5, timeout=60))
            node.store.put(pending_track("early", now - 20, timeout=30, level=pb.THREAT_LEVEL_MEDIUM))
            node.store.put(pending_track("overdue", now - 100, timeout=30))
            decided = pending_track("decided", now - 50)
            decided.components["approval"].Pack(pb.ApprovalComponent(state=APPROVED, timeout_seconds=30))
            node.store.put(decided)
            node.store.put(make_entity("plain", TRACK))
            body = await get_json(http, "/api/pending")
            assert [p["id"] for p in body["pending"]] == ["overdue", "early", "late"]
            early = body["pending"][1]
            assert set(early) == {"id", "requested_at", "deadline", "time_left_s", "threat", "task"}
            assert early["threat"] == "MEDIUM" and early["task"] == "track"
            assert 5 <= early["time_left_s"] <= 10.5
            assert body["pending"][0]["time_left_s"] == 0
            assert early["requested_at"].endswith("Z") and early["deadline"] > early["requested_at"]

    run(scenario())


def test_mesh_shows_the_node_its_peers_and_storage(tmp_path: Path) -> None:
    async def scenario() -> None:
        b = await Node(NodeOptions(port=0), store=StoreOptions(node_id="b")).start()
        try:
            async with serving(StoreOptions(node_id="a", path=tmp_path / "a")) as (a, _, http):
                await a.start_relay([b.address])
                a.store.put(make_entity("t1", TRACK))
                await eventually(lambda: any(e.id == "t1" for e in b.store.list()), what="replicated")

                async def linked() -> Any:
                    body = await get_json(http, "/api/mesh")
                    return body if body["peers"] and body["peers"][0]["node_id"] == "b" and \
                        body["peers"][0]["lag"] == 0 else None

                body = await eventually(linked, what="peer link in /api/mesh")
                assert body["node_id"] == "a" and body["address"] == a.address
                assert body["http_address"] == a.http_address and body["seq"] == a.store.seq
                assert body["entities"] == 1
                peer = body["peers"][0]
                assert peer["address"] == b.address and peer["connected"] is True and peer["sent_states"] >= 1
                assert set(peer) == {"address", "node_id", "connected", "lag", "pending", "deferred", "coalesced",
                                     "sent_states", "last_error"}
                assert body["storage"]["durability"] == "commit" and body["storage"]["data_dir"] == str(tmp_path / "a")
                assert body["storage"]["storage_error"] is None
            async with serving() as (_, _, http):
                body = await get_json(http, "/api/mesh")
                assert body["peers"] == [] and body["storage"] is None
        finally:
            await b.stop()

    run(scenario())


def test_the_page_and_its_files_are_served() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            async with http.get("/") as response:
                assert response.status == 200 and response.content_type == "text/html"
                assert "<html" in (await response.text()).lower()
            for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
                async with http.get(f"/static/{name}") as response:
                    assert response.status == 200 and kind in response.content_type, name
            missing = await get_json(http, "/static/nope.js", 404)
            assert "error" in missing
            host, port = node.http_address.rsplit(":", 1)
            for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2Fapi.py", "/static/"):
                reader, writer = await asyncio.open_connection(host, int(port))  # raw: no client-side normalizing
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = await reader.read()
                writer.close()
                assert answer.startswith(b"HTTP/1.1 404") and b'{"error":' in answer, (path, answer[:200])

    run(scenario())


def test_the_page_files_ship_inside_the_package() -> None:
    """What `/` serves lives in the package directory (maturin puts every file under
    python/meshstore in the wheel, minus .gitignore'd ones)."""
    import meshstore.http.server as server

    static = server.STATIC_DIR
    assert static.parent == Path(server.__file__).parent
    assert {"index.html", "app.js", "app.css"} <= {p.name for p in static.iterdir()}
    ignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text()
    assert "static" not in ignore and ".html" not in ignore and ".js" not in ignore


# ---- decisions ------------------------------------------------------------------------------


def test_approve_and_deny_over_http_are_seen_over_grpc() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            now = time.time()
            node.store.put(pending_track("t1", now))
            node.store.put(pending_track("t2", now))
            approved = await post_json(http, "/api/entities/t1/approve")
            assert approved["id"] == "t1" and approved["approval"]["state"] == "APPROVED"
            assert approved["approval"]["timeout_seconds"] == 60 and approved["approval"]["requested_at"]
            over_grpc = await grpc_get(node.address, "t1")
            got = pb.ApprovalComponent()
            over_grpc.components["approval"].Unpack(got)
            assert got.state == APPROVED and got.timeout_seconds == 60

            denied = await post_json(http, "/api/entities/t2/deny")
            assert denied["approval"]["state"] == "DENIED"
            over_grpc = await grpc_get(node.address, "t2")
            over_grpc.components["approval"].Unpack(got)
            assert got.state == DENIED

            seq = node.store.seq
            again = await post_json(http, "/api/entities/t1/deny", 409)
            assert again == {"error": "no pending approval on entity 't1' (approval: APPROVAL_STATE_APPROVED)"}
            node.store.put(make_entity("plain", TRACK))
            seq = node.store.seq
            none = await post_json(http, "/api/entities/plain/approve", 409)
            assert none["error"] == "no pending approval on entity 'plain' (approval: none)"
            assert (await post_json(http, "/api/entities/ghost/approve", 404))["error"] == "entity 'ghost' not found"
            assert node.store.seq == seq  # refusals change nothing
            assert node.http.stats()["decisions"] == 2

    run(scenario())


def test_grpc_approve_and_http_share_one_decision_path() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(pending_track("t1", time.time()))
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = store_pb2_grpc.EntityStoreServiceStub(channel)
                await stub.ApproveAction(store_pb2.ApproveActionRequest(entity_id="t1"), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.DenyAction(store_pb2.DenyActionRequest(entity_id="t1"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            over_http = await post_json(http, "/api/entities/t1/deny", 409)
            assert over_http["error"] == refused.value.details()

    run(scenario())


def test_a_decision_is_answered_once_on_disk(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(StoreOptions(node_id="d", path=tmp_path / "d", durability="commit")) as (node, _, http):
            node.store.put(pending_track("t1", time.time()))
            await post_json(http, "/api/entities/t1/approve")
            assert node.store.stats()["committed_seq"] >= node.store.seq

    run(scenario())


# ---- the live feed ----------------------------------------------------------------------------


def test_events_snapshot_then_live_batches() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(full_track("t1"))
            node.store.put(make_entity("a1", ASSET))
            async with feed(http) as events:
                first = await events.next()
                assert first.event == "snapshot" and first.id == str(node.store.seq)
                assert first.data["seq"] == node.store.seq
                assert [e["id"] for e in first.data["entities"]] == ["a1", "t1"]
                assert first.data["entities"][1] == entity_json.summary(node.store.get("t1"))

                node.store.put(make_entity("t2", TRACK, position=pb.PositionComponent(lat=3.0, lon=4.0)))
                created = await events.next()
                assert created.event == "batch" and created.id == str(created.data["seq"])
                assert created.data["seq"] == node.store.seq
                assert created.data["events"] == [{"type": "CREATED", "id": "t2",
                                                   "entity": entity_json.summary(node.store.get("t2"))}]

                node.store.put(make_entity("t2", TRACK, position=pb.PositionComponent(lat=5.0, lon=6.0)))
                updated = (await events.next()).data["events"]
                assert updated[0]["type"] == "UPDATED" and updated[0]["entity"]["position"]["lat"] == 5.0

                node.store.delete("t2")
                deleted = (await events.next()).data["events"]
                assert deleted == [{"type": "DELETED", "id": "t2", "entity": None}]

    run(scenario())


def test_events_are_coalesced_per_entity_and_batched_at_most_every_100ms() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(make_entity("t1", TRACK))
            async with feed(http) as events:
                await events.next()  # snapshot
                started = time.monotonic()
                for i in range(1, 201):  # ~1 s of updates to one entity, and a few others
                    node.store.put(make_entity("t1", TRACK, position=pb.PositionComponent(lat=i / 10, lon=0)))
                    if i % 50 == 0:
                        node.store.put(make_entity(f"other-{i}", TRACK))
                    await asyncio.sleep(0.005)

                def done(messages: list[Message]) -> bool:
                    got = {e["id"]: e["entity"] for e in batch_events(messages)}
                    t1 = got.get("t1") or {}
                    return "other-200" in got and (t1.get("position") or {}).get("lat") == 20.0

                messages = await events.until(done)
                elapsed = time.monotonic() - started
                assert all(m.event == "batch" for m in messages)
                for m in messages:
                    ids = [e["id"] for e in m.data["events"]]
                    assert len(ids) == len(set(ids)), ids  # one event per entity per batch
                assert len(messages) <= elapsed / 0.1 + 2, (len(messages), elapsed)
                t1 = [e for e in batch_events(messages) if e["id"] == "t1"]
                assert len(t1) < 100 and t1[-1]["entity"]["position"]["lat"] == 20.0
                assert {e["id"] for e in batch_events(messages)} >= {"other-50", "other-200"}

    run(scenario())


def test_events_resume_with_since_and_last_event_id() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(make_entity("t1", TRACK))
            node.store.put(make_entity("t2", TRACK))
            cursor = node.store.seq
            node.store.put(make_entity("t2", TRACK, position=pb.PositionComponent(lat=1, lon=1)))
            node.store.put(make_entity("t3", TRACK))
            node.store.delete("t1")
            for how in ({"params": {"since": str(cursor)}}, {"headers": {"Last-Event-ID": str(cursor)}},
                        {"params": {"since": str(cursor)}, "headers": {"Last-Event-ID": "0"}}):
                async with feed(http, **how) as events:
                    messages = await events.until(lambda ms: ms[-1].event != "batch" or
                                                  {"t1", "t2", "t3"} <= {e["id"] for e in batch_events(ms)})
                    assert all(m.event == "batch" for m in messages), how  # no snapshot when resuming
                    got = {e["id"]: e["type"] for e in batch_events(messages)}
                    assert got == {"t1": "DELETED", "t2": "UPDATED", "t3": "UPDATED"} or \
                        got == {"t1": "DELETED", "t2": "UPDATED", "t3": "CREATED"}, (how, got)
            async with feed(http, headers={"Last-Event-ID": ""}) as events:
                assert (await events.next()).event == "snapshot"  # empty: no resume

    run(scenario())


def test_events_reset_when_the_cursor_cannot_be_resumed() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(make_entity("gone", TRACK))
            node.store.put(make_entity("kept", TRACK))
            old = 1
            node.store.delete("gone")
            assert node.store.collect_tombstones() == 1
            with pytest.raises(CursorExpiredError):
                node.store.watch(since_seq=old)
            async with feed(http, params={"since": str(old)}) as events:
                reset = await events.next()
                assert reset.event == "reset" and reset.id is None and reset.data["seq"] == node.store.seq
                assert reset.data["reason"]
                snapshot = await events.next()
                assert snapshot.event == "snapshot" and [e["id"] for e in snapshot.data["entities"]] == ["kept"]
            async with feed(http, headers={"Last-Event-ID": str(node.store.seq + 1000)}) as events:
                reset = await events.next()
                assert reset.event == "reset" and "ahead" in reset.data["reason"]
                assert (await events.next()).event == "snapshot"
            assert node.http.stats()["sse_resets"] == 2

    run(scenario())


def test_events_filter_by_type() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(make_entity("t1", TRACK))
            node.store.put(make_entity("a1", ASSET))
            async with feed(http, params={"type": "asset"}) as events:
                snapshot = await events.next()
                assert [e["id"] for e in snapshot.data["entities"]] == ["a1"]
                node.store.put(make_entity("t2", TRACK))
                node.store.put(make_entity("a2", ASSET))
                messages = await events.until(lambda ms: any(e["id"] == "a2" for e in batch_events(ms)))
                assert {e["id"] for e in batch_events(messages)} == {"a2"}

    run(scenario())


def test_heartbeats_keep_an_idle_stream_alive() -> None:
    async def scenario() -> None:
        async with serving(http_options={"heartbeat": 0.2}) as (node, _, http):
            async with feed(http) as events:
                await events.next()
                await eventually(lambda: len(events.comments) >= 2, timeout=5, what="two heartbeats")
                assert set(events.comments) == {"heartbeat"}
                node.store.put(make_entity("t1", TRACK))
                assert (await events.next()).event == "batch"  # still live after the heartbeats

    run(scenario())


def test_the_watcher_is_closed_when_the_client_goes_away() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            base = node.store.stats()["watchers"]
            for _ in range(20):
                async with feed(http) as events:
                    await events.next()
                    assert node.http.api.open_streams == 1
                    assert node.store.stats()["watchers"] == base + 1
                    async with grpc.aio.insecure_channel(node.address) as channel:
                        got = await store_pb2_grpc.EntityStoreServiceStub(channel).GetStats(
                            store_pb2.GetStatsRequest(), timeout=5)
                    assert got.values["http.sse_streams"] == 1  # `meshstore stats` shows it
                await eventually(lambda: node.http.api.open_streams == 0 and node.store.stats()["watchers"] == base,
                                 timeout=5, what="stream and watcher closed after the client left")
            # A client that goes away without reading (its socket just closes).
            reader, writer = await asyncio.open_connection(*node.http_address.rsplit(":", 1))
            writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readuntil(b"event: snapshot")
            assert node.store.stats()["watchers"] == base + 1
            writer.close()
            await eventually(lambda: node.store.stats()["watchers"] == base, timeout=5, what="watcher closed")
            assert node.http.stats()["sse_opened"] == 21

    run(scenario())


def test_stopping_the_node_ends_open_streams_promptly() -> None:
    async def scenario() -> None:
        node = Node(NodeOptions(port=0, http_port=0, grace=10.0))
        await node.start()
        async with aiohttp.ClientSession(f"http://{node.http_address}") as http:
            async with feed(http) as events:
                await events.next()
                started = time.monotonic()
                await node.stop()
                assert time.monotonic() - started < 3.0  # the open stream did not hold the grace period
                await asyncio.wait_for(events.task, 5)  # the stream ended
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get("/api/entities"):
                    pass

    run(scenario())


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_is_a_json_error_and_changes_nothing() -> None:
    async def scenario() -> None:
        async with serving() as (node, base, http):
            node.store.put(pending_track("t1", time.time()))
            seq = node.store.seq
            long_id = "é" * 513  # 1026 bytes
            cases = [
                ("GET", "/api/entities?type=boat", 400, "unknown type 'boat'"),
                ("GET", "/api/entities.geojson?type=1", 400, "unknown type '1'"),
                ("GET", "/api/events?type=tracks", 400, "unknown type"),
                ("GET", "/api/events?since=abc", 400, "since must be a non-negative integer"),
                ("GET", "/api/events?since=-1", 400, "since must be a non-negative integer"),
                ("GET", "/api/events?since=1.5", 400, "since must be a non-negative integer"),
                ("GET", "/api/events?since=99999999999999999999999", 400, "since must be"),
                ("GET", f"/api/entities/{quote(long_id)}", 400, "over the limit of 1024"),
                ("POST", f"/api/entities/{quote(long_id)}/approve", 400, "over the limit of 1024"),
                ("GET", "/api/nope", 404, "no such resource: GET /api/nope"),
                ("GET", "/api/entities/t1/approve", 405, "method GET not allowed"),
                ("POST", "/api/entities", 405, "method POST not allowed on /api/entities (allowed: GET)"),
                ("DELETE", "/api/entities/t1", 405, "not allowed"),
                ("PUT", "/api/entities/t1/deny", 405, "(allowed: POST)"),
                ("POST", "/api/events", 405, "not allowed"),
                ("GET", "/nothing/here", 404, "no such resource"),
            ]
            for method, path, status, fragment in cases:
                async with http.request(method, path) as response:
                    text = await response.text()
                    assert response.status == status, (method, path, response.status, text)
                    assert response.content_type == "application/json", (method, path)
                    body = json.loads(text)
                    assert set(body) == {"error"} and fragment in body["error"], (method, path, body)
                    if status == 405:
                        assert response.headers["Allow"], (method, path)
            async with http.get("/api/events", headers={"Last-Event-ID": "x1"}) as response:
                assert response.status == 400 and "Last-Event-ID must be" in (await response.json())["error"]

            big = b"x" * (100 * 1024)
            async with http.post("/api/entities/t1/approve", data=big) as response:
                assert response.status == 413, await response.text()
                assert "too large" in (await response.json())["error"]

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(100):
                    yield b"y" * 1024

            async with http.post("/api/entities/t1/deny", data=chunks()) as response:  # chunked, no length
                assert response.status == 413

            async with http.get("/api/entities/" + "z" * 10_000) as response:  # beyond the parser's line limit
                assert response.status == 400
            assert node.store.seq == seq  # nothing changed
            assert (await get_json(http, "/api/entities/t1"))["approval"]["state"] == "PENDING"
            assert len((await get_json(http, "/api/entities"))["entities"]) == 1  # still serving

    run(scenario())


def test_a_body_within_the_limit_is_accepted_and_ignored() -> None:
    async def scenario() -> None:
        async with serving() as (node, _, http):
            node.store.put(pending_track("t1", time.time()))
            body = await post_json(http, "/api/entities/t1/approve", json={"anything": True})
            assert body["approval"]["state"] == "APPROVED"

    run(scenario())


# ---- the node ---------------------------------------------------------------------------------


def test_node_options_for_http_are_checked() -> None:
    for bad in ({"http_port": 70000}, {"http_port": -1}, {"http_port": 1.5}, {"http_port": True}):
        with pytest.raises(ValueError):
            NodeOptions(**bad)
    with pytest.raises(TypeError):
        NodeOptions(http_host=1)
    for bad in ({"heartbeat": 0}, {"flush_interval": -1}, {"max_body_bytes": -1}):
        with pytest.raises(ValueError):
            HttpServer(None, **bad)  # type: ignore[arg-type]


def test_a_node_without_http_port_serves_no_http(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with Node(NodeOptions(port=0)) as node:
            assert node.http is None and node.http_address is None
            assert node.stats()["http"] is None and node.stats()["http_address"] is None

    with caplog.at_level("INFO", logger="meshstore.node"):
        run(scenario())
    listening = next(r for r in caplog.records if r.getMessage() == "listening")
    assert listening.fields["http"] == "none"


def test_the_listening_line_names_the_http_address(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> str:
        async with serving() as (node, _, http):
            assert node.stats()["http"]["sse_streams"] == 0
            return node.http_address

    with caplog.at_level("INFO", logger="meshstore.node"):
        address = run(scenario())
    listening = next(r for r in caplog.records if r.getMessage() == "listening")
    assert listening.fields["http"] == address and address.startswith("127.0.0.1:")


def test_a_taken_http_port_fails_the_start_and_releases_the_grpc_port() -> None:
    async def scenario() -> None:
        async with serving() as (taken, _, _):
            port = int(taken.http_address.rsplit(":", 1)[1])
            store = Store(node_id="second")
            try:
                node = Node(NodeOptions(port=0, http_port=port), store=store)
                with pytest.raises(HttpListenError, match=f"cannot listen on 127.0.0.1:{port} \\(http\\)"):
                    await node.start()
                assert not node.running
                with pytest.raises(RuntimeError):
                    await node.start()  # a stopped node does not start again
            finally:
                store.close()

    run(scenario())
