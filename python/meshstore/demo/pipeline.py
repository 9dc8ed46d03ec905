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

With ``nodes`` > 1 (``meshstore demo --nodes 3``) the store is a mesh of that many
nodes on loopback, each a Node with a relay to every other node; the services
are spread over the nodes (the two sims write to different nodes), and a nodes table shows
each node's view and whether they agree.

The older two-store replication walk-through is still ``python -m meshstore.demo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from meshstore.components import APPROVAL, CLASSIFICATION, FUSION, POSITION, SOURCE, TASK, THREAT, VELOCITY
from meshstore.http.server import HttpListenError
from meshstore.logs import event as log_event
from meshstore.node import Node, NodeOptions
from meshstore.options import StoreOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.services import Service, read_component
from meshstore.services.classifier import Classifier, Thresholds
from meshstore.services.fusion import Fusion
from meshstore.services.radar_sim import RadarSim
from meshstore.services.scenario import DEFAULT_BBOX, BBox, Scenario
from meshstore.services.sensor_sim import SensorSim
from meshstore.services.task_manager import TaskManager
from meshstore.store import Store

__all__ = ["DemoConfig", "Summary", "run_demo", "summarize"]

log = logging.getLogger("meshstore.demo")

APPROVAL_NAMES = {v: k.removeprefix("APPROVAL_STATE_") for k, v in pb.ApprovalState.items()}
THREAT_NAMES = {v: k.removeprefix("THREAT_LEVEL_") for k, v in pb.ThreatLevel.items()}
THREAT_STYLE = {"HIGH": "bold red", "MEDIUM": "yellow", "LOW": "cyan", "NONE": "green"}
#: Rows of the live table (pending approvals and the highest threats first).
MAX_ROWS = 30
APPROVAL_STYLE = {"PENDING": "bold magenta", "APPROVED": "bold green", "DENIED": "red", "TIMED_OUT": "yellow"}


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


def summarize(store: Store) -> Summary:
    """Counts from the store's current picture (events: its change sequence)."""
    s = Summary(events=store.seq)
    for entity in store.list(pb.ENTITY_TYPE_TRACK):
        source = read_component(entity, SOURCE, pb.SourceComponent)
        if source is not None:
            s.tracks += 1
            s.eo += source.sensor_type == "eo"
            s.radar += source.sensor_type == "radar"
        if FUSION in entity.components:
            s.fused += 1
        if CLASSIFICATION in entity.components:
            s.classified += 1
        threat = read_component(entity, THREAT, pb.ThreatComponent)
        if threat is not None:
            s.threats[THREAT_NAMES.get(threat.level, str(threat.level))] += 1
        task = read_component(entity, TASK, pb.TaskComponent)
        if task is not None:
            s.tasks[task.state] += 1
        approval = read_component(entity, APPROVAL, pb.ApprovalComponent)
        if approval is not None and approval.state:
            s.approvals[APPROVAL_NAMES.get(approval.state, str(approval.state))] += 1
    return s


def _natural(entity_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", entity_id))


def approve_hint(address: str) -> str:
    return f"meshstore approve ID --store {address}  (or deny)"


def nodes_table(nodes: list[Node]) -> Table:
    """Each node's view of the picture, and whether they all agree."""
    views = [summarize(n.store) for n in nodes]
    same = [(v.tracks, v.classified, v.fused, v.approvals, v.tasks) for v in views]
    agree = all(x == same[0] for x in same)
    table = Table(title=f"mesh of {len(nodes)} nodes: {'views agree' if agree else 'converging...'}",
                  title_justify="left", expand=False)
    for column in ("NODE", "TRACKS", "CLASSIFIED", "FUSED", "PENDING", "SEQ", "PEERS UP", "LAG"):
        table.add_column(column, no_wrap=True, justify="left" if column == "NODE" else "right")
    for node, view in zip(nodes, views):
        links = node.relay.stats()["peers"].values() if node.relay is not None else []
        up = sum(1 for link in links if link["connected"])
        lag = max((link["lag"] for link in links), default=0)
        table.add_row(node.store.node_id, str(view.tracks), str(view.classified), str(view.fused),
                      str(view.approvals["PENDING"]), str(view.events), f"{up}/{len(links)}", str(lag))
    return table


def render(store: Store, address: str, started: float, services: list[Service], nodes: list[Node] = (),
           ui: str | None = None) -> Group:
    """The live picture: one row per track that is not a radar plot or a fused track, with
    what the services made of it, and the fused tracks (as the first node sees them), and
    in a mesh each node's view."""
    entities = store.list(pb.ENTITY_TYPE_TRACK)
    fused_of: dict[str, tuple[str, pb.FusionComponent]] = {}
    fused_rows = []
    radar = 0
    rows = []
    for e in entities:
        fusion = read_component(e, FUSION, pb.FusionComponent)
        if fusion is not None:
            fused_rows.append((e, fusion))
            for sid in fusion.source_ids:
                fused_of[sid] = (e.id, fusion)
            continue
        source = read_component(e, SOURCE, pb.SourceComponent)
        if source is not None and source.sensor_type == "radar":
            radar += 1
            continue
        rows.append(e)
    summary = summarize(store)
    table = Table(title=f"meshstore demo: {len(rows)} tracks, {radar} radar plots, {len(fused_rows)} fused "
                        f"· store {address} · {summary.events} events · {time.monotonic() - started:.0f}s",
                  title_justify="left", caption=f"PENDING intercepts: run `{approve_hint(address)}` in another "
                                                f"terminal{f' or use the web UI at {ui}' if ui else ''}. Ctrl-C stops.",
                  caption_justify="left", expand=False)
    for column in ("TRACK", "POSITION", "SPEED", "CLASS", "THREAT", "TASK", "APPROVAL", "FUSED WITH"):
        table.add_column(column, no_wrap=True)
    def priority(e: pb.Entity) -> tuple:
        approval = read_component(e, APPROVAL, pb.ApprovalComponent)
        threat = read_component(e, THREAT, pb.ThreatComponent)
        pending = approval is not None and approval.state == pb.APPROVAL_STATE_PENDING
        return (not pending, -(threat.level if threat else 0), _natural(e.id))

    shown = sorted(rows, key=priority)[:MAX_ROWS]
    if len(rows) > len(shown):
        table.title = f"{table.title} · showing {len(shown)} (pending and highest threat first)"
    for e in shown:
        pos = read_component(e, POSITION, pb.PositionComponent)
        vel = read_component(e, VELOCITY, pb.VelocityComponent)
        cls = read_component(e, CLASSIFICATION, pb.ClassificationComponent)
        threat = read_component(e, THREAT, pb.ThreatComponent)
        task = read_component(e, TASK, pb.TaskComponent)
        approval = read_component(e, APPROVAL, pb.ApprovalComponent)
        threat_name = THREAT_NAMES.get(threat.level, "?") if threat else "-"
        approval_name = APPROVAL_NAMES.get(approval.state, "?") if approval and approval.state else "-"
        fused = fused_of.get(e.id)
        partners = "-" if fused is None else (
            ", ".join(s for s in fused[1].source_ids if s != e.id) + f" ({fused[1].confidence:.2f})")
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
    for e, fusion in sorted(fused_rows, key=lambda x: [_natural(i) for i in x[1].source_ids])[:20]:
        fused_table.add_row(e.id, ", ".join(fusion.source_ids), f"{fusion.fused_lat:8.4f} {fusion.fused_lon:9.4f}",
                            f"{fusion.confidence:.2f}")
    health = "  ".join(f"{s.name}:{'ok' if s.running else 'STOPPED'}" for s in services)
    parts = [table, fused_table] + ([nodes_table(nodes)] if len(nodes) > 1 else [])
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

    try:
        if live:
            from rich.live import Live

            with Live(render(store, address, started, services, nodes, ui), console=console,
                      refresh_per_second=4, transient=False) as display:
                while not await wait_tick(config.refresh):
                    display.update(render(store, address, started, services, nodes, ui))
                display.update(render(store, address, started, services, nodes, ui))
        else:
            next_status = started + config.status_every
            while not await wait_tick(min(config.refresh, max(0.05, next_status - time.monotonic()))):
                if time.monotonic() >= next_status:
                    next_status += config.status_every
                    console.print(f"[{time.monotonic() - started:5.1f}s] {summarize(store).line()}", highlight=False, soft_wrap=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if received:
            console.print(f"{received[0]} received: stopping", highlight=False)
        # Producers first, so the last writes are judged by the consumers still running.
        for service in services:
            await service.stop()
        converged = len(nodes) == 1 or await _converged(nodes, timeout=10.0)
        summary = summarize(store)
        views = nodes_table(nodes) if len(nodes) > 1 else None
        # Every relay first, so no node sees its peers go away; then each node drains and
        # closes its store.
        for node in nodes:
            if node.relay is not None:
                await node.relay.stop()
        for node in nodes:
            await node.stop(1.0)
    _print_summary(console, summary, services, time.monotonic() - started)
    if views is not None:
        console.print(views)
        console.print(f"nodes converged: {'yes' if converged else 'NO'}", highlight=False)
    return 1 if failed or not converged else 0


def _print_summary(console: Console, s: Summary, services: list[Service], elapsed: float) -> None:
    table = Table(title=f"summary after {elapsed:.1f}s", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    table.add_row("tracks (eo + radar)", f"{s.tracks} ({s.eo} + {s.radar})")
    table.add_row("classified", str(s.classified))
    table.add_row("threats", ", ".join(f"{k} {v}" for k, v in sorted(s.threats.items())) or "-")
    table.add_row("tasks", ", ".join(f"{k} {v}" for k, v in sorted(s.tasks.items())) or "-")
    for name in ("PENDING", "APPROVED", "DENIED", "TIMED_OUT"):
        table.add_row(f"approvals {name.lower().replace('_', ' ')}", str(s.approvals[name]))
    table.add_row("fused tracks", str(s.fused))
    table.add_row("store events", str(s.events))
    for service in services:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(service.stats().items()) if v)
        table.add_row(f"{service.name}", counts or "-")
    console.print(table)
    console.print(f"summary: {s.line()}", highlight=False, soft_wrap=True)
