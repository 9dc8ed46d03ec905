"""A node: the one place that composes a store, its gRPC server and its mesh relay.

    async with Node(NodeOptions(port=50051, peers=["10.0.0.2:50051"]),
                    store=StoreOptions(node_id="a")) as node:
        ... node.address, node.store, node.relay, node.stats() ...

A :class:`Node` holds

- a :class:`~meshstore.store.Store`: the one given (left open at the end: its owner
  closes it) or one made from the given :class:`~meshstore.options.StoreOptions` (closed
  by :meth:`Node.stop`);
- a gRPC server (:class:`~meshstore.grpc.server.GrpcServer`) on ``host:port`` serving
  ``store.v1.EntityStoreService``, the mesh receiver ``mesh.v1.MeshService`` (peers
  push their changes to it; :class:`~meshstore.mesh.receiver.MeshReceiver` answers its
  questions and reads its counters), the
  standard health service and (``reflection``) server reflection;
- with ``http_port``, an HTTP server (:class:`~meshstore.http.server.HttpServer`, aiohttp
  on the same event loop) on ``http_host:http_port``: the JSON API, the live feed
  (Server-Sent Events) and the web page;
- with ``metrics_port``, a Prometheus ``/metrics`` server
  (:class:`~meshstore.metrics.MetricsServer`, aiohttp on the same event loop) on
  ``metrics_host:metrics_port``, reading at each scrape the counters ``stats()`` gives;
- with ``peers``, a :class:`~meshstore.mesh.relay.Relay` pushing the store's changes to
  each peer within the bandwidth budget. A mesh whose addresses are known only once
  every node listens (port 0) starts its relays later with :meth:`Node.start_relay`; a
  relay someone else runs can be attached with :meth:`Node.attach_relay`;
- with ``peer_dns``, a :class:`~meshstore.mesh.discovery.PeerDiscovery` re-resolving
  those names every ``peer_dns_interval`` seconds into the relay's peers (with
  ``peers``), so peers join and leave at runtime.

One lifecycle: ``await node.start()`` (gRPC, then HTTP, then metrics; OSError if an
address cannot be bound), then ``await node.drain(grace)``: health NOT_SERVING, open
watch, publish, mesh and SSE streams ended, no new calls or requests, in-flight ones get
``grace`` seconds, the metrics server stops, then the relay stops; then
``await node.stop()`` (drains first if that was not done, closes the store if the node
made it). ``async with`` starts and stops. :meth:`Node.run_until_signal` (and
:func:`run_node`, which is ``meshstore serve``) runs one until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from meshstore.grpc.client import ClientSecurity
from meshstore.grpc.server import DEFAULT_MAX_MESSAGE_BYTES, WATCH_QUEUE, GrpcServer, check_listen_options
from meshstore.http.server import HttpServer
from meshstore.logs import event as log_event
from meshstore.mesh.discovery import PeerDiscovery, Resolver, split_address
from meshstore.mesh.receiver import MeshReceiver
from meshstore.mesh.relay import Relay, default_channel
from meshstore.metrics import MetricsServer, node_registry
from meshstore.options import StoreOptions
from meshstore.security import ServerSecurity
from meshstore.store import Store
from meshstore.validate import is_number

__all__ = ["Node", "NodeOptions", "run_node"]

log = logging.getLogger("meshstore.node")


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    """How a node listens and whom it replicates to.

    - ``host``, ``port``: the address to listen on (port 0: any free port, see ``Node.port``);
    - ``max_message_bytes``: the largest gRPC message accepted (bigger: RESOURCE_EXHAUSTED);
    - ``peers``: ``host:port`` of the nodes this one pushes its changes to (none and no
      ``peer_dns``: no relay);
    - ``peer_dns``: ``NAME:PORT`` names whose addresses are peers too, re-resolved every
      ``peer_dns_interval`` seconds by ``peer_resolver`` (None: the system's DNS);
    - ``bandwidth_bps``, ``burst_bytes``: each peer link's budget (``BudgetConfig``; 0:
      unlimited, and a burst of one second of bandwidth);
    - ``grace``: seconds in-flight calls get at shutdown (``drain``'s default);
    - ``watch_queue``: events each gRPC watch stream queues before it falls behind (and
      catches up from the change log with each entity's latest state);
    - ``reflection``: offer gRPC server reflection;
    - ``grpc_workers``: threads serving gRPC connections (None: one per CPU the process
      may use; the ``listening`` log line says how many);
    - ``relay_options``: further keyword arguments of the node's ``Relay`` (batch size,
      backoff, intervals, ``channel_factory``...);
    - ``http_host``, ``http_port``: where the HTTP API and web page listen (port None:
      no HTTP server; 0: any free port, see ``Node.http_address``);
    - ``http_options``: further keyword arguments of the node's ``HttpServer``
      (``heartbeat``, ``flush_interval``, ``max_body_bytes``, ``static_dir``);
    - ``metrics_host``, ``metrics_port``: where Prometheus ``/metrics`` is served (port
      None: not served; 0: any free port, see ``Node.metrics_address``; host None: ``host``);
    - ``security``: TLS and the roles policy of every port (None: plaintext, every call
      allowed; see ``meshstore.security``), ``peer_security``: how the relay dials its
      peers (None: from the environment; see ``meshstore.grpc.client.ClientSecurity``).
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    peers: Sequence[str] = ()
    peer_dns: Sequence[str] = ()
    peer_dns_interval: float = 10.0
    peer_resolver: Resolver | None = None
    bandwidth_bps: float = 0
    burst_bytes: float = 0
    grace: float = 5.0
    watch_queue: int = WATCH_QUEUE
    reflection: bool = True
    grpc_workers: int | None = None
    relay_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    http_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metrics_host: str | None = None
    metrics_port: int | None = None
    security: ServerSecurity | None = None
    peer_security: ClientSecurity | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str):
            raise TypeError(f"host must be a str, got {type(self.host).__name__}")
        check_listen_options(self.port, self.max_message_bytes, self.watch_queue, self.grpc_workers)
        if isinstance(self.peers, str) or not all(isinstance(p, str) and p.strip() for p in self.peers):
            raise ValueError(f"peers must be a list of 'host:port' strings, got {self.peers!r}")
        peers = tuple(p.strip() for p in self.peers)
        if len(set(peers)) != len(peers):
            raise ValueError(f"peers has duplicates: {list(peers)!r}")
        object.__setattr__(self, "peers", peers)
        if isinstance(self.peer_dns, str) or not all(isinstance(n, str) for n in self.peer_dns):
            raise ValueError(f"peer_dns must be a list of 'NAME:PORT' strings, got {self.peer_dns!r}")
        for name in self.peer_dns:
            split_address(name)
        object.__setattr__(self, "peer_dns", tuple(n.strip() for n in self.peer_dns))
        if not is_number(self.peer_dns_interval) or self.peer_dns_interval <= 0:
            raise ValueError(f"peer_dns_interval must be a positive number, got {self.peer_dns_interval!r}")
        if not is_number(self.grace) or self.grace < 0:
            raise ValueError(f"grace must be a number >= 0, got {self.grace!r}")
        object.__setattr__(self, "relay_options", dict(self.relay_options))
        if not isinstance(self.http_host, str):
            raise TypeError(f"http_host must be a str, got {type(self.http_host).__name__}")
        for name in ("http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and (not is_number(port, integer=True) or not 0 <= port <= 65535):
                raise ValueError(f"{name} must be None or an int in 0..65535, got {port!r}")
        object.__setattr__(self, "http_options", dict(self.http_options))
        if self.metrics_host is not None and not isinstance(self.metrics_host, str):
            raise TypeError(f"metrics_host must be None or a str, got {type(self.metrics_host).__name__}")


class Node:
    """A store, its gRPC server and (with peers) its mesh relay, with one lifecycle.

    ``Node(options=None, store=None, **overrides)``: ``options`` a :class:`NodeOptions`
    (``overrides`` replace its fields: ``Node(port=0, peers=[...])``); ``store`` an
    existing :class:`Store` (the caller keeps it and closes it), or
    :class:`StoreOptions` / None for a store the node makes and closes."""

    def __init__(self, options: NodeOptions | None = None, store: Store | StoreOptions | None = None,
                 **overrides: Any) -> None:
        if options is None:
            options = NodeOptions(**overrides)
        elif not isinstance(options, NodeOptions):
            raise TypeError(f"options must be NodeOptions, got {type(options).__name__}")
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options
        if isinstance(store, Store):
            self._owns_store = False
        elif store is None or isinstance(store, StoreOptions):
            store = Store(store)
            self._owns_store = True
        else:
            raise TypeError(f"store must be a Store or StoreOptions, got {type(store).__name__}")
        self.store: Store = store
        try:
            #: The receiving side of the mesh (served by the node's gRPC server).
            self.receiver = MeshReceiver(store)
            self._relay: Relay | None = None
            self._owns_relay = False
            if options.peers or options.peer_dns:
                self._relay = self._make_relay(options.peers)
                self._owns_relay = True
                self.receiver.relay = self._relay
        except BaseException:
            if self._owns_store:
                store.close()
            raise
        self._server: GrpcServer | None = None
        self._http: HttpServer | None = None
        self._metrics: MetricsServer | None = None
        self._discovery: PeerDiscovery | None = None
        self._state = "new"  # -> "started" -> "drained" -> "stopped"

    # ---- what it holds --------------------------------------------------------------------

    @property
    def relay(self) -> Relay | None:
        """The relay pushing to the peers (None: no peers)."""
        return self._relay

    @property
    def discovery(self) -> PeerDiscovery | None:
        """What keeps the relay's peers in step with ``peer_dns`` (None without it, or not started)."""
        return self._discovery

    @property
    def server(self) -> GrpcServer:
        """The gRPC server (once started)."""
        if self._server is None:
            raise RuntimeError("the node has not started")
        return self._server

    @property
    def port(self) -> int:
        """The port listened on (the bound one when ``options.port`` is 0)."""
        return self.server.port

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return self.server.address

    @property
    def http(self) -> HttpServer | None:
        """The HTTP server (None: ``http_port`` is None, or not started)."""
        return self._http

    @property
    def http_address(self) -> str | None:
        """``host:port`` of the HTTP API and web page (None without one)."""
        return self._http.address if self._http is not None else None

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` of Prometheus ``/metrics`` (None without it)."""
        return self._metrics.address if self._metrics is not None else None

    @property
    def running(self) -> bool:
        return self._state == "started"

    def stats(self) -> dict[str, Any]:
        """The store's counters, the server's, the mesh receiver's and (with a relay) its
        per-peer links."""
        return {
            "node_id": self.store.node_id,
            "address": self.address if self._server is not None else None,
            "http_address": self.http_address,
            "store": self.store.stats(),
            "server": self._server.stats() if self._server is not None else {},
            "mesh": self.receiver.stats(),
            "relay": self._relay.stats() if self._relay is not None else None,
            "http": self._http.stats() if self._http is not None else None,
        }

    def _stats_values(self) -> dict[str, float]:
        """What GetStats adds to the store's counters: the mesh receiver's totals, the HTTP
        side's (``http.<counter>``: open SSE streams, streams opened, events sent,
        decisions) and each relay link's numbers, flattened as ``mesh.<counter>`` and
        ``peer.<address>.<counter>``."""
        values: dict[str, float] = {}
        mesh = self.receiver.stats()
        for key in ("streams_open", "refused_self", "refused_invalid", "rejected_states"):
            values[f"mesh.{key}"] = float(mesh[key])
        if self._http is not None:
            http = self._http.stats()
            for key in ("sse_streams", "sse_opened", "sse_events", "decisions"):
                values[f"http.{key}"] = float(http[key])
        if self._relay is not None:
            for address, link in self._relay.stats()["peers"].items():
                for key, value in link.items():
                    if isinstance(value, (bool, int, float)):
                        values[f"peer.{address}.{key}"] = float(value)
        return values

    # ---- the relay ------------------------------------------------------------------------

    def _make_relay(self, peers: Sequence[str]) -> Relay:
        o = self.options
        relay_options = {"channel_factory": functools.partial(default_channel, security=o.peer_security),
                         **o.relay_options}
        return Relay(self.store, list(peers), bandwidth_bps=o.bandwidth_bps, burst_bytes=o.burst_bytes,
                     **relay_options)

    async def start_relay(self, peers: Sequence[str]) -> Relay:
        """Starts a relay to ``peers`` on a started node without one (for a mesh whose
        addresses are known only once every node listens). The node stops it."""
        if self._relay is not None:
            raise RuntimeError(f"node {self.store.node_id} already has a relay")
        if self._state != "started":
            raise RuntimeError("start_relay needs a started node")
        relay = self._make_relay(peers)
        self._relay, self._owns_relay = relay, True
        self.receiver.relay = relay
        await relay.start()
        return relay

    def attach_relay(self, relay: Relay | None) -> None:
        """Uses a relay run by someone else (who starts and stops it) as this node's sending
        side: the receiver asks it which peers must resync, GetStats reports its links.
        None detaches it."""
        if self._owns_relay:
            raise RuntimeError(f"node {self.store.node_id} runs its own relay")
        if relay is not None and relay.store is not self.store:
            raise ValueError("the relay must be over the node's store")
        self._relay = relay
        self.receiver.relay = relay

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> Node:
        """Starts listening (gRPC, then HTTP with ``http_port``), then the relay. OSError
        if an address cannot be bound (the node is then stopped). Idempotent while
        running."""
        if self._state == "started":
            return self
        if self._state != "new":
            raise RuntimeError("a stopped node cannot start again: make a new one")
        o = self.options
        server = GrpcServer(self.store, o.host, o.port, o.max_message_bytes, reflection=o.reflection,
                            extra_stats=self._stats_values, mesh=self.receiver, security=o.security,
                            watch_queue=o.watch_queue, workers=o.grpc_workers)
        self.receiver.server = server
        try:
            await server.start()
        except BaseException:
            self._state = "stopped"
            self._close_store()
            raise
        try:
            if o.http_port is not None:
                self._http = await HttpServer(self.store, o.http_host, o.http_port, stats=self.stats,
                                              security=o.security, **o.http_options).start()
            if o.metrics_port is not None:
                host = o.host if o.metrics_host is None else o.metrics_host
                self._metrics = await MetricsServer(node_registry(self), host, o.metrics_port,
                                                    security=o.security).start()
        except BaseException:
            self._state = "stopped"
            await server.stop(None)
            if self._http is not None:
                await self._http.stop(0)
            self._close_store()
            raise
        self._server = server
        self._state = "started"
        storage = self.store.storage
        kept = (dict(data_dir=storage.path, durability=storage.durability, entities_loaded=storage.loaded)
                if storage is not None else dict(data_dir="none (in memory)"))
        log_event(log, logging.INFO, "listening", address=self.address, node_id=self.store.node_id,
                  http=self.http_address or "none", metrics=self.metrics_address or "none",
                  max_message_bytes=o.max_message_bytes, grpc_workers=server.workers,
                  peers=",".join(self._relay.peers) if self._relay is not None else "none", **kept, pid=os.getpid())
        if self._relay is not None and self._owns_relay:
            await self._relay.start()
        if o.peer_dns:
            self._discovery = PeerDiscovery(self._relay, o.peer_dns, static=o.peers, own=(o.host, self.port),
                                            interval=o.peer_dns_interval, resolver=o.peer_resolver)
            await self._discovery.start()
        return self

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown of the serving side: health NOT_SERVING, open watch streams
        ended (UNAVAILABLE with their resume cursor), open publish streams answered with
        their summary, open mesh streams and SSE streams ended, no new calls or HTTP
        connections; in-flight calls and requests get ``grace`` seconds (default
        ``options.grace``); then the relay stops. The store stays open. Idempotent."""
        if self._state != "started":
            return
        self._state = "drained"
        grace = self.options.grace if grace is None else grace
        server = self.server
        await server.begin_shutdown()
        stops = [server.stop(grace)]
        if self._http is not None:
            stops.append(self._http.stop(grace))
        if self._metrics is not None:
            stops.append(self._metrics.stop())
        await asyncio.gather(*stops)
        if self._discovery is not None:
            await self._discovery.stop()
        if self._relay is not None and self._owns_relay:
            await self._relay.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Drains (``grace`` as there) if that was not done, then closes the store if the
        node made it. Idempotent."""
        if self._state == "stopped":
            return
        if self._state == "started":
            await self.drain(grace)
        self._state = "stopped"
        self._close_store()
        log_event(log, logging.INFO, "stopped", address=self.address if self._server else None,
                  node_id=self.store.node_id)

    def _close_store(self) -> None:
        if self._owns_store:
            self.store.close()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_until_signal(self, stop: asyncio.Event | None = None) -> None:
        """Starts the node (if it is not running), serves until SIGINT/SIGTERM (or ``stop``
        is set), then drains within ``options.grace`` and stops. A second signal stops at
        once, without waiting out the grace period; the store is still closed (committed,
        marked clean) before the process can be killed by a further signal."""
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        received: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig.name)
            if stop.is_set() and self._server is not None and self._state != "stopped":
                # A second signal: do not wait out the grace period (the final commit still runs).
                log_event(log, logging.WARNING, "second signal: stopping now", signal=sig.name)
                loop.create_task(self._server.stop_now())
                if self._http is not None:
                    self._http.stop_now()
            stop.set()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            await self.start()
            await stop.wait()
            log_event(log, logging.INFO, "shutting down", signal=received[0] if received else "none",
                      watch_streams=self.server.stats()["watch_streams"], grace_s=self.options.grace)
            await self.drain()
        finally:
            # The handlers stay until the store is closed: a signal's default action now
            # would kill the process before its final commit (an unclean stop).
            try:
                await self.stop(0)
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)


def run_node(options: NodeOptions | None = None, store: Store | StoreOptions | None = None,
             **overrides: Any) -> None:
    """Blocks running a node (``Node(options, store, **overrides)``) until SIGINT/SIGTERM:
    ``meshstore serve``. A store given as a Store is left open."""

    async def main() -> None:
        await Node(options, store, **overrides).run_until_signal()

    asyncio.run(main())
