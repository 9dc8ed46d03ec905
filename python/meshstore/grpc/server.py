"""The gRPC server: ``store.v1.EntityStoreService``, the receiving side of
``mesh.v1.MeshService``, gRPC health and server reflection, served by the Rust core
(tonic, on its own threads) over the store's table. Python starts, drains and stops it;
no call enters Python on its way except GetStats, log lines and the mesh relay's view
of its peers (``mesh`` below). ``meshstore.node.Node`` is what composes a node's server
with its relay and HTTP side: use that.

    server = GrpcServer(store, port=0)
    await server.start()                    # .port, .address
    await server.stop(grace=1.0)

The eight RPCs of the seed system answer its bare messages (``entity.v1.Entity``,
``google.protobuf.Empty``, ...), so its clients work unchanged; what meshstore says
beyond them travels in ``UpdateEntityDetailed``, in UpdateEntity's response metadata
``meshstore-update-result-bin`` (a serialized ``UpdateResult`` without the entity), and
in ``WatchEntityBatches`` (every event ready at the server in one message).

Errors map to status codes in the core (docs/wire.md); each failed request is logged
(logger ``meshstore.grpc.server``) with its method, code, message and peer. With a
``security`` (``meshstore.security.ServerSecurity``) the core serves TLS and checks each
call's identity and roles before its handler (UNAUTHENTICATED / PERMISSION_DENIED,
logged as ``request refused``; docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshstore._core import GrpcServer as _CoreServer
from meshstore.logs import event as log_event
from meshstore.pb import store_pb2
from meshstore.security import ServerSecurity, warn_if_exposed
from meshstore.store import Store
from meshstore.validate import is_number

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SERVICE_NAME",
    "UPDATE_RESULT_METADATA",
    "GrpcServer",
    "MeshHooks",
    "address_of",
    "check_listen_options",
]

SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["EntityStoreService"].full_name
MESH_SERVICE_NAME = "mesh.v1.MeshService"
#: UpdateEntity's response metadata key: a serialized store.v1.UpdateResult (no entity).
UPDATE_RESULT_METADATA = "meshstore-update-result-bin"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The most threads a server may be given: a typo must not start a million.
MAX_WORKERS = 1024
#: Events each watch stream queues before it falls behind (and catches up from the change
#: log), by default. Bigger than a Python watcher's: a consumer keeping up with
#: 1,000-entity batches must never fall behind for a burst. A stuck stream's queue holds
#: this many events; the entity snapshots they point to are shared by every stream, so 100
#: stuck streams cost about 100 x 8192 x 100 bytes beside them.
WATCH_QUEUE = 8192


class MeshHooks(Protocol):
    """What the mesh receiver asks the node (its relay knows which peers owe a resync)."""

    def mesh_opened(self, sender: str) -> bool:
        """A peer opened a Push stream: True if it must resync (send everything)."""

    def mesh_batch(self, sender: str) -> bool:
        """A peer pushed a batch: False if its stream must end (it owes a resync)."""

    def mesh_resynced(self, sender: str) -> None:
        """A peer asked to resync has sent its whole state."""


class _NoMesh:
    """A server without a relay: no peer ever owes a resync."""

    def mesh_opened(self, sender: str) -> bool:
        return False

    def mesh_batch(self, sender: str) -> bool:
        return True

    def mesh_resynced(self, sender: str) -> None:
        pass


class _Hooks:
    """What the core's server calls back (see ``Host`` in rust/server): logs, GetStats'
    numbers, the mesh hooks."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server

    def log(self, level: int, logger: str, message: str, fields: dict[str, str]) -> None:
        log_event(logging.getLogger(logger), level, message, **fields)

    def stats(self) -> list[tuple[str, float]]:
        server = self._server
        values = {k: float(v) for k, v in server.store.stats().items() if isinstance(v, (int, float))}
        own = server.stats()
        values["server.watch_streams"] = float(own["watch_streams"])
        values["server.publish_streams"] = float(own["publish_streams"])
        values["server.uptime_seconds"] = float(own["uptime_seconds"])
        if server.extra_stats is not None:
            values.update((key, float(value)) for key, value in server.extra_stats().items())
        return list(values.items())

    def mesh_opened(self, sender: str) -> bool:
        return self._server.mesh.mesh_opened(sender)

    def mesh_batch(self, sender: str) -> bool:
        return self._server.mesh.mesh_batch(sender)

    def mesh_resynced(self, sender: str) -> None:
        self._server.mesh.mesh_resynced(sender)


def address_of(host: str, port: int) -> str:
    """host:port to dial (IPv6 hosts bracketed)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_listen_options(port: Any, max_message_bytes: Any, watch_queue: Any = WATCH_QUEUE,
                         workers: Any = None) -> None:
    """ValueError unless ``port`` is an int in 0..65535, ``max_message_bytes`` >= 1024,
    ``watch_queue`` >= 1 and ``workers`` None or an int in 1..MAX_WORKERS."""
    if not is_number(port, integer=True) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    if not is_number(max_message_bytes, integer=True) or max_message_bytes < 1024:
        raise ValueError(f"max_message_bytes must be an int >= 1024, got {max_message_bytes!r}")
    if not is_number(watch_queue, integer=True) or watch_queue < 1:
        raise ValueError(f"watch_queue must be an int >= 1, got {watch_queue!r}")
    if workers is not None and (not is_number(workers, integer=True) or not 1 <= workers <= MAX_WORKERS):
        raise ValueError(f"workers must be None (one per CPU) or an int in 1..{MAX_WORKERS}, got {workers!r}")


class GrpcServer:
    """The store service, the mesh receiver (``mesh``: the node's hooks, None without a
    relay), health (SERVING for the server and each service until shutdown) and, with
    ``reflection``, server reflection, over ``store``.

    ``port`` 0 picks any free port (``.port`` says which once started). ``workers``: the
    threads serving connections (None: one per CPU the process may use, affinity and
    cgroup quota counted; ``.workers`` says how many once started). ``extra_stats``:
    numbers GetStats adds to the store's and the server's. ``security``: TLS and the
    roles policy, enforced by the core before any handler (None: plaintext, every call
    allowed); binding beyond loopback without TLS logs a warning."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, reflection: bool = True,
                 extra_stats: Callable[[], Mapping[str, float]] | None = None,
                 mesh: MeshHooks | None = None, security: ServerSecurity | None = None,
                 watch_queue: int = WATCH_QUEUE, workers: int | None = None) -> None:
        check_listen_options(port, max_message_bytes, watch_queue, workers)
        self.security = security
        self.store = store
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.reflection = reflection
        self.watch_queue = watch_queue
        self.workers = workers
        self.extra_stats = extra_stats
        self.mesh: MeshHooks = mesh or _NoMesh()
        self._core: _CoreServer | None = None
        self._state = "new"  # -> "started" -> "closing" -> "stopped"

    @property
    def address(self) -> str:
        """host:port to dial (the bound port once started)."""
        return address_of(self.host, self.port)

    @property
    def services(self) -> list[str]:
        """The full names of the services served (besides health and reflection)."""
        return [SERVICE_NAME, MESH_SERVICE_NAME]

    async def start(self) -> GrpcServer:
        """Binds and starts serving. OSError if the address cannot be bound (in use, bad
        host) or the TLS certificate and key are unusable."""
        if self._state != "new":
            raise RuntimeError("a server starts once")
        host = self.host.strip("[]")
        try:
            socket.getaddrinfo(host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            self._state = "stopped"
            raise OSError(f"cannot listen on {self.address}: {exc.strerror}") from None
        security = self.security
        tls = security.core_tls() if security is not None else None
        policy = security.policy.for_core() if security is not None and security.policy is not None else None
        warn_if_exposed(host, security, "grpc")
        try:
            self._core = await asyncio.to_thread(
                _CoreServer, self.store._core, _Hooks(self), host, self.port, self.max_message_bytes,
                self.reflection, self.watch_queue, self.workers, tls, policy)
        except OSError:
            self._state = "stopped"
            raise
        self.port = self._core.port
        self.workers = self._core.workers
        self._state = "started"
        return self

    def stats(self) -> dict[str, Any]:
        """Open watch and publish streams, seconds since it started, and per method its
        calls, failures by code and latency histogram (``latency_bounds_s``)."""
        if self._core is None or self._state == "stopped":
            return {"watch_streams": 0, "publish_streams": 0, "uptime_seconds": 0.0, "methods": {}}
        return self._core.stats()

    def mesh_stats(self) -> dict[str, Any]:
        """The mesh receiver's counters: totals and, per sending node, streams, batches,
        states (received, changed ours, rejected), bytes and the last acknowledged seq."""
        if self._core is None or self._state == "stopped":
            return {"streams_open": 0, "refused_self": 0, "refused_invalid": 0, "rejected_states": 0,
                    "contexts_adopted": 0, "peers": {}}
        return self._core.mesh_stats()

    async def begin_shutdown(self) -> None:
        """Health NOT_SERVING; open watch streams ended (UNAVAILABLE with their resume
        cursor), open publish streams answered with their summary, open mesh streams
        ended (UNAVAILABLE: the sender retries), new ones refused. Still listening.
        Idempotent."""
        if self._state != "started":
            return
        self._state = "closing"
        await asyncio.to_thread(self._core.begin_shutdown)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Graceful shutdown: ``begin_shutdown``, then no new calls and in-flight calls
        get ``grace`` seconds (None: dropped at once). Idempotent. The store stays open."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        await self.begin_shutdown()
        self._state = "stopped"
        await asyncio.to_thread(self._core.stop, grace)

    async def stop_now(self) -> None:
        """Drops every call at once (also while a graceful ``stop`` waits)."""
        if self._core is not None:
            self._state = "stopped"
            await asyncio.to_thread(self._core.abort)
