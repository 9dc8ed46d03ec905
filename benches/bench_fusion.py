"""Benchmark for meshstore.services.fusion: correlation passes over 10k tracks.

5,000 targets in a 2 x 2 degree box, each seen by an EO sensor (exact) and a radar (50 m
Gaussian noise): 10,000 tracks from two sensor types, a 500 m correlation gate. Timed:

- a full pass from scratch (``correlate(full=True)``: spatial grid, 3x3 neighbourhood,
  every pair formed), and an all-pairs pass over the same data in the same run
  (``correlate(brute=True)``), which must give the same fused tracks;
- the incremental pass (``correlate()``, what the service runs) in steady state (pairs
  formed, then 1%, 10% or every track moved ~10 m since the last pass), and the full
  pass over the same inputs, timed on a twin in the same round (alternating); both must
  give the same fused tracks.

The passes timed are the Rust core's (``Correlator.core.correlate``), as the service runs
them; the fused tracks are read (as Python tuples) after the clock stops.

Times and ratios go into extra_info and the bench summary.

Knobs (environment): BFUSION_TARGETS (5000: twice as many tracks), BFUSION_ROUNDS (5).
Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore.services.fusion import Correlator, Obs, PassResult
from meshstore.services.scenario import offset_position

TARGETS = int(os.environ.get("BFUSION_TARGETS", 5_000))
MAX_DISTANCE = 500.0
ROUNDS = int(os.environ.get("BFUSION_ROUNDS", 5))

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


def timed_pass(c: Correlator, full: bool = False, brute: bool = False) -> tuple[float, PassResult]:
    """One pass of the core, timed; then its result with the fused tracks."""
    start = time.perf_counter()
    changed, removed, candidates, full = c.core.correlate(full, brute)
    took = time.perf_counter() - start
    return took, PassResult(changed, removed, candidates, full, c.fused)


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
    took, result = timed_pass(loaded(tracks), brute=True)
    return took, result.fused


def test_correlation_pass_10k_tracks_grid_vs_all_pairs(
    benchmark: BenchmarkFixture, tracks: list[Obs], all_pairs: tuple[float, dict],
    bench_report: Callable[[str], None],
) -> None:
    results = []

    def setup() -> tuple[tuple[Correlator], dict]:
        return (loaded(tracks),), {}

    def grid_pass(c: Correlator) -> None:
        results.append((c, c.core.correlate(True, False)))

    benchmark.pedantic(grid_pass, setup=setup, rounds=ROUNDS, iterations=1)
    results = [PassResult(*outcome, fused=c.fused) for c, outcome in results]
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


@pytest.mark.parametrize("moved", [0.01, 0.1, 1.0], ids=["1pct-moved", "10pct-moved", "all-moved"])
def test_correlation_pass_10k_tracks_incremental_vs_full(
    benchmark: BenchmarkFixture, tracks: list[Obs], moved: float, bench_report: Callable[[str], None],
) -> None:
    """Steady state: pairs formed, then a share of the tracks moved ~10 m since the last pass."""
    rng = random.Random(5)
    chosen = sorted(rng.sample(range(len(tracks)), int(len(tracks) * moved)))
    moves = [Obs(tracks[i].id, tracks[i].sensor_type,
                 *offset_position(tracks[i].lat, tracks[i].lon, rng.gauss(0, 10), rng.gauss(0, 10)))
             for i in chosen]
    full_s: list[float] = []
    rounds: list[tuple[PassResult, Correlator]] = []  # (the twin's full pass, the correlator timed)
    outcomes: list[tuple] = []  # the timed incremental passes

    def steady() -> Correlator:
        c = loaded(tracks)
        c.correlate()
        for t in moves:
            c.upsert(t)
        return c

    def setup() -> tuple[tuple[Correlator], dict]:
        # The full pass over the same inputs, on a twin, in the same round (not timed by
        # the benchmark: by hand).
        took, full = timed_pass(steady(), full=True)
        full_s.append(took)
        rounds.append((full, steady()))
        return (rounds[-1][1],), {}

    def incremental_pass(c: Correlator) -> None:
        outcomes.append(c.core.correlate(False, False))

    benchmark.pedantic(incremental_pass, setup=setup, rounds=ROUNDS, iterations=1)
    results = [(full, PassResult(*outcome, fused=c.fused)) for (full, c), outcome in zip(rounds, outcomes)]
    for full, inc in results:
        assert inc.fused == full.fused and not inc.removed, "the incremental pass must give the full pass's result"
    inc_s = benchmark.stats.stats.median
    full_med = statistics.median(full_s)
    inc = results[0][1]
    benchmark.extra_info.update({
        "tracks": len(tracks), "moved": len(moves), "refused": len(inc.changed), "fused": len(inc.fused),
        "incremental_pass_s": round(inc_s, 5), "full_pass_s": round(full_med, 4),
        "full_over_incremental": round(full_med / inc_s, 1),
    })
    bench_report(f"fusion: steady state over {len(tracks):,} tracks, {len(moves):,} moved: incremental pass "
                 f"{inc_s * 1e3:.1f} ms ({len(inc.changed):,} of {len(inc.fused):,} fused re-fused), "
                 f"full pass {full_med * 1e3:.1f} ms: {full_med / inc_s:.1f}x (medians of {ROUNDS})")
