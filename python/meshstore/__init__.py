"""meshstore: a replicated entity-component store for high-rate sensor ingest.

A Python API over a Rust core: per-component-key CRDT merge under hybrid logical
clocks, dispatched on each component's protobuf Any type URL.
``__version__`` is the installed distribution's version (pyproject.toml's).
"""

from importlib.metadata import version as _version

from meshstore._core import Event, UpdateResult
from meshstore.errors import (
    AlreadyExistsError,
    ClockSkewError,
    CursorExpiredError,
    InvalidEntityError,
    MeshstoreError,
    NotFoundError,
    StaleWriteError,
)
from meshstore.eventloop import EventLoop
from meshstore.options import StoreOptions
from meshstore.store import Store
from meshstore.watcher import Watcher

__version__ = _version("meshstore")

__all__ = [
    "AlreadyExistsError",
    "ClockSkewError",
    "CursorExpiredError",
    "Event",
    "EventLoop",
    "InvalidEntityError",
    "MeshstoreError",
    "NotFoundError",
    "StaleWriteError",
    "Store",
    "StoreOptions",
    "UpdateResult",
    "Watcher",
    "__version__",
]
