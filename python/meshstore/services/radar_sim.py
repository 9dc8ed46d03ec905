"""radar-sim: a radar observing the same ground truth as sensor-sim, with noise.

Same scenario (same seed, count, box, speeds: use the same flags, MESHSTORE_BBOX_* /
MESHSTORE_SCENARIO_* environment or config file), but:

- positions carry Gaussian noise of ``noise_m`` metres (standard deviation, per axis),
  drawn from ``random.Random("<seed>:<sensor_id>:<tick>")``: deterministic for a seed and
  tick, independent between ticks and sensors;
- no velocity (a plot, not a track with kinematics), so the classifier leaves these alone;
- its own ids, ``radar-<n>``, and ``SourceComponent{sensor_type="radar"}``.

Fusion correlates ``radar-<n>`` with ``eo-<n>`` (both observe target n at the same
instants, since ticks are aligned to the wall clock).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient
from meshstore.pb import entity_pb2 as pb
from meshstore.services.scenario import SCENARIO_EPOCH, Scenario, offset_position
from meshstore.services.sensor_sim import SensorSim
from meshstore.validate import is_number

__all__ = ["RadarSim"]


class RadarSim(SensorSim):
    """Publishes noisy position plots of the scenario's targets."""

    name = "radar-sim"
    sensor_type = "radar"
    default_prefix = "radar"

    def __init__(self, store: str = DEFAULT_ADDR, scenario: Scenario | None = None, *, rate: float = 1.0,
                 noise_m: float = 50.0, sensor_id: str | None = None, id_prefix: str | None = None,
                 ttl: float = 30.0, clock: Callable[[], float] = time.time, client: StoreClient | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(store, scenario, rate=rate, sensor_id=sensor_id, id_prefix=id_prefix, ttl=ttl,
                         clock=clock, client=client, backoff=backoff)
        if not is_number(noise_m) or noise_m < 0:
            raise ValueError(f"noise must be >= 0 metres, got {noise_m!r}")
        self.noise_m = float(noise_m)

    def noise(self, tick: int) -> list[tuple[float, float]]:
        """(north, east) metres of noise for every target at ``tick``."""
        rng = random.Random(f"{self.scenario.seed}:{self.sensor_id}:{tick}")
        sigma = self.noise_m
        return [(rng.gauss(0.0, sigma), rng.gauss(0.0, sigma)) for _ in range(self.scenario.count)]

    def observe(self, tick: int) -> list[bytes]:
        t = self.tick_time(tick)
        shared = self.shared(t)
        plots = []
        for state, (north, east) in zip(self.scenario.states(t - SCENARIO_EPOCH), self.noise(tick), strict=True):
            lat, lon = offset_position(state.lat, state.lon, north, east)
            plots.append(self.report(state.index, shared, position=pb.PositionComponent(lat=lat, lon=lon)))
        return plots
