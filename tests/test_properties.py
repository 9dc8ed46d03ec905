"""Property tests of replication at the Store level (hypothesis).

(a) Three replicas take random puts (position / threat / approval / classification /
    unknown type URLs over a small key set; based on versions or hlc fields read earlier,
    or blind) and deletes, and exchange replica states in random orders with duplicates,
    re-deliveries of old states, and optionally one replica's clock 5 s ahead (its states
    merge at once; the others' clocks do not follow). After a full exchange, every
    replica has the same ``list()`` and the same ``changes_since(0)`` states.
(b) The HLC under random wall-clock jumps: every write's version (and every tombstone) is
    strictly greater than the previous one.
(c) Merge is idempotent and order-independent: the same pool of states (current and
    stale ones) merged in two permutations (with duplicates) into fresh stores gives the
    same result, and merging any of them again changes nothing.

Deterministic (derandomized, no example database). MESHSTORE_PROPERTY_EXAMPLES sets the
number of examples per property (default keeps the file well under 40 s).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from google.protobuf import any_pb2
from hypothesis import event, given
from hypothesis import strategies as st

from meshstore import NotFoundError, StaleWriteError, Store
from conftest import PROPERTY_SETTINGS as SETTINGS
from meshstore.pb import entity_pb2 as pb


PREFIX = "type.googleapis.com/entity.v1."
WIDGET = "type.googleapis.com/acme.Widget"
ENTITIES = ["e0", "e1"]
# "misc" takes any type (so its merge class changes); the others keep theirs.
KEYS = ["position", "threat", "approval", "classification", "misc"]
CONFIDENCES = [0.0, 0.25, 0.5, 0.9, 1.0]
LATS = [-2.0, -0.0, 0.0, 1.0, 1.5, 45.25]


# ---- components ---------------------------------------------------------------------------


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _widget(a: int, b: int) -> any_pb2.Any:
    value = b""
    if a:
        value += b"\x08" + bytes([a])
    if b:
        value += b"\x12\x01" + bytes([ord("a") + b])
    return any_pb2.Any(type_url=WIDGET, value=value)


position_c = st.builds(lambda lat, lon: _pack(pb.PositionComponent(lat=lat, lon=lon)), st.sampled_from(LATS), st.sampled_from(LATS))
threat_c = st.builds(lambda lvl: _pack(pb.ThreatComponent(level=lvl)), st.integers(0, 4))
approval_c = st.builds(lambda s, t: _pack(pb.ApprovalComponent(state=s, timeout_seconds=t)), st.integers(0, 5), st.sampled_from([0, 30]))
classification_c = st.builds(
    lambda label, conf: _pack(pb.ClassificationComponent(label=label, confidence=conf)),
    st.sampled_from(["", "car", "bird"]),
    st.sampled_from(CONFIDENCES),
)
widget_c = st.builds(_widget, st.integers(0, 3), st.integers(0, 2))

COMPONENTS = {
    "position": position_c,
    "threat": threat_c,
    "approval": approval_c,
    "classification": classification_c,
    "misc": st.one_of(widget_c, position_c, classification_c, threat_c, approval_c),
}

components = st.lists(st.sampled_from(KEYS), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: COMPONENTS[k] for k in keys})
)

# ---- operations -------------------------------------------------------------------------------

node = st.integers(0, 2)
other = st.integers(1, 2)  # the receiver is (sender + other) % 3


def _op(kind: str, **strategies):
    return st.fixed_dictionaries({"kind": st.just(kind), **strategies})


put_op = _op(
    "put",
    node=node,
    entity=st.sampled_from(ENTITIES),
    components=components,
    base=st.sampled_from(["blind", "versions", "hlc"]),
    type=st.sampled_from([0, 0, 0, pb.ENTITY_TYPE_TRACK, pb.ENTITY_TYPE_ASSET]),
    strict=st.sampled_from([False, False, False, True]),
)
read_op = _op("read", node=node, entity=st.sampled_from(ENTITIES))
delete_op = _op("delete", node=node, entity=st.sampled_from(ENTITIES))
sync_op = _op("sync", node=node, to=other, seed=st.integers(0, 2**32))

# Repeated entries weight the mix towards writes and exchanges.
operation = st.one_of(
    put_op,
    put_op,
    read_op,
    delete_op,
    sync_op,
    sync_op,
    _op("send", node=node, to=other),
    _op("deliver", pick=st.integers(0, 10**6), keep=st.booleans()),
)

scenario = st.fixed_dictionaries(
    {
        "early": st.lists(operation, min_size=4, max_size=25),
        "late": st.lists(operation, min_size=4, max_size=25),
        "ahead": st.sampled_from([False, True, True]),
        "seed": st.integers(0, 2**32),
    }
)


@dataclass
class Mesh:
    stores: list[Store]
    reads: list[dict[str, pb.Entity]] = field(default_factory=lambda: [{}, {}, {}])
    inflight: list[tuple[int, int, bytes]] = field(default_factory=list)
    merges: int = 0

    def states(self, i: int) -> list[bytes]:
        return [s.SerializeToString(deterministic=True) for s in self.stores[i].changes_since(0)[0]]

    def merge(self, to: int, state: bytes, source: str = "") -> bool:
        self.merges += 1
        return self.stores[to].merge(state, source=source)

    def run(self, op: dict) -> None:
        kind = op["kind"]
        if kind == "read":
            try:
                self.reads[op["node"]][op["entity"]] = self.stores[op["node"]].get(op["entity"])
            except NotFoundError:
                self.reads[op["node"]].pop(op["entity"], None)
        elif kind == "put":
            self.put(op)
        elif kind == "delete":
            try:
                self.stores[op["node"]].delete(op["entity"])
            except NotFoundError:
                pass
        elif kind == "send":
            to = (op["node"] + op["to"]) % 3
            self.inflight += [(op["node"], to, s) for s in self.states(op["node"])]
        elif kind == "sync":
            src, to = op["node"], (op["node"] + op["to"]) % 3
            for s in with_duplicates(self.states(src), random.Random(op["seed"])):
                self.merge(to, s, self.stores[src].node_id)
        elif kind == "deliver" and self.inflight:
            i = op["pick"] % len(self.inflight)
            _, to, state = self.inflight[i] if op["keep"] else self.inflight.pop(i)
            self.merge(to, state)

    def put(self, op: dict) -> None:
        store = self.stores[op["node"]]
        entity = pb.Entity(id=op["entity"], type=op["type"])
        for key, packed in op["components"].items():
            entity.components[key].CopyFrom(packed)
        read = self.reads[op["node"]].get(op["entity"])
        if read is not None and op["base"] == "versions":
            for key in entity.components:
                if key in read.versions:
                    entity.versions[key].CopyFrom(read.versions[key])
        elif read is not None and op["base"] == "hlc":
            entity.hlc_physical, entity.hlc_logical, entity.hlc_node = read.hlc_physical, read.hlc_logical, read.hlc_node
        if op["strict"]:
            try:
                store.update(entity, strict=True)
            except (StaleWriteError, NotFoundError):
                pass
        else:
            store.put(entity)

    def settle(self, rng: random.Random) -> None:
        """Delivers what is in flight, then full exchanges until a round changes nothing."""
        pending = self.inflight
        self.inflight = []
        rng.shuffle(pending)
        for _, to, state in pending:
            self.merge(to, state)
        for _ in range(8):
            changed = False
            pairs = [(i, j) for i, j in itertools.permutations(range(3), 2)]
            rng.shuffle(pairs)
            for src, to in pairs:
                for s in with_duplicates(self.states(src), rng):
                    changed |= self.merge(to, s, self.stores[src].node_id)
            if not changed:
                return
        raise AssertionError("replicas did not quiesce after 8 full exchange rounds")


def with_duplicates(items: list[bytes], rng: random.Random) -> list[bytes]:
    out = items + [s for s in items if rng.random() < 0.35]
    rng.shuffle(out)
    return out


def replica_view(store: Store) -> dict[str, pb.Entity]:
    return {e.id: e for e in store.changes_since(0)[0]}


def make_stores(tag: str, n: int = 3) -> list[Store]:
    # A long maintenance interval: no collection behind the test's back.
    return [Store(node_id=f"{tag}-n{i}", max_clock_offset=0.5, maintenance_interval=3600.0) for i in range(n)]


def close_all(stores: list[Store]) -> None:
    for s in stores:
        s.close()


def assert_identical(stores: list[Store]) -> None:
    first_list, first_view = stores[0].list(), replica_view(stores[0])
    for s in stores[1:]:
        assert s.list() == first_list, f"{s.node_id}'s list() differs from {stores[0].node_id}'s"
        view = replica_view(s)
        assert view.keys() == first_view.keys(), f"{s.node_id} holds other entities"
        for entity_id, state in view.items():
            assert state == first_view[entity_id], (
                f"{s.node_id}'s replica state of {entity_id} differs:\n{state}\nvs {stores[0].node_id}'s:\n{first_view[entity_id]}"
            )


# ---- (a) convergence ----------------------------------------------------------------------------


AHEAD = 5.0


@SETTINGS
@given(scenario)
def test_replicas_converge_after_full_exchange(sc):
    stores = make_stores("conv")
    try:
        mesh = Mesh(stores)
        for op in sc["early"]:
            mesh.run(op)
        if sc["ahead"]:
            stores[2]._core.set_wall_offset(AHEAD)  # its states merge at once on the others
        for op in sc["late"]:
            mesh.run(op)
        mesh.settle(random.Random(sc["seed"]))
        stats = [s.stats() for s in stores]
        event("skewed stamps" if any(st_["skewed_stamps"] for st_ in stats) else "no skew")
        event("stale keys" if any(st_["stale_keys"] for st_ in stats) else "no stale keys")
        event("deletes" if any(st_["tombstones"] for st_ in stats) else "no tombstones")
        assert_identical(stores)
    finally:
        close_all(stores)


# ---- (b) HLC monotonic under wall jumps ----------------------------------------------------------


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.floats(-10.0, 10.0, allow_nan=False),
            st.sampled_from(["put", "put", "put", "delete", "merge"]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_hlc_versions_strictly_increase_under_wall_jumps(steps):
    store, peer = make_stores("hlc", 2)
    try:
        floor: tuple[int, int, str] | None = None  # the last local version, or a newer adopted one
        for i, (offset, action) in enumerate(steps):
            store._core.set_wall_offset(offset)
            if action == "merge":
                # A peer's write, stamped near our clock, is adopted on merge: our later
                # versions must follow it too.
                peer._core.set_wall_offset(offset + 0.3)
                peer.put(pb.Entity(id="p", components={"position": _pack(pb.PositionComponent(lat=i))}))
                for s in peer.changes_since(0)[0]:
                    store.merge(s)
                v = peer.get("p").versions["position"]
                merged = store.replica_state("p")
                if merged is not None and pb.Entity.FromString(merged[0]).versions["position"] == v:
                    floor = max(floor, (v.physical, v.logical, v.node)) if floor else (v.physical, v.logical, v.node)
                continue  # else the peer's clock ran further ahead than ours may follow
            if action == "put":
                result = store.put(pb.Entity(id="t1", components={"position": _pack(pb.PositionComponent(lat=i))}))
                assert result.applied == ["position"], result
                v = result.entity.versions["position"]
            else:
                try:
                    store.delete("t1")
                except NotFoundError:
                    continue
                (state, _) = store.replica_state("t1")
                v = pb.Entity.FromString(state).deleted_version
            now = (v.physical, v.logical, v.node)
            if floor is not None:
                assert now > floor, f"step {i} ({action} at offset {offset:+.3f} s): {now} is not after {floor}"
            floor = now
    finally:
        close_all([store, peer])


# ---- (c) merge is idempotent and order-independent ---------------------------------------------


@SETTINGS
@given(st.lists(operation, min_size=4, max_size=30), st.randoms(use_true_random=False))
def test_merge_is_idempotent_and_order_independent(ops, rng):
    stores = make_stores("pool")
    fresh = make_stores("fresh", 2)
    try:
        mesh = Mesh(stores)
        pool: list[bytes] = []
        for op in ops:
            mesh.run(op)
            for i in range(3):
                pool += mesh.states(i)  # current states, and later stale ones
        pool = list(dict.fromkeys(pool))
        x, y = fresh
        first = pool[:]
        rng.shuffle(first)
        second = with_duplicates(pool, rng)
        for s in first:
            x.merge(s)
        for s in second:
            y.merge(s)
        assert x.list() == y.list()
        assert replica_view(x) == replica_view(y)
        # Idempotent: nothing merged again changes anything.
        seq, before = x.seq, replica_view(x)
        for s in pool:
            assert x.merge(s) is False, "merging a state again changed the store"
        assert x.seq == seq
        assert replica_view(x) == before
        # And the fresh stores agree with the replicas' own join once they are exchanged.
        mesh.settle(rng)
        assert_identical(stores)
        assert replica_view(x) == replica_view(stores[0])
        assert x.list() == stores[0].list()
    finally:
        close_all(stores + fresh)
