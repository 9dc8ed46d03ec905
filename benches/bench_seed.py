"""BSEED: unary UpdateEntity throughput of meshstore against the seed system's own server.

One Go load generator (benches/loadgen, built here against the seed's generated gRPC
client) drives four servers, each a fresh subprocess on a free 127.0.0.1 port:

- ``seed``: the seed's ``entity-store`` (in memory, like every seed store);
- ``grpc-go bare``: benches/bareserver, the seed's generated service on grpc-go with no
  store behind it (it keeps the last entity sent per id and answers it): the floor of
  the seed's stack, so the seed's rate over it says how much of the seed's time is its
  own code, and meshstore's how it compares with the framework itself;
- ``meshstore memory``: ``meshstore serve --in-memory``, like for like with it;
- ``meshstore commit``: ``meshstore serve`` with a data dir and ``--durability commit``
  (its default: a write is answered once on disk).

For 1 and 8 clients (a connection each), BSEED_ROUNDS rounds run the four servers in
turn (interleaved, so drift on a shared machine hits them alike): 1,000 tracks created,
BSEED_WARMUP s of load, then a BSEED_SECONDS s window in which every UpdateEntity that
ends is counted and timed. The clients call back to back (closed loop: each server runs
at its own top rate, so their latencies are taken at different loads), and once more
paced at each of BSEED_PACED_RATES updates/s in all (the same load for every server:
latency like for like; the highest is near the seed's top rate on a 2-vCPU machine, and
a server that cannot keep up shows a lower rate than asked). The server's CPU time
(utime + stime from /proc) is read as the window opens and closes, for CPU per update.
Each server's figures are the median of its rounds; its ratio to the seed is the median
of the rounds' ratios. Every round must be free of errors, and each client's last
position must read back as sent.

Needs the seed built by its build script (``make bench-seed LATTICE_GIT=<git dir of a
boshu2/lattice-lab snapshot> LATTICE_BUILD=<build dir> LATTICE_BUILD_SCRIPT=<its build
script>`` does it all): LATTICE_BUILD, the build dir with env.sh (Go in GOPATH mode), and
LATTICE_BIN, the directory holding entity-store.

Knobs (environment): BSEED_ROUNDS (5: the host's speed drifts by 10-20% from minute to
minute), BSEED_SECONDS (5), BSEED_WARMUP (1), BSEED_PACED_RATES (6000,12000).
Runs only when benchmarks are asked for: pytest benches --benchmark-only
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from bench_grpc import serve_process, stop_process
from bench_http import cpu_seconds
from pytest_benchmark.fixture import BenchmarkFixture

BENCHES = pathlib.Path(__file__).resolve().parent
LOADGEN = BENCHES / "loadgen" / "main.go"
BARE_SERVER = BENCHES / "bareserver" / "main.go"
ROUNDS = int(os.environ.get("BSEED_ROUNDS", 5))
SECONDS = float(os.environ.get("BSEED_SECONDS", 5))
WARMUP = float(os.environ.get("BSEED_WARMUP", 1))
PACED_RATES = [float(r) for r in os.environ.get("BSEED_PACED_RATES", "6000,12000").split(",")]
TRACKS = 1000
USAGE = ("BSEED needs the seed system built: run it with `make bench-seed LATTICE_GIT=<git dir of a "
         "boshu2/lattice-lab snapshot> LATTICE_BUILD=<build dir> LATTICE_BUILD_SCRIPT=<its build script>`")

pytestmark = pytest.mark.benchmark(group="seed-bseed")

Server = Callable[[pathlib.Path], contextlib.AbstractContextManager[tuple[str, int]]]


@pytest.fixture(scope="module", autouse=True)
def only_when_benchmarking(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_only"):
        pytest.skip("benchmarks run only with --benchmark-only")


@pytest.fixture(scope="module")
def entity_store() -> pathlib.Path:
    if not os.environ.get("LATTICE_BUILD") or not os.environ.get("LATTICE_BIN"):
        pytest.skip(USAGE)
    path = pathlib.Path(os.environ["LATTICE_BIN"]) / "entity-store"
    if not path.is_file():
        pytest.skip(f"{path} is missing; {USAGE}")
    return path


def go_build(source: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Builds one of benches' Go programs against the seed's build (GOPATH mode, its env.sh)."""
    out = tmp_path_factory.mktemp(source.parent.name) / source.parent.name
    done = subprocess.run(["bash", "-c", 'source "$1/env.sh" && go build -o "$2" "$3"', "bash",
                           os.environ["LATTICE_BUILD"], str(out), str(source)], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"go build of {source} failed: {done.stderr[-2000:]}")
    return out


# entity_store first in both: without the seed's build there is nothing to build against (skip).
@pytest.fixture(scope="module")
def loadgen(entity_store: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return go_build(LOADGEN, tmp_path_factory)


@pytest.fixture(scope="module")
def bare_server(entity_store: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return go_build(BARE_SERVER, tmp_path_factory)


def free_port() -> int:
    # The Go servers take only a port ($PORT); the kernel picks a free one here.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def go_served(binary: pathlib.Path, tmp: pathlib.Path) -> Iterator[tuple[str, int]]:
    """A Go server that takes its port from $PORT (the seed's entity-store, which binds
    every interface, or the bare server) in a subprocess; yields its 127.0.0.1 address once
    it accepts connections, and its pid. SIGTERM at the end."""
    port = free_port()
    log_path = tmp / f"{binary.name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(binary)], env={**os.environ, "PORT": str(port)},
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binary.name} did not start: {log_path.read_text()}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        stop_process(proc)


@contextlib.contextmanager
def meshstore_served(tmp: pathlib.Path, *serve_args: str) -> Iterator[tuple[str, int]]:
    # A node id as long as the default (host name + 6 hex digits): it is in every version
    # an answer carries, so its length sets the answer's size.
    with serve_process(tmp, *serve_args, node_id="bseed-3f9c2a") as (m, pid):
        yield m.group(1), pid


def servers(entity_store: pathlib.Path, bare_server: pathlib.Path) -> dict[str, Server]:
    return {
        "seed": lambda tmp: go_served(entity_store, tmp),
        "grpc-go bare": lambda tmp: go_served(bare_server, tmp),
        "meshstore memory": lambda tmp: meshstore_served(tmp, "--in-memory"),
        "meshstore commit": lambda tmp: meshstore_served(tmp, "--data-dir", str(tmp / "data"),
                                                         "--durability", "commit"),
    }


def run_load(loadgen: pathlib.Path, addr: str, pid: int, clients: int, rate: float, tmp: pathlib.Path) -> dict:
    """One loadgen run against the server at ``addr`` (process ``pid``), at ``rate``
    updates/s (0: back to back): its JSON result plus the server's CPU microseconds per
    update over the measured window."""
    args = [str(loadgen), "-addr", addr, "-clients", str(clients), "-tracks", str(TRACKS),
            "-duration", str(SECONDS), "-warmup", str(WARMUP), "-rate", str(rate)]
    err_path = tmp / "loadgen.err"
    cpu: dict[str, float] = {}
    with err_path.open("w") as err, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            line = line.strip()
            if line in ("window start", "window end"):
                cpu[line] = cpu_seconds(pid)
            else:
                lines.append(line)
    if proc.returncode != 0 or len(cpu) != 2 or not lines:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err_path.read_text()[-2000:]}")
    result = json.loads(lines[-1])
    result["cpu_us_per_update"] = (cpu["window end"] - cpu["window start"]) / max(result["updates"], 1) * 1e6
    result["first_error"] = err_path.read_text().strip()
    return result


def interleaved(loadgen: pathlib.Path, table: dict[str, Server], clients: int, rate: float,
                tmp: pathlib.Path) -> dict[str, list[dict]]:
    """ROUNDS rounds, each running every server in turn, a fresh one each time."""
    runs: dict[str, list[dict]] = {name: [] for name in table}
    for r in range(ROUNDS):
        for name, serve in table.items():
            run_dir = tmp / f"round{r}-{name.replace(' ', '-')}"
            run_dir.mkdir()
            with serve(run_dir) as (addr, pid):
                result = run_load(loadgen, addr, pid, clients, rate, run_dir)
            assert result["errors"] == 0, (name, result)
            assert result["last_write_visible"], (name, result)
            runs[name].append(result)
    return runs


@pytest.mark.parametrize("clients,rate", [(1, 0), (8, 0), *((8, r) for r in PACED_RATES)],
                         ids=["1", "8", *(f"8-paced-{r:g}" for r in PACED_RATES)])
def test_bseed_unary_update_vs_seed(benchmark: BenchmarkFixture, clients: int, rate: float, loadgen: pathlib.Path,
                                    entity_store: pathlib.Path, bare_server: pathlib.Path, tmp_path: pathlib.Path,
                                    bench_report: Callable[[str], None]) -> None:
    table = servers(entity_store, bare_server)
    runs = benchmark.pedantic(interleaved, args=(loadgen, table, clients, rate, tmp_path), rounds=1, iterations=1)

    seed = runs["seed"]
    info = benchmark.extra_info
    info.update(clients=clients, rate=rate, tracks=TRACKS, rounds=ROUNDS, window_s=SECONDS, warmup_s=WARMUP,
                nproc=os.cpu_count())
    load = f"paced at {rate:,.0f} updates/s" if rate else "back to back"
    bench_report(f"BSEED unary UpdateEntity, {clients} client(s) {load} (Go loadgen, {TRACKS:,} tracks, median "
                 f"of {ROUNDS} interleaved rounds x {SECONDS:g} s, nproc={os.cpu_count()}):")
    bench_report(f"  {'server':<18} {'updates/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU us/update':>14}"
                 f" {'vs seed':>8} {'p99 seed/ours':>14}")
    for name, results in runs.items():
        done = statistics.median(r["updates_per_s"] for r in results)
        p50 = statistics.median(r["p50_ms"] for r in results)
        p99 = statistics.median(r["p99_ms"] for r in results)
        p999 = statistics.median(r["p999_ms"] for r in results)
        cpu = statistics.median(r["cpu_us_per_update"] for r in results)
        ratio = statistics.median(r["updates_per_s"] / s["updates_per_s"] for r, s in zip(results, seed))
        p99_ratio = statistics.median(s["p99_ms"] / r["p99_ms"] for r, s in zip(results, seed))
        info[name.replace(" ", "_")] = {
            "updates_per_s": done, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "p999_ms": round(p999, 3),
            "server_cpu_us_per_update": round(cpu, 1), "ratio_vs_seed": round(ratio, 2),
            "p99_seed_over_ours": round(p99_ratio, 2),
            "rounds_updates_per_s": [r["updates_per_s"] for r in results],
            "rounds_p99_ms": [r["p99_ms"] for r in results],
        }
        bench_report(f"  {name:<18} {done:>10,.0f} {p50:>8.2f} {p99:>8.2f} {p999:>9.2f} {cpu:>14.1f} {ratio:>7.2f}x"
                     f" {p99_ratio:>13.2f}x")
