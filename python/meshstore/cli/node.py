"""The node commands: ``meshstore serve`` runs a node (``meshstore.node.Node``) until
SIGINT/SIGTERM; ``meshstore stats`` shows a running node's counters and health.

    meshstore serve --port 50051 [--peer HOST:PORT ...] [--http-port 8080] [--metrics-port 9100]
                                            run a store, a mesh node with peers, the web UI with
                                            --http-port, Prometheus /metrics with --metrics-port
                                            (Ctrl-C / SIGTERM: graceful stop)
    meshstore stats                         the store's counters and health
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

import typer

from meshstore.errors import StorageError

from meshstore.cli.common import (
    DEFAULT_ADDR,
    EXIT_USAGE,
    CliError,
    DeadlineOpt,
    JsonOpt,
    LogJsonOpt,
    LogLevelOpt,
    StoreOpt,
    channel,
    console,
    print_json,
    rpc_errors,
    setup_logs,
)

__all__ = ["register"]

Durability = Literal["commit", "interval", "memory"]


def _number(value: float) -> int | float:
    return int(value) if math.isfinite(value) and value == int(value) else value


def stats_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Show the store's counters (entities, tombstones, seq, writes, watchers...) and health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from meshstore.pb import store_pb2, store_pb2_grpc

    with channel(store) as ch:
        with rpc_errors(store, "GetStats", deadline):
            resp = store_pb2_grpc.EntityStoreServiceStub(ch).GetStats(
                store_pb2.GetStatsRequest(), timeout=deadline, wait_for_ready=False)
        with rpc_errors(store, "the health check", deadline):
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=deadline, wait_for_ready=False)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
    values = {key: _number(resp.values[key]) for key in sorted(resp.values)}
    if json_out:
        print_json({"node_id": resp.node_id, "health": status, "values": values})
        return
    from rich.table import Table

    from meshstore.cli.data import STORAGE_KEYS, storage_table

    table = Table(title=f"store {resp.node_id} at {store}: {status}", title_justify="left")
    table.add_column("STAT")
    table.add_column("VALUE", justify="right")
    links: dict[str, dict[str, int | float]] = {}
    for key, value in values.items():
        if key.startswith("peer."):  # peer.<address>.<counter>
            address, _, counter = key.removeprefix("peer.").rpartition(".")
            links.setdefault(address, {})[counter] = value
        elif key not in STORAGE_KEYS:  # shown in the storage table
            table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:,.3f}")
    out = console()
    out.print(table)
    out.print(storage_table(values))
    if links:
        columns = ("connected", "sent_states", "sent_bytes", "acked_seq", "lag", "pending", "coalesced",
                   "deferred", "retries", "full_syncs")
        peers = Table(title="mesh peers (this node's relay)", title_justify="left")
        peers.add_column("PEER")
        for column in columns:
            peers.add_column(column.upper(), justify="right")
        for address, link in sorted(links.items()):
            peers.add_row(address, *(f"{link.get(c, 0):,}" for c in columns))
        if not out.is_terminal:  # piped or captured: every column whole, not squeezed into 80
            from rich.measure import Measurement

            out.width = max(out.width, Measurement.get(out, out.options.update_width(1_000_000), peers).maximum)
        out.print(peers)


def serve_cmd(
    port: Annotated[int, typer.Option("--port", "-p", envvar="MESHSTORE_PORT", show_envvar=True, min=0, max=65535,
                                      help="Port to listen on (0: any free port, logged at startup).")] = 50051,
    host: Annotated[str, typer.Option("--host", envvar="MESHSTORE_HOST", show_envvar=True,
                                      help="Interface to bind (0.0.0.0 or :: for every interface).")] = "127.0.0.1",
    http_port: Annotated[int | None, typer.Option(
        "--http-port", envvar="MESHSTORE_HTTP_PORT", show_envvar=True, min=0, max=65535, metavar="PORT",
        help="Also serve the web UI and the HTTP API (docs/http.md) on this port (0: any free port, logged "
             "at startup). Off by default.")] = None,
    http_host: Annotated[str, typer.Option(
        "--http-host", envvar="MESHSTORE_HTTP_HOST", show_envvar=True,
        help="Interface the HTTP side binds (without --auth-file anyone who reaches it can approve).")]
        = "127.0.0.1",
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", envvar="MESHSTORE_METRICS_PORT", show_envvar=True, min=0, max=65535, metavar="PORT",
        help="Also serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port, logged at "
             "startup). Off by default.")] = None,
    metrics_host: Annotated[str | None, typer.Option(
        "--metrics-host", envvar="MESHSTORE_METRICS_HOST", show_envvar=True,
        help="Interface the metrics server binds (default: --host).")] = None,
    node_id: Annotated[str | None, typer.Option("--node-id", envvar="MESHSTORE_NODE_ID", show_envvar=True,
                                                help="This store's node id (default: hostname-random).")] = None,
    peer_expiry: Annotated[float, typer.Option(
        "--peer-expiry", envvar="MESHSTORE_PEER_EXPIRY", show_envvar=True, metavar="S",
        help="Seconds of silence after which a peer no longer holds back forgetting deleted entities "
             "(it rejoins with a full exchange if it returns).")] = 86400.0,
    max_message_bytes: Annotated[int, typer.Option(
        "--max-message-bytes", envvar="MESHSTORE_MAX_MESSAGE_BYTES", show_envvar=True,
        help="Largest gRPC message accepted; bigger ones get RESOURCE_EXHAUSTED.")] = 4 * 1024 * 1024,
    watch_queue: Annotated[int, typer.Option(
        "--watch-queue", envvar="MESHSTORE_WATCH_QUEUE", show_envvar=True, metavar="N",
        help="Events each watch stream queues before it falls behind; a stream behind catches up "
             "with each entity's latest state (bounds memory per stuck watcher).")] = 8192,  # grpc.server.WATCH_QUEUE
    grpc_workers: Annotated[int | None, typer.Option(
        "--grpc-workers", envvar="MESHSTORE_GRPC_WORKERS", show_envvar=True, min=1, max=1024, metavar="N",
        help="Threads serving gRPC connections (default: one per CPU this process may use, CPU "
             "affinity and cgroup quota counted; the listening line says how many).")] = None,  # grpc.server.MAX_WORKERS
    max_entity_bytes: Annotated[int, typer.Option(
        "--max-entity-bytes", envvar="MESHSTORE_MAX_ENTITY_BYTES", show_envvar=True,
        help="Largest entity the store accepts (INVALID_ARGUMENT beyond).")] = 1 << 20,
    grace: Annotated[float, typer.Option("--grace", envvar="MESHSTORE_GRACE", min=0.0, metavar="S",
                                         help="Seconds in-flight calls get to finish at shutdown.")] = 5.0,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
    peers: Annotated[list[str] | None, typer.Option(
        "--peer", envvar="MESHSTORE_PEERS", show_envvar=True, metavar="HOST:PORT",
        help="Another node to replicate to (repeat for each; the env var takes a space-separated list). "
             "Every node of a mesh needs its own --node-id.")] = None,
    peer_dns: Annotated[list[str] | None, typer.Option(
        "--peer-dns", envvar="MESHSTORE_PEER_DNS", show_envvar=True, metavar="NAME:PORT",
        help="A DNS name whose every address is a peer (a Kubernetes headless Service, a compose "
             "service), re-resolved every --peer-dns-interval: peers join and leave at runtime. This "
             "node's own address is left out. Repeatable; combines with --peer.")] = None,
    peer_dns_interval: Annotated[float, typer.Option(
        "--peer-dns-interval", envvar="MESHSTORE_PEER_DNS_INTERVAL", show_envvar=True, min=0.001, metavar="S",
        help="Seconds between resolutions of --peer-dns (a failed one keeps the peers found last).")] = 10.0,
    data_dir: Annotated[str, typer.Option(
        "--data-dir", envvar="MESHSTORE_DATA_DIR", show_envvar=True, metavar="DIR",
        help="Where the node keeps its state (SQLite, created if needed): loaded at start, every "
             "change committed to it.")] = "./meshstore-data",
    in_memory: Annotated[bool, typer.Option(
        "--in-memory", envvar="MESHSTORE_IN_MEMORY", show_envvar=True,
        help="Keep nothing on disk (the state is gone when the process ends).")] = False,
    durability: Annotated[Durability, typer.Option(
        "--durability", envvar="MESHSTORE_DURABILITY", show_envvar=True, case_sensitive=False,
        help="commit: a write is acknowledged once on disk (group commits); interval: committed every "
             "--commit-interval ms (a crash loses at most that window, reported in stats); memory: "
             "same as --in-memory.")] = "commit",
    commit_interval_ms: Annotated[float, typer.Option(
        "--commit-interval", envvar="MESHSTORE_COMMIT_INTERVAL", show_envvar=True, min=1.0, metavar="MS",
        help="Milliseconds between commits with --durability interval.")] = 100.0,
    bandwidth_bps: Annotated[float, typer.Option(
        "--mesh-bandwidth-bps", envvar="MESHSTORE_MESH_BANDWIDTH_BPS", show_envvar=True, min=0.0, metavar="BYTES",
        help="Bytes/s each peer link may send (0: unlimited). DELETE and HIGH-threat changes bypass it; "
             "the rest waits, coalesced to the latest state per entity, and is sent by priority.")] = 0.0,
    burst_bytes: Annotated[float, typer.Option(
        "--mesh-burst-bytes", envvar="MESHSTORE_MESH_BURST_BYTES", show_envvar=True, min=0.0, metavar="BYTES",
        help="Burst of each peer link's budget (0: one second of bandwidth, at least 64 KiB).")] = 0.0,
    tls_cert: Annotated[str | None, typer.Option(
        "--tls-cert", envvar="MESHSTORE_TLS_CERT", show_envvar=True, metavar="PEM",
        help="Serve TLS on every port (gRPC, HTTP, metrics) with this certificate (with --tls-key); "
             "also what the relay shows its peers.")] = None,
    tls_key: Annotated[str | None, typer.Option(
        "--tls-key", envvar="MESHSTORE_TLS_KEY", show_envvar=True, metavar="PEM",
        help="The key of --tls-cert.")] = None,
    tls_ca: Annotated[str | None, typer.Option(
        "--tls-ca", envvar="MESHSTORE_TLS_CA", show_envvar=True, metavar="PEM",
        help="Mutual TLS: clients need a certificate from this CA (optional for them when the auth file "
             "has tokens); the relay checks its peers against it.")] = None,
    auth_file: Annotated[str | None, typer.Option(
        "--auth-file", envvar="MESHSTORE_AUTH_FILE", show_envvar=True, metavar="TOML",
        help="Identities, their roles and token hashes (docs/security.md); every call is then checked. "
             "Without it every caller may do everything.")] = None,
) -> None:
    """Run a store server (gRPC store.v1.EntityStoreService and mesh.v1.MeshService,
    health, reflection) until SIGINT or SIGTERM, then shut down gracefully (open watch
    streams are ended). With --peer (or --peer-dns) it is a mesh node: it pushes its changes to every
    peer and merges theirs. With --http-port it also serves the web UI and the HTTP API,
    with --metrics-port Prometheus /metrics. Logs go to stderr; the first line says
    `listening address=HOST:PORT node_id=N http=HOST:PORT metrics=HOST:PORT`."""
    setup_logs(log_level, log_json)

    from meshstore.node import NodeOptions, run_node
    from meshstore.options import StoreOptions
    from meshstore.security import SecurityError, ServerSecurity

    overrides: dict[str, Any] = {"peer_expiry": peer_expiry, "max_entity_bytes": max_entity_bytes}
    if node_id is not None:
        overrides["node_id"] = node_id
    if not in_memory and durability != "memory":
        overrides.update(path=data_dir, durability=str(durability), commit_interval=commit_interval_ms / 1000)
    try:
        store_options = StoreOptions(**overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid store option: {exc}", EXIT_USAGE) from None
    if max_message_bytes < 1024:
        raise CliError(f"--max-message-bytes must be at least 1024, got {max_message_bytes}", EXIT_USAGE)
    try:
        security = ServerSecurity.load(tls_cert, tls_key, tls_ca, auth_file)
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    try:
        options = NodeOptions(host=host, port=port, max_message_bytes=max_message_bytes, grace=grace,
                              watch_queue=watch_queue, grpc_workers=grpc_workers,
                              peers=_peer_list(peers, "--peer"), peer_dns=_peer_list(peer_dns, "--peer-dns"),
                              peer_dns_interval=peer_dns_interval, bandwidth_bps=bandwidth_bps, burst_bytes=burst_bytes,
                              http_host=http_host, http_port=http_port, metrics_host=metrics_host,
                              metrics_port=metrics_port, security=security,
                              peer_security=_peer_security(security))
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid option: {exc}", EXIT_USAGE) from None
    try:
        run_node(options, store=store_options)  # the node makes the store and closes it
    except (OSError, StorageError) as exc:
        raise CliError(str(exc)) from None


def _peer_security(security: Any) -> Any:
    """How the relay dials its peers: the node's own certificate, checked against its CA,
    with the command's token (``meshstore --token``); without a CA, the command's
    client settings alone."""
    from meshstore.grpc.client import current_security

    client, tls = current_security(), security.tls
    if tls is None or tls.ca_pem is None:
        return client
    return dataclasses.replace(client, ca=tls.ca_pem, cert=tls.cert_pem, key=tls.key_pem)


def _peer_list(peers: list[str] | None, flag: str) -> list[str]:
    """Peer addresses (or names) given to ``flag``, each checked to be HOST:PORT."""
    found = [p for raw in peers or [] for p in raw.replace(",", " ").split()]
    for peer in found:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"{flag} must be HOST:PORT, got {peer!r}", EXIT_USAGE)
    return found


def register(app: typer.Typer) -> None:
    """Adds stats and serve to ``app``."""
    app.command("stats")(stats_cmd)
    app.command("serve")(serve_cmd)
