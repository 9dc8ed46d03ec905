"""fusion: one fused track for the tracks different sensors report of the same target.

Correlation (``Correlator``, pure, no I/O; a pass every ``interval`` seconds):

- Candidates are pairs of tracks from different sensor types
  (``SourceComponent.sensor_type``) within ``max_distance`` metres, found with a spatial
  grid: cells of ``max_distance`` (in degrees of latitude, and of longitude at the
  highest latitude in the pass, so a cell is never narrower than the distance), each
  track compared only with the 3x3 cells around its own, longitude wrapping at the
  antimeridian. ``candidate_pairs_brute`` is the all-pairs reference it must equal.
- Distances are equirectangular (flat-earth at the pair's mean latitude): exact enough at
  correlation distances and cheap.
- Groups form greedily, closest candidates first: two free tracks start a group; a free
  track joins a group that has no track of its sensor type if it is within the distance
  of every member. Each group holds at most one track per sensor type.
- An existing group is kept while its tracks stay within ``hysteresis x max_distance``
  of each other (1.5x by default): a pair hovering around the threshold does not flap.
  Beyond it (or when a member has no valid position any more) the group is dissolved
  and its fused entity deleted.
- A fused entity is ``fused-<sha1 of the sorted source ids, 16 hex>`` (TRACK) with
  ``FusionComponent{source_ids, fused_lat, fused_lon, confidence}`` and a
  ``PositionComponent``: the mean of the sources' positions weighted by 1/sigma^2 of each
  sensor type's accuracy (e.g. eo 10 m, radar 50 m). Confidence is
  1 - (largest member distance / (hysteresis x max_distance)), floored at 0.05.

The service watches TRACK entities (positions, sources, fusion). A source track that is
deleted or expires (DELETED event) cascade-deletes the fused entities built on it at
once. Tracks without a position or a source are not correlated. A position that is not
finite (or out of range) is ignored with a warning, once per track: the track keeps its
last valid position, if it had one (the store refuses NaN positions, but one can arrive
under a type URL the store does not validate). At start (and on a
new store) it lists the tracks first (a complete snapshot), adopts the fused entities it
finds (restart), then follows the changes since that snapshot; fused entities whose
sources are gone are deleted by the first pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient, StoreUnavailableError
from meshstore.components import FUSION, POSITION, SOURCE, make_entity
from meshstore.errors import NotFoundError
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from meshstore.services import Service, read_component
from meshstore.services.scenario import EARTH_RADIUS_M, M_PER_DEG

__all__ = [
    "DEFAULT_SIGMAS",
    "Correlator",
    "Fusion",
    "FusedTrack",
    "Obs",
    "candidate_pairs_brute",
    "candidate_pairs_grid",
    "distance_m",
    "fused_id",
    "parse_sigmas",
]

#: Default position accuracy (1 sigma, metres) per sensor type.
DEFAULT_SIGMAS: dict[str, float] = {"eo": 10.0, "radar": 50.0}
DEFAULT_SIGMA = 100.0
FUSED_PREFIX = "fused-"


@dataclass(frozen=True)
class Obs:
    """A source track as fusion sees it."""

    id: str
    sensor_type: str
    lat: float
    lon: float
    alt: float = 0.0
    sensor_id: str = ""


@dataclass(frozen=True)
class FusedTrack:
    id: str
    source_ids: tuple[str, ...]
    lat: float
    lon: float
    alt: float
    confidence: float
    sigma_m: float


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Equirectangular distance in metres (longitude difference wrapped to +-180)."""
    dlon = (lon2 - lon1 + 180.0) % 360.0 - 180.0
    x = math.radians(dlon) * math.cos(math.radians((lat1 + lat2) / 2.0))
    y = math.radians(lat2 - lat1)
    return EARTH_RADIUS_M * math.hypot(x, y)


def fused_id(source_ids: Iterable[str]) -> str:
    """``fused-`` + 16 hex digits of sha1 over the sorted ids: the same set, the same id."""
    digest = hashlib.sha1("\x1f".join(sorted(source_ids)).encode()).hexdigest()
    return FUSED_PREFIX + digest[:16]


def valid_position(lat: float, lon: float) -> bool:
    return math.isfinite(lat) and math.isfinite(lon) and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0


# ---- candidate search ----------------------------------------------------------------------


def _grid_geometry(tracks: Sequence[Obs], max_distance: float) -> tuple[float, float, int]:
    """(cell height in degrees of latitude, cell width in degrees of longitude, columns)."""
    cell_lat = max_distance / M_PER_DEG
    max_abs_lat = max((abs(t.lat) for t in tracks), default=0.0)
    c = math.cos(math.radians(max_abs_lat))
    # The equirectangular distance scales longitude by cos(mean latitude) >= c, so pairs
    # within max_distance are within max_distance / (M_PER_DEG * c) degrees of longitude.
    cell_lon = max_distance / (M_PER_DEG * c) if c > 1e-9 else 360.0
    cols = max(1, int(360.0 // cell_lon)) if cell_lon < 360.0 else 1
    return cell_lat, 360.0 / cols, cols


def candidate_pairs_grid(tracks: Sequence[Obs], max_distance: float) -> list[tuple[float, int, int]]:
    """Every (distance, i, j), i < j, of tracks of different sensor types within
    ``max_distance``, sorted; through the grid (3x3 neighbourhood per track)."""
    if max_distance <= 0 or len(tracks) < 2:
        return []
    cell_lat, width, cols = _grid_geometry(tracks, max_distance)
    cells: dict[tuple[int, int], list[int]] = {}
    keys = []
    for i, t in enumerate(tracks):
        key = (math.floor((t.lat + 90.0) / cell_lat), math.floor((t.lon + 180.0) / width) % cols)
        keys.append(key)
        cells.setdefault(key, []).append(i)
    col_offsets = sorted({(d % cols) for d in (-1, 0, 1)})
    out = []
    dist = distance_m
    for i, t in enumerate(tracks):
        row, col = keys[i]
        kind, lat, lon = t.sensor_type, t.lat, t.lon
        for dr in (-1, 0, 1):
            for dc in col_offsets:
                members = cells.get((row + dr, (col + dc) % cols))
                if not members:
                    continue
                for j in members:
                    if j <= i:
                        continue
                    u = tracks[j]
                    if u.sensor_type == kind:
                        continue
                    d = dist(lat, lon, u.lat, u.lon)
                    if d <= max_distance:
                        out.append((d, i, j))
    out.sort()
    return out


def candidate_pairs_brute(tracks: Sequence[Obs], max_distance: float) -> list[tuple[float, int, int]]:
    """The all-pairs reference of ``candidate_pairs_grid`` (same output, O(n^2))."""
    out = []
    dist = distance_m
    n = len(tracks)
    for i in range(n):
        t = tracks[i]
        kind, lat, lon = t.sensor_type, t.lat, t.lon
        for j in range(i + 1, n):
            u = tracks[j]
            if u.sensor_type == kind:
                continue
            d = dist(lat, lon, u.lat, u.lon)
            if d <= max_distance:
                out.append((d, i, j))
    out.sort()
    return out


# ---- the correlator ------------------------------------------------------------------------


@dataclass
class PassResult:
    """A correlation pass: the fused tracks now, and the fused ids dissolved by it."""

    fused: dict[str, FusedTrack] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    candidates: int = 0


def parse_sigmas(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"eo=10,radar=50"`` (or a mapping) -> {"eo": 10.0, "radar": 50.0}; ValueError if bad."""
    if text is None:
        return dict(DEFAULT_SIGMAS)
    items = text.items() if isinstance(text, Mapping) else (
        part.split("=", 1) if "=" in part else (part, "") for part in text.split(",") if part.strip())
    sigmas = {}
    for kind, value in items:
        kind = str(kind).strip()
        try:
            sigma = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"sensor accuracy {kind!r}: {value!r} is not a number (expected TYPE=METRES)") from None
        if not kind or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sensor accuracy {kind}={value}: expected TYPE=METRES with METRES > 0")
        sigmas[kind] = sigma
    return sigmas


class Correlator:
    """Fusion's state and rules without I/O: source tracks in, fused tracks out."""

    def __init__(self, max_distance: float = 500.0, hysteresis: float = 1.5,
                 sigmas: Mapping[str, float] | None = None, default_sigma: float = DEFAULT_SIGMA) -> None:
        if not math.isfinite(max_distance) or max_distance <= 0:
            raise ValueError(f"max distance must be > 0 metres, got {max_distance!r}")
        if not math.isfinite(hysteresis) or hysteresis < 1:
            raise ValueError(f"hysteresis must be >= 1, got {hysteresis!r}")
        self.max_distance = float(max_distance)
        self.hysteresis = float(hysteresis)
        self.sigmas = dict(DEFAULT_SIGMAS if sigmas is None else sigmas)
        self.default_sigma = default_sigma
        self.tracks: dict[str, Obs] = {}
        #: fused id -> its source ids (sorted)
        self.groups: dict[str, tuple[str, ...]] = {}
        self._member_of: dict[str, str] = {}

    # ---- input ---------------------------------------------------------------------

    def upsert(self, obs: Obs) -> None:
        self.tracks[obs.id] = obs

    def remove(self, track_id: str) -> list[str]:
        """Forgets a source track; returns the fused ids built on it (now dissolved)."""
        self.tracks.pop(track_id, None)
        fid = self._member_of.get(track_id)
        if fid is None:
            return []
        self._dissolve(fid)
        return [fid]

    def adopt(self, fid: str, source_ids: Iterable[str]) -> None:
        """Takes over a fused entity found in the store (a restart); the next pass keeps it
        if its sources are still there and close, else dissolves it."""
        ids = tuple(sorted(set(source_ids)))
        if fid in self.groups:
            return
        self.groups[fid] = ids
        for sid in ids:
            self._member_of.setdefault(sid, fid)

    def _dissolve(self, fid: str) -> None:
        for sid in self.groups.pop(fid, ()):
            if self._member_of.get(sid) == fid:
                del self._member_of[sid]

    def sigma(self, sensor_type: str) -> float:
        return self.sigmas.get(sensor_type, self.default_sigma)

    # ---- a pass --------------------------------------------------------------------

    def _spread(self, members: Sequence[Obs]) -> float:
        return max((distance_m(a.lat, a.lon, b.lat, b.lon)
                    for k, a in enumerate(members) for b in members[k + 1:]), default=0.0)

    def correlate(self, brute: bool = False) -> PassResult:
        """One pass over every track (``brute``: all-pairs candidates, for comparison)."""
        result = PassResult()
        keep_limit = self.hysteresis * self.max_distance
        assigned: dict[str, list[Obs]] = {}  # group key -> members
        owner: dict[str, str] = {}  # track id -> group key
        # 1. Existing groups stay while their members are present and close enough.
        for fid, ids in list(self.groups.items()):
            members = [self.tracks.get(sid) for sid in ids]
            types = [m.sensor_type for m in members if m is not None]
            if (any(m is None for m in members) or len(set(types)) != len(types) or len(members) < 2
                    or any(sid in owner for sid in ids) or self._spread(members) > keep_limit):
                self._dissolve(fid)
                result.removed.append(fid)
                continue
            assigned[fid] = members
            for sid in ids:
                owner[sid] = fid
        # 2. Free tracks: candidates within max_distance, closest first.
        free = [t for tid, t in sorted(self.tracks.items()) if tid not in owner]
        pairs = (candidate_pairs_brute if brute else candidate_pairs_grid)(free, self.max_distance)
        result.candidates = len(pairs)
        new_key = 0
        for _, i, j in pairs:
            a, b = free[i], free[j]
            ga, gb = owner.get(a.id), owner.get(b.id)
            if ga is None and gb is None:
                key = f"new:{new_key}"
                new_key += 1
                assigned[key] = [a, b]
                owner[a.id] = owner[b.id] = key
                continue
            if (ga is None) == (gb is None):
                continue  # both already grouped
            key, joiner = (gb, a) if ga is None else (ga, b)
            if not key.startswith("new:"):
                continue  # kept groups do not grow (their id would change under them)
            members = assigned[key]
            if any(m.sensor_type == joiner.sensor_type for m in members):
                continue
            if all(distance_m(m.lat, m.lon, joiner.lat, joiner.lon) <= self.max_distance for m in members):
                members.append(joiner)
                owner[joiner.id] = key
        # 3. Fused tracks.
        for key, members in assigned.items():
            ids = tuple(sorted(m.id for m in members))
            fid = key if not key.startswith("new:") else fused_id(ids)
            if key.startswith("new:"):
                self.groups[fid] = ids
                for sid in ids:
                    self._member_of[sid] = fid
            result.fused[fid] = self.fuse(fid, members)
        return result

    def fuse(self, fid: str, members: Sequence[Obs]) -> FusedTrack:
        """The weighted (1/sigma^2) mean position of ``members``."""
        ref = members[0].lon
        total = lat = lon = alt = 0.0
        for m in members:
            w = 1.0 / self.sigma(m.sensor_type) ** 2
            total += w
            lat += w * m.lat
            lon += w * (ref + ((m.lon - ref + 180.0) % 360.0 - 180.0))  # unwrap across the antimeridian
            alt += w * m.alt
        lat, lon, alt = lat / total, lon / total, alt / total
        lon = (lon + 180.0) % 360.0 - 180.0 if not -180.0 <= lon <= 180.0 else lon
        spread = self._spread(members)
        confidence = round(max(0.05, 1.0 - spread / (self.hysteresis * self.max_distance)), 2)
        return FusedTrack(fid, tuple(sorted(m.id for m in members)), lat, lon, alt, confidence,
                          1.0 / math.sqrt(total))


# ---- the service -------------------------------------------------------------------------


def _fused_entity(f: FusedTrack) -> pb.Entity:
    return make_entity(f.id, pb.ENTITY_TYPE_TRACK,
                       fusion=pb.FusionComponent(source_ids=f.source_ids, fused_lat=f.lat, fused_lon=f.lon,
                                                 confidence=f.confidence),
                       position=pb.PositionComponent(lat=f.lat, lon=f.lon, alt=f.alt))


class Fusion(Service):
    """Correlates tracks across sensors and maintains the fused entities."""

    name = "fusion"

    def __init__(self, store: str = DEFAULT_ADDR, *, max_distance: float = 500.0, hysteresis: float = 1.5,
                 sigmas: Mapping[str, float] | None = None, interval: float = 0.5,
                 client: StoreClient | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(store, client=client, backoff=backoff)
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.correlator = Correlator(max_distance, hysteresis, sigmas)
        self.interval = float(interval)
        #: fused id -> what we last wrote (source ids, lat, lon, alt, confidence)
        self._written: dict[str, tuple] = {}
        self._warned: set[str] = set()
        self._ready = False
        self.stream = None
        self.last_pass: PassResult | None = None
        # Passes and event handling take turns: a pass's writes must not land after a
        # cascade delete that happened while they were in flight.
        self._lock = asyncio.Lock()

    # ---- reading tracks -----------------------------------------------------------

    def ingest(self, entity: pb.Entity) -> list[str]:
        """Takes in one entity as read; returns fused ids to delete (cascade: a source lost
        its position). Fused entities are adopted, others without a source ignored."""
        fusion = read_component(entity, FUSION, pb.FusionComponent, self.log)
        if fusion is not None:
            if entity.id not in self.correlator.groups:
                self.correlator.adopt(entity.id, fusion.source_ids)
            return []
        source = read_component(entity, SOURCE, pb.SourceComponent, self.log)
        position = read_component(entity, POSITION, pb.PositionComponent, self.log)
        if source is None or not source.sensor_type or position is None:
            return self.correlator.remove(entity.id) if entity.id in self.correlator.tracks else []
        if not valid_position(position.lat, position.lon) or not math.isfinite(position.alt):
            if entity.id not in self._warned:
                self._warned.add(entity.id)
                self.event(logging.WARNING, "ignoring track with a non-finite or out-of-range position",
                           entity_id=entity.id, lat=position.lat, lon=position.lon, alt=position.alt)
            self.counters["invalid_positions"] += 1
            return []  # the update is ignored: the last valid position (if any) stands
        self._warned.discard(entity.id)
        self.correlator.upsert(Obs(entity.id, source.sensor_type, position.lat, position.lon, position.alt,
                                   source.sensor_id))
        return []

    def forget(self, entity_id: str) -> list[str]:
        """A DELETED event: a source's fused entities go (cascade); a fused one is forgotten."""
        self._written.pop(entity_id, None)
        self._warned.discard(entity_id)
        return self.correlator.remove(entity_id)

    # ---- main ----------------------------------------------------------------------

    async def _snapshot(self) -> int:
        """Lists the tracks (a complete picture) and returns the seq to follow changes from."""
        async with self._lock:
            return await self._take_snapshot()

    async def _take_snapshot(self) -> int:
        self._ready = False
        self.correlator.tracks.clear()
        self._written.clear()
        while True:
            try:
                info = await self.client.wait_ready()
                entities = await self.client.list(pb.ENTITY_TYPE_TRACK)
                break
            except StoreUnavailableError:
                continue
        for entity in entities:
            self.ingest(entity)
            if FUSION in entity.components:
                self._written[entity.id] = None  # exists; rewrite on the first pass
        self._ready = True
        self.event(logging.INFO, "snapshot", tracks=len(self.correlator.tracks),
                   fused=len(self.correlator.groups), seq=info.seq)
        return info.seq

    async def _main(self) -> None:
        c = self.correlator
        self.event(logging.INFO, "fusing", max_distance_m=c.max_distance, hysteresis=c.hysteresis,
                   sigmas=",".join(f"{k}={v:g}" for k, v in sorted(c.sigmas.items())), interval_s=self.interval)
        seq = await self._snapshot()
        self.stream = self.client.watch(pb.ENTITY_TYPE_TRACK, since_seq=seq, components=[POSITION, SOURCE, FUSION],
                                        on_reset=self._snapshot)
        passes = asyncio.create_task(self._pass_loop(), name="fusion-passes")
        try:
            async for ev in self.stream:
                try:
                    await self.handle(ev)
                except StoreUnavailableError:
                    self.stream.nack()
        finally:
            passes.cancel()
            await asyncio.gather(passes, return_exceptions=True)

    async def handle(self, ev: store_pb2.EntityEvent) -> None:
        async with self._lock:
            await self._handle(ev)

    async def _handle(self, ev: store_pb2.EntityEvent) -> None:
        if ev.type == store_pb2.EVENT_TYPE_DELETED:
            doomed = self.forget(ev.entity.id)
            if doomed:
                self.event(logging.INFO, "source track gone: deleting its fused track", entity_id=ev.entity.id,
                           fused=",".join(doomed))
            await self._delete(doomed, "cascade")
            return
        self.counters["events"] += 1
        await self._delete(self.ingest(ev.entity), "cascade")

    async def _delete(self, fids: Iterable[str], why: str) -> None:
        for fid in fids:
            self._written.pop(fid, None)
            try:
                await self.client.delete(fid)
            except NotFoundError:
                continue
            self.counters["deleted_" + why] += 1
            self.event(logging.INFO, "fused track deleted", fused=fid, reason=why)

    async def _pass_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._ready:
                continue
            try:
                async with self._lock:
                    await self.run_pass()
            except StoreUnavailableError:
                self.counters["pass_failed"] += 1
                await self.client.wait_ready()

    async def run_pass(self) -> PassResult:
        """One correlation pass, and the writes and deletes it calls for (callers hold the
        lock when events are being handled concurrently)."""
        result = self.correlator.correlate()
        self.last_pass = result
        self.counters["passes"] += 1
        # Dissolved groups, and fused entities in the store that no group stands for.
        orphans = [fid for fid in self._written if fid not in self.correlator.groups and fid not in result.removed]
        await self._delete(result.removed, "dissolved")
        await self._delete(orphans, "orphan")
        writes = []
        for fid, f in result.fused.items():
            state = (f.source_ids, round(f.lat, 9), round(f.lon, 9), round(f.alt, 3), f.confidence)
            if self._written.get(fid) != state:
                writes.append((_fused_entity(f), state, fid not in self._written))
        if writes:
            summary = await self.client.publish([w[0] for w in writes])
            if summary.rejected:
                self.counters["rejected"] += summary.rejected
                self.event(logging.WARNING, "store rejected fused tracks", rejected=summary.rejected,
                           first_error=summary.errors[0] if summary.errors else "")
            for entity, state, new in writes:
                self._written[entity.id] = state
                if new:
                    self.counters["fused_created"] += 1
                    self.event(logging.INFO, "fused track", fused=entity.id, sources=",".join(state[0]),
                               confidence=state[4])
            self.counters["writes"] += len(writes)
        return result
