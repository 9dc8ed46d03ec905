"""A store's data dir: the writer thread that group-commits the core's changes to SQLite,
and the waits that make an acknowledgement durable.

Writes go to memory (the core) at full speed; this thread commits every change since the
last commit in one transaction, either as soon as there is one (``commit`` durability:
the next commit starts while writes accumulate, so one fsync covers a whole group) or
every ``commit_interval`` seconds (``interval``: a crash loses at most that window). The
core bounds the backlog (``max_pending``): writes wait for the thread beyond it, and are
refused with ``StorageError`` while storage fails (a full disk); the thread retries.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Any

from meshstore._core import Core
from meshstore.errors import StorageError
from meshstore.logs import event as log_event

log = logging.getLogger(__name__)

#: Seconds between retries of a failing commit (a full or read-only disk).
RETRY_INTERVAL = 1.0

# Storages still open at interpreter exit are closed (committed, marked clean): a script
# that never called close() loses nothing, and no writer thread is left inside the core.
_open: weakref.WeakSet[Storage] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for storage in list(_open):
        storage.close()


class Storage:
    """Opens ``path`` for ``core`` (loading what it holds) and runs its writer thread."""

    def __init__(self, core: Core, path: str | os.PathLike, durability: str, commit_interval: float,
                 max_pending: int) -> None:
        self.path = os.fspath(path)
        self.durability = durability
        self.commit_interval = commit_interval
        self._core = core
        mode = f"interval:{round(commit_interval * 1000)}ms" if durability == "interval" else durability
        found = core.open_storage(self.path, mode, max_pending)
        self.loaded = found["entities"]
        self.clean = found["clean"]
        fields = dict(data_dir=self.path, node_id=core.node_id, entities=self.loaded, durability=mode,
                      incarnation=f"{core.incarnation:016x}")
        if self.clean:
            log_event(log, logging.DEBUG, "storage opened", **fields)
        else:
            # The counter of the last run may have gone past what was committed: this run
            # takes a new incarnation so it never issues one of those dots again.
            log_event(log, logging.WARNING, "storage opened after an unclean stop; new incarnation", **fields,
                      previous_durability=found["previous_durability"] or "unknown",
                      may_be_lost="nothing acknowledged" if found["previous_durability"] == "commit"
                      else "writes of the last commit interval before the stop")
        self._stop = threading.Event()
        self._commit_now = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._order = itertools.count()
        self._error = ""
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"meshstore-writer-{core.node_id}", daemon=True)
        self._thread.start()
        _open.add(self)

    # ---- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        interval = self.durability == "interval"
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                if interval:
                    # Commits start every interval (a slow commit delays the next one, no
                    # more); stop or a sync() that wants its writes on disk wake it early.
                    self._commit_now.wait(max(0.0, due - time.monotonic()))
                    self._commit_now.clear()
                    due = time.monotonic() + self.commit_interval
                committed = self._core.commit_pending(0.0 if interval else 0.5)
            except StorageError as exc:
                self._failed(str(exc))
                self._stop.wait(RETRY_INTERVAL)
                continue
            except BaseException as exc:  # noqa: BLE001 - a bug (a core panic): never leave waiters hanging
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                log.exception("storage writer failed unexpectedly; retrying")
                self._failed(f"unexpected failure: {type(exc).__name__}: {exc}")
                self._stop.wait(RETRY_INTERVAL)
                continue
            if self._error:
                log_event(log, logging.WARNING, "storage recovered", data_dir=self.path)
                self._error = ""
            self._release(committed)

    def _failed(self, message: str) -> None:
        if message != self._error:
            log_event(log, logging.ERROR, "storage commit failed; writes are refused until it recovers",
                      data_dir=self.path, error=message)
        self._error = message
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for _, _, loop, future in waiters:
            loop.call_soon_threadsafe(_settle, future, StorageError(f"not durable: {message}"))

    def _release(self, committed: int) -> None:
        ready = []
        with self._lock:
            while self._waiters and self._waiters[0][0] <= committed:
                ready.append(heapq.heappop(self._waiters))
        for _, _, loop, future in ready:
            loop.call_soon_threadsafe(_settle, future, None)

    # ---- waits -------------------------------------------------------------------------

    async def durable(self, seq: int) -> None:
        """Returns once change ``seq`` is on disk; StorageError if storage fails first."""
        if (self._core.committed_seq or 0) >= seq:
            return
        if self._closed:
            raise StorageError("the store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            heapq.heappush(self._waiters, (seq, next(self._order), loop, future))
        # The thread may have committed between the check and the push.
        if (self._core.committed_seq or 0) >= seq:
            self._release(self._core.committed_seq or 0)
        await future

    def sync(self, seq: int, timeout: float) -> bool:
        """Commits now (whatever the durability) and blocks until change ``seq`` is on disk
        (True) or ``timeout`` passes (False)."""
        self._commit_now.set()
        return self._core.wait_committed(seq, timeout)

    def close(self) -> None:
        """Stops the thread, commits what is left and marks the data dir cleanly closed."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        self._stop.set()
        self._commit_now.set()
        self._core.wake_writer()
        self._thread.join()
        self._core.close_storage()
        self._release(self._core.committed_seq or 0)
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for _, _, loop, future in waiters:
            loop.call_soon_threadsafe(_settle, future, StorageError("the store closed before the write was durable"))
        log_event(log, logging.DEBUG, "storage closed", data_dir=self.path, seq=self._core.seq)

    def stats(self, core_stats: dict[str, Any]) -> dict[str, Any]:
        """The data dir and the loss window: what a crash now could lose, in ms (0 under
        ``commit``: nothing acknowledged; under ``interval``, the interval plus a slow
        commit's time, the p99 of the recent ones)."""
        window = 0.0
        if self.durability == "interval":
            window = self.commit_interval * 1000 + (core_stats.get("commit_ms_p99") or 0.0)
        return {"data_dir": self.path, "loss_window_ms": round(window, 3)}


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
