"""The single event loop that owns every timer of a meshstore process.

TTL expiry of entities, approval timeouts and relay retries are all deadlines
kept here. A timer thread per entity does not survive ingest rates (100k live
entities would mean 100k threads), so the design is one daemon thread, a heap
ordered by deadline and a cancel map from key to the live timer. Rescheduling
or cancelling only touches the map and pushes at most one heap entry; heap
entries that no longer match the map are skipped when they surface (lazy
deletion), and the heap is rebuilt from the map when they pile up, so memory
stays bounded under constant rescheduling.
"""

from __future__ import annotations

import heapq
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Hashable
from types import TracebackType

__all__ = ["EventLoop", "default_loop"]

log = logging.getLogger("meshstore.eventloop")

# Upper bound on one wait: the condition times out on the monotonic clock, so
# a jump of the wall clock (or of a fake clock) is noticed within this delay.
_MAX_WAIT = 1.0

# Rebuild the heap once stale entries exceed this multiple of the live timers:
# memory stays within (1 + factor) x live entries and each rebuild is paid for
# by the `factor x live` reschedules/cancels that made it necessary.
_STALE_FACTOR = 2

_HeapEntry = tuple[float, int, Hashable]  # (when, generation, key)
_Timer = tuple[int, float, Callable[[], object]]  # (generation, when, callback)


class EventLoop:
    """One thread firing keyed one-shot timers in deadline order.

    ``schedule``, ``cancel`` and the queries may be called from any thread,
    including from a callback. Callbacks run on the loop thread, one at a time
    and outside the lock; an exception from a callback is logged and counted,
    and the loop carries on. Timers may be scheduled before ``start()``; they
    fire once the loop runs. A stopped loop is final: it drops its pending
    timers and refuses to start or schedule again.
    """

    def __init__(
        self,
        name: str = "meshstore-timers",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._clock = clock
        # A plain Lock (callbacks run outside it, nothing re-enters) is
        # cheaper to take than the Condition's default RLock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[_HeapEntry] = []
        self._timers: dict[Hashable, _Timer] = {}
        # Unique per schedule(): tells a live heap entry from a stale one, and
        # breaks ties between equal deadlines so keys are never compared.
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._fired = 0
        self._cancelled = 0
        self._replaced = 0
        self._callback_errors = 0

    # -- timers ------------------------------------------------------------

    def schedule(self, key: Hashable, when: float, callback: Callable[[], object]) -> None:
        """Run ``callback()`` at ``when``, replacing any timer under ``key``.

        ``when`` is an absolute time in the units of the loop's clock
        (wall-clock seconds by default, since TTL expiry and approval timeouts
        are wall-clock instants). A ``when`` already past fires as soon as
        possible. Raises TypeError/ValueError on bad arguments without
        touching any timer, and RuntimeError once the loop is stopped.
        """
        if not callable(callback):
            raise TypeError(
                f"callback for timer {key!r} must be callable, got {type(callback).__name__}"
            )
        # Deadlines are nearly always floats: skip the slow ABC check for them.
        if type(when) is not float:
            if isinstance(when, bool) or not isinstance(when, numbers.Real):
                raise TypeError(
                    f"when for timer {key!r} must be a real number, got {type(when).__name__}"
                )
            when = float(when)
        if not math.isfinite(when):
            raise ValueError(f"when for timer {key!r} must be finite, got {when!r}")
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"event loop {self._name!r} is stopped")
            # Looked up first so that an unhashable key raises before any change.
            replaced = key in self._timers
            self._generation += 1
            generation = self._generation
            self._timers[key] = (generation, when, callback)
            heapq.heappush(self._heap, (when, generation, key))
            if replaced:
                self._replaced += 1
                self._compact_if_stale()
            # Only a new earliest deadline shortens the loop's current wait.
            if self._heap[0][1] == generation:
                self._cond.notify()

    def cancel(self, key: Hashable) -> bool:
        """Remove the timer under ``key``; True if one was pending."""
        with self._lock:
            if self._timers.pop(key, None) is None:
                return False
            self._cancelled += 1
            # No notify: the loop at worst wakes for the stale entry and skips it.
            self._compact_if_stale()
            return True

    def pending(self) -> int:
        """Number of live timers."""
        with self._lock:
            return len(self._timers)

    def deadline(self, key: Hashable) -> float | None:
        """When the timer under ``key`` fires, or None if there is none."""
        with self._lock:
            timer = self._timers.get(key)
            return None if timer is None else timer[1]

    def now(self) -> float:
        """The loop's clock: what deadlines are compared with."""
        return self._clock()

    def wake(self) -> None:
        """Re-examine deadlines now.

        Needed only when the clock moved in a way the loop cannot see coming,
        e.g. a test advancing a fake clock; a wall-clock jump is otherwise
        noticed within a second.
        """
        with self._lock:
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Counters since creation, plus the current sizes.

        ``fired`` counts callbacks started, ``cancelled`` successful
        ``cancel()`` calls, ``replaced`` timers superseded by ``schedule()``;
        timers dropped by ``stop()`` are in none of them. ``heap_size``
        includes stale entries awaiting lazy deletion.
        """
        with self._lock:
            return {
                "pending": len(self._timers),
                "fired": self._fired,
                "cancelled": self._cancelled,
                "replaced": self._replaced,
                "callback_errors": self._callback_errors,
                "heap_size": len(self._heap),
            }

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> EventLoop:
        """Start the loop thread (a daemon); idempotent. Returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"event loop {self._name!r} is stopped and cannot restart")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread and drop pending timers; idempotent.

        Waits up to ``timeout`` seconds for a running callback to return.
        """
        with self._lock:
            self._stopped = True
            self._timers.clear()
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        # A callback may stop its own loop: the thread then ends on return.
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning(
                "event loop %r: thread still running a callback after %.1fs", self._name, timeout
            )

    def __enter__(self) -> EventLoop:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- loop thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                due = self._take_due()
            if due is None:
                return
            key, callback = due
            try:
                callback()
            except Exception:
                log.exception("event loop %r: callback for timer %r raised", self._name, key)
                with self._lock:
                    self._callback_errors += 1

    def _take_due(self) -> tuple[Hashable, Callable[[], object]] | None:
        """Wait for the earliest live timer to be due and claim it.

        Called with the lock held; returns None once the loop is stopped.
        """
        while not self._stopped:
            self._discard_stale_top()
            if not self._heap:
                # Nothing to watch for: only schedule() or stop() can change that.
                self._cond.wait()
                continue
            when, _, key = self._heap[0]
            delay = when - self._clock()
            if delay > 0:
                self._cond.wait(min(delay, _MAX_WAIT))
                continue
            heapq.heappop(self._heap)
            # Popping it from the map under the lock is what makes a later
            # schedule()/cancel() of this key unable to revive or stop it.
            _, _, callback = self._timers.pop(key)
            self._fired += 1
            self._compact_if_stale()
            return key, callback
        return None

    def _discard_stale_top(self) -> None:
        heap, timers = self._heap, self._timers
        while heap:
            _, generation, key = heap[0]
            timer = timers.get(key)
            if timer is not None and timer[0] == generation:
                return
            heapq.heappop(heap)

    def _compact_if_stale(self) -> None:
        # Every live timer has exactly one heap entry, so the rest are stale.
        if len(self._heap) > (1 + _STALE_FACTOR) * len(self._timers):
            self._heap = [(when, gen, key) for key, (gen, when, _) in self._timers.items()]
            heapq.heapify(self._heap)


_default: EventLoop | None = None
_default_lock = threading.Lock()


def default_loop() -> EventLoop:
    """The process's shared loop (started on first use): one loop for every timer."""
    global _default
    with _default_lock:
        if _default is None:
            _default = EventLoop().start()
        return _default
