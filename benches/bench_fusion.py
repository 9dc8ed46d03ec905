"""Benchmark for meshstore.services.fusion: a correlation pass over 10k tracks.

5,000 targets in a 2 x 2 degree box, each seen by an EO sensor (exact) and a radar (50 m
Gaussian noise): 10,000 tracks from two sensor types, a 500 m correlation gate. Timed:

- the grid pass (``Correlator.correlate()``: spatial grid, 3x3 neighbourhood), from
  scratch (every pair formed) and in steady state (pairs kept, tracks moved a little);
- an all-pairs pass over the same data in the same run (``correlate(brute=True)``),
  which must give the same fused tracks.

Both and their ratio go into extra_info and the bench summary.

Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore.services.fusion import Correlator, Obs
from meshstore.services.scenario import offset_position

TARGETS = 5_000
MAX_DISTANCE = 500.0
ROUNDS = 5

pytestmark = pytest.mark.benchmark(group="fusion-correlation")


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


def make_tracks(seed: int = 20240601, jitter_m: float = 50.0) -> list[Obs]:
    rng = random.Random(seed)
    tracks = []
    for i in range(TARGETS):
        lat, lon = rng.uniform(50.0, 52.0), rng.uniform(-1.0, 1.0)
        tracks.append(Obs(f"eo-{i}", "eo", lat, lon))
        rlat, rlon = offset_position(lat, lon, rng.gauss(0, jitter_m), rng.gauss(0, jitter_m))
        tracks.append(Obs(f"radar-{i}", "radar", rlat, rlon))
    return tracks


def loaded(tracks: list[Obs]) -> Correlator:
    c = Correlator(MAX_DISTANCE)
    for t in tracks:
        c.upsert(t)
    return c


@pytest.fixture(scope="module")
def tracks() -> list[Obs]:
    return make_tracks()


@pytest.fixture(scope="module")
def all_pairs(tracks: list[Obs]) -> tuple[float, dict]:
    """One all-pairs pass (it takes seconds): its time and result."""
    c = loaded(tracks)
    start = time.perf_counter()
    result = c.correlate(brute=True)
    return time.perf_counter() - start, result.fused


def test_correlation_pass_10k_tracks_grid_vs_all_pairs(
    benchmark: BenchmarkFixture, tracks: list[Obs], all_pairs: tuple[float, dict],
    bench_report: Callable[[str], None],
) -> None:
    results = []

    def setup() -> tuple[tuple[Correlator], dict]:
        return (loaded(tracks),), {}

    def grid_pass(c: Correlator) -> None:
        results.append(c.correlate())

    benchmark.pedantic(grid_pass, setup=setup, rounds=ROUNDS, iterations=1)
    brute_s, brute_fused = all_pairs
    assert results[0].fused == brute_fused, "the grid pass must find exactly what all pairs find"
    grid_s = benchmark.stats.stats.mean
    fused = len(brute_fused)
    assert fused > 0.95 * TARGETS
    benchmark.extra_info.update({
        "tracks": len(tracks), "fused": fused, "candidates": results[0].candidates,
        "grid_pass_s": round(grid_s, 4), "all_pairs_pass_s": round(brute_s, 3),
        "speedup": round(brute_s / grid_s, 1),
    })
    bench_report(f"fusion: {len(tracks):,} tracks (2 sensors), {fused:,} fused: grid pass {grid_s * 1e3:.1f} ms, "
                 f"all-pairs pass {brute_s:.2f} s, {brute_s / grid_s:.0f}x faster")


def test_correlation_pass_10k_tracks_steady_state(
    benchmark: BenchmarkFixture, tracks: list[Obs], bench_report: Callable[[str], None],
) -> None:
    """The common case: pairs formed already, every track moved ~10 m since the last pass."""
    rng = random.Random(5)
    moved = [Obs(t.id, t.sensor_type, *offset_position(t.lat, t.lon, rng.gauss(0, 10), rng.gauss(0, 10)))
             for t in tracks]

    def setup() -> tuple[tuple[Correlator], dict]:
        c = loaded(tracks)
        c.correlate()
        for t in moved:
            c.upsert(t)
        return (c,), {}

    kept = []
    benchmark.pedantic(lambda c: kept.append(c.correlate()), setup=setup, rounds=ROUNDS, iterations=1)
    assert not kept[0].removed
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({"tracks": len(tracks), "kept": len(kept[0].fused), "pass_s": round(mean, 4)})
    bench_report(f"fusion: steady-state pass over {len(tracks):,} tracks ({len(kept[0].fused):,} pairs kept): "
                 f"{mean * 1e3:.1f} ms")
