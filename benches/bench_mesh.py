"""B5: mesh replication over gRPC on loopback, 3 nodes (full mesh) in one process.

- fanout: 10k entity changes written on one node (one ``put_many``) until every node
  has them;
- heal: 10k entities updated on both sides of a partition (node b cut off; a writes a
  velocity, b a threat level on every one), then the partition heals: time until every
  relay is connected and caught up (every change of every node acknowledged by every
  peer, so all stores are equal; checked after the timing). Includes the relays'
  reconnection on their own backoff (capped at 0.25 s here).

Each with and without a per-link budget. The baseline, measured in the same run, is
the in-process cost of the same replication: merging the same replica states directly
store to store (10k for fanout; 2 x 10k for heal), without gRPC, relays or batching.
``ratio_vs_inprocess_merge`` is mesh time / baseline. Target: under 1 s unbudgeted.

All three nodes share one process, one event loop and one GIL, so every merge and send
of the three nodes is serialized on this machine: a real deployment spreads them.

Knobs (environment): B5_ENTITIES (10000), B5_ROUNDS (3).
Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore import Store
from meshstore.components import make_entity
from meshstore.pb import entity_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from partition import Cluster, eventually  # noqa: E402

N = int(os.environ.get("B5_ENTITIES", 10_000))
ROUNDS = int(os.environ.get("B5_ROUNDS", 3))
#: A budget that binds: 8 MB/s per link with a 256 KiB burst (10k states are ~1.9 MB).
BUDGET = {"bandwidth_bps": 8_000_000, "burst_bytes": 256 * 1024}


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


@pytest.fixture
def say(request: pytest.FixtureRequest):
    """benches/conftest.py's summary reporter when present, else a plain print."""
    try:
        return request.getfixturevalue("bench_report")
    except pytest.FixtureLookupError:
        return lambda line: print(line, flush=True)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def entities(prefix: str, **components) -> list[bytes]:
    return [make_entity(f"{prefix}{i}", pb.ENTITY_TYPE_TRACK,
                        **{k: v(i) for k, v in components.items()}).SerializeToString()
            for i in range(N)]


def merge_baseline(batches: list[list[bytes]]) -> float:
    """Best of 3: seconds to merge each list of replica states into a fresh store."""
    best = float("inf")
    for _ in range(3):
        stores = [Store(node_id=f"base{i}") for i in range(len(batches))]
        start = time.perf_counter()
        for store, states in zip(stores, batches, strict=True):
            for state in states:
                store.merge(state, source="x")
        best = min(best, time.perf_counter() - start)
        for store in stores:
            store.close()
    return best


def counts(store: Store) -> int:
    return store.stats()["entities"]


class Rounds:
    """Builds a fresh cluster per round (untimed) and stops the previous one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, relay_options: dict) -> None:
        self.loop = loop
        self.relay_options = relay_options
        self.cluster: Cluster | None = None
        self.sent_bytes: list[int] = []

    def fresh(self) -> Cluster:
        self.close()
        self.cluster = Cluster("abc", relay_options=self.relay_options)
        self.loop.run_until_complete(self.cluster.start())
        self.loop.run_until_complete(self.cluster.settle())
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.loop.run_until_complete(self.cluster.stop())
            self.cluster = None

    def total_bytes(self) -> int:
        return sum(p["sent_bytes"] for n in self.cluster.nodes.values() for p in n.peer_stats().values())

    def timed(self, phase) -> None:
        """Runs ``phase`` (a coroutine function) and records the bytes it sent, all links."""
        before = self.total_bytes()
        self.loop.run_until_complete(phase())
        self.sent_bytes.append(self.total_bytes() - before)


def report(benchmark: BenchmarkFixture, say, baseline: float, rounds: Rounds, relay_options: dict) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["entities"] = N
    benchmark.extra_info["seconds_mean"] = round(mean, 4)
    benchmark.extra_info["seconds_min"] = round(benchmark.stats.stats.min, 4)
    benchmark.extra_info["inprocess_merge_baseline_s"] = round(baseline, 4)
    benchmark.extra_info["ratio_vs_inprocess_merge"] = round(mean / baseline, 2)
    benchmark.extra_info["bandwidth_bps_per_link"] = relay_options.get("bandwidth_bps", 0)
    if rounds.sent_bytes:
        benchmark.extra_info["bytes_sent_all_links"] = max(rounds.sent_bytes)
        benchmark.extra_info["mb_per_s_all_links"] = round(max(rounds.sent_bytes) / mean / 1e6, 1)
    budget = relay_options.get("bandwidth_bps", 0)
    say(f"B5 {benchmark.name}: mean {mean:.3f}s min {benchmark.stats.stats.min:.3f}s for {N} entities; "
                 f"in-process merge baseline {baseline:.3f}s (ratio {mean / baseline:.1f}x); "
                 f"budget {f'{budget / 1e6:g} MB/s per link' if budget else 'unlimited'}")


@pytest.mark.benchmark(group="mesh-b5-fanout")
@pytest.mark.parametrize("budgeted", [False, True], ids=["unbudgeted", "budgeted"])
def test_b5_fanout_10k_changes_reach_every_node(benchmark: BenchmarkFixture, say, loop,
                                               budgeted: bool) -> None:
    relay_options = dict(BUDGET) if budgeted else {}
    batch = entities("e", position=lambda i: pb.PositionComponent(lat=i % 90, lon=i % 180))
    source = Store(node_id="src")
    source.put_many(batch)
    baseline = merge_baseline([source.replica_changes(0)[0]])
    source.close()
    rounds = Rounds(loop, relay_options)

    def setup():
        return (rounds.fresh(),), {}

    def fanout(cluster: Cluster) -> None:
        async def go():
            b, c = cluster["b"].store, cluster["c"].store
            # Each entity changes b and c exactly once: their seq says how far they got
            # (stats() would walk every entity at each poll).
            b_done, c_done = b.seq + N, c.seq + N
            cluster["a"].store.put_many(batch)
            await eventually(lambda: b.seq >= b_done and c.seq >= c_done, timeout=60, interval=0.002)
        rounds.timed(go)

    try:
        benchmark.pedantic(fanout, setup=setup, rounds=ROUNDS, iterations=1)
        cluster = rounds.cluster
        loop.run_until_complete(cluster.settle())
        first = cluster["a"].store.list()
        assert cluster["b"].store.list() == first == cluster["c"].store.list()
    finally:
        rounds.close()
    report(benchmark, say, baseline, rounds, relay_options)


@pytest.mark.benchmark(group="mesh-b5-heal")
@pytest.mark.parametrize("budgeted", [False, True], ids=["unbudgeted", "budgeted"])
def test_b5_converge_after_a_partition_with_10k_divergent_entities(
        benchmark: BenchmarkFixture, say, loop, budgeted: bool) -> None:
    relay_options = dict(BUDGET) if budgeted else {}
    initial = entities("d", position=lambda i: pb.PositionComponent(lat=1, lon=2))
    on_a = entities("d", velocity=lambda i: pb.VelocityComponent(speed=100 + i))
    on_b = entities("d", threat=lambda i: pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH))
    # Baseline: the two sides' 10k divergent states merged into each other in-process.
    side_a, side_b = Store(node_id="sa"), Store(node_id="sb")
    for side, update in ((side_a, on_a), (side_b, on_b)):
        side.put_many(initial)
        side.put_many(update)
    baseline = merge_baseline([side_b.replica_changes(0)[0], side_a.replica_changes(0)[0]])
    side_a.close()
    side_b.close()
    rounds = Rounds(loop, relay_options)
    connect_times: list[float] = []

    def setup():
        cluster = rounds.fresh()

        async def diverge():
            cluster["a"].store.put_many(initial)
            await eventually(lambda: all(counts(s) == N for s in cluster.stores()), timeout=60)
            await cluster.settle(60)
            await cluster["b"].partition()
            cluster["a"].store.put_many(on_a)
            cluster["b"].store.put_many(on_b)
            a, c = cluster["a"], cluster["c"]
            await eventually(lambda: a.peer_stats()[c.address]["lag"] == 0
                             and c.peer_stats()[a.address]["lag"] == 0, timeout=60)
        loop.run_until_complete(diverge())
        return (cluster,), {}

    def heal(cluster: Cluster) -> None:
        async def go():
            start = time.perf_counter()
            await cluster["b"].heal()
            await eventually(lambda: all(p["connected"] for n in cluster.nodes.values()
                                         for p in n.peer_stats().values()), timeout=60, interval=0.002)
            connect_times.append(time.perf_counter() - start)
            await eventually(cluster.synced, timeout=60, interval=0.002)
        rounds.timed(go)

    try:
        benchmark.pedantic(heal, setup=setup, rounds=ROUNDS, iterations=1)
        cluster = rounds.cluster
        first = cluster["a"].store.list()
        assert len(first) == N
        assert cluster["b"].store.list() == first == cluster["c"].store.list()
        assert all(e.components["threat"].value == b"\x08\x04" for e in first)
    finally:
        rounds.close()
    benchmark.extra_info["reconnect_s_mean"] = round(sum(connect_times) / len(connect_times), 4)
    report(benchmark, say, baseline, rounds, relay_options)
