"""BW: batched ingest and watch fan-out of the Rust gRPC server (``meshstore serve``).

The server runs as ``meshstore serve --in-memory --port 0`` (bench_grpc's
``serve_process``); every client is a process of its own, started from this file
(``python benches/bench_watch.py publish|watch|stuck ...``), with its requests
serialized up front and its responses read as raw bytes. Tracks carry a position
component; consecutive writes to a track always change it, so every write is applied.

- BW1, publish batched: one PublishEntities stream at full speed for BWATCH_SECONDS,
  1,000 entities per message, against the same with one entity per message (the
  baseline, same server, run first). Figures: updates/s applied (the PublishSummary's
  ``applied`` over the time from the first write to the summary), server CPU per update
  (utime + stime of the server process over the same window) and the publisher's own CPU
  (a Python client; with one entity per message it is the bottleneck). Target: >= 1M
  updates/s with 1,000-entity messages.
- BW2, watch fan-out: BWATCH_FANOUT_WATCHERS (4) processes, each with one
  WatchEntityBatches stream (no min_interval) decoding every batch with the generated
  class, while one writer publishes at BWATCH_FANOUT_RATE (100k) updates/s in 1,000-entity
  messages spread over BWATCH_TRACKS (10k) distinct tracks. Then one last write of a
  chosen track (a position used nowhere else) that every watcher must receive. Figures:
  per-watcher events/s, the fraction of the writer's applied updates each received
  (1.0: every event delivered, the ratio), the store's ``coalesced`` count (GetStats,
  read while the watchers are open) and the server CPU per delivered event (its CPU with
  the watchers minus its CPU for the same writer alone, run first on the same server).
  Without coalescing every watcher must receive exactly every update (asserted).
  BWATCH_FANOUT_DECODE=0: the watchers count bytes only (events estimated), to see what
  decoding costs them.
  ``meshstore serve`` has no option for the watch queue, so each watcher gets the
  default 1,024 events before it coalesces.
- BW3, many watchers: BWATCH_READERS (100) WatchEntityBatches streams that read
  (BWATCH_READER_PROCS processes of grpc.aio, a connection per stream, counting bytes
  only) and BWATCH_STUCK (100) streams never read (half grpc.aio calls never ``read()``,
  half raw HTTP/2 connections that send their request with huge flow-control windows,
  a 64 KiB receive buffer, and never read their socket) over BWATCH_MANY_TRACKS (5,000) tracks, while the writer
  ingests at full speed for BWATCH_SECONDS. Figures: ingest rate with the watchers over
  the rate without (same server, run first; target >= 0.5x), the server's RSS
  (/proc/PID/status VmRSS) before the watchers, with them idle, at its peak during the
  load, after it and once they are gone, and for every reading watcher the time from
  the last write (a unary UpdateEntity of the chosen track, sent once the ingest stream
  was answered) until it received that track's final state (target: all within 2 s).
  Every reading watcher must get the final state within BWATCH_FINAL_WAIT (asserted).

Times across processes use CLOCK_MONOTONIC (system-wide). The figures are in
``extra_info`` and the bench summary; pytest-benchmark's own time also counts start-up.

Knobs (environment): BWATCH_SECONDS (5), BWATCH_BATCH (1000), BWATCH_TRACKS (10000),
BWATCH_FANOUT_WATCHERS (4), BWATCH_FANOUT_RATE (100000), BWATCH_FANOUT_DECODE (1),
BWATCH_READERS (100), BWATCH_READER_PROCS (4), BWATCH_STUCK (100),
BWATCH_MANY_TRACKS (5000), BWATCH_FINAL_WAIT (30 s).

Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from bench_grpc import serve_process
from bench_http import cpu_seconds
from pytest_benchmark.fixture import BenchmarkFixture

from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2

HERE = pathlib.Path(__file__).resolve()
METHOD = "/store.v1.EntityStoreService/"
SECONDS = float(os.environ.get("BWATCH_SECONDS", 5))
BATCH = int(os.environ.get("BWATCH_BATCH", 1000))
TRACKS = int(os.environ.get("BWATCH_TRACKS", 10_000))
FANOUT_WATCHERS = int(os.environ.get("BWATCH_FANOUT_WATCHERS", 4))
FANOUT_RATE = float(os.environ.get("BWATCH_FANOUT_RATE", 100_000))
FANOUT_DECODE = os.environ.get("BWATCH_FANOUT_DECODE", "1") != "0"
READERS = int(os.environ.get("BWATCH_READERS", 100))
READER_PROCS = int(os.environ.get("BWATCH_READER_PROCS", 4))
STUCK = int(os.environ.get("BWATCH_STUCK", 100))
MANY_TRACKS = int(os.environ.get("BWATCH_MANY_TRACKS", 5000))
FINAL_WAIT = float(os.environ.get("BWATCH_FINAL_WAIT", 30))
TARGET_BATCHED = 1_000_000
TARGET_MANY_RATIO = 0.5
TARGET_FINAL_S = 2.0
VARIANTS = 3  # position variants cycled per track: each write differs from the last
CHOSEN = "track-00007"  # the track whose final state the watchers wait for
FINAL = (45.123456789, -12.987654321, 4321.5)  # its final position (lat, lon, alt): used nowhere else
MARKER = struct.pack("<d", FINAL[0])  # the lat's wire bytes, searched in raw batches
MAX_MESSAGE = 64 * 1024 * 1024
EVENT_BYTES = 245  # about, per event of these tracks in a batch (used only with BWATCH_FANOUT_DECODE=0)
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.use_local_subchannel_pool", 1)]

pytestmark = pytest.mark.benchmark(group="watch-bw")


# ---- the client processes ---------------------------------------------------------------


def track(j: int, variant: int) -> entity_pb2.Entity:
    """Track ``j``; each ``variant`` has its own altitude."""
    return make_entity(f"track-{j:05d}", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(
        lat=(j % 9000) * 0.01, lon=(j % 18000) * 0.01, alt=100.0 + variant))


def final_track() -> entity_pb2.Entity:
    lat, lon, alt = FINAL
    return make_entity(CHOSEN, entity_pb2.ENTITY_TYPE_TRACK,
                       position=entity_pb2.PositionComponent(lat=lat, lon=lon, alt=alt))


def payloads(tracks: int, batch: int, variant: int) -> list[bytes]:
    """Every track once, as serialized PublishRequests of ``batch`` entities."""
    if batch == 1:
        return [store_pb2.PublishRequest(entity=track(j, variant)).SerializeToString() for j in range(tracks)]
    return [store_pb2.PublishRequest(entities=[track(j, variant) for j in range(k, min(k + batch, tracks))])
            .SerializeToString() for k in range(0, tracks, batch)]


def has_final_state(raw: bytes) -> bool:
    """True if the EntityEventBatch ``raw`` carries the chosen track in its final state."""
    for event in store_pb2.EntityEventBatch.FromString(raw).events:
        if event.entity.id == CHOSEN and "position" in event.entity.components:
            p = entity_pb2.PositionComponent()
            event.entity.components["position"].Unpack(p)
            if (p.lat, p.lon, p.alt) == FINAL:
                return True
    return False


async def stdin_lines() -> asyncio.Queue[str]:
    """Lines of stdin ("" at its end), read by a thread."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        while True:
            line = sys.stdin.readline()
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
                loop.call_soon_threadsafe(lines.put_nowait, line.strip() if line else "")
            if not line:
                return

    threading.Thread(target=pump, daemon=True).start()  # never waited for at exit
    return lines


async def next_command(lines: asyncio.Queue[str], *wanted: str) -> str:
    while (line := await lines.get()) not in (*wanted, ""):
        pass
    return line


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def publisher(args: argparse.Namespace) -> dict[str, Any]:
    """Seeds every track (unless ``no_seed``), says "seeded", waits for "go", then
    publishes on one stream for ``seconds`` (paced at ``rate`` updates/s if given), then
    writes the chosen track's final state with UpdateEntity (if ``final``) and checks it
    with GetEntity. Run ``run`` writes variants of its own, so nothing it writes equals
    what an earlier run left."""
    base = args.run * (VARIANTS + 1)
    rounds = [payloads(args.tracks, args.batch, base + v) for v in range(VARIANTS)]
    seed = payloads(args.tracks, BATCH, base + VARIANTS)
    per_message = [[min(args.batch, args.tracks - k) for k in range(0, args.tracks, args.batch)]] * VARIANTS
    lines = await stdin_lines()
    async with grpc.aio.insecure_channel(args.target, options=GRPC_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)

        async def publish(messages: list[bytes]) -> store_pb2.PublishSummary:
            call = channel.stream_unary(METHOD + "PublishEntities")()  # bytes in, bytes out
            for m in messages:
                await call.write(m)
            await call.done_writing()
            return store_pb2.PublishSummary.FromString(await call)

        if not args.no_seed:
            seeded = await publish(seed)
            assert seeded.applied == args.tracks and not seeded.rejected, seeded
        say("seeded")
        if await next_command(lines, "go") != "go":
            raise SystemExit("no go")

        call = channel.stream_unary(METHOD + "PublishEntities")()
        write = call.write
        sent = messages = 0
        failed = None
        interval = args.batch / args.rate if args.rate else 0.0
        my_cpu0, cpu0, t0 = time.process_time(), cpu_seconds(args.server_pid), time.monotonic()
        end = t0 + args.seconds
        now = t0
        try:
            while now < end:
                for v in range(VARIANTS):
                    for m, n in zip(rounds[v], per_message[v], strict=True):
                        if interval:
                            due = t0 + messages * interval
                            if due > now:
                                await asyncio.sleep(due - now)
                        await write(m)
                        messages += 1
                        sent += n
                        now = time.monotonic()
                        if now >= end:
                            break
                    else:
                        continue
                    break
            await call.done_writing()
            summary = store_pb2.PublishSummary.FromString(await call)
        except grpc.aio.AioRpcError as err:  # the stream ended: what was applied is unknown
            # A failed write says little ("Internal error from Core"); the call's status says why.
            code, details = await call.code(), await call.details()
            failed = f"{code.name}: {details}" if code != grpc.StatusCode.OK else f"{err.code().name}: {err.details()}"
            summary = store_pb2.PublishSummary()
        t1, cpu1, my_cpu1 = time.monotonic(), cpu_seconds(args.server_pid), time.process_time()
        result = {
            "batch": args.batch, "tracks": args.tracks, "rate": args.rate, "messages": messages, "sent": sent,
            "applied": summary.applied, "stale": summary.stale, "rejected": summary.rejected,
            "seconds": t1 - t0, "t0": t0, "t1": t1, "updates_per_s": summary.applied / (t1 - t0),
            "server_cpu": cpu1 - cpu0, "client_cpu": my_cpu1 - my_cpu0,
        }
        if failed is not None:
            result["error"] = failed
        elif args.final:
            update = channel.unary_unary(METHOD + "UpdateEntity")
            request = store_pb2.UpdateEntityRequest(entity=final_track()).SerializeToString()
            result["t_final_sent"] = time.monotonic()
            await update(request, timeout=60)
            result["t_final_acked"] = time.monotonic()
            get = channel.unary_unary(METHOD + "GetEntity")
            stored = entity_pb2.Entity.FromString(
                await get(store_pb2.GetEntityRequest(id=CHOSEN).SerializeToString(), timeout=60))
            p = entity_pb2.PositionComponent()
            stored.components["position"].Unpack(p)
            result["final_stored"] = (p.lat, p.lon, p.alt) == FINAL
    return result


async def watcher(args: argparse.Namespace) -> None:
    """``streams`` WatchEntityBatches streams, each on a connection of its own. Says
    "ready" once each is open, then reads: counts batches and bytes (and events when
    ``decode``), and notes when the chosen track's final state arrives. Prints one JSON
    line once every stream has it and has been idle for ``idle`` s (or on "report"), then
    holds the streams open until "stop" or the end of stdin."""
    lines = await stdin_lines()
    request = store_pb2.WatchEntitiesRequest().SerializeToString()
    channels = [grpc.aio.insecure_channel(args.target, options=GRPC_OPTIONS) for _ in range(args.streams)]
    calls = [ch.unary_stream(METHOD + "WatchEntityBatches")(request) for ch in channels]
    await asyncio.gather(*(c.initial_metadata() for c in calls))
    stats = [{"batches": 0, "bytes": 0, "events": 0, "first": None, "last": None, "before_final": None, "final_at": None,
              "end": None}
             for _ in calls]
    all_final = asyncio.Event()
    pending = [len(calls)]

    async def read(call: grpc.aio.UnaryStreamCall, s: dict[str, Any]) -> None:
        decode = args.decode
        batch_class = store_pb2.EntityEventBatch
        try:
            while (raw := await call.read()) is not grpc.aio.EOF:
                now = time.monotonic()
                if s["first"] is None:
                    s["first"] = now
                s["last"] = now
                s["batches"] += 1
                s["bytes"] += len(raw)
                if decode:
                    s["events"] += len(batch_class.FromString(raw).events)
                if MARKER in raw and s["final_at"] is None and has_final_state(raw):
                    s["final_at"] = now
                    pending[0] -= 1
                    if not pending[0]:
                        all_final.set()
                elif s["final_at"] is None:
                    s["before_final"] = now  # the last batch before the final state
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                s["end"] = f"{err.code().name}: {err.details()}"

    tasks = [asyncio.create_task(read(c, s)) for c, s in zip(calls, stats, strict=True)]
    say("ready")

    async def settled() -> None:
        await all_final.wait()
        while (idle := time.monotonic() - max(s["last"] or 0.0 for s in stats)) < args.idle:
            await asyncio.sleep(args.idle - idle)

    waiting = asyncio.create_task(settled())
    command = asyncio.create_task(next_command(lines, "report", "stop"))
    await asyncio.wait([waiting, command], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    say(json.dumps({"pid": os.getpid(), "cpu": time.process_time(), "streams": stats}))
    if not command.done():
        command.cancel()  # a cancelled get() takes no line
        await next_command(lines, "stop")
    elif command.result() == "report":
        await next_command(lines, "stop")
    for c in calls:
        c.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def hpack_literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman coding."""
    def string(s: str) -> bytes:
        raw = s.encode()
        n = len(raw)
        if n < 127:
            return bytes((n,)) + raw
        out, n = bytearray((127,)), n - 127
        while n >= 128:
            out.append((n & 127) | 128)
            n >>= 7
        return bytes(out) + bytes((n,)) + raw
    return b"\x00" + string(name) + string(value)


def raw_watch(target: str) -> socket.socket:
    """A WatchEntityBatches call over a bare HTTP/2 connection that offers the server the
    largest flow-control windows and never reads its socket."""
    host, port = target.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer, set before connecting: the kernel must not read on for the
    # client (it would take up to net.ipv4.tcp_rmem's maximum, 32 MiB here, per socket).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((host.strip("[]"), int(port)))
    big = 2**31 - 1
    headers = b"".join(hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", METHOD + "WatchEntityBatches"), (":authority", target),
        ("content-type", "application/grpc"), ("te", "trailers")))
    body = store_pb2.WatchEntitiesRequest().SerializeToString()
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                 + h2_frame(0x4, 0, 0, struct.pack(">HI", 0x4, big) + struct.pack(">HI", 0x2, 0))  # SETTINGS
                 + h2_frame(0x8, 0, 0, struct.pack(">I", big - 65535))  # connection WINDOW_UPDATE
                 + h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
                 + h2_frame(0x0, 0x1, 1, b"\x00" + struct.pack(">I", len(body)) + body))  # DATA, END_STREAM
    return sock


async def stuck(args: argparse.Namespace) -> None:
    """``aio`` grpc.aio WatchEntityBatches calls never read and ``raw`` bare HTTP/2 ones
    whose socket is never read; says "ready", holds them until the end of stdin."""
    lines = await stdin_lines()
    request = store_pb2.WatchEntitiesRequest().SerializeToString()
    channels = [grpc.aio.insecure_channel(args.target, options=GRPC_OPTIONS) for _ in range(args.aio)]
    calls = [ch.unary_stream(METHOD + "WatchEntityBatches")(request) for ch in channels]
    await asyncio.gather(*(c.initial_metadata() for c in calls))
    socks = [raw_watch(args.target) for _ in range(args.raw)]
    say("ready")
    await next_command(lines, "stop")
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close()
    for s in socks:
        s.close()


def child_main() -> None:
    parser = argparse.ArgumentParser(description="BW client processes")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("publish")
    p.add_argument("target")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--tracks", type=int, default=TRACKS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seconds", type=float, default=SECONDS)
    p.add_argument("--rate", type=float, default=0.0, help="updates/s (0: as fast as it goes)")
    p.add_argument("--final", action="store_true", help="end with the chosen track's final state")
    p.add_argument("--no-seed", action="store_true", help="the tracks exist already")
    p.add_argument("--run", type=int, default=0, help="this run's number (picks its variants)")
    w = sub.add_parser("watch")
    w.add_argument("target")
    w.add_argument("--streams", type=int, default=1)
    w.add_argument("--decode", action="store_true", help="decode every batch (count events)")
    w.add_argument("--idle", type=float, default=0.5)
    s = sub.add_parser("stuck")
    s.add_argument("target")
    s.add_argument("--aio", type=int, default=0)
    s.add_argument("--raw", type=int, default=0)
    args = parser.parse_args()
    if args.role == "publish":
        say(json.dumps(asyncio.run(publisher(args))))
    elif args.role == "watch":
        asyncio.run(watcher(args))
    else:
        asyncio.run(stuck(args))


# ---- the benches ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


@contextlib.contextmanager
def server(tmp: pathlib.Path) -> Iterator[tuple[str, int]]:
    """``meshstore serve --in-memory``; yields its address and pid."""
    with serve_process(tmp, "--in-memory", node_id="bw") as (m, pid):
        yield m.group(1), pid


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def get_stats(addr: str) -> dict[str, float]:
    with grpc.insecure_channel(addr) as ch:
        call = ch.unary_unary(METHOD + "GetStats", request_serializer=store_pb2.GetStatsRequest.SerializeToString,
                              response_deserializer=store_pb2.GetStatsResponse.FromString)
        return dict(call(store_pb2.GetStatsRequest(), timeout=30).values)


async def wait_watchers(addr: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (got := get_stats(addr)["watchers"]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{got:.0f} of {n} watchers open after {timeout} s")
        await asyncio.sleep(0.1)


class Child:
    """A client process (this file, in a role) driven by lines on its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, role: str, *args: str) -> Child:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(HERE), role, *args, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        return cls(proc)

    async def line(self, timeout: float = 120) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"client process {self.proc.pid} ended ({await self.proc.wait()})")
        return line.decode().strip()

    async def expect(self, word: str, timeout: float = 120) -> None:
        if (line := await self.line(timeout)) != word:
            raise RuntimeError(f"expected {word!r} from client process, got {line[:500]!r}")

    async def result(self, timeout: float = 120) -> dict[str, Any]:
        return json.loads(await self.line(timeout))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send("stop")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def publish_run(addr: str, pid: int, tracks: int, batch: int, rate: float = 0.0, final: bool = False,
                      run: int = 0, before_go: Callable[[], Any] | None = None) -> dict[str, Any]:
    """A publisher process: seeds (run 0 only), (awaits ``before_go``), publishes; its JSON
    result. Later runs on the same server pass their own ``run``."""
    args = [addr, "--server-pid", str(pid), "--tracks", str(tracks), "--batch", str(batch), "--seconds", str(SECONDS),
            "--rate", str(rate), "--run", str(run)] + (["--final"] if final else []) + (["--no-seed"] if run else [])
    child = await Child.start("publish", *args)
    try:
        await child.expect("seeded")
        if before_go is not None:
            await before_go()
        child.send("go")
        result = await child.result(SECONDS + 120)
    finally:
        await child.close()
    assert child.proc.returncode == 0, child.proc.returncode
    if "error" not in result:
        assert result["rejected"] == 0 and result["applied"] == result["sent"], result  # every write applied
    return result


# ---- BW1 --------------------------------------------------------------------------------


def test_bw1_publish_batched(benchmark: BenchmarkFixture, tmp_path: pathlib.Path,
                             bench_report: Callable[[str], None]) -> None:
    with server(tmp_path) as (addr, pid):
        single = asyncio.run(publish_run(addr, pid, TRACKS, 1))
        batched = benchmark.pedantic(lambda: asyncio.run(publish_run(addr, pid, TRACKS, BATCH, run=1)),
                                     rounds=1, iterations=1)
    for r in (single, batched):
        if "error" in r:  # the server ended the stream: count what was sent (unconfirmed)
            r["applied"] = r["sent"]
            r["updates_per_s"] = r["sent"] / r["seconds"]
    ratio = batched["updates_per_s"] / single["updates_per_s"]
    info = benchmark.extra_info
    info["nproc"] = os.cpu_count()
    for name, r in (("single", single), ("batched", batched)):
        info[f"{name}_updates_per_s"] = round(r["updates_per_s"])
        info[f"{name}_server_cpu_us_per_update"] = round(r["server_cpu"] / r["applied"] * 1e6, 3)
        info[f"{name}_server_cores"] = round(r["server_cpu"] / r["seconds"], 2)
        info[f"{name}_client_cores"] = round(r["client_cpu"] / r["seconds"], 2)
        info[f"{name}_seconds"] = round(r["seconds"], 2)
    info["batch"] = BATCH
    info["ratio_batched_vs_single"] = round(ratio, 1)
    info["target_updates_per_s"] = TARGET_BATCHED
    info["target_met"] = batched["updates_per_s"] >= TARGET_BATCHED
    info["errors"] = {name: r["error"] for name, r in (("single", single), ("batched", batched)) if "error" in r}
    for name, r in (("1 entity/msg", single), (f"{BATCH} entities/msg", batched)):
        failed = f"; STREAM ENDED BY THE SERVER after {r['sent']:,} sent: {r['error']}" if "error" in r else ""
        bench_report(f"BW1 publish {name}: {r['updates_per_s']:,.0f} updates/s ({r['applied']:,} in {r['seconds']:.2f} s; "
                     f"server {r['server_cpu'] / r['applied'] * 1e6:.2f} us CPU/update, "
                     f"{r['server_cpu'] / r['seconds']:.2f} cores; publisher {r['client_cpu'] / r['seconds']:.2f} "
                     f"cores{failed})")
    bench_report(f"BW1 batched/single: {ratio:.1f}x; target {TARGET_BATCHED:,}/s "
                 f"{'met' if info['target_met'] else 'NOT met'} (nproc={os.cpu_count()})")
    assert not info["errors"], info["errors"]


# ---- BW2 --------------------------------------------------------------------------------


async def fanout(addr: str, pid: int) -> dict[str, Any]:
    alone = await publish_run(addr, pid, TRACKS, BATCH, rate=FANOUT_RATE, final=True)
    watchers = [await Child.start("watch", addr, *(["--decode"] if FANOUT_DECODE else []))
                for _ in range(FANOUT_WATCHERS)]
    try:
        for w in watchers:
            await w.expect("ready", 60)
        await wait_watchers(addr, FANOUT_WATCHERS)
        marks: dict[str, float] = {}

        async def go() -> None:
            marks["cpu0"] = cpu_seconds(pid)

        loaded = await publish_run(addr, pid, TRACKS, BATCH, rate=FANOUT_RATE, final=True, run=1, before_go=go)
        reports = []
        for w in watchers:
            try:
                reports.append(await w.result(FINAL_WAIT))
            except asyncio.TimeoutError:
                w.send("report")
                reports.append(await w.result(30))
        cpu1 = cpu_seconds(pid)
        stats = get_stats(addr)
    finally:
        for w in watchers:
            await w.close()
    return {"alone": alone, "loaded": loaded, "reports": reports, "stats": stats,
            "cpu_with": cpu1 - marks["cpu0"]}


def test_bw2_watch_fanout(benchmark: BenchmarkFixture, tmp_path: pathlib.Path,
                          bench_report: Callable[[str], None]) -> None:
    with server(tmp_path) as (addr, pid):
        out = benchmark.pedantic(lambda: asyncio.run(fanout(addr, pid)), rounds=1, iterations=1)
    alone, loaded, stats = out["alone"], out["loaded"], out["stats"]
    assert "error" not in alone and "error" not in loaded, (alone.get("error"), loaded.get("error"))
    streams = [s for r in out["reports"] for s in r["streams"]]
    applied = loaded["applied"]
    coalesced = int(stats["coalesced"])
    if not FANOUT_DECODE:  # events estimated from the bytes (the batches of the final write are small)
        for s in streams:
            s["events"] = round(s["bytes"] / EVENT_BYTES) + 1
    events = [s["events"] - 1 for s in streams]  # less the final write
    fractions = [e / applied for e in events]
    rates = [e / loaded["seconds"] for e in events]
    lags = [s["final_at"] - loaded["t_final_sent"] if s["final_at"] else None for s in streams]
    drains = [s["before_final"] - loaded["t1"] if s["before_final"] else None for s in streams]
    delivered = sum(s["events"] for s in streams)
    # The same writer alone (no watcher), per update, for as many updates: the rest is the watchers'.
    cpu_alone = alone["server_cpu"] * applied / alone["applied"]
    cpu_per_event = (out["cpu_with"] - cpu_alone) / delivered
    watcher_cores = [r["cpu"] / loaded["seconds"] for r in out["reports"]]

    info = benchmark.extra_info
    info.update(nproc=os.cpu_count(), watchers=len(streams), tracks=TRACKS, target_rate=FANOUT_RATE, decode=FANOUT_DECODE,
                writer_applied_per_s=round(loaded["updates_per_s"]),
                writer_alone_applied_per_s=round(alone["updates_per_s"]),
                per_watcher_events_per_s=[round(r) for r in rates], delivered_fraction=[round(f, 4) for f in fractions],
                ratio_min=round(min(fractions), 4), coalesced=coalesced,
                final_lag_s=[round(x, 3) if x is not None else None for x in lags],
                drain_after_writer_s=[round(d, 3) if d is not None else None for d in drains],
                server_cpu_alone_cores=round(alone["server_cpu"] / alone["seconds"], 3),
                server_cpu_with_s=round(out["cpu_with"], 3),
                server_cpu_us_per_delivered_event=round(cpu_per_event * 1e6, 3),
                watcher_process_cpu_s=[round(r["cpu"], 2) for r in out["reports"]],
                stream_errors=[s["end"] for s in streams if s["end"]])
    bench_report(f"BW2 fan-out to {len(streams)} watchers: writer {loaded['updates_per_s']:,.0f} updates/s applied "
                 f"(target {FANOUT_RATE:,.0f}; alone {alone['updates_per_s']:,.0f}); per watcher "
                 f"{', '.join(f'{r:,.0f}' for r in rates)} events/s; delivered "
                 f"{', '.join(f'{f:.3f}' for f in fractions)} of the writes; coalesced {coalesced:,}")
    bench_report(f"BW2 server CPU {cpu_per_event * 1e6:.2f} us per delivered event "
                 f"({out['cpu_with']:.2f} s with watchers vs {cpu_alone:.2f} s for as many updates alone); watcher processes "
                 f"{', '.join(f'{c:.2f}' for c in watcher_cores)} cores; final state seen "
                 f"{', '.join(f'{x * 1000:.0f}' if x is not None else 'NEVER' for x in lags)} ms after the last write; "
                 f"the writer's events reached them until {max((d for d in drains if d is not None), default=0) * 1000:.0f} ms "
                 f"after it was answered (nproc={os.cpu_count()})")
    assert loaded["final_stored"]
    assert all(x is not None for x in lags), "a watcher never received the final state"
    assert not info["stream_errors"], info["stream_errors"]
    if coalesced == 0 and FANOUT_DECODE:  # nothing folded: every watcher got every write, exactly once
        assert events == [applied] * len(streams), (events, applied)
    else:
        assert all(e <= applied for e in events), (events, applied)


# ---- BW3 --------------------------------------------------------------------------------


async def many(addr: str, pid: int) -> dict[str, Any]:
    alone = await publish_run(addr, pid, MANY_TRACKS, BATCH)
    rss: dict[str, Any] = {"before": rss_kib(pid)}
    per_proc = [READERS // READER_PROCS + (k < READERS % READER_PROCS) for k in range(READER_PROCS)]
    readers = [await Child.start("watch", addr, "--streams", str(n)) for n in per_proc if n]
    stuck_child = await Child.start("stuck", addr, "--aio", str(STUCK // 2), "--raw", str(STUCK - STUCK // 2))
    samples: list[int] = []
    try:
        for c in (*readers, stuck_child):
            await c.expect("ready", 120)
        await wait_watchers(addr, READERS + STUCK)
        await asyncio.sleep(0.5)
        rss["idle"] = rss_kib(pid)
        marks: dict[str, float] = {}
        sampling = True

        async def sample() -> None:
            while sampling:
                samples.append(rss_kib(pid)["VmRSS"])
                await asyncio.sleep(0.2)

        async def go() -> None:
            marks["cpu0"] = cpu_seconds(pid)
            marks["readers_cpu0"] = sum(cpu_seconds(r.proc.pid) for r in readers)
            asyncio.ensure_future(sample())

        loaded = await publish_run(addr, pid, MANY_TRACKS, BATCH, final=True, run=1, before_go=go)
        rss["after_load"] = rss_kib(pid)
        stats_loaded = get_stats(addr)
        reports = []
        for r in readers:
            remaining = max(1.0, loaded["t_final_sent"] + FINAL_WAIT - time.monotonic())
            try:
                reports.append(await r.result(remaining))
            except asyncio.TimeoutError:
                r.send("report")
                reports.append(await r.result(30))
        sampling = False
        rss["readers_done"] = rss_kib(pid)
        stats = get_stats(addr)
        readers_cpu = sum(cpu_seconds(r.proc.pid) for r in readers) - marks["readers_cpu0"]
    finally:
        for c in (*readers, stuck_child):
            await c.close()
    await asyncio.sleep(1.0)
    rss["closed"] = rss_kib(pid)
    closed_stats = get_stats(addr)
    return {"alone": alone, "loaded": loaded, "reports": reports, "rss": rss, "samples": samples,
            "stats_loaded": stats_loaded, "stats": stats, "closed_stats": closed_stats, "readers_cpu": readers_cpu}


def test_bw3_many_watchers(benchmark: BenchmarkFixture, tmp_path: pathlib.Path,
                           bench_report: Callable[[str], None]) -> None:
    with server(tmp_path) as (addr, pid):
        out = benchmark.pedantic(lambda: asyncio.run(many(addr, pid)), rounds=1, iterations=1)
    alone, loaded, rss = out["alone"], out["loaded"], out["rss"]
    assert "error" not in alone and "error" not in loaded, (alone.get("error"), loaded.get("error"))
    streams = [s for r in out["reports"] for s in r["streams"]]
    ratio = loaded["updates_per_s"] / alone["updates_per_s"]
    lags = sorted(s["final_at"] - loaded["t_final_sent"] if s["final_at"] else float("inf") for s in streams)
    within = sum(x <= TARGET_FINAL_S for x in lags)
    mib = {k: round(v["VmRSS"] / 1024, 1) for k, v in rss.items()}
    peak = round(max(out["samples"] + [rss["readers_done"]["VmRSS"]]) / 1024, 1)
    received = [s["bytes"] / loaded["seconds"] / 1e6 for s in streams]

    info = benchmark.extra_info
    info.update(nproc=os.cpu_count(), tracks=MANY_TRACKS, readers=len(streams), stuck=STUCK,
                ingest_alone_per_s=round(alone["updates_per_s"]), ingest_with_watchers_per_s=round(loaded["updates_per_s"]),
                ratio=round(ratio, 3), target_ratio=TARGET_MANY_RATIO, ratio_met=ratio >= TARGET_MANY_RATIO,
                rss_mib=mib, rss_peak_mib=peak, server_vmhwm_mib=round(rss["closed"]["VmHWM"] / 1024, 1),
                final_lag_s_min=round(lags[0], 3), final_lag_s_median=round(lags[len(lags) // 2], 3),
                final_lag_s_max=round(lags[-1], 3), readers_within_target=within, target_final_s=TARGET_FINAL_S,
                final_met=within == len(streams), coalesced=int(out["stats"]["coalesced"]),
                coalesced_at_load_end=int(out["stats_loaded"]["coalesced"]),
                reader_mb_per_s_median=round(sorted(received)[len(received) // 2], 2),
                readers_cpu_cores=round(out["readers_cpu"] / loaded["seconds"], 2),
                server_cpu_cores_alone=round(alone["server_cpu"] / alone["seconds"], 2),
                server_cpu_cores_with=round(loaded["server_cpu"] / loaded["seconds"], 2),
                watchers_after_close=int(out["closed_stats"]["watchers"]),
                stream_errors=sorted({s["end"] for s in streams if s["end"]}))
    bench_report(f"BW3 ingest with {len(streams)} reading + {STUCK} stuck watchers: {loaded['updates_per_s']:,.0f} "
                 f"updates/s vs {alone['updates_per_s']:,.0f} alone: {ratio:.2f}x (target {TARGET_MANY_RATIO}x "
                 f"{'met' if info['ratio_met'] else 'NOT met'}); server {info['server_cpu_cores_with']} cores "
                 f"(alone {info['server_cpu_cores_alone']}), reader processes {info['readers_cpu_cores']} cores")
    bench_report(f"BW3 server RSS MiB: before {mib['before']}, watchers idle {mib['idle']}, peak {peak}, after load "
                 f"{mib['after_load']}, readers done {mib['readers_done']}, all closed {mib['closed']}; "
                 f"coalesced {info['coalesced']:,}")
    bench_report(f"BW3 final state at the readers: {within}/{len(streams)} within {TARGET_FINAL_S:.0f} s of the last "
                 f"write (min {lags[0]:.2f}, median {lags[len(lags) // 2]:.2f}, max {lags[-1]:.2f} s; target "
                 f"{'met' if info['final_met'] else 'NOT met'}); readers got {info['reader_mb_per_s_median']} MB/s "
                 f"each (median) (nproc={os.cpu_count()})")
    assert loaded["final_stored"]
    assert all(s["final_at"] is not None for s in streams), \
        f"{sum(s['final_at'] is None for s in streams)} reading watchers never got the final state"
    assert info["watchers_after_close"] == 0, info["watchers_after_close"]


if __name__ == "__main__":
    child_main()
