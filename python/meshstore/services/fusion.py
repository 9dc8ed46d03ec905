"""fusion: one fused track for the tracks different sensors report of the same target.

Correlation (``Correlator``, no I/O, in the Rust core: ``meshstore._core.Correlator``; a
pass every ``interval`` seconds):

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

The service watches TRACK entities projected to position, source and fusion, one batch
message at a time: the core decodes each batch and takes its events in without I/O (no
Python object per event). It skips those that cannot change its output: an entity whose
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
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from meshstore import _core
from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient, StoreUnavailableError
from meshstore.components import FUSION, POSITION, SOURCE
from meshstore.errors import NotFoundError
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from meshstore.services import Service

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


class Obs(NamedTuple):
    """A source track as fusion sees it."""

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
    return _core.distance_m(lat1, lon1, lat2, lon2)


def fused_id(source_ids: Iterable[str]) -> str:
    """``fused-`` + 16 hex digits of sha1 over the sorted ids: the same set, the same id."""
    return _core.fused_id(list(source_ids))


def candidate_pairs_grid(tracks: Sequence[Obs], max_distance: float) -> list[tuple[float, int, int]]:
    """Every (distance, i, j), i < j, of tracks of different sensor types within
    ``max_distance``, sorted; through the grid (3x3 neighbourhood per track)."""
    return _core.candidate_pairs([(t.sensor_type, t.lat, t.lon) for t in tracks], max_distance)


def candidate_pairs_brute(tracks: Sequence[Obs], max_distance: float) -> list[tuple[float, int, int]]:
    """The all-pairs reference of ``candidate_pairs_grid`` (same output, O(n^2))."""
    return _core.candidate_pairs([(t.sensor_type, t.lat, t.lon) for t in tracks], max_distance, brute=True)


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


@dataclass
class PassResult:
    """A correlation pass: the fused ids it (re)computed (the only ones that can differ
    from before it), the fused ids it dissolved, the candidate pairs it looked at.
    ``fused``: every fused track after it, from ``Correlator.correlate``; the service's
    passes do not gather them (``Correlator.fused`` has them)."""

    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    candidates: int = 0
    full: bool = False
    fused: dict[str, FusedTrack] | None = None


class Correlator:
    """Fusion's state and rules without I/O: source tracks in, fused tracks out. The
    state and the passes live in the Rust core (``core``); this is its Python face, in
    ``Obs`` and ``FusedTrack``."""

    def __init__(self, max_distance: float = 500.0, hysteresis: float = 1.5,
                 sigmas: Mapping[str, float] | None = None, default_sigma: float = DEFAULT_SIGMA) -> None:
        self.sigmas = dict(DEFAULT_SIGMAS if sigmas is None else sigmas)
        try:
            max_distance, hysteresis = float(max_distance), float(hysteresis)
        except (TypeError, ValueError):
            raise ValueError(f"max distance and hysteresis must be numbers, got {max_distance!r}, {hysteresis!r}") from None
        self.core = _core.Correlator(max_distance, hysteresis, self.sigmas, float(default_sigma))
        self.max_distance = max_distance
        self.hysteresis = hysteresis

    def upsert(self, obs: Obs) -> None:
        self.core.upsert(*obs)

    def remove(self, track_id: str) -> list[str]:
        """Forgets a source track; returns the fused ids built on it (now dissolved)."""
        return self.core.remove(track_id)

    def adopt(self, fid: str, source_ids: Iterable[str]) -> None:
        """Takes over a fused entity found in the store (a restart); the next pass keeps it
        if its sources are still there and close, else dissolves it."""
        self.core.adopt(fid, list(source_ids))

    def clear_tracks(self) -> None:
        """Forgets every source track (a snapshot follows). The groups stay: the next pass
        is a full one and checks them all."""
        self.core.clear_tracks()

    def correlate(self, full: bool = False, brute: bool = False) -> PassResult:
        """One pass. Incremental unless ``full`` (or the first after ``clear_tracks``): the
        same result, from the groups and free tracks touched since the last pass only (see
        the module's docstring). ``brute``: a full pass with all-pairs candidates."""
        changed, removed, candidates, full = self.core.correlate(full, brute)
        return PassResult(changed, removed, candidates, full, self.fused)

    @property
    def tracks(self) -> dict[str, Obs]:
        return {t[0]: Obs(*t) for t in self.core.tracks()}

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Fused id -> its source ids (sorted), in the order the groups formed or were adopted."""
        return {fid: tuple(ids) for fid, ids in self.core.groups()}

    @property
    def fused(self) -> dict[str, FusedTrack]:
        """Fused id -> its fused track as of the last pass."""
        return {f[0]: FusedTrack(*f) for f in self.core.fused()}


# ---- the service -------------------------------------------------------------------------


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
        #: The core's intake and write bookkeeping (what was seen, written, owed).
        self._feed = self.correlator.core
        self.interval = float(interval)
        #: fused ids to delete -> why (kept until the store confirms)
        self._doomed: dict[str, str] = {}
        self._ready = False
        self.stream = None
        self.last_pass: PassResult | None = None
        # A pass's writes and the deletes take turns: a publish in flight must not land
        # after the delete of a fused entity it carries.
        self._lock = asyncio.Lock()

    # ---- reading tracks -----------------------------------------------------------

    def take_batch(self, batch: bytes) -> None:
        """Takes in one message of the batched watch (an encoded EntityEventBatch; no
        I/O); cascade deletes are queued. One that does not parse is logged and skipped,
        whole: the core decodes a batch before it takes anything in."""
        try:
            counts, cascades, notices, _ = self._feed.take_batch(batch)
        except ValueError as exc:
            self.counters["bad_batches"] += 1
            self.event(logging.ERROR, "watch batch does not parse: skipped", error=str(exc), size=len(batch))
            return
        for key, n in zip(("events", "skipped_echo", "skipped_unchanged", "invalid_positions"), counts):
            if n:
                self.counters[key] += n
        for source, fid in cascades:
            self.event(logging.DEBUG, "source track gone: deleting its fused track", entity_id=source, fused=fid)
            self._doomed.setdefault(fid, "cascade")
        self._report(notices)

    def take(self, ev: store_pb2.EntityEvent) -> None:
        """Takes in one watch event (``take_batch`` of a batch of one)."""
        self.take_batch(store_pb2.EntityEventBatch(events=[ev]).SerializeToString())

    def take_listed(self, entity: pb.Entity) -> None:
        """Takes in one entity of a listing: a fused one is adopted (and rewritten by the
        next pass), a source track taken in."""
        self._report(self._feed.take_listed(entity.SerializeToString()))

    def _report(self, notices: list[tuple]) -> None:
        for kind, entity_id, *about in notices:
            if kind == "position":
                lat, lon, alt = about
                self.event(logging.WARNING, "ignoring track with a non-finite or out-of-range position",
                           entity_id=entity_id, lat=lat, lon=lon, alt=alt)
            else:
                key, expected, problem = about
                self.event(logging.WARNING, "ignoring component of unexpected type", entity_id=entity_id, key=key,
                           expected=expected, problem=problem)

    # ---- main ----------------------------------------------------------------------

    async def _snapshot(self) -> int:
        """Lists the tracks (a complete picture) and returns the seq to follow changes from."""
        async with self._lock:
            return await self._take_snapshot()

    async def _take_snapshot(self) -> int:
        self._ready = False
        self._feed.reset()
        self._doomed.clear()
        while True:
            try:
                info = await self.client.wait_ready()
                entities = await self.client.list(pb.ENTITY_TYPE_TRACK)
                break
            except StoreUnavailableError:
                continue
        for entity in entities:
            self.take_listed(entity)
        self._ready = True
        self.event(logging.INFO, "snapshot", tracks=self._feed.track_count, fused=self._feed.group_count,
                   seq=info.seq)
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
            async for batch in self.stream.batches():
                self.take_batch(batch)
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
            changed, removed, candidates, full, orphans = self._feed.run_pass()
            correlated = time.perf_counter()
            result = self.last_pass = PassResult(changed, removed, candidates, full)
            self.counters["passes"] += 1
            for fid in removed:
                self._doomed.setdefault(fid, "dissolved")
            for fid in orphans:  # fused entities of the listing that no group stands for
                self._doomed.setdefault(fid, "orphan")
            await self._delete_doomed()
            written = await self._write_owed()
            self.event(logging.DEBUG, "pass", full=full, groups=self._feed.group_count, changed=len(changed),
                       dissolved=len(removed), written=written, correlate_ms=round((correlated - started) * 1e3, 1),
                       total_ms=round((time.perf_counter() - started) * 1e3, 1))
            return result

    async def _delete_doomed(self) -> None:
        while self._doomed:
            fid, why = next(iter(self._doomed.items()))
            self._feed.deleted(fid)
            try:
                await self.client.delete(fid)
            except NotFoundError:
                pass
            else:
                self.counters["deleted_" + why] += 1
                self.event(logging.DEBUG, "fused track deleted", fused=fid, reason=why)
            self._doomed.pop(fid, None)

    async def _write_owed(self) -> int:
        """One publish of the fused tracks owed that differ from what was written."""
        writes = self._feed.prepare_writes()
        if not writes:
            return 0
        try:
            summary = await self.client.publish(writes)
        except BaseException:
            self._feed.abort_writes()
            raise
        if summary.rejected:
            self.counters["rejected"] += summary.rejected
            self.event(logging.WARNING, "store rejected fused tracks", rejected=summary.rejected,
                       first_error=summary.errors[0] if summary.errors else "")
        now = time.time_ns()
        created, stamps = self._feed.commit_writes()
        if created:
            self.counters["fused_created"] += len(created)
            if self.log.isEnabledFor(logging.DEBUG):
                for fid in created:
                    f = FusedTrack(*self._feed.fused_track(fid))
                    self.event(logging.DEBUG, "fused track", fused=fid, sources=",".join(f.source_ids),
                               confidence=f.confidence)
        # The lag of an answer to a sensor write: from the newest source position in it.
        for stamp in stamps:
            self.lag.since(stamp, now)
        self.counters["writes"] += len(writes)
        return len(writes)
