"""Shared fixtures and helpers for the store tests.

Helpers are plain functions (import them with ``from conftest import ...``; the ones the
benchmarks share live in helpers.py, which does not depend on pytest fixtures); stores
made through the fixtures are closed after each test so no maintenance timer of a
finished test keeps running on the shared event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import os

import pytest
from google.protobuf import any_pb2
from hypothesis import HealthCheck, settings

from helpers import eventually  # noqa: F401 - re-exported: tests import it from here
from meshstore import NotFoundError, Store
from meshstore.components import make_entity, pack, type_url, unpack
from meshstore.pb import entity_pb2 as pb

TRACK = pb.ENTITY_TYPE_TRACK
ASSET = pb.ENTITY_TYPE_ASSET
GEO = pb.ENTITY_TYPE_GEO

POLL_TIMEOUT = 5.0

#: Hypothesis settings of every property test: deterministic, no example database;
#: MESHSTORE_PROPERTY_EXAMPLES sets the examples per property (the default keeps
#: `make test` short; raise it for a longer run).
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("MESHSTORE_PROPERTY_EXAMPLES", "300")),
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_meshstore_logging() -> Iterator[None]:
    """Commands run in-process configure the meshstore logger (no propagation to the
    root); later tests must see its records through pytest's capture again."""
    logger = logging.getLogger("meshstore")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def make_store() -> Iterator[Callable[..., Store]]:
    """A factory: ``make_store(node_id="b", max_clock_offset=0.5)``; all closed at the end."""
    made: list[Store] = []

    def factory(*args, **kwargs) -> Store:
        store = Store(*args, **kwargs)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture
def store(make_store) -> Store:
    return make_store(node_id="node-a")


@pytest.fixture
def pair(make_store) -> tuple[Store, Store]:
    """Two replicas, ``node-a`` and ``node-b``."""
    return make_store(node_id="node-a"), make_store(node_id="node-b")


# ---- components ---------------------------------------------------------------------------


def position(lat: float, lon: float, alt: float = 0.0) -> pb.PositionComponent:
    return pb.PositionComponent(lat=lat, lon=lon, alt=alt)


def threat(level: int) -> pb.ThreatComponent:
    return pb.ThreatComponent(level=level)


def approval(state: int) -> pb.ApprovalComponent:
    return pb.ApprovalComponent(state=state)


def classification(label: str, confidence: float = 0.9) -> pb.ClassificationComponent:
    return pb.ClassificationComponent(label=label, confidence=confidence)


def source(sensor_id: str) -> pb.SourceComponent:
    return pb.SourceComponent(sensor_id=sensor_id)


def track(entity_id: str, **components) -> pb.Entity:
    return make_entity(entity_id, TRACK, **components)


def raw_component(entity: pb.Entity, key: str, url: str, value: bytes) -> pb.Entity:
    """Sets ``key`` to an Any with exactly this type URL and value bytes."""
    entity.components[key].CopyFrom(any_pb2.Any(type_url=url, value=value))
    return entity


def alive(store: Store, entity_id: str) -> bool:
    """Whether the entity is live in ``store``."""
    try:
        store.get(entity_id)
        return True
    except NotFoundError:
        return False


def threat_level(entity: pb.Entity) -> int:
    return unpack(entity, "threat", pb.ThreatComponent).level


def approval_state(entity: pb.Entity) -> int:
    return unpack(entity, "approval", pb.ApprovalComponent).state


def latlon(entity: pb.Entity) -> tuple[float, float]:
    p = unpack(entity, "position", pb.PositionComponent)
    return p.lat, p.lon


def version_tuple(entity: pb.Entity, key: str) -> tuple[int, int, str]:
    v = entity.versions[key]
    return v.physical, v.logical, v.node


# ---- replication ------------------------------------------------------------------------


def push(src: Store, dst: Store, since: int = 0) -> int:
    """Merges every state ``src`` changed after ``since`` into ``dst``; returns the new cursor."""
    states, last = src.changes_since(since)
    for state in states:
        dst.merge(state)
    return last


def sync(a: Store, b: Store) -> None:
    """Full anti-entropy both ways (twice, so what one side gained flows back)."""
    for _ in range(2):
        push(a, b)
        push(b, a)


# ---- state checks -----------------------------------------------------------------------


def snapshot(store: Store) -> tuple:
    """What a user can observe of a store's contents: the live entities, the counts and seq."""
    stats = store.stats()
    return store.list(), stats["entities"], stats["tombstones"], store.seq


def wait_for(predicate: Callable[[], object], timeout: float = POLL_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


__all__ = [
    "ASSET", "GEO", "TRACK", "approval", "approval_state", "classification", "latlon", "make_entity",
    "pack", "position", "push", "raw_component", "snapshot", "source", "sync", "threat", "threat_level",
    "track", "type_url", "unpack", "version_tuple", "wait_for",
]
