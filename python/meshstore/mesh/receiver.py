"""The receiving side of the mesh, as the node sees it.

``mesh.v1.MeshService/Push`` itself is served by the core's gRPC server (rust/server/
mesh.rs): a peer's relay opens Push and says Hello, the server answers with its own
Hello (the store's context summary, and ``resync`` when this node's relay forgot deletes
while that peer was away), merges every state of each batch with the sender as source,
adopts the sender's context summary when a batch carries one (unless the stream had a
state refused), and acknowledges each batch once it is durable. A state the store
refuses is counted, logged and skipped; its batch is still acknowledged.

:class:`MeshReceiver` is what that server asks this node (the hooks of
``meshstore.grpc.server.MeshHooks``: does a sender owe a resync, one has resynced) and
where the receiver's counters are read (``stats()``). See ``proto/mesh/v1/mesh.proto``.
"""

from __future__ import annotations

from typing import Any

from meshstore.store import Store

__all__ = ["MeshReceiver"]


class MeshReceiver:
    """The node's side of the mesh receiver: answers from ``relay`` (the node's, if
    any: it knows which senders must resync), counters from ``server`` (the node's
    GrpcServer, once started)."""

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a meshstore Store, got {type(store).__name__}")
        self.store = store
        #: This node's relay (meshstore.mesh.relay.Relay), if any.
        self.relay: Any = None
        #: The node's gRPC server (meshstore.grpc.server.GrpcServer), once started.
        self.server: Any = None

    # ---- hooks the server calls ----------------------------------------------------------

    def mesh_opened(self, sender: str) -> bool:
        """A new stream's Hello: True if ``sender`` must resync (send everything)."""
        return self.relay is not None and self.relay.owes_resync(sender)

    def mesh_batch(self, sender: str) -> bool:
        """A batch arrived: ``sender`` is alive. False if its stream must end because it
        owes a resync that began after the stream opened."""
        if self.relay is None:
            return True
        self.relay.heard_from(sender)
        return not self.relay.owes_resync(sender, take=False)

    def mesh_resynced(self, sender: str) -> None:
        if self.relay is not None:
            self.relay.resynced(sender)

    # ---- observability -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals and, per sending node, streams, batches, states (received, changed
        ours, rejected as bad input), bytes and the last acknowledged seq."""
        found = self.server.mesh_stats() if self.server is not None else {
            "streams_open": 0, "refused_self": 0, "refused_invalid": 0, "rejected_states": 0,
            "contexts_adopted": 0, "peers": {}}
        return {"node_id": self.store.node_id, "incarnation": self.store.incarnation, **found}
