"""Watchers: a live feed of a store's changes, iterable from threads and from asyncio.

The queue itself lives in the Rust core (bounded; a consumer that lets it fill up falls
behind and then catches up from the store's change log with each entity's latest state,
so it is never silently dropped and still ends on the true state). This class
only buffers batches and bridges the core's wake-up to threads and event loops.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator

from meshstore._core import Event, WatchHandle

# Events taken from the core per call: amortizes the crossing without hoarding.
_BATCH = 256
# Longest single blocking wait: Python runs signal handlers (Ctrl-C) between waits.
_SLICE = 0.5


class Watcher:
    """Iterate (``for event in watcher`` or ``async for``) to receive ``Event`` objects
    with ``type`` (1 CREATED, 2 UPDATED, 3 DELETED), ``entity`` (decoded on access),
    ``entity_id``, ``origin_node`` and ``seq`` (the resume cursor). Iteration ends once
    the watcher is closed. ``close()`` is idempotent; a watcher is a context manager, and
    one that is no longer referenced is closed."""

    def __init__(self, handle: WatchHandle) -> None:
        self._handle = handle
        self._buffer: deque[Event] = deque()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one arrives or
        the watcher closes). None on timeout or when closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer and not self.closed:
            remaining = _SLICE if deadline is None else deadline - time.monotonic()
            self._buffer.extend(self._handle.poll(_BATCH, min(max(remaining, 0.0), _SLICE)))
            if remaining <= 0:
                break
        return self._buffer.popleft() if self._buffer else None

    def drain(self) -> list[Event]:
        """Every event ready now, without waiting."""
        events = list(self._buffer)
        self._buffer.clear()
        while batch := self._handle.poll(_BATCH, 0.0):
            events.extend(batch)
        return events

    def __iter__(self) -> Iterator[Event]:
        while (event := self.get()) is not None:
            yield event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        while (event := await self.aget()) is not None:
            yield event

    async def aget(self, timeout: float | None = None) -> Event | None:
        """``get`` for asyncio: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._buffer:
            self._buffer.extend(self._handle.poll(_BATCH, 0.0))
            if self._buffer or self.closed:
                break
            woken = loop.create_future()

            def wake(fut: asyncio.Future = woken) -> None:
                try:
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
                except RuntimeError:
                    pass  # that event loop is closed: nobody is waiting any more

            ready, due = self._handle.arm(wake)
            if ready:
                continue
            waits = [w for w in (due, None if deadline is None else deadline - loop.time()) if w is not None]
            try:
                await asyncio.wait_for(woken, timeout=min(waits) if waits else None)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    break
        return self._buffer.popleft() if self._buffer else None

    def stats(self) -> dict:
        """queued, held (min_interval), coalesced, delivered, coalescing."""
        return self._handle.stats()

    def close(self) -> None:
        self._handle.close()
        self._buffer.clear()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Nobody can read this watcher any more (``for event in store.watch(): break``
        # drops it with the loop): without this, the core would keep queueing for it.
        self._handle.close()
