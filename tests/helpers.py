"""Helpers shared by the tests and the benchmarks (benches/ imports tests/partition.py,
which imports this module by its plain name: when pytest runs benches/, ``conftest``
is benches/conftest.py, so nothing shared may live there).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

__all__ = ["eventually"]


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
