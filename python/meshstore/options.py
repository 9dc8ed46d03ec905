"""Store configuration: the seed's functional-options idea as one validated dataclass.

``Store()`` works with defaults; ``Store(StoreOptions(node_id="a"))`` or
``Store(node_id="a", peer_expiry=600)`` override what they name.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket

from meshstore.eventloop import EventLoop
from meshstore.validate import is_number


def default_node_id() -> str:
    """Hostname plus a random suffix, so two stores on one host never share an id."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


DURABILITY_MODES = ("commit", "interval")


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    #: This node's id. None: the data dir's (``path``), else ``default_node_id()``.
    node_id: str | None = None
    #: The data dir (created if needed) the store loads at start and commits to; None:
    #: in memory only, gone with the process.
    path: str | os.PathLike | None = None
    #: With ``path``: ``"commit"`` (a commit follows every change at once; servers
    #: acknowledge a write once it is on disk) or ``"interval"`` (a commit every
    #: ``commit_interval``; a crash loses at most that window).
    durability: str = "commit"
    #: Seconds between commits with ``durability="interval"``.
    commit_interval: float = 0.1
    #: Uncommitted changes beyond which writes wait for the storage writer.
    max_pending: int = 100_000
    #: Seconds a remote version may be ahead of the local wall clock.
    max_clock_offset: float = 0.5
    #: Seconds of silence after which a peer no longer holds back the forgetting of
    #: deleted entities (a delete is kept until every peer acknowledged it). A peer that
    #: returns later rejoins with a full exchange; correctness never depends on it.
    peer_expiry: float = 86400.0
    #: Events a watcher (``Store.watch``) queues before it falls behind (and later catches
    #: up from the change log with each entity's latest state). The gRPC server's watch
    #: streams queue ``meshstore.grpc.server.WATCH_QUEUE`` (8192).
    watch_queue: int = 1024
    #: Largest entity accepted, in bytes.
    max_entity_bytes: int = 1 << 20
    #: The loop that owns this store's timers (TTL expiry, maintenance); default: the
    #: process's shared loop.
    event_loop: EventLoop | None = None
    #: Seconds between maintenance passes (forgetting deleted entities no one needs).
    maintenance_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.node_id is not None and (not isinstance(self.node_id, str) or not self.node_id.strip()):
            raise ValueError(f"node_id must be a non-empty string, got {self.node_id!r}")
        if self.path is not None and (not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path)):
            raise ValueError(f"path must be a non-empty path (the data dir) or None, got {self.path!r}")
        if self.durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, got {self.durability!r}")
        for name in ("max_clock_offset", "peer_expiry", "maintenance_interval", "commit_interval"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("watch_queue", "max_entity_bytes", "max_pending"):
            value = getattr(self, name)
            if not is_number(value, integer=True) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.event_loop is not None and not isinstance(self.event_loop, EventLoop):
            raise TypeError(f"event_loop must be a meshstore EventLoop, got {type(self.event_loop).__name__}")

    def replace(self, **changes: object) -> StoreOptions:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown store option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)
