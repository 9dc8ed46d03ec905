"""The causal model (issue 8) through the public Python API: dots, causal contexts,
siblings, deletes without resurrection, clock skew, limits that replicate, bad input.

Each case of the issue's list is one test, played with two to four in-memory stores that
exchange ``changes_since`` / ``merge`` states (no network). Then hypothesis properties:
convergence of random interleavings over four replicas, a concurrent HIGH never lost, no
resurrection of what a deleter saw, and mutated states never crashing a store.

Knobs: MESHSTORE_PROPERTY_EXAMPLES (examples per property, default keeps the file short),
MESHSTORE_CHURN_SECONDS (run the churn tests for that long instead of a fixed count).
"""

from __future__ import annotations

import os
import random
import time

import pytest
from google.protobuf import any_pb2, wrappers_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshstore import (
    ClockSkewError,
    InvalidEntityError,
    MeshstoreError,
    NotFoundError,
    StaleWriteError,
    Store,
)
from meshstore.components import make_entity, unpack
from conftest import PROPERTY_SETTINGS as SETTINGS, alive
from meshstore.pb import entity_pb2 as pb

TRACK = pb.ENTITY_TYPE_TRACK
NONE, LOW, MEDIUM, HIGH = (pb.THREAT_LEVEL_NONE, pb.THREAT_LEVEL_LOW, pb.THREAT_LEVEL_MEDIUM,
                           pb.THREAT_LEVEL_HIGH)
PENDING, APPROVED, DENIED = pb.APPROVAL_STATE_PENDING, pb.APPROVAL_STATE_APPROVED, pb.APPROVAL_STATE_DENIED
HOUR = 3600.0
TEN_YEARS = 10 * 365.25 * 24 * HOUR

CHURN_SECONDS = float(os.environ.get("MESHSTORE_CHURN_SECONDS", "0"))


# ---- helpers ----------------------------------------------------------------------------


@pytest.fixture
def stores():
    """A factory of stores named by node id, closed after the test: ``stores("a", "b")``."""
    made: list[Store] = []

    def factory(*names: str, **options) -> list[Store] | Store:
        out = [Store(node_id=n, **options) for n in names]
        made.extend(out)
        return out[0] if len(out) == 1 else out

    yield factory
    for s in made:
        s.close()


def entity(entity_id: str, **components) -> pb.Entity:
    return make_entity(entity_id, TRACK, **components)


def pos(lat: float, lon: float = 1.0) -> pb.PositionComponent:
    return pb.PositionComponent(lat=lat, lon=lon)


def blob(size: int, fill: bytes = b"x") -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(wrappers_pb2.BytesValue(value=fill * size))
    return packed


def push(src: Store, dst: Store) -> None:
    states, _ = src.changes_since(0)
    for state in states:
        dst.merge(state, source=src.node_id)


def sync(*stores: Store) -> None:
    """Full exchange, every store to every other, twice (what one gained flows on)."""
    for _ in range(2):
        for src in stores:
            for dst in stores:
                if src is not dst:
                    push(src, dst)


def threat_of(store: Store, entity_id: str) -> int:
    return unpack(store.get(entity_id), "threat", pb.ThreatComponent).level


def approval_of(store: Store, entity_id: str) -> int:
    return unpack(store.get(entity_id), "approval", pb.ApprovalComponent).state


def lat_of(store: Store, entity_id: str) -> float | None:
    p = unpack(store.get(entity_id), "position", pb.PositionComponent)
    return None if p is None else p.lat


def write(store: Store, entity_id: str, **components) -> None:
    """A write based on what the store shows now (versions as read)."""
    seen = store.get(entity_id)
    update = pb.Entity(id=entity_id, type=TRACK)
    for key, message in components.items():
        update.components[key].Pack(message)
        if key in seen.versions:
            update.versions[key].CopyFrom(seen.versions[key])
    result = store.update(update, strict=True)
    assert not result.stale and set(result.applied) | set(result.unchanged) == set(components), result


def view(store: Store) -> list[bytes]:
    """What users see, byte for byte (live entities with versions, by id)."""
    return [e.SerializeToString(deterministic=True) for e in store.list()]


def replica_states(store: Store) -> dict[str, pb.Entity]:
    """Every entity's replica state (deleted ones included), by id."""
    states, _ = store.changes_since(0)
    return {s.id: s for s in states}


def normalized_states(store: Store) -> dict[str, bytes]:
    """Replica states without ``origin_node`` (which node a replica last heard the
    entity from is per replica by design), byte for byte."""
    out = {}
    for entity_id, state in replica_states(store).items():
        state = pb.Entity.FromString(state.SerializeToString())
        state.ClearField("origin_node")
        out[entity_id] = state.SerializeToString(deterministic=True)
    return out


def dot(version: pb.Version) -> tuple[str, int, int]:
    return version.node, version.incarnation, version.counter


def dots_held(state: pb.Entity) -> set[tuple[str, int, int]]:
    """The dots of every value a replica state holds (chosen values and siblings)."""
    held = {dot(v) for k, v in state.versions.items() if k in state.components or k == "@entity"}
    held |= {dot(s.version) for s in state.siblings}
    return held


def context_of(state: pb.Entity) -> dict[tuple[str, int], int]:
    return {(d.node, d.incarnation): d.counter for d in state.context}


def covered(d: tuple[str, int, int], context: dict[tuple[str, int], int]) -> bool:
    return d[2] <= context.get((d[0], d[1]), 0)


def far_ahead_store(stores, name: str, seconds: float) -> Store:
    s = stores(name)
    s._core.set_wall_offset(seconds)
    return s


# ---- the cases, one test each --------------------------------------------------


def test_threat_none_low_medium_low_does_not_beat_a_concurrent_high(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", threat=pb.ThreatComponent(level=NONE)))
    sync(a, b)
    for level in (LOW, MEDIUM, LOW):
        write(a, "t1", threat=pb.ThreatComponent(level=level))
    write(b, "t1", threat=pb.ThreatComponent(level=HIGH))  # concurrent: b saw only NONE
    sync(a, b)
    assert threat_of(a, "t1") == threat_of(b, "t1") == HIGH
    assert view(a) == view(b)
    # The reader sees both values: HIGH chosen, a's LOW as the concurrent sibling.
    versions = a.get("t1").versions["threat"]
    assert len(versions.concurrent) == 1


def test_approved_pending_approved_does_not_beat_a_concurrent_denied(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", approval=pb.ApprovalComponent(state=PENDING)))
    sync(a, b)
    for state in (APPROVED, PENDING, APPROVED):
        write(a, "t1", approval=pb.ApprovalComponent(state=state))
    write(b, "t1", approval=pb.ApprovalComponent(state=DENIED))
    sync(a, b)
    assert approval_of(a, "t1") == approval_of(b, "t1") == DENIED
    assert view(a) == view(b)


def test_a_later_write_by_a_replica_that_saw_none_of_delete_recreate_delete_survives(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", position=pos(1), velocity=pb.VelocityComponent(speed=5)))
    sync(a, b)
    a.delete("t1")
    a.create(entity("t1", position=pos(2)))
    a.delete("t1")
    assert not alive(a, "t1")
    b.update(entity("t1", position=pos(3)))  # b saw none of it; stamped after a's deletes
    sync(a, b)
    for s in (a, b):
        got = s.get("t1")
        assert lat_of(s, "t1") == 3
        # a's deletes removed every value a had seen (velocity included).
        assert set(got.components) == {"position"}, s.node_id
    assert view(a) == view(b)
    assert normalized_states(a) == normalized_states(b)


def _collect_pair(a: Store, b: Store) -> None:
    """What two relays do once each acknowledged the other's changes: adopt the peer's
    context summary (everything it covers was merged), then collect up to the acked seq."""
    sync(a, b)
    seq_a, summary_a = a.context_summary()
    seq_b, summary_b = b.context_summary()
    b.adopt_context(summary_a)
    a.adopt_context(summary_b)
    a.collect_tombstones(seq_a)
    b.collect_tombstones(seq_b)


def test_an_old_pre_delete_state_merged_after_collection_brings_nothing_back(stores):
    a, b, c = stores("a", "b", "c")
    a.create(entity("t1", position=pos(1), threat=pb.ThreatComponent(level=HIGH)))
    c.create(entity("t2", position=pos(5)))
    sync(a, b, c)
    for s in (a, b):  # as relays do once c's batches up to its seq were merged
        s.adopt_context(c.context_summary()[1])
    old_states, _ = c.changes_since(0)  # c is then cut off (it keeps the pre-delete state)
    a.delete("t1")
    b.delete("t2")
    _collect_pair(a, b)
    for s in (a, b):
        assert s.replica_state("t1") is None and s.replica_state("t2") is None, s.node_id
        assert s.stats()["tombstones"] == 0 and s.stats()["tombstones_collected"] == 2
    # The old states arrive (c returns, or a delayed duplicate): nothing comes back.
    for state in old_states:
        a.merge(state, source="c")
    assert a.list() == []
    push(a, b)
    assert b.list() == []
    # Syncing back to the old replica removes the deleted entities there too.
    push(a, c)
    assert c.list() == []
    sync(a, b, c)
    assert a.list() == b.list() == c.list() == []
    assert normalized_states(a) == normalized_states(b) == normalized_states(c)


def test_update_read_before_delete_and_recreate_is_stale(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", position=pos(1)))
    sync(a, b)
    read_on_a = a.get("t1")
    read_on_b = b.get("t1")
    a.delete("t1")
    a.create(entity("t1", position=pos(2)))
    sync(a, b)

    for store, seen in ((a, read_on_a), (b, read_on_b)):
        old = pb.Entity.FromString(seen.SerializeToString())
        old.components["position"].Pack(pos(9))
        with pytest.raises(StaleWriteError):
            store.update(old, strict=True)
        assert lat_of(store, "t1") == 2
        result = store.update(old)
        assert "position" in result.stale and "position" not in result.applied
        assert lat_of(store, "t1") == 2, store.node_id
    sync(a, b)
    assert lat_of(a, "t1") == lat_of(b, "t1") == 2


def test_delete_then_recreate_with_another_large_key_replicates(stores):
    limit = 1 << 20
    a, b = stores("a", "b", max_entity_bytes=limit)
    first = entity("big")
    first.components["blob1"].CopyFrom(blob(600_000, b"a"))
    a.create(first)
    sync(a, b)
    # Both keys alive together would be over the limit: that is refused locally.
    both = entity("big")
    both.components["blob2"].CopyFrom(blob(600_000, b"b"))
    with pytest.raises(InvalidEntityError):
        a.update(both)
    a.delete("big")
    second = entity("big")
    second.components["blob2"].CopyFrom(blob(600_000, b"b"))
    a.create(second)  # accepted locally ...
    states, _ = a.changes_since(0)
    for state in states:
        assert b.merge(state, source="a")  # ... and by a peer with the same options
    got = b.get("big")
    assert set(got.components) == {"blob2"}
    assert view(a) == view(b)
    # A fresh peer (never saw blob1) accepts it too.
    c = stores("c", max_entity_bytes=limit)
    push(a, c)
    assert view(c) == view(a)


def test_a_delete_stamped_an_hour_ahead_merges_and_later_local_writes_survive(stores):
    a = stores("a")
    ahead = far_ahead_store(stores, "ahead", HOUR)
    a.create(entity("t1", position=pos(1)))
    sync(a, ahead)
    ahead.delete("t1")
    skewed = a.stats()["skewed_stamps"]
    states, _ = ahead.changes_since(0)
    for state in states:
        a.merge(state, source="ahead")  # no panic, no quarantine
    assert not alive(a, "t1")
    assert a.stats()["skewed_stamps"] > skewed
    a.put(entity("t1", position=pos(2)))
    assert lat_of(a, "t1") == 2
    # The write that saw the delete is stamped after it (so it outlives it wherever the
    # delete record goes), but the local clock itself did not follow the far stamp.
    deleted = replica_states(ahead)["t1"].deleted_version
    written = a.get("t1").versions["position"]
    assert (written.physical, written.logical) > (deleted.physical, deleted.logical)
    a.put(entity("other", position=pos(5)))
    assert a.get("other").versions["position"].physical < time.time_ns() + int(5e9)
    sync(a, ahead)
    # a's write saw the delete: it survives everywhere, though stamped an hour before it.
    assert lat_of(a, "t1") == lat_of(ahead, "t1") == 2
    assert view(a) == view(ahead)
    # And a hand-made state whose delete is an hour ahead (mutated stamp) does not crash.
    c = stores("c")
    c.create(entity("t3", position=pos(3)))
    d = stores("d")
    sync(c, d)
    d.delete("t3")
    state = replica_states(d)["t3"]
    state.deleted_version.physical += int(HOUR * 1e9)
    c.merge(state, source="d")
    assert not alive(c, "t3")
    c.put(entity("t3", position=pos(4)))
    assert lat_of(c, "t3") == 4
    sync(c, d)
    assert lat_of(c, "t3") == lat_of(d, "t3") == 4


def test_a_delete_stamped_ahead_arriving_again_after_collection_removes_no_later_write(stores):
    """A delete from a clock 2 s ahead is merged, acknowledged and forgotten by both
    replicas; a then re-creates the entity (stamped before the delete, as its clock did
    not follow, but after seeing it). The delete's state arrives again (a delayed
    duplicate, or a returning peer's resync pass): it must remove nothing."""
    a = stores("a")
    ahead = far_ahead_store(stores, "ahead", 2.0)
    a.create(entity("t1", position=pos(1)))
    sync(a, ahead)
    ahead.delete("t1")
    stale = replica_states(ahead)["t1"]
    _collect_pair(a, ahead)
    assert ahead.replica_state("t1") is None
    # Stamped ahead of a's clock: a keeps the delete until its clock passes it, so that
    # a's next write is stamped after it.
    assert a.replica_state("t1") is not None
    a.create(entity("t1", position=pos(2)))
    sync(a, ahead)
    assert lat_of(a, "t1") == lat_of(ahead, "t1") == 2
    for s in (a, ahead):
        s.merge(stale, source="ahead")
    sync(a, ahead)
    assert alive(a, "t1") and alive(ahead, "t1"), "a write made after the delete was removed by it"
    assert lat_of(a, "t1") == lat_of(ahead, "t1") == 2


def test_a_stale_delete_state_after_collection_changes_nothing_visible(stores):
    """The re-created entity's visible state (created_at included) does not depend on
    whether an old, already collected delete state arrives again."""
    a, b, c = stores("a", "b", "c")
    a.create(entity("t1", position=pos(1)))
    sync(a, b, c)
    b.delete("t1")
    stale = replica_states(b)["t1"]
    for s in (a, b, c):
        for o in (a, b, c):
            if s is not o:
                push(o, s)
    for s in (a, b, c):
        for o in (a, b, c):
            if s is not o:
                s.adopt_context(o.context_summary()[1])
    for s in (a, b, c):
        s.collect_tombstones(s.seq)
    assert all(s.replica_state("t1") is None for s in (a, b, c))
    time.sleep(0.002)
    a.create(entity("t1", position=pos(2)))
    sync(a, b, c)
    before = view(a)
    assert view(b) == view(c) == before
    b.merge(stale, source="b")
    assert view(b) == before, (b.get("t1").created_at, a.get("t1").created_at)


def test_a_cell_ten_years_ahead_merges_at_once_and_a_later_local_write_replaces_it(stores):
    a, b = stores("a", "b")
    future = far_ahead_store(stores, "future", TEN_YEARS)
    a.create(entity("t1", position=pos(1)))
    sync(a, b, future)
    future.update(entity("t1", position=pos(7)))
    skewed = a.stats()["skewed_stamps"]
    push(future, a)
    assert lat_of(a, "t1") == 7  # merged at once, no quarantine
    assert a.stats()["skewed_stamps"] > skewed
    # A later local write that saw it replaces it (blind, and based on the read version).
    write(a, "t1", position=pos(8))
    assert lat_of(a, "t1") == 8
    assert a.get("t1").versions["position"].physical < time.time_ns() + int(5e9)
    a.update(entity("t1", position=pos(9)))
    assert lat_of(a, "t1") == 9
    sync(a, b, future)
    assert lat_of(a, "t1") == lat_of(b, "t1") == lat_of(future, "t1") == 9
    assert not a.get("t1").versions["position"].concurrent


def test_a_local_write_based_on_a_far_ahead_stamp_only_version_is_refused(stores):
    a = stores("a")
    a.create(entity("t1", position=pos(1)))
    far = time.time_ns() + int(HOUR * 1e9)
    by_version = entity("t1", position=pos(2))
    by_version.versions["position"].CopyFrom(pb.Version(physical=far, node="x"))
    with pytest.raises(ClockSkewError):
        a.update(by_version)
    by_hlc = entity("t1", position=pos(3))
    by_hlc.hlc_physical, by_hlc.hlc_node = far, "x"
    with pytest.raises(ClockSkewError):
        a.update(by_hlc)
    assert lat_of(a, "t1") == 1


def test_four_thousand_far_future_states_do_not_hold_back_normal_work(stores):
    a, b = stores("a", "b")
    future = far_ahead_store(stores, "future", TEN_YEARS)
    future.put_many([entity(f"f{i}", position=pos(i % 90)) for i in range(4000)])
    states, _ = future.changes_since(0)
    skewed = a.stats()["skewed_stamps"]
    for state in states:
        a.merge(state, source="future")
    assert a.stats()["entities"] == 4000  # all merged at once
    assert a.stats()["skewed_stamps"] - skewed == 4000
    # Normal local writes and 1,000 normal states go through, all visible at once.
    results = a.put_many([entity(f"l{i}", position=pos(i % 90)) for i in range(1000)])
    assert all(r.applied == ["position"] for r in results)
    b.put_many([entity(f"n{i}", position=pos(i % 90)) for i in range(1000)])
    normal, _ = b.changes_since(0)
    assert len(normal) == 1000
    assert all(a.merge(s, source="b") for s in normal)
    assert a.stats()["entities"] == 6000
    assert lat_of(a, "n999") == 999 % 90 and lat_of(a, "l5") == 5
    # The local clock stayed near the wall clock.
    assert a.get("l0").versions["position"].physical < time.time_ns() + int(5e9)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _rounds(default: int):
    """Round numbers: ``default`` of them, or as many as fit in CHURN_SECONDS."""
    deadline = time.monotonic() + CHURN_SECONDS
    i = 0
    while (i < default) if not CHURN_SECONDS else (time.monotonic() < deadline or i < 2):
        yield i
        i += 1


def test_create_delete_churn_without_peers_stays_flat(stores):
    """Rounds of 5,000 create+delete pairs on a store that never replicated: its own
    maintenance pass forgets them all (nothing holds a delete back), and what it keeps
    (entities, tombstones, log, payload bytes, context, process RSS) stays flat."""
    a = stores("a", maintenance_interval=0.05)
    a.put(entity("keep", position=pos(1)))
    baseline = rss = None
    n = 0
    for r in _rounds(10):
        for _ in range(5000):
            a.create(entity(f"c{n}", position=pos(1)))
            a.delete(f"c{n}")
            n += 1
        assert _wait(lambda: a.stats()["tombstones"] == 0), a.stats()  # the maintenance pass collects
        s = a.stats()
        shape = (s["entities"], s["tombstones"], s["log_entries"], s["payload_bytes"], s["context_nodes"])
        if baseline is None:
            baseline, rss = shape, _rss_bytes()
        assert shape == baseline, (r, shape, baseline)
    assert shape[:2] == (1, 0) and shape[4] == 1
    assert len(a.context_summary()[1]) == 1
    grown = _rss_bytes() - rss
    assert grown < 32 << 20, f"RSS grew {grown >> 20} MiB over {n} pairs"
    # The same name used again is a fresh entity.
    a.create(entity("c0", position=pos(2)))
    assert lat_of(a, "c0") == 2


def test_a_standalone_store_forgets_a_delete_at_once(stores):
    a = stores("a")
    a.create(entity("t1", position=pos(1)))
    a.delete("t1")
    assert a.collect_tombstones() == 1
    assert a.replica_state("t1") is None


def test_create_delete_churn_with_acknowledging_peers_forgets_deleted_entities(stores):
    """Two replicating stores churn (a 100 pairs, b 50 per round); each round is what two
    relays do: push the changes since the last round, adopt the sender's context summary
    (as of the seq the push covered), collect up to the acknowledged seq."""
    a, b = stores("a", "b")
    cursor = {"a": 0, "b": 0}
    most = 0
    n = 0
    shapes = []
    for r in _rounds(30):
        for _ in range(100):
            a.create(entity(f"a{n}", position=pos(1)))
            a.delete(f"a{n}")
            if n % 2 == 0:
                b.create(entity(f"b{n}", position=pos(2)))
                b.delete(f"b{n}")
            n += 1
        acked = {}
        for src, dst in ((a, b), (b, a)):
            states, seq = src.changes_since(cursor[src.node_id])
            summary_seq, summary = src.context_summary()
            for state in states:
                dst.merge(state, source=src.node_id)
            assert summary_seq == seq
            dst.adopt_context(summary)
            cursor[src.node_id] = acked[src.node_id] = seq
        for s_ in (a, b):
            s_.collect_tombstones(acked[s_.node_id])
        most = max(most, a.stats()["tombstones"], b.stats()["tombstones"])
        shapes.append(tuple((s_.stats()["log_entries"], s_.stats()["context_nodes"]) for s_ in (a, b)))
    _collect_pair(a, b)
    _collect_pair(a, b)
    for s_ in (a, b):
        st_ = s_.stats()
        assert st_["tombstones"] == 0 and st_["entities"] == 0, (s_.node_id, st_)
        assert s_.changes_since(0)[0] == []
        assert st_["context_nodes"] == 2
    # Between rounds at most the deletes of one round wait (a's merged into b's and back).
    assert most <= 150, most
    assert max(x for shape in shapes for pair in shape for x in pair[:1]) <= 150, shapes[-3:]


def test_with_a_silent_peer_deletes_are_kept_until_peer_expiry(stores):
    a, b = stores("a", "b", peer_expiry=2.0)
    a.create(entity("t1", position=pos(1)))
    sync(a, b)  # a replicates: it may no longer forget on its own
    a.delete("t1")
    assert a.collect_tombstones() == 0  # b never acknowledged
    size = len(a.replica_state("t1")[0])
    assert size < 200, size  # a delete record is a few dozen bytes
    a._core.set_wall_offset(3.0)  # b silent longer than peer_expiry
    assert a.collect_tombstones() == 1
    # b returns with its old state: a's context covers it, nothing comes back.
    push(b, a)
    assert not alive(a, "t1")
    push(a, b)
    assert not alive(b, "t1")


def test_a_write_that_saw_a_sibling_replaces_it(stores):
    a, b, c = stores("a", "b", "c")
    a.create(entity("t1", position=pos(1), threat=pb.ThreatComponent(level=LOW)))
    sync(a, b, c)
    write(a, "t1", position=pos(2), threat=pb.ThreatComponent(level=HIGH))
    write(b, "t1", position=pos(3), threat=pb.ThreatComponent(level=MEDIUM))
    sync(a, b)
    seen = a.get("t1")
    assert threat_of(a, "t1") == HIGH
    assert len(seen.versions["threat"].concurrent) == 1
    assert len(seen.versions["position"].concurrent) == 1
    assert len(replica_states(a)["t1"].siblings) == 2
    # b saw both (after the sync) and lowers the threat: a de-escalation that saw HIGH.
    write(b, "t1", threat=pb.ThreatComponent(level=NONE), position=pos(4))
    sync(a, b, c)
    for s in (a, b, c):
        assert threat_of(s, "t1") == NONE and lat_of(s, "t1") == 4, s.node_id
        assert not replica_states(s)["t1"].siblings
        assert not s.get("t1").versions["threat"].concurrent
    # A read on one replica is a valid base on another that holds the same state.
    seen_on_c = c.get("t1")
    upd = pb.Entity(id="t1", type=TRACK)
    upd.components["threat"].Pack(pb.ThreatComponent(level=LOW))
    upd.versions["threat"].CopyFrom(seen_on_c.versions["threat"])
    assert a.update(upd, strict=True).applied == ["threat"]


def test_a_state_naming_our_own_dots_we_never_issued_is_refused(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", position=pos(1)))
    sync(a, b)
    state = replica_states(b)["t1"]
    own = a.stats()["dot_counter"]
    state.versions["position"].counter = own + 5
    for d in state.context:
        if d.node == "a":
            d.counter = own + 5
    before = (view(a), normalized_states(a), a.seq)
    with pytest.raises(InvalidEntityError):
        a.merge(state, source="b")
    assert (view(a), normalized_states(a), a.seq) == before
    assert a.stats()["rejected"] >= 1
    with pytest.raises(InvalidEntityError):
        a.adopt_context([("a", a.incarnation, own + 1)])


def test_known_types_are_range_checked(stores):
    a = stores("a")
    for bad in (dict(position=pb.PositionComponent(lat=90.5, lon=0)),
                dict(position=pb.PositionComponent(lat=0, lon=-180.5)),
                dict(classification=pb.ClassificationComponent(label="x", confidence=1.5)),
                dict(classification=pb.ClassificationComponent(label="x", confidence=-0.1))):
        with pytest.raises(InvalidEntityError):
            a.put(entity("t1", **bad))
    assert a.list() == []
    a.put(entity("t1", position=pb.PositionComponent(lat=-90, lon=180)))
    assert alive(a, "t1")


def test_a_restarted_node_never_reuses_a_dot(stores):
    a1, b = stores("a", "b")
    a1.create(entity("t1", position=pos(1)))
    a1.create(entity("t0", position=pos(0)))
    sync(a1, b)
    first_life = dot(a1.get("t1").versions["position"])
    a2 = stores("a")  # same node id, fresh state: a new incarnation, counters from 0 again
    assert a2.incarnation != a1.incarnation
    a2.create(entity("t2", position=pos(2)))
    assert dot(a2.get("t2").versions["position"])[2] <= first_life[2] + 2  # counters restart ...
    write(b, "t1", position=pos(3))
    a2.put(entity("t1", position=pos(4)))  # blind: a2 never saw t1, concurrent to b's write
    sync(a2, b)
    # ... yet b told a2's write apart from a1's (which b had seen and replaced): both kept.
    v = b.get("t1").versions["position"]
    held = {dot(v)} | {(d.node, d.incarnation, d.counter) for d in v.concurrent}
    assert {(n, i) for n, i, _ in held} == {("b", b.incarnation), ("a", a2.incarnation)}, held
    assert first_life not in held
    assert lat_of(b, "t2") == 2 and lat_of(a2, "t0") == 0
    assert view(a2) == view(b)
    # a1's old state arriving late changes nothing.
    for state in replica_states(a1).values():
        b.merge(state, source="a")
    assert view(a2) == view(b)


# ---- deletes and entity types, nesting ----------------------------------------------------


def test_an_entity_resurrected_after_its_delete_was_collected_has_one_type_everywhere(stores):
    """A concurrent write stamped after a delete resurrects the entity; the write did not
    carry the type (the delete removed the type register), so replicas must agree on the
    type they show, whether or not they collected the delete meanwhile."""
    a, b, c, d = stores("a", "b", "c", "d")
    a.create(entity("t1", position=pos(1)))
    sync(a, b, c, d)
    for s in (a, b):
        for peer in (c, d):
            s.adopt_context(peer.context_summary()[1])
    old_states, _ = c.changes_since(0)
    a.delete("t1")
    _collect_pair(a, b)
    assert a.replica_state("t1") is None and b.replica_state("t1") is None
    for state in old_states:  # a delayed pre-delete state: nothing comes back
        a.merge(state, source="c")
    assert not alive(a, "t1")
    # d saw t1 alive, never the delete, and writes position after it (no type sent).
    upd = pb.Entity(id="t1")
    upd.components["position"].Pack(pos(7))
    d.update(upd)
    sync(a, b, c, d)
    for s in (a, b, c, d):
        assert lat_of(s, "t1") == 7, s.node_id
    types = {s.node_id: s.get("t1").type for s in (a, b, c, d)}
    assert len(set(types.values())) == 1, types
    assert view(a) == view(b) == view(c) == view(d)


def test_a_replica_that_only_saw_the_delete_shows_the_resurrected_entity_with_the_same_type(stores):
    """The same without any collection: b learns of t1 only through its delete."""
    a, b, d = stores("a", "b", "d")
    a.create(entity("t1", position=pos(1)))
    push(a, d)
    a.delete("t1")
    push(a, b)
    upd = pb.Entity(id="t1")  # d saw t1 alive, never the delete; writes after it
    upd.components["position"].Pack(pos(7))
    d.update(upd)
    sync(a, b, d)
    types = {s.node_id: s.get("t1").type for s in (a, b, d)}
    assert len(set(types.values())) == 1, types
    assert [e.id for e in a.list(TRACK)] == [e.id for e in b.list(TRACK)] == [e.id for e in d.list(TRACK)]
    assert view(a) == view(b) == view(d)


_NESTED_SCRIPT = r"""
import sys
from meshstore import Store, MeshstoreError
from meshstore.components import make_entity
from meshstore.pb import entity_pb2 as pb

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)

def ld(field, payload):
    return varint(field << 3 | 2) + varint(len(payload)) + payload

depth = 30_000
nest = b""
for _ in range(depth):  # reserved Version field 5 (after_delete), nested 30k deep
    nest = ld(5, nest)
groups = bytes([5 << 3 | 3]) * depth + bytes([5 << 3 | 4]) * depth
base = make_entity("deep", pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=1, lon=1))
source = Store(node_id="src")
source.put(base)
state = source.replica_state("deep")[0]
inputs = {
    "deleted_version nested": state + ld(12, nest),
    "deleted_version groups": state + ld(12, groups),
    "unknown top-level field nested": state + ld(15, nest),
    "sibling version nested": state + ld(13, ld(1, b"position") + ld(3, nest)),
    "position value nested": ld(1, b"deep") + ld(3, ld(1, b"position") + ld(2, ld(1, b"type.googleapis.com/entity.v1.PositionComponent") + ld(2, ld(4, nest)))),
    "versions entry nested": base.SerializeToString() + ld(9, ld(1, b"position") + ld(2, nest)),
}
for name, data in inputs.items():
    for how in ("merge", "put"):
        s = Store(node_id="victim")
        s.put(make_entity("other", pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=2, lon=2)))
        before = (s.list(), s.seq)
        try:
            if how == "merge":
                s.merge(data, source="src")
            else:
                s.put(data)  # bytes pass through to the core untouched
            outcome = "ok"
        except MeshstoreError as exc:
            outcome = type(exc).__name__
            assert (s.list(), s.seq) == before, (name, how)
        except (ValueError, TypeError) as exc:
            outcome = type(exc).__name__
            assert (s.list(), s.seq) == before, (name, how)
        print(name, how, outcome, len(data), flush=True)
print("survived")
"""


def test_deeply_nested_input_never_crashes_the_process(tmp_path):
    """30k-deep nesting (the SIGSEGV of issue 8) through merge and put: an error or a
    result, never a crash. Run in a child process, so a crash is a failure, not the end
    of the test session."""
    import subprocess
    import sys

    script = tmp_path / "nested.py"
    script.write_text(_NESTED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


# ---- more of the model: counters, far-future cells and deletes, old clients, order ------


def test_a_logical_counter_at_its_maximum_never_wraps(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", position=pos(1)))
    state = replica_states(a)["t1"]
    near = time.time_ns() + int(0.3e9)  # ahead, but within max_clock_offset
    for v in state.versions.values():
        v.physical, v.logical = near, 2**32 - 1
    assert b.merge(state, source="a")
    stamps = []
    for i in range(3):
        b.put(entity("t1", position=pos(2 + i)))
        v = b.get("t1").versions["position"]
        stamps.append((v.physical, v.logical))
        assert not v.concurrent
    assert stamps[0] > (near, 2**32 - 1) and stamps == sorted(set(stamps)), stamps
    push(b, a)
    assert lat_of(a, "t1") == lat_of(b, "t1") == 4


def test_a_delete_that_saw_a_far_future_cell_removes_it_everywhere(stores):
    a, b = stores("a", "b")
    future = far_ahead_store(stores, "future", TEN_YEARS)
    a.create(entity("t1", position=pos(1)))
    sync(a, b, future)
    future.update(entity("t1", position=pos(7), velocity=pb.VelocityComponent(speed=3)))
    push(future, a)
    assert lat_of(a, "t1") == 7
    a.delete("t1")  # saw the far-future values: removes them, though stamped long before
    sync(a, b, future)
    assert not any(alive(s, "t1") for s in (a, b, future))
    # And nothing brings them back: the future node's old state again, in any order.
    for s in (a, b):
        for state in replica_states(future).values():
            s.merge(state, source="future")
        assert not alive(s, "t1")


def test_old_client_writes_with_only_entity_hlc_fields_follow_the_stamp_rule(stores):
    a = stores("a")
    a.create(entity("t1", position=pos(1), threat=pb.ThreatComponent(level=LOW)))
    read = a.get("t1")
    hlc = (read.hlc_physical, read.hlc_logical, read.hlc_node)

    def old_client(**components) -> pb.Entity:
        e = entity("t1", **components)
        e.hlc_physical, e.hlc_logical, e.hlc_node = hlc
        return e

    # Nothing stamped after the read: applied.
    assert old_client(position=pos(2)).versions == {}
    result = a.update(old_client(position=pos(2)))
    assert result.applied == ["position"] and not result.stale
    # position is now stamped after the client's read: stale; threat is not.
    result = a.update(old_client(position=pos(3), threat=pb.ThreatComponent(level=MEDIUM)))
    assert result.stale == ["position"] and result.applied == ["threat"], result
    assert lat_of(a, "t1") == 2 and threat_of(a, "t1") == MEDIUM


def test_strict_update_with_one_stale_key_applies_nothing(stores):
    a, b = stores("a", "b")
    a.create(entity("t1", position=pos(1), threat=pb.ThreatComponent(level=LOW)))
    sync(a, b)
    read = b.get("t1")
    write(a, "t1", position=pos(2))
    push(a, b)
    upd = pb.Entity.FromString(read.SerializeToString())
    upd.components["position"].Pack(pos(3))
    upd.components["threat"].Pack(pb.ThreatComponent(level=HIGH))
    seq = b.seq
    with pytest.raises(StaleWriteError) as info:
        b.update(upd, strict=True)
    assert "position" in info.value.keys or "position" in str(info.value)
    assert (lat_of(b, "t1"), threat_of(b, "t1"), b.seq) == (2, LOW, seq)


def test_a_delete_removes_an_older_concurrent_write_in_every_delivery_order(stores):
    a, b, c, d = stores("a", "b", "c", "d")
    a.create(entity("t1", position=pos(1)))
    sync(a, b, c, d)
    write(b, "t1", velocity=pb.VelocityComponent(speed=9))  # concurrent, stamped first
    a.delete("t1")  # stamped after b's write, never saw it
    push(b, c)
    assert alive(c, "t1")
    push(a, c)  # write first, then the delete: the delete removes it
    assert not alive(c, "t1")
    push(a, d)
    push(b, d)  # delete first, then the older write: it stays removed
    assert not alive(d, "t1")
    sync(a, b, c, d)
    assert not any(alive(s, "t1") for s in (a, b, c, d))
    assert normalized_states(a) == normalized_states(b) == normalized_states(c) == normalized_states(d)


def test_what_a_store_accepts_a_peer_with_the_same_options_accepts(stores):
    """Two concurrent 600 kB writes to two keys, each accepted locally: the joined
    entity (1.2 MB) must be accepted by every peer with the same options, or replicas
    never converge."""
    limit = 1 << 20
    a, b, c = stores("a", "b", "c", max_entity_bytes=limit)
    a.create(entity("big"))
    sync(a, b)
    one, two = entity("big"), entity("big")
    one.components["k1"].CopyFrom(blob(600_000, b"a"))
    two.components["k2"].CopyFrom(blob(600_000, b"b"))
    a.update(one)
    b.update(two)
    push(b, a)
    assert set(a.get("big").components) == {"k1", "k2"}
    for state in replica_states(a).values():
        assert c.merge(state, source="a")
    sync(a, b, c)
    assert view(a) == view(b) == view(c)
    # A write that shrinks it is accepted (and replicates).
    small = entity("big")
    small.components["k1"].CopyFrom(blob(10, b"s"))
    a.update(small)
    sync(a, b, c)
    assert view(a) == view(b) == view(c)


# ---- properties -------------------------------------------------------------------------

IDS = ["e0", "e1"]
NODES = ["n0", "n1", "n2", "n3"]


def _component(key: str, value: int):
    if key == "position":
        return pos(float(value), 2.0)
    if key == "threat":
        return pb.ThreatComponent(level=1 + value % 4)
    if key == "approval":
        return pb.ApprovalComponent(state=1 + value % 5)
    return pb.ClassificationComponent(label=f"c{value}", confidence=(value % 5) / 4)


KEYS = ["position", "threat", "approval", "classification"]

op_write = st.tuples(st.just("write"), st.integers(0, 3), st.sampled_from(IDS),
                     st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True),
                     st.integers(0, 20), st.sampled_from(["read", "blind", "old"]))
op_delete = st.tuples(st.just("delete"), st.integers(0, 3), st.sampled_from(IDS))
# merge: from, to, which of the sender's current states (indices), and old ones replayed
op_merge = st.tuples(st.just("merge"), st.integers(0, 3), st.integers(0, 3),
                     st.lists(st.integers(0, 40), max_size=6))
# round: every replica pushes everything to every other, adopts the others' context
# summaries and collects deleted entities up to the acknowledged seq (what relays do).
op_round = st.tuples(st.just("round"))
# expire: one replica's peers fall silent past peer_expiry (its clock jumps a day) and
# it collects without them.
op_expire = st.tuples(st.just("expire"), st.integers(0, 3))
ops = st.lists(st.one_of(op_write, op_write, op_delete, op_merge, op_merge, op_round, op_expire),
               min_size=1, max_size=40)


class World:
    """Four replicas, every state any of them ever produced (for replays), and the
    reads each replica made (for writes based on an old read)."""

    def __init__(self, n: int = 4) -> None:
        self.stores = [Store(node_id=NODES[i]) for i in range(n)]
        self.pool: list[bytes] = []
        self.reads: dict[tuple[int, str], pb.Entity] = {}
        self.offsets = [0.0] * n

    def close(self) -> None:
        for s in self.stores:
            s.close()

    def snapshot(self, i: int) -> list[bytes]:
        states, _ = self.stores[i].changes_since(0)
        out = [s.SerializeToString() for s in states]
        self.pool.extend(out)
        return out

    def apply(self, op) -> None:
        kind = op[0]
        if kind == "write":
            _, i, eid, keys, value, base = op
            s = self.stores[i]
            upd = pb.Entity(id=eid, type=TRACK)
            try:
                seen = s.get(eid)
                self.reads[(i, eid)] = seen
            except NotFoundError:
                seen = None
            if base == "old":
                seen = self.reads.get((i, eid))
            for key in keys:
                upd.components[key].Pack(_component(key, value))
                if base != "blind" and seen is not None and key in seen.versions:
                    upd.versions[key].CopyFrom(seen.versions[key])
            s.put(upd)
        elif kind == "delete":
            _, i, eid = op
            try:
                self.stores[i].delete(eid)
            except NotFoundError:
                pass
        elif kind == "round":
            summaries = [s.context_summary() for s in self.stores]
            for i in range(len(self.stores)):
                current = self.snapshot(i)
                for j, dst in enumerate(self.stores):
                    if i != j:
                        for state in current:
                            dst.merge(state)
            for j, dst in enumerate(self.stores):
                for i, (_, summary) in enumerate(summaries):
                    if i != j:
                        dst.adopt_context(summary)
            for s, (seq, _) in zip(self.stores, summaries):
                s.collect_tombstones(seq)
        elif kind == "expire":
            _, i = op
            self.offsets[i] += 86_401.0
            self.stores[i]._core.set_wall_offset(self.offsets[i])
            self.stores[i].collect_tombstones()
        else:
            _, src, dst, picks = op
            if src == dst:
                return
            current = self.snapshot(src)
            sent = [current[p % len(current)] for p in picks if current]
            sent += [self.pool[p % len(self.pool)] for p in picks[:2] if self.pool]  # replays
            for state in sent:
                self.stores[dst].merge(state)

    def full_exchange(self) -> None:
        for _ in range(2):
            for i, src in enumerate(self.stores):
                for j, dst in enumerate(self.stores):
                    if i != j:
                        for state in self.snapshot(i):
                            dst.merge(state)


@SETTINGS
@given(ops, st.sampled_from([0.0, 0.0, 2.0, HOUR]))
def test_property_random_interleavings_converge(history, skew):
    """Any interleaving (with duplicates, reordering and replays of old states) converges
    after a full exchange; ``skew``: n3's clock that far ahead."""
    w = World()
    w.offsets[3] = skew
    w.stores[3]._core.set_wall_offset(skew)
    try:
        for op in history:
            w.apply(op)
        w.full_exchange()
        first = w.stores[0]
        for s in w.stores[1:]:
            assert view(s) == view(first), (s.node_id, s.list(), first.list())
            assert normalized_states(s) == normalized_states(first), s.node_id
        # Everything old merged again changes nothing users see. (Replica states may
        # take back a forgotten delete record, or a dead record of what was removed:
        # bookkeeping that removes nothing, since every later value is stamped after it.)
        before = [view(s) for s in w.stores]
        for state in w.pool:
            for s in w.stores:
                s.merge(state)
        assert [view(s) for s in w.stores] == before
        w.full_exchange()
        assert [view(s) for s in w.stores] == before
        for s in w.stores[1:]:
            assert normalized_states(s) == normalized_states(first), s.node_id
    finally:
        w.close()


@SETTINGS
@given(st.lists(st.sampled_from([NONE, LOW, MEDIUM]), min_size=1, max_size=12),
       st.lists(st.sampled_from([NONE, LOW, MEDIUM]), max_size=6),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=12),
       st.booleans())
def test_property_a_concurrent_high_is_never_lost(lows_a, lows_c, merges, high_first):
    """n0 and n2 write any number of lower levels, n1 one HIGH, all from the same state;
    states move among replicas that have not written since (n3 a pure relay), in any
    order; after a full exchange every replica shows HIGH."""
    stores_ = [Store(node_id=n) for n in NODES]
    try:
        stores_[0].create(entity("t", threat=pb.ThreatComponent(level=NONE)))
        sync(*stores_)
        writers = {0: list(lows_a), 2: list(lows_c)}
        high_done = False
        if high_first:
            write(stores_[1], "t", threat=pb.ThreatComponent(level=HIGH))
            high_done = True
        for k, (src, dst) in enumerate(merges):
            # Writers that write later must not have seen HIGH: only merge into 3, or
            # into a writer that is done writing lower levels.
            if src != dst and (dst == 3 or (dst in writers and not writers[dst]) or dst == 1):
                push(stores_[src], stores_[dst])
            for w_, levels in writers.items():
                if levels and k % 2 == w_ % 2:
                    write(stores_[w_], "t", threat=pb.ThreatComponent(level=levels.pop(0)))
        for w_, levels in writers.items():
            while levels:
                write(stores_[w_], "t", threat=pb.ThreatComponent(level=levels.pop(0)))
        if not high_done:
            write(stores_[1], "t", threat=pb.ThreatComponent(level=HIGH))
        sync(*stores_)
        for s in stores_:
            assert threat_of(s, "t") == HIGH, s.node_id
    finally:
        for s in stores_:
            s.close()


@SETTINGS
@given(ops, st.integers(0, 3), st.sampled_from(IDS), ops)
def test_property_nothing_the_deleter_saw_comes_back(before, deleter, eid, after):
    w = World()
    try:
        for op in before:
            w.apply(op)
        d = w.stores[deleter]
        if not alive(d, eid):
            d.put(entity(eid, position=pos(1)))
        state = replica_states(d)[eid]
        seen_ctx = context_of(state)
        seen_dots = dots_held(state)
        assert all(covered(x, seen_ctx) for x in seen_dots)
        d.delete(eid)
        for op in after:
            w.apply(op)
        w.full_exchange()
        for s in w.stores:
            states = replica_states(s)
            if eid in states:
                back = {x for x in dots_held(states[eid]) if covered(x, seen_ctx)}
                assert not back, (s.node_id, back, states[eid])
    finally:
        w.close()


def _mutations(state: bytes, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(4):  # flipped bytes
        b = bytearray(state)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    out.append(state[: rng.randrange(len(state))])  # truncated
    for stamp in (0, 1, 2**63 - 1, 2**64 - 1, time.time_ns() + int(TEN_YEARS * 1e9)):
        m = pb.Entity.FromString(state)
        for v in m.versions.values():
            v.physical = stamp
        if m.HasField("deleted_version"):
            m.deleted_version.physical = stamp
        for s in m.siblings:
            s.version.physical = stamp
        m.hlc_physical = stamp
        out.append(m.SerializeToString())
    for counter in (0, 2**63, 2**64 - 1):
        m = pb.Entity.FromString(state)
        for v in m.versions.values():
            v.counter = counter
        for d in m.context:
            d.counter = counter
        for v in m.versions.values():
            v.concurrent.add(node="zz", incarnation=2**64 - 1, counter=counter)
        out.append(m.SerializeToString())
        m2 = pb.Entity.FromString(state)
        m2.deleted_version.CopyFrom(pb.Version(physical=time.time_ns(), node="zz", incarnation=1, counter=counter))
        m2.context.add(node="zz", incarnation=1, counter=counter)
        out.append(m2.SerializeToString())
    m = pb.Entity.FromString(state)
    m.context.clear()  # holds values but claims to have seen nothing
    out.append(m.SerializeToString())
    m = pb.Entity.FromString(state)
    for v in m.versions.values():
        v.incarnation = 0
        v.node = ""
    out.append(m.SerializeToString())
    m = pb.Entity.FromString(state)
    m.siblings.add(key="threat", value=m.components["threat"] if "threat" in m.components else any_pb2.Any(),
                   version=pb.Version(physical=1, node="zz", incarnation=3, counter=1))
    out.append(m.SerializeToString())
    return out


@SETTINGS
@given(ops, st.integers(0, 2**32))
def test_property_mutated_states_never_crash_and_leave_the_store_unchanged_on_error(history, seed):
    w = World()
    victim = Store(node_id="victim")
    try:
        for op in history:
            w.apply(op)
        rng = random.Random(seed)
        pool = [s for i in range(4) for s in w.snapshot(i)]
        for state in pool:
            victim.merge(state)
        for state in pool[:6]:
            for bad in _mutations(state, rng):
                before = (view(victim), normalized_states(victim), victim.seq, victim.stats()["dot_counter"])
                try:
                    victim.merge(bad, source="mutant")
                except MeshstoreError:
                    after = (view(victim), normalized_states(victim), victim.seq, victim.stats()["dot_counter"])
                    assert after == before
                except Exception as exc:  # noqa: BLE001 - a clear error is fine, never a crash
                    assert isinstance(exc, (ValueError, TypeError)), repr(exc)
                    after = (view(victim), normalized_states(victim), victim.seq, victim.stats()["dot_counter"])
                    assert after == before
        # The store still works: writes, reads, replication.
        victim.put(entity("after", position=pos(1)))
        assert lat_of(victim, "after") == 1
        other = Store(node_id="other")
        try:
            sync(victim, other)
            assert view(victim) == view(other)
            assert normalized_states(victim) == normalized_states(other)
        finally:
            other.close()
    finally:
        victim.close()
        w.close()
