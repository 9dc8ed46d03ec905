"""The causal model (issue 8) over a real mesh on 127.0.0.1 (tests/partition.py):
resurrection and delete cases on a 3-node mesh, a node cut off longer than every timeout
(peer expiry included), and a restarted node (new incarnation, empty store).

Each scenario runs on its own event loop, bounded in time; outcomes are awaited with
``eventually`` (polling with a timeout), never with fixed sleeps.
"""

from __future__ import annotations

import asyncio

import grpc

from meshstore import NotFoundError, Store
from meshstore.components import make_entity, unpack
from meshstore.mesh.protocol import PUSH_METHOD
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import mesh_pb2
from conftest import alive
from partition import Cluster, eventually, run

TRACK = pb.ENTITY_TYPE_TRACK

#: A partition of a few seconds outlasts all of these.
SHORT_TIMEOUTS = dict(connect_timeout=0.5, ack_timeout=1.0, heartbeat_interval=0.3, collect_interval=0.1)


# ---- helpers ----------------------------------------------------------------------------


def track(entity_id: str, *, lat: float | None = None, speed: float | None = None) -> pb.Entity:
    components = {}
    if lat is not None:
        components["position"] = pb.PositionComponent(lat=lat, lon=1.0)
    if speed is not None:
        components["velocity"] = pb.VelocityComponent(speed=speed, heading=90)
    return make_entity(entity_id, TRACK, **components)


def lat(store: Store, entity_id: str) -> float | None:
    try:
        p = unpack(store.get(entity_id), "position", pb.PositionComponent)
    except NotFoundError:
        return None
    return None if p is None else p.lat


def keys(store: Store, entity_id: str) -> set[str]:
    try:
        return set(store.get(entity_id).components)
    except NotFoundError:
        return set()


def view(store: Store) -> list[bytes]:
    """What users see, byte for byte (live entities with versions, ordered by id)."""
    return [e.SerializeToString(deterministic=True) for e in store.list()]


def same_everywhere(stores: list[Store]) -> bool:
    first = view(stores[0])
    return all(view(s) == first for s in stores[1:])


def describe(stores: list[Store]) -> str:
    return "; ".join(f"{s.node_id}: {[(e.id, sorted(e.components)) for e in s.list()]}" for s in stores)


class RawPeer:
    """A hand-driven MeshService client: delivers exactly the states given (a delayed
    duplicate, or a peer that kept old states), whatever the receiver has seen."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(PUSH_METHOD, request_serializer=lambda b: b,
                                               response_deserializer=mesh_pb2.PushResponse.FromString)()

    async def hello(self, node_id: str, incarnation: int) -> mesh_pb2.Hello:
        await self.call.write(mesh_pb2.PushRequest(hello=mesh_pb2.Hello(node_id=node_id, incarnation=incarnation))
                              .SerializeToString())
        reply = await asyncio.wait_for(self.call.read(), 5)
        assert reply.HasField("hello"), reply
        return reply.hello

    async def batch(self, states: list[bytes], last_seq: int) -> mesh_pb2.Ack:
        await self.call.write(mesh_pb2.RawPushRequest(batch=mesh_pb2.RawBatch(states=states, last_seq=last_seq))
                              .SerializeToString())
        reply = await asyncio.wait_for(self.call.read(), 5)
        assert reply.HasField("ack"), reply
        return reply.ack

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)


# ---- (a) the resurrection and delete cases of issue 8 on a 3-node mesh -----------------


def test_a_write_after_delete_recreate_delete_by_a_cut_off_node_survives():
    async def scenario():
        async with Cluster("abc") as c:
            a, b, cc = c["a"].store, c["b"].store, c["c"].store
            a.create(track("x", lat=1, speed=5))
            await eventually(lambda: all(alive(s, "x") for s in (b, cc)), what="x everywhere")
            await c.settle()
            await c["c"].partition()
            a.delete("x")
            a.create(track("x", lat=2))
            a.delete("x")
            await eventually(lambda: not alive(b, "x"), what="the last delete reaches b")
            cc.update(track("x", lat=3))  # c saw none of it; stamped after a's deletes
            await c["c"].heal()
            await eventually(lambda: all(lat(s, "x") == 3 for s in (a, b, cc)), timeout=15,
                             what="c's later write on every node")
            await c.settle()
            # a's deletes removed everything a had seen (velocity from the first life).
            assert all(keys(s, "x") == {"position"} for s in (a, b, cc)), describe(c.stores())
            assert same_everywhere(c.stores()), describe(c.stores())
    run(scenario())


def test_a_delete_wins_over_an_older_concurrent_write_of_a_cut_off_node():
    async def scenario():
        async with Cluster("abc") as c:
            a, b, cc = c["a"].store, c["b"].store, c["c"].store
            a.create(track("x", lat=1))
            cc.create(track("y", lat=1))
            await eventually(lambda: all(alive(s, "x") and alive(s, "y") for s in c.stores()))
            await c.settle()
            await c["c"].partition()
            cc.update(track("x", lat=5, speed=7))  # c writes x, then a deletes it (later)
            cc.update(track("y", lat=6))
            await eventually(lambda: lat(cc, "x") == 5)
            a.delete("x")
            b.delete("y")
            await eventually(lambda: not alive(a, "y") and not alive(b, "x"))
            await c["c"].heal()
            # Deletes win over older concurrent writes: nothing c wrote before them stays.
            await eventually(lambda: not any(alive(s, "x") or alive(s, "y") for s in c.stores()), timeout=15,
                             what="x and y deleted everywhere: " + describe(c.stores()))
            await c.settle()
            assert same_everywhere(c.stores()), describe(c.stores())
            assert not any(alive(s, "x") or alive(s, "y") for s in c.stores()), describe(c.stores())
    run(scenario())


def test_old_states_delivered_after_every_node_collected_the_delete_bring_nothing_back():
    async def scenario():
        async with Cluster("abc") as c:
            a, b, cc = c["a"].store, c["b"].store, c["c"].store
            a.create(track("x", lat=1))
            cc.create(track("y", lat=2))
            await eventually(lambda: all(alive(s, "x") and alive(s, "y") for s in c.stores()))
            await c.settle()
            old = [cc.replica_state("x")[0], cc.replica_state("y")[0]]
            a.delete("x")
            b.delete("y")
            await eventually(lambda: all(s.replica_state("x") is None and s.replica_state("y") is None
                                         for s in c.stores()), timeout=15,
                             what="every node acknowledged and forgot x and y")
            # A peer that kept the old states (or a delayed duplicate) delivers them.
            ghost = RawPeer(c["a"].address)
            try:
                await ghost.hello("ghost", 99)
                ack = await ghost.batch(old, last_seq=2)
                assert ack.rejected == 0, ack
            finally:
                await ghost.close()
            await c.settle()
            assert not any(alive(s, "x") or alive(s, "y") for s in c.stores()), describe(c.stores())
            assert all(s.list() == [] for s in c.stores())
            assert same_everywhere(c.stores())
    run(scenario())


# ---- (b) a node cut off longer than every timeout ---------------------------------------


def test_a_node_cut_off_longer_than_every_timeout_converges_without_resurrection():
    async def scenario():
        async with Cluster("abc", store_options={"peer_expiry": 2.0}, relay_options=SHORT_TIMEOUTS) as c:
            a, b, cc = c["a"].store, c["b"].store, c["c"].store
            for i in range(5):
                a.put(track(f"gone{i}", lat=i))
            cc.put(track("c-gone", lat=9))  # c's own write, deleted by a below
            a.put(track("kept", lat=1))
            cc.put(track("c-kept", lat=2))
            await eventually(lambda: all(len(s.list()) == 8 for s in c.stores()), what="8 entities everywhere")
            await c.settle()

            await c["c"].partition()
            for i in range(5):
                a.delete(f"gone{i}")
            a.delete("c-gone")
            # c writes other entities while cut off, and updates ones it holds.
            for i in range(5):
                cc.put(track(f"c-new{i}", lat=10 + i))
            cc.update(track("c-kept", lat=20))
            cc.update(track("kept", lat=21))
            # a and b forget the deletes once c has been silent past peer_expiry.
            await eventually(lambda: all(s.replica_state(f"gone{i}") is None and s.replica_state("c-gone") is None
                                         for s in (a, b) for i in range(5)), timeout=15,
                             what="a and b forgot the deleted entities without c")
            assert c["a"].peer_stats()[c["c"].address]["expired"]
            assert all(alive(cc, f"gone{i}") for i in range(5)) and alive(cc, "c-gone")

            await c["c"].heal()
            await eventually(lambda: same_everywhere(c.stores()) and alive(a, "c-new4") and not alive(cc, "gone0"),
                             timeout=20, what="all nodes equal after the heal: " + describe(c.stores()))
            await c.settle()
            for s in c.stores():
                assert not any(alive(s, f"gone{i}") for i in range(5)), describe(c.stores())
                assert not alive(s, "c-gone"), describe(c.stores())
                assert [lat(s, f"c-new{i}") for i in range(5)] == [10, 11, 12, 13, 14], s.node_id
                assert lat(s, "c-kept") == 20 and lat(s, "kept") == 21, s.node_id
            assert same_everywhere(c.stores()), describe(c.stores())
            # Every delete is eventually acknowledged by all and forgotten everywhere.
            await eventually(lambda: all(s.stats()["tombstones"] == 0 for s in c.stores()), timeout=10,
                             what="deleted entities forgotten everywhere: "
                                  + str([s.stats()["tombstones"] for s in c.stores()]))
    run(scenario(), timeout=45)


# ---- (c) a restarted node ---------------------------------------------------------------


def test_a_restarted_node_gets_everything_back_and_never_reuses_a_dot():
    async def scenario():
        async with Cluster("abc") as c:
            a, b = c["a"].store, c["b"].store
            a.put(track("from-a", lat=1))
            b.put(track("from-b", lat=2))
            c["c"].store.put(track("from-c", lat=3))
            c["c"].store.put(track("gone", lat=4))
            await eventually(lambda: all(len(s.list()) == 4 for s in c.stores()))
            c["c"].store.delete("gone")
            c["c"].store.update(track("from-a", lat=5))
            await eventually(lambda: all(not alive(s, "gone") and lat(s, "from-a") == 5 for s in c.stores()))
            await c.settle()
            old = c["c"].store.incarnation

            await c["c"].restart()
            fresh = c["c"].store
            assert fresh.incarnation != old and fresh.list() == []
            await eventually(lambda: same_everywhere(c.stores()), timeout=15,
                             what="the restarted node gets everything back: " + describe(c.stores()))
            assert [e.id for e in fresh.list()] == ["from-a", "from-b", "from-c"]
            assert lat(fresh, "from-a") == 5 and not alive(fresh, "gone")
            # Its new writes carry the new incarnation and replace what it (re)learned.
            fresh.update(track("from-c", lat=6))
            assert fresh.get("from-c").versions["position"].incarnation == fresh.incarnation
            fresh.put(track("after", lat=7))
            await eventually(lambda: all(lat(s, "from-c") == 6 and lat(s, "after") == 7 for s in c.stores()),
                             timeout=15, what="the restarted node's writes everywhere")
            await c.settle()
            assert same_everywhere(c.stores())
            assert all(not s.get("from-c").versions["position"].concurrent for s in c.stores())
    run(scenario())


# ---- the mesh boundary ------------------------------------------------------------------


def _ld(field: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def test_bad_states_in_a_batch_are_refused_one_by_one_and_the_good_ones_spread():
    async def scenario():
        async with Cluster("abc") as c:
            a = c["a"].store
            a.put(track("own", lat=1))
            await eventually(lambda: all(alive(s, "own") for s in c.stores()))
            await c.settle()
            ext = Store(node_id="ext")
            try:
                ext.put(track("good1", lat=10))
                ext.put(track("good2", lat=20))
                ext.put(track("bad-lat", lat=30))
                good1, good2 = ext.replica_state("good1")[0], ext.replica_state("good2")[0]
                base = pb.Entity.FromString(ext.replica_state("bad-lat")[0])
            finally:
                ext.close()
            out_of_range = pb.Entity.FromString(base.SerializeToString())
            out_of_range.components["position"].Pack(pb.PositionComponent(lat=95, lon=1))
            forged = pb.Entity.FromString(a.replica_state("own")[0])  # our own dots, never issued
            for v in forged.versions.values():
                v.counter += 1000
            for d in forged.context:
                d.counter += 1000
            nest = b""
            for _ in range(30_000):
                nest = _ld(5, nest)
            bad = [
                good1[: len(good1) // 2],  # truncated
                b"\xff\xff\xff\xff",  # garbage
                out_of_range.SerializeToString(),  # latitude 95
                forged.SerializeToString(),  # names writes of a that a never made
                base.SerializeToString() + _ld(12, nest),  # a 30k-deep nested delete version
            ]
            before = view(a)
            peer = RawPeer(c["a"].address)
            try:
                await peer.hello("mutant", 5)
                ack = await peer.batch([bad[0], good1, *bad[1:], good2], last_seq=7)
            finally:
                await peer.close()
            assert ack.seq == 7 and ack.rejected == len(bad) and ack.changed == 2, ack
            await eventually(lambda: all(lat(s, "good1") == 10 and lat(s, "good2") == 20 for s in c.stores()),
                             what="the good states spread")
            await c.settle()
            assert same_everywhere(c.stores())
            for s in c.stores():
                assert not alive(s, "bad-lat"), describe(c.stores())
                assert lat(s, "own") == 1
            assert [e for e in view(a) if e not in before] == [a.get(i).SerializeToString(deterministic=True)
                                                               for i in ("good1", "good2")]
            # The node still works: a new write goes everywhere.
            c["b"].store.put(track("after", lat=2))
            await eventually(lambda: all(alive(s, "after") for s in c.stores()))
    run(scenario())


# ---- mutated states at the gRPC boundaries -----------------------------------------------


def _mutants(seed: int, states: list[bytes], count: int) -> list[bytes]:
    """Seeded mutations of valid states: flipped bits, truncations, and far-future, zero
    and huge stamps and counters spliced into their versions and contexts."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(states))
        roll = rng.random()
        if roll < 0.4:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif roll < 0.55:
            del data[rng.randrange(1, len(data)):]
        else:
            e = pb.Entity.FromString(bytes(data))
            huge = rng.choice([0, 1, 2**32 - 1, 2**63, 2**64 - 1])
            for v in [*e.versions.values(), *(s.version for s in e.siblings)]:
                v.physical = rng.choice([0, huge, v.physical + 10**18])
                v.counter = rng.choice([0, huge, v.counter])
                v.logical = rng.choice([0, 2**32 - 1, v.logical])
            for d in e.context:
                d.counter = rng.choice([0, huge, d.counter])
            data = bytearray(e.SerializeToString())
        out.append(bytes(data))
    return out


def test_mutated_states_at_the_mesh_and_publish_boundaries_never_take_a_node_down():
    """A node takes 400 mutated replica states over mesh Push and 400 mutated entities
    over PublishEntities: each is merged, written or refused alone, every batch is
    acknowledged, and the node keeps serving and replicating."""
    from meshstore.pb import store_pb2, store_pb2_grpc

    async def scenario():
        async with Cluster("ab") as c:
            a = c["a"].store
            src = Store(node_id="src")
            try:
                for i in range(20):
                    src.put(track(f"m{i}", lat=i, speed=i))
                src.put(make_entity("m0", TRACK, position=pb.PositionComponent(lat=5, lon=5)))
                src.delete("m1")
                states = [src.replica_state(f"m{i}")[0] for i in range(20)]
                entities = [src.get(f"m{i}").SerializeToString() for i in range(2, 20)]
            finally:
                src.close()
            peer = RawPeer(c["a"].address)
            try:
                await peer.hello("mutant", 9)
                mutants = _mutants(7, states, 400)
                rejected = 0
                for k in range(0, len(mutants), 50):
                    ack = await peer.batch(mutants[k:k + 50], last_seq=k + 1)
                    assert ack.seq == k + 1 and ack.rejected + ack.changed <= 50, ack
                    rejected += ack.rejected
                assert 0 < rejected < len(mutants), rejected  # refused one by one, the rest merged
            finally:
                await peer.close()
            # The same through the store service, on a node that serves it.
            served = await Node(store=Store(node_id="pub")).start()
            try:
                async with grpc.aio.insecure_channel(served.address) as channel:
                    stub = store_pb2_grpc.EntityStoreServiceStub(channel)
                    requests = [store_pb2.PublishRequest(entity=pb.Entity.FromString(m))
                                for m in _mutants(8, entities, 400) if _decodes(m)]
                    summary = await stub.PublishEntities(iter(requests), timeout=30)
                    assert summary.rejected > 0 and summary.applied > 0, summary
                    assert summary.applied + summary.rejected <= len(requests), summary
                    listed = await stub.ListEntities(store_pb2.ListEntitiesRequest(), timeout=5)
                    assert len(listed.entities) == served.store.stats()["entities"] > 0
            finally:
                await served.stop(0)
                served.store.close()
            # Still serving and replicating.
            c["b"].store.put(track("after", lat=3))
            a.put(track("after-a", lat=4))
            await eventually(lambda: all(alive(s, "after") and alive(s, "after-a") for s in c.stores()))
            await c.settle()
            assert same_everywhere(c.stores()), describe(c.stores())
    run(scenario(), timeout=60)


def _decodes(data: bytes) -> bool:
    try:
        pb.Entity.FromString(data)
        return True
    except Exception:  # noqa: BLE001 - a mutant the client library itself cannot send
        return False


def test_create_delete_churn_over_a_mesh_leaves_nothing_behind():
    """Create+delete churn on one node of a 3-node mesh whose peers all acknowledge:
    every deleted entity is forgotten everywhere (the delete records do not pile up)."""
    async def scenario():
        async with Cluster("abc", relay_options={"collect_interval": 0.1}) as c:
            a = c["a"].store
            await c.settle()
            for round_ in range(10):
                for i in range(200):
                    a.put(track(f"churn{round_}-{i}", lat=1))
                for i in range(200):
                    a.delete(f"churn{round_}-{i}")
                await asyncio.sleep(0)
            await c.settle()
            await eventually(lambda: all(s.stats()["tombstones"] == 0 and s.stats()["entities"] == 0
                                         for s in c.stores()), timeout=15,
                             what="every delete forgotten everywhere: "
                                  + str([(s.stats()["entities"], s.stats()["tombstones"]) for s in c.stores()]))
            assert all(s.stats()["tombstones_collected"] >= 2000 for s in c.stores()), [s.stats() for s in c.stores()]
    run(scenario(), timeout=45)
