"""The two-store replication walk-through (``python -m meshstore.demo``): concurrent
writes on two replicas that cannot see each other, then a merge both ways, and the
converged picture. The main demo is the live pipeline, ``meshstore demo``
(``meshstore.demo.pipeline``).

It exercises the store's real job in one process: different services writing
different keys never conflict, a writer who read stale state cannot clobber a newer
key, concurrent threat levels keep the higher, and every replica converges.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from meshstore import Store
from meshstore.components import (
    CLASSIFICATION, POSITION, THREAT, VELOCITY, make_entity, pack, unpack,
)
from meshstore.pb import entity_pb2 as pb

THREAT_NAMES = {v: k.removeprefix("THREAT_LEVEL_") for k, v in pb.ThreatLevel.items()}


def exchange(a: Store, b: Store) -> int:
    """Sends each store's changes to the other; returns how many merges changed state."""
    changed = 0
    for src, dst in ((a, b), (b, a)):
        states, _ = src.changes_since(0)
        changed += sum(dst.merge(s, source=src.node_id) for s in states)
    return changed


def describe(entity: pb.Entity) -> dict[str, str]:
    pos = unpack(entity, POSITION, pb.PositionComponent)
    vel = unpack(entity, VELOCITY, pb.VelocityComponent)
    cls = unpack(entity, CLASSIFICATION, pb.ClassificationComponent)
    threat = unpack(entity, THREAT, pb.ThreatComponent)
    return {
        "position": f"{pos.lat:.4f}, {pos.lon:.4f}" if pos else "-",
        "speed": f"{vel.speed:.0f} kts" if vel else "-",
        "class": f"{cls.label} ({cls.confidence:.2f})" if cls else "-",
        "threat": THREAT_NAMES[threat.level] if threat else "-",
        "written by": entity.origin_node,
    }


def picture(title: str, stores: list[Store]) -> Table:
    table = Table(title=title)
    for column in ("node", "entity", "position", "speed", "class", "threat", "written by"):
        table.add_column(column)
    for store in stores:
        for entity in store.list():
            table.add_row(store.node_id, entity.id, *describe(entity).values())
    return table


def run(console: Console | None = None) -> bool:
    """Runs the scenario, printing each step; True if the replicas converged."""
    console = console or Console()
    a, b = Store(node_id="node-a"), Store(node_id="node-b")
    track = make_entity("track-1", pb.ENTITY_TYPE_TRACK,
                        position=pb.PositionComponent(lat=51.5, lon=-0.12),
                        velocity=pb.VelocityComponent(speed=100, heading=90))
    a.create(track)
    exchange(a, b)
    console.print("1. [bold]track-1[/] is created on node-a and replicated to node-b.")

    read_by_classifier = a.get("track-1")
    a.update(make_entity("track-1", position=pb.PositionComponent(lat=51.51, lon=-0.11)))
    read_by_classifier.components[CLASSIFICATION].CopyFrom(
        pack(pb.ClassificationComponent(label="fast-mover", confidence=0.9)))
    read_by_classifier.components[THREAT].CopyFrom(pack(pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW)))
    result = a.update(read_by_classifier)
    console.print(
        "2. node-a: the classifier reads the track; the sensor then writes a newer position; "
        "the classifier writes back the whole entity it read, plus classification and threat LOW.\n"
        f"   applied={result.applied} stale={result.stale}: the sensor's position is kept."
    )

    b.update(make_entity("track-1", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH),
                         velocity=pb.VelocityComponent(speed=400, heading=92)))
    console.print("3. Partitioned from node-a, node-b's radar measures 400 kts and an operator "
                  "there escalates the threat to HIGH, concurrently with node-a's LOW.")
    console.print(picture("While partitioned", [a, b]))

    changed = exchange(a, b)
    console.print(f"4. The partition heals: states go both ways ({changed} merges changed something).")
    console.print(picture("After the merge", [a, b]))

    converged = a.list() == b.list() and a.changes_since(0)[0] == b.changes_since(0)[0]
    final = describe(a.get("track-1"))
    console.print(
        f"Converged: [bold]{'yes' if converged else 'NO'}[/]. Every key merged on its own: the "
        f"sensor's position ({final['position']}), node-b's speed ({final['speed']}), node-a's "
        f"classification ({final['class']}), and of the concurrent threats the higher ({final['threat']})."
    )
    a.close()
    b.close()
    return converged
