"""Helpers shared by the tests and the benchmarks (benches/ imports tests/partition.py,
which imports this module by its plain name: when pytest runs benches/, ``conftest``
is benches/conftest.py, so nothing shared may live there).
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["Lines", "eventually"]


async def eventually(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> object:
    """Polls ``condition`` (sync or async) until truthy and returns that value;
    AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)


class Lines:
    """A subprocess stream's lines, pumped by a thread (the pipe never fills), copied to
    ``log`` if given and kept for diagnostics, so a test can wait for one with a timeout."""

    def __init__(self, stream: IO[str], log: Path | None = None) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._log = log.open("a", encoding="utf-8") if log is not None else None
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            self._queue.put(line)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        """The match of the first line matching ``pattern``; AssertionError after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.lines.append(line)
            if match := regex.search(line):
                return match
        raise AssertionError(f"no line matching {regex.pattern!r} within {timeout}s; got: "
                             f"{''.join(self.lines)[-3000:]}")

    def rest(self, timeout: float = 5.0) -> str:
        """Every line, once the stream has ended (the process exited)."""
        self._thread.join(timeout)
        while not self._queue.empty():
            self.lines.append(self._queue.get_nowait())
        return "".join(self.lines)
