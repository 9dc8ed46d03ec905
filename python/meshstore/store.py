"""The Store: meshstore's Python API over the Rust core.

Entities go in and out as ``entity_pb2.Entity`` messages (or, on ingest paths, their
serialized bytes); the core holds the table, merges per component key and emits events.
The store owns its timers on an ``EventLoop``: entity expiry (``set_ttl`` and
``expiry_time``) and a periodic maintenance pass that forgets deleted entities no
replica can still need.

Each Store is one *incarnation* of its node: a random 64-bit id, part of every dot (write
identity) it issues, so a node restarted without its state never reuses a dot. With a
data dir (``path``) the store loads its state at start and commits every change to it
(``meshstore.storage``); after a clean stop it resumes its incarnation and dot counter.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from meshstore._core import Core, UpdateResult, stored_node_id
from meshstore.errors import InvalidEntityError, StorageError
from meshstore.eventloop import EventLoop, default_loop
from meshstore.options import StoreOptions, default_node_id
from meshstore.storage import Storage
from meshstore.pb import entity_pb2
from meshstore.validate import is_number
from meshstore.watcher import Watcher

Entity = entity_pb2.Entity
_ENTITY_TYPES = frozenset(entity_pb2.EntityType.values())


def _serialized(entity: Any, what: str = "entity") -> bytes:
    """An entity's wire bytes; messages are serialized, bytes pass through untouched."""
    if isinstance(entity, Entity):
        return entity.SerializeToString()
    if isinstance(entity, (bytes, bytearray, memoryview)):
        return bytes(entity)
    raise TypeError(f"{what} must be an entity_pb2.Entity or its serialized bytes, got {type(entity).__name__}")


def _check_summary(summary: Any) -> list[tuple[str, int, int]]:
    """A context summary: (node, incarnation, counter) triples of a str and two u64s."""
    try:
        entries = [(node, incarnation, counter) for node, incarnation, counter in summary]
    except (TypeError, ValueError):
        raise TypeError("a context summary is a list of (node, incarnation, counter) tuples") from None
    for node, incarnation, counter in entries:
        if not isinstance(node, str) or not node:
            raise TypeError(f"context summary node must be a non-empty str, got {node!r}")
        for name, value in (("incarnation", incarnation), ("counter", counter)):
            if not is_number(value, integer=True) or not 0 <= value < 2**64:
                raise ValueError(f"context summary {name} must be an int in [0, 2**64), got {value!r}")
    return entries


def _check_id(entity_id: Any) -> str:
    if not isinstance(entity_id, str):
        raise TypeError(f"entity id must be a str, got {type(entity_id).__name__}")
    if not entity_id:
        raise InvalidEntityError("entity id is empty")
    return entity_id


# Deletes per pass of the expiry timer: the table lock is released between passes, so a
# burst of expiries (a sim stopped with 10k tracks) never holds writers up for long.
_EXPIRE_BATCH = 4096
# A failing disk refuses the deletes (storage logs why): the timer tries again this late.
_EXPIRY_RETRY_S = 1.0


def _wall_time(t: float) -> tuple[int, int]:
    seconds = math.floor(t)
    return seconds, min(int((t - seconds) * 1e9), 999_999_999)


def _expire_due(ref: weakref.ref, due: tuple[int, int]) -> None:
    """The expiry timer, armed for ``due``: deletes the entities due by now (by ``due``
    at least: a float deadline may fire a hair before the exact time it stands for) and
    arms itself for the next one."""
    store = ref()
    if store is None or store._closed:
        return
    now = max(due, _wall_time(store._loop.now()))
    try:
        _, next_due = store._core.expire_due(now, _EXPIRE_BATCH)
    except StorageError:
        next_due = _wall_time(store._loop.now() + _EXPIRY_RETRY_S)
    if next_due is not None:
        store._arm_expiry(next_due)


class Store:
    """A replicated entity-component store (thread-safe).

    ``Store()``, ``Store(StoreOptions(node_id="a"))`` or ``Store(node_id="a", ...)``.
    """

    def __init__(self, options: StoreOptions | None = None, **overrides: Any) -> None:
        if options is not None and not isinstance(options, StoreOptions):
            raise TypeError(f"options must be a StoreOptions, got {type(options).__name__}")
        self.options = (options or StoreOptions()).replace(**overrides) if overrides else (options or StoreOptions())
        o = self.options
        node_id = o.node_id or (o.path is not None and stored_node_id(os.fspath(o.path))) or default_node_id()
        self._core = Core(node_id, secrets.randbits(64) or 1, o.max_clock_offset, o.peer_expiry, o.max_entity_bytes)
        self._loop: EventLoop = o.event_loop or default_loop()
        self._timer_prefix = ("meshstore.store", id(self))
        self._collection_manager: object | None = None
        self._closed = False
        # Timers hold the store weakly, so an unclosed store can still be collected.
        ref = weakref.ref(self)
        # One timer for every entity expiry, armed at the earliest (the core keeps them
        # ordered and says when the earliest moves earlier).
        self._expiry_lock = threading.Lock()
        self._core.set_expiry_hook(lambda due: (s := ref()) and s._arm_expiry(due))
        #: The data dir's writer (None in memory). Opened after the expiry hook is set:
        #: loaded entities with an expiry get their timers.
        self.storage = None if o.path is None else Storage(
            self._core, o.path, o.durability, o.commit_interval, o.max_pending)
        self._schedule_maintenance(ref)

    # ---- identity ----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._core.node_id

    @property
    def incarnation(self) -> int:
        """This store's incarnation (random per Store): part of every dot it issues."""
        return self._core.incarnation

    @property
    def seq(self) -> int:
        """The store's latest change sequence number."""
        return self._core.seq

    # ---- writes ------------------------------------------------------------------------

    def create(self, entity: Entity) -> Entity:
        """Creates the entity; AlreadyExistsError if it is live."""
        return self._core.create(_serialized(entity)).entity

    def update(self, entity: Entity, *, strict: bool = False) -> UpdateResult:
        """Writes the keys the entity carries, each checked against the version it was
        based on (``versions[key]``, else the entity hlc fields, else blind). Stale keys
        are skipped and reported, or with ``strict`` fail the whole update. NotFoundError
        if the entity is not live."""
        return self._core.update(_serialized(entity), strict)

    def put(self, entity: Entity) -> UpdateResult:
        """Upsert: ``update`` that creates the entity if needed."""
        return self._core.put(_serialized(entity))

    def put_many(self, entities: Iterable[Entity | bytes]) -> list[UpdateResult]:
        """Upserts a batch in one call into the core (messages or serialized bytes).
        All-or-nothing: an invalid entity fails the batch, naming its index."""
        if isinstance(entities, (bytes, Entity)):
            raise TypeError("put_many takes an iterable of entities; use put for one")
        return self._core.put_many([_serialized(e, f"put_many item {i}") for i, e in enumerate(entities)])

    def delete(self, entity_id: str) -> None:
        """Deletes: removes every value the store holds, and a delete record removes older
        concurrent ones wherever it reaches. NotFoundError if the entity is not live."""
        self._core.delete(_check_id(entity_id))

    def set_ttl(self, entity_id: str, seconds: float) -> None:
        """Deletes the entity ``seconds`` from now (its ``expiry_time``, which replicates)."""
        _check_id(entity_id)
        if not is_number(seconds) or seconds <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {seconds!r}")
        expiry = timestamp_pb2.Timestamp()
        expiry.FromNanoseconds(time.time_ns() + int(seconds * 1e9))
        self._core.update(Entity(id=entity_id, expiry_time=expiry).SerializeToString(), False)

    # ---- reads -------------------------------------------------------------------------

    def get(self, entity_id: str) -> Entity:
        """The live entity with its component ``versions``; NotFoundError otherwise."""
        return Entity.FromString(self._core.get(_check_id(entity_id)))

    def list(self, type_filter: int = 0) -> list[Entity]:
        """Live entities (of one ``EntityType`` unless 0), ordered by id."""
        return [Entity.FromString(b) for b in self._core.list(self._check_type(type_filter))]

    # ---- replication -------------------------------------------------------------------

    def merge(self, entity: Entity | bytes, *, source: str = "") -> bool:
        """Joins a replica's state (as ``changes_since`` gives it). True if ours changed.
        ``source``: the node it came from (default: the node of its latest change)."""
        return self._core.merge(_serialized(entity), source)

    def changes_since(self, seq: int) -> tuple[list[Entity], int]:
        """Every entity changed after ``seq`` in its replica state (deleted ones included),
        and the seq to pass next time. CursorExpiredError if ``seq`` predates a collected
        tombstone."""
        states, last = self._core.changes_since(self._check_seq(seq))
        return [Entity.FromString(b) for b in states], last

    def replica_changes(self, seq: int, *, limit: int | None = None, skip_source: str | None = None,
                        unless_seen: Sequence[tuple[str, int, int]] | None = None) -> tuple[list[bytes], int]:
        """``changes_since`` for relays: serialized states, at most ``limit`` of them,
        without those whose latest change came from ``skip_source`` (echo suppression)
        and those whose every write ``unless_seen`` (a peer's context summary) covers.
        Returns them and the seq they cover up to."""
        limit = 2**63 if limit is None else self._check_seq(limit)
        seen = None if unless_seen is None else _check_summary(unless_seen)
        return self._core.changes_since(self._check_seq(seq), limit, skip_source, seen)

    def context_summary(self) -> tuple[int, list[tuple[str, int, int]]]:
        """(seq, [(node, incarnation, counter), ...]): the writes this store has seen all
        of, per writer, valid as of ``seq``. A peer that has merged every change of this
        store up to ``seq`` may adopt it (``adopt_context``)."""
        return self._core.context_summary()

    def adopt_context(self, summary: Sequence[tuple[str, int, int]]) -> bool:
        """Adds a peer's context summary to this store's, once every change of that peer
        it covers has been merged here. True if the summary grew. InvalidEntityError if
        it claims writes of this store that it never made."""
        return self._core.adopt_context(_check_summary(summary))

    def replica_state(self, entity_id: str) -> tuple[bytes, int] | None:
        """One entity's serialized replica state (deleted ones too) and its change seq."""
        return self._core.replica_state(_check_id(entity_id))

    def collect_tombstones(self, acked_seq: int | None = None) -> int:
        """Forgets deleted entities no replica can need: every write they name is covered
        by the context summary, and every peer acknowledged the delete (change seq <=
        ``acked_seq``: a relay's mark, silent peers left out) or, without a mark, the
        store never replicated or the delete is older than ``peer_expiry``. Returns how
        many."""
        return self._core.collect_tombstones(None if acked_seq is None else self._check_seq(acked_seq))

    def manage_collection(self, manager: object | None) -> None:
        """Hands the forgetting of deleted entities to ``manager`` (a relay: it knows
        which peers acknowledged what, and which are gone) or, with None, back to the
        maintenance pass, which then forgets by age (``peer_expiry``)."""
        self._collection_manager = manager

    # ---- watching ----------------------------------------------------------------------

    def watch(
        self,
        type_filter: int = 0,
        include_existing: bool = False,
        since_seq: int | None = None,
        components: Sequence[str] | None = None,
        min_interval: float = 0.0,
    ) -> Watcher:
        """A feed of changes. ``include_existing``: every live entity first (CREATED);
        ``since_seq``: resume after that cursor (every entity changed since, current
        state); ``components``: project these keys; ``min_interval``: at most one event
        per entity per interval (the latest)."""
        if components is not None:
            if isinstance(components, str) or not all(isinstance(c, str) and c for c in components):
                raise TypeError("components must be a list of non-empty component keys")
            components = list(components)
        if not is_number(min_interval) or min_interval < 0:
            raise ValueError(f"min_interval must be a non-negative number of seconds, got {min_interval!r}")
        since = None if since_seq is None else self._check_seq(since_seq)
        handle = self._core.watch(
            self._check_type(type_filter), components, float(min_interval),
            self.options.watch_queue, bool(include_existing), since,
        )
        return Watcher(handle)

    # ---- strategies --------------------------------------------------------------------

    def register_strategy(
        self,
        type_url: str,
        merge: str,
        *,
        field: int | None = None,
        order: Sequence[int] | None = None,
        finite: Sequence[int] = (),
    ) -> None:
        """Sets how components of ``type_url`` merge: ``"lww"``, ``"max"`` (wire field
        ``field``, optionally ranked by ``order``) or ``"lww_tiebreak"`` (``field`` breaks
        exact version ties). ``finite``: float fields that must not be NaN/inf. Every node
        of a mesh must register the same strategies."""
        self._core.register(type_url, merge, field, None if order is None else list(order), list(finite))

    # ---- durability --------------------------------------------------------------------

    async def durable(self) -> None:
        """Returns once every write made so far is durable as the store promises: on disk
        with ``durability="commit"``; at once with ``interval`` or in memory. StorageError
        if storage fails first. Servers await it before acknowledging a write."""
        if self.storage is not None and self.storage.durability == "commit":
            await self.storage.durable(self._core.seq)

    def sync(self, timeout: float = 30.0) -> None:
        """Blocks until every write made so far is on disk (any durability mode); a no-op
        in memory. StorageError if storage fails or ``timeout`` seconds pass first."""
        if self.storage is None:
            return
        if not is_number(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not self.storage.sync(self._core.seq, timeout):
            raise StorageError(f"writes not on disk after {timeout} s (storage is behind)")

    # ---- maintenance -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats = dict(self._core.stats())
        if self.storage is not None:
            stats.update(self.storage.stats(stats))
            stats["storage_failing"] = int(stats["storage_error"] is not None)
        return stats

    def note_peer_ack(self, peer: str, node_id: str, incarnation: int, acked_seq: int) -> None:
        """Records how far a mesh peer (by address) acknowledged this store's log; kept in
        the data dir so a restarted relay resumes there (a relay calls this)."""
        self._core.note_peer_ack(peer, node_id, incarnation, acked_seq)

    def peer_acks(self) -> list[tuple[str, str, int, int]]:
        """The stored acknowledgements: [(peer address, node_id, incarnation, acked_seq)]."""
        return self._core.peer_acks()

    def close(self) -> None:
        """Cancels this store's timers (the shared loop keeps running) and, with a data
        dir, commits what is left and closes it cleanly; later writes are refused."""
        self._closed = True  # pending expiry timers find it closed and do nothing
        self._loop.cancel(self._timer("maintenance"))
        self._loop.cancel(self._timer("expire"))
        self._core.set_expiry_hook(None)
        if self.storage is not None:
            self.storage.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timer(self, *what: object) -> tuple:
        return (*self._timer_prefix, *what)

    def _arm_expiry(self, due: tuple[int, int]) -> None:
        """Arms the expiry timer for ``due`` unless it is armed earlier already (writers
        and the timer itself arm it from different threads, in any order)."""
        key, when, ref = self._timer("expire"), due[0] + due[1] / 1e9, weakref.ref(self)
        with self._expiry_lock:
            armed = self._loop.deadline(key)
            if armed is None or when < armed:
                self._loop.schedule(key, when, lambda: _expire_due(ref, due))

    def _schedule_maintenance(self, ref: weakref.ref) -> None:
        def maintain() -> None:
            store = ref()
            if store is None:
                return
            if store._closed:
                return
            try:
                if store._collection_manager is None:
                    store._core.collect_tombstones(None)
            except StorageError:
                pass  # a failing disk: storage logs it and refuses writes; try again next pass
            store._schedule_maintenance(ref)

        self._loop.schedule(self._timer("maintenance"), self._loop.now() + self.options.maintenance_interval, maintain)

    @staticmethod
    def _check_type(type_filter: Any) -> int:
        if not is_number(type_filter, integer=True) or type_filter not in _ENTITY_TYPES:
            raise ValueError(f"type_filter must be an EntityType value {sorted(_ENTITY_TYPES)}, got {type_filter!r}")
        return type_filter

    @staticmethod
    def _check_seq(seq: Any) -> int:
        if not is_number(seq, integer=True) or seq < 0:
            raise ValueError(f"seq must be a non-negative int, got {seq!r}")
        return seq
