"""Browser tests of the web page (python/meshstore/http/static): a real node and the whole
pipeline as subprocesses, the page in Debian's chromium driven by Playwright.

- ``chromium``: the system's chromium (``shutil.which("chromium")``). Missing is a
  failure, not a skip: ``make test`` installs it (apt-get). No browser is ever downloaded
  (no ``playwright install``).
- ``browser``: Playwright's chromium launched from that binary, headless, ``--no-sandbox``
  (the tests run as root); one per test module (Playwright's sync API keeps an asyncio
  loop running on the main thread while it is open).
- ``pipeline``: ``meshstore serve --port 0 --http-port 0 --data-dir <tmp>`` plus
  sensor-sim, radar-sim, classifier, task-manager and fusion against it; ``stop_node()``
  (SIGTERM) and ``start_node()`` again restart it on the same ports and data dir.
- ``artifacts``: where screenshots and the processes' logs go: $MESHSTORE_ARTIFACTS, else
  a pytest tmp dir. Every screenshot's path is printed and listed at the end of the run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Lines

NODE_ID = "browser-node"
SERVICES = {
    "sensor-sim": ["--count", "20", "--rate", "2"],
    "radar-sim": ["--count", "20", "--rate", "2"],
    "classifier": [],
    "task-manager": ["--approval-timeout", "60"],
    "fusion": [],
}
LISTENING = re.compile(r"\blistening\b.*?\baddress=(?P<grpc>\S+:\d+).*?\bhttp=(?:https?://)?(?P<http>[^\s/]+:\d+)")

#: Screenshots taken in this run (listed in the terminal summary).
SCREENSHOTS: list[Path] = []


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}


def _command(name: str) -> list[str]:
    return [sys.executable, "-m", "meshstore.cli", name]


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Pipeline:
    """A node (``meshstore serve``) and the pipeline's services, as subprocesses."""

    def __init__(self, data_dir: Path, logs: Path) -> None:
        self.data_dir = data_dir
        self.logs = logs
        self.grpc_port = 0
        self.http_port = 0
        self.grpc = ""  # host:port of the store
        self.url = ""  # the page
        self.node: subprocess.Popen | None = None
        self.services: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self.node_id = NODE_ID
        # A peer that never answers: the mesh panel shows a link that is down.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.dead_peer = f"127.0.0.1:{s.getsockname()[1]}"

    def start_node(self, timeout: float = 20.0) -> None:
        log = self.logs / f"serve-{self.restarts}.log"
        self.node = subprocess.Popen(
            [*_command("serve"), "--port", str(self.grpc_port), "--http-port", str(self.http_port),
             "--data-dir", str(self.data_dir), "--node-id", NODE_ID, "--peer", self.dead_peer, "--grace", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
        lines = Lines(self.node.stderr, log)
        try:
            match = lines.wait_for(LISTENING, timeout)
        except AssertionError:
            _stop(self.node)
            raise
        self.grpc, http = match["grpc"], match["http"]
        self.grpc_port = int(self.grpc.rpartition(":")[2])
        self.http_port = int(http.rpartition(":")[2])
        self.url = f"http://{http}/"

    def stop_node(self) -> int:
        assert self.node is not None
        code = _stop(self.node)
        self.node = None
        return code

    def start_services(self) -> None:
        for name, args in SERVICES.items():
            with (self.logs / f"{name}.log").open("w") as log:
                self.services[name] = subprocess.Popen([*_command(name), "--store", self.grpc, *args],
                                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env())

    def close(self) -> None:
        for proc in self.services.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.services.values():
            _stop(proc, 5.0)
        if self.node is not None:
            self.stop_node()


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed (no `chromium` on PATH): `make test` installs Debian's "
                    "(apt-get install --no-install-recommends chromium); the browser tests never download "
                    "a browser", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator:
    # Module scope, not session: while Playwright's sync API runs, the main thread has a
    # running asyncio loop, and the rest of the suite's asyncio.run() calls would fail.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"],
                                     timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("MESHSTORE_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[Pipeline]:
    logs = artifacts / "logs"
    logs.mkdir(exist_ok=True)
    p = Pipeline(tmp_path_factory.mktemp("node-data"), logs)
    try:
        p.start_node()
        p.start_services()
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def screenshot(artifacts: Path):
    """``screenshot(page, "name")``: saves ``<artifacts>/<name>.png``, prints and returns its path."""

    def take(page, name: str) -> Path:
        path = artifacts / f"{name}.png"
        page.screenshot(path=str(path))
        SCREENSHOTS.append(path)
        print(f"screenshot: {path}")
        return path

    return take


def pytest_terminal_summary(terminalreporter) -> None:
    if SCREENSHOTS:
        terminalreporter.write_sep("-", "browser screenshots")
        for path in SCREENSHOTS:
            terminalreporter.write_line(str(path))
