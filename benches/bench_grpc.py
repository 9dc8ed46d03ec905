"""B4: update throughput over gRPC, unary UpdateEntity vs PublishEntities streaming.

The server runs as ``meshstore serve --port 0`` in its own process; the load comes
from benches/grpc_load.py in another process (requests pre-serialized, raw bytes on
the wire, so the client does as little as possible). Each mode gets a fresh server
and does 100,000 position updates over 10,000 tracks (seeded first, untimed); the
server's own write counter must grow by exactly 100,000.

Figures (extra_info, and in the bench summary): updates/s for each mode and the ratio
streaming/unary. The target is streaming >= 100k updates/s; ``target_met`` says
whether this run got there. The timed figure is the load generator's, from first
request to last answer; pytest-benchmark's own time also counts process start-up and
request building, so read extra_info, not the mean.

Knobs (environment): B4_UPDATES, B4_TRACKS, B4_UNARY_CONCURRENCY (calls in flight,
default 16), B4_STREAMS (concurrent publish streams, default 1).

Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

LOAD = pathlib.Path(__file__).resolve().parent / "grpc_load.py"
UPDATES = int(os.environ.get("B4_UPDATES", 100_000))
TRACKS = int(os.environ.get("B4_TRACKS", 10_000))
UNARY_CONCURRENCY = int(os.environ.get("B4_UNARY_CONCURRENCY", 16))
STREAMS = int(os.environ.get("B4_STREAMS", 1))
PUBLISH_BATCH = int(os.environ.get("B4_PUBLISH_BATCH", 100))
TARGET_STREAM_UPDATES_PER_S = 100_000

pytestmark = pytest.mark.benchmark(group="grpc-b4")

RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


@contextlib.contextmanager
def serve_process(tmp: pathlib.Path, *serve_args: str, node_id: str = "b4",
                  listening: str = r"msg=listening address=(\S+)") -> Iterator[tuple[re.Match, int]]:
    """``meshstore serve --port 0 SERVE_ARGS`` in a subprocess; yields the match of
    ``listening`` in its log (the line it prints once it serves) and its pid. SIGTERM at
    the end."""
    log_path = tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSTORE_")}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "meshstore.cli", "serve", "--port", "0", "--node-id", node_id,
                                 *serve_args], stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 30
            while not (m := re.search(listening, log_path.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"meshstore serve did not start: {log_path.read_text()}")
                time.sleep(0.05)
            yield m, proc.pid
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (unless it has exited), up to ``timeout`` seconds for a clean stop, then SIGKILL."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def served(tmp: pathlib.Path, *serve_args: str) -> Iterator[str]:
    """A ``serve_process`` (in memory unless ``serve_args`` say otherwise); yields its address."""
    with serve_process(tmp, *(serve_args or ("--in-memory",))) as (m, _):
        yield m.group(1)


def run_load(addr: str, mode: str) -> dict:
    # Modes: unary, stream (one entity per message), stream-batched (PUBLISH_BATCH each).
    batch = PUBLISH_BATCH if mode == "stream-batched" else 1
    args = [sys.executable, str(LOAD), addr, "--mode", "unary" if mode == "unary" else "stream",
            "--updates", str(UPDATES), "--tracks", str(TRACKS),
            "--concurrency", str(UNARY_CONCURRENCY), "--streams", str(STREAMS), "--batch", str(batch)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["unary", "stream", "stream-batched"])
def test_b4_update_throughput(benchmark: BenchmarkFixture, mode: str, tmp_path: pathlib.Path,
                              bench_report: Callable[[str], None]) -> None:
    with served(tmp_path) as addr:
        result = benchmark.pedantic(run_load, args=(addr, mode), rounds=1, iterations=1)

    assert result["errors"] == 0, result
    assert result["server_writes"] == UPDATES, result  # every update reached the store
    RESULTS[mode] = result
    info = benchmark.extra_info
    info["mode"] = mode
    info["updates"] = UPDATES
    info["tracks"] = TRACKS
    info["updates_per_s"] = result["updates_per_s"]
    info["seconds"] = result["seconds"]
    info["in_flight"] = result["concurrency"]
    info["nproc"] = os.cpu_count()
    lines = [f"B4 {mode}: {result['updates_per_s']:,} updates/s ({UPDATES:,} updates over {TRACKS:,} tracks "
             f"in {result['seconds']:.2f} s, {'calls in flight' if mode == 'unary' else 'streams'}="
             f"{result['concurrency']}, nproc={os.cpu_count()})"]
    if mode.startswith("stream"):
        info["target_updates_per_s"] = TARGET_STREAM_UPDATES_PER_S
        info["target_met"] = result["updates_per_s"] >= TARGET_STREAM_UPDATES_PER_S
        if "unary" in RESULTS:
            ratio = result["updates_per_s"] / RESULTS["unary"]["updates_per_s"]
            info["ratio_stream_vs_unary"] = round(ratio, 2)
            lines.append(f"B4 streaming/unary ratio: {ratio:.2f}x; target {TARGET_STREAM_UPDATES_PER_S:,}/s "
                         f"{'met' if info['target_met'] else 'NOT met'}")
    for line in lines:
        bench_report(line)
