"""The receiving side of the mesh: ``mesh.v1.MeshService`` over a Store.

A peer's relay (``meshstore.mesh.relay``) opens ``Push``, says Hello, and streams batches of
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

``MeshServicer(store).add_to_server(server)`` registers the service on a ``grpc.aio``
server the caller owns (``meshstore.node.Node`` does, beside the store service);
``close_streams()`` ends the open streams at shutdown.
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

from meshstore.errors import MeshstoreError, StorageError
from meshstore.logs import event as _log_event
from meshstore.mesh.protocol import SERVICE_NAME, summary_entries, summary_of
from meshstore.pb import mesh_pb2
from meshstore.store import Store

__all__ = ["MeshServicer"]

log = logging.getLogger("meshstore.mesh.receiver")

# Rejected states logged per stream before logging only every _LOG_EVERY-th one.
_LOG_FIRST = 5
_LOG_EVERY = 1000

_NOTHING = object()
# Refusals of bad input: logged without a traceback (anything else gets one).
_BAD_INPUT = (MeshstoreError, ValueError, TypeError)
# What a merge may raise that is not that state's refusal. Anything else, even a
# BaseException such as pyo3's PanicException, refuses that one state only.
_NOT_REFUSALS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


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
        #: This node's relay (meshstore.mesh.relay.Relay), if any: it knows which senders
        #: must resync because deletes were forgotten while they were away.
        self.relay: Any = None
        self._peers: dict[str, _PeerIn] = {}
        self.refused_self = 0  # hellos that claimed our own node id
        self.refused_invalid = 0  # streams refused as malformed (no hello, bad message)
        self.rejected_states = 0
        self.streams_open = 0
        self.adopted = 0
        self._closing = False
        self._stream_tasks: set[asyncio.Task] = set()

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
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node shutting down")
            return
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
        task = asyncio.current_task()
        if task is not None:
            self._stream_tasks.add(task)
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
                    except StorageError as exc:
                        # Not the state's fault: no ack, so the sender keeps it and retries.
                        await self._refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc), peer=sender)
                        return
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
                try:
                    await self.store.durable()  # an ack lets the sender forget deletes: only once on disk
                except StorageError as exc:
                    await self._refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc), peer=sender)
                    return
                yield mesh_pb2.PushResponse(ack=mesh_pb2.Ack(
                    seq=batch.last_seq, rejected=rejected, changed=changed,
                    first_error=first_error[:500])).SerializeToString()
        except asyncio.CancelledError:
            if not self._closing or task is None:
                raise  # the sender went away
            # close_streams: end the stream with a status the sender's relay retries on.
            task.uncancel()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node shutting down")
        finally:
            self._stream_tasks.discard(task)
            peer.open_streams -= 1
            self.streams_open -= 1
            _log_event(log, logging.INFO, "mesh peer stream closed", node_id=own, peer=sender,
                       batches=peer.batches, states=peer.states, rejected=peer.rejected)

    def close_streams(self) -> None:
        """Ends every open Push stream (UNAVAILABLE: the sender reconnects later, to this
        node or its successor) and refuses new ones: a node shutting down does not wait
        out its grace period for streams that never end by themselves."""
        self._closing = True
        for task in list(self._stream_tasks):
            task.cancel()

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
