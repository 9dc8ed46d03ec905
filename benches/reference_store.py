"""The BASELINE for benches/bench_store.py, not a product: a plain-Python store.

``ReferenceStore`` is what meshstore's ``Store`` would be without the Rust core,
written the obvious way in Python: dicts of component key -> (Any, HLC stamp, dot),
a hybrid logical clock and a dot counter in Python, a change log with a seq per
change, and one watcher queue (a ``deque`` of events with the entity). B2 and B3 time ``Store``
against it in the same run; the ratio is how much the Rust core buys.

It keeps ``Store``'s semantics for what B2/B3 exercise, and only that:

- ``create`` / ``update`` / ``put`` / ``put_many`` of ``entity_pb2.Entity`` messages or
  their serialized bytes (bytes are parsed with ``FromString`` first);
- checks: size limits (bytes in; after the write, what the core counts: id, per value
  its bytes, key and type URL plus 48, the type register, one context entry), id
  (non-empty, <= 1024 bytes), entity type, component keys (non-empty, not ``@...``),
  type URLs, the component bytes as the core's default registry bounds them (finite
  floats; latitude within +-90, longitude +-180, heading +-360, confidence 0..1, speed
  >= 0; the threat and approval levels in their order lists; well-formed protobuf for
  any other type), base versions with a node (and dots with a node and a counter),
  stamp bases not beyond the clock offset;
- per key, one writer and so one value (no siblings): the base of a write is
  ``versions[key]``: with a counter, its dot and its ``concurrent`` dots, and the key is
  stale iff the stored value's dot is not among them; with no counter, its stamp (or,
  without ``versions[key]``, the hlc fields 6-8), stale iff the stored stamp is newer;
  neither: a blind write. The same type URL and bytes is a no-op (``unchanged``);
  ``strict`` fails on any stale key;
- applied keys get one new HLC stamp and each a dot (node, incarnation, counter: the
  store's counter counts every applied key); the type/expiry register (key
  ``@entity``, its own dot) is written on creation or when the type or expiry changes;
  presence, ``created_at``, origin; a new change seq (the previous one leaves the log);
  ``versions[key]`` gives physical, logical, node, incarnation and counter;
- results name applied / stale / unchanged keys and give the entity after the write
  (built lazily, as ``UpdateResult.entity`` decodes lazily); watchers get a CREATED or
  UPDATED event with the entity.

Left out (B2/B3 do not exercise them): concurrent writers and siblings, merge
strategies' choice among siblings, the causal context beyond this store's own dots,
delete and delete records, replication merge, watcher filters / projection /
coalescing / min_interval, TTL timers.
Thread safety is the GIL's.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError

from meshstore.errors import AlreadyExistsError, ClockSkewError, InvalidEntityError, NotFoundError, StaleWriteError
from meshstore.pb import entity_pb2

Entity = entity_pb2.Entity
AnyMsg = any_pb2.Any
# (physical ns, logical, node): tuples order exactly like the core's HLC timestamps.
Version = tuple[int, int, str]
# (node, incarnation, counter): what names one write.
Dot = tuple[str, int, int]

META_KEY = "@entity"
META_URL = "type.googleapis.com/meshstore.EntityMeta"
# The core's size accounting: a value's key, type URL and bookkeeping on top of its bytes;
# the type register (as the core's size check counts it); one causal context entry.
SIBLING_OVERHEAD = 48
META_BYTES = len(META_KEY) + len(META_URL) + 48 + 40
CONTEXT_ENTRY_BYTES = 32
CREATED, UPDATED = 1, 2
_PREFIX = "type.googleapis.com/entity.v1."


_ANY = math.inf


def _bounded(*fields: tuple[str, float, float]):
    """Each field finite and within [lo, hi], as the core's rules bound them."""

    def check(m: Any) -> str | None:
        for f, lo, hi in fields:
            v = getattr(m, f)
            if not math.isfinite(v):
                return f"field {f} is not a finite number"
            if v < lo or v > hi:
                return f"field {f} is {v}, outside [{lo}, {hi}]"
        return None

    return check


def _one_of(field: str, allowed: frozenset[int]):
    def check(m: Any) -> str | None:
        v = getattr(m, field)
        return None if v in allowed else f"field {field} has value {v}, not one of {sorted(allowed)}"

    return check


_LAT, _LON, _UNIT = (-90.0, 90.0), (-180.0, 180.0), (0.0, 1.0)

# type URL -> (message class to parse the bytes with, check): the core's default
# registry's bounds; every other type URL is only checked for framing.
_RULES: dict[str, tuple[type, Any]] = {
    _PREFIX + "PositionComponent": (entity_pb2.PositionComponent, _bounded(("lat", *_LAT), ("lon", *_LON), ("alt", -_ANY, _ANY))),
    _PREFIX + "VelocityComponent": (entity_pb2.VelocityComponent, _bounded(("speed", 0.0, _ANY), ("heading", -360.0, 360.0))),
    _PREFIX + "FusionComponent": (entity_pb2.FusionComponent, _bounded(("fused_lat", *_LAT), ("fused_lon", *_LON), ("confidence", *_UNIT))),
    _PREFIX + "ClassificationComponent": (entity_pb2.ClassificationComponent, _bounded(("confidence", *_UNIT))),
    _PREFIX + "ThreatComponent": (entity_pb2.ThreatComponent, _one_of("level", frozenset(range(5)))),
    _PREFIX + "ApprovalComponent": (entity_pb2.ApprovalComponent, _one_of("state", frozenset(range(6)))),
}
_DEFAULT_RULE: tuple[type, Any] = (empty_pb2.Empty, None)


class HLC:
    """Hybrid logical clock: (physical ns, logical, node), strictly increasing."""

    __slots__ = ("node", "physical", "logical", "max_offset_ns")

    def __init__(self, node: str, max_offset_ns: int) -> None:
        self.node = node
        self.physical = 0
        self.logical = 0
        self.max_offset_ns = max_offset_ns

    def now(self) -> Version:
        wall = time.time_ns()
        if wall > self.physical:
            self.physical = wall
            self.logical = 0
        else:
            self.logical += 1
        return (self.physical, self.logical, self.node)

    def check_skew(self, physical: int) -> bool:
        return physical <= time.time_ns() + self.max_offset_ns


class _Record:
    """One entity: its cells and registers. ``cells``: key -> (Any, stamp, dot);
    ``meta_version``: the type/expiry register's (stamp, dot)."""

    __slots__ = ("id", "etype", "cells", "presence", "meta_version", "created_at", "expiry", "seq", "source", "payload")

    def __init__(self, entity_id: str) -> None:
        self.id = entity_id
        # What the size limit counts, as the core's check: id, per cell its value, key
        # and type URL plus 48, the type register and this writer's one context entry
        # (kept as a running total).
        self.payload = len(entity_id) + META_BYTES + CONTEXT_ENTRY_BYTES
        self.etype = 0
        self.cells: dict[str, tuple[AnyMsg, Version, Dot]] = {}
        self.presence: Version | None = None
        self.meta_version: tuple[Version, Dot] | None = None
        self.created_at: int | None = None  # ns
        self.expiry: tuple[int, int] | None = None
        self.seq = 0
        self.source = ""


class _Snapshot:
    """The entity right after a change; results and events share it, the message is
    built on first access (as the core's results and events decode on access)."""

    __slots__ = ("id", "etype", "cells", "presence", "meta_version", "created_at", "expiry", "_entity")

    def __init__(self, r: _Record) -> None:
        self.id = r.id
        self.etype = r.etype
        self.cells = dict(r.cells)
        self.presence = r.presence
        self.meta_version = r.meta_version
        self.created_at = r.created_at
        self.expiry = r.expiry
        self._entity: Entity | None = None

    @property
    def entity(self) -> Entity:
        if self._entity is None:
            self._entity = _to_entity(self)
        return self._entity


def _set_version(v: entity_pb2.Version, ts: Version, dot: Dot) -> None:
    v.physical, v.logical, v.node = ts
    _node, v.incarnation, v.counter = dot


def _to_entity(s: _Snapshot | _Record) -> Entity:
    e = Entity(id=s.id, type=s.etype)
    for key, (packed, ts, dot) in s.cells.items():
        e.components[key].CopyFrom(packed)
        _set_version(e.versions[key], ts, dot)
    if s.meta_version is not None:
        _set_version(e.versions[META_KEY], *s.meta_version)
    if s.created_at is not None:
        e.created_at.FromNanoseconds(s.created_at)
    if s.presence is not None:
        e.updated_at.FromNanoseconds(s.presence[0])
        e.hlc_physical, e.hlc_logical, e.hlc_node = s.presence
        e.origin_node = s.presence[2]
    if s.expiry is not None:
        e.expiry_time.seconds, e.expiry_time.nanos = s.expiry
    return e


class Result:
    """``UpdateResult``'s shape: entity (built on access), applied / stale / unchanged."""

    __slots__ = ("entity_id", "applied", "stale", "unchanged", "created", "_snapshot")

    def __init__(self, entity_id: str, applied: list[str], stale: list[str], unchanged: list[str], created: bool, snapshot: _Snapshot) -> None:
        self.entity_id = entity_id
        self.applied = applied
        self.stale = stale
        self.unchanged = unchanged
        self.created = created
        self._snapshot = snapshot

    @property
    def entity(self) -> Entity:
        return self._snapshot.entity


# A checked write: (id, type, expiry (None: keep, False: clear, else (s, ns)), cells)
# with cells [(key, Any, base)]; a base is None (blind), a set of dots (the values the
# writer saw) or a stamp (stale if the key holds a value stamped after it).
_Base = frozenset[Dot] | Version | None
_Prepared = tuple[str, int, Any, list[tuple[str, AnyMsg, _Base]]]


class ReferenceStore:
    """The plain-Python baseline of ``meshstore.Store`` (see the module docstring)."""

    def __init__(self, node_id: str = "ref", max_clock_offset: float = 0.5, max_entity_bytes: int = 1 << 20) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        self.clock = HLC(node_id, int(max_clock_offset * 1e9))
        # Dots: (node, incarnation, counter); a random incarnation per store, never 0.
        self.incarnation = random.getrandbits(64) or 1
        self.counter = 0
        self.max_entity_bytes = max_entity_bytes
        self.max_id_bytes = 1024
        self._entities: dict[str, _Record] = {}
        self._log: dict[int, str] = {}  # seq -> id, in seq order (dicts keep insertion order)
        self.seq = 0
        self._watchers: list[deque] = []

    # ---- writes ----------------------------------------------------------------------

    def create(self, entity: Entity | bytes) -> Entity:
        return self._commit(self._prepare(entity), "create", False).entity

    def update(self, entity: Entity | bytes, *, strict: bool = False) -> Result:
        return self._commit(self._prepare(entity), "update", strict)

    def put(self, entity: Entity | bytes) -> Result:
        return self._commit(self._prepare(entity), "put", False)

    def put_many(self, entities: Iterable[Entity | bytes]) -> list[Result]:
        """All-or-nothing: every entity is checked before any is applied."""
        prepared = []
        for i, e in enumerate(entities):
            try:
                prepared.append(self._prepare(e))
            except InvalidEntityError as err:
                raise InvalidEntityError(f"batch item {i}: {err}") from None
        commit = self._commit
        return [commit(p, "put", False) for p in prepared]

    # ---- reads -----------------------------------------------------------------------

    def get(self, entity_id: str) -> Entity:
        r = self._entities.get(entity_id)
        if r is None:
            raise NotFoundError(f"entity '{entity_id}' not found")
        return _to_entity(r)

    def versions(self, entity_id: str) -> dict[str, entity_pb2.Version]:
        """The version of each component key, as ``get(entity_id).versions`` gives them
        without building the whole entity (a cheaper read for the benches' set-up)."""
        r = self._entities.get(entity_id)
        if r is None:
            raise NotFoundError(f"entity '{entity_id}' not found")
        return {
            k: entity_pb2.Version(physical=ts[0], logical=ts[1], node=ts[2], incarnation=dot[1], counter=dot[2])
            for k, (_a, ts, dot) in r.cells.items()
        }

    def watch(self) -> deque:
        """A queue of (type, seq, entity_id, origin_node, snapshot) events; the entity is
        ``snapshot.entity``. Drain it by popping (or ``clear()``)."""
        q: deque = deque()
        self._watchers.append(q)
        return q

    def __len__(self) -> int:
        return len(self._entities)

    # ---- internals -------------------------------------------------------------------

    def _prepare(self, entity: Entity | bytes) -> _Prepared:
        if isinstance(entity, Entity):
            e = entity
            owned = False
            size = e.ByteSize()
        elif isinstance(entity, (bytes, bytearray, memoryview)):
            size = len(entity)
            if size > self.max_entity_bytes:
                raise InvalidEntityError(f"entity is {size} bytes, over the limit of {self.max_entity_bytes} bytes")
            try:
                e = Entity.FromString(entity)
            except DecodeError as err:
                raise InvalidEntityError(f"malformed entity bytes: {err}") from None
            owned = True  # a message of our own: its Any's can be kept without a copy
        else:
            raise TypeError(f"entity must be an entity_pb2.Entity or its serialized bytes, got {type(entity).__name__}")
        if size > self.max_entity_bytes:
            raise InvalidEntityError(f"entity is {size} bytes, over the limit of {self.max_entity_bytes} bytes")
        eid = e.id
        if not eid:
            raise InvalidEntityError("entity id is empty")
        if len(eid.encode()) > self.max_id_bytes:
            raise InvalidEntityError(f"entity id is over the limit of {self.max_id_bytes} bytes")
        etype = e.type
        if not 0 <= etype <= 3:
            raise InvalidEntityError(f"entity '{eid}': unknown entity type {etype}")
        versions = e.versions
        fallback = (e.hlc_physical, e.hlc_logical, e.hlc_node) if e.hlc_node else None
        check_skew = self.clock.check_skew
        cells = []
        for key, packed in e.components.items():
            if not key or key[0] == "@":
                raise InvalidEntityError(f"entity '{eid}': component key {key!r} is empty or reserved ('@...')")
            url = packed.type_url
            if not url:
                raise InvalidEntityError(f"entity '{eid}': component '{key}' has an empty type URL")
            cls, check = _RULES.get(url, _DEFAULT_RULE)
            try:
                value = cls.FromString(packed.value)
            except DecodeError as err:
                raise InvalidEntityError(f"entity '{eid}': component '{key}' ({url}): {err}") from None
            if check is not None and (msg := check(value)):
                raise InvalidEntityError(f"entity '{eid}': component '{key}' ({url}): {msg}")
            base: _Base
            if key in versions:
                v = versions[key]
                if v.counter:
                    dots = [(v.node, v.incarnation, v.counter)]
                    dots.extend((d.node, d.incarnation, d.counter) for d in v.concurrent)
                    for node, inc, counter in dots:
                        if not node or not counter:
                            raise InvalidEntityError(
                                f"entity '{eid}': version of '{key}': dot ({node!r}, {inc}, {counter}) has an empty node or a zero counter"
                            )
                    base = frozenset(dots)
                else:
                    if not v.node:
                        raise InvalidEntityError(f"entity '{eid}': version of '{key}': version has an empty node")
                    base = (v.physical, v.logical, v.node)
            else:
                base = fallback
            if type(base) is tuple and not check_skew(base[0]):
                raise ClockSkewError(f"entity '{eid}': the base version of '{key}' is too far ahead")
            if not owned:
                copy = AnyMsg()
                copy.CopyFrom(packed)
                packed = copy
            cells.append((key, packed, base))
        expiry = None
        if e.HasField("expiry_time"):
            t = e.expiry_time
            if not 0 <= t.nanos < 1_000_000_000:
                raise InvalidEntityError(f"entity '{eid}': expiry_time: nanos {t.nanos} out of range")
            expiry = False if (t.seconds, t.nanos) == (0, 0) else (t.seconds, t.nanos)
        return eid, etype, expiry, cells

    def _commit(self, p: _Prepared, mode: str, strict: bool) -> Result:
        eid, etype, expiry, cells = p
        r = self._entities.get(eid)
        alive = r is not None
        if mode == "create" and alive:
            raise AlreadyExistsError(f"entity '{eid}' already exists")
        if mode == "update" and not alive:
            raise NotFoundError(f"entity '{eid}' not found")
        stored = r.cells if alive else {}
        applied: list[str] = []
        stale: list[str] = []
        unchanged: list[str] = []
        for key, packed, base in cells:
            cell = stored.get(key)
            if cell is None:
                applied.append(key)
                continue
            old, version, dot = cell
            if base is None:
                is_stale = False
            elif type(base) is tuple:
                is_stale = version > base
            else:
                is_stale = dot not in base
            if is_stale:
                stale.append(key)
            elif old.type_url == packed.type_url and old.value == packed.value:
                unchanged.append(key)
            else:
                applied.append(key)
        if strict and stale:
            raise StaleWriteError(f"entity '{eid}': stale keys {stale}")
        if applied:
            total = r.payload if alive else len(eid) + META_BYTES + CONTEXT_ENTRY_BYTES
            for key, packed, _base in cells:
                if key in applied:
                    old = stored.get(key)
                    if old is not None:
                        total -= len(old[0].value) + len(key) + len(old[0].type_url) + SIBLING_OVERHEAD
                    total += len(packed.value) + len(key) + len(packed.type_url) + SIBLING_OVERHEAD
            if total > self.max_entity_bytes:
                raise InvalidEntityError(f"entity '{eid}' would hold {total} bytes, over the limit of {self.max_entity_bytes}")
        new_expiry = r.expiry if alive else None
        if expiry is not None:
            new_expiry = None if expiry is False else expiry
        type_change = etype != 0 and (not alive or etype != r.etype)
        expiry_change = alive and new_expiry != r.expiry or not alive and new_expiry is not None
        if alive and not applied and not type_change and not expiry_change:
            return Result(eid, applied, stale, unchanged, False, _Snapshot(r))
        ts = self.clock.now()
        node, incarnation = ts[2], self.incarnation
        if r is None:
            r = self._entities[eid] = _Record(eid)
        rcells = r.cells
        for key, packed, _base in cells:
            if key in applied:
                old = rcells.get(key)
                if old is not None:
                    r.payload -= len(old[0].value) + len(key) + len(old[0].type_url) + SIBLING_OVERHEAD
                r.payload += len(packed.value) + len(key) + len(packed.type_url) + SIBLING_OVERHEAD
                self.counter += 1
                rcells[key] = (packed, ts, (node, incarnation, self.counter))
        if type_change or expiry_change or r.meta_version is None:
            if type_change:
                r.etype = etype
            r.expiry = new_expiry
            self.counter += 1
            r.meta_version = (ts, (node, incarnation, self.counter))
        r.presence = ts
        if r.created_at is None:
            r.created_at = ts[0]
        r.source = ts[2]
        # The change log: one seq per change; the entity's previous seq leaves it.
        if r.seq:
            del self._log[r.seq]
        self.seq += 1
        r.seq = self.seq
        self._log[self.seq] = eid
        snapshot = _Snapshot(r)
        if self._watchers:
            event = (UPDATED if alive else CREATED, r.seq, eid, r.source, snapshot)
            for q in self._watchers:
                q.append(event)
        return Result(eid, applied, stale, unchanged, not alive, snapshot)
