"""Paced track load for benches/bench_http.py, run as its own process.

    python benches/http_load.py HOST:PORT [--tracks 10000] [--rate 1] [--seconds 10] [--batch 100]

Updates the position of ``--tracks`` tracks ``--rate`` times per second each, for
``--seconds``, over one PublishEntities stream: ``--batch`` entities per request, the
requests spread evenly over each second (a sensor's ticks, not one burst). ``--rate 0``
sends as fast as the server takes them. Every update changes the value (rounds of
positions cycle), so each one is a real change for watchers. The tracks are created
first (untimed). Requests are serialized up front.

Prints ``started`` when the timed part begins, then one JSON object: updates sent, seconds, the achieved rate and the server's own
count of writes during the run (GetStats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2

METHOD = "/store.v1.EntityStoreService/"
ROUNDS = 4  # distinct positions per track, cycled: consecutive updates always differ


def requests(tracks: int, batch: int, round_: int) -> list[bytes]:
    out = []
    for k in range(0, tracks, batch):
        entities = [make_entity(f"track-{i:05d}", entity_pb2.ENTITY_TYPE_TRACK,
                                position=entity_pb2.PositionComponent(lat=50 + (i % 1000) * 0.001 + round_ * 1e-4,
                                                                      lon=(i // 1000) * 0.01, alt=100.0),
                                velocity=entity_pb2.VelocityComponent(speed=100.0 + round_, heading=90.0))
                    for i in range(k, min(k + batch, tracks))]
        out.append(store_pb2.PublishRequest(entities=entities).SerializeToString())
    return out


async def writes(channel: grpc.aio.Channel) -> int:
    stats = channel.unary_unary(METHOD + "GetStats", request_serializer=store_pb2.GetStatsRequest.SerializeToString,
                                response_deserializer=store_pb2.GetStatsResponse.FromString)
    return int((await stats(store_pb2.GetStatsRequest(), timeout=30)).values["writes"])


async def publish(channel: grpc.aio.Channel, payloads: list[bytes]) -> store_pb2.PublishSummary:
    call = channel.stream_unary(METHOD + "PublishEntities")()
    for payload in payloads:
        await call.write(payload)
    await call.done_writing()
    return store_pb2.PublishSummary.FromString(await call)


async def run(args: argparse.Namespace) -> dict:
    rounds = [requests(args.tracks, args.batch, r) for r in range(ROUNDS)]
    per_round = len(rounds[0])
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        seeded = await publish(channel, rounds[-1])
        if seeded.rejected:
            raise SystemExit(f"seeding failed: {seeded}")
        before = await writes(channel)
        call = channel.stream_unary(METHOD + "PublishEntities")()
        sent = 0
        print("started", flush=True)  # the timed part begins (the bench measures from here)
        start = time.perf_counter()
        end = start + args.seconds
        # Paced: request j of the whole run is due at start + j * gap.
        gap = 1.0 / (args.rate * per_round) if args.rate > 0 else 0.0
        j = 0
        while (now := time.perf_counter()) < end:
            if gap:
                due = start + j * gap
                if due > now:
                    await asyncio.sleep(due - now)
                    if time.perf_counter() >= end:
                        break
            await call.write(rounds[(j // per_round) % ROUNDS][j % per_round])
            sent += min(args.batch, args.tracks - (j % per_round) * args.batch)
            j += 1
        await call.done_writing()
        summary = store_pb2.PublishSummary.FromString(await call)
        seconds = time.perf_counter() - start
        written = await writes(channel) - before
    return {"tracks": args.tracks, "rate": args.rate, "seconds": round(seconds, 3), "sent": sent,
            "updates_per_s": round(sent / seconds), "applied": summary.applied, "rejected": summary.rejected,
            "server_writes": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="HOST:PORT of a meshstore server")
    parser.add_argument("--tracks", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1.0, help="updates per track per second (0: as fast as possible)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=100, help="entities per PublishRequest")
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
