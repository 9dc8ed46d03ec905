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
- Groups form greedily, closest candidates first (ties by track id): two free tracks
  start a group; a free track joins a group that has no track of its sensor type if it
  is within the distance of every member. Each group holds at most one track per sensor
  type; only free tracks are candidates, so a standing group never grows (its id would
  change under it).
- An existing group is kept while its tracks stay within ``hysteresis x max_distance``
  of each other (1.5x by default): a pair hovering around the threshold does not flap.
  Beyond it (or when a member has no valid position any more) the group is dissolved
  and its fused entity deleted.
- A fused entity is ``fused-<sha1 of the sorted source ids, 16 hex>`` (TRACK) with
  ``FusionComponent{source_ids, fused_lat, fused_lon, confidence}`` and a
  ``PositionComponent``: the mean of the sources' positions weighted by 1/sigma^2 of each
  sensor type's accuracy (e.g. eo 10 m, radar 50 m). Confidence is
  1 - (largest member distance / (hysteresis x max_distance)), floored at 0.05.

Passes are incremental: a pass re-checks and re-fuses only the groups with a track
touched (moved, added, removed) since the last pass, and looks for new pairs only around
the free tracks touched or freed since then (a persistent grid of every track, its
cells sized for a latitude bound that only grows). That gives exactly the full pass's
result (``correlate(full=True)``): two tracks free at the end of a pass have no
candidate pair (greedy would have grouped them), so every candidate pair of the next
pass has a touched or freed track; untouched groups would pass their checks again and
fuse to the same point (members are fused in id order). Only groups adopted from the
store can overlap others; they are checked after every standing group, in adoption
order, as the full pass does.

The service watches TRACK entities projected to position, source and fusion. It takes
events in without I/O and skips those that cannot change its output: an entity whose
position and source show the dots it has already taken in (another service's write to
a key it does not read), and any fused entity (the echo of its own write; fused entities
are read only from the snapshot, so a late echo of a fused entity it has since deleted
is never adopted back). A source track that is deleted or expires (DELETED event)
cascade-deletes the fused entities built on it at once. Tracks without a position or a
source are not correlated. A position that is not finite (or out of range) is ignored
with a warning, once per track: the track keeps its last valid position, if it had one
(the store refuses NaN positions, but one can arrive under a type URL the store does
not validate). At start (and on a new store) it lists the tracks first (a complete
snapshot), adopts the fused entities it finds (restart), then follows the changes since
that snapshot; the first pass after a snapshot is a full one, and deletes fused entities
whose sources are gone.

Writes: after each pass, one publish of the fused tracks that differ from what it last
wrote (fusion is the only writer of fused entities: whole entities, no base versions).
Deletes go first, and a pass's publish and the deletes take turns (a lock), so a fused
entity deleted because its source went is never written back by a publish that was in
flight. A fused entity deleted by someone else while its group stands is written again
by the next pass. What fails because the store went away stays queued for the next pass.
``stats()`` reports the lag from the newest source position a fused write answers (its
version's HLC time) to that write, p50/p99.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient, StoreUnavailableError
from meshstore.components import FUSION, POSITION, SOURCE, EntityEncoder
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
    "PassResult",
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


class Obs(NamedTuple):
    """A source track as fusion sees it. (Tuples: fusion makes one per position update.)"""

    id: str
    sensor_type: str
    lat: float
    lon: float
    alt: float = 0.0
    sensor_id: str = ""


class FusedTrack(NamedTuple):
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


class _Cells:
    """A grid's geometry: rows of ``max_distance`` in latitude; columns (a whole number
    around the globe) never narrower than ``max_distance`` at latitudes up to ``bound``."""

    __slots__ = ("col_offsets", "cols", "height", "width")

    def __init__(self, max_distance: float, bound: float) -> None:
        self.height = max_distance / M_PER_DEG
        c = math.cos(math.radians(bound))
        # The equirectangular distance scales longitude by cos(mean latitude) >= c, so pairs
        # within max_distance are within max_distance / (M_PER_DEG * c) degrees of longitude.
        width = max_distance / (M_PER_DEG * c) if c > 1e-9 else 360.0
        self.cols = max(1, int(360.0 // width)) if width < 360.0 else 1
        self.width = 360.0 / self.cols
        # The 3x3 neighbourhood's column offsets (fewer with fewer than 3 columns).
        self.col_offsets = sorted({d % self.cols for d in (-1, 0, 1)})

    def key(self, lat: float, lon: float) -> tuple[int, int]:
        return math.floor((lat + 90.0) / self.height), math.floor((lon + 180.0) / self.width) % self.cols

    def around(self, key: tuple[int, int]) -> list[tuple[int, int]]:
        row, col = key
        cols = self.cols
        return [(row + dr, (col + dc) % cols) for dr in (-1, 0, 1) for dc in self.col_offsets]


def candidate_pairs_grid(tracks: Sequence[Obs], max_distance: float) -> list[tuple[float, int, int]]:
    """Every (distance, i, j), i < j, of tracks of different sensor types within
    ``max_distance``, sorted; through the grid (3x3 neighbourhood per track)."""
    if max_distance <= 0 or len(tracks) < 2:
        return []
    grid = _Cells(max_distance, max(abs(t.lat) for t in tracks))
    cells: dict[tuple[int, int], list[int]] = {}
    keys = []
    for i, t in enumerate(tracks):
        key = grid.key(t.lat, t.lon)
        keys.append(key)
        cells.setdefault(key, []).append(i)
    out = []
    dist = distance_m
    cols, col_offsets = grid.cols, grid.col_offsets
    for i, t in enumerate(tracks):
        row, col = keys[i]
        kind, lat, lon = t.sensor_type, t.lat, t.lon
        # The 3x3 neighbourhood, inline (the hot loop: no list of cells per track).
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


class _TrackGrid:
    """Every track's id by grid cell, kept as tracks come, move and go: the incremental
    pass's neighbour search. Its cells are sized for a latitude bound (whole degrees)
    that only grows; a track beyond it rebuilds the grid for the new bound (wider cells,
    still correct for every track below it)."""

    def __init__(self, max_distance: float) -> None:
        self.max_distance = max_distance
        self.bound = 0.0
        self.geometry = _Cells(max_distance, self.bound)
        self.cells: dict[tuple[int, int], set[str]] = {}
        self.where: dict[str, tuple[int, int]] = {}

    def place(self, t: Obs, tracks: Mapping[str, Obs]) -> None:
        """Puts ``t`` (already in ``tracks``) in its cell."""
        if abs(t.lat) > self.bound:
            self.bound = min(90.0, float(math.ceil(abs(t.lat))))
            self.geometry = _Cells(self.max_distance, self.bound)
            self.cells.clear()
            self.where.clear()
            for u in tracks.values():
                self._put(u.id, self.geometry.key(u.lat, u.lon))
            return
        key = self.geometry.key(t.lat, t.lon)
        if self.where.get(t.id) != key:
            self.drop(t.id)
            self._put(t.id, key)

    def _put(self, track_id: str, key: tuple[int, int]) -> None:
        self.where[track_id] = key
        self.cells.setdefault(key, set()).add(track_id)

    def drop(self, track_id: str) -> None:
        key = self.where.pop(track_id, None)
        if key is not None:
            cell = self.cells[key]
            cell.discard(track_id)
            if not cell:
                del self.cells[key]


# ---- the correlator ------------------------------------------------------------------------


@dataclass
class PassResult:
    """A correlation pass: every fused track now, the fused ids this pass (re)computed
    (the only ones that can differ from before it), and the fused ids it dissolved."""

    fused: dict[str, FusedTrack] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    candidates: int = 0
    full: bool = False


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
        #: fused id -> its source ids (sorted), in the order the groups formed or were adopted
        self.groups: dict[str, tuple[str, ...]] = {}
        #: fused id -> its fused track as of the last pass
        self.fused: dict[str, FusedTrack] = {}
        #: source id -> its group (exact for the groups a pass kept; adopted ones may overlap)
        self._member_of: dict[str, str] = {}
        self._grid = _TrackGrid(self.max_distance)
        # Since the last pass: tracks upserted or removed, and members of groups dissolved
        # by a removal (free again); groups adopted; whether the next pass must be full.
        self._touched: set[str] = set()
        self._adopted: set[str] = set()
        self._full_next = False

    # ---- input ---------------------------------------------------------------------

    def upsert(self, obs: Obs) -> None:
        if self.tracks.get(obs.id) == obs:
            return
        self.tracks[obs.id] = obs
        self._grid.place(obs, self.tracks)
        self._touched.add(obs.id)

    def remove(self, track_id: str) -> list[str]:
        """Forgets a source track; returns the fused ids built on it (now dissolved)."""
        if self.tracks.pop(track_id, None) is not None:
            self._grid.drop(track_id)
            self._touched.add(track_id)
        fid = self._member_of.get(track_id)
        if fid is None:
            return []
        self._touched.update(self.groups[fid])
        self._dissolve(fid)
        return [fid]

    def adopt(self, fid: str, source_ids: Iterable[str]) -> None:
        """Takes over a fused entity found in the store (a restart); the next pass keeps it
        if its sources are still there and close, else dissolves it."""
        ids = tuple(sorted(set(source_ids)))
        if fid in self.groups:
            return
        self.groups[fid] = ids
        self._adopted.add(fid)
        for sid in ids:
            self._member_of.setdefault(sid, fid)

    def clear_tracks(self) -> None:
        """Forgets every source track (a snapshot follows). The groups stay: the next pass
        is a full one and checks them all."""
        self.tracks.clear()
        self._grid = _TrackGrid(self.max_distance)
        self._touched.clear()
        self._full_next = True

    def _dissolve(self, fid: str) -> None:
        self.fused.pop(fid, None)
        for sid in self.groups.pop(fid, ()):
            if self._member_of.get(sid) == fid:
                del self._member_of[sid]

    # ---- a pass --------------------------------------------------------------------

    def _spread(self, members: Sequence[Obs]) -> float:
        """The largest distance between two members (in the given order: rounding)."""
        if len(members) == 2:  # the common case, without a generator
            a, b = members
            return distance_m(a.lat, a.lon, b.lat, b.lon)
        return max((distance_m(a.lat, a.lon, b.lat, b.lon)
                    for k, a in enumerate(members) for b in members[k + 1:]), default=0.0)

    def correlate(self, full: bool = False, brute: bool = False) -> PassResult:
        """One pass. Incremental unless ``full`` (or the first after ``clear_tracks``): the
        same result, from the groups and free tracks touched since the last pass only (see
        the module's docstring). ``brute``: a full pass with all-pairs candidates."""
        full = full or brute or self._full_next
        self._full_next = False
        touched, self._touched = self._touched, set()
        adopted, self._adopted = self._adopted, set()
        result = PassResult(full=full)
        if full:
            check = list(self.groups)
            self._member_of.clear()  # rebuilt from the groups kept
            self.fused.clear()
        else:
            check = list({self._member_of[t] for t in touched if t in self._member_of} - adopted)
            if adopted:
                check += [fid for fid in self.groups if fid in adopted]  # after the others, in order
        kept, freed = self._check(check, result)
        if full:
            free = [t for tid, t in sorted(self.tracks.items()) if tid not in self._member_of]
            found = (candidate_pairs_brute if brute else candidate_pairs_grid)(free, self.max_distance)
            pairs = [(free[i], free[j]) for _, i, j in found]
        else:
            pairs = self._pairs_near(touched | freed)
        result.candidates = len(pairs)
        for members in self._greedy(pairs):
            ids = tuple(sorted(m.id for m in members))
            fid = fused_id(ids)
            self.groups[fid] = ids
            for sid in ids:
                self._member_of[sid] = fid
            kept[fid] = None
        tracks = self.tracks
        for fid, spread in kept.items():
            self.fused[fid] = self.fuse(fid, [tracks[sid] for sid in self.groups[fid]], spread)
        result.changed = list(kept)
        result.fused = dict(self.fused)
        return result

    def _check(self, fids: Sequence[str], result: PassResult) -> tuple[dict[str, float | None], set[str]]:
        """Keeps each of ``fids`` (in order) whose members are all present, of distinct
        sensor types, within ``hysteresis x max_distance`` of each other and not in a group
        kept before it or not checked (only adopted groups overlap others); dissolves the
        others (into ``result.removed``). Returns the kept ids (-> their spread) and the
        dissolved groups' members."""
        limit = self.hysteresis * self.max_distance
        checking = set(fids)
        kept: dict[str, float | None] = {}
        freed: set[str] = set()
        member_of, groups, tracks = self._member_of, self.groups, self.tracks
        for fid in fids:
            ids = groups[fid]
            members = [tracks.get(sid) for sid in ids]
            ok = len(members) >= 2 and None not in members and len({m.sensor_type for m in members}) == len(members)
            for sid in ids if ok else ():
                g = member_of.get(sid)
                if g is not None and g != fid and (g in kept or g not in checking):
                    ok = False
                    break
            spread = self._spread(members) if ok else math.inf
            if spread > limit:
                self._dissolve(fid)
                result.removed.append(fid)
                freed.update(ids)
                continue
            kept[fid] = spread
            for sid in ids:
                member_of[sid] = fid
        return kept, freed

    def _pairs_near(self, seeds: Iterable[str]) -> list[tuple[Obs, Obs]]:
        """The candidate pairs with a free track of ``seeds`` (through the track grid),
        as the full pass has them: (lower id, higher id), by distance, then ids."""
        tracks, member_of, limit, dist = self.tracks, self._member_of, self.max_distance, distance_m
        cells, where, around = self._grid.cells, self._grid.where, self._grid.geometry.around
        found = set()
        for sid in seeds:
            t = tracks.get(sid)
            if t is None or sid in member_of:
                continue
            for key in around(where[sid]):  # the grid's ``near``, inline: the burst of new tracks runs this
                cell = cells.get(key)
                if not cell:
                    continue
                for uid in cell:
                    if uid == sid or uid in member_of:
                        continue
                    u = tracks[uid]
                    if u.sensor_type == t.sensor_type:
                        continue
                    a, b = (t, u) if sid < uid else (u, t)  # the distance's rounding depends on the order
                    d = dist(a.lat, a.lon, b.lat, b.lon)
                    if d <= limit:
                        found.add((d, a.id, b.id))
        return [(tracks[a], tracks[b]) for _, a, b in sorted(found)]

    def _greedy(self, pairs: Iterable[tuple[Obs, Obs]]) -> list[list[Obs]]:
        """New groups from candidate pairs of free tracks, closest first (module docstring)."""
        groups: list[list[Obs]] = []
        owner: dict[str, int] = {}
        for a, b in pairs:
            ga, gb = owner.get(a.id), owner.get(b.id)
            if ga is None and gb is None:
                owner[a.id] = owner[b.id] = len(groups)
                groups.append([a, b])
                continue
            if (ga is None) == (gb is None):
                continue  # both grouped already
            g, joiner = (gb, a) if ga is None else (ga, b)
            members = groups[g]
            if any(m.sensor_type == joiner.sensor_type for m in members):
                continue
            if all(distance_m(m.lat, m.lon, joiner.lat, joiner.lon) <= self.max_distance for m in members):
                members.append(joiner)
                owner[joiner.id] = g
        return groups

    def fuse(self, fid: str, members: Sequence[Obs], spread: float | None = None) -> FusedTrack:
        """The weighted (1/sigma^2) mean position of ``members``, given in id order: the
        sums' rounding depends on it, and a group must fuse to the same point whichever
        pass fuses it. ``spread``: their ``_spread`` if already known."""
        ref = members[0].lon
        total = lat = lon = alt = 0.0
        sigmas, default_sigma = self.sigmas, self.default_sigma
        for m in members:
            w = 1.0 / sigmas.get(m.sensor_type, default_sigma) ** 2
            total += w
            lat += w * m.lat
            lon += w * (ref + ((m.lon - ref + 180.0) % 360.0 - 180.0))  # unwrap across the antimeridian
            alt += w * m.alt
        lat, lon, alt = lat / total, lon / total, alt / total
        lon = (lon + 180.0) % 360.0 - 180.0 if not -180.0 <= lon <= 180.0 else lon
        if spread is None:
            spread = self._spread(members)
        confidence = round(max(0.05, 1.0 - spread / (self.hysteresis * self.max_distance)), 2)
        return FusedTrack(fid, tuple(m.id for m in members), lat, lon, alt, confidence, 1.0 / math.sqrt(total))


# ---- the service -------------------------------------------------------------------------


def _dots(entity: pb.Entity) -> tuple:
    """The dot (node, incarnation, counter) of the position and the source as shown: a
    value's dot names that one write, so the same dots mean the same values."""
    versions = entity.versions
    p, s = versions.get(POSITION), versions.get(SOURCE)
    return (None if p is None else (p.node, p.incarnation, p.counter),
            None if s is None else (s.node, s.incarnation, s.counter))


class Fusion(Service):
    """Correlates tracks across sensors and maintains the fused entities."""

    name = "fusion"

    def __init__(self, store: str = DEFAULT_ADDR, *, max_distance: float = 500.0, hysteresis: float = 1.5,
                 sigmas: Mapping[str, float] | None = None, interval: float = 0.25,
                 client: StoreClient | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(store, client=client, backoff=backoff)
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.correlator = Correlator(max_distance, hysteresis, sigmas)
        self.interval = float(interval)
        #: fused id -> what we last wrote (source ids, lat, lon, alt, confidence); None:
        #: found in the snapshot
        self._written: dict[str, tuple | None] = {}
        #: fused ids whose fused track the store may not hold as it is now
        self._unsynced: set[str] = set()
        #: fused ids to delete -> why (kept until the store confirms)
        self._doomed: dict[str, str] = {}
        #: fused id -> the newest source position stamp its last write answered (lag)
        self._answered: dict[str, int] = {}
        #: track id -> the dots of its position and source as taken in
        self._seen: dict[str, tuple] = {}
        #: source track id -> its position's HLC physical time (Unix ns) as taken in
        self._stamps: dict[str, int] = {}
        self._warned: set[str] = set()
        self._encoder = EntityEncoder(pb.ENTITY_TYPE_TRACK)
        self._ready = False
        self.stream = None
        self.last_pass: PassResult | None = None
        # A pass's writes and the deletes take turns: a publish in flight must not land
        # after the delete of a fused entity it carries.
        self._lock = asyncio.Lock()

    # ---- reading tracks -----------------------------------------------------------

    def take(self, ev: store_pb2.EntityEvent) -> None:
        """Takes in one watch event (no I/O); cascade deletes are queued."""
        entity = ev.entity
        if ev.type == store_pb2.EVENT_TYPE_DELETED:
            doomed = self.forget(entity.id)
            if doomed:
                self.event(logging.DEBUG, "source track gone: deleting its fused track", entity_id=entity.id,
                           fused=",".join(doomed))
            self._doom(doomed, "cascade")
            return
        counters = self.counters
        counters["events"] += 1
        if FUSION in entity.components:
            counters["skipped_echo"] += 1
            return
        dots = _dots(entity)
        seen = self._seen.get(entity.id)
        if seen == dots:
            counters["skipped_unchanged"] += 1
            return
        self._seen[entity.id] = dots
        # A moved track whose source is the one taken in before: not parsed again.
        known = self.correlator.tracks.get(entity.id) if seen is not None and seen[1] == dots[1] else None
        doomed = self.ingest(entity, known)
        if doomed:
            self._doom(doomed, "cascade")

    def ingest(self, entity: pb.Entity, known: Obs | None = None) -> list[str]:
        """Takes in one entity as read; returns fused ids to delete (cascade: a source lost
        its position). Fused entities are adopted, others without a source ignored.
        ``known``: the entity as taken in before, if its source has not changed since."""
        fusion = read_component(entity, FUSION, pb.FusionComponent, self.log)
        if fusion is not None:
            if entity.id not in self.correlator.groups:
                self.correlator.adopt(entity.id, fusion.source_ids)
            return []
        if known is not None:
            sensor_type, sensor_id = known.sensor_type, known.sensor_id
        else:
            source = read_component(entity, SOURCE, pb.SourceComponent, self.log)
            sensor_type, sensor_id = (source.sensor_type, source.sensor_id) if source is not None else ("", "")
        position = read_component(entity, POSITION, pb.PositionComponent, self.log)
        entity_id = entity.id
        if not sensor_type or position is None:
            self._stamps.pop(entity_id, None)
            return self.correlator.remove(entity_id) if entity_id in self.correlator.tracks else []
        lat, lon, alt = position.lat, position.lon, position.alt
        if not valid_position(lat, lon) or not math.isfinite(alt):
            if entity_id not in self._warned:
                self._warned.add(entity_id)
                self.event(logging.WARNING, "ignoring track with a non-finite or out-of-range position",
                           entity_id=entity_id, lat=lat, lon=lon, alt=alt)
            self.counters["invalid_positions"] += 1
            return []  # the update is ignored: the last valid position (if any) stands
        if self._warned:
            self._warned.discard(entity_id)
        self.correlator.upsert(Obs(entity_id, sensor_type, lat, lon, alt, sensor_id))
        version = entity.versions.get(POSITION)
        self._stamps[entity_id] = version.physical if version is not None else 0
        return []

    def forget(self, entity_id: str) -> list[str]:
        """A DELETED event: a source's fused entities go (cascade); a fused one whose group
        stands is written again by the next pass. (A queued delete of it stays: this may be
        the echo of an earlier delete, the fused entity written and doomed again since.)"""
        for known in (self._written, self._answered, self._seen, self._stamps):
            known.pop(entity_id, None)
        self._warned.discard(entity_id)
        if entity_id in self.correlator.groups:
            self._unsynced.add(entity_id)
        return self.correlator.remove(entity_id)

    def _encode(self, f: FusedTrack) -> bytes:
        return self._encoder.encode(
            f.id, fusion=pb.FusionComponent(source_ids=f.source_ids, fused_lat=f.lat, fused_lon=f.lon,
                                            confidence=f.confidence),
            position=pb.PositionComponent(lat=f.lat, lon=f.lon, alt=f.alt))

    def _doom(self, fids: Iterable[str], why: str) -> None:
        for fid in fids:
            self._doomed.setdefault(fid, why)

    # ---- main ----------------------------------------------------------------------

    async def _snapshot(self) -> int:
        """Lists the tracks (a complete picture) and returns the seq to follow changes from."""
        async with self._lock:
            return await self._take_snapshot()

    async def _take_snapshot(self) -> int:
        self._ready = False
        self.correlator.clear_tracks()
        for known in (self._written, self._unsynced, self._doomed, self._answered, self._seen, self._stamps):
            known.clear()
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
            else:
                self._seen[entity.id] = _dots(entity)
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
                self.take(ev)
                if self._doomed:
                    await self._cascade()
        finally:
            passes.cancel()
            await asyncio.gather(passes, return_exceptions=True)

    async def _cascade(self) -> None:
        """Deletes what is doomed now (after a publish in flight), not at the next pass."""
        try:
            async with self._lock:
                await self._delete_doomed()
        except StoreUnavailableError:
            self.counters["delete_failed"] += 1  # still doomed: the next pass retries

    async def _pass_loop(self) -> None:
        """A pass every ``interval`` from start to start (a pass that takes longer is
        followed by the next at once): the time a pass takes does not add to the lag."""
        while True:
            started = time.monotonic()
            if self._ready:
                try:
                    await self.run_pass()
                except StoreUnavailableError:
                    self.counters["pass_failed"] += 1
                    await self.client.wait_ready()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def run_pass(self) -> PassResult:
        """One correlation pass, then the store brought up to date: deletes first, then one
        publish of the fused tracks that differ from what was written. StoreUnavailableError
        leaves what was not done queued for the next pass."""
        async with self._lock:
            started = time.perf_counter()
            result = self.correlator.correlate()
            correlated = time.perf_counter()
            self.last_pass = result
            self.counters["passes"] += 1
            self._doom(result.removed, "dissolved")
            if result.full:
                # Fused entities of the snapshot that no group stands for (ones that did not parse).
                self._doom([fid for fid in self._written if fid not in self.correlator.groups], "orphan")
            self._unsynced.update(result.changed)
            await self._delete_doomed()
            await self._write_unsynced()
            self.event(logging.DEBUG, "pass", full=result.full, groups=len(result.fused), changed=len(result.changed),
                       dissolved=len(result.removed), correlate_ms=round((correlated - started) * 1e3, 1),
                       total_ms=round((time.perf_counter() - started) * 1e3, 1))
            return result

    async def _delete_doomed(self) -> None:
        while self._doomed:
            fid, why = next(iter(self._doomed.items()))
            self._written.pop(fid, None)
            self._answered.pop(fid, None)
            try:
                await self.client.delete(fid)
            except NotFoundError:
                pass
            else:
                self.counters["deleted_" + why] += 1
                self.event(logging.DEBUG, "fused track deleted", fused=fid, reason=why)
            self._doomed.pop(fid, None)

    async def _write_unsynced(self) -> None:
        fused = self.correlator.fused
        batch, self._unsynced = self._unsynced, set()
        writes = []
        for fid in batch:
            f = fused.get(fid)
            if f is None:
                continue  # dissolved since
            state = (f.source_ids, round(f.lat, 9), round(f.lon, 9), round(f.alt, 3), f.confidence)
            if self._written.get(fid) != state:
                writes.append((f, state))
        if not writes:
            return
        try:
            summary = await self.client.publish([self._encode(f) for f, _ in writes])
        except BaseException:
            self._unsynced |= batch
            raise
        if summary.rejected:
            self.counters["rejected"] += summary.rejected
            self.event(logging.WARNING, "store rejected fused tracks", rejected=summary.rejected,
                       first_error=summary.errors[0] if summary.errors else "")
        now = time.time_ns()
        for f, state in writes:
            if f.id not in self._written:
                self.counters["fused_created"] += 1
                if self.log.isEnabledFor(logging.DEBUG):
                    self.event(logging.DEBUG, "fused track", fused=f.id, sources=",".join(f.source_ids),
                               confidence=f.confidence)
            self._written[f.id] = state
            # The lag of an answer to a sensor write: from the newest source position in it.
            stamp = max(self._stamps.get(sid, 0) for sid in f.source_ids)
            if stamp > self._answered.get(f.id, 0):
                self._answered[f.id] = stamp
                self.lag.since(stamp, now)
        self.counters["writes"] += len(writes)
