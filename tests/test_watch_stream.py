"""meshstore.grpc.client.WatchStream against a real node: events and raw batches, the
cursor a consumer resumes from, and nack() (an event or batch not handled comes again)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from meshstore import Store
from meshstore.components import make_entity
from meshstore.grpc.client import Backoff, StoreClient
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2

FAST = Backoff(initial=0.01, maximum=0.05)
TRACK = pb.ENTITY_TYPE_TRACK


def _track(entity_id: str, lat: float) -> pb.Entity:
    return make_entity(entity_id, TRACK, position=pb.PositionComponent(lat=lat, lon=1.0))


async def _next(it: AsyncIterator[Any]) -> Any:
    return await asyncio.wait_for(anext(it), 10)


def test_batches_come_as_bytes_and_move_the_cursor_once_handled(make_store: Any) -> None:
    store: Store = make_store(node_id="watch-batches")

    async def run() -> None:
        async with Node(store=store, port=0, grace=0.2) as node, StoreClient(node.address, backoff=FAST) as client:
            stream = client.watch(TRACK, include_existing=True, heartbeat_interval=0.1)
            batches = stream.batches()
            store.put_many([_track(f"t{i}", float(i)) for i in range(5)])
            seen: set[str] = set()
            seqs: list[int] = []
            while len(seen) < 5:
                raw = await _next(batches)
                assert isinstance(raw, bytes)
                for ev in store_pb2.EntityEventBatch.FromString(raw).events:
                    seqs.append(ev.seq)
                    if ev.type != store_pb2.EVENT_TYPE_HEARTBEAT:
                        seen.add(ev.entity.id)
                # Not yet past this batch: the cursor stays before it until the next is asked for.
                assert stream.cursor is None or stream.cursor < max(seqs)
            await _next(batches)  # asking for the next one (a heartbeat at least): the last is handled
            assert stream.cursor is not None and stream.cursor >= max(seqs)
            assert stream.events == 5  # heartbeats are not counted
            await batches.aclose()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_nacked_event_or_batch_comes_again(make_store: Any) -> None:
    store: Store = make_store(node_id="watch-nack")

    async def run() -> None:
        async with Node(store=store, port=0, grace=0.2) as node, StoreClient(node.address, backoff=FAST) as client:
            store.put(_track("a", 1.0))
            events = client.watch(TRACK, include_existing=True)
            it = aiter(events)
            first = await _next(it)
            assert first.entity.id == "a"
            events.nack()  # not handled: the stream reconnects and resumes from before it
            again = await _next(it)
            assert again.entity.id == "a" and events.resumes == 1
            await it.aclose()

            stream = client.watch(TRACK, include_existing=True)
            batches = stream.batches()
            raw = await _next(batches)
            ids = [ev.entity.id for ev in store_pb2.EntityEventBatch.FromString(raw).events]
            assert ids == ["a"]
            stream.nack()
            raw = await _next(batches)
            assert [ev.entity.id for ev in store_pb2.EntityEventBatch.FromString(raw).events] == ["a"]
            assert stream.resumes == 1 and stream.cursor is None
            await batches.aclose()

    asyncio.run(asyncio.wait_for(run(), 60))
