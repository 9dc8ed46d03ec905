"""The pipeline services: sensor-sim, radar-sim, classifier, task-manager, fusion.

Each is an asyncio class with ``async run()`` (until stopped) and ``async stop()``,
talking to a store over gRPC through ``meshstore.grpc.client.StoreClient``; the same object
runs inside ``meshstore demo`` and as its own CLI subcommand (``meshstore.cli.services``).
Every service survives the store going away: writes that fail with
``StoreUnavailableError`` are retried after the client reconnects (with backoff), and
watches resume from their cursor. Log lines are structured (``meshstore.logs``) under
``meshstore.services.<name>``.

This module holds what they share: the ``Service`` base class and small helpers for
reading components and for writing keys against the version that was read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message

from meshstore.components import type_url
from meshstore.logs import event as log_event
from meshstore.pb import entity_pb2

if TYPE_CHECKING:  # imported when a service is made: `meshstore --help` need not load grpc
    from meshstore.grpc.client import Backoff, StoreClient

#: As meshstore.grpc.client.DEFAULT_ADDR.
DEFAULT_ADDR = "127.0.0.1:50051"

__all__ = [
    "ABSENT_NODE",
    "Lag",
    "PerEntity",
    "Service",
    "base_version",
    "newer",
    "read_component",
    "timestamp",
    "timestamp_seconds",
]

M = TypeVar("M", bound=Message)

#: Node of the version sent as the base of a key that was absent when read. The store
#: needs a base to tell "I read nothing" from a blind write: this one, (0, 0, "-"), is
#: older than any real write, so a key someone wrote meanwhile is reported stale instead
#: of being clobbered.
ABSENT_NODE = "-"


def base_version(entity: entity_pb2.Entity, key: str) -> entity_pb2.Version:
    """The version to send back when writing ``key`` of what was read as ``entity``."""
    if key in entity.versions:
        return entity.versions[key]
    return entity_pb2.Version(node=ABSENT_NODE)


def _version_key(v: entity_pb2.Version) -> tuple[int, int, str]:
    return v.physical, v.logical, v.node


def newer(a: entity_pb2.Version | None, b: entity_pb2.Version | None) -> bool:
    """True if version ``a`` is strictly newer than ``b`` (a missing version is oldest)."""
    if a is None:
        return False
    if b is None:
        return True
    return _version_key(a) > _version_key(b)


def read_component(entity: entity_pb2.Entity, key: str, message_class: type[M],
                   log: logging.Logger | None = None) -> M | None:
    """The component under ``key`` as ``message_class``; None when absent, or (logged at
    warning) when it holds another type or bytes that do not parse. Type URLs are matched
    on the message name, as protobuf's ``Any.Unpack`` does."""
    if key not in entity.components:
        return None
    packed = entity.components[key]
    if packed.type_url == type_url(message_class):
        # The common case, without Unpack's parsing of the URL (services read every event).
        try:
            return message_class.FromString(packed.value)
        except DecodeError:
            pass  # reported below, as Unpack reports it
    message = message_class()
    try:
        ok = packed.Unpack(message)
    except DecodeError as exc:
        ok, why = False, f"unparsable: {exc}"
    else:
        why = f"holds {packed.type_url}"
    if not ok:
        if log is not None:
            log_event(log, logging.WARNING, "ignoring component of unexpected type", entity_id=entity.id,
                      key=key, expected=message_class.DESCRIPTOR.full_name, problem=why)
        return None
    return message


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts


def timestamp_seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


class Lag:
    """How far a service's writes trail the sensor writes they answer: from the write
    stamp of what it read (a version's HLC physical time, Unix ns) to the moment it
    wrote. Keeps the last ``window`` samples; ``summary()`` gives p50/p99 in ms."""

    def __init__(self, window: int = 10_000) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def since(self, stamp_ns: int, now_ns: int | None = None) -> None:
        """Records one write answering a sensor write stamped ``stamp_ns`` (0: unknown, skipped)."""
        if stamp_ns > 0:
            self._samples.append(max(0.0, ((now_ns or time.time_ns()) - stamp_ns) / 1e6))

    def summary(self) -> dict[str, float]:
        """``lag_ms_p50``, ``lag_ms_p99`` (0 before any sample) and ``lag_samples``."""
        ordered = sorted(self._samples)
        if not ordered:
            return {"lag_ms_p50": 0.0, "lag_ms_p99": 0.0, "lag_samples": 0}
        at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {"lag_ms_p50": round(at(0.50), 1), "lag_ms_p99": round(at(0.99), 1), "lag_samples": len(ordered)}


#: What a service does about one event beyond looking at it: ``await job()``.
Job = Callable[[], Awaitable[None]]


class PerEntity:
    """Handles a service's watch events concurrently across entities (at most ``limit``
    at once: the watch waits beyond that) and in order per entity, so a service never
    waits a round trip per event.

    Each event is first looked at where it arrives, synchronously: ``service.prepare(ev)``
    returns the job it needs (a write), or None when it needs nothing more, as most do
    (the echo of the service's own write, a write that would change nothing); those cost
    no task. A job runs as a task through ``service.until_done(ev, job)``. An entity's
    events that arrive while its job runs wait, and only the latest of them is kept: each
    carries the entity's whole (projected) state, so it supersedes the ones before it
    (``superseded`` counts them); it is prepared when the job is done, so it sees what that
    job recorded. An unexpected exception is logged and counted in ``failed``; it never
    stops the others. The default limit is what one UpdateEntities call of an
    ``UpdateBatcher`` takes: a burst of new tracks is written in calls that full."""

    def __init__(self, service: Service, limit: int = 2048) -> None:
        self.service = service
        self.superseded = 0
        self.failed = 0
        self._slots = asyncio.Semaphore(limit)
        self._running: dict[str, asyncio.Task] = {}
        self._waiting: dict[str, Any] = {}

    async def submit(self, key: str, ev: Any) -> None:
        """Handles ``ev`` after the job running for ``key``, if any; waits for a free slot."""
        if key in self._running:
            self.superseded += key in self._waiting
            self._waiting[key] = ev
            return
        job = self._prepare(key, ev)
        if job is None:
            return
        await self._slots.acquire()
        self._running[key] = asyncio.create_task(self._run(key, ev, job))

    def _prepare(self, key: str, ev: Any) -> Job | None:
        try:
            return self.service.prepare(ev)
        except Exception as exc:  # noqa: BLE001 - one entity's bug must not stop the service
            self._failed(key, exc)
            return None

    def _failed(self, key: str, exc: Exception) -> None:
        self.failed += 1
        self.service.event(logging.ERROR, "handling an event failed", entity_id=key,
                           error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    async def _run(self, key: str, ev: Any, job: Job | None) -> None:
        try:
            while job is not None:
                try:
                    await self.service.until_done(ev, job)
                except Exception as exc:  # noqa: BLE001 - one entity's bug must not stop the service
                    self._failed(key, exc)
                job = None
                while job is None and key in self._waiting:
                    ev = self._waiting.pop(key)
                    job = self._prepare(key, ev)
        finally:
            del self._running[key]
            self._slots.release()

    async def drain(self) -> None:
        """Waits until every submitted job has run."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def close(self) -> None:
        """Cancels what runs and forgets what waits."""
        self._waiting.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Service:
    """Base of the pipeline services.

    Subclasses implement ``_main()`` (runs until cancelled) and may override
    ``_cleanup()``. ``run()`` returns normally once ``stop()`` is called; ``counters``
    holds what the service did (for logs, the demo's summary and tests).

    What a service does to one track is logged at DEBUG: a burst of thousands of new
    tracks would otherwise flood the log and cost the service a good share of its CPU.
    At INFO, a ``progress`` line every ``progress_every`` seconds says what changed since
    the last one (counter increments, lag p50/p99), and nothing when nothing did."""

    name = "service"
    progress_every = 10.0

    def __init__(self, store: str = DEFAULT_ADDR, *, client: StoreClient | None = None,
                 backoff: Backoff | None = None) -> None:
        from meshstore.grpc.client import StoreClient

        self.store_address = store
        self.client = client or StoreClient(store, name=self.name, backoff=backoff)
        self.log = logging.getLogger(f"meshstore.services.{self.name}")
        self.counters: Counter[str] = Counter()
        #: Sensor write -> this service's write (services that answer sensor writes record it).
        self.lag = Lag()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._started_at: float | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def event(self, level: int, msg: str, /, **fields: Any) -> None:
        log_event(self.log, level, msg, service=self.name, **fields)

    async def run(self) -> None:
        """Runs until ``stop()`` (or cancellation). Reconnects as needed; never returns early
        because the store went away."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._task = asyncio.current_task()
        self._stopping = False
        self._started_at = time.monotonic()
        self.event(logging.INFO, "starting", store=self.store_address)
        progress = asyncio.create_task(self._report_progress(), name=f"{self.name}-progress")
        try:
            await self._main()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            progress.cancel()
            try:
                await self._cleanup()
            finally:
                await self.client.close()
                self.event(logging.INFO, "stopped", **dict(sorted(self.counters.items())))

    async def stop(self) -> None:
        """Stops ``run()`` and waits for it to finish (idempotent)."""
        self._stopping = True
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        # Cancel until it is done: a cancellation can be lost when it races with an
        # awaited result (asyncio.wait_for in Python 3.11, third-party code).
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=1.0)

    async def _report_progress(self) -> None:
        reported = self.counters.copy()
        while True:
            await asyncio.sleep(self.progress_every)
            changed = {key: n - reported[key] for key, n in sorted(self.counters.items()) if n != reported[key]}
            if changed:
                reported = self.counters.copy()
                lag = self.lag.summary()
                self.event(logging.INFO, "progress", in_last_s=self.progress_every, **changed,
                           **({"lag_ms_p50": lag["lag_ms_p50"], "lag_ms_p99": lag["lag_ms_p99"]}
                              if lag["lag_samples"] else {}))

    async def _main(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, ev: Any) -> Job | None:  # pragma: no cover - for services that watch
        """Looks at one watch event (no I/O): the job it needs, or None (see ``PerEntity``)."""
        raise NotImplementedError

    async def until_done(self, ev: Any, job: Job) -> None:
        """``job()``; if the store went away, again once it is back, prepared anew from
        ``ev`` (writes are checked against the versions read, so a retry of a view gone
        stale is refused as stale)."""
        from meshstore.grpc.client import StoreUnavailableError

        while True:
            try:
                return await job()
            except StoreUnavailableError as exc:
                self.counters["retries"] += 1
                self.event(logging.WARNING, "write failed, store unavailable; will retry",
                           entity_id=ev.entity.id, error=str(exc))
                await self.client.wait_ready()
            # The same event looked at again: what prepare counts per event is not counted twice.
            events = self.counters["events"]
            retry = self.prepare(ev)
            self.counters["events"] = events
            if retry is None:
                return
            job = retry

    async def _cleanup(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        """The counters and, once the service answered a sensor write, its lag p50/p99 (ms)."""
        lag = self.lag.summary()
        return {**self.counters, **(lag if lag["lag_samples"] else {})}
