"""The mesh over real gRPC on 127.0.0.1: MeshService (meshstore.mesh.receiver) receiving,
Relay (meshstore.mesh.relay) sending, budget (meshstore.mesh.budget) deciding the order.

Every scenario runs on its own event loop (``partition.run``) with nodes from
``partition.Cluster``; a partition cuts a node off both ways at the network edge and a
heal lets the same relays reconnect on their own. Outcomes are awaited with
``eventually`` (polling with a timeout); the only waits without a condition are the
bounded observation windows that check nothing more happens (quiescence).

Knobs: MESHSTORE_MESH_RANDOM_SECONDS (default 15) and MESHSTORE_MESH_SEED for the
randomized run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time

import grpc
import pytest

from meshstore import CursorExpiredError, Store
from meshstore.components import VELOCITY, make_entity, unpack
from meshstore.mesh.protocol import PUSH_METHOD
from meshstore.mesh.relay import Relay
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import mesh_pb2
from conftest import alive
from partition import Cluster, eventually, run

TRACK = pb.ENTITY_TYPE_TRACK
THREAT_URL = "type.googleapis.com/entity.v1.ThreatComponent"


# ---- helpers ----------------------------------------------------------------------------


def track(entity_id: str, *, speed: float | None = None, threat: int | None = None,
          lat: float | None = None) -> pb.Entity:
    components = {}
    if speed is not None:
        components["velocity"] = pb.VelocityComponent(speed=speed, heading=90)
    if threat is not None:
        components["threat"] = pb.ThreatComponent(level=threat)
    if lat is not None:
        components["position"] = pb.PositionComponent(lat=lat, lon=1.0)
    return make_entity(entity_id, TRACK, **components)


def has(store: Store, entity_id: str) -> bool:
    return store.replica_state(entity_id) is not None and any(e.id == entity_id for e in store.list())


def speed(store: Store, entity_id: str) -> float | None:
    try:
        v = unpack(store.get(entity_id), VELOCITY, pb.VelocityComponent)
    except KeyError:
        return None
    return None if v is None else v.speed


def threat(store: Store, entity_id: str) -> int | None:
    try:
        t = unpack(store.get(entity_id), "threat", pb.ThreatComponent)
    except KeyError:
        return None
    return None if t is None else t.level


def lat(store: Store, entity_id: str) -> float | None:
    try:
        p = unpack(store.get(entity_id), "position", pb.PositionComponent)
    except KeyError:
        return None
    return None if p is None else p.lat


def view(store: Store) -> list[bytes]:
    """What users see, byte for byte (live entities with versions, ordered by id)."""
    return [e.SerializeToString(deterministic=True) for e in store.list()]


def live_cells(replica_state: bytes) -> bytes:
    """A live entity's replica state without its delete record and context. A node that
    forgot an entity's tombstone (every peer had acknowledged the delete) and then saw
    it written again holds a state without the old delete record and with a smaller
    context than peers that had not forgotten it yet; both refuse the same late writes
    (one by its context summary, the others by the record), so the states are equivalent
    though not byte-equal, and no resync is needed (docs/merge.md)."""
    state = pb.Entity.FromString(replica_state)
    state.ClearField("deleted_version")
    state.ClearField("context")
    return state.SerializeToString(deterministic=True)


def same_everywhere(stores: list[Store]) -> bool:
    first = view(stores[0])
    return all(view(s) == first for s in stores[1:])


def total_sent(cluster: Cluster) -> tuple[int, int]:
    states = batches = 0
    for node in cluster.nodes.values():
        s, b = node.sent()
        states += s
        batches += b
    return states, batches


async def quiet_for(cluster: Cluster, seconds: float) -> tuple[int, int]:
    """Asserts no state or batch is sent during an observation window; returns the counts."""
    before = total_sent(cluster)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        assert total_sent(cluster) == before, f"sends after quiescence: {before} -> {total_sent(cluster)}"
    return before


class RawPeer:
    """A hand-driven MeshService client, to send what a correct relay never would."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(PUSH_METHOD, request_serializer=lambda b: b,
                                               response_deserializer=mesh_pb2.PushResponse.FromString)()

    async def send(self, data: bytes) -> None:
        await self.call.write(data)

    async def hello(self, node_id: str, incarnation: int = 7) -> mesh_pb2.Hello:
        await self.send(mesh_pb2.PushRequest(hello=mesh_pb2.Hello(node_id=node_id, incarnation=incarnation))
                        .SerializeToString())
        reply = await asyncio.wait_for(self.call.read(), 5)
        assert reply.HasField("hello"), reply
        return reply.hello

    async def batch(self, states: list[bytes], last_seq: int) -> mesh_pb2.Ack:
        await self.send(mesh_pb2.RawPushRequest(batch=mesh_pb2.RawBatch(states=states, last_seq=last_seq))
                        .SerializeToString())
        reply = await asyncio.wait_for(self.call.read(), 5)
        assert reply.HasField("ack"), reply
        return reply.ack

    async def error(self) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(self.call.read(), 5)
        return info.value

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)


# ---- protocol ---------------------------------------------------------------------------


def test_raw_wire_views_match_the_typed_messages():
    state = make_entity("t1", TRACK, velocity=pb.VelocityComponent(speed=3))
    typed = mesh_pb2.PushRequest(batch=mesh_pb2.Batch(states=[state], last_seq=42))
    raw = mesh_pb2.RawPushRequest.FromString(typed.SerializeToString())
    assert raw.batch.last_seq == 42
    assert pb.Entity.FromString(raw.batch.states[0]) == state
    assert mesh_pb2.PushRequest.FromString(raw.SerializeToString()) == typed
    hello = mesh_pb2.RawPushRequest(hello=mesh_pb2.Hello(node_id="a", incarnation=5))
    assert mesh_pb2.PushRequest.FromString(hello.SerializeToString()).hello.node_id == "a"


def test_incarnation_is_per_store_object():
    a, b = Store(node_id="a"), Store(node_id="a")
    try:
        assert a.incarnation == a.incarnation != 0
        assert a.incarnation != b.incarnation
    finally:
        a.close()
        b.close()


def test_relay_validates_its_arguments():
    store = Store(node_id="a")
    try:
        with pytest.raises(ValueError, match="peers"):
            Relay(store, "127.0.0.1:1")
        with pytest.raises(ValueError, match="duplicates"):
            Relay(store, ["127.0.0.1:1", "127.0.0.1:1"])
        with pytest.raises(ValueError, match="node_id"):
            Relay(store, ["127.0.0.1:1"], node_id="b")
        with pytest.raises(ValueError, match="batch_size"):
            Relay(store, ["127.0.0.1:1"], batch_size=0)
        with pytest.raises(ValueError, match="bandwidth_bps"):
            Relay(store, ["127.0.0.1:1"], bandwidth_bps=-1)
        with pytest.raises(TypeError):
            Relay(object(), ["127.0.0.1:1"])  # type: ignore[arg-type]
        assert Relay(store, ["127.0.0.1:1"], node_id="a").peers == ["127.0.0.1:1"]
    finally:
        store.close()


def test_a_node_serves_the_mesh_and_the_store_service_on_one_port():
    async def scenario():
        store, remote = Store(node_id="served"), Store(node_id="writer")
        node = await Node(store=store).start()
        try:
            async with Relay(remote, [node.address], poll_interval=0.05):
                remote.put(track("via-mesh", speed=3))
                await eventually(lambda: has(store, "via-mesh"))
            from meshstore.pb import store_pb2, store_pb2_grpc
            async with grpc.aio.insecure_channel(node.address) as channel:
                reply = await store_pb2_grpc.EntityStoreServiceStub(channel).ListEntities(
                    store_pb2.ListEntitiesRequest())
            assert [e.id for e in reply.entities] == ["via-mesh"]
            await eventually(lambda: node.receiver.stats()["streams_open"] == 0, what="stream closed")
            assert node.receiver.stats()["peers"]["writer"]["changed"] == 1
        finally:
            await node.stop(0)
            store.close()
            remote.close()
    run(scenario())


# ---- replication in a full mesh ---------------------------------------------------------


def test_full_mesh_create_update_delete_reach_every_node():
    async def scenario():
        async with Cluster("abc") as c:
            a, b, cc = c["a"].store, c["b"].store, c["c"].store
            a.create(track("t1", speed=10, threat=pb.THREAT_LEVEL_NONE))
            await eventually(lambda: all(has(s, "t1") for s in (b, cc)), what="create reaches b and c")
            b.update(track("t1", speed=20))
            await eventually(lambda: speed(a, "t1") == speed(cc, "t1") == 20, what="update from b")
            cc.delete("t1")
            await eventually(lambda: not any(alive(s, "t1") for s in (a, b, cc)), what="delete from c")
            await c.settle()
            assert same_everywhere(c.stores())
            for node in c.nodes.values():
                for peer in node.peer_stats().values():
                    assert peer["connected"] and peer["lag"] == 0
                    assert peer["full_syncs"] == 1  # the first connection only
    run(scenario())


def test_seed_scenario_conflicting_writes_across_a_partition():
    async def scenario():
        async with Cluster("abc") as c:
            a, b, cc = c["a"].store, c["b"].store, c["c"].store
            relays = [n.relay for n in c.nodes.values()]
            a.create(track("track-1", speed=10, threat=pb.THREAT_LEVEL_NONE))
            await eventually(lambda: has(b, "track-1") and has(cc, "track-1"))
            await c.settle()

            await c["b"].partition()
            a.update(track("track-1", speed=100, threat=pb.THREAT_LEVEL_LOW))
            b.update(track("track-1", speed=400, threat=pb.THREAT_LEVEL_HIGH))  # the later write
            await eventually(lambda: speed(cc, "track-1") == 100, what="a's write reaches c")
            await eventually(lambda: not any(p["connected"] for p in c["b"].peer_stats().values()),
                             what="b's relay sees its peers unreachable")
            # Neither side sees the other's write while partitioned.
            assert (speed(a, "track-1"), threat(a, "track-1")) == (100, pb.THREAT_LEVEL_LOW)
            assert (speed(cc, "track-1"), threat(cc, "track-1")) == (100, pb.THREAT_LEVEL_LOW)
            assert (speed(b, "track-1"), threat(b, "track-1")) == (400, pb.THREAT_LEVEL_HIGH)

            await c["b"].heal()  # no new write, no relay restart
            await eventually(
                lambda: all((speed(s, "track-1"), threat(s, "track-1")) == (400, pb.THREAT_LEVEL_HIGH)
                            for s in (a, b, cc)),
                timeout=15, what="every node converges on HIGH threat and the later velocity")
            await c.settle()
            assert same_everywhere(c.stores())
            assert [n.relay for n in c.nodes.values()] == relays
            assert all(p["connects"] >= 2 for p in c["b"].peer_stats().values())
            assert c["a"].peer_stats()[c["b"].address]["retries"] >= 1
    run(scenario())


def test_entities_created_on_both_sides_of_a_partition_reach_every_node():
    async def scenario():
        async with Cluster("abc") as c:
            await c.settle()
            await c["c"].partition()
            for i in range(20):
                c["a"].store.put(track(f"a{i}", lat=i))
                c["c"].store.put(track(f"c{i}", lat=-i))
            c["b"].store.put(track("b0", lat=0.5))
            c["c"].store.delete("c3")
            await eventually(lambda: all(has(c["b"].store, f"a{i}") for i in range(20)))
            assert not any(has(c["c"].store, f"a{i}") for i in range(20))
            assert not any(has(c["a"].store, f"c{i}") for i in range(20))
            await c["c"].heal()
            await eventually(lambda: all(len(s.list()) == 40 for s in c.stores()), timeout=15,
                             what="all 40 live entities everywhere")
            await c.settle()
            assert same_everywhere(c.stores())
            assert not any(alive(s, "c3") for s in c.stores())
    run(scenario())


# ---- topologies and echo ----------------------------------------------------------------


def test_line_topology_forwards_through_the_middle_without_loops():
    async def scenario():
        # Tombstones kept (no collection), so the forwarded one can be observed on c.
        async with Cluster("abc", links=[("a", "b"), ("b", "c")],
                           relay_options={"collect_tombstones": False}) as c:
            await c.settle()
            for i in range(50):
                c["a"].store.put(track(f"e{i}", lat=i))
            c["c"].store.put(track("from-c", lat=1))
            await eventually(lambda: len(c["c"].store.list()) == 51 and len(c["a"].store.list()) == 51,
                             what="a's writes reach c through b, and back")
            await c.settle()
            assert same_everywhere(c.stores())
            states, _ = await quiet_for(c, 1.0)
            # a->b 50, b->c 50, c->b 1, b->a 1; echo suppression sends nothing back.
            assert states == 102, c["b"].peer_stats()
            # Created and deleted before a's relay reads it: b receives only a tombstone,
            # a change that emits no event there (dead to dead); b must forward it anyway.
            c["a"].store.put(track("ghost", lat=1))
            c["a"].store.delete("ghost")
            await eventually(lambda: c["c"].store.replica_state("ghost") is not None, what="tombstone via b")
            await c.settle()
            assert (await quiet_for(c, 0.5))[0] == 104
    run(scenario())


def test_one_write_in_a_three_node_mesh_is_sent_a_bounded_number_of_times():
    async def scenario():
        async with Cluster("abc") as c:
            await c.settle()
            before, _ = total_sent(c)
            c["a"].store.put(track("echo", speed=1))
            await eventually(lambda: all(has(s, "echo") for s in c.stores()))
            await c.settle()
            after, _ = await quiet_for(c, 1.0)
            # Each node's copy changes once, and each change goes to each peer at most
            # once: <= 3 nodes x 2 peers = 6; echo suppression usually makes it 4.
            assert 2 <= after - before <= 6, after - before
    run(scenario())


def test_a_restarted_node_gets_a_full_sync():
    async def scenario():
        async with Cluster("abc") as c:
            c["a"].store.put(track("from-a", speed=1))
            c["c"].store.put(track("from-c", speed=2))
            c["c"].store.put(track("gone", speed=3))
            c["c"].store.delete("gone")
            await eventually(lambda: all(has(s, "from-a") and has(s, "from-c") for s in c.stores()))
            await c.settle()
            old_incarnation = c["c"].store.incarnation

            await c["c"].restart()  # empty store, same node id and port, new incarnation
            fresh = c["c"].store
            assert fresh.incarnation != old_incarnation and fresh.list() == []
            # Its own earlier write comes back too (peers hold it with source "c").
            await eventually(lambda: has(fresh, "from-a") and has(fresh, "from-c"), timeout=15,
                             what="full sync of the restarted node")
            assert not alive(fresh, "gone")
            # Each peer noticed the new incarnation and synced it from seq 0.
            for name in "ab":
                await eventually(lambda n=name: c[n].peer_stats()[c["c"].address]["full_syncs"] == 2)
                assert c[name].peer_stats()[c["c"].address]["incarnation"] == fresh.incarnation
            fresh.put(track("after-restart", speed=4))
            await eventually(lambda: all(has(s, "after-restart") for s in c.stores()))
            await c.settle()
            assert same_everywhere(c.stores())
    run(scenario())


def test_a_restarted_relay_sends_each_peer_only_what_it_lacks():
    """A relay meeting its peers' incarnations for the first time (it restarted, its
    store did not) walks its whole log but skips what the peer's context summary, sent
    in its Hello, covers: here all but the one entity written while it was down."""
    async def scenario():
        async with Cluster("ab") as c:
            a, b = c["a"].store, c["b"].store
            for i in range(200):
                a.put(track(f"t{i}", speed=i))
            await eventually(lambda: all(has(b, f"t{i}") for i in range(200)))
            await c.settle()
            await c["a"].relay.stop()
            a.put(track("while-down", speed=1))
            await c["a"].restart_relay()
            await eventually(lambda: has(b, "while-down"))
            await c.settle()
            link = c["a"].peer_stats()[c["b"].address]
            assert (link["full_syncs"], link["sent_states"]) == (1, 1), link
            assert same_everywhere(c.stores())
    run(scenario())


def test_tombstones_are_collected_once_every_peer_acknowledged_them():
    async def scenario():
        async with Cluster("abc") as c:
            c["a"].store.put(track("x", speed=1))
            await eventually(lambda: all(has(s, "x") for s in c.stores()))
            await c.settle()
            await c["c"].partition()
            c["a"].store.delete("x")
            await eventually(lambda: not alive(c["b"].store, "x"))
            await eventually(lambda: c["a"].peer_stats()[c["b"].address]["lag"] == 0)
            # c has not acknowledged the delete: a keeps the tombstone.
            assert c["a"].relay.collect_once() == 0
            assert c["a"].store.stats()["tombstones"] == 1
            await c["c"].heal()
            await eventually(lambda: all(s.stats()["tombstones"] == 0 and s.stats()["entities"] == 0
                                         for s in c.stores()), timeout=15, what="tombstones collected")
            assert all(n.relay.stats()["tombstones_collected"] == 1 for n in c.nodes.values())
            assert all(s.replica_state("x") is None for s in c.stores())
    run(scenario())


def test_a_full_sync_after_tombstones_were_collected_starts_from_a_snapshot():
    async def scenario():
        async with Cluster("ab") as c:
            a = c["a"].store
            for i in range(5):
                a.put(track(f"keep{i}", speed=i))
            a.put(track("x", speed=1))
            a.delete("x")
            await eventually(lambda: a.stats()["tombstones_collected"] == 1, what="a collects x")
            with pytest.raises(CursorExpiredError):
                a.replica_changes(1)  # a cursor before the collected tombstone would miss it
            await c["b"].restart()  # needs a full sync, from a store whose log has a floor
            await eventually(lambda: len(c["b"].store.list()) == 5, what="b resynced from a snapshot")
            link = c["a"].peer_stats()[c["b"].address]
            assert link["full_syncs"] == 2
            a.put(track("after", speed=9))  # and it goes on incrementally
            await eventually(lambda: has(c["b"].store, "after"))
            await c.settle()
            assert same_everywhere(c.stores())
    run(scenario())


def test_a_peer_that_stops_acknowledging_is_dropped_and_redialed():
    async def scenario():
        hellos = []

        async def mute_push(requests, context):
            async for request in requests:
                if request.HasField("hello"):
                    hellos.append(request.hello.node_id)
                    yield mesh_pb2.PushResponse(hello=mesh_pb2.Hello(node_id="mute", incarnation=1))
                # batches are read and never acknowledged

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mesh.v1.MeshService", {
            "Push": grpc.stream_stream_rpc_method_handler(
                mute_push, request_deserializer=mesh_pb2.RawPushRequest.FromString,
                response_serializer=mesh_pb2.PushResponse.SerializeToString)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        store = Store(node_id="talker")
        store.put(track("t", speed=1))
        relay = Relay(store, [f"127.0.0.1:{port}"], ack_timeout=0.3, backoff_initial=0.01, backoff_max=0.05)
        async with relay:
            await eventually(lambda: len(hellos) >= 3, what="redials after ack timeouts")
            link = relay.stats()["peers"][f"127.0.0.1:{port}"]
            assert "no Ack within 0.3s" in link["last_error"] and link["acked_seq"] == 0
            assert store.collect_tombstones(None) == 0 and relay.collect_once() == 0  # never acked
        await server.stop(0)
        store.close()
    run(scenario())


def test_backoff_doubles_with_jitter_up_to_its_cap():
    store = Store(node_id="a")
    try:
        relay = Relay(store, ["127.0.0.1:1"], backoff_initial=0.1, backoff_max=1.0, seed=3)
        for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (60, 1.0)]:
            delays = [relay._backoff(attempt) for _ in range(50)]
            assert all(ceiling / 2 <= d <= ceiling for d in delays)
            assert len(set(delays)) > 1  # jittered
    finally:
        store.close()


# ---- budget -----------------------------------------------------------------------------


def test_a_tiny_budget_sends_high_and_delete_first_and_loses_nothing():
    async def scenario():
        budget = {"bandwidth_bps": 2000, "burst_bytes": 1000}
        async with Cluster("ab", per_node_relay_options={"a": budget}) as c:
            a, b = c["a"].store, c["b"].store
            a.put(track("doomed", lat=0))
            await eventually(lambda: has(b, "doomed"), what="a first entity within the burst")
            await c.settle()
            for i in range(60):  # ~8 KB of position-only updates: about 4 s of budget
                a.put(track(f"low{i}", lat=i))
            a.put(track("hot", threat=pb.THREAT_LEVEL_HIGH))
            a.delete("doomed")
            await eventually(lambda: threat(b, "hot") == pb.THREAT_LEVEL_HIGH and not alive(b, "doomed"),
                             timeout=2.0, what="HIGH and DELETE arrive promptly")
            assert sum(has(b, f"low{i}") for i in range(60)) < 60  # low ones still deferred
            # A backlogged entity updated repeatedly is coalesced, not queued per update.
            for k in range(10):
                a.put(track("low59", lat=70 + k))
                await asyncio.sleep(0.06)  # let the relay read each version
            stats = c["a"].peer_stats()[c["b"].address]
            assert stats["pending"] <= 62  # bounded by the number of entities
            await eventually(lambda: all(lat(b, f"low{i}") == i for i in range(59)) and lat(b, "low59") == 79,
                             timeout=20, what="every low-priority update arrives as budget allows")
            stats = c["a"].peer_stats()[c["b"].address]
            assert stats["coalesced"] >= 1 and stats["deferred"] >= 1 and stats["bypassed"] >= 2
            await c.settle()
            assert same_everywhere(c.stores())
    run(scenario())


def test_states_deferred_by_the_budget_are_resent_after_a_reconnect():
    async def scenario():
        budget = {"bandwidth_bps": 2000, "burst_bytes": 600}
        async with Cluster("ab", per_node_relay_options={"a": budget}) as c:
            a, b = c["a"].store, c["b"].store
            await c.settle()
            for i in range(30):
                a.put(track(f"slow{i}", lat=i))
            link = lambda: c["a"].peer_stats()[c["b"].address]  # noqa: E731
            await eventually(lambda: link()["sent_states"] >= 3, what="the burst went out")
            # Deferred states hold the acknowledged watermark back.
            assert link()["pending"] > 0 and link()["lag"] > 0
            await c["b"].partition()  # the stream breaks with states still deferred
            assert not all(has(b, f"slow{i}") for i in range(30))
            await c["b"].heal()
            await eventually(lambda: all(lat(b, f"slow{i}") == i for i in range(30)), timeout=20,
                             what="everything deferred before the break arrives after it")
            assert link()["connects"] >= 2
            await c.settle()
            assert same_everywhere(c.stores())
    run(scenario())


# ---- bad input at the mesh boundary -----------------------------------------------------


def test_malformed_states_are_counted_skipped_and_acknowledged(caplog):
    async def scenario():
        store = Store(node_id="recv")
        node = await Node(store=store).start()
        peer = RawPeer(node.address)
        try:
            hello = await peer.hello("evil")
            assert hello.node_id == "recv" and hello.incarnation == store.incarnation
            other = Store(node_id="evil")
            other.put(track("ok", speed=5))
            good = other.replica_state("ok")[0]
            other.close()
            ack = await peer.batch([b"\xff\xfe garbage", good, b""], last_seq=9)
            assert (ack.seq, ack.rejected, ack.changed) == (9, 2, 1)
            assert "malformed" in ack.first_error or "Invalid" in ack.first_error
            assert has(store, "ok")
            ack = await peer.batch([], last_seq=10)  # the stream goes on
            assert (ack.seq, ack.rejected) == (10, 0)
            stats = node.receiver.stats()
            assert stats["rejected_states"] == 2 and stats["peers"]["evil"]["rejected"] == 2
            assert stats["peers"]["evil"]["changed"] == 1
            await peer.send(b"\xff\xff\xff")  # not even a PushRequest
            err = await peer.error()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "undecodable" in err.details()
        finally:
            await peer.close()

        for first in (mesh_pb2.RawPushRequest(batch=mesh_pb2.RawBatch(last_seq=1)).SerializeToString(),):
            peer = RawPeer(node.address)
            await peer.send(first)
            err = await peer.error()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "Hello" in err.details()
            await peer.close()
        peer = RawPeer(node.address)
        await peer.hello("evil")
        await peer.send(mesh_pb2.PushRequest(hello=mesh_pb2.Hello(node_id="evil")).SerializeToString())
        err = await peer.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "second Hello" in err.details()
        await peer.close()
        peer = RawPeer(node.address)
        await peer.send(mesh_pb2.PushRequest(hello=mesh_pb2.Hello(node_id="")).SerializeToString())
        err = await peer.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.details()
        await peer.close()
        # The node is alive and serving.
        peer = RawPeer(node.address)
        await peer.hello("friend")
        assert (await peer.batch([], last_seq=1)).seq == 1
        await peer.close()
        assert node.receiver.stats()["refused_invalid"] == 4
        await node.stop(0)
        store.close()

    with caplog.at_level(logging.WARNING, logger="meshstore"):
        run(scenario())
    assert any("rejected" in r.getMessage() for r in caplog.records)


def test_a_peer_claiming_our_own_node_id_is_refused():
    async def scenario():
        store = Store(node_id="me")
        node = await Node(store=store).start()
        peer = RawPeer(node.address)
        await peer.send(mesh_pb2.PushRequest(hello=mesh_pb2.Hello(node_id="me", incarnation=1)).SerializeToString())
        err = await peer.error()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "own id 'me'" in err.details()
        await peer.close()
        # A relay configured with itself as a peer: refused, reported, retried, harmless.
        relay = Relay(store, [node.address], backoff_initial=0.01, backoff_max=0.05)
        async with relay:
            await eventually(lambda: relay.stats()["peers"][node.address]["retries"] >= 2)
            link = relay.stats()["peers"][node.address]
            assert not link["connected"] and "own id" in link["last_error"]
            assert "FAILED_PRECONDITION" in link["last_error"]
        assert node.receiver.stats()["refused_self"] >= 3
        store.put(track("still-fine", speed=1))
        assert has(store, "still-fine")
        await node.stop(0)
        store.close()
    run(scenario())


def test_states_from_a_peer_whose_clock_is_far_ahead_merge_at_once():
    async def scenario():
        async with Cluster("ab") as c:
            a, b = c["a"].store, c["b"].store
            await c.settle()
            a._core.set_wall_offset(30.0)  # a's clock runs 30 s ahead
            a.put(track("future", speed=7))
            await eventually(lambda: speed(b, "future") == 7, what="b merges a's state at once")
            assert b.stats()["skewed_stamps"] >= 1
            b.put(track("future", speed=9))  # b saw a's value: its write replaces it everywhere
            await eventually(lambda: speed(a, "future") == 9, what="a takes b's later write")
            await c.settle()
            assert same_everywhere(c.stores())
    run(scenario())


# ---- randomized partitions --------------------------------------------------------------


def _stamp(v: pb.Version) -> tuple[int, int, str]:
    return v.physical, v.logical, v.node


def _dot(v: pb.Version) -> tuple[str, int, int]:
    return v.node, v.incarnation, v.counter


def _values(state: pb.Entity, key: str) -> list[pb.Version]:
    """Every value (sibling) of ``key`` in a replica state: the shown one and the others."""
    shown = [state.versions[key]] if key in state.versions else []
    return shown + [s.version for s in state.siblings if s.key == key]


def test_randomized_partitions_heals_and_conflicting_writes_converge():
    """Random writes (some concurrent on two nodes), deletes, short partitions and long
    ones (beyond peer_expiry, so deletes are forgotten while a node is away). After the
    final heal every node holds the same replica states, and every acknowledged write is
    still there, or was replaced by a later write of its key, or removed by a later delete."""
    seconds = float(os.environ.get("MESHSTORE_MESH_RANDOM_SECONDS", "15"))
    seed = int(os.environ.get("MESHSTORE_MESH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    names = "abcd"
    ids = [f"r{i}" for i in range(30)]
    peer_expiry = 2.0

    async def scenario():
        # Each acknowledged write: (id, key, dot, stamp); each delete's stamp, per entity.
        writes: list[tuple[str, str, tuple, tuple]] = []
        deletes: dict[str, list[tuple]] = {}
        counts = {"partition": 0, "long": 0, "heal": 0, "write": 0, "conflict": 0, "delete": 0}
        heal_at: dict[str, float] = {}
        async with Cluster(names, store_options={"peer_expiry": peer_expiry},
                           relay_options={"collect_interval": 0.2}) as c:
            await c.settle()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                roll = rng.random()
                now = time.monotonic()
                cut = [n for n in names if c[n].partitioned]
                due = [n for n in cut if heal_at[n] <= now]
                if roll < 0.05 and len(cut) < 2:
                    name = rng.choice([n for n in names if n not in cut])
                    await c[name].partition()
                    long = rng.random() < 0.3
                    heal_at[name] = now + (peer_expiry + 1.5 if long else rng.uniform(0.05, 0.5))
                    counts["partition"] += 1
                    counts["long"] += long
                elif due:
                    await c[due[0]].heal()
                    counts["heal"] += 1
                else:
                    entity_id = rng.choice(ids)
                    key = rng.choice(["position", "velocity", "threat"])
                    # Mostly one write; sometimes the same key on two nodes at once (a conflict).
                    writers = rng.sample(names, 2) if roll > 0.9 else [rng.choice(names)]
                    for name in writers:
                        store = c[name].store
                        if roll < 0.2 and alive(store, entity_id):
                            store.delete(entity_id)
                            state = pb.Entity.FromString(store.replica_state(entity_id)[0])
                            deletes.setdefault(entity_id, []).append(_stamp(state.deleted_version))
                            counts["delete"] += 1
                            continue
                        if key == "position":
                            e = track(entity_id, lat=rng.uniform(-80, 80))
                        elif key == "velocity":
                            e = track(entity_id, speed=rng.uniform(0, 500))
                        else:
                            e = track(entity_id, threat=rng.choice([1, 2, 3, 4]))
                        result = store.put(e)
                        if key in result.applied:
                            v = result.entity.versions[key]
                            writes.append((entity_id, key, _dot(v), _stamp(v)))
                            counts["write"] += 1
                            counts["conflict"] += len(writers) - 1
                await asyncio.sleep(rng.uniform(0, 0.02))
            for n in names:
                if c[n].partitioned:
                    await c[n].heal()

            def converged() -> bool:
                if not c.synced() or not same_everywhere(c.stores()):
                    return False
                for entity_id in ids:  # replica states equal everywhere (dead or forgotten alike)
                    found = {s.replica_state(entity_id) for s in c.stores()}
                    live = {live_cells(f[0]) for f in found if f is not None and pb.Entity.FromString(f[0]).versions}
                    if len(live) > 1 or (live and None in found):
                        return False
                return True

            try:
                await eventually(converged, timeout=60, interval=0.1, what=f"convergence (seed {seed})")
            except AssertionError:  # say which entities differ, and how, and where each link stands
                for n in names:
                    print(n, "seq", c[n].store.seq, "summary", c[n].store.context_summary(), file=sys.stderr)
                    for address, link in c[n].relay.stats()["peers"].items():
                        print(f"  {n} -> {address}", link, file=sys.stderr)
                    print(f"  {n} receiver", c[n].server.receiver.stats() if c[n].server else None, file=sys.stderr)
                for entity_id in ids:
                    found = [s.replica_state(entity_id) for s in c.stores()]
                    if len({f[0] if f else None for f in found}) > 1:
                        for name, f in zip(names, found):
                            print(name, entity_id, f and pb.Entity.FromString(f[0]), file=sys.stderr)
                raise

            store = c["a"].store
            for entity_id, key, dot, stamp in writes:
                found = store.replica_state(entity_id)
                if found is None:
                    continue  # deleted and forgotten everywhere
                final = pb.Entity.FromString(found[0])
                values = _values(final, key)
                if any(_dot(v) == dot for v in values):
                    continue  # still there
                # Gone: replaced by a write that saw it (so one stamped later: no clock is
                # skewed here), or removed by a later delete (whose record may have been
                # forgotten since).
                later_delete = any(t > stamp for t in deletes.get(entity_id, []))
                later_write = any(_stamp(v) > stamp for v in values)
                assert later_delete or later_write, (seed, entity_id, key, dot, stamp)
        assert counts["write"] > 50 and counts["partition"] >= 1, counts
        return counts

    counts = run(scenario(), timeout=seconds + 100)
    print(f"randomized mesh run: seed={seed} seconds={seconds} {counts}")


def test_each_link_logs_its_counters_periodically(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario():
        async with Cluster("ab", relay_options={"stats_interval": 0.05}) as c:
            with caplog.at_level(logging.INFO, logger="meshstore.mesh.relay"):
                c["a"].store.put(track("s1", speed=5))
                await eventually(lambda: has(c["b"].store, "s1"))

                def logged_after_the_send():
                    return [r.fields for r in caplog.records if r.getMessage() == "mesh peer stats"
                            and r.fields["node_id"] == "a" and r.fields["sent_states"] >= 1]

                await eventually(logged_after_the_send, what="a stats line for a's link to b")
            fields = logged_after_the_send()[-1]
            assert fields["peer"] == c["b"].address and fields["connected"] is True
            assert {"sent_bytes", "acked_seq", "lag", "pending", "coalesced", "deferred", "retries"} <= set(fields)
    run(scenario())
