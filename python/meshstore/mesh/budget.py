"""Bandwidth budget for the mesh relay: a token bucket per peer, priorities, coalescing.

A relay reads the store's changes into a per-peer :class:`PendingQueue` (one entry per
entity, the latest state replacing an older one in place), and sends from it by
priority as the peer's :class:`TokenBucket` allows:

    DELETE > HIGH > MEDIUM > LOW > NONE > POSITION_ONLY

computed from each replica state by :func:`priority_of` (a tombstone newer than the
entity's latest write is a DELETE; else the highest live threat level; an entity with
no threat component is POSITION_ONLY). DELETE and HIGH bypass the bucket: they are sent
at once and charged to it (so lower priorities wait for the bandwidth they used).
Nothing is dropped: a deferred state waits in the queue until its turn, and memory is
bounded by the number of entities since an entity holds one entry at most.

Sizes are protobuf byte sizes of what goes on the wire (:func:`framed_size`). The
bucket runs on the monotonic clock; a clock that goes back refills nothing and never
drains the bucket.

Configuration: :class:`BudgetConfig`, ``bandwidth_bps`` (bytes per second, 0 =
unlimited) and ``burst_bytes`` (bucket capacity; 0 = one second of bandwidth, at least
64 KiB), given to the relay by ``meshstore serve --mesh-bandwidth-bps / --mesh-burst-bytes``.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import IntEnum

from google.protobuf.message import DecodeError

from meshstore.pb import entity_pb2
from meshstore.validate import is_number

__all__ = [
    "BYPASS",
    "BudgetConfig",
    "Pending",
    "PendingQueue",
    "Priority",
    "TokenBucket",
    "framed_size",
    "priority_of",
]

#: Smallest default burst when only a bandwidth is given.
MIN_DEFAULT_BURST = 64 * 1024

THREAT_URL = "type.googleapis.com/entity.v1.ThreatComponent"


class Priority(IntEnum):
    """Send order, highest first."""

    POSITION_ONLY = 0  # no threat level: kinematics/position-only updates
    NONE = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    DELETE = 5


#: Priorities sent regardless of the bucket's level (and charged to it).
BYPASS = frozenset({Priority.DELETE, Priority.HIGH})

_THREAT_PRIORITY = {
    entity_pb2.THREAT_LEVEL_NONE: Priority.NONE,
    entity_pb2.THREAT_LEVEL_LOW: Priority.LOW,
    entity_pb2.THREAT_LEVEL_MEDIUM: Priority.MEDIUM,
    entity_pb2.THREAT_LEVEL_HIGH: Priority.HIGH,
}


def priority_of(state: bytes | entity_pb2.Entity) -> Priority:
    """The send priority of a replica state (as ``Store.replica_changes`` gives it).

    DELETE when it holds no value at all (a deleted entity's state); else the highest
    level of its threat components (the shown value of each key: the strategy ranks
    concurrent threats by level); POSITION_ONLY when it has none (or only UNSPECIFIED).
    Undecodable bytes: NONE (the receiver will refuse them anyway)."""
    if isinstance(state, entity_pb2.Entity):
        entity = state
    else:
        try:
            entity = entity_pb2.Entity.FromString(state)
        except DecodeError:
            return Priority.NONE
    if not entity.versions:
        return Priority.DELETE
    best = Priority.POSITION_ONLY
    for packed in entity.components.values():
        if packed.type_url != THREAT_URL:
            continue
        try:
            level = entity_pb2.ThreatComponent.FromString(packed.value).level
        except DecodeError:
            continue
        best = max(best, _THREAT_PRIORITY.get(level, Priority.POSITION_ONLY))
    return best


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def framed_size(n: int) -> int:
    """Wire bytes of an ``n``-byte state inside a Batch: tag, length prefix, payload."""
    return 1 + _varint_size(n) + n


class TokenBucket:
    """Bytes per second with a burst capacity, on a monotonic clock.

    ``rate`` 0 means unlimited (every take succeeds, no waits). The bucket starts full.
    ``try_take(n)`` succeeds when the bucket holds ``min(n, burst)`` tokens, so a state
    larger than the burst still goes out once the bucket is full (leaving it in debt);
    ``force_take(n)`` (priority bypass) always succeeds and may leave the level negative,
    down to ``-burst`` at most. A clock that goes back refills nothing."""

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not is_number(rate) or rate < 0:
            raise ValueError(f"rate must be a non-negative number of bytes/s (0 = unlimited), got {rate!r}")
        if burst is None or burst == 0:
            burst = max(float(rate), MIN_DEFAULT_BURST)
        if not is_number(burst) or burst < 0:
            raise ValueError(f"burst must be a non-negative number of bytes, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()
        self.taken = 0  # bytes charged in total
        self.forced = 0  # of which by force_take

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:  # a clock that went back (or stood still) adds nothing
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    @property
    def tokens(self) -> float:
        """The current level (negative while in debt)."""
        self._refill()
        return self._tokens

    def try_take(self, n: int) -> bool:
        if self.unlimited:
            self.taken += n
            return True
        self._refill()
        if self._tokens >= min(n, self.burst):
            self._tokens -= n
            self.taken += n
            return True
        return False

    def force_take(self, n: int) -> None:
        self.taken += n
        self.forced += n
        if not self.unlimited:
            self._refill()
            self._tokens = max(self._tokens - n, -self.burst)

    def delay(self, n: int) -> float:
        """Seconds until ``try_take(n)`` can succeed (0 if now)."""
        if self.unlimited:
            return 0.0
        self._refill()
        missing = min(n, self.burst) - self._tokens
        return max(0.0, missing / self.rate)


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """A peer link's budget: ``bandwidth_bps`` bytes/s (0 = unlimited) and
    ``burst_bytes`` (0 = default: one second of bandwidth, at least 64 KiB)."""

    bandwidth_bps: float = 0
    burst_bytes: float = 0

    def __post_init__(self) -> None:
        for name in ("bandwidth_bps", "burst_bytes"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    @property
    def unlimited(self) -> bool:
        return self.bandwidth_bps == 0

    def bucket(self, clock: Callable[[], float] = time.monotonic) -> TokenBucket:
        return TokenBucket(self.bandwidth_bps, self.burst_bytes or None, clock=clock)


@dataclasses.dataclass(slots=True)
class Pending:
    """One entity's latest unsent state. ``seq``: a lower bound of the store seq of that
    state (the relay's watermark stays below it until the state is sent)."""

    entity_id: str
    state: bytes
    seq: int
    priority: Priority
    size: int


class PendingQueue:
    """Unsent states of one peer: one per entity (the latest), sent by priority.

    Within a priority, entities go in the order they first became pending (a hot
    entity keeps its place instead of starving behind newer ones)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Pending] = {}
        self._queues: dict[Priority, OrderedDict[str, Pending]] = {p: OrderedDict() for p in Priority}
        self._order = sorted(Priority, reverse=True)
        # (seq, id) entries, lazily deleted: the smallest live one is the min pending seq.
        self._seqs: list[tuple[int, str]] = []
        self.coalesced = 0  # states replaced by a newer one before being sent
        self.deferred = 0  # times a send stopped for lack of budget
        self.bypassed = 0  # states sent past the bucket (DELETE, HIGH)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, entity_id: str) -> bool:
        return entity_id in self._by_id

    def get(self, entity_id: str) -> Pending | None:
        return self._by_id.get(entity_id)

    @property
    def bytes(self) -> int:
        return sum(p.size for p in self._by_id.values())

    def counts(self) -> dict[str, int]:
        return {p.name: len(q) for p, q in self._queues.items() if q}

    def put(self, entity_id: str, state: bytes, seq: int, priority: Priority = Priority.NONE) -> bool:
        """Queues an entity's state, replacing its older pending one (True if it did)."""
        entry = Pending(entity_id, state, seq, priority, framed_size(len(state)))
        old = self._by_id.get(entity_id)
        if old is not None:
            # The older state is superseded: its change no longer holds the watermark.
            self.coalesced += 1
            if old.priority == priority:
                self._queues[priority][entity_id] = entry  # keeps its place
            else:
                del self._queues[old.priority][entity_id]
                self._queues[priority][entity_id] = entry
        else:
            self._queues[priority][entity_id] = entry
        self._by_id[entity_id] = entry
        if old is None or entry.seq != old.seq:
            heapq.heappush(self._seqs, (entry.seq, entity_id))
            if len(self._seqs) > 2 * len(self._by_id) + 64:
                self._seqs = [(p.seq, i) for i, p in self._by_id.items()]
                heapq.heapify(self._seqs)
        return old is not None

    def min_seq(self) -> int | None:
        """The smallest seq among pending states (None when empty)."""
        seqs = self._seqs
        while seqs:
            seq, entity_id = seqs[0]
            entry = self._by_id.get(entity_id)
            if entry is not None and entry.seq == seq:
                return seq
            heapq.heappop(seqs)
        return None

    def peek(self) -> Pending | None:
        """The next state to send."""
        for priority in self._order:
            queue = self._queues[priority]
            if queue:
                return queue[next(iter(queue))]
        return None

    def take(self, bucket: TokenBucket, max_states: int, max_bytes: int) -> list[Pending]:
        """Removes and returns the states to send now, highest priority first, at most
        ``max_states`` and ``max_bytes`` (at least one state if any is sendable). Stops
        at the first state the bucket cannot pay for: a lower priority never overtakes
        a higher one."""
        out: list[Pending] = []
        total = 0
        for priority in self._order:
            queue = self._queues[priority]
            bypass = priority in BYPASS
            while queue and len(out) < max_states:
                entity_id = next(iter(queue))
                entry = queue[entity_id]
                if out and total + entry.size > max_bytes:
                    return out
                if bypass:
                    bucket.force_take(entry.size)
                    if not bucket.unlimited:
                        self.bypassed += 1
                elif not bucket.try_take(entry.size):
                    self.deferred += 1
                    return out
                queue.popitem(last=False)
                del self._by_id[entity_id]
                out.append(entry)
                total += entry.size
            if len(out) >= max_states:
                break
        if not self._by_id:
            self._seqs.clear()
        return out

    def clear(self) -> None:
        self._by_id.clear()
        for queue in self._queues.values():
            queue.clear()
        self._seqs.clear()
