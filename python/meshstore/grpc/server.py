"""The gRPC server: store.v1.EntityStoreService over a Store, on ``grpc.aio``, with the
standard health service and server reflection.

:class:`GrpcServer` starts and stops one; other services (the mesh receiver) are added
with ``add_service`` before it starts. ``meshstore.node.Node`` is what composes a
node's server (store service, mesh receiver, health) with its relay: use that.

    server = GrpcServer(store, port=0)
    server.add_service(name, register)      # e.g. the mesh receiver, before start()
    await server.start()                    # .port, .address
    await server.stop(grace=1.0)

The eight RPCs of the seed system answer its bare messages (``entity.v1.Entity``,
``google.protobuf.Empty``, ...), so its clients work unchanged; what meshstore says
beyond them travels in ``UpdateEntityDetailed`` and in UpdateEntity's trailing metadata
``meshstore-update-result-bin`` (a serialized ``UpdateResult`` without the entity).

Errors: every store exception maps to a status code (``meshstore.grpc.status``); nothing
escapes as UNKNOWN, and each failed request is logged with its code. Request bytes that
do not decode are INVALID_ARGUMENT (requests are decoded by ``_decoder``, never by grpc,
whose own failure would be UNKNOWN naming a Python class).

Fast paths, measured in benches/bench_grpc.py: WatchEntities sends the core's
pre-serialized ``EntityEvent`` bytes as they are (identity response serializer), and
PublishEntities takes the raw request bytes, slices the entities out of them without
decoding (one per request, or a batch in ``entities``) and upserts whole chunks with
``Store.put_many``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio
from grpc_reflection.v1alpha import reflection

from meshstore.approvals import decide
from meshstore.grpc.status import RpcFailure, status_for
from meshstore.logs import event as log_event
from meshstore.pb import entity_pb2, store_pb2
from meshstore.store import Store
from meshstore.validate import is_number
from meshstore.watcher import Watcher

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SERVICE_NAME",
    "UPDATE_RESULT_TRAILER",
    "EntityStoreServicer",
    "GrpcServer",
    "address_of",
    "check_listen_options",
]

log = logging.getLogger("meshstore.grpc.server")

SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["EntityStoreService"].full_name
#: UpdateEntity's trailing metadata key: a serialized store.v1.UpdateResult (no entity).
UPDATE_RESULT_TRAILER = "meshstore-update-result-bin"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: PublishEntities upserts this many entities per put_many call...
PUBLISH_CHUNK = 1024
#: ...or whatever arrived within this many seconds, so a slow publisher is applied promptly.
PUBLISH_FLUSH_DELAY = 0.005
#: How many rejection messages a PublishSummary carries.
PUBLISH_MAX_ERRORS = 10

# Exceptions that are control flow, never a request error.
_PASSTHROUGH = (asyncio.CancelledError, grpc.aio.AbortError, KeyboardInterrupt, SystemExit, GeneratorExit)
_C = grpc.StatusCode

_CLIENT_ERRORS_AT_WARNING = frozenset({_C.OUT_OF_RANGE, _C.RESOURCE_EXHAUSTED})


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    """Logs a failed request and ends it with its status code (raises AbortError)."""
    code, details = status_for(exc)
    if code is _C.INTERNAL:
        log_event(log, logging.ERROR, "request failed", method=method, code=code.name,
                  error=f"{type(exc).__name__}: {exc}", peer=context.peer(), exc_info=exc)
    else:
        level = logging.WARNING if code in _CLIENT_ERRORS_AT_WARNING else logging.INFO
        log_event(log, level, "request failed", method=method, code=code.name, error=details, peer=context.peer())
    await context.abort(code, details)


@dataclass(frozen=True)
class _Undecodable:
    """What ``_decoder`` gives for request bytes that are not a valid message."""

    type_name: str


def _decoder(message_type: type[Message]) -> Callable[[bytes], Message | _Undecodable]:
    """A request deserializer that never raises: grpc turns a deserializer's exception
    into UNKNOWN; the handler answers ``_Undecodable`` with INVALID_ARGUMENT instead."""
    type_name = message_type.DESCRIPTOR.full_name
    from_string = message_type.FromString

    def decode(raw: bytes) -> Message | _Undecodable:
        try:
            return from_string(raw)
        except DecodeError:
            return _Undecodable(type_name)

    return decode


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Maps every exception of a handler to a status code (never UNKNOWN)."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: EntityStoreServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise RpcFailure(_C.INVALID_ARGUMENT, f"malformed request: the bytes are not a {request.type_name}")
            return await method(self, request, context)
        except _PASSTHROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001 - includes pyo3's PanicException
            await _fail(context, name, exc)

    return handler


def _write(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``_rpc`` for a call that changes the store: answered only once the change is as
    durable as the store promises (``Store.durable``: on disk with ``commit``)."""
    @functools.wraps(method)
    async def durable(self: EntityStoreServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = await method(self, request, context)
        await self.store.durable()
        return response

    return _rpc(durable)


def _entity_of(request: Any) -> entity_pb2.Entity:
    if not request.HasField("entity"):
        raise RpcFailure(_C.INVALID_ARGUMENT, "request has no entity")
    return request.entity


# ---- wire helpers (PublishEntities fast path) -------------------------------------------

def _publish_payloads(raw: bytes) -> tuple[list[bytes], str | None]:
    """The serialized entities of a serialized PublishRequest, or ([], why not).

    Fast path: the request is exactly one field 1 spanning the message (what every
    protobuf encoder writes for a single entity), so the entity bytes are a slice.
    Anything else is read through the bytes view (batches in field 2, repeated fields,
    unknown fields); the entities themselves are never decoded here."""
    n = len(raw)
    if n >= 2 and raw[0] == 0x0A:
        length, pos, shift = 0, 1, 0
        while pos < n and pos < 11:
            b = raw[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                if pos + length == n:
                    return [raw[pos:]], None
                break
            shift += 7
    try:
        view = store_pb2.PublishRequestView.FromString(raw)
    except DecodeError as exc:
        return [], f"malformed PublishRequest: {exc}"
    # Field 1 may repeat (protobuf merges the occurrences): decode it properly.
    single = [store_pb2.PublishRequest.FromString(raw).entity.SerializeToString()] if view.entity else []
    payloads = single + list(view.entities)
    if not payloads:
        return [], "publish request has no entity"
    return payloads, None


def _heartbeat_bytes(seq: int) -> bytes:
    return store_pb2.EntityEvent(type=store_pb2.EVENT_TYPE_HEARTBEAT, seq=seq).SerializeToString()


@dataclass
class _Tally:
    applied: int = 0
    stale: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    def count(self, result: Any) -> None:
        # Stale: every key written was stale (nothing applied, nothing equal to it).
        if result.stale and not result.applied and not result.unchanged:
            self.stale += 1
        else:
            self.applied += 1

    def reject(self, message: str) -> None:
        self.rejected += 1
        if len(self.errors) < PUBLISH_MAX_ERRORS:
            self.errors.append(message)

    def summary(self) -> store_pb2.PublishSummary:
        return store_pb2.PublishSummary(applied=self.applied, stale=self.stale,
                                        rejected=self.rejected, errors=self.errors)


@dataclass(eq=False)
class _Stream:
    """An open WatchEntities stream, so shutdown can end it."""

    watcher: Watcher
    task: asyncio.Task | None
    parked: bool = False  # waiting in Watcher.aget: only then is it cancelled
    shutdown: bool = False


class EntityStoreServicer:
    """store.v1.EntityStoreService over a Store. Register with ``add_to_server``.

    ``extra_stats``: numbers GetStats reports besides the store's and the server's (a
    node adds its mesh receiver's and relay's)."""

    def __init__(self, store: Store, extra_stats: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.store = store
        self.extra_stats = extra_stats
        self._streams: set[_Stream] = set()
        # Open PublishEntities calls: shutdown cancels their read and they answer a summary.
        self._publishers: set[asyncio.Task] = set()
        self._closing = False
        self._started = time.monotonic()

    # ---- registration --------------------------------------------------------------

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        s = store_pb2
        entity = entity_pb2.Entity.SerializeToString

        def unary(handler: Callable[..., Awaitable[Any]], request: type[Message],
                  response: Callable[[Any], bytes]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(handler, _decoder(request), response)

        handlers = {
            "CreateEntity": unary(self.CreateEntity, s.CreateEntityRequest, entity),
            "GetEntity": unary(self.GetEntity, s.GetEntityRequest, entity),
            "ListEntities": unary(self.ListEntities, s.ListEntitiesRequest, s.ListEntitiesResponse.SerializeToString),
            "UpdateEntity": unary(self.UpdateEntity, s.UpdateEntityRequest, entity),
            "DeleteEntity": unary(self.DeleteEntity, s.DeleteEntityRequest, empty_pb2.Empty.SerializeToString),
            # Responses are already serialized EntityEvent bytes: no serializer.
            "WatchEntities": grpc.unary_stream_rpc_method_handler(
                self.WatchEntities, _decoder(s.WatchEntitiesRequest), None),
            "ApproveAction": unary(self.ApproveAction, s.ApproveActionRequest, entity),
            "DenyAction": unary(self.DenyAction, s.DenyActionRequest, entity),
            "UpdateEntityDetailed": unary(self.UpdateEntityDetailed, s.UpdateEntityRequest,
                                          s.UpdateResult.SerializeToString),
            # Requests arrive as raw bytes: the entity is sliced out, not decoded.
            "PublishEntities": grpc.stream_unary_rpc_method_handler(
                self.PublishEntities, None, s.PublishSummary.SerializeToString),
            "GetStats": unary(self.GetStats, s.GetStatsRequest, s.GetStatsResponse.SerializeToString),
        }
        missing = set(store_pb2.DESCRIPTOR.services_by_name["EntityStoreService"].methods_by_name) - set(handlers)
        assert not missing, f"RPCs without a handler: {sorted(missing)}"
        return handlers

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = self.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    # ---- unary RPCs ----------------------------------------------------------------

    @_write
    async def CreateEntity(self, request: store_pb2.CreateEntityRequest, context: Any) -> entity_pb2.Entity:
        return self.store.create(_entity_of(request))

    @_rpc
    async def GetEntity(self, request: store_pb2.GetEntityRequest, context: Any) -> entity_pb2.Entity:
        return self.store.get(request.id)

    @_rpc
    async def ListEntities(self, request: store_pb2.ListEntitiesRequest, context: Any) -> store_pb2.ListEntitiesResponse:
        return store_pb2.ListEntitiesResponse(entities=self.store.list(request.type_filter))

    @_write
    async def UpdateEntity(self, request: store_pb2.UpdateEntityRequest, context: Any) -> entity_pb2.Entity:
        result = self.store.update(_entity_of(request), strict=request.strict)
        keys = store_pb2.UpdateResult(applied=result.applied, stale=result.stale, unchanged=result.unchanged)
        context.set_trailing_metadata(((UPDATE_RESULT_TRAILER, keys.SerializeToString()),))
        return result.entity

    @_write
    async def UpdateEntityDetailed(self, request: store_pb2.UpdateEntityRequest, context: Any) -> store_pb2.UpdateResult:
        result = self.store.update(_entity_of(request), strict=request.strict)
        return store_pb2.UpdateResult(entity=result.entity, applied=result.applied, stale=result.stale,
                                      unchanged=result.unchanged)

    @_write
    async def DeleteEntity(self, request: store_pb2.DeleteEntityRequest, context: Any) -> empty_pb2.Empty:
        self.store.delete(request.id)
        return empty_pb2.Empty()

    @_write
    async def ApproveAction(self, request: store_pb2.ApproveActionRequest, context: Any) -> entity_pb2.Entity:
        return decide(self.store, request.entity_id, entity_pb2.APPROVAL_STATE_APPROVED)

    @_write
    async def DenyAction(self, request: store_pb2.DenyActionRequest, context: Any) -> entity_pb2.Entity:
        return decide(self.store, request.entity_id, entity_pb2.APPROVAL_STATE_DENIED)

    @_rpc
    async def GetStats(self, request: store_pb2.GetStatsRequest, context: Any) -> store_pb2.GetStatsResponse:
        stats = self.store.stats()
        values = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        values["server.watch_streams"] = float(len(self._streams))
        values["server.uptime_seconds"] = round(time.monotonic() - self._started, 3)
        if self.extra_stats is not None:
            values.update((key, float(value)) for key, value in self.extra_stats().items())
        return store_pb2.GetStatsResponse(node_id=self.store.node_id, values=values)

    # ---- streams -------------------------------------------------------------------

    @_rpc
    async def WatchEntities(self, request: store_pb2.WatchEntitiesRequest, context: Any) -> None:
        if self._closing:
            raise RpcFailure(_C.UNAVAILABLE, "server shutting down")
        store = self.store
        since = request.since_seq if request.HasField("since_seq") else None
        # The resume cursor this stream has reached (read before the watch starts; a
        # snapshot is only complete once delivered, so it starts from 0).
        cursor = since if since is not None else 0 if request.include_existing else store.seq
        watcher = store.watch(
            type_filter=request.type_filter,
            include_existing=request.include_existing,
            since_seq=since,
            components=list(request.components) or None,
            min_interval=request.min_interval_ms / 1000.0,
        )
        heartbeat = request.heartbeat_interval_ms / 1000.0 or None
        stream = _Stream(watcher, asyncio.current_task())
        self._streams.add(stream)
        write = context.write
        aget = watcher.aget
        clock = asyncio.get_running_loop().time
        last_write = clock()
        try:
            while True:
                wait = None if heartbeat is None else max(0.001, heartbeat - (clock() - last_write))
                stream.parked = True
                ev = await aget(wait)
                stream.parked = False
                if ev is not None:
                    await write(ev.to_bytes())
                    cursor = ev.seq  # the core's resume cursor for this event
                    last_write = clock()
                    continue
                if watcher.closed:
                    break
                if heartbeat is None or clock() - last_write < heartbeat:
                    continue
                # Idle for a heartbeat interval. The store's seq is a safe cursor only
                # if nothing is queued or held back for this watcher.
                seq = store.seq
                pending = watcher.stats()
                if pending["queued"]:
                    continue
                if not pending["held"]:
                    cursor = max(seq, cursor)
                await write(_heartbeat_bytes(cursor))
                last_write = clock()
        except asyncio.CancelledError:
            if not stream.shutdown:
                raise  # the client went away
            if stream.task is not None:
                stream.task.uncancel()
        finally:
            stream.parked = False
            self._streams.discard(stream)
            watcher.close()
        why = "server shutting down" if self._closing else "watch closed by the server"
        raise RpcFailure(_C.UNAVAILABLE, f"{why}; resume with since_seq={cursor}")

    @_write
    async def PublishEntities(self, requests: AsyncIterator[bytes], context: Any) -> store_pb2.PublishSummary:
        # Read with context.read(), not `async for` over `requests`: measured ~1.5x
        # faster per message (benches/bench_grpc.py).
        if self._closing:
            raise RpcFailure(_C.UNAVAILABLE, "server shutting down")
        task = asyncio.current_task()
        tally = _Tally()
        chunk: list[bytes] = []
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def flush() -> None:
            nonlocal timer
            if timer is not None:
                timer.cancel()
                timer = None
            if chunk:
                batch = chunk.copy()
                chunk.clear()
                self._apply(batch, tally)

        read = context.read
        eof = grpc.aio.EOF
        if task is not None:
            self._publishers.add(task)
        try:
            while (raw := await read()) is not eof:
                payloads, error = _publish_payloads(raw)
                if error is not None:
                    tally.reject(error)
                    continue
                chunk.extend(payloads)
                if len(chunk) >= PUBLISH_CHUNK:
                    flush()
                elif timer is None:
                    timer = loop.call_later(PUBLISH_FLUSH_DELAY, flush)
        except asyncio.CancelledError:
            if not self._closing or task is None:
                raise  # the client went away
            # Shutdown drains the stream: stop reading, answer what was applied.
            task.uncancel()
            log_event(log, logging.INFO, "publish stream drained at shutdown", peer=context.peer())
        finally:
            self._publishers.discard(task)
            flush()  # what arrived is applied, even if the client went away
        if tally.rejected:
            log_event(log, logging.INFO, "publish rejected entities", rejected=tally.rejected,
                      applied=tally.applied, stale=tally.stale, first_error=tally.errors[0], peer=context.peer())
        return tally.summary()

    def _apply(self, batch: list[bytes], tally: _Tally) -> None:
        """Upserts a chunk; never raises. put_many is all-or-nothing, so a chunk with
        a bad entity is redone one entity at a time to apply the good ones."""
        try:
            results = self.store.put_many(batch)
        except _PASSTHROUGH:
            raise
        except BaseException:  # noqa: BLE001 - bad input (or a core panic): go one by one
            results = None
        if results is not None:
            for result in results:
                tally.count(result)
            return
        put = self.store.put
        for payload in batch:
            try:
                tally.count(put(payload))
            except _PASSTHROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001
                code, details = status_for(exc)
                if code is _C.INTERNAL:
                    log_event(log, logging.ERROR, "publish: entity failed", error=f"{type(exc).__name__}: {exc}",
                              exc_info=exc)
                tally.reject(details)

    # ---- shutdown ------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        """Open WatchEntities streams."""
        return len(self._streams)

    @property
    def open_publishers(self) -> int:
        """Open PublishEntities streams."""
        return len(self._publishers)

    def close_streams(self) -> None:
        """Ends every open watch stream (UNAVAILABLE with its resume cursor) and every
        open publish stream (answered with the summary of what it applied), and
        refuses new ones."""
        self._closing = True
        for stream in list(self._streams):
            stream.shutdown = True
            stream.watcher.close()
            if stream.parked and stream.task is not None:
                stream.task.cancel()
        # A publish handler's only await is its read: the cancel lands there.
        for task in list(self._publishers):
            task.cancel()


class _CallTasks(grpc.aio.ServerInterceptor):
    """Keeps the tasks grpc.aio runs this server's calls in (the interceptor runs in the
    call's own task), so that ``stop`` can wait for exactly these."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        task = asyncio.current_task()
        if task is not None and task not in self.tasks:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await continuation(handler_call_details)

    async def wait(self, timeout: float) -> None:
        """Waits (bounded) for the calls' tasks to finish. A stopped server does not wait
        for the calls it cancelled (a client gone, or the grace period over); their
        tasks end a few loop turns later. A caller that closes its event loop first
        would have them die with CancelledError tracebacks on stderr."""
        current = asyncio.current_task()
        calls = {t for t in self.tasks if t is not current}
        if calls:
            await asyncio.wait(calls, timeout=timeout)


def _check_bindable(host: str, port: int, wanted: str) -> None:
    """Binds (and releases) the address first: a taken port or unknown host is then a
    clear OSError instead of grpc core's log line and generic failure."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {wanted}: {exc.strerror}") from None
    if port == 0:
        return
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise OSError(f"cannot listen on {wanted}: {exc.strerror or exc}") from None



def address_of(host: str, port: int) -> str:
    """host:port to dial (IPv6 hosts bracketed)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_listen_options(port: Any, max_message_bytes: Any) -> None:
    """ValueError unless ``port`` is an int in 0..65535 and ``max_message_bytes`` >= 1024."""
    if not is_number(port, integer=True) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    if not is_number(max_message_bytes, integer=True) or max_message_bytes < 1024:
        raise ValueError(f"max_message_bytes must be an int >= 1024, got {max_message_bytes!r}")


_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class _WatchEnded(Exception):
    """Ends a health Watch stream once it has sent NOT_SERVING at shutdown."""


class _Health(_health_aio.HealthServicer):
    """The standard health service, except that at shutdown a Watch stream ends (OK)
    right after it has sent NOT_SERVING: like the store's watch streams, it would
    otherwise hold a graceful stop for the whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = False

    async def enter_graceful_shutdown(self) -> None:
        self.shutting_down = True
        await super().enter_graceful_shutdown()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        health = self

        class Context:
            """The call's context, whose write ends the stream once shutdown began."""

            def __getattr__(self, name: str) -> Any:
                return getattr(context, name)

            async def write(self, message: Any) -> None:
                await context.write(message)
                if health.shutting_down:
                    raise _WatchEnded

        try:
            await super().Watch(request, Context())
        except _WatchEnded:
            return


class GrpcServer:
    """A ``grpc.aio`` server serving ``store.v1.EntityStoreService`` over ``store``, the
    health service (SERVING for the server and each service until shutdown) and, with
    ``reflection``, server reflection; plus the services registered with
    ``add_service`` before ``start()``.

    ``port`` 0 picks any free port (``.port`` says which once started). ``extra_stats``
    goes to the servicer (numbers GetStats adds)."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, reflection: bool = True,
                 extra_stats: Callable[[], Mapping[str, float]] | None = None) -> None:
        check_listen_options(port, max_message_bytes)
        self.store = store
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.reflection = reflection
        self.servicer = EntityStoreServicer(store, extra_stats)
        self.health = _Health()
        self.server: grpc.aio.Server | None = None
        self._calls = _CallTasks()
        self._services: list[tuple[str, Callable[[grpc.aio.Server], Any]]] = [(SERVICE_NAME, self.servicer.add_to_server)]
        self._state = "new"  # -> "started" -> "closing" -> "stopped"
        self._started = 0.0

    @property
    def address(self) -> str:
        """host:port to dial (the bound port once started)."""
        return address_of(self.host, self.port)

    @property
    def services(self) -> list[str]:
        """The full names of the services served (besides health and reflection)."""
        return [name for name, _ in self._services]

    def add_service(self, name: str, register: Callable[[grpc.aio.Server], Any]) -> None:
        """Serves one more service: ``register(server)`` adds its handlers to the
        ``grpc.aio`` server; health and reflection then name it too. Before ``start()``."""
        if self._state != "new":
            raise RuntimeError("services are added before the server starts")
        self._services.append((name, register))

    async def start(self) -> GrpcServer:
        """Binds and starts serving. OSError if the address cannot be bound (in use, bad
        host)."""
        if self._state != "new":
            raise RuntimeError("a server starts once")
        self._state = "starting"
        server = grpc.aio.server(interceptors=[self._calls], options=[
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Without this, a second server on the same port would share it silently.
            ("grpc.so_reuseport", 0),
        ])
        for _, register in self._services:
            register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.reflection:
            reflection.enable_server_reflection((*self.services, _HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        wanted = address_of(self.host, self.port)
        try:
            _check_bindable(self.host, self.port, wanted)
            try:
                bound = server.add_insecure_port(wanted)
            except RuntimeError as exc:
                bound, reason = 0, str(exc)
            else:
                reason = ""
            if not bound:
                raise OSError(f"cannot listen on {wanted}: address in use or not available"
                              f"{': ' + reason if reason else ''}")
        except OSError:
            self._state = "stopped"
            await server.stop(None)
            raise
        await server.start()
        self.server, self.port, self._started = server, bound, time.monotonic()
        self._state = "started"
        return self

    def stats(self) -> dict[str, Any]:
        """Open watch and publish streams, seconds since it started."""
        return {"watch_streams": self.servicer.open_streams, "publish_streams": self.servicer.open_publishers,
                "uptime_seconds": round(time.monotonic() - self._started, 3) if self.server else 0.0}

    async def begin_shutdown(self) -> None:
        """Health NOT_SERVING; open watch streams ended (UNAVAILABLE with their resume
        cursor), open publish streams answered with their summary, new ones refused.
        Still listening. Idempotent."""
        if self._state != "started":
            return
        self._state = "closing"
        await self.health.enter_graceful_shutdown()
        self.servicer.close_streams()

    async def stop(self, grace: float | None = 5.0) -> None:
        """Graceful shutdown: ``begin_shutdown``, then no new calls and in-flight calls
        get ``grace`` seconds (None: cancelled at once). Idempotent. The store stays
        open."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        await self.begin_shutdown()
        self._state = "stopped"
        await self.server.stop(grace)
        await self._calls.wait(timeout=2.0)

    async def stop_now(self) -> None:
        """Cancels every call at once (also while a graceful ``stop`` waits)."""
        if self.server is not None:
            await self.server.stop(None)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)
