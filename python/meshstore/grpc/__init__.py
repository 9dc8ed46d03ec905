"""The gRPC layer: a store served and reached over gRPC.

- ``meshstore.grpc.server``: ``store.v1.EntityStoreService`` over a Store, health and
  reflection, and :class:`~meshstore.grpc.server.GrpcServer` to start and stop one;
- ``meshstore.grpc.client``: :class:`~meshstore.grpc.client.StoreClient`, the asyncio
  client the services use;
- ``meshstore.grpc.status``: exceptions <-> gRPC status codes, both directions.

Only the store layer below it is imported here (never the mesh, the node or anything
above). Inside this package ``import grpc`` is still grpcio (imports are absolute).
"""
