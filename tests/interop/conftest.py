"""Interop suite: the seed system's own Go binaries against a real ``meshstore serve``.

Run by ``make interop`` (never by ``make test``: it needs the seed system's binaries,
built from a snapshot of boshu2/lattice-lab). ``LATTICE_BIN`` names the directory that
holds them (lattice-cli, sensor-sim, radar-sim, classifier, task-manager, fusion).

Everything runs as subprocesses on 127.0.0.1: the server (``test_cli.Served``), the Go
clients (configured through their environment: STORE_ADDR, INTERVAL, NUM_TRACKS, ...)
and meshstore's own services; each one's output goes to a log file under the test's
tmp dir, so a failure can show it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from meshstore.pb import entity_pb2, store_pb2
from test_cli import CLI, TIMEOUT, Served, cli_env

GO_BINARIES = ("lattice-cli", "sensor-sim", "radar-sim", "classifier", "task-manager", "fusion")


def _bin_dir() -> pathlib.Path:
    value = os.environ.get("LATTICE_BIN")
    if not value:
        pytest.exit("LATTICE_BIN is not set: run the interop suite with `make interop` (see the README)", 2)
    path = pathlib.Path(value)
    missing = [name for name in GO_BINARIES if not (path / name).is_file()]
    if missing:
        pytest.exit(f"LATTICE_BIN={path} lacks {', '.join(missing)}", 2)
    return path


@pytest.fixture(scope="session")
def lattice_bin() -> pathlib.Path:
    return _bin_dir()


class Proc:
    """A long-running subprocess whose stdout+stderr lines are collected as they come."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: pathlib.Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                log.write(line)
                log.flush()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = TIMEOUT, start: int = 0) -> int:
        """The index of the first line from ``start`` matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(start, len(self.lines)):
                if predicate(self.lines[i]):
                    return i
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no matching line within {timeout}s; output:\n" + self.text())

    def text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(TIMEOUT)
        return code


class Interop:
    """Starts servers, Go clients and meshstore services for one test; stops them all."""

    def __init__(self, bin_dir: pathlib.Path, tmp: pathlib.Path) -> None:
        self.bin_dir = bin_dir
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.servers: list[Served] = []

    def serve(self, *args: str) -> Served:
        server = Served(self.tmp, *args)
        self.servers.append(server)
        return server

    def go(self, name: str, addr: str, **env: Any) -> Proc:
        """A Go service of the seed system against ``addr``."""
        environ = {**cli_env(), "STORE_ADDR": addr, **{k: str(v) for k, v in env.items()}}
        proc = Proc(name, [str(self.bin_dir / name)], environ, self.tmp)
        self.procs.append(proc)
        return proc

    def meshstore(self, service: str, addr: str, *args: str) -> Proc:
        """One of meshstore's services (``meshstore sensor-sim ...``) against ``addr``."""
        proc = Proc(f"meshstore-{service}", [*CLI, service, "--store", addr, *args], cli_env(), self.tmp)
        self.procs.append(proc)
        return proc

    def cli(self, addr: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``lattice-cli --store addr ARGS``, run to completion."""
        return subprocess.run([str(self.bin_dir / "lattice-cli"), "--store", addr, *args],
                              capture_output=True, text=True, timeout=TIMEOUT, env=cli_env())

    def watch(self, addr: str) -> Proc:
        """``lattice-cli watch``, running; ready once it has printed its banner."""
        proc = Proc("lattice-cli-watch", [str(self.bin_dir / "lattice-cli"), "--store", addr, "watch"],
                    cli_env(), self.tmp)
        self.procs.append(proc)
        proc.wait_line(lambda line: line.startswith("Watching track events"))
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for server in self.servers:
            server.stop()


# Lines of each server's and service's output a failed test prints (its whole log stays in tmp_path).
FAILURE_TAIL = 40
# Whether a test's call failed, for its fixture's teardown.
FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when == "call":
        item.stash[FAILED] = outcome.get_result().failed


@pytest.fixture
def interop(lattice_bin: pathlib.Path, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[Interop]:
    env = Interop(lattice_bin, tmp_path)
    try:
        yield env
    finally:
        env.close()
        if request.node.stash.get(FAILED, False):
            # Shown under "Captured stdout teardown": what each server and service said last.
            logs = [(s.log_path.name, s.text().splitlines(), s.log_path) for s in env.servers]
            logs += [(p.name, p.lines, p.log_path) for p in env.procs]
            for name, lines, path in logs:
                print(f"---- {name} (last {FAILURE_TAIL} lines; all in {path})")
                print("\n".join(lines[-FAILURE_TAIL:]))


def entities(server: Served) -> dict[str, entity_pb2.Entity]:
    listed = server.stub.ListEntities(store_pb2.ListEntitiesRequest(), timeout=TIMEOUT).entities
    return {e.id: e for e in listed}


def meshstore_get(addr: str, entity_id: str) -> dict:
    """``meshstore get ID --json``, parsed."""
    result = subprocess.run([*CLI, "get", entity_id, "--json"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=cli_env(addr))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``check`` (which asserts) until it passes; the last failure otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, grpc.RpcError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached within {timeout}s: {exc}") from None
            time.sleep(0.2)
