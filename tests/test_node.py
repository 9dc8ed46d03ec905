"""meshstore.node.Node: one store, its gRPC server (store service, mesh receiver, health)
and its relay, with one lifecycle. Real gRPC on 127.0.0.1, each scenario on its own
event loop (``partition.run``), waits bounded (``eventually``)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshstore import Store, StoreOptions
from meshstore.components import make_entity
from meshstore.mesh.protocol import PUSH_METHOD
from meshstore.mesh.relay import Relay
from meshstore.node import Node, NodeOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import mesh_pb2, store_pb2, store_pb2_grpc
from partition import FAST_RELAY, eventually, free_ports, run

pytestmark = pytest.mark.timeout(60)


def track(entity_id: str) -> pb.Entity:
    return make_entity(entity_id, pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=1, lon=2))


def has(store: Store, entity_id: str) -> bool:
    return any(e.id == entity_id for e in store.list())


def closes(store: Store) -> list[int]:
    """Records calls to ``store.close`` (and still closes it)."""
    calls: list[int] = []
    close = store.close

    def recording() -> None:
        calls.append(1)
        close()

    store.close = recording  # type: ignore[method-assign]
    return calls


async def stats(address: str) -> store_pb2.GetStatsResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await store_pb2_grpc.EntityStoreServiceStub(channel).GetStats(store_pb2.GetStatsRequest(), timeout=5)


# ---- options --------------------------------------------------------------------------------


def test_options_are_checked_when_the_node_is_made() -> None:
    for bad in ({"port": 70000}, {"port": -1}, {"max_message_bytes": 10}, {"grace": -1},
                {"peers": "127.0.0.1:1"}, {"peers": ["127.0.0.1:1", " 127.0.0.1:1"]}, {"peers": [""]},
                {"grpc_workers": 0}, {"grpc_workers": 1025}, {"grpc_workers": 1.5}, {"grpc_workers": True},
                {"grpc_workers": "2"}):
        with pytest.raises(ValueError):
            NodeOptions(**bad)
    with pytest.raises(TypeError):
        Node(store=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Node(options={"port": 0})  # type: ignore[arg-type]
    options = NodeOptions(port=0, peers=["127.0.0.1:1 "])
    assert options.peers == ("127.0.0.1:1",)
    store = Store(node_id="opts")
    try:
        node = Node(options, store=store, grace=1.5)  # overrides replace fields of the options
        assert node.options.grace == 1.5 and node.options.peers == ("127.0.0.1:1",)
        assert node.relay is not None and node.relay.peers == ["127.0.0.1:1"]
        assert node.store is store and not node.running
        with pytest.raises(RuntimeError, match="not started"):
            node.address  # noqa: B018
    finally:
        store.close()


# ---- lifecycle ------------------------------------------------------------------------------


def test_a_node_made_from_store_options_closes_its_store_and_a_given_store_stays_open() -> None:
    async def scenario() -> None:
        async with Node(store=StoreOptions(node_id="own")) as node:
            owned = closes(node.store)
            assert node.port > 0 and node.address == f"127.0.0.1:{node.port}" and node.running
            assert node.store.node_id == "own" and node.relay is None
            node.store.put(track("t1"))
            assert (await stats(node.address)).node_id == "own"
        assert owned == [1] and not node.running

        given = Store(node_id="given")
        calls = closes(given)
        async with Node(store=given):
            pass
        assert calls == []
        given.close()
    run(scenario())


def test_start_on_a_taken_port_fails_and_the_node_is_done() -> None:
    async def scenario() -> None:
        async with Node() as first:
            second = Node(port=first.port, store=StoreOptions(node_id="second"))
            owned = closes(second.store)
            with pytest.raises(OSError, match="cannot listen"):
                await second.start()
            assert owned == [1]
            with pytest.raises(RuntimeError, match="cannot start again"):
                await second.start()
            await second.stop()  # harmless
    run(scenario())


def test_drain_ends_watch_and_mesh_streams_and_goes_not_serving_before_the_grace_period() -> None:
    async def scenario() -> None:
        node = await Node(store=StoreOptions(node_id="drained"), grace=10.0).start()
        channel = grpc.aio.insecure_channel(node.address)
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service="mesh.v1.MeshService"), timeout=5)).status \
            == health_pb2.HealthCheckResponse.SERVING
        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await health_watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch = store_pb2_grpc.EntityStoreServiceStub(channel).WatchEntities(store_pb2.WatchEntitiesRequest())
        push = channel.stream_stream(PUSH_METHOD, request_serializer=lambda b: b,
                                     response_deserializer=mesh_pb2.PushResponse.FromString)()
        await push.write(mesh_pb2.PushRequest(hello=mesh_pb2.Hello(node_id="peer", incarnation=1)).SerializeToString())
        assert (await push.read()).HasField("hello")
        await eventually(lambda: node.stats()["server"]["watch_streams"] == 1 and
                         node.receiver.stats()["streams_open"] == 1, what="both streams open")

        started = time.monotonic()
        await node.drain()
        assert time.monotonic() - started < 5.0  # not the 10 s grace: the streams were ended
        assert (await health_watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        for call in (watch, push):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in info.value.details()
        assert node.receiver.stats()["streams_open"] == 0
        node.store.put(track("after-drain"))  # the store stays open until stop
        await node.drain()  # idempotent
        await node.stop()
        await channel.close(None)
    run(scenario())


def test_peers_make_a_relay_and_get_stats_reports_each_link() -> None:
    async def scenario() -> None:
        async with Node(store=StoreOptions(node_id="b")) as b:
            async with Node(store=StoreOptions(node_id="a"), peers=[b.address], relay_options=FAST_RELAY) as a:
                assert a.relay is not None and a.relay.running and b.relay is None
                a.store.put(track("t1"))
                await eventually(lambda: has(b.store, "t1"), what="b has a's write")
                await eventually(lambda: a.stats()["relay"]["peers"][b.address]["acked_seq"] >= a.store.seq,
                                 what="b acknowledged")
                values = (await stats(a.address)).values
                assert values[f"peer.{b.address}.connected"] == 1.0
                assert values[f"peer.{b.address}.acked_seq"] >= 1
                assert values["mesh.streams_open"] == 0.0
                assert (await stats(b.address)).values["mesh.streams_open"] == 1.0
                relay = a.relay
            assert not relay.running  # the node stopped the relay it made
    run(scenario())


def test_start_relay_joins_nodes_whose_ports_are_known_only_once_they_listen() -> None:
    async def scenario() -> None:
        nodes = [await Node(store=StoreOptions(node_id=name), relay_options=FAST_RELAY).start() for name in "xyz"]
        try:
            for node in nodes:
                await node.start_relay([n.address for n in nodes if n is not node])
            with pytest.raises(RuntimeError, match="already has a relay"):
                await nodes[0].start_relay([nodes[1].address])
            nodes[0].store.put(track("from-x"))
            nodes[2].store.put(track("from-z"))
            for node in nodes:
                await eventually(lambda: has(node.store, "from-x") and has(node.store, "from-z"),
                                 what=f"{node.store.node_id} has both writes")
        finally:
            for node in nodes:
                await node.stop(0)
    run(scenario())


def test_an_attached_relay_is_used_but_not_started_or_stopped_by_the_node() -> None:
    async def scenario() -> None:
        store = Store(node_id="att")
        (dead,) = free_ports(1)
        relay = Relay(store, [f"127.0.0.1:{dead}"], **FAST_RELAY)
        node = Node(store=store)
        node.attach_relay(relay)
        await node.start()
        assert not relay.running and node.relay is relay and node.receiver.relay is relay
        await relay.start()
        values = (await stats(node.address)).values
        assert values[f"peer.127.0.0.1:{dead}.connected"] == 0.0
        await node.stop(0)
        assert relay.running
        await relay.stop()
        with pytest.raises(ValueError):
            Node().attach_relay(relay)  # another store's relay
        owner = Node(peers=[f"127.0.0.1:{dead}"])
        with pytest.raises(RuntimeError, match="its own relay"):
            owner.attach_relay(relay)
        await owner.stop()
        store.close()
    run(scenario())


def test_run_until_signal_serves_until_asked_then_drains_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = Node(store=StoreOptions(node_id="runner"))
        stop = asyncio.Event()
        task = asyncio.create_task(node.run_until_signal(stop))
        await eventually(lambda: node.running, what="node running")
        assert (await stats(node.address)).node_id == "runner"
        stop.set()
        await asyncio.wait_for(task, 10)
        assert not node.running

    with caplog.at_level(logging.INFO, logger="meshstore.node"):
        run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "meshstore.node"]
    assert messages == ["listening", "shutting down", "stopped"]
    listening = next(r for r in caplog.records if r.getMessage() == "listening")
    assert listening.fields["node_id"] == "runner" and listening.fields["peers"] == "none"
