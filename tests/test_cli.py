"""The ``meshstore`` command line, as real subprocesses against a real ``meshstore serve``.

The server is started with ``--port 0`` and tells its bound address on stderr
(``listening address=HOST:PORT``). Every client command runs as its own process
(``python -m meshstore.cli``, the same ``main()`` as the console script).
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import re
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2, store_pb2_grpc

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 10.0
CLI = [sys.executable, "-m", "meshstore.cli"]
CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "meshstore"
NODE = "cli-node"


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)
    return result


def cli_env(addr: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no inherited MESHSTORE_ settings, and a data
    dir of its own (a server started with it is durable, as by default, and never shares
    its dir with another test's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSTORE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    env["MESHSTORE_DATA_DIR"] = data_dir = tempfile.mkdtemp(prefix="meshstore-cli-data-")
    atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
    if addr is not None:
        env["MESHSTORE_ADDR"] = addr
    env.update(extra)
    return env


def run(*args: str, addr: str | None = None, env: dict[str, str] | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else cli_env(addr))


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert lines[0].startswith("error: ")
    return lines[0]


class Served:
    """``meshstore serve --port 0`` in a subprocess, its log in a file."""

    def __init__(self, tmp: pathlib.Path, *args: str, prefix: list[str] | None = None, **env: str) -> None:
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen([*(prefix or []), *CLI, "serve", "--port", "0", "--node-id", NODE, *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log, env=cli_env(**env), text=True)
        match = wait_for(lambda: re.search(r"msg=listening address=(\S+) node_id=(\S+)", self.text())
                         or self.proc.poll() is not None, what="server listening")
        assert match is not True, f"serve exited early: {self.text()}"
        self.addr, self.node_id = match.group(1), match.group(2)
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = store_pb2_grpc.EntityStoreServiceStub(self.channel)

    def text(self) -> str:
        return self.log_path.read_text()

    def stats(self) -> dict[str, float]:
        return dict(self.stub.GetStats(store_pb2.GetStatsRequest(), timeout=TIMEOUT).values)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("serve"))
    pending = entity_pb2.ApprovalComponent(state=entity_pb2.APPROVAL_STATE_PENDING, timeout_seconds=60)
    entities = [
        make_entity("t1", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=1.5, lon=2.5),
                    threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_LOW)),
        make_entity("t2", entity_pb2.ENTITY_TYPE_TRACK, approval=pending),
        make_entity("t3", entity_pb2.ENTITY_TYPE_TRACK, approval=pending),
        make_entity("a1", entity_pb2.ENTITY_TYPE_ASSET, task_catalog=entity_pb2.TaskCatalogComponent(
            available_tasks=["survey"])),
    ]
    odd = make_entity("g1", entity_pb2.ENTITY_TYPE_GEO)
    odd.components["custom"].type_url = "type.googleapis.com/not.known.Type"
    odd.components["custom"].value = b"\x08\x01"
    entities.append(odd)
    for e in entities:
        server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=e), timeout=TIMEOUT)
    yield server
    assert server.stop() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- help and usage ---------------------------------------------------------------------

def test_help_on_every_command() -> None:
    commands = ["serve", "list", "get", "watch", "approve", "deny", "stats"]
    procs = {c: subprocess.Popen([*CLI, *([c] if c else []), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=cli_env()) for c in [*commands, ""]}
    outputs = {c: (p.communicate(timeout=TIMEOUT), p.returncode) for c, p in procs.items()}
    (top, _), code = outputs.pop("")
    assert code == 0 and all(c in top for c in commands) and "Exit codes" in top
    expected = {"serve": "--max-message-bytes", "list": "--type", "get": "ID", "watch": "--since",
                "approve": "PENDING -> APPROVED", "deny": "PENDING -> DENIED", "stats": "counters"}
    for command, ((out, err), code) in outputs.items():
        assert code == 0 and expected[command] in out and "Traceback" not in err, (command, out, err)


def test_console_script_is_installed() -> None:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("meshstore console script not installed next to this interpreter")
    result = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=TIMEOUT,
                            env=cli_env())
    assert result.returncode == 0 and "serve" in result.stdout


def run_many(*commands: tuple[list[str], str]) -> list[subprocess.CompletedProcess[str]]:
    """Runs (args, MESHSTORE_ADDR) commands concurrently (process start-up dominates)."""
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cli_env(addr)) for args, addr in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT * 2)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_bad_usage_is_one_line_exit_2() -> None:
    cases = [
        (["list", "-t", "boat"], "'boat' is not one of"),
        (["watch", "--count", "0"], "--count"),
        (["get"], "Missing argument 'ID'"),
        (["frobnicate"], "No such command"),
        (["serve", "--peer-expiry", "-1"], "peer_expiry"),
        (["serve", "--log-level", "loud"], "unknown log level"),
        (["serve", "--port", "70000"], "--port"),
    ]
    results = run_many(*[(args, "127.0.0.1:1") for args, _ in cases])
    for (args, fragment), result in zip(cases, results):
        assert_one_line_error(result, 2, fragment)


def test_bad_store_address_is_a_clear_error() -> None:
    addrs = ["not-an-address", "127.0.0.1:99999", "host:port", ":50051"]
    for addr, result in zip(addrs, run_many(*[(["list"], addr) for addr in addrs])):
        line = assert_one_line_error(result, 2, "invalid store address")
        assert repr(addr) in line and "MESHSTORE_ADDR" in line


def test_server_down_is_one_line_exit_1() -> None:
    addr = f"127.0.0.1:{free_port()}"
    commands = [["list"], ["get", "t1"], ["watch", "--count", "1"], ["stats"], ["approve", "t1"]]
    for result in run_many(*[(args, addr) for args in commands]):
        assert_one_line_error(result, 1, f"cannot reach the store at {addr}")


# ---- client commands --------------------------------------------------------------------

def test_list(served: Served) -> None:
    result = run("list", "--json", addr=served.addr)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["count"] == 5 and [e["id"] for e in listed["entities"]] == ["a1", "g1", "t1", "t2", "t3"]

    assets = json.loads(run("list", "-t", "asset", "--json", addr=served.addr).stdout)
    assert [e["id"] for e in assets["entities"]] == ["a1"]
    assert assets["entities"][0]["components"]["task_catalog"]["available_tasks"] == ["survey"]

    table = run("list", "--type", "TRACK", "--store", served.addr, addr="127.0.0.1:1")  # --store wins over env
    assert table.returncode == 0, table.stderr
    assert "3 entities" in table.stdout and all(i in table.stdout for i in ("t1", "t2", "t3"))
    assert "a1" not in table.stdout


def test_get_json_unpacks_known_components(served: Served) -> None:
    result = run("get", "t1", "--json", addr=served.addr)
    assert result.returncode == 0, result.stderr
    entity = json.loads(result.stdout)
    assert entity["id"] == "t1" and entity["type"] == "ENTITY_TYPE_TRACK" and entity["origin_node"] == NODE
    assert entity["components"]["position"] == {
        "@type": "type.googleapis.com/entity.v1.PositionComponent", "lat": 1.5, "lon": 2.5}
    assert entity["components"]["threat"]["level"] == "THREAT_LEVEL_LOW"
    assert set(entity["versions"]) >= {"position", "threat"}

    unknown = json.loads(run("get", "g1", "--json", addr=served.addr).stdout)
    assert unknown["components"]["custom"] == {"@type": "type.googleapis.com/not.known.Type", "value": "CAE="}

    table = run("get", "t1", addr=served.addr)
    assert table.returncode == 0 and "PositionComponent" in table.stdout and "THREAT_LEVEL_LOW" in table.stdout


def test_get_unknown_id(served: Served) -> None:
    assert_one_line_error(run("get", "nope", addr=served.addr), 3, "entity 'nope' not found")
    assert_one_line_error(run("get", "", addr=served.addr), 2, "invalid request", "id is empty")


def test_approve_and_deny(served: Served) -> None:
    approved = run("approve", "t2", "--json", addr=served.addr)
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["components"]["approval"]["state"] == "APPROVAL_STATE_APPROVED"
    assert_one_line_error(run("approve", "t2", addr=served.addr), 1, "no pending approval on entity 't2'")

    denied = run("deny", "t3", addr=served.addr)
    assert denied.returncode == 0 and denied.stdout.strip() == "denied t3", denied
    stored = json.loads(run("get", "t3", "--json", addr=served.addr).stdout)
    assert stored["components"]["approval"]["state"] == "APPROVAL_STATE_DENIED"

    assert_one_line_error(run("deny", "t1", addr=served.addr), 1, "no pending approval on entity 't1'")
    assert_one_line_error(run("approve", "ghost", addr=served.addr), 3, "'ghost' not found")


def test_watch_existing_with_count_and_projection(served: Served) -> None:
    result = run("watch", "-t", "track", "--existing", "--components", "position", "--count", "2", "--json",
                 addr=served.addr)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["type"], e["entity"]["id"]) for e in events] == [("CREATED", "t1"), ("CREATED", "t2")]
    assert list(events[0]["entity"]["components"]) == ["position"]
    assert all(isinstance(e["seq"], int) and e["origin_node"] == NODE for e in events)


def test_watch_live_and_since(served: Served) -> None:
    start = int(served.stats()["seq"])
    watch = subprocess.Popen([*CLI, "watch", "--count", "2", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=cli_env(served.addr))
    wait_for(lambda: served.stats()["server.watch_streams"] >= 1 or watch.poll() is not None, what="watch open")
    for lat in (7.0, 8.0):
        entity = make_entity("live", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=lat))
        served.stub.PublishEntities(iter([store_pb2.PublishRequest(entity=entity)]), timeout=TIMEOUT)
    out, err = watch.communicate(timeout=TIMEOUT)
    assert watch.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["CREATED", "UPDATED"]
    assert events[1]["entity"]["components"]["position"]["lat"] == 8.0

    resumed = run("watch", "--since", str(start), "--count", "1", "--json", addr=served.addr)
    assert json.loads(resumed.stdout)["entity"]["id"] == "live"

    human = run("watch", "--existing", "-t", "asset", "--count", "1", addr=served.addr)
    assert human.returncode == 0 and "CREATED" in human.stdout and "a1" in human.stdout


def test_watch_timeout_ends_quietly(served: Served) -> None:
    started = time.monotonic()
    result = run("watch", "-t", "geo", "--timeout", "0.3", addr=served.addr)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result
    assert time.monotonic() - started < TIMEOUT


def test_stats(served: Served) -> None:
    result = run("stats", "--json", addr=served.addr)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["node_id"] == NODE and stats["health"] == "SERVING"
    assert stats["values"]["entities"] >= 5 and isinstance(stats["values"]["seq"], int)
    table = run("stats", addr=served.addr)
    assert table.returncode == 0 and "SERVING" in table.stdout and "entities" in table.stdout


def test_ctrl_c_on_a_client_exits_130(served: Served) -> None:
    before = served.stats()["server.watch_streams"]
    watch = subprocess.Popen([*CLI, "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env(served.addr))
    wait_for(lambda: served.stats()["server.watch_streams"] > before or watch.poll() is not None, what="watch open")
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=TIMEOUT)
    assert watch.returncode == 130 and "Traceback" not in err, (out, err)
    wait_for(lambda: served.stats()["server.watch_streams"] == before, what="server watch stream closed")


# ---- serve ------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_signals_and_ends_watches(tmp_path: pathlib.Path, sig: int) -> None:
    server = Served(tmp_path, "--grace", "5")
    watch = subprocess.Popen([*CLI, "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env(server.addr))
    wait_for(lambda: server.stats()["server.watch_streams"] == 1 or watch.poll() is not None, what="watch open")
    started = time.monotonic()
    assert server.stop(sig) == 0
    assert time.monotonic() - started < 4.0  # the open stream did not hold shutdown for the grace period
    log = server.text()
    assert "Traceback" not in log and f"msg=\"shutting down\" signal={signal.Signals(sig).name}" in log
    assert "msg=stopped" in log
    out, err = watch.communicate(timeout=TIMEOUT)
    assert_one_line_error(subprocess.CompletedProcess(watch.args, watch.returncode, out, err), 1, "shutting down")


def test_serve_on_a_taken_port_is_one_line_exit_1(served: Served) -> None:
    port = served.addr.rsplit(":", 1)[1]
    taken = subprocess.run([*CLI, "serve", "--port", port], capture_output=True, text=True,
                           timeout=TIMEOUT, env=cli_env())
    assert_one_line_error(taken, 1, f"cannot listen on 127.0.0.1:{port}")


def test_serve_logs_json_lines(tmp_path: pathlib.Path) -> None:
    log_path = tmp_path / "json.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--log-json"], stdout=subprocess.DEVNULL,
                                stderr=log, env=cli_env(MESHSTORE_NODE_ID="json-node"))
        try:
            line = wait_for(lambda: next((l for l in log_path.read_text().splitlines() if '"listening"' in l), None)
                            or proc.poll() is not None, what="listening line")
            record = json.loads(line)
            assert record["msg"] == "listening" and record["node_id"] == "json-node" and record["level"] == "info"
            channel = grpc.insecure_channel(record["address"])
            stub = store_pb2_grpc.EntityStoreServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.GetEntity(store_pb2.GetEntityRequest(id="ghost"), timeout=TIMEOUT)
            channel.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = [json.loads(l) for l in log_path.read_text().splitlines()]
    failure = next(r for r in records if r["msg"] == "request failed")
    assert failure["code"] == "NOT_FOUND" and failure["method"] == "GetEntity" and failure["level"] == "info"
    assert records[-1]["msg"] == "stopped"


# ---- mesh -------------------------------------------------------------------------------

def test_two_serve_processes_with_peers_replicate_and_report_their_links(tmp_path: pathlib.Path) -> None:
    port_a, port_b = free_port(), free_port()
    addr_a, addr_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    a = Served(tmp_path, "--node-id", "mesh-a", "--port", str(port_a), "--peer", addr_b)
    b = Served(tmp_path, "--node-id", "mesh-b", "--port", str(port_b), MESHSTORE_PEERS=addr_a)
    try:
        a.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=make_entity(
            "m1", entity_pb2.ENTITY_TYPE_TRACK, threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_HIGH))),
            timeout=TIMEOUT)
        got = wait_for(lambda: (r := run("get", "m1", "--json", addr=addr_b)).returncode == 0 and r,
                       what="m1 replicated to b")
        assert json.loads(got.stdout)["id"] == "m1"
        b.stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="m1"), timeout=TIMEOUT)
        wait_for(lambda: run("get", "m1", addr=addr_a).returncode == 3, what="the delete replicated to a")

        stats = json.loads(run("stats", "--json", addr=addr_a).stdout)["values"]
        assert stats[f"peer.{addr_b}.connected"] == 1 and stats[f"peer.{addr_b}.sent_states"] >= 1
        assert stats[f"peer.{addr_b}.lag"] == 0
        assert "mesh peers" in run("stats", addr=addr_a).stdout
    finally:
        assert a.stop() == 0 and b.stop() == 0


def test_serve_refuses_a_malformed_peer(tmp_path: pathlib.Path) -> None:
    result = subprocess.run([*CLI, "serve", "--port", "0", "--peer", "nowhere"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=cli_env())
    assert_one_line_error(result, 2, "--peer must be HOST:PORT")


def grpc_threads(pid: int) -> int:
    """The threads of process ``pid`` serving gRPC connections (the runtime names them)."""
    return sum((task / "comm").read_text().strip() == "meshstore-grpc"
               for task in pathlib.Path(f"/proc/{pid}/task").iterdir())


def test_serve_runs_the_grpc_threads_asked_for_and_one_per_usable_cpu_by_default(tmp_path: pathlib.Path) -> None:
    asked = Served(tmp_path, "--in-memory", "--grpc-workers", "3")
    # Pinned to one CPU, the default is one thread, whatever the machine has.
    assert shutil.which("taskset"), "taskset (util-linux) is needed"
    pinned = Served(tmp_path, "--in-memory", prefix=["taskset", "-c", "0"])
    from_env = Served(tmp_path, "--in-memory", MESHSTORE_GRPC_WORKERS="2")
    try:
        for server, threads in ((asked, 3), (pinned, 1), (from_env, 2)):
            assert f"grpc_workers={threads} " in server.text()
            assert grpc_threads(server.proc.pid) == threads
            track = make_entity("w1", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=1.0))
            server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=track), timeout=TIMEOUT)
            got = server.stub.GetEntity(store_pb2.GetEntityRequest(id="w1"), timeout=TIMEOUT)
            assert got.components["position"] == track.components["position"]
    finally:
        assert asked.stop() == 0 and pinned.stop() == 0 and from_env.stop() == 0


@pytest.mark.parametrize("args,env,says", [
    (["--grpc-workers", "0"], {}, "--grpc-workers"),
    (["--grpc-workers", "5000"], {}, "--grpc-workers"),
    ([], {"MESHSTORE_GRPC_WORKERS": "many"}, "--grpc-workers"),
], ids=["zero", "too-many", "env-not-a-number"])
def test_serve_refuses_a_bad_grpc_thread_count(args: list[str], env: dict[str, str], says: str) -> None:
    result = subprocess.run([*CLI, "serve", "--in-memory", "--port", "0", *args], capture_output=True, text=True,
                            timeout=TIMEOUT, env=cli_env(**env))
    assert_one_line_error(result, 2, says)


def test_serve_refuses_an_empty_watch_queue() -> None:
    result = subprocess.run([*CLI, "serve", "--in-memory", "--port", "0", "--watch-queue", "0"], capture_output=True,
                            text=True, timeout=TIMEOUT, env=cli_env())
    assert_one_line_error(result, 2, "watch_queue must be an int >= 1")
