"""Benchmark for meshstore.eventloop: 100k live timers rescheduled at ingest rate.

Every ingested entity pushes its TTL deadline back, so the hot path is
schedule() on a key that already has a timer. A batch of 100,000 such calls
is timed against the raw cost floor of the same number of heapq pushes onto a
100k-entry heap with no cancel map and no lock (a threading.Timer per key, the
design this replaces, is too heavy to even build at 100k).

Knobs (environment): BLOOP_TIMERS (100000: timers, and calls per batch), BLOOP_ROUNDS (5).
Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import heapq
import os
import random
import time
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore.eventloop import EventLoop

N_TIMERS = int(os.environ.get("BLOOP_TIMERS", 100_000))
BATCH = N_TIMERS
ROUNDS = int(os.environ.get("BLOOP_ROUNDS", 5))

pytestmark = pytest.mark.benchmark(group="eventloop-reschedule")

Batch = tuple[list[int], list[float]]


def noop() -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    # Autouse and module-scoped, so it runs before the 100k-timer loop is built.
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


def future_batch(rnd: random.Random, now: float) -> Batch:
    """BATCH random keys among the live ones, each with a new future deadline."""
    keys = [rnd.randrange(N_TIMERS) for _ in range(BATCH)]
    whens = [now + 3600 + rnd.uniform(0, 3600) for _ in range(BATCH)]
    return keys, whens


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    rnd = random.Random(20240601)
    now = time.time()
    return [future_batch(rnd, now) for _ in range(ROUNDS)]


@pytest.fixture(scope="module")
def live_loop() -> Iterator[EventLoop]:
    rnd = random.Random(7)
    now = time.time()
    with EventLoop(name="bench-eventloop") as loop:
        for key in range(N_TIMERS):
            loop.schedule(key, now + 3600 + rnd.uniform(0, 3600), noop)
        yield loop


def heap_push_floor(batches: list[Batch]) -> float:
    """Mean seconds over ROUNDS to heappush BATCH entries onto a 100k-entry heap."""
    rnd = random.Random(11)
    now = time.time()
    base = [(now + 3600 + rnd.uniform(0, 3600), i, i) for i in range(N_TIMERS)]
    heapq.heapify(base)
    push = heapq.heappush
    total = 0.0
    for keys, whens in batches:
        heap = base.copy()
        start = time.perf_counter()
        for gen, (key, when) in enumerate(zip(keys, whens), N_TIMERS):
            push(heap, (when, gen, key))
        total += time.perf_counter() - start
    return total / len(batches)


def test_reschedule_100k_live_timers(
    benchmark: BenchmarkFixture, live_loop: EventLoop, batches: list[Batch], bench_report: Callable[[str], None]
) -> None:
    floor = heap_push_floor(batches)
    rounds = iter(batches)

    def next_batch() -> tuple[Batch, dict[str, object]]:
        return next(rounds), {}

    def reschedule(keys: list[int], whens: list[float]) -> None:
        schedule = live_loop.schedule
        for key, when in zip(keys, whens):
            schedule(key, when, noop)

    benchmark.pedantic(reschedule, setup=next_batch, rounds=ROUNDS, iterations=1)

    stats = live_loop.stats()
    assert stats["pending"] == N_TIMERS
    assert stats["replaced"] == ROUNDS * BATCH
    assert stats["heap_size"] <= 3 * N_TIMERS

    # Means, not minima: the heap compaction that lazy deletion needs lands in
    # some rounds only, and its amortized cost is part of the price.
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["reschedules_per_s"] = round(BATCH / mean)
    benchmark.extra_info["heap_push_floor_s"] = floor
    benchmark.extra_info["heap_pushes_per_s"] = round(BATCH / floor)
    benchmark.extra_info["ratio_vs_heap_push"] = round(mean / floor, 2)
    benchmark.extra_info["heap_size_after"] = stats["heap_size"]
    bench_report(f"event loop: {BATCH:,} reschedules over {N_TIMERS:,} live timers: {BATCH / mean:,.0f}/s "
                 f"(mean of {ROUNDS} rounds); raw heap-push floor {BATCH / floor:,.0f}/s; "
                 f"ratio {mean / floor:.1f}x the floor; heap {stats['heap_size']:,} entries")
