"""BH: the web UI's live feed (GET /api/events, Server-Sent Events) under track load.

A node runs as ``meshstore serve --in-memory --http-port 0`` in its own process; the
load comes from benches/http_load.py in another process (10,000 tracks, position and
velocity, over one PublishEntities stream, spread evenly over each second); the SSE
client (aiohttp, in this process) reads ``/api/events`` and parses every batch.

Four phases on one node, each ``BH_SECONDS`` long, measured over the loader's timed
part minus a warm-up second:

- 1 Hz without a client, then 1 Hz with one: the events/s the feed delivers (each track
  once a second: 10k events/s expected; the client must see every track), and the
  node's CPU (utime + stime of its process, i.e. its ``time.process_time``, from
  /proc) per second of wall time, with and without the client: their ratio is the
  feed's cost;
- the same at the loader's maximum rate: updates/s the store takes without and with a
  client, the events/s delivered (the feed coalesces per entity: at most one event per
  entity per 100 ms) and the CPU.

Knobs (environment): BH_TRACKS (10000), BH_SECONDS (12), BH_RATE (1: updates per track
per second of the paced phases).

Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from bench_grpc import serve_process
from pytest_benchmark.fixture import BenchmarkFixture

LOAD = pathlib.Path(__file__).resolve().parent / "http_load.py"
TRACKS = int(os.environ.get("BH_TRACKS", 10_000))
SECONDS = float(os.environ.get("BH_SECONDS", 12))
RATE = float(os.environ.get("BH_RATE", 1))
WARMUP = 1.0
TICK = os.sysconf("SC_CLK_TCK")

pytestmark = pytest.mark.benchmark(group="http-ui-feed")


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


@contextlib.contextmanager
def served(tmp: pathlib.Path) -> Iterator[tuple[str, str, int]]:
    """``meshstore serve --in-memory --http-port 0``; yields (gRPC address, HTTP address, pid)."""
    with serve_process(tmp, "--http-port", "0", "--in-memory", node_id="bh",
                       listening=r"msg=listening address=(\S+) node_id=\S+ http=(\S+)") as (m, pid):
        yield m.group(1), m.group(2), pid


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU seconds (its ``time.process_time``)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


class Client:
    """One SSE client on ``/api/events``: counts the events of every batch and the
    tracks it has seen, timestamped."""

    def __init__(self, http: str) -> None:
        self.url = f"http://{http}/api/events"
        self.events = 0
        self.batches = 0
        self.bytes = 0
        self.ids: set[str] = set()
        self.last_event = 0.0
        self.snapshot = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as response:
            assert response.status == 200
            event = ""
            while line := await response.content.readline(max_line_length=1 << 30):  # a snapshot is one line
                self.bytes += len(line)
                if line.startswith(b"event: "):
                    event = line[7:].strip().decode()
                elif line.startswith(b"data: "):
                    data = json.loads(line[6:])
                    if event == "snapshot":
                        self.snapshot.set()
                    elif event == "batch":
                        self.batches += 1
                        self.events += len(data["events"])
                        self.ids.update(e["id"] for e in data["events"])
                        self.last_event = time.monotonic()

    async def __aenter__(self) -> Client:
        self.task = asyncio.create_task(self.run())
        await asyncio.wait_for(self.snapshot.wait(), 60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # a failure of the client is a failure of the bench
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def phase(grpc_addr: str, http: str, pid: int, rate: float, with_client: bool) -> dict[str, Any]:
    """One load phase: the loader for SECONDS, measured after WARMUP."""
    client = Client(http) if with_client else None
    async with contextlib.AsyncExitStack() as stack:
        if client is not None:
            await stack.enter_async_context(client)
        loader = await asyncio.create_subprocess_exec(
            sys.executable, str(LOAD), grpc_addr, "--tracks", str(TRACKS), "--rate", str(rate),
            "--seconds", str(SECONDS), stdout=asyncio.subprocess.PIPE)
        assert loader.stdout is not None
        line = await asyncio.wait_for(loader.stdout.readline(), 120)
        assert line.strip() == b"started", line
        await asyncio.sleep(WARMUP)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        events0 = client.events if client else 0
        if client:
            client.ids.clear()
        await asyncio.sleep(SECONDS - WARMUP - 0.5)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        events1 = client.events if client else 0
        seen = len(client.ids) if client else 0
        out, _ = await loader.communicate()
        assert loader.returncode == 0, out
        load = json.loads(out.decode().strip().splitlines()[-1])
        drain = 0.0
        if client is not None:  # how long the feed runs on after the load stops
            ended = time.monotonic()
            while time.monotonic() - max(client.last_event, ended) < 0.5:
                await asyncio.sleep(0.05)
            drain = max(0.0, client.last_event - ended)
    window = t1 - t0
    return {
        "client": with_client, "rate": rate, "window_s": round(window, 3),
        "cpu_util": round((cpu1 - cpu0) / window, 3),
        "events_per_s": round((events1 - events0) / window) if client else 0,
        "tracks_seen": seen,
        "batches": client.batches if client else 0,
        "feed_mb": round(client.bytes / 1e6, 1) if client else 0,
        "drain_s": round(drain, 3),
        "updates_per_s": load["updates_per_s"],
        "server_writes": load["server_writes"],
        "rejected": load["rejected"],
    }


def run_phases(tmp: pathlib.Path, rate: float) -> dict[str, dict[str, Any]]:
    async def both() -> dict[str, dict[str, Any]]:
        with served(tmp) as (grpc_addr, http, pid):
            without = await phase(grpc_addr, http, pid, rate, False)
            with_client = await phase(grpc_addr, http, pid, rate, True)
        return {"without": without, "with": with_client}

    return asyncio.run(both())


@pytest.mark.parametrize("rate", [RATE, 0.0], ids=["paced", "max-rate"])
def test_bh_ui_feed(benchmark: BenchmarkFixture, rate: float, tmp_path: pathlib.Path,
                    bench_report: Callable[[str], None]) -> None:
    result = benchmark.pedantic(run_phases, args=(tmp_path, rate), rounds=1, iterations=1)
    without, with_client = result["without"], result["with"]
    for r in (without, with_client):
        assert r["rejected"] == 0, r
    ratio = with_client["cpu_util"] / without["cpu_util"] if without["cpu_util"] else float("inf")
    info = benchmark.extra_info
    info.update(tracks=TRACKS, seconds=SECONDS, rate=rate or "max", nproc=os.cpu_count(),
                without_client=without, with_client=with_client, cpu_ratio=round(ratio, 2))
    label = f"{rate:g} Hz" if rate else "max rate"
    if rate:
        expected = TRACKS * rate
        assert with_client["tracks_seen"] >= 0.99 * TRACKS, with_client  # the feed missed no track
        info["events_vs_updates"] = round(with_client["events_per_s"] / expected, 3)
    bench_report(
        f"BH {label}, {TRACKS:,} tracks: SSE feed {with_client['events_per_s']:,} events/s to one client "
        f"({with_client['batches']:,} batches, {with_client['feed_mb']} MB, drained {with_client['drain_s']} s after the "
        f"load) while the store took {with_client['updates_per_s']:,} updates/s (without a client: "
        f"{without['updates_per_s']:,}/s)")
    bench_report(
        f"BH {label}: node CPU {with_client['cpu_util'] * 100:.0f}% of a core with the client, "
        f"{without['cpu_util'] * 100:.0f}% without: ratio {ratio:.2f}x (nproc={os.cpu_count()})")
