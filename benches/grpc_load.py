"""Load generator for B4 (benches/bench_grpc.py), run as its own process.

    python benches/grpc_load.py HOST:PORT --mode unary|stream [--updates 100000]
        [--tracks 10000] [--concurrency 64] [--streams 1] [--batch 1]

Builds every request up front (serialized once, outside the timed part), makes sure
the tracks exist (one untimed PublishEntities stream), then times ``--updates`` position
updates spread over ``--tracks`` tracks:

- unary: UpdateEntity calls, ``--concurrency`` in flight at once (grpc.aio); each
  call's applied/stale keys are read from its trailing metadata (the response is the
  bare entity, as the seed system's contract has it);
- stream: PublishEntities, the updates split over ``--streams`` concurrent streams,
  ``--batch`` entities per request (1: one per message, as old clients send).

Requests and responses cross as raw bytes (no client-side protobuf work in the timed
part). Prints one JSON object: the rate, and the server's own count of writes before
and after (GetStats), so a run that did not apply everything cannot pass for fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc

from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2
from meshstore.grpc.server import UPDATE_RESULT_METADATA

METHOD = "/store.v1.EntityStoreService/"


def entity(i: int, tracks: int) -> entity_pb2.Entity:
    return make_entity(f"track-{i % tracks:05d}", entity_pb2.ENTITY_TYPE_TRACK,
                       position=entity_pb2.PositionComponent(lat=(i % 9000) * 0.01, lon=(i % 18000) * 0.01, alt=100.0))


async def server_writes(channel: grpc.aio.Channel) -> int:
    stats = channel.unary_unary(METHOD + "GetStats", request_serializer=store_pb2.GetStatsRequest.SerializeToString,
                                response_deserializer=store_pb2.GetStatsResponse.FromString)
    return int((await stats(store_pb2.GetStatsRequest(), timeout=30)).values["writes"])


async def publish(channel: grpc.aio.Channel, payloads: list[bytes]) -> store_pb2.PublishSummary:
    call = channel.stream_unary(METHOD + "PublishEntities")()  # bytes in, bytes out
    write = call.write
    for payload in payloads:
        await write(payload)
    await call.done_writing()
    return store_pb2.PublishSummary.FromString(await call)


async def run(args: argparse.Namespace) -> dict:
    n, tracks = args.updates, args.tracks
    entities = [entity(i, tracks) for i in range(n)]
    seed = [store_pb2.PublishRequest(entity=entity(i, tracks)).SerializeToString() for i in range(tracks)]
    if args.mode == "unary":
        payloads = [store_pb2.UpdateEntityRequest(entity=e).SerializeToString() for e in entities]
    elif args.batch == 1:
        payloads = [store_pb2.PublishRequest(entity=e).SerializeToString() for e in entities]
    else:
        b = args.batch
        payloads = [store_pb2.PublishRequest(entities=entities[k:k + b]).SerializeToString() for k in range(0, n, b)]
    del entities
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        seeded = await publish(channel, seed)
        if seeded.rejected:
            raise SystemExit(f"seeding failed: {seeded}")
        writes_before = await server_writes(channel)
        errors = 0
        applied = stale = 0

        start = time.perf_counter()
        if args.mode == "unary":
            update = channel.unary_unary(METHOD + "UpdateEntity")
            c = args.concurrency

            async def worker(k: int) -> tuple[int, int, int]:
                failed = written = refused = 0
                for j in range(k, n, c):
                    call = update(payloads[j], timeout=60)
                    try:
                        await call
                    except grpc.aio.AioRpcError:
                        failed += 1
                        continue
                    keys = store_pb2.UpdateResult.FromString(dict(await call.initial_metadata())[UPDATE_RESULT_METADATA])
                    if keys.applied:
                        written += 1
                    elif keys.stale:
                        refused += 1
                return failed, written, refused

            counts = await asyncio.gather(*(worker(k) for k in range(c)))
            errors, applied, stale = (sum(column) for column in zip(*counts))
        else:
            s = args.streams
            summaries = await asyncio.gather(*(publish(channel, payloads[k::s]) for k in range(s)))
            applied = sum(x.applied for x in summaries)
            stale = sum(x.stale for x in summaries)
            errors = sum(x.rejected for x in summaries)
        seconds = time.perf_counter() - start

        writes = await server_writes(channel) - writes_before
    return {
        "mode": args.mode, "updates": n, "tracks": tracks, "seconds": round(seconds, 4),
        "updates_per_s": round(n / seconds), "applied": applied, "stale": stale, "errors": errors,
        "server_writes": writes, "concurrency": args.concurrency if args.mode == "unary" else args.streams,
        "batch": args.batch if args.mode == "stream" else 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="HOST:PORT of a meshstore server")
    parser.add_argument("--mode", choices=("unary", "stream"), required=True)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--tracks", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64, help="unary calls in flight")
    parser.add_argument("--streams", type=int, default=1, help="concurrent PublishEntities streams")
    parser.add_argument("--batch", type=int, default=1, help="entities per PublishRequest (stream mode)")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
