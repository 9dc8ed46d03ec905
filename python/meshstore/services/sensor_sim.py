"""sensor-sim: an electro-optical sensor reporting every target of the scenario exactly.

Each tick it upserts one TRACK entity per target (``<prefix>-<n>``) with position,
velocity (knots, degrees true) and ``SourceComponent{sensor_id, sensor_type="eo"}``, as
one batch: one PublishEntities stream per tick (the store's ingest path), a few
messages of up to 1,024 entities (``StoreClient.publish``), encoded without a message
object per report (the tick's shared part is encoded once and appended). The first tick creates the
entities; later ticks carry the same keys, and the unchanged ones (type, source) cost
the store nothing. Each write can set an expiry (``ttl``), so the tracks of a sim that
stops disappear (and fusion cascade-deletes what it built on them).

Ticks are aligned to the wall clock (tick k at k / rate seconds), and the ground truth
is sampled at the tick's time, so two sims at the same rate observe the same instants.
A slow store slows the sim through the stream (each write and the summary are
awaited), and a tick published late is still published. Only a sim more than a tick
behind skips, to the present tick, never queueing: ``ticks_skipped`` counts the ticks
left out, and a warning says how many (at most once per ``SKIP_LOG_INTERVAL`` seconds).
While the store is away the sim waits (backoff) and carries on from the current tick
when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from google.protobuf.message import Message

from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient, StoreUnavailableError
from meshstore.components import EntityEncoder, make_entity
from meshstore.pb import entity_pb2 as pb
from meshstore.services import Service, timestamp
from meshstore.services.scenario import SCENARIO_EPOCH, Scenario
from meshstore.validate import is_number

__all__ = ["SKIP_LOG_INTERVAL", "SensorSim"]

#: Seconds between two "ticks skipped" warnings: a sim that cannot keep up says so, with
#: the count since its last warning, without a line per tick.
SKIP_LOG_INTERVAL = 10.0


class SensorSim(Service):
    """Publishes the scenario's targets as tracks, ``rate`` ticks per second."""

    name = "sensor-sim"
    sensor_type = "eo"
    default_prefix = "eo"

    def __init__(self, store: str = DEFAULT_ADDR, scenario: Scenario | None = None, *, rate: float = 1.0,
                 sensor_id: str | None = None, id_prefix: str | None = None, ttl: float = 30.0,
                 clock: Callable[[], float] = time.time, client: StoreClient | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(store, client=client, backoff=backoff)
        if not is_number(rate) or rate <= 0:
            raise ValueError(f"rate must be a positive number of ticks per second, got {rate!r}")
        if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"ttl must be >= 0 seconds (0: no expiry), got {ttl!r}")
        self.scenario = scenario or Scenario()
        self.rate = float(rate)
        self.prefix = id_prefix or self.default_prefix
        self.sensor_id = sensor_id or f"{self.prefix}-1"
        self.ttl = float(ttl)
        self.clock = clock
        self.last_tick: int | None = None
        self._skipped_unlogged = 0
        self._skip_logged_at = -math.inf
        self._encoder = EntityEncoder()

    def track_id(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    def source(self) -> pb.SourceComponent:
        return pb.SourceComponent(sensor_id=self.sensor_id, sensor_type=self.sensor_type)

    def tick_time(self, tick: int) -> float:
        """Wall-clock time of tick ``tick``."""
        return tick / self.rate

    def observe(self, tick: int) -> list[bytes]:
        """The entities this sensor reports at ``tick``, encoded (a pure function of the
        tick): what it publishes, built without a message per report."""
        t = self.tick_time(tick)
        shared = self.shared(t)
        return [self.report(state.index, shared, position=pb.PositionComponent(lat=state.lat, lon=state.lon),
                            velocity=pb.VelocityComponent(speed=state.speed_kts, heading=state.heading_deg))
                for state in self.scenario.states(t - SCENARIO_EPOCH)]

    def shared(self, t: float) -> bytes:
        """What every report of the tick at ``t`` carries alike (type, source, expiry),
        encoded once per tick rather than once per target."""
        entity = make_entity("", pb.ENTITY_TYPE_TRACK, source=self.source())
        if self.ttl:
            entity.expiry_time.CopyFrom(timestamp(t + self.ttl))
        return entity.SerializeToString()

    def report(self, index: int, shared: bytes, **components: Message) -> bytes:
        """Target ``index``'s track, encoded: ``components`` and what ``shared`` carries
        (two encoded messages in a row parse as the two merged)."""
        return self._encoder.encode(self.track_id(index), **components) + shared

    async def _main(self) -> None:
        self.event(logging.INFO, "simulating", tracks=self.scenario.count, rate=self.rate, seed=self.scenario.seed,
                   sensor_id=self.sensor_id, sensor_type=self.sensor_type, bbox=self.scenario.bbox,
                   edge=self.scenario.edge)
        await self.client.wait_ready()
        tick = math.ceil(self.clock() * self.rate)
        while True:
            due = self.tick_time(tick)
            delay = due - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            now_tick = math.floor(self.clock() * self.rate)
            if now_tick > tick + 1:  # more than a tick behind: skip to the present, never queue
                self._skip(tick, now_tick)
                tick = now_tick
            entities = self.observe(tick)
            try:
                summary = await self.client.publish(entities)
            except StoreUnavailableError:
                self.counters["publish_failed"] += 1
                await self.client.wait_ready()
                tick = math.ceil(self.clock() * self.rate)
                continue
            self.counters["ticks"] += 1
            self.counters["published"] += summary.applied
            if summary.rejected:
                self.counters["rejected"] += summary.rejected
                self.event(logging.WARNING, "store rejected tracks", tick=tick, rejected=summary.rejected,
                           first_error=summary.errors[0] if summary.errors else "")
            if self.last_tick is None:
                self.event(logging.INFO, "tracks created", count=len(entities), first=self.track_id(0))
            self.last_tick = tick
            tick += 1

    def _skip(self, tick: int, now_tick: int) -> None:
        """Counts ticks ``tick`` .. ``now_tick - 1`` as skipped; warns at most once per
        SKIP_LOG_INTERVAL seconds, with the count since the last warning."""
        self.counters["ticks_skipped"] += now_tick - tick
        self._skipped_unlogged += now_tick - tick
        now = self.clock()
        if now - self._skip_logged_at >= SKIP_LOG_INTERVAL:
            self.event(logging.WARNING, "falling behind: ticks skipped", skipped=self._skipped_unlogged,
                       total=self.counters["ticks_skipped"], ticks=self.counters["ticks"], resume_tick=now_tick)
            self._skipped_unlogged = 0
            self._skip_logged_at = now

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "tracks": self.scenario.count}

