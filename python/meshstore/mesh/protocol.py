"""What both sides of the mesh agree on: the service, its method, message sizes, and the
context summary's wire form. See ``proto/mesh/v1/mesh.proto`` and docs/mesh.md.

A relay (``meshstore.mesh.relay``, sending) opens ``Push`` on a peer's
``mesh.v1.MeshService`` (``meshstore.mesh.receiver``, receiving), says Hello, then
streams batches of replica states; the receiver answers with its own Hello and
acknowledges each batch.
"""

from __future__ import annotations

from typing import Any

from meshstore.pb import entity_pb2

__all__ = ["MAX_MESSAGE_BYTES", "PUSH_METHOD", "SERVICE_NAME", "summary_entries", "summary_of"]

SERVICE_NAME = "mesh.v1.MeshService"
PUSH_METHOD = f"/{SERVICE_NAME}/Push"
#: The largest Push message a relay's channel sends or reads. A relay caps its batches
#: well below it (``Relay(max_batch_bytes=1 MiB)``); the receiving node's server must
#: accept a batch: its ``max_message_bytes`` (4 MiB by default) is ample.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def summary_entries(dots: Any) -> list[tuple[str, int, int]]:
    """A context summary off the wire (``Dot`` messages) as the store takes it."""
    return [(d.node, d.incarnation, d.counter) for d in dots if d.node]


def summary_of(entries: list[tuple[str, int, int]]) -> list[entity_pb2.Dot]:
    """A store's context summary as ``Dot`` messages."""
    return [entity_pb2.Dot(node=n, incarnation=i, counter=c) for n, i, c in entries]
