"""The receiving side of the mesh: ``mesh.v1.MeshService`` over a Store.

A peer's relay (``meshstore.relay``) opens ``Push``, says Hello, and streams batches of
replica states; this servicer answers with its own Hello (with the store's context
summary, and ``resync`` when this node's relay forgot deletes while that peer was away),
merges every state of a batch with ``source`` = the sender's node id, adopts the
sender's context summary when a batch carries one (unless the stream had a state
refused), and acknowledges each batch in order. See ``proto/mesh/v1/mesh.proto``.

Bad input at this boundary never takes the node down:

- a Hello claiming this node's own id: FAILED_PRECONDITION (two nodes share an id, or a
  node lists itself as a peer); an empty id or a stream not starting with Hello:
  INVALID_ARGUMENT; an undecodable message: INVALID_ARGUMENT;
- a state the store refuses (malformed bytes, invalid entity): counted (``stats()``,
  per peer and in total), logged (the first few per stream, then every 1000th),
  skipped; the batch is still acknowledged (with the count in ``Ack.rejected``), so
  the sender neither stalls nor resends it forever;
- a state stamped too far ahead of our clock: merged at once (it competes only with
  writes concurrent to it), counted in ``stats()["skewed_stamps"]``; our clock does not
  follow it;
- a state or summary naming writes of this node that it never made: refused.

``add_mesh_service(server, store)`` registers the service on a ``grpc.aio`` server the
caller owns; ``start_node(store)`` starts one serving the mesh (and the
``EntityStoreService`` when ``meshstore.server`` is importable) for tests and tools.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from meshstore.errors import MeshstoreError
from meshstore.pb import entity_pb2, mesh_pb2
from meshstore.store import Store

try:  # structured key=value logging (meshstore.logs); plain logging works without it
    from meshstore.logs import event as _log_event
except ImportError:  # pragma: no cover
    def _log_event(logger: logging.Logger, level: int, msg: str, /, exc_info: Any = None, **fields: Any) -> None:
        if logger.isEnabledFor(level):
            logger.log(level, "%s %s", msg, " ".join(f"{k}={v}" for k, v in fields.items()), exc_info=exc_info)

__all__ = [
    "PUSH_METHOD",
    "SERVICE_NAME",
    "MeshNode",
    "MeshServicer",
    "add_mesh_service",
    "start_node",
    "summary_entries",
    "summary_of",
]

log = logging.getLogger("meshstore.mesh")

SERVICE_NAME = "mesh.v1.MeshService"
PUSH_METHOD = f"/{SERVICE_NAME}/Push"
#: Largest message a node accepts (a batch is capped well below it by the relay).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Rejected states logged per stream before logging only every _LOG_EVERY-th one.
_LOG_FIRST = 5
_LOG_EVERY = 1000

_NOTHING = object()
# Refusals of bad input: logged without a traceback (anything else gets one).
_BAD_INPUT = (MeshstoreError, ValueError, TypeError)
# What a merge may raise that is not that state's refusal. Anything else, even a
# BaseException such as pyo3's PanicException, refuses that one state only.
_NOT_REFUSALS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)

def summary_entries(dots: Any) -> list[tuple[str, int, int]]:
    """A context summary off the wire (``Dot`` messages) as the store takes it."""
    return [(d.node, d.incarnation, d.counter) for d in dots if d.node]


def summary_of(entries: list[tuple[str, int, int]]) -> list[entity_pb2.Dot]:
    """A store's context summary as ``Dot`` messages."""
    return [entity_pb2.Dot(node=n, incarnation=i, counter=c) for n, i, c in entries]


def _raw_request(data: bytes) -> mesh_pb2.RawPushRequest | None:
    """Decodes a PushRequest keeping each state's bytes; None if undecodable (the
    handler answers INVALID_ARGUMENT instead of gRPC's opaque INTERNAL)."""
    try:
        return mesh_pb2.RawPushRequest.FromString(data)
    except DecodeError:
        return None


@dataclasses.dataclass
class _PeerIn:
    """What one sending node did to us (all its streams)."""

    node_id: str
    incarnation: int = 0
    streams: int = 0
    open_streams: int = 0
    batches: int = 0
    states: int = 0
    changed: int = 0
    rejected: int = 0
    bytes: int = 0
    last_seq: int = 0
    last_error: str = ""
    last_seen: float = 0.0


class MeshServicer:
    """``mesh.v1.MeshService``: merges what peers push into ``store``."""

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a meshstore Store, got {type(store).__name__}")
        self.store = store
        self.incarnation = store.incarnation
        #: This node's relay (meshstore.relay.Relay), if any: it knows which senders
        #: must resync because deletes were forgotten while they were away.
        self.relay: Any = None
        self._peers: dict[str, _PeerIn] = {}
        self.refused_self = 0  # hellos that claimed our own node id
        self.refused_invalid = 0  # streams refused as malformed (no hello, bad message)
        self.rejected_states = 0
        self.streams_open = 0
        self.adopted = 0

    # ---- registration --------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """A generic handler: requests decoded as RawPushRequest (states stay bytes),
        responses pre-serialized."""
        push = grpc.stream_stream_rpc_method_handler(
            self.push, request_deserializer=_raw_request, response_serializer=lambda b: b)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Push": push})

    def add_to_server(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self.handler(),))

    # ---- the RPC -------------------------------------------------------------------------

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                      **fields: Any) -> None:
        _log_event(log, logging.WARNING, "mesh stream refused", code=code.name, reason=message,
                   peer_address=context.peer(), node_id=self.store.node_id, **fields)
        await context.abort(code, message)

    async def push(self, requests: AsyncIterator[mesh_pb2.RawPushRequest | None],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        own = self.store.node_id
        first: Any = await anext(aiter(requests), _NOTHING)
        if first is _NOTHING:
            return  # the sender went away before saying anything
        if first is None or not first.HasField("hello"):
            self.refused_invalid += 1
            what = "an undecodable message" if first is None else "a Batch" if first.HasField("batch") \
                else "an empty message"
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"a Push stream must start with a Hello, got {what}")
            return
        hello = first.hello
        if not hello.node_id:
            self.refused_invalid += 1
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "Hello.node_id is empty")
            return
        if hello.node_id == own:
            self.refused_self += 1
            await self._refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION,
                f"peer claims this node's own id '{own}': two nodes share a node id, "
                f"or a node lists itself as a peer", claimed=hello.node_id)
            return
        sender = hello.node_id
        peer = self._peers.get(sender)
        if peer is None:
            peer = self._peers[sender] = _PeerIn(sender)
        restarted = peer.incarnation not in (0, hello.incarnation)
        peer.incarnation = hello.incarnation
        peer.streams += 1
        peer.open_streams += 1
        self.streams_open += 1
        _log_event(log, logging.INFO, "mesh peer stream opened", node_id=own, peer=sender,
                   peer_incarnation=f"{hello.incarnation:016x}", peer_restarted=restarted,
                   peer_address=context.peer())
        logged = 0
        merge = self.store.merge
        refused_any = False  # a refused state: this stream's summaries cannot be adopted
        resync = self.relay is not None and self.relay.owes_resync(sender)
        resync_until = hello.seq if resync else None  # the sender's whole state is here once a batch reaches it
        _, summary = self.store.context_summary()
        try:
            yield mesh_pb2.PushResponse(hello=mesh_pb2.Hello(
                node_id=own, incarnation=self.incarnation, context=summary_of(summary),
                resync=resync)).SerializeToString()
            async for request in requests:
                if request is None or not request.HasField("batch"):
                    self.refused_invalid += 1
                    what = "an undecodable message" if request is None else "a second Hello" \
                        if request.HasField("hello") else "an empty message"
                    await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                       f"expected a Batch after the Hello, got {what}", peer=sender)
                    return
                if self.relay is not None:
                    self.relay.heard_from(sender)
                if self.relay is not None and self.relay.owes_resync(sender, take=False):
                    # Deletes were forgotten while this sender was away, after its stream
                    # opened: end the stream so it reconnects and is asked to resync.
                    await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                                       "this node forgot deletes while you were away: reconnect and resync",
                                       peer=sender)
                    return
                batch = request.batch
                rejected = changed = 0
                first_error = ""
                for state in batch.states:
                    peer.bytes += len(state)
                    try:
                        if merge(state, source=sender):
                            changed += 1
                    except BaseException as exc:  # noqa: BLE001 - one bad state must not end the stream
                        if isinstance(exc, _NOT_REFUSALS):
                            raise
                        rejected += 1
                        message = f"{type(exc).__name__}: {exc}"
                        first_error = first_error or message
                        peer.last_error = message
                        total = peer.rejected + rejected
                        if logged < _LOG_FIRST or total % _LOG_EVERY == 0:
                            logged += 1
                            _log_event(log, logging.WARNING, "mesh state rejected", node_id=own, peer=sender,
                                       error=message, state_bytes=len(state), rejected_total=total,
                                       exc_info=None if isinstance(exc, _BAD_INPUT) else exc)
                refused_any |= rejected > 0
                if resync_until is not None and batch.last_seq >= resync_until:
                    resync_until = None
                    self.relay.resynced(sender)
                if batch.context and not refused_any:
                    try:
                        self.adopted += self.store.adopt_context(summary_entries(batch.context))
                    except _BAD_INPUT as exc:
                        refused_any = True
                        peer.last_error = f"context summary refused: {exc}"
                        _log_event(log, logging.WARNING, "mesh context summary refused", node_id=own,
                                   peer=sender, error=str(exc))
                peer.batches += 1
                peer.states += len(batch.states)
                peer.changed += changed
                peer.rejected += rejected
                peer.last_seq = batch.last_seq
                peer.last_seen = time.time()
                self.rejected_states += rejected
                yield mesh_pb2.PushResponse(ack=mesh_pb2.Ack(
                    seq=batch.last_seq, rejected=rejected, changed=changed,
                    first_error=first_error[:500])).SerializeToString()
        finally:
            peer.open_streams -= 1
            self.streams_open -= 1
            _log_event(log, logging.INFO, "mesh peer stream closed", node_id=own, peer=sender,
                       batches=peer.batches, states=peer.states, rejected=peer.rejected)

    # ---- observability -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals and, per sending node, streams, batches, states (received, changed
        ours, rejected as bad input), bytes and the last acknowledged seq."""
        return {
            "node_id": self.store.node_id,
            "incarnation": self.incarnation,
            "streams_open": self.streams_open,
            "refused_self": self.refused_self,
            "refused_invalid": self.refused_invalid,
            "rejected_states": self.rejected_states,
            "contexts_adopted": self.adopted,
            "peers": {node: dataclasses.asdict(p) for node, p in self._peers.items()},
        }


def add_mesh_service(server: grpc.aio.Server, store: Store) -> MeshServicer:
    """Registers ``mesh.v1.MeshService`` over ``store`` on ``server`` (before it starts).
    Give the server ``grpc.max_receive_message_length`` >= the relays' batch size
    (``DEFAULT_MAX_MESSAGE_BYTES`` is ample)."""
    servicer = MeshServicer(store)
    servicer.add_to_server(server)
    return servicer


def address_of(host: str, port: int) -> str:
    """host:port to dial (IPv6 hosts bracketed)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclasses.dataclass
class MeshNode:
    """A started node: ``address`` to dial, ``servicer`` for stats, ``stop()``."""

    store: Store
    server: grpc.aio.Server
    servicer: MeshServicer
    host: str
    port: int
    store_service: bool
    _stopped: bool = False

    @property
    def address(self) -> str:
        return address_of(self.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Stops listening and ends open streams (after ``grace`` seconds). The store
        stays open. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)


def _add_store_service(server: grpc.aio.Server, store: Store) -> bool:
    """Adds meshstore.server's EntityStoreService if that module offers it."""
    try:
        from meshstore import server as store_server
    except Exception:  # noqa: BLE001 - optional: any import failure means "not available"
        return False
    servicer_class = getattr(store_server, "EntityStoreServicer", None)
    if servicer_class is None:
        return False
    try:
        servicer = servicer_class(store)
        if hasattr(servicer, "add_to_server"):
            servicer.add_to_server(server)
        else:
            from meshstore.pb import store_pb2_grpc
            store_pb2_grpc.add_EntityStoreServiceServicer_to_server(servicer, server)
    except Exception as exc:  # noqa: BLE001
        _log_event(log, logging.WARNING, "entity store service not added", error=repr(exc))
        return False
    return True


async def start_node(store: Store, host: str = "127.0.0.1", port: int = 0, *,
                     store_service: bool = True,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> MeshNode:
    """Starts a grpc.aio server on ``host:port`` (0: any free port) serving the mesh over
    ``store`` (and the EntityStoreService when available and ``store_service``).
    OSError if the address cannot be bound."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ])
    servicer = add_mesh_service(server, store)
    with_store = store_service and _add_store_service(server, store)
    wanted = address_of(host, port)
    try:
        bound = server.add_insecure_port(wanted)
    except RuntimeError as exc:
        await server.stop(None)
        raise OSError(f"cannot listen on {wanted}: {exc}") from exc
    if not bound:
        await server.stop(None)
        raise OSError(f"cannot listen on {wanted}: address in use or not available")
    await server.start()
    return MeshNode(store, server, servicer, host, bound, with_store)


async def _main() -> None:  # pragma: no cover - manual smoke run: python -m meshstore.mesh
    node = await start_node(Store())
    print(f"mesh node {node.store.node_id} on {node.address}")
    await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_main())
