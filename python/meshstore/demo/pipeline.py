"""The live pipeline demo (``meshstore demo``): a node (a store and its gRPC server,
``meshstore.node.Node``) and every service in one process, and a live table of what
they make of the scenario.

    sensor-sim (eo) ─┐                     ┌─ classifier  (classification, threat)
                     ├─> store (gRPC) <────┼─ task-manager (task, approval requests, timeouts)
    radar-sim ───────┘                     └─ fusion      (fused-* tracks)

The server listens on 127.0.0.1 (port 50051 by default, so ``meshstore approve ID`` from
another terminal reaches it without flags; if the port is taken, an ephemeral one, said
loudly). The first node also serves the web UI and the HTTP API (``http_port``, 8080 by
default, else any free port; its address is printed): the same picture on a map, with
approve and deny buttons. The services are the same classes the ``sensor-sim``, ``classifier``... commands
run, talking to the store over gRPC. Runs until Ctrl-C / SIGTERM or ``duration``, then
prints a summary. ``live=False`` (or a stdout that is not a terminal) prints a status line
every few seconds instead of the table.

Refreshing costs about one watch event per track, not a list: the table and the
status line read a ``Picture`` kept from a watch of the tracks projected on what the
services write (source, classification, threat, task, approval, fusion: never a
sensor's position), coalesced per track and caught up once per ``picture_interval``
(the status line: at each line), whose counts change as tracks do; plus counters
(``Gauges``: the stores' writes per second, the ticks the sims skipped, each service's
lag p50/p99 from its ``stats()``). Only the rows the table shows are read in full. The
final summary lists the store once.

With ``nodes`` > 1 (``meshstore demo --nodes 3``) the store is a mesh of that many
nodes on loopback, each a Node with a relay to every other node; the services
are spread over the nodes (the two sims write to different nodes), and a nodes table shows
each node's view and whether they agree.

The older two-store replication walk-through is still ``python -m meshstore.demo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import re
import signal
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from meshstore.components import APPROVAL, CLASSIFICATION, FUSION, POSITION, SOURCE, TASK, THREAT, VELOCITY
from meshstore.errors import NotFoundError
from meshstore.http.server import HttpListenError
from meshstore.logs import event as log_event
from meshstore.node import Node, NodeOptions
from meshstore.options import StoreOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from meshstore.services import Service, read_component
from meshstore.services.classifier import Classifier, Thresholds
from meshstore.services.fusion import Fusion
from meshstore.services.radar_sim import RadarSim
from meshstore.services.scenario import DEFAULT_BBOX, BBox, Scenario
from meshstore.services.sensor_sim import SensorSim
from meshstore.services.task_manager import TaskManager
from meshstore.store import Store
from meshstore.watcher import Watcher

__all__ = ["DemoConfig", "Gauges", "Picture", "Reading", "Summary", "run_demo", "summarize"]

log = logging.getLogger("meshstore.demo")

APPROVAL_NAMES = {v: k.removeprefix("APPROVAL_STATE_") for k, v in pb.ApprovalState.items()}
THREAT_NAMES = {v: k.removeprefix("THREAT_LEVEL_") for k, v in pb.ThreatLevel.items()}
THREAT_STYLE = {"HIGH": "bold red", "MEDIUM": "yellow", "LOW": "cyan", "NONE": "green"}
#: Rows of the live table (pending approvals and the highest threats first).
MAX_ROWS = 30
APPROVAL_STYLE = {"PENDING": "bold magenta", "APPROVED": "bold green", "DENIED": "red", "TIMED_OUT": "yellow"}
#: What the picture reads of a track (its watch is projected on these keys): key -> message type.
PICTURE_KEYS: dict[str, type[Message]] = {
    SOURCE: pb.SourceComponent, CLASSIFICATION: pb.ClassificationComponent, THREAT: pb.ThreatComponent,
    TASK: pb.TaskComponent, APPROVAL: pb.ApprovalComponent, FUSION: pb.FusionComponent,
}


@dataclass
class DemoConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    tracks: int = 12
    rate: float = 2.0
    seed: int = 7
    duration: float | None = None
    live: bool = True
    approval_timeout: float = 30.0
    max_distance: float = 500.0
    radar_noise_m: float = 30.0
    bbox: BBox = field(default_factory=lambda: BBox(*DEFAULT_BBOX))
    speed_min: float = 10.0
    speed_max: float = 600.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    refresh: float = 0.5
    status_every: float = 2.0
    #: The live table's picture is caught up once per this many seconds (the status
    #: line's at each line); the rows it shows are read as they are at each refresh.
    picture_interval: float = 2.0
    nodes: int = 1
    #: The first node's web UI and HTTP API (taken: any free port; None: none).
    http_port: int | None = 8080


@dataclass
class Summary:
    tracks: int = 0
    eo: int = 0
    radar: int = 0
    classified: int = 0
    threats: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    approvals: Counter = field(default_factory=Counter)
    fused: int = 0
    events: int = 0

    def line(self) -> str:
        a = self.approvals
        return (f"tracks={self.tracks} classified={self.classified} pending={a['PENDING']} "
                f"approved={a['APPROVED'] + a['AUTO_APPROVED']} denied={a['DENIED']} timed_out={a['TIMED_OUT']} "
                f"fused={self.fused} events={self.events}")


def _components_view() -> type[Message]:
    """``entity.v1.Entity`` read as its ``components`` entries alone, each kept as its
    encoded bytes (a map entry and ``bytes`` share the length-delimited encoding; the
    other fields are skipped as unknown), as store.v1's PublishRequestView does for
    PublishRequest. Parsing it costs a fraction of decoding the entity."""
    field_type = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="meshstore/demo/picture.proto", package="meshstore.demo",
                                               syntax="proto3")
    proto.message_type.add(name="ComponentsView").field.add(
        name="components", number=3, type=field_type.TYPE_BYTES, label=field_type.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("meshstore.demo.ComponentsView"))


ComponentsView = _components_view()
#: How the ``components`` entry of a fusion begins on the wire: its key, the map entry's
#: field 1 (tag 0x0a, then the length). Fusion rewrites a fused track's fusion at every
#: pass (its position and confidence), but the picture shows only that the track is fused
#: and from which sources (fixed: they name the fused track), so ``fingerprint`` keeps the
#: entry's key alone.
FUSION_ENTRY = bytes([0x0A, len(FUSION)]) + FUSION.encode()


def fingerprint(entity_bytes: bytes) -> tuple[bytes, ...]:
    """What the picture shows of an encoded track, compared without decoding it: its
    components entries as encoded (a fusion's by its key alone, see FUSION_ENTRY)."""
    return tuple(FUSION_ENTRY if entry.startswith(FUSION_ENTRY) else entry
                 for entry in ComponentsView.FromString(entity_bytes).components)


class Track:
    """One track as the picture sees it: the entity last read (projected on
    ``PICTURE_KEYS`` when it came from the watch), each component unpacked when first
    asked for, and the ``fingerprint`` it was read at."""

    __slots__ = ("entity", "fingerprint", "id", "natural", "parts")

    def __init__(self, entity_id: str) -> None:
        self.id = entity_id
        self.natural = _natural(entity_id)
        self.entity = pb.Entity()
        self.fingerprint: tuple[bytes, ...] | None = None
        self.parts: dict[str, Message | None] = {}

    def show(self, entity: pb.Entity, fingerprint: tuple[bytes, ...] | None = None) -> None:
        self.entity, self.fingerprint, self.parts = entity, fingerprint, {}

    def has(self, key: str) -> bool:
        return key in self.entity.components

    def part(self, key: str) -> Message | None:
        """The component under ``key`` (None: absent, or not what it should be, logged)."""
        if key not in self.parts:
            self.parts[key] = read_component(self.entity, key, PICTURE_KEYS[key], log)
        return self.parts[key]

    def priority(self) -> tuple:
        """Pending approvals first, then the highest threats, then by id."""
        approval, threat = self.part(APPROVAL), self.part(THREAT)
        return (not (approval is not None and approval.state == pb.APPROVAL_STATE_PENDING),
                -(threat.level if threat is not None else 0), self.natural)


class Picture:
    """What the services made of the scenario, track by track, and its counts (kept as
    tracks change, not recounted): ``Picture.of(store)`` reads it with one list;
    ``Picture.follow(store, interval)`` keeps it from a watch projected on
    ``PICTURE_KEYS``, ``catch_up()`` applying what arrived, meant to be called once per
    interval. The watch coalesces per track: it holds a track's changes for half an
    interval, and one that fell behind (more changes than its queue holds) catches up
    with each changed track's latest state. So each catch-up costs at most about one
    event per track (two when few change), each compared by its ``fingerprint``, and a
    decode only for the tracks that changed what the picture shows; and what it shows
    is at most about one and a half intervals old. (Caught up more often it gets more
    events, not fresher ones.)"""

    def __init__(self, watcher: Watcher | None = None) -> None:
        self.tracks: dict[str, Track] = {}
        self._watcher = watcher
        self._counts = Summary()

    @classmethod
    def of(cls, store: Store) -> Picture:
        picture = cls()
        for entity in store.list(pb.ENTITY_TYPE_TRACK):
            picture.show(entity.id, entity)
        return picture

    @classmethod
    def follow(cls, store: Store, interval: float) -> Picture:
        return cls(store.watch(pb.ENTITY_TYPE_TRACK, include_existing=True, components=list(PICTURE_KEYS),
                               min_interval=interval / 2))

    def show(self, entity_id: str, entity: pb.Entity, fingerprint: tuple[bytes, ...] | None = None) -> None:
        track = self.tracks.get(entity_id)
        if track is None:
            track = self.tracks[entity_id] = Track(entity_id)
        self._count(track, -1)
        track.show(entity, fingerprint)
        self._count(track, 1)

    def catch_up(self) -> Picture:
        """Applies every change the watch holds (none without one)."""
        if self._watcher is not None:
            for event in self._watcher.drain():
                if event.type == store_pb2.EVENT_TYPE_DELETED:
                    track = self.tracks.pop(event.entity_id, None)
                    if track is not None:
                        self._count(track, -1)
                    continue
                seen = fingerprint(event.entity_bytes)
                track = self.tracks.get(event.entity_id)
                if track is None or track.fingerprint != seen:
                    self.show(event.entity_id, event.entity, seen)
        return self

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()

    def _count(self, track: Track, sign: int) -> None:
        """Counts ``track`` as it stands in (``sign`` 1) or out (-1)."""
        c = self._counts
        source = track.part(SOURCE)
        if source is not None:
            c.tracks += sign
            c.eo += sign * (source.sensor_type == "eo")
            c.radar += sign * (source.sensor_type == "radar")
        c.fused += sign * track.has(FUSION)
        c.classified += sign * track.has(CLASSIFICATION)
        threat = track.part(THREAT)
        if threat is not None:
            c.threats[THREAT_NAMES.get(threat.level, str(threat.level))] += sign
        task = track.part(TASK)
        if task is not None:
            c.tasks[task.state] += sign
        approval = track.part(APPROVAL)
        if approval is not None and approval.state:
            c.approvals[APPROVAL_NAMES.get(approval.state, str(approval.state))] += sign

    def summary(self, events: int) -> Summary:
        """The counts (``events``: the store's change sequence, given by the caller)."""
        c = self._counts
        return dataclasses.replace(c, events=events, threats=+c.threats, tasks=+c.tasks, approvals=+c.approvals)


def summarize(store: Store) -> Summary:
    """Counts from the store's current picture, read with one list (events: its change sequence)."""
    return Picture.of(store).summary(store.seq)


@dataclass
class Reading:
    """The gauges at one moment (see ``Gauges``)."""

    writes_per_s: float
    ticks: int
    ticks_skipped: int
    classified_share: float
    #: service name -> (lag p50, lag p99) in ms, for the services that answered a sensor write.
    lags: dict[str, tuple[float, float]]

    def lag_text(self) -> str:
        return ", ".join(f"{name} {p50:.0f}/{p99:.0f}" for name, (p50, p99) in self.lags.items()) or "no samples yet"

    def line(self) -> str:
        return (f"{self.writes_per_s:.0f} writes/s, {self.ticks_skipped} of {self.ticks} ticks skipped, "
                f"{self.classified_share:.0%} of targets classified · lag p50/p99 ms: {self.lag_text()}")


class Gauges:
    """What the demo says beyond the picture, all read from counters: the stores'
    writes per second, the ticks the sims published and skipped, the share of targets
    classified (from a ``Summary``), and each service's lag p50/p99 (its ``stats()``).
    The rate is over at least ``window`` seconds, so readings between two sensor ticks
    do not swing."""

    def __init__(self, nodes: list[Node], services: list[Service], targets: int, window: float) -> None:
        self.nodes, self.services, self.targets, self.window = nodes, services, targets, window
        self._start = self._last = (self.writes(), time.monotonic())
        self._rate = 0.0

    def writes(self) -> int:
        """Entity writes the stores took from their clients (replicated ones not counted again)."""
        return sum(int(node.store.stats()["writes"]) for node in self.nodes)

    def read(self, summary: Summary, *, overall: bool = False) -> Reading:
        """The gauges now; ``overall``: writes/s since the start rather than recently."""
        writes, now = self.writes(), time.monotonic()
        since_writes, since = self._start if overall else self._last
        if overall or now - since >= self.window:
            self._rate = (writes - since_writes) / max(now - since, 1e-9)
            self._last = (writes, now)
        stats = {s.name: s.stats() for s in self.services}
        sims = [stats[s.name] for s in self.services if isinstance(s, SensorSim)]
        skipped = sum(sim.get("ticks_skipped", 0) for sim in sims)
        return Reading(
            writes_per_s=self._rate,
            ticks=sum(sim.get("ticks", 0) for sim in sims) + skipped,
            ticks_skipped=skipped,
            classified_share=summary.classified / self.targets if self.targets else 0.0,
            lags={name: (v["lag_ms_p50"], v["lag_ms_p99"]) for name, v in stats.items() if "lag_ms_p50" in v},
        )


def _natural(entity_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", entity_id))


def approve_hint(address: str) -> str:
    return f"meshstore approve ID --store {address}  (or deny)"


def nodes_table(nodes: list[Node], views: list[Summary]) -> Table:
    """Each node's view of the picture (``views``, in the order of ``nodes``), and whether they all agree."""
    same = [(v.tracks, v.classified, v.fused, v.approvals, v.tasks) for v in views]
    agree = all(x == same[0] for x in same)
    table = Table(title=f"mesh of {len(nodes)} nodes: {'views agree' if agree else 'converging...'}",
                  title_justify="left", expand=False)
    for column in ("NODE", "TRACKS", "CLASSIFIED", "FUSED", "PENDING", "SEQ", "PEERS UP", "LAG"):
        table.add_column(column, no_wrap=True, justify="left" if column == "NODE" else "right")
    for node, view in zip(nodes, views, strict=True):
        links = node.relay.stats()["peers"].values() if node.relay is not None else []
        up = sum(1 for link in links if link["connected"])
        lag = max((link["lag"] for link in links), default=0)
        table.add_row(node.store.node_id, str(view.tracks), str(view.classified), str(view.fused),
                      str(view.approvals["PENDING"]), str(view.events), f"{up}/{len(links)}", str(lag))
    return table


def _current(store: Store, entity_ids: Iterable[str]) -> list[pb.Entity]:
    """The entities as the store holds them now (those deleted meanwhile left out)."""
    found = []
    for entity_id in entity_ids:
        with contextlib.suppress(NotFoundError):
            found.append(store.get(entity_id))
    return found


def render(store: Store, picture: Picture, address: str, started: float, status: str, services: list[Service],
           views: Table | None = None, ui: str | None = None) -> Group:
    """The live picture: one row per track that is not a radar plot or a fused track,
    with what the services made of it, and the fused tracks (as the first node sees
    them), then ``status`` (the gauges) and in a mesh each node's view (``views``). The
    rows shown are picked from ``picture`` and read from ``store`` as they are now."""
    fused_of: dict[str, Track] = {}
    fused_rows: list[tuple[Track, pb.FusionComponent]] = []
    radar = 0
    rows: list[Track] = []
    for track in picture.tracks.values():
        fusion = track.part(FUSION)
        if fusion is not None:
            fused_rows.append((track, fusion))
            for sid in fusion.source_ids:
                fused_of[sid] = track
            continue
        source = track.part(SOURCE)
        if source is not None and source.sensor_type == "radar":
            radar += 1
            continue
        rows.append(track)
    table = Table(title=f"meshstore demo: {len(rows)} tracks, {radar} radar plots, {len(fused_rows)} fused "
                        f"· store {address} · {store.seq} events · {time.monotonic() - started:.0f}s",
                  title_justify="left", caption=f"PENDING intercepts: run `{approve_hint(address)}` in another "
                                                f"terminal{f' or use the web UI at {ui}' if ui else ''}. Ctrl-C stops.",
                  caption_justify="left", expand=False)
    for column in ("TRACK", "POSITION", "SPEED", "CLASS", "THREAT", "TASK", "APPROVAL", "FUSED WITH"):
        table.add_column(column, no_wrap=True)
    shown = heapq.nsmallest(MAX_ROWS, rows, key=Track.priority)
    if len(rows) > len(shown):
        table.title = f"{table.title} · showing {len(shown)} (pending and highest threat first)"
    first_fused = heapq.nsmallest(20, fused_rows, key=lambda row: [_natural(i) for i in row[1].source_ids])
    fused_now = {e.id: read_component(e, FUSION, pb.FusionComponent) for e in _current(
        store, {fused_of[t.id].id for t in shown if t.id in fused_of} | {t.id for t, _ in first_fused})}
    for e in _current(store, [track.id for track in shown]):
        pos = read_component(e, POSITION, pb.PositionComponent)
        vel = read_component(e, VELOCITY, pb.VelocityComponent)
        cls = read_component(e, CLASSIFICATION, pb.ClassificationComponent)
        threat = read_component(e, THREAT, pb.ThreatComponent)
        task = read_component(e, TASK, pb.TaskComponent)
        approval = read_component(e, APPROVAL, pb.ApprovalComponent)
        threat_name = THREAT_NAMES.get(threat.level, "?") if threat else "-"
        approval_name = APPROVAL_NAMES.get(approval.state, "?") if approval and approval.state else "-"
        fused = fused_now.get(fused_of[e.id].id) if e.id in fused_of else None
        partners = "-" if fused is None else (
            ", ".join(s for s in fused.source_ids if s != e.id) + f" ({fused.confidence:.2f})")
        table.add_row(
            e.id,
            f"{pos.lat:8.4f} {pos.lon:9.4f}" if pos else "-",
            f"{vel.speed:5.0f} kn" if vel else "-",
            f"{cls.label} {cls.confidence:.2f}" if cls else "-",
            Text(threat_name, style=THREAT_STYLE.get(threat_name, "")),
            task.state if task else "-",
            Text(approval_name, style=APPROVAL_STYLE.get(approval_name, "")),
            partners,
        )
    fused_table = Table(title="fused tracks", title_justify="left", expand=False)
    for column in ("FUSED", "SOURCES", "POSITION", "CONF"):
        fused_table.add_column(column, no_wrap=True)
    for track, _ in first_fused:
        fusion = fused_now.get(track.id)
        if fusion is not None:
            fused_table.add_row(track.id, ", ".join(fusion.source_ids),
                                f"{fusion.fused_lat:8.4f} {fusion.fused_lon:9.4f}", f"{fusion.confidence:.2f}")
    health = "  ".join(f"{s.name}:{'ok' if s.running else 'STOPPED'}" for s in services)
    parts = [table, fused_table, Text(status)] + ([views] if views is not None else [])
    return Group(*parts, Text(f"services  {health}", style="dim"))


async def _start_first(node_id: str, config: DemoConfig, console: Console) -> Node:
    """The first node, on the configured ports if they are free, else ephemeral ones; it
    serves the web UI (``http_port``)."""
    port, http_port = config.port, config.http_port
    while True:
        try:
            return await Node(NodeOptions(host=config.host, port=port, http_host=config.host, http_port=http_port),
                              store=StoreOptions(node_id=node_id)).start()
        except HttpListenError as exc:
            if not http_port:
                raise
            console.print(f"[yellow]web UI port {http_port} is not available ({exc}); using any free port.[/]")
            http_port = 0
        except OSError as exc:
            if port == 0:
                raise
            console.print(f"[yellow]port {port} is not available ({exc}); using an ephemeral port instead. "
                          f"Pass --store with the address below to `meshstore approve`.[/]")
            port = 0


async def _start_nodes(config: DemoConfig, console: Console) -> list[Node]:
    """The demo's nodes; with several, a full mesh of relays between them (started once
    every node listens, so that each knows the others' ports)."""
    if config.nodes == 1:
        return [await _start_first("demo", config, console)]
    nodes = [await _start_first("demo-1", config, console)]
    for i in range(1, config.nodes):
        nodes.append(await Node(NodeOptions(host=config.host, port=0), store=StoreOptions(node_id=f"demo-{i + 1}"))
                     .start())
    for node in nodes:
        await node.start_relay([n.address for n in nodes if n is not node])
    return nodes


async def _converged(nodes: list[Node], timeout: float) -> bool:
    """Waits up to ``timeout`` for every node to hold the same entities."""
    deadline = time.monotonic() + timeout
    while True:
        states = [n.store.list() for n in nodes]
        if all(s == states[0] for s in states):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def run_demo(config: DemoConfig, console: Console | None = None) -> int:
    """Runs the demo; returns the exit code (0, or 1 if a service failed or, in a mesh,
    the nodes did not converge once the services stopped)."""
    console = console or Console()
    live = config.live and console.is_terminal
    nodes = await _start_nodes(config, console)
    store, address = nodes[0].store, nodes[0].address
    mesh = f" and {len(nodes) - 1} more nodes ({', '.join(n.address for n in nodes[1:])})" if len(nodes) > 1 else ""
    console.print(f"meshstore demo: store listening at {address}{mesh} ({config.tracks} targets, seed {config.seed}, "
                  f"{config.rate:g} ticks/s); {'Ctrl-C to stop' if config.duration is None else f'{config.duration:g}s'}",
                  highlight=False)
    ui = nodes[0].http.url if nodes[0].http is not None else None
    if ui is not None:
        console.print(f"web UI at {ui}  (the tracks on a map; approve or deny there, or from a terminal: "
                      f"{approve_hint(address)})", highlight=False, soft_wrap=True)
    scenario = Scenario(seed=config.seed, count=config.tracks, bbox=config.bbox, speed_min=config.speed_min,
                        speed_max=config.speed_max)

    def at(i: int) -> str:  # spread the services over the nodes: the sims write to different ones
        return nodes[i % len(nodes)].address

    services: list[Service] = [
        SensorSim(at(0), scenario, rate=config.rate),
        RadarSim(at(1), scenario, rate=config.rate, noise_m=config.radar_noise_m),
        Classifier(at(2), config.thresholds),
        TaskManager(at(0), approval_timeout=config.approval_timeout),
        Fusion(at(1), max_distance=config.max_distance),
    ]
    pictures = [Picture.follow(node.store, config.picture_interval if live else config.status_every)
                for node in nodes]
    gauges = Gauges(nodes, services, config.tracks, window=config.status_every)
    tasks = {asyncio.create_task(s.run(), name=s.name): s for s in services}

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    started = time.monotonic()
    deadline = None if config.duration is None else started + config.duration
    failed: list[str] = []

    async def wait_tick(seconds: float) -> bool:
        """Waits; True when it is time to stop."""
        if deadline is not None:
            seconds = min(seconds, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        for task, service in tasks.items():
            if task.done() and service.name not in failed:
                failed.append(service.name)
                exc = task.exception() if not task.cancelled() else None
                log_event(log, logging.ERROR, "service failed", service=service.name, error=repr(exc))
                console.print(f"[red]service {service.name} stopped: {exc!r}[/]")
        return stop.is_set() or (deadline is not None and time.monotonic() >= deadline) or len(failed) == len(tasks)

    def catch_up() -> None:
        for picture in pictures:
            picture.catch_up()

    next_catch_up = started  # the live table's, once per picture interval (see Picture)

    def views() -> list[Summary]:
        """Each node's view, as its picture stands."""
        return [picture.summary(node.store.seq) for picture, node in zip(pictures, nodes, strict=True)]

    def status(views: list[Summary]) -> str:
        return f"{views[0].line()} · {gauges.read(views[0]).line()}"

    def frame() -> Group:
        nonlocal next_catch_up
        if time.monotonic() >= next_catch_up:
            next_catch_up = time.monotonic() + config.picture_interval
            catch_up()
        now = views()
        return render(store, pictures[0], address, started, status(now), services,
                      nodes_table(nodes, now) if len(nodes) > 1 else None, ui)

    try:
        if live:
            from rich.live import Live

            with Live(frame(), console=console, refresh_per_second=4, transient=False) as display:
                while not await wait_tick(config.refresh):
                    display.update(frame())
                display.update(frame())
        else:
            next_status = started + config.status_every
            while not await wait_tick(min(config.refresh, max(0.05, next_status - time.monotonic()))):
                if time.monotonic() >= next_status:
                    next_status += config.status_every
                    catch_up()
                    console.print(f"[{time.monotonic() - started:5.1f}s] {status(views())}", highlight=False,
                                  soft_wrap=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if received:
            console.print(f"{received[0]} received: stopping", highlight=False)
        for picture in pictures:
            picture.close()
        # Producers first, so the last writes are judged by the consumers still running.
        for service in services:
            await service.stop()
        converged = len(nodes) == 1 or await _converged(nodes, timeout=10.0)
        summary = summarize(store)
        reading = gauges.read(summary, overall=True)
        views = nodes_table(nodes, [summarize(node.store) for node in nodes]) if len(nodes) > 1 else None
        # Every relay first, so no node sees its peers go away; then each node drains and
        # closes its store.
        for node in nodes:
            if node.relay is not None:
                await node.relay.stop()
        for node in nodes:
            await node.stop(1.0)
    _print_summary(console, summary, reading, services, time.monotonic() - started)
    if views is not None:
        console.print(views)
        console.print(f"nodes converged: {'yes' if converged else 'NO'}", highlight=False)
    return 1 if failed or not converged else 0


def _print_summary(console: Console, s: Summary, reading: Reading, services: list[Service], elapsed: float) -> None:
    table = Table(title=f"summary after {elapsed:.1f}s", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    table.add_row("tracks (eo + radar)", f"{s.tracks} ({s.eo} + {s.radar})")
    table.add_row("classified", f"{s.classified} ({reading.classified_share:.0%} of targets)")
    table.add_row("threats", ", ".join(f"{k} {v}" for k, v in sorted(s.threats.items())) or "-")
    table.add_row("tasks", ", ".join(f"{k} {v}" for k, v in sorted(s.tasks.items())) or "-")
    for name in ("PENDING", "APPROVED", "DENIED", "TIMED_OUT"):
        table.add_row(f"approvals {name.lower().replace('_', ' ')}", str(s.approvals[name]))
    table.add_row("fused tracks", str(s.fused))
    table.add_row("store events", str(s.events))
    table.add_row("store writes/s (mean)", f"{reading.writes_per_s:.0f}")
    table.add_row("sensor ticks skipped", f"{reading.ticks_skipped} of {reading.ticks}")
    for service in services:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(service.stats().items()) if v and not k.startswith("lag_"))
        table.add_row(f"{service.name}", counts or "-")
        if service.name in reading.lags:
            p50, p99 = reading.lags[service.name]
            table.add_row(f"{service.name} lag p50 / p99", f"{p50:.0f} / {p99:.0f} ms")
    console.print(table)
    console.print(f"summary: {s.line()}", highlight=False, soft_wrap=True)
    console.print(f"pipeline: {reading.line()}", highlight=False, soft_wrap=True)
