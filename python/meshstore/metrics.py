"""A node's Prometheus metrics: the collector that reads them and the server of /metrics.

:class:`NodeCollector` is a prometheus-client custom collector over a
:class:`~meshstore.node.Node`. Nothing is counted here: each scrape reads ``node.stats()``,
the very counters GetStats flattens into its answer (the store's, the gRPC server's, the
mesh receiver's, the HTTP side's, each relay link's), so the hot path pays nothing for
metrics and /metrics never disagrees with GetStats. It adds what GetStats cannot carry:
per gRPC method its calls, failures by code and latency histogram (the server's own
buckets), and the mesh receiver's counters per sending node.

:class:`MetricsServer` serves a registry on ``GET /metrics`` with aiohttp on the node's
event loop (``NodeOptions.metrics_port``; ``meshstore serve --metrics-port``): a scrape
reads the relay's counters on the loop that changes them, and the server starts and
stops with the node like its HTTP side, with no thread of its own.

The metric names are listed in README.md (Metrics); every GetStats value has one,
``STORE``/``SERVER``/``MESH``/``HTTP``/``PEER`` below say which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from meshstore.grpc.server import address_of
from meshstore.http.server import listen
from meshstore.security import ServerSecurity, http_middleware

__all__ = ["HTTP", "MESH", "PEER", "SENDER", "SERVER", "STORE", "MetricsServer", "NodeCollector", "Stat",
           "node_registry"]


@dataclasses.dataclass(frozen=True)
class Stat:
    """How one number of a stats dict is exported: metric ``name``, ``kind`` (counter or
    gauge), ``help``, fixed ``labels``, and ``scale`` (ms counters become seconds)."""

    name: str
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0


def _counter(name: str, help: str, **labels: str) -> Stat:
    return Stat(name, "counter", help, tuple(labels.items()))


def _gauge(name: str, help: str, scale: float = 1.0, **labels: str) -> Stat:
    return Stat(name, "gauge", help, tuple(labels.items()), scale)


_COMMIT_LATENCY = "Latency of the recent storage commits (the last few hundred), by quantile."

#: ``Store.stats()`` (GetStats: the keys without a prefix).
STORE: Mapping[str, Stat] = {
    "writes": _counter("meshstore_writes_total", "Local writes applied (creates, updates, puts)."),
    "stale_keys": _counter("meshstore_stale_keys_total",
                           "Component keys skipped because the write was based on an older version."),
    "rejected": _counter("meshstore_rejected_total", "Entities and replica states refused as invalid."),
    "merges": _counter("meshstore_merges_total", "Replica states merged (from peers)."),
    "merges_changed": _counter("meshstore_merges_changed_total", "Merges that changed this store."),
    "skewed_stamps": _counter("meshstore_skewed_stamps_total",
                              "Merged stamps further ahead of the wall clock than the allowed offset."),
    "expired": _counter("meshstore_expired_total", "Entities deleted at their expiry time."),
    "tombstones_collected": _counter("meshstore_tombstones_collected_total",
                                     "Deleted entities forgotten once no replica could need them."),
    "contexts_adopted": _counter("meshstore_contexts_adopted_total", "Peer context summaries adopted."),
    "entities": _gauge("meshstore_entities", "Live entities."),
    "tombstones": _gauge("meshstore_tombstones", "Deleted entities still remembered."),
    "seq": _gauge("meshstore_seq", "The store's latest change sequence number."),
    "log_entries": _gauge("meshstore_log_entries", "Entries of the change log."),
    "payload_bytes": _gauge("meshstore_payload_bytes", "Bytes of the component values held."),
    "dot_counter": _gauge("meshstore_dot_counter", "The last write counter this incarnation issued."),
    "context_nodes": _gauge("meshstore_context_nodes", "Writers in the store's context summary."),
    "watchers": _gauge("meshstore_watchers", "Open watchers (Store.watch, gRPC watch streams, SSE, relays)."),
    "coalesced": _gauge("meshstore_watch_coalesced_events",
                        "Events the open watchers folded into a later one (min_interval, or behind)."),
    "watch_queued": _gauge("meshstore_watch_queued_events", "Events waiting in the open watchers' queues."),
    **{f"events_{kind}": _counter("meshstore_events_total", "Changes of entities, by the event they are.", kind=kind)
       for kind in ("created", "updated", "deleted")},
    "commits": _counter("meshstore_storage_commits_total", "Storage commits (transactions)."),
    "committed_seq": _gauge("meshstore_storage_committed_seq", "The latest change on disk."),
    "pending_changes": _gauge("meshstore_storage_pending_changes", "Changes not yet on disk."),
    "max_pending": _gauge("meshstore_storage_max_pending", "Pending changes beyond which writes wait."),
    "storage_bytes": _gauge("meshstore_storage_bytes", "Size of the data dir's database."),
    "storage_failing": _gauge("meshstore_storage_failing", "1 while commits fail (writes are refused)."),
    "last_commit_age_s": _gauge("meshstore_storage_last_commit_age_seconds", "Seconds since the last commit."),
    "commit_ms_p50": _gauge("meshstore_storage_recent_commit_latency_seconds", _COMMIT_LATENCY, 1e-3,
                            quantile="0.5"),
    "commit_ms_p99": _gauge("meshstore_storage_recent_commit_latency_seconds", _COMMIT_LATENCY, 1e-3,
                            quantile="0.99"),
    "loss_window_ms": _gauge("meshstore_storage_loss_window_seconds",
                             "What a crash now could lose (0 with durability commit).", 1e-3),
}

#: ``GrpcServer.stats()`` (GetStats: ``server.<key>``).
SERVER: Mapping[str, Stat] = {
    "watch_streams": _gauge("meshstore_grpc_watch_streams", "Open gRPC watch streams."),
    "publish_streams": _gauge("meshstore_grpc_publish_streams", "Open gRPC publish streams."),
    "uptime_seconds": _gauge("meshstore_uptime_seconds", "Seconds since the gRPC server started."),
}

#: ``MeshReceiver.stats()`` totals (GetStats: ``mesh.<key>``).
MESH: Mapping[str, Stat] = {
    "streams_open": _gauge("meshstore_mesh_streams_open", "Open mesh Push streams from peers."),
    "refused_self": _counter("meshstore_mesh_refused_self_total", "Push streams refused: from this node."),
    "refused_invalid": _counter("meshstore_mesh_refused_invalid_total", "Push streams refused: bad Hello."),
    "rejected_states": _counter("meshstore_mesh_rejected_states_total",
                                "Replica states from peers refused as invalid."),
}

#: ``MeshReceiver.stats()["peers"]``: per sending node (label ``sender``, its node id).
SENDER: Mapping[str, Stat] = {
    "streams": _counter("meshstore_mesh_received_streams_total", "Push streams opened by the sender."),
    "open_streams": _gauge("meshstore_mesh_received_open_streams", "The sender's open Push streams."),
    "batches": _counter("meshstore_mesh_received_batches_total", "Batches received from the sender."),
    "states": _counter("meshstore_mesh_received_states_total", "Replica states received from the sender."),
    "changed": _counter("meshstore_mesh_received_changed_total", "Received states that changed this store."),
    "rejected": _counter("meshstore_mesh_received_rejected_total", "Received states refused as invalid."),
    "bytes": _counter("meshstore_mesh_received_bytes_total", "Bytes of states received from the sender."),
    "last_seq": _gauge("meshstore_mesh_received_last_seq", "The sender's last seq acknowledged to it."),
}

#: ``Relay.stats()["peers"]``: per link (label ``peer``, its address; GetStats:
#: ``peer.<address>.<key>``).
PEER: Mapping[str, Stat] = {
    "connected": _gauge("meshstore_peer_connected", "1 while the link's Push stream is up."),
    "connects": _counter("meshstore_peer_connects_total", "Push streams opened to the peer."),
    "retries": _counter("meshstore_peer_retries_total", "Failed attempts and broken streams."),
    "full_syncs": _counter("meshstore_peer_full_syncs_total", "Passes over the whole change log."),
    "snapshots": _counter("meshstore_peer_snapshots_total", "Snapshot passes (the peer's cursor expired)."),
    "sent_states": _counter("meshstore_peer_sent_states_total", "Replica states sent."),
    "sent_bytes": _counter("meshstore_peer_sent_bytes_total", "Bytes of states sent."),
    "batches": _counter("meshstore_peer_batches_total", "Batches sent."),
    "empty_batches": _counter("meshstore_peer_empty_batches_total", "Batches carrying only a context summary."),
    "heartbeats": _counter("meshstore_peer_heartbeats_total", "Heartbeats sent on an idle stream."),
    "peer_rejected": _counter("meshstore_peer_rejected_states_total", "States the peer refused as invalid."),
    "peer_changed": _counter("meshstore_peer_changed_states_total", "States that changed the peer."),
    "coalesced": _counter("meshstore_peer_coalesced_total", "Pending states replaced by a newer one unsent."),
    "deferred": _counter("meshstore_peer_budget_deferrals_total", "Sends stopped for lack of budget."),
    "bypassed": _counter("meshstore_peer_budget_bypassed_total", "States sent past the budget (DELETE, HIGH)."),
    "acked_seq": _gauge("meshstore_peer_acked_seq", "This store's seq the peer acknowledged."),
    "acked_once": _gauge("meshstore_peer_acked_once", "1 once the peer acknowledged since the link came up."),
    "lag": _gauge("meshstore_peer_lag", "Changes the peer has not acknowledged (seq - acked_seq)."),
    "pending": _gauge("meshstore_peer_pending", "States waiting for the link's budget."),
    "budget_tokens": _gauge("meshstore_peer_budget_tokens", "Bytes the link's budget allows now."),
    "silent_s": _gauge("meshstore_peer_silent_seconds", "Seconds since the peer was last heard from."),
    "expired": _gauge("meshstore_peer_expired", "1 when silent past peer_expiry (no longer holds deletes)."),
}

#: ``HttpServer.stats()`` (GetStats: ``http.<key>``).
HTTP: Mapping[str, Stat] = {
    "sse_streams": _gauge("meshstore_http_sse_streams", "Open Server-Sent Events streams."),
    "requests_in_flight": _gauge("meshstore_http_requests_in_flight", "HTTP requests being handled."),
    "sse_opened": _counter("meshstore_http_sse_opened_total", "SSE streams opened."),
    "sse_batches": _counter("meshstore_http_sse_batches_total", "SSE messages sent."),
    "sse_events": _counter("meshstore_http_sse_events_total", "Entity events sent over SSE."),
    "sse_resets": _counter("meshstore_http_sse_resets_total", "SSE streams told to reload (fell behind)."),
    "decisions": _counter("meshstore_http_decisions_total", "Approve/deny decisions taken over HTTP."),
}

_FAMILY_OF_KIND: Mapping[str, type[CounterMetricFamily | GaugeMetricFamily]] = {
    "counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


class _Families:
    """The families of one scrape, by name, made at their first sample."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def family(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._by_name:
            self._by_name[name] = make()
        return self._by_name[name]

    def add(self, stats: Mapping[str, Any], table: Mapping[str, Stat], **labels: str) -> None:
        """Every number of ``stats`` that ``table`` names (None: not known yet, left out)."""
        for key, stat in table.items():
            value = stats.get(key)
            if value is None:
                continue
            names = [*labels, *(k for k, _ in stat.labels)]
            family = self.family(stat.name, lambda: _FAMILY_OF_KIND[stat.kind](stat.name, stat.help, labels=names))
            family.add_metric([*labels.values(), *(v for _, v in stat.labels)], float(value) * stat.scale)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


class StatsSource(Protocol):
    """What the collector reads: ``meshstore.node.Node.stats()``'s dict."""

    def stats(self) -> dict[str, Any]: ...


class NodeCollector:
    """A prometheus-client collector over ``node.stats()`` (a Node, or anything giving
    the same dict), read at each scrape."""

    def __init__(self, node: StatsSource) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        stats = self.node.stats()
        out = _Families()
        store = stats["store"]
        out.family("meshstore_node", lambda: InfoMetricFamily(
            "meshstore_node", "This node: its id, incarnation and durability.",
            value={"node_id": store["node_id"], "incarnation": str(store["incarnation"]),
                   "durability": store.get("durability", "memory")}))
        out.add(store, STORE)
        server = stats["server"]
        _add_commit_latency(out, store, server.get("latency_bounds_s"))
        out.add(server, SERVER)
        _add_methods(out, server)
        mesh = stats["mesh"]
        out.add(mesh, MESH)
        for sender, counters in mesh["peers"].items():
            out.add(counters, SENDER, sender=sender)
        if stats["relay"] is not None:
            for address, link in stats["relay"]["peers"].items():
                peer = out.family("meshstore_peer", lambda: InfoMetricFamily(
                    "meshstore_peer", "Each relay link: the node id and incarnation of its peer.", labels=["peer"]))
                peer.add_metric([address], {"node_id": link["node_id"] or "", "incarnation": str(link["incarnation"])})
                out.add(link, PEER, peer=address)
        if stats["http"] is not None:
            out.add(stats["http"], HTTP)
        yield from out


def _cumulative(bounds: list[str], counts: list[int]) -> list[tuple[str, int]]:
    """Prometheus buckets (cumulative) from counts per bucket, the last one beyond every bound."""
    total, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def _bounds(bounds_s: list[float]) -> list[str]:
    return [floatToGoString(b) for b in bounds_s] + ["+Inf"]


def _add_commit_latency(out: _Families, store: Mapping[str, Any], bounds_s: list[float] | None) -> None:
    """The storage commit latency histogram (a node with a data dir), in the same buckets
    as the gRPC latencies (one histogram type in the core serves both)."""
    if "commit_latency_buckets" not in store or bounds_s is None:
        return
    latency = HistogramMetricFamily("meshstore_storage_commit_latency_seconds", "Storage commit latency.",
                                    buckets=_cumulative(_bounds(bounds_s), store["commit_latency_buckets"]),
                                    sum_value=store["commit_latency_sum_s"])
    out.family("meshstore_storage_commit_latency_seconds", lambda: latency)


def _add_methods(out: _Families, server: Mapping[str, Any]) -> None:
    """Per gRPC method (labels ``service``, ``method``): calls, failures by code, and the
    latency histogram from the server's own buckets (counts per bucket, made cumulative)."""
    methods = server.get("methods")  # none before the server starts
    if not methods:
        return
    labels = ["service", "method"]
    bounds = _bounds(server["latency_bounds_s"])
    for path, m in methods.items():
        service, _, method = path.lstrip("/").rpartition("/")
        calls = out.family("meshstore_grpc_calls_total", lambda: CounterMetricFamily(
            "meshstore_grpc_calls_total", "gRPC calls handled, by method.", labels=labels))
        calls.add_metric([service, method], m["calls"])
        for code, count in m["failed"]:
            failed = out.family("meshstore_grpc_failed_calls_total", lambda: CounterMetricFamily(
                "meshstore_grpc_failed_calls_total", "gRPC calls that failed, by method and status code.",
                labels=[*labels, "code"]))
            failed.add_metric([service, method, code], count)
        latency = out.family("meshstore_grpc_latency_seconds", lambda: HistogramMetricFamily(
            "meshstore_grpc_latency_seconds",
            "gRPC call latency by method (to the response head: for streams, the time to open them).",
            labels=labels))
        latency.add_metric([service, method], _cumulative(bounds, m["latency_buckets"]), m["latency_sum_s"])


def node_registry(node: StatsSource) -> CollectorRegistry:
    """A registry holding only the node's collector (no process-global state: several
    nodes in one process each have theirs)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    return registry


class MetricsServer:
    """Serves ``registry`` on ``http://host:port/metrics`` (port 0: any free port, ``.port``
    says which once started); with ``security``, over TLS and to callers whose roles allow
    it (``reader`` and up, as the node's other ports: docs/security.md)."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0,
                 security: ServerSecurity | None = None) -> None:
        self.registry = registry
        self.security = security
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._state = "new"  # -> "started" -> "stopped"

    @property
    def address(self) -> str:
        """host:port (the bound port once started)."""
        return address_of(self.host, self.port)

    async def start(self) -> MetricsServer:
        """Binds and serves. OSError if the address cannot be bound (in use, bad host)."""
        if self._state != "new":
            raise RuntimeError("a metrics server starts once")
        self._state = "started"
        security = self.security
        policy = security.policy if security is not None else None
        app = web.Application(middlewares=[http_middleware(policy)] if policy is not None else [])
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            _, self.port = await listen(runner, self.host, self.port, security, "metrics")
        except BaseException:
            self._state = "stopped"
            raise
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stops listening and closes its connections (a scrape is answered at once: no
        grace is needed). Idempotent."""
        runner, self._runner, self._state = self._runner, None, "stopped"
        if runner is not None:
            await runner.cleanup()
