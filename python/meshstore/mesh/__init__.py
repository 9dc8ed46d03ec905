"""The mesh layer: replication between nodes over gRPC.

- ``meshstore.mesh.relay``: the sending side, :class:`~meshstore.mesh.relay.Relay`
  pushes a store's changes to every peer;
- ``meshstore.mesh.receiver``: the node's side of the receiving end,
  :class:`~meshstore.mesh.receiver.MeshReceiver` (``mesh.v1.MeshService`` itself is
  served by the core's gRPC server, which merges what peers push);
- ``meshstore.mesh.budget``: the per-peer bandwidth budget (token bucket, priorities,
  coalescing);
- ``meshstore.mesh.protocol``: what both sides share (service and method names, message
  sizes, the context summary's wire form).

It sits beside ``meshstore.grpc`` (it may use ``meshstore.grpc.status``; the gRPC layer
never imports the mesh) and below ``meshstore.node``, which composes a store, its gRPC
server, the receiver and a relay. Protocol: docs/mesh.md.
"""
