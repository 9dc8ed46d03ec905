"""classifier: speed -> classification and threat, written without clobbering anyone.

Watches TRACK entities (``include_existing``, so a restart classifies what is there),
projected to the keys it needs (velocity, classification, threat). For a track with a
velocity, the speed (knots) picks a band:

| speed (default knots)   | label             | threat |
|-------------------------|-------------------|--------|
| < low (30)              | slow-mover        | NONE   |
| low .. medium (150)     | mover             | LOW    |
| medium .. high (400)    | fast-mover        | MEDIUM |
| >= high                 | very-fast-mover   | HIGH   |

Confidence grows with the distance from the band's edges (0.5 on an edge, 0.99 from 20 %
of the threshold away), rounded to 0.01 so a steady speed gives a steady value.

Events are handled concurrently across tracks and in order per track
(``meshstore.services.PerEntity``), so a round trip per write never holds back the rest;
the echo of the classifier's own write (classification as it wrote it, velocity as it
read it) is dropped before anything is decoded. ``stats()`` reports the lag from the
sensor's velocity write to the classification answering it (p50/p99).

The write carries ONLY ``classification`` and ``threat``, each with the version it was
based on (``entity.versions[key]`` as read; for a key that was absent, a version older
than any write): a classification or threat written meanwhile by someone else is
reported stale and kept, and the sensor's position is never part of the write, so it
can never be overwritten with an old one. The writes of the tracks handled at once go
together in one UpdateEntities call (``meshstore.grpc.client.UpdateBatcher``), so a
burst of new tracks costs a few round trips, not one per track. A write that would change nothing
is skipped, and so are events older than the classifier's own last write (its echo has
not arrived yet).

Tracks without a velocity (radar plots, fused tracks) are ignored: a speed from the
differences of noisy radar positions (50 m noise at 1 Hz is +-100 kn of speed noise)
would flap between bands; the fused track of a radar plot and an EO track carries no
speed either. Non-finite or negative speeds are ignored with a warning.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient, UpdateBatcher
from meshstore.components import CLASSIFICATION, THREAT, VELOCITY, make_entity
from meshstore.errors import InvalidEntityError, NotFoundError
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from meshstore.services import Job, PerEntity, Service, base_version, newer, read_component
from meshstore.validate import is_number

__all__ = ["Classification", "Classifier", "Thresholds", "classify", "plan_write"]

WRITES = (CLASSIFICATION, THREAT)
#: What the classifier reads of a track (its watch projection, and its writes' answers).
WATCHED = [VELOCITY, CLASSIFICATION, THREAT]
LABELS = ("slow-mover", "mover", "fast-mover", "very-fast-mover")
LEVELS = (pb.THREAT_LEVEL_NONE, pb.THREAT_LEVEL_LOW, pb.THREAT_LEVEL_MEDIUM, pb.THREAT_LEVEL_HIGH)


@dataclass(frozen=True)
class Thresholds:
    """Speed thresholds in knots: LOW from ``low``, MEDIUM from ``medium``, HIGH from ``high``."""

    low: float = 30.0
    medium: float = 150.0
    high: float = 400.0

    def __post_init__(self) -> None:
        values = (self.low, self.medium, self.high)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or not 0 < self.low < self.medium < self.high:
            raise ValueError(f"speed thresholds must satisfy 0 < low < medium < high, got {values}")


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    level: int


def _f32(value: float) -> float:
    """``value`` as the float32 the ClassificationComponent will hold."""
    return pb.ClassificationComponent(confidence=value).confidence


def classify(speed_kts: float, thresholds: Thresholds = Thresholds()) -> Classification | None:
    """The band of a speed; None for a speed that is not a finite non-negative number."""
    if not is_number(speed_kts) or speed_kts < 0:
        return None
    edges = (0.0, thresholds.low, thresholds.medium, thresholds.high, math.inf)
    band = sum(speed_kts >= edge for edge in edges[1:4])
    lo, hi = edges[band], edges[band + 1]
    margins = [(speed_kts - lo, lo)] if band > 0 else []
    if math.isfinite(hi):
        margins.append((hi - speed_kts, hi))
    # Distance to the nearest edge, relative to 20 % of that edge's value.
    closeness = min(min(1.0, margin / (0.2 * edge)) for margin, edge in margins)
    confidence = round(0.5 + 0.49 * closeness, 2)
    return Classification(LABELS[band], _f32(confidence), LEVELS[band])


def plan_write(entity: pb.Entity, thresholds: Thresholds = Thresholds(),
               log: logging.Logger | None = None) -> pb.Entity | None:
    """The write the classifier makes for ``entity`` as read (None: nothing to do).

    It holds only ``classification`` and ``threat``, each with its base version."""
    velocity = read_component(entity, VELOCITY, pb.VelocityComponent, log)
    if velocity is None:
        return None
    wanted = classify(velocity.speed, thresholds)
    if wanted is None:
        if log is not None:
            log.warning("ignoring track with an invalid speed", extra={"fields": {
                "entity_id": entity.id, "speed": velocity.speed}})
        return None
    current = read_component(entity, CLASSIFICATION, pb.ClassificationComponent, log)
    threat = read_component(entity, THREAT, pb.ThreatComponent, log)
    same_class = current is not None and current.label == wanted.label and current.confidence == wanted.confidence
    same_threat = threat is not None and threat.level == wanted.level
    if same_class and same_threat:
        return None
    write = make_entity(entity.id, **{CLASSIFICATION: pb.ClassificationComponent(label=wanted.label,
                                                                                 confidence=wanted.confidence),
                                      THREAT: pb.ThreatComponent(level=wanted.level)})
    for key in WRITES:
        write.versions[key].CopyFrom(base_version(entity, key))
    return write


class Classifier(Service):
    """Classifies every track with a velocity; see the module docs for the rules."""

    name = "classifier"

    def __init__(self, store: str = DEFAULT_ADDR, thresholds: Thresholds | None = None, *,
                 min_interval: float = 0.0, client: StoreClient | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(store, client=client, backoff=backoff)
        self.thresholds = thresholds or Thresholds()
        self.min_interval = min_interval
        #: The version of the classification key of our last write per entity: an event
        #: showing an older one predates that write (its echo is still on the way).
        self._written: dict[str, pb.Version] = {}
        #: The velocity version each of those writes answered: an event showing both is
        #: the echo of our own write.
        self._answered: dict[str, pb.Version] = {}
        #: Every key the classifier has ever sent (tests assert it is only its own two).
        self.keys_written: set[str] = set()
        self.stream = None
        self.workers = PerEntity(self)
        #: Writes go out in batches: what the handlers of many entities write at once
        #: is one UpdateEntities call.
        self.updates = UpdateBatcher(self.client, components=WATCHED)

    async def _main(self) -> None:
        t = self.thresholds
        self.event(logging.INFO, "classifying", low_kts=t.low, medium_kts=t.medium, high_kts=t.high)
        self.stream = self.client.watch(pb.ENTITY_TYPE_TRACK, include_existing=True,
                                        components=WATCHED,
                                        min_interval=self.min_interval, on_reset=self._forget)
        async for ev in self.stream:
            await self.workers.submit(ev.entity.id, ev)

    async def _cleanup(self) -> None:
        await self.workers.close()
        await self.updates.close()

    def _forget(self) -> None:
        self._written.clear()
        self._answered.clear()

    def prepare(self, ev: store_pb2.EntityEvent) -> Job | None:
        """The write ``ev`` calls for (None: an echo, an old view, nothing to change)."""
        entity = ev.entity
        if ev.type == store_pb2.EVENT_TYPE_DELETED:
            self._written.pop(entity.id, None)
            self._answered.pop(entity.id, None)
            return None
        self.counters["events"] += 1
        written = self._written.get(entity.id)
        if written is not None and written == entity.versions.get(CLASSIFICATION) \
                and self._answered.get(entity.id) == entity.versions.get(VELOCITY):
            self.counters["skipped_echo"] += 1
            return None
        if written is not None and newer(written, entity.versions.get(CLASSIFICATION)):
            self.counters["skipped_old_view"] += 1
            return None
        write = plan_write(entity, self.thresholds, self.log)
        return None if write is None else functools.partial(self._write, entity, write)

    async def _write(self, entity: pb.Entity, write: pb.Entity) -> None:
        self.keys_written.update(write.components.keys())
        try:
            result = await self.updates.update(write)
        except NotFoundError:
            return  # deleted meanwhile
        except InvalidEntityError as exc:
            self.counters["rejected"] += 1
            self.event(logging.WARNING, "store refused classification", entity_id=entity.id, error=str(exc))
            return
        if result.stale:
            self.counters["stale"] += 1
            self.event(logging.DEBUG, "classification stale: newer value kept", entity_id=entity.id,
                       stale=",".join(result.stale))
        if result.applied:
            self.counters["writes"] += 1
            if CLASSIFICATION in result.entity.versions:
                self._written[entity.id] = result.entity.versions[CLASSIFICATION]
                self._answered[entity.id] = result.entity.versions[VELOCITY]
            self.lag.since(entity.versions[VELOCITY].physical)
            if self.log.isEnabledFor(logging.DEBUG):  # a burst of new tracks decodes nothing for it
                self._log_classified(write, result.applied)

    def _log_classified(self, write: pb.Entity, applied: list[str]) -> None:
        cls = pb.ClassificationComponent()
        write.components[CLASSIFICATION].Unpack(cls)
        level = pb.ThreatComponent()
        write.components[THREAT].Unpack(level)
        self.event(logging.DEBUG, "classified", entity_id=write.id, label=cls.label,
                   confidence=round(cls.confidence, 2), threat=pb.ThreatLevel.Name(level.level),
                   applied=",".join(applied))
