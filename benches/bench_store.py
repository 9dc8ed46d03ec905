"""Benchmarks of meshstore.Store from Python, each against a baseline in the same run.

- B2: ``Store.update`` of 100k tracks, each update writing position + velocity with
  the versions as read (messages built before the clock starts, so every update
  applies), without and with a watcher attached (drained between rounds), against the
  plain-Python ``ReferenceStore`` (benches/reference_store.py) doing the same.
  Targets: >= 400k updates/s and >= 3x the reference.
- B3: ``put_many`` in batches of 1,000 (50k of the 100k tracks per round), from
  messages and from pre-serialized bytes, against the reference. Target (bytes):
  >= 1M entity updates/s and >= 8x the reference.
- B6: memory per track at 100k 4-component tracks (position, velocity, source,
  threat): RSS growth in a fresh subprocess, against the same entities held as
  serialized bytes (``Store.get`` bytes, versions included) in a Python dict.
  Target: < 1 KiB per track.

Tracks carry position, velocity, threat and source; every round writes new position
and velocity values, so each write changes the store (checked through ``seq``). Each
round's input is built untimed, then the Store round runs and the reference runs right
after on the same input (interleaved); during rounds the pre-existing heap is frozen
(``gc.freeze``) on both sides, see ``interleaved``. Throughput is per entity write, from
the best of 3 rounds (both sides alike); means are in ``extra_info`` too.

Knobs (environment): BSTORE_TRACKS (100000), BSTORE_ROUNDS (3).
Runs only when benchmarks are asked for (~1 minute on 2 cores):
``pytest benches/bench_store.py --benchmark-only -s``
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore import Store
from meshstore.components import type_url
from meshstore.pb import entity_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from reference_store import ReferenceStore  # noqa: E402

N = int(os.environ.get("BSTORE_TRACKS", 100_000))
BATCH = 1_000
# B3 writes half the tracks per round (50 batches), alternating halves, to keep the file
# under 2 minutes: the reference costs 30-50 us per entity there.
B3_PER_ROUND = N // 2
ROUNDS = int(os.environ.get("BSTORE_ROUNDS", 3))

B2_TARGET_PER_S = 400_000
B2_TARGET_RATIO = 3.0
B3_TARGET_PER_S = 1_000_000
B3_TARGET_RATIO = 8.0
B6_TARGET_BYTES = 1024

Entity = pb.Entity
AnyMsg = any_pb2.Any
POSITION_URL = type_url(pb.PositionComponent)
VELOCITY_URL = type_url(pb.VelocityComponent)
IDS = [f"track-{i:06d}" for i in range(N)]
THREATS = [AnyMsg(type_url=type_url(pb.ThreatComponent), value=pb.ThreatComponent(level=lvl).SerializeToString()) for lvl in range(1, 5)]
SOURCES = [
    AnyMsg(type_url=type_url(pb.SourceComponent), value=pb.SourceComponent(sensor_id=f"radar-{k}", sensor_type="radar").SerializeToString())
    for k in range(8)
]

pytestmark = pytest.mark.benchmark(group="store")


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    # Autouse and module-scoped, so it runs before the 100k-entity stores are built.
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


# ---- entities ----------------------------------------------------------------------------


def kinematics(i: int, gen: int) -> tuple[AnyMsg, AnyMsg]:
    """Position and velocity of track ``i`` in round ``gen`` (different every round)."""
    pos = pb.PositionComponent(lat=30.0 + i * 1e-5 + gen * 1e-4, lon=-120.0 + i * 2e-5 + gen * 1e-4, alt=500.0 + gen)
    vel = pb.VelocityComponent(speed=100.0 + i % 50 + gen, heading=float(i % 360))
    return (AnyMsg(type_url=POSITION_URL, value=pos.SerializeToString()), AnyMsg(type_url=VELOCITY_URL, value=vel.SerializeToString()))


def track(i: int, gen: int) -> Entity:
    """A blind put of a whole 4-component track, as a sensor feed sends it."""
    pos, vel = kinematics(i, gen)
    comps = {"position": pos, "velocity": vel, "threat": THREATS[i % 4], "source": SOURCES[i % 8]}
    return Entity(id=IDS[i], type=pb.ENTITY_TYPE_TRACK, components=comps)


def track_batches(gen: int, serialized: bool, first: int = 0, n: int = N) -> list[list]:
    batches = []
    for start in range(first, first + n, BATCH):
        batch = [track(i, gen) for i in range(start, min(start + BATCH, first + n))]
        batches.append([e.SerializeToString() for e in batch] if serialized else batch)
    return batches


def kinematics_updates(read_versions: Callable[[str], object], gen: int) -> list[Entity]:
    """One update per track: new position + velocity, based on the versions as read."""
    out = []
    for i, eid in enumerate(IDS):
        versions = read_versions(eid)
        pos, vel = kinematics(i, gen)
        out.append(
            Entity(
                id=eid,
                components={"position": pos, "velocity": vel},
                versions={"position": versions["position"], "velocity": versions["velocity"]},
            )
        )
    return out


def populate(put_many: Callable[[list], object]) -> None:
    for batch in track_batches(0, serialized=True):
        put_many(batch)


# ---- timing helpers ----------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "MET" if value >= target else "MISSED"


class Gen:
    """Round numbers: every round writes values no earlier round wrote."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def __call__(self) -> int:
        return next(self._count)


def interleaved(
    benchmark: BenchmarkFixture,
    make_input: Callable[[], tuple],
    store_run: Callable[..., None],
    ref_run: Callable[..., None],
    before_store: Callable[[], None] = lambda: None,
    before_ref: Callable[[], None] = lambda: None,
) -> list[float]:
    """ROUNDS pedantic rounds of ``store_run(*input)``; right after each, ``ref_run(*input)``
    on the same round's input, timed here (interleaved, so both sides see the same machine
    load). Returns the reference's seconds per round.

    Each input is built before its round, untimed, and then ``gc.freeze()`` runs: the
    collector skips every object that exists when a round starts (inputs, both stores,
    other fixtures) and scans only what the round makes. Without it, full collections over
    the harness' 100k prebuilt messages (upb messages are GC-tracked) took most of the
    reference's time, a swing of up to 5x that would flatter the ratio. Both sides alike;
    the ``unfreeze`` fixture undoes it after the test."""
    pending: list[tuple] = []
    ref_times: list[float] = []

    def run_ref() -> None:
        if pending:
            args = pending.pop()
            before_ref()
            start = time.perf_counter()
            ref_run(*args)
            ref_times.append(time.perf_counter() - start)

    def setup() -> tuple:
        run_ref()
        args = make_input()
        pending.append(args)
        before_store()
        gc.freeze()
        return args, {}

    benchmark.pedantic(store_run, setup=setup, rounds=ROUNDS, iterations=1)
    run_ref()
    assert len(ref_times) == ROUNDS
    return ref_times


@pytest.fixture(scope="module")
def stores() -> Iterator[tuple[Store, ReferenceStore, Gen]]:
    """A Store and a ReferenceStore holding the same 100k tracks (B2 and B3 share them)."""
    store = Store(node_id="bench")
    ref = ReferenceStore(node_id="bench")
    populate(store.put_many)
    populate(ref.put_many)
    yield store, ref, Gen()
    store.close()


@pytest.fixture(autouse=True)
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


def against_reference(benchmark: BenchmarkFixture, ref_times: list[float], per_round: int,
                      unit: str) -> tuple[float, float, float]:
    """The store's and the reference's best rates (``unit`` per second) and their ratio,
    recorded with their means in extra_info."""
    best = per_round / benchmark.stats.stats.min
    ref_best = per_round / min(ref_times)
    info = benchmark.extra_info
    info[f"{unit}_per_s"] = round(best)
    info[f"{unit}_per_s_mean"] = round(per_round / benchmark.stats.stats.mean)
    info[f"reference_{unit}_per_s"] = round(ref_best)
    info[f"reference_{unit}_per_s_mean"] = round(per_round * len(ref_times) / sum(ref_times))
    info["ratio_vs_reference"] = round(best / ref_best, 2)
    return best, ref_best, best / ref_best


# ---- B2: Store.update ------------------------------------------------------------------


@pytest.mark.parametrize("watcher", [False, True], ids=["no-watcher", "watcher"])
def test_b2_update(
    benchmark: BenchmarkFixture, stores: tuple[Store, ReferenceStore, Gen], watcher: bool, bench_report: Callable[[str], None]
) -> None:
    store, ref, gen = stores
    watch = store.watch() if watcher else None
    ref_queue = ref.watch() if watcher else None
    events = {"store": 0, "reference": 0}

    def make_input() -> tuple:
        # Both sides write the same values, each based on the versions read from itself.
        g = gen()
        return kinematics_updates(lambda eid: store.get(eid).versions, g), kinematics_updates(ref.versions, g)

    def drain_store() -> None:
        if watch is not None:
            events["store"] += len(watch.drain())

    def drain_ref() -> None:
        if ref_queue is not None:
            events["reference"] += len(ref_queue)
            ref_queue.clear()

    def store_run(store_msgs: list[Entity], _ref_msgs: list[Entity]) -> None:
        update = store.update
        for m in store_msgs:
            update(m)

    def ref_run(_store_msgs: list[Entity], ref_msgs: list[Entity]) -> None:
        update = ref.update
        for m in ref_msgs:
            update(m)

    seq0, rseq0 = store.seq, ref.seq
    ref_times = interleaved(benchmark, make_input, store_run, ref_run, drain_store, drain_ref)
    assert store.seq - seq0 == N * ROUNDS, "every update must apply"
    assert ref.seq - rseq0 == N * ROUNDS, "every reference update must apply"
    coalesced = 0
    if watch is not None:
        drain_store()
        coalesced = watch.stats()["coalesced"]
        watch.close()
        assert events["store"] + coalesced == N * ROUNDS
        drain_ref()
        ref._watchers.remove(ref_queue)
        assert events["reference"] == N * ROUNDS

    best, ref_best, ratio = against_reference(benchmark, ref_times, N, "updates")
    info = benchmark.extra_info
    info["entities"] = N
    info["watcher"] = watcher
    info["us_per_update"] = round(1e6 / best, 3)
    info["reference_us_per_update"] = round(1e6 / ref_best, 3)
    info["target_updates_per_s"] = B2_TARGET_PER_S
    info["target_ratio"] = B2_TARGET_RATIO
    info["watcher_events"] = events["store"]
    info["watcher_coalesced"] = coalesced
    bench_report(
        f"B2 Store.update pos+vel, {N // 1000}k tracks, {'with' if watcher else 'no'} watcher: "
        f"{best / 1e3:,.0f}k updates/s ({1e6 / best:.2f} us) [target {B2_TARGET_PER_S // 1000}k: {verdict(best, B2_TARGET_PER_S)}]; "
        f"reference {ref_best / 1e3:,.0f}k/s ({1e6 / ref_best:.2f} us); "
        f"ratio {ratio:.2f}x [target {B2_TARGET_RATIO:g}x: {verdict(ratio, B2_TARGET_RATIO)}]"
    )


# ---- B3: put_many ----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["messages", "bytes"])
def test_b3_put_many(
    benchmark: BenchmarkFixture, stores: tuple[Store, ReferenceStore, Gen], form: str, bench_report: Callable[[str], None]
) -> None:
    store, ref, gen = stores
    serialized = form == "bytes"

    def make_input() -> tuple:
        g = gen()
        return (track_batches(g, serialized, first=(g % 2) * B3_PER_ROUND, n=B3_PER_ROUND),)

    def store_run(batches: list[list]) -> None:
        put_many = store.put_many
        for batch in batches:
            put_many(batch)

    def ref_run(batches: list[list]) -> None:
        put_many = ref.put_many
        for batch in batches:
            put_many(batch)

    seq0, rseq0 = store.seq, ref.seq
    ref_times = interleaved(benchmark, make_input, store_run, ref_run)
    assert store.seq - seq0 == B3_PER_ROUND * ROUNDS, "every put must apply"
    assert ref.seq - rseq0 == B3_PER_ROUND * ROUNDS, "every reference put must apply"

    best, ref_best, ratio = against_reference(benchmark, ref_times, B3_PER_ROUND, "entity_updates")
    info = benchmark.extra_info
    info["entities"] = N
    info["entity_updates_per_round"] = B3_PER_ROUND
    info["batch"] = BATCH
    info["form"] = form
    info["us_per_entity"] = round(1e6 / best, 3)
    info["reference_us_per_entity"] = round(1e6 / ref_best, 3)
    rate_note, ratio_note = "", " (no target)"
    if serialized:
        info["target_entity_updates_per_s"] = B3_TARGET_PER_S
        info["target_ratio"] = B3_TARGET_RATIO
        rate_note = f" [target {B3_TARGET_PER_S / 1e6:g}M: {verdict(best, B3_TARGET_PER_S)}]"
        ratio_note = f" [target {B3_TARGET_RATIO:g}x: {verdict(ratio, B3_TARGET_RATIO)}]"
    bench_report(
        f"B3 put_many x{BATCH} from {form}, {B3_PER_ROUND // 1000}k of {N // 1000}k tracks/round: "
        f"{best / 1e3:,.0f}k entity updates/s ({1e6 / best:.2f} us){rate_note}; "
        f"reference {ref_best / 1e3:,.0f}k/s ({1e6 / ref_best:.2f} us); ratio {ratio:.2f}x{ratio_note}"
    )


# ---- B6: memory per track --------------------------------------------------------------

_B6_PRELUDE = f"""
import gc, json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""

# Fills a Store with N tracks in batches built and dropped on the way, so only what the
# store keeps stays; then writes every track as Store.get returns it, for the baseline.
_B6_STORE = (
    _B6_PRELUDE
    + """
from bench_store import N, BATCH, IDS, track
from meshstore import Store
warm = Store(node_id="b6")          # one-time allocations (interned keys, code paths) first
warm.put_many([track(i, 0).SerializeToString() for i in range(10)])
warm.close(); del warm
store = Store(node_id="b6")
gc.collect()
before = rss()
for start in range(0, N, BATCH):
    store.put_many([track(i, 0).SerializeToString() for i in range(start, start + BATCH)])
gc.collect()
after = rss()
stats = store.stats()
lengths = []
with open(sys.argv[1], "wb") as f:
    for eid in IDS:
        b = store.get(eid).SerializeToString()
        lengths.append(len(b))
        f.write(b)
print(json.dumps({"before": before, "after": after, "entities": stats["entities"],
                  "payload_bytes": stats["payload_bytes"], "lengths": lengths}))
"""
)

# Holds the same tracks, serialized as Store.get returns them, in a dict by id.
_B6_DICT = (
    _B6_PRELUDE
    + """
from array import array
with open(sys.argv[1], "rb") as f:
    blob = f.read()
lengths = array("I", json.loads(sys.stdin.read()))
gc.collect()
before = rss()
held = {}
offset = 0
for i, n in enumerate(lengths):
    held[f"track-{i:06d}"] = blob[offset:offset + n]
    offset += n
gc.collect()
after = rss()
print(json.dumps({"before": before, "after": after, "entities": len(held)}))
"""
)


def _run(code: str, *args: str, stdin: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True, check=False, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"B6 subprocess failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_b6_memory_per_track(benchmark: BenchmarkFixture, tmp_path: Path, bench_report: Callable[[str], None]) -> None:
    blob = tmp_path / "tracks.bin"
    results: dict[str, dict] = {}

    def measure() -> None:
        results["store"] = _run(_B6_STORE, str(blob))
        results["dict"] = _run(_B6_DICT, str(blob), stdin=json.dumps(results["store"]["lengths"]))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    s, d = results["store"], results["dict"]
    assert s["entities"] == d["entities"] == N
    per_track = (s["after"] - s["before"]) / N
    per_track_dict = (d["after"] - d["before"]) / N
    ratio = per_track / per_track_dict
    serialized = sum(s["lengths"]) / N
    info = benchmark.extra_info
    info["entities"] = N
    info["bytes_per_track"] = round(per_track, 1)
    info["dict_of_bytes_per_track"] = round(per_track_dict, 1)
    info["serialized_bytes_per_track"] = round(serialized, 1)
    info["core_payload_bytes_per_track"] = round(s["payload_bytes"] / N, 1)
    info["ratio_vs_dict_of_bytes"] = round(ratio, 2)
    info["target_bytes_per_track"] = B6_TARGET_BYTES
    bench_report(
        f"B6 memory, {N // 1000}k 4-component tracks: {per_track:,.0f} B/track RSS growth "
        f"[target < {B6_TARGET_BYTES}: {'MET' if per_track < B6_TARGET_BYTES else 'MISSED'}]; "
        f"dict of serialized entities {per_track_dict:,.0f} B/track ({serialized:.0f} B serialized); "
        f"ratio {ratio:.2f}x"
    )
