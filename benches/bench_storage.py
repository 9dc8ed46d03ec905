"""B7 and B8: what durability costs.

- B7 store: B3's ``put_many`` (batches of 1,000 serialized 4-component tracks, 100k
  tracks, 50k per round, B7_ROUNDS rounds) into an in-memory store and into stores with
  a data dir, in ``commit`` and ``interval`` durability, in one run. The time runs until
  every write is on disk (``Store.sync``), so the figure is sustained durable throughput
  (the writer thread commits while the caller writes).
  Targets: commit >= 50%, interval >= 80% of in-memory.
- B7 gRPC: B4's streaming load (PublishEntities, 100 entities per message) against
  ``meshstore serve --in-memory`` and with ``--durability commit`` / ``interval``; the
  commit server answers each stream only once it is on disk.
- B8: restart time of a store holding 1M tracks (``Store(path=...)`` until it answers
  ``stats()``; closing the previous one is not timed),
  against building the same 1M tracks in memory from serialized bytes in the same run;
  and the data dir's bytes per track. Target: restart < 5 s.

Knobs: B7_ROUNDS (default 5), B7_REPEATS (timed repeats, the median counts; default 3),
B8_TRACKS (default 1,000,000).
Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable

import pytest
from bench_grpc import run_load, served
from bench_store import B3_PER_ROUND, N, SOURCES, THREATS, Entity, kinematics, track_batches
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore import Store
from meshstore.pb import entity_pb2 as pb

ROUNDS = int(os.environ.get("B7_ROUNDS", 5))
REPEATS = int(os.environ.get("B7_REPEATS", 3))
B8_TRACKS = int(os.environ.get("B8_TRACKS", 1_000_000))
TARGETS = {"commit": 0.5, "interval": 0.8}
B8_TARGET_S = 5.0

pytestmark = pytest.mark.benchmark(group="storage")

B7_RESULTS: dict[str, float] = {}
B7_GRPC_RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


def _ratio_line(kind: str, mode: str, rate: float, results: dict[str, float]) -> str:
    base = results.get("memory")
    if mode == "memory" or base is None:
        return ""
    ratio = rate / base
    target = TARGETS[mode]
    return f"; {ratio:.2f}x in-memory [target {target:g}x: {'MET' if ratio >= target else 'MISSED'}]"


@pytest.mark.parametrize("mode", ["memory", "commit", "interval"])
def test_b7_put_many_durable(benchmark: BenchmarkFixture, mode: str, tmp_path: pathlib.Path,
                             bench_report: Callable[[str], None]) -> None:
    store = Store(node_id="b7") if mode == "memory" else Store(node_id="b7", path=tmp_path / "data", durability=mode)
    try:
        for batch in track_batches(0, serialized=True):  # the 100k tracks, untimed
            store.put_many(batch)
        store.sync(120)
        gens = iter(range(1, 1_000_000))

        def fresh_input() -> tuple[tuple, dict]:  # untimed: ROUNDS rounds of new values
            return ([track_batches(g, True, first=(g % 2) * B3_PER_ROUND, n=B3_PER_ROUND)
                     for g in (next(gens) for _ in range(ROUNDS))],), {}

        def ingest(rounds: list[list[list[bytes]]]) -> None:
            for batches in rounds:
                for batch in batches:
                    store.put_many(batch)
            store.sync(300)  # counts only once everything is on disk (a no-op in memory)

        benchmark.pedantic(ingest, setup=fresh_input, rounds=REPEATS, iterations=1)
        stats = store.stats()
    finally:
        store.close()
    rate = B3_PER_ROUND * ROUNDS / benchmark.stats.stats.median
    B7_RESULTS[mode] = rate
    info = benchmark.extra_info
    info.update(mode=mode, entity_updates_per_s=round(rate), rounds=ROUNDS, repeats=REPEATS, tracks=N)
    extra = ""
    if mode != "memory":
        info.update(commits=stats["commits"], commit_ms_p50=stats["commit_ms_p50"], commit_ms_p99=stats["commit_ms_p99"],
                    storage_bytes=stats["storage_bytes"])
        extra = (f" ({stats['commits']} commits, p50 {stats['commit_ms_p50']:.1f} ms, p99 {stats['commit_ms_p99']:.1f} ms, "
                 f"{stats['storage_bytes'] / N:.0f} B/track on disk)")
    bench_report(f"B7 put_many x1000 from bytes, {mode}: {rate / 1e3:,.0f}k entity updates/s (median of {REPEATS}){extra}"
                 f"{_ratio_line('store', mode, rate, B7_RESULTS)}")


@pytest.mark.parametrize("mode", ["memory", "commit", "interval"])
def test_b7_grpc_streaming_durable(benchmark: BenchmarkFixture, mode: str, tmp_path: pathlib.Path,
                                   bench_report: Callable[[str], None]) -> None:
    args = ("--in-memory",) if mode == "memory" else ("--data-dir", str(tmp_path / "data"), "--durability", mode)
    with served(tmp_path, *args) as addr:
        result = benchmark.pedantic(run_load, args=(addr, "stream-batched"), rounds=1, iterations=1)
    assert result["errors"] == 0, result
    rate = result["updates_per_s"]
    B7_GRPC_RESULTS[mode] = rate
    benchmark.extra_info.update(mode=mode, updates_per_s=rate, seconds=result["seconds"])
    bench_report(f"B7 gRPC PublishEntities x100, {mode}: {rate:,} updates/s"
                 f"{_ratio_line('grpc', mode, rate, B7_GRPC_RESULTS)}")


def test_b8_restart(benchmark: BenchmarkFixture, tmp_path: pathlib.Path, bench_report: Callable[[str], None]) -> None:
    batches = _track_batches(B8_TRACKS)
    path = tmp_path / "data"
    t0 = time.perf_counter()
    store = Store(node_id="b8", path=path, durability="interval")
    for batch in batches:
        store.put_many(batch)
    store.close()
    durable_build_s = time.perf_counter() - t0

    memory = Store(node_id="b8-mem")
    t0 = time.perf_counter()
    for batch in batches:
        memory.put_many(batch)
    memory_s = time.perf_counter() - t0
    memory.close()
    del batches, memory

    opened: list[Store] = []

    def close_previous() -> None:  # untimed: restart time is until the store answers
        while opened:
            opened.pop().close()

    def restart() -> int:
        opened.append(Store(node_id="b8", path=path))
        return opened[-1].stats()["entities"]

    count = benchmark.pedantic(restart, setup=close_previous, rounds=3, iterations=1)
    close_previous()
    assert count == B8_TRACKS
    load_s = benchmark.stats.stats.median
    size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("meshstore.db"))
    per_track = size / B8_TRACKS
    benchmark.extra_info.update(tracks=B8_TRACKS, restart_s=round(load_s, 3), in_memory_build_s=round(memory_s, 3),
                                durable_build_s=round(durable_build_s, 3), bytes_per_track=round(per_track))
    bench_report(f"B8 restart with {B8_TRACKS:,} tracks: {load_s:.2f} s (median of 3) "
                 f"[target < {B8_TARGET_S:g} s: {'MET' if load_s < B8_TARGET_S else 'MISSED'}]; building them in memory "
                 f"from bytes: {memory_s:.2f} s (restart = {load_s / memory_s:.2f}x that); data dir {per_track:.0f} B/track")


def _track_batches(n: int) -> list[list[bytes]]:
    """``n`` serialized 4-component tracks (B3's shape, ids of their own), in batches of 1,000."""
    out = []
    for start in range(0, n, 1000):
        batch = []
        for i in range(start, min(start + 1000, n)):
            pos, vel = kinematics(i % N, 0)
            comps = {"position": pos, "velocity": vel, "threat": THREATS[i % 4], "source": SOURCES[i % 8]}
            batch.append(Entity(id=f"t{i:07d}", type=pb.ENTITY_TYPE_TRACK, components=comps).SerializeToString())
        out.append(batch)
    return out
