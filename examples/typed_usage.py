"""A typed user of meshstore's Python API: `make test` checks it with mypy (--strict), so
the package's annotations, its py.typed marker and the stub of the Rust extension
(meshstore/_core.pyi) keep giving users real types, not Any. It also runs as a script.
"""

from __future__ import annotations

from meshstore import Event, Store, UpdateResult
from meshstore.components import POSITION, make_entity, unpack
from meshstore.pb import entity_pb2 as pb


def track(entity_id: str, lat: float, lon: float) -> pb.Entity:
    return make_entity(entity_id, pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=lat, lon=lon))


def latitude(entity: pb.Entity) -> float | None:
    position = unpack(entity, POSITION, pb.PositionComponent)
    return None if position is None else position.lat


def main() -> None:
    with Store(node_id="typed-example") as store:
        result: UpdateResult = store.put(track("track-1", 51.5, -0.12))
        applied: list[str] = result.applied
        print("applied", applied, "created", result.created)
        print("latitude", latitude(store.get("track-1")))
        with store.watch(type_filter=pb.ENTITY_TYPE_TRACK, include_existing=True) as watcher:
            event: Event | None = watcher.get(timeout=1.0)
            if event is not None:
                seq: int = event.seq
                print("event", event.type, event.entity_id, seq, latitude(event.entity))
        store.delete("track-1")
        print("entities", store.stats()["entities"])


if __name__ == "__main__":
    main()
