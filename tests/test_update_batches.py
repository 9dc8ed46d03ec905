"""Services write in batches: ``StoreClient.update_many`` (the UpdateEntities RPC) answers
each entity alone, and ``UpdateBatcher`` gathers what concurrent handlers write while a
call is on its way into the next call, answering each caller as ``StoreClient.update``
would. Against a real node on 127.0.0.1; the server's per-method counters count calls.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from meshstore.components import CLASSIFICATION, POSITION, THREAT, VELOCITY, make_entity
from meshstore.errors import InvalidEntityError, NotFoundError
from meshstore.grpc.client import StoreClient, StoreUnavailableError, UpdateBatcher
from meshstore.node import Node, NodeOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.services.classifier import Classifier

pytestmark = pytest.mark.timeout(120)

TRACK = pb.ENTITY_TYPE_TRACK
UPDATE_ENTITIES = "/store.v1.EntityStoreService/UpdateEntities"


def arun(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def track(i: int, lat: float = 1.0, **components: Any) -> pb.Entity:
    return make_entity(f"t-{i}", TRACK, position=pb.PositionComponent(lat=lat, lon=i / 1e4), **components)


def calls(node: Node) -> int:
    return node.stats()["server"]["methods"].get(UPDATE_ENTITIES, {}).get("calls", 0)


def test_concurrent_updates_share_calls_and_each_caller_gets_its_own_answer() -> None:
    n = 300

    async def scenario() -> None:
        async with Node(NodeOptions(port=0)) as node:
            node.store.put_many([track(i) for i in range(n)])
            async with StoreClient(node.address) as client:
                batcher = UpdateBatcher(client, components=[POSITION])
                writes = [batcher.update(track(i, lat=2.0)) for i in range(n)]
                writes.append(batcher.update(track(n + 1)))  # no such entity
                writes.append(batcher.update(track(0, lat=float("nan"))))  # refused by the store
                results = await asyncio.gather(*writes, return_exceptions=True)
                assert all(r.applied == [POSITION] and r.entity.id == f"t-{i}" for i, r in enumerate(results[:n]))
                assert isinstance(results[n], NotFoundError) and isinstance(results[n + 1], InvalidEntityError)
                assert set(results[0].entity.components) == {POSITION}
                # One call carries the whole burst (a second only if the loop split it).
                assert 1 <= batcher.calls == calls(node) <= 2 and batcher.updates == n + 2
                assert all(node.store.get(f"t-{i}").components[POSITION] == track(i, lat=2.0).components[POSITION]
                           for i in range(n))
                # A lone update goes at once, in a call of its own.
                assert (await batcher.update(track(1, lat=3.0))).applied == [POSITION]
                assert batcher.calls == calls(node)

    arun(scenario())


def test_a_cancelled_caller_leaves_the_others_answered() -> None:
    async def scenario() -> None:
        async with Node(NodeOptions(port=0)) as node:
            node.store.put_many([track(i) for i in range(3)])
            async with StoreClient(node.address) as client:
                batcher = UpdateBatcher(client)
                tasks = [asyncio.create_task(batcher.update(track(i, lat=5.0))) for i in range(3)]
                await asyncio.sleep(0)  # each has queued its update
                tasks[1].cancel()
                done = await asyncio.gather(*tasks, return_exceptions=True)
                assert isinstance(done[1], asyncio.CancelledError)
                assert done[0].applied == [POSITION] and done[2].applied == [POSITION]

    arun(scenario())


def test_each_caller_gets_the_error_of_a_store_that_is_gone() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"

    async def scenario() -> None:
        async with StoreClient(address, rpc_timeout=0.5) as client:
            batcher = UpdateBatcher(client)
            results = await asyncio.gather(*(batcher.update(track(i)) for i in range(5)), return_exceptions=True)
            assert all(isinstance(r, StoreUnavailableError) for r in results)
            assert batcher._sender is None and not batcher._waiting  # nothing left behind

    arun(scenario())


def test_the_classifier_answers_a_burst_of_new_tracks_in_few_calls() -> None:
    n = 400

    async def scenario() -> None:
        async with Node(NodeOptions(port=0)) as node:
            node.store.put_many([track(i, velocity=pb.VelocityComponent(speed=50.0 * (i % 10)))
                                 for i in range(n)])
            classifier = Classifier(node.address)
            run = asyncio.create_task(classifier.run())
            try:
                deadline = asyncio.get_running_loop().time() + 30
                while classifier.counters["writes"] < n:
                    assert asyncio.get_running_loop().time() < deadline, classifier.counters
                    await asyncio.sleep(0.05)
                assert all(CLASSIFICATION in e.components and THREAT in e.components for e in node.store.list(TRACK))
                assert classifier.counters["writes"] == n
                # Far fewer calls than tracks: the writes of tracks handled together share one.
                assert calls(node) <= n // 8, calls(node)
            finally:
                await classifier.stop()
                await run

    arun(scenario())
