"""The seeded ground truth the simulators share.

A scenario is ``count`` targets moving in a bounding box by dead reckoning: each has a
start position, heading and speed drawn from ``random.Random(seed)`` (in index order, so
target ``i`` does not depend on ``count``), moves in a straight line and bounces off (or
wraps around) the box edges. ``Scenario.state(i, t)`` is a pure function of (seed, count,
bbox, speeds, edge mode, t) in closed form (a triangle wave per axis, no stepping), so a
sensor-sim and a radar-sim in different processes, started at different times, agree on
where every target is at any instant.

Time ``t`` is in seconds since ``SCENARIO_EPOCH`` (the sims use wall-clock time, aligned to
their tick period, so two sims at the same rate sample the very same instants).

Motion is linear in degree space: the east-west rate uses the box centre's latitude, so a
target's ground speed is exact at the centre latitude and within cos(lat)/cos(centre) of
it elsewhere (under 2 % for a 1-degree box at mid latitudes). Speeds are knots, headings
degrees clockwise from true north.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple
from dataclasses import dataclass, field

from meshstore.validate import is_number

__all__ = [
    "EARTH_RADIUS_M",
    "KNOT_MPS",
    "M_PER_DEG",
    "SCENARIO_EPOCH",
    "BBox",
    "Scenario",
    "TargetState",
    "offset_position",
]

#: Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M = 6_371_008.8
#: Metres per degree of latitude (and of longitude at the equator) on that sphere.
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0
#: One knot in metres per second.
KNOT_MPS = 1852.0 / 3600.0
#: Scenario time 0 (2023-11-14T22:13:20Z): t = wall clock - SCENARIO_EPOCH.
SCENARIO_EPOCH = 1_700_000_000.0

EDGE_MODES = ("bounce", "wrap")

#: Environment variables of the bounding box (the sims' --bbox-* flags default to them).
DEFAULT_BBOX = (50.0, 51.0, -1.0, 1.0)


def _finite(name: str, value: object) -> float:
    if not is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class BBox:
    """A latitude/longitude box (degrees); min < max on both axes, no antimeridian crossing."""

    min_lat: float
    max_lat: float
    min_lon: float
    max_lon: float

    def __post_init__(self) -> None:
        for name in ("min_lat", "max_lat", "min_lon", "max_lon"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if not -90.0 <= self.min_lat < self.max_lat <= 90.0:
            raise ValueError(f"bbox latitudes must satisfy -90 <= min < max <= 90, got {self.min_lat}..{self.max_lat}")
        if not -180.0 <= self.min_lon < self.max_lon <= 180.0:
            raise ValueError(f"bbox longitudes must satisfy -180 <= min < max <= 180, got {self.min_lon}..{self.max_lon}")

    @property
    def center(self) -> tuple[float, float]:
        return (self.min_lat + self.max_lat) / 2.0, (self.min_lon + self.max_lon) / 2.0

    def contains(self, lat: float, lon: float, tolerance: float = 1e-9) -> bool:
        return (self.min_lat - tolerance <= lat <= self.max_lat + tolerance
                and self.min_lon - tolerance <= lon <= self.max_lon + tolerance)


class TargetState(NamedTuple):
    """Where target ``index`` is at time ``t``: position (deg), speed (kn), heading (deg).
    (A tuple: the sims make one per target per tick.)"""

    index: int
    lat: float
    lon: float
    speed_kts: float
    heading_deg: float


@dataclass(frozen=True)
class _Target:
    lat0: float
    lon0: float
    rate_lat: float  # deg/s
    rate_lon: float  # deg/s
    speed_kts: float
    #: Heading (deg) while moving in each direction: by (lat sign < 0) * 2 + (lon sign < 0).
    headings: tuple[float, float, float, float]


def _heading(north: float, east: float) -> float:
    """The heading (deg) of a motion of ``north``, ``east`` (any unit; metres/s here)."""
    return math.degrees(math.atan2(east, north)) % 360.0 if (north or east) else 0.0


def _fold(u: float, span: float, edge: str) -> tuple[float, float]:
    """Offset ``u`` from the low edge folded into [0, span]; and the direction sign."""
    if edge == "wrap":
        return u % span, 1.0
    m = u % (2.0 * span)  # a triangle wave: out and back
    return (m, 1.0) if m <= span else (2.0 * span - m, -1.0)


@dataclass(frozen=True)
class Scenario:
    """``count`` targets in ``bbox`` with speeds in [speed_min, speed_max] knots."""

    seed: int = 1
    count: int = 10
    bbox: BBox = field(default_factory=lambda: BBox(*DEFAULT_BBOX))
    speed_min: float = 10.0
    speed_max: float = 600.0
    edge: str = "bounce"

    def __post_init__(self) -> None:
        if not is_number(self.seed, integer=True):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not is_number(self.count, integer=True) or self.count < 0:
            raise ValueError(f"count must be a non-negative int, got {self.count!r}")
        if not isinstance(self.bbox, BBox):
            raise ValueError(f"bbox must be a BBox, got {type(self.bbox).__name__}")
        lo, hi = _finite("speed_min", self.speed_min), _finite("speed_max", self.speed_max)
        if lo < 0 or hi < lo:
            raise ValueError(f"speeds must satisfy 0 <= speed_min <= speed_max, got {lo}..{hi}")
        if self.edge not in EDGE_MODES:
            raise ValueError(f"edge must be one of {EDGE_MODES}, got {self.edge!r}")
        object.__setattr__(self, "_targets", self._draw())

    def _draw(self) -> tuple[_Target, ...]:
        rng = random.Random(self.seed)
        b = self.bbox
        cos_center = math.cos(math.radians(b.center[0]))
        lon_scale = M_PER_DEG * max(cos_center, 1e-6)
        targets = []
        for _ in range(self.count):
            lat0 = rng.uniform(b.min_lat, b.max_lat)
            lon0 = rng.uniform(b.min_lon, b.max_lon)
            heading = math.radians(rng.uniform(0.0, 360.0))
            speed = rng.uniform(self.speed_min, self.speed_max)
            mps = speed * KNOT_MPS
            rate_lat, rate_lon = mps * math.cos(heading) / M_PER_DEG, mps * math.sin(heading) / lon_scale
            targets.append(_Target(lat0, lon0, rate_lat, rate_lon, speed,
                                   tuple(_heading(rate_lat * lat_sign, rate_lon * lon_sign * cos_center)
                                         for lat_sign in (1.0, -1.0) for lon_sign in (1.0, -1.0))))
        return tuple(targets)

    def state(self, index: int, t: float) -> TargetState:
        """Target ``index`` at scenario time ``t`` (seconds; any real number)."""
        target: _Target = self._targets[index]  # type: ignore[attr-defined]
        b = self.bbox
        lat_off, lat_sign = _fold(target.lat0 - b.min_lat + target.rate_lat * t, b.max_lat - b.min_lat, self.edge)
        lon_off, lon_sign = _fold(target.lon0 - b.min_lon + target.rate_lon * t, b.max_lon - b.min_lon, self.edge)
        heading = target.headings[(lat_sign < 0) * 2 + (lon_sign < 0)]
        return TargetState(index, b.min_lat + lat_off, b.min_lon + lon_off, target.speed_kts, heading)

    def states(self, t: float) -> list[TargetState]:
        return [self.state(i, t) for i in range(self.count)]


def offset_position(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    """The point ``north_m``/``east_m`` metres from (lat, lon) (flat-earth, for small offsets)."""
    lat2 = lat + north_m / M_PER_DEG
    lon2 = lon + east_m / (M_PER_DEG * max(math.cos(math.radians(lat)), 1e-9))
    return lat2, (lon2 + 180.0) % 360.0 - 180.0 if not -180.0 <= lon2 <= 180.0 else lon2
