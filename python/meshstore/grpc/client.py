"""An asyncio gRPC client of store.v1 for services.

    async with StoreClient("127.0.0.1:50051", name="classifier") as client:
        await client.wait_ready()                 # backoff + jitter until the store answers
        entity = await client.get("track-1")      # NotFoundError, InvalidEntityError... as the Store raises
        async for event in client.watch(type_filter=TRACK, include_existing=True):
            ...                                   # survives store restarts (see WatchStream)

What it adds over a bare stub:

- **Errors** are meshstore's: each gRPC status maps to a ``meshstore.errors`` class
  (``error_from_rpc``, in ``meshstore.grpc.status``); a store that cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED)
  raises ``StoreUnavailableError``, the signal for a service to wait and retry.
- **Security** (``ClientSecurity``, docs/security.md): TLS against a CA, a client
  certificate for mutual TLS, a bearer token. ``open_channel`` is the one way meshstore
  dials a store (this client, the command line, the mesh relay); without a
  ``security`` of its own a channel uses the process's (``use_security``, set by the
  ``meshstore`` command's options) or the environment's (``MESHSTORE_TLS_CA``,
  ``MESHSTORE_TLS_CERT``, ``MESHSTORE_TLS_KEY``, ``MESHSTORE_TOKEN``).
- **Connecting** (``wait_ready``) retries GetStats with exponential backoff and jitter
  (``Backoff``) until the store answers, logging the outage once (not every attempt) and
  how long it lasted. The channel's own reconnect backoff is capped low so a store that
  comes back is found within about a second.
- **Publishing** (``publish``) sends a batch on one PublishEntities stream as a few
  messages of up to 1,024 entities and 1 MiB (``publish_chunks``), each write awaited:
  the stream's flow control, not the caller, paces a publisher the store cannot keep up with.
- **Watching** (``watch`` -> ``WatchStream``) resumes after a disconnect with
  ``since_seq`` = the last event's seq (its resume cursor), so nothing is missed and
  nothing is re-snapshotted. If the store on the other end is a different one (another
  node id, or its seq went backwards: a restarted in-memory store), the cursor means
  nothing there: the stream takes a fresh snapshot and calls ``on_reset`` first. A
  stream that is silent for longer than ``idle_timeout`` (heartbeats are requested) is
  considered dead and reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from meshstore.errors import CursorExpiredError, InvalidEntityError, MeshstoreError
from meshstore.grpc.status import (  # noqa: F401 - re-exported: a client's errors
    FailedPreconditionError,
    RpcError,
    StoreUnavailableError,
    error_for,
    error_from_rpc,
)
from meshstore._core import event_batch_summary
from meshstore.logs import event as log_event
from meshstore.pb import entity_pb2, store_pb2, store_pb2_grpc

__all__ = [
    "DEFAULT_ADDR",
    "Backoff",
    "ClientSecurity",
    "FailedPreconditionError",
    "RpcError",
    "StoreClient",
    "StoreInfo",
    "StoreUnavailableError",
    "UpdateBatcher",
    "UpdateResponse",
    "current_security",
    "WatchStream",
    "error_from_rpc",
    "open_channel",
    "publish_chunks",
    "use_security",
]

log = logging.getLogger("meshstore.grpc.client")

DEFAULT_ADDR = "127.0.0.1:50051"
ENV_ADDR = "MESHSTORE_ADDR"

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    # grpc's own reconnect backoff defaults to 1 s growing to 120 s: a store that comes
    # back would be found minutes late. Our Backoff paces the attempts instead.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# ---- channels ----------------------------------------------------------------------------

#: The environment a client's security is read from when none is given.
ENV_SECURITY = {"ca": "MESHSTORE_TLS_CA", "cert": "MESHSTORE_TLS_CERT", "key": "MESHSTORE_TLS_KEY",
                "token": "MESHSTORE_TOKEN"}


@dataclass(frozen=True)
class ClientSecurity:
    """How a client checks the server and shows who it is (docs/security.md): ``ca``
    (PEM) turns TLS on and is what the server's certificate must chain to (without it,
    a client certificate alone turns TLS on with the system's CAs); ``cert`` and
    ``key`` (PEM) are the client's own certificate for mutual TLS; ``token`` is sent as
    ``authorization: Bearer <token>`` (never logged, never in a repr). A token without
    TLS is only sent to a store on this machine (grpc's local credentials)."""

    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, ca: str | None = None, cert: str | None = None, key: str | None = None,
             token: str | None = None) -> ClientSecurity:
        """From file paths and a token. ValueError for a file that cannot be read or a
        certificate without its key."""
        if (cert is None) != (key is None):
            raise ValueError("a client certificate and its key go together (--tls-cert, --tls-key)")

        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None

        return cls(read(ca, "TLS CA"), read(cert, "TLS certificate"), read(key, "TLS key"), token or None)

    @classmethod
    def from_env(cls) -> ClientSecurity:
        """From MESHSTORE_TLS_CA, MESHSTORE_TLS_CERT, MESHSTORE_TLS_KEY, MESHSTORE_TOKEN."""
        return cls.load(**{name: os.environ.get(var) or None for name, var in ENV_SECURITY.items()})

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's credentials; None: plaintext without a token."""
        if not self.tls and self.token is None:
            return None
        channel = (grpc.ssl_channel_credentials(self.ca, self.key, self.cert) if self.tls
                   else grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP))
        if self.token is None:
            return channel
        return grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(self.token))


_process_security: ClientSecurity | None = None


def use_security(security: ClientSecurity | None) -> None:
    """Sets what channels opened without their own ``security`` use (the ``meshstore``
    command's ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--token``); None: the
    environment again."""
    global _process_security
    _process_security = security


def current_security() -> ClientSecurity:
    """What channels opened without their own ``security`` use: ``use_security``'s, else
    the environment's."""
    return _process_security or ClientSecurity.from_env()


def open_channel(address: str, options: Sequence[tuple[str, Any]], security: ClientSecurity | None = None, *,
                 aio: bool = True) -> Any:
    """The one way meshstore dials a store (clients, services, the CLI, the mesh relay):
    a ``grpc.aio`` channel (``aio=False``: a synchronous one) secured per ``security``
    (None: what ``use_security`` set, else the environment, ``ClientSecurity.from_env``)."""
    credentials = (security or current_security()).credentials()
    module = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(address, options=list(options))
    return module.secure_channel(address, credentials, options=list(options))


# ---- backoff -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt k waits a random time in
    [d * (1 - jitter), d] with d = min(maximum, initial * multiplier**k)."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff {self}: need 0 < initial <= maximum, multiplier >= 1, 0 <= jitter <= 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))
        return base * (1.0 - self.jitter * (rng or random).random())

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt += 1


@dataclass(frozen=True)
class StoreInfo:
    """What GetStats says about the store: its node id and change seq."""

    node_id: str
    seq: int
    values: dict[str, float]


@dataclass(frozen=True)
class UpdateResponse:
    entity: entity_pb2.Entity
    applied: list[str]
    stale: list[str]
    unchanged: list[str]


# ---- publishing --------------------------------------------------------------------------

#: Entities per PublishRequest: the server applies 1,024 at a time (PUBLISH_CHUNK in
#: rust/server/entity_store.rs), so a full message is applied as it arrives.
PUBLISH_MAX_ENTITIES = 1024
#: Bytes of entities per PublishRequest: well under the server's message limit (4 MiB by
#: default), and small enough that the store applies one while the next is on the wire.
PUBLISH_MAX_BYTES = 1 << 20
_PUBLISH_ENTITIES = "/store.v1.EntityStoreService/PublishEntities"
_WATCH_ENTITY_BATCHES = "/store.v1.EntityStoreService/WatchEntityBatches"
#: A repeated field's framing per entity: a tag byte and a length varint (<= 4 bytes up to 256 MiB).
_ENTRY_OVERHEAD = 5


def publish_chunks(entities: Iterable[bytes], max_entities: int = PUBLISH_MAX_ENTITIES,
                   max_bytes: int = PUBLISH_MAX_BYTES) -> Iterator[list[bytes]]:
    """Encoded ``entities`` in order, cut into the ``entities`` of successive
    PublishRequests: at most ``max_entities`` each and, but for an entity bigger than that
    alone, at most ``max_bytes``."""
    chunk: list[bytes] = []
    size = 0
    for entity in entities:
        n = len(entity) + _ENTRY_OVERHEAD
        if chunk and (len(chunk) >= max_entities or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(entity)
        size += n
    if chunk:
        yield chunk


# ---- the client --------------------------------------------------------------------------


class StoreClient:
    """One channel to a store server; every method is a coroutine of the running loop.

    ``name`` labels log lines. ``rpc_timeout`` bounds each unary call (seconds).
    ``security``: TLS and token (None: from the environment, see ``open_channel``)."""

    def __init__(self, address: str = DEFAULT_ADDR, *, name: str = "client", backoff: Backoff | None = None,
                 rpc_timeout: float = 5.0, rng: random.Random | None = None,
                 security: ClientSecurity | None = None) -> None:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"store address must be HOST:PORT, got {address!r}")
        self.address = address.strip()
        self.name = name
        self.backoff = backoff or Backoff()
        self.rpc_timeout = rpc_timeout
        self.security = security
        self._rng = rng or random.Random()
        self._channel: grpc.aio.Channel | None = None
        self._stub: store_pb2_grpc.EntityStoreServiceStub | None = None
        self._publish_entities: grpc.aio.StreamUnaryMultiCallable
        self._watch_batches: grpc.aio.UnaryStreamMultiCallable
        self._closed = False
        #: The last store identity seen (node id), to tell a restarted store from a new one.
        self.node_id: str | None = None
        self.outages = 0
        self.reconnects = 0

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def stub(self) -> store_pb2_grpc.EntityStoreServiceStub:
        return self._connect()[0]

    def _connect(self) -> tuple[store_pb2_grpc.EntityStoreServiceStub, grpc.aio.StreamUnaryMultiCallable,
                                grpc.aio.UnaryStreamMultiCallable]:
        """The stub and the byte-level PublishEntities and WatchEntityBatches, on a channel
        opened at first use."""
        if self._closed:
            raise RuntimeError(f"store client {self.name!r} is closed")
        if self._stub is None:
            self._channel = open_channel(self.address, _CHANNEL_OPTIONS, self.security)
            self._stub = store_pb2_grpc.EntityStoreServiceStub(self._channel)
            # PublishEntities with each entity sent as its encoded bytes: PublishRequestView
            # has PublishRequest's wire form, so a publisher holding bytes (the sims)
            # never builds messages.
            self._publish_entities = self._channel.stream_unary(
                _PUBLISH_ENTITIES, request_serializer=store_pb2.PublishRequestView.SerializeToString,
                response_deserializer=store_pb2.PublishSummary.FromString)
            # WatchEntityBatches as the bytes of each message: a consumer that hands them
            # to the core (fusion) never decodes them in Python.
            self._watch_batches = self._channel.unary_stream(
                _WATCH_ENTITY_BATCHES, request_serializer=store_pb2.WatchEntitiesRequest.SerializeToString,
                response_deserializer=None)
        return self._stub, self._publish_entities, self._watch_batches

    async def close(self) -> None:
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> StoreInfo:
        """GetStats until the store answers, waiting per ``backoff`` between attempts.
        Logs one warning when an outage starts and one line when it ends. TimeoutError
        after ``timeout`` seconds (None: forever; cancel the task to give up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                info = await self.stats()
            except StoreUnavailableError as exc:
                if attempt == 0:
                    self.outages += 1
                    log_event(log, logging.WARNING, "store unavailable; retrying with backoff",
                              client=self.name, store=self.address, error=str(exc))
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
                log_event(log, logging.DEBUG, "retrying", client=self.name, store=self.address,
                          attempt=attempt, delay_s=round(delay, 3))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"store at {self.address} unavailable for {timeout}s") from exc
                    delay = min(delay, left)
                await asyncio.sleep(delay)
                continue
            if attempt:
                self.reconnects += 1
                log_event(log, logging.INFO, "store reachable again", client=self.name, store=self.address,
                          node_id=info.node_id, attempts=attempt, outage_s=round(time.monotonic() - started, 3))
            return info

    # ---- unary calls ---------------------------------------------------------------------

    async def _call(self, what: str, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.rpc_timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise error_from_rpc(err, what, self.address) from None

    async def stats(self) -> StoreInfo:
        resp = await self._call("GetStats", self.stub.GetStats, store_pb2.GetStatsRequest())
        values = dict(resp.values)
        info = StoreInfo(resp.node_id, int(values.get("seq", 0)), values)
        self.node_id = info.node_id
        return info

    async def get(self, entity_id: str) -> entity_pb2.Entity:
        """The live entity with its versions; NotFoundError otherwise."""
        return await self._call("GetEntity", self.stub.GetEntity, store_pb2.GetEntityRequest(id=entity_id))

    async def list(self, type_filter: int = 0) -> list[entity_pb2.Entity]:
        resp = await self._call("ListEntities", self.stub.ListEntities,
                                store_pb2.ListEntitiesRequest(type_filter=type_filter), timeout=max(self.rpc_timeout, 30.0))
        return list(resp.entities)

    async def create(self, entity: entity_pb2.Entity) -> entity_pb2.Entity:
        return await self._call("CreateEntity", self.stub.CreateEntity, store_pb2.CreateEntityRequest(entity=entity))

    async def update(self, entity: entity_pb2.Entity, *, strict: bool = False) -> UpdateResponse:
        """Writes the keys the entity carries against ``entity.versions`` (see Store.update);
        UpdateEntityDetailed says which keys were applied, stale or unchanged."""
        resp = await self._call("UpdateEntityDetailed", self.stub.UpdateEntityDetailed,
                                store_pb2.UpdateEntityRequest(entity=entity, strict=strict))
        return UpdateResponse(resp.entity, list(resp.applied), list(resp.stale), list(resp.unchanged))

    async def update_many(self, entities: Sequence[entity_pb2.Entity], *, strict: bool = False,
                          components: Iterable[str] | None = None) -> list[UpdateResponse | MeshstoreError]:
        """UpdateEntities: each entity written as ``update`` writes it (it must exist), all
        in one call. Each result is its UpdateResponse or, for an entity that failed alone,
        the error ``update`` would have raised. ``components``: the entity in each result
        holds only these keys (and their versions)."""
        request = store_pb2.UpdateEntitiesRequest(entities=entities, strict=strict, components=components or ())
        resp = await self._call("UpdateEntities", self.stub.UpdateEntities, request,
                                timeout=max(self.rpc_timeout, 30.0))
        if len(resp.results) != len(entities):
            raise RpcError(f"UpdateEntities: {len(resp.results)} results for {len(entities)} entities")
        return [error_for(r.error_code, r.error, "UpdateEntities", self.address) if r.error_code
                else UpdateResponse(r.entity, list(r.applied), list(r.stale), list(r.unchanged)) for r in resp.results]

    async def delete(self, entity_id: str) -> None:
        await self._call("DeleteEntity", self.stub.DeleteEntity, store_pb2.DeleteEntityRequest(id=entity_id))

    async def approve(self, entity_id: str) -> entity_pb2.Entity:
        return await self._call("ApproveAction", self.stub.ApproveAction,
                                store_pb2.ApproveActionRequest(entity_id=entity_id))

    async def deny(self, entity_id: str) -> entity_pb2.Entity:
        return await self._call("DenyAction", self.stub.DenyAction, store_pb2.DenyActionRequest(entity_id=entity_id))

    async def publish(self, entities: Iterable[entity_pb2.Entity | bytes]) -> store_pb2.PublishSummary:
        """Upserts a batch (entities, or their encoded bytes) over one PublishEntities
        stream (the ingest path), as few messages as ``publish_chunks`` allows: bad
        entities are counted in the summary (``rejected``, ``errors``) and skipped. Each
        message is awaited until the stream takes it (HTTP/2 flow control), and then the
        summary, so a store that applies slowly slows the publisher down instead of
        messages piling up in memory."""
        _, publish_entities, _ = self._connect()
        call = publish_entities(timeout=max(self.rpc_timeout, 30.0), wait_for_ready=False)
        encoded = (e if isinstance(e, bytes) else e.SerializeToString() for e in entities)
        try:
            try:
                for chunk in publish_chunks(encoded):
                    await call.write(store_pb2.PublishRequestView(entities=chunk))
                await call.done_writing()
            except asyncio.InvalidStateError:
                pass  # the store ended the call early: its status, awaited below, says why
            except grpc.RpcError as err:
                # A write the store's end had already closed: grpc.aio reports INTERNAL in
                # place of the status the store sent (grpc/grpc#36066), UNAVAILABLE or an
                # early summary when it shuts down. The batch was not taken whole either
                # way: the caller retries once the store answers.
                if err.code() != grpc.StatusCode.INTERNAL:
                    raise
                raise StoreUnavailableError(f"PublishEntities: store at {self.address} ended the stream before "
                                            f"the batch was written ({err.details()})") from None
            return await call
        except grpc.RpcError as err:
            raise error_from_rpc(err, "PublishEntities", self.address) from None
        finally:
            call.cancel()  # a no-op once answered; after an error while writing, ends the stream

    async def put(self, entity: entity_pb2.Entity) -> None:
        """Upserts one entity; InvalidEntityError if the store refuses it."""
        summary = await self.publish([entity])
        if summary.rejected:
            raise InvalidEntityError(summary.errors[0] if summary.errors else f"entity '{entity.id}' rejected")

    # ---- watching ------------------------------------------------------------------------

    def watch(self, type_filter: int = 0, *, include_existing: bool = False, since_seq: int | None = None,
              components: Sequence[str] | None = None, min_interval: float = 0.0,
              heartbeat_interval: float = 1.0, idle_timeout: float | None = None,
              on_reset: Callable[[], Awaitable[int | None] | int | None] | None = None) -> WatchStream:
        """A resumable feed of changes (see ``WatchStream``)."""
        return WatchStream(self, type_filter, include_existing, since_seq, components, min_interval,
                           heartbeat_interval, idle_timeout, on_reset)


class UpdateBatcher:
    """Sends many concurrent callers' updates in few UpdateEntities calls: the updates
    that arrive while a call is on its way go together in the next one, so a burst of N
    writes costs a few round trips instead of N, and a lone write goes at once.
    ``update`` answers (or raises) exactly as ``StoreClient.update`` would for its entity.
    ``components``: what the entity in each answer holds (all keys when empty)."""

    def __init__(self, client: StoreClient, *, components: Iterable[str] = (), max_batch: int = 2048) -> None:
        self.client = client
        self.components = list(components)
        self.max_batch = max_batch
        #: UpdateEntities calls made, and the updates they carried.
        self.calls = 0
        self.updates = 0
        self._waiting: list[tuple[entity_pb2.Entity, asyncio.Future[UpdateResponse]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def update(self, entity: entity_pb2.Entity) -> UpdateResponse:
        future: asyncio.Future[UpdateResponse] = asyncio.get_running_loop().create_future()
        self._waiting.append((entity, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="update-batches")
        return await future

    async def close(self) -> None:
        """Cancels the call on its way and the updates waiting (their callers see CancelledError)."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)

    async def _send(self) -> None:
        batch: list[tuple[entity_pb2.Entity, asyncio.Future[UpdateResponse]]] = []
        try:
            while self._waiting:
                batch = [(e, f) for e, f in self._waiting[:self.max_batch] if not f.cancelled()]
                del self._waiting[:self.max_batch]
                if not batch:
                    continue
                results: list[UpdateResponse | BaseException]
                try:
                    results = list(await self.client.update_many([e for e, _ in batch], components=self.components))
                except Exception as exc:  # noqa: BLE001 - the call failed: so did each update in it
                    results = [exc] * len(batch)
                self.calls += 1
                self.updates += len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        finally:
            # Cancelled (the service stops): so are the updates waiting for it.
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting.clear()
            self._sender = None


class WatchStream:
    """``async for event in stream``: store_pb2.EntityEvent objects (never heartbeats).

    An event counts as handled once the consumer asks for the next one; ``cursor`` is then
    its seq. A consumer that could not handle an event (its write failed because the
    store went away) calls ``nack()`` before continuing: the stream reconnects and
    resumes from the previous cursor, so that entity's state comes again.

    Reconnects (after UNAVAILABLE, the server shutting down, or ``idle_timeout`` of
    silence) wait with the client's backoff and resume with ``since_seq=cursor``
    (``resumes`` counts them). Against a different store (node id changed, or its seq is
    below the cursor) or an expired cursor, the stream calls ``on_reset`` (which may return
    a cursor to resume from, e.g. the seq of a snapshot it listed) and otherwise starts
    over: a fresh snapshot if ``include_existing``, else live from the store's current seq
    (``resets`` counts them)."""

    def __init__(self, client: StoreClient, type_filter: int, include_existing: bool, since_seq: int | None,
                 components: Sequence[str] | None, min_interval: float, heartbeat_interval: float,
                 idle_timeout: float | None, on_reset: Callable[[], Any] | None) -> None:
        self.client = client
        self.type_filter = type_filter
        self.include_existing = include_existing
        self.cursor: int | None = since_seq
        self.components = list(components or [])
        self.min_interval = min_interval
        self.heartbeat_interval = heartbeat_interval
        self.idle_timeout = idle_timeout if idle_timeout is not None else max(5.0, 5 * heartbeat_interval)
        self.on_reset = on_reset
        self.resumes = 0
        self.resets = 0
        self.events = 0
        self.connected = False
        self._nacked = False
        self._node_id: str | None = None

    def nack(self) -> None:
        """The last event was not handled: resume from before it (after reconnecting)."""
        self._nacked = True

    def __aiter__(self) -> AsyncIterator[store_pb2.EntityEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[store_pb2.EntityEvent]:
        async with contextlib.aclosing(self._run()) as batches:  # closing this closes the call at once
            async for batch in batches:
                for ev in store_pb2.EntityEventBatch.FromString(batch).events:
                    if ev.type == store_pb2.EVENT_TYPE_HEARTBEAT:
                        self._advance(ev.seq)
                        continue
                    self._nacked = False
                    self.events += 1
                    yield ev
                    if self._nacked:
                        # The rest of the batch comes again: the cursor stops before this event.
                        log_event(log, logging.INFO, "event not handled; resuming from before it",
                                  client=self.client.name, entity_id=ev.entity.id, cursor=self.cursor)
                        break
                    self._advance(ev.seq)

    def batches(self) -> AsyncIterator[bytes]:
        """``async for batch in stream.batches()``: each message as its bytes (an encoded
        EntityEventBatch, heartbeats included), for a consumer that decodes them itself
        (``meshstore._core``). A batch counts as handled once the consumer asks for the
        next; ``nack()`` resumes from before it."""
        return self._batches()

    async def _batches(self) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(self._run()) as batches:
            async for batch in batches:
                events, last_seq = event_batch_summary(batch)
                self.events += events
                yield batch
                if self._nacked:
                    log_event(log, logging.INFO, "batch not handled; resuming from before it",
                              client=self.client.name, cursor=self.cursor)
                    continue
                self._advance(last_seq)

    def _advance(self, seq: int) -> None:
        if self.cursor is None or seq > self.cursor:
            self.cursor = seq

    def _request(self) -> store_pb2.WatchEntitiesRequest:
        request = store_pb2.WatchEntitiesRequest(
            type_filter=self.type_filter, components=self.components,
            min_interval_ms=int(round(self.min_interval * 1000)),
            heartbeat_interval_ms=int(round(self.heartbeat_interval * 1000)))
        if self.cursor is not None:
            request.since_seq = self.cursor
        else:
            request.include_existing = self.include_existing
        return request

    async def _reset(self, why: str, info: StoreInfo) -> None:
        self.resets += 1
        log_event(log, logging.WARNING, "watch cursor not valid on this store; starting over",
                  client=self.client.name, store=self.client.address, reason=why, cursor=self.cursor,
                  node_id=info.node_id, store_seq=info.seq)
        self.cursor = None
        if self.on_reset is not None:
            result = self.on_reset()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            if isinstance(result, int):
                self.cursor = result

    async def _run(self) -> AsyncIterator[bytes]:
        """The watch's messages as bytes, across reconnects; the consumer moves the cursor
        (``_advance``) and sets ``_nacked`` to resume from it."""
        client = self.client
        first = True
        while True:
            info = await client.wait_ready()
            if self._node_id is not None and info.node_id != self._node_id:
                await self._reset(f"store node id changed from {self._node_id}", info)
            elif self.cursor is not None and info.seq < self.cursor:
                await self._reset(f"store seq {info.seq} is below the cursor", info)
            self._node_id = info.node_id
            if self.cursor is None and not self.include_existing:
                self.cursor = info.seq  # live from here; a reconnect resumes from it
            request = self._request()
            # The batched form: every event ready at the server in one message.
            call = client._connect()[2](request, wait_for_ready=False)
            log_event(log, logging.INFO if not first else logging.DEBUG,
                      "watch resumed" if not first else "watching", client=client.name, store=client.address,
                      since_seq=request.since_seq if request.HasField("since_seq") else None,
                      include_existing=request.include_existing)
            first = False
            try:
                while True:
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for drops a
                        # cancellation that races with the read completing.
                        async with asyncio.timeout(self.idle_timeout):
                            batch = await call.read()
                    except TimeoutError:
                        log_event(log, logging.WARNING, "watch silent too long; reconnecting",
                                  client=client.name, store=client.address, idle_timeout_s=self.idle_timeout)
                        break
                    if batch is grpc.aio.EOF:
                        log_event(log, logging.INFO, "watch ended by the store; resuming",
                                  client=client.name, cursor=self.cursor)
                        break
                    self.connected = True
                    yield batch
                    if self._nacked:
                        self._nacked = False
                        await asyncio.sleep(client.backoff.delay(0, client._rng))
                        break
            except grpc.RpcError as err:
                exc = error_from_rpc(err, "WatchEntities", client.address)
                if isinstance(exc, CursorExpiredError):
                    await self._reset(str(exc), StoreInfo(self._node_id or "", -1, {}))
                elif not isinstance(exc, StoreUnavailableError):
                    raise exc from None
                else:
                    log_event(log, logging.WARNING, "watch interrupted; will resume", client=client.name,
                              store=client.address, cursor=self.cursor, error=str(exc))
            finally:
                self.connected = False
                call.cancel()
            self.resumes += 1
