"""Unit tests for each Store API call and the errors it raises."""

from __future__ import annotations

import socket
import time

import pytest
from google.protobuf import wrappers_pb2

from conftest import (
    ASSET, GEO, TRACK, latlon, make_entity, pack, position, push, snapshot, source, sync, threat,
    threat_level, track, unpack, wait_for,
)
from meshstore.eventloop import EventLoop
from meshstore import (
    AlreadyExistsError, InvalidEntityError, NotFoundError, StaleWriteError, Store, StoreOptions,
    UpdateResult,
)
from meshstore.pb import entity_pb2 as pb

EXPECTED_STATS_KEYS = {
    "node_id", "entities", "tombstones", "seq", "log_entries", "payload_bytes", "writes",
    "stale_keys", "rejected", "merges", "merges_changed", "skewed_stamps", "incarnation", "dot_counter",
    "context_nodes", "contexts_adopted", "tombstones_collected", "expired", "watchers", "coalesced",
}


# ---- construction -------------------------------------------------------------------------


def test_store_with_defaults_works(make_store):
    s = make_store()
    s.put(track("t1", position=position(1, 2)))
    assert latlon(s.get("t1")) == (1, 2)


def test_store_from_options_object(make_store):
    s = make_store(StoreOptions(node_id="opt-node"))
    assert s.node_id == "opt-node"
    s.put(track("t1", position=position(1, 2)))
    assert s.get("t1").versions["position"].node == "opt-node"


def test_store_from_keyword_overrides(make_store):
    s = make_store(node_id="kw", max_clock_offset=2.0, peer_expiry=60, watch_queue=10)
    assert s.node_id == "kw"
    assert (s.options.max_clock_offset, s.options.peer_expiry, s.options.watch_queue) == (2.0, 60, 10)
    with s.watch() as w:  # the queue size takes effect: an 11th pending event starts coalescing
        s.put_many([track(f"e{i}", position=position(i, i)) for i in range(11)])
        assert w.stats()["coalescing"] is True


def test_keyword_overrides_apply_on_top_of_an_options_object(make_store):
    s = make_store(StoreOptions(node_id="base", peer_expiry=5), watch_queue=7)
    assert (s.node_id, s.options.peer_expiry, s.options.watch_queue) == ("base", 5, 7)


def test_default_node_id_is_hostname_with_random_suffix(make_store):
    a, b = make_store(), make_store()
    host = socket.gethostname()
    assert a.node_id.startswith(host + "-") and len(a.node_id) > len(host) + 1
    assert b.node_id.startswith(host + "-")
    assert a.node_id != b.node_id


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"node_id": ""}, ValueError, "node_id"),
        ({"node_id": "   "}, ValueError, "node_id"),
        ({"peer_expiry": -1}, ValueError, "peer_expiry"),
        ({"max_clock_offset": float("nan")}, ValueError, "max_clock_offset"),
        ({"watch_queue": 0}, ValueError, "watch_queue"),
        ({"max_entity_bytes": -5}, ValueError, "max_entity_bytes"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
    ],
)
def test_bad_options_raise_a_clear_error(options, error, words):
    with pytest.raises(error, match=words):
        Store(**options)


def test_bad_options_object_type_is_refused():
    with pytest.raises(TypeError, match="StoreOptions"):
        Store({"node_id": "a"})


def test_store_options_validate_themselves():
    with pytest.raises(ValueError, match="peer_expiry"):
        StoreOptions(node_id="a", peer_expiry=-1)


# ---- create / get / list ----------------------------------------------------------------------


def test_create_returns_the_stored_entity(store):
    created = store.create(track("t1", position=position(1, 2)))
    assert created.id == "t1" and created.type == TRACK
    assert latlon(created) == (1, 2)
    assert created.versions["position"].node == "node-a"


def test_create_of_a_live_entity_raises_already_exists(store):
    store.create(track("t1", position=position(1, 2)))
    before = snapshot(store)
    with pytest.raises(AlreadyExistsError, match="t1") as exc:
        store.create(track("t1", position=position(9, 9)))
    assert exc.value.entity_id == "t1"
    assert snapshot(store) == before


def test_create_after_delete_recreates(store):
    store.create(track("t1", position=position(1, 2)))
    store.delete("t1")
    store.create(track("t1", position=position(3, 4)))
    assert latlon(store.get("t1")) == (3, 4)


def test_get_fills_versions_for_every_component(store):
    store.put(track("t1", position=position(1, 2), threat=threat(pb.THREAT_LEVEL_LOW)))
    got = store.get("t1")
    assert set(got.components) == {"position", "threat"}
    for key in ("position", "threat"):
        v = got.versions[key]
        assert v.physical > 0 and v.node == "node-a"
    assert got.hlc_physical > 0 and got.hlc_node == "node-a"
    assert got.created_at.seconds > 0 and got.updated_at.seconds > 0


def test_get_of_a_missing_entity_raises_not_found_naming_it(store):
    with pytest.raises(NotFoundError) as exc:
        store.get("ghost")
    assert exc.value.entity_id == "ghost"
    assert "ghost" in str(exc.value)


def test_get_of_a_deleted_entity_raises_not_found(store):
    store.put(track("t1", position=position(1, 2)))
    store.delete("t1")
    with pytest.raises(NotFoundError, match="t1"):
        store.get("t1")


def test_list_is_ordered_by_id(store):
    for entity_id in ["c", "a", "d", "b"]:
        store.put(track(entity_id, position=position(1, 1)))
    assert [e.id for e in store.list()] == ["a", "b", "c", "d"]


def test_list_filters_by_type(store):
    store.put(make_entity("t1", TRACK, position=position(1, 1)))
    store.put(make_entity("a1", ASSET, position=position(1, 1)))
    store.put(make_entity("t2", TRACK, position=position(1, 1)))
    store.put(make_entity("g1", GEO, position=position(1, 1)))
    assert [e.id for e in store.list(TRACK)] == ["t1", "t2"]
    assert [e.id for e in store.list(ASSET)] == ["a1"]
    assert [e.id for e in store.list()] == ["a1", "g1", "t1", "t2"]


def test_list_leaves_out_deleted_entities(store):
    store.put(track("t1", position=position(1, 1)))
    store.put(track("t2", position=position(1, 1)))
    store.delete("t1")
    assert [e.id for e in store.list()] == ["t2"]


@pytest.mark.parametrize("bad", [9, -1, "x", True, None, 2.0])
def test_list_with_an_invalid_filter_raises(store, bad):
    with pytest.raises((ValueError, TypeError), match="type_filter"):
        store.list(bad)


# ---- update / put -----------------------------------------------------------------------------


def test_update_of_a_missing_entity_raises_not_found(store):
    with pytest.raises(NotFoundError) as exc:
        store.update(track("ghost", position=position(1, 2)))
    assert exc.value.entity_id == "ghost"
    assert store.stats()["entities"] == 0 and store.seq == 0


def test_update_result_reports_the_write(store):
    store.create(track("t1", position=position(1, 2)))
    result = store.update(make_entity("t1", threat=threat(pb.THREAT_LEVEL_LOW)))
    assert isinstance(result, UpdateResult)
    assert result.applied == ["threat"]
    assert result.stale == [] and result.unchanged == []
    assert result.created is False
    # The entity after the write: the key just written and the one already there.
    assert set(result.entity.components) == {"position", "threat"}
    assert result.entity == store.get("t1")


def assert_stale_position_kept(store, read):
    """Writes back ``read`` (taken before someone moved t1 to 5,5) with a moved position
    and a new source: the position is stale and kept, the source applies."""
    read.components["position"].CopyFrom(pack(position(0, 0)))
    read.components["source"].CopyFrom(pack(source("s1")))
    result = store.update(read)
    assert result.stale == ["position"]
    assert result.applied == ["source"]
    got = store.get("t1")
    assert latlon(got) == (5, 5)
    assert unpack(got, "source", pb.SourceComponent).sensor_id == "s1"


def test_update_reports_stale_keys_and_applies_the_rest(store):
    store.put(track("t1", position=position(1, 2)))
    read = store.get("t1")
    store.put(make_entity("t1", position=position(5, 5)))  # someone else moves it
    assert_stale_position_kept(store, read)


def test_strict_update_with_a_stale_key_raises_and_applies_nothing(store):
    store.put(track("t1", position=position(1, 2)))
    read = store.get("t1")
    store.put(make_entity("t1", position=position(5, 5)))
    before = snapshot(store)
    read.components["position"].CopyFrom(pack(position(0, 0)))
    read.components["source"].CopyFrom(pack(source("s1")))  # not stale, but must not apply either
    with pytest.raises(StaleWriteError) as exc:
        store.update(read, strict=True)
    assert exc.value.entity_id == "t1"
    assert exc.value.keys == ["position"]
    assert "t1" in str(exc.value) and "position" in str(exc.value)
    assert snapshot(store) == before
    assert "source" not in store.get("t1").components


def test_strict_update_without_stale_keys_applies(store):
    store.put(track("t1", position=position(1, 2)))
    read = store.get("t1")
    read.components["position"].CopyFrom(pack(position(3, 4)))
    result = store.update(read, strict=True)
    assert result.applied == ["position"]
    assert latlon(store.get("t1")) == (3, 4)


def test_put_creates_then_updates(store):
    first = store.put(track("t1", position=position(1, 2)))
    assert first.created is True and first.applied == ["position"]
    second = store.put(make_entity("t1", position=position(3, 4)))
    assert second.created is False and second.applied == ["position"]
    got = store.get("t1")
    assert latlon(got) == (3, 4)
    assert got.type == TRACK  # a put without a type leaves the type alone


def test_put_of_equal_bytes_is_a_no_op(store):
    store.put(track("t1", position=position(1, 2)))
    before = store.get("t1")
    seq = store.seq
    watcher = store.watch()
    result = store.put(track("t1", position=position(1, 2)))
    assert result.unchanged == ["position"]
    assert result.applied == [] and result.stale == [] and result.created is False
    assert store.seq == seq
    after = store.get("t1")
    assert after.versions == before.versions and after.hlc_physical == before.hlc_physical
    # No event: the next event the watcher sees is the one of a later, real change.
    store.put(track("t2", position=position(1, 2)))
    event = watcher.get(timeout=5)
    assert event is not None and event.entity_id == "t2"
    assert watcher.drain() == []
    watcher.close()


def test_put_many_from_messages(store):
    results = store.put_many([track(f"e{i}", position=position(i, i)) for i in range(5)])
    assert [r.entity_id for r in results] == [f"e{i}" for i in range(5)]
    assert all(r.created for r in results)
    assert [latlon(e) for e in store.list()] == [(i, i) for i in range(5)]


def test_put_many_from_serialized_bytes(store):
    batch = [track(f"e{i}", position=position(i, 0)).SerializeToString() for i in range(3)]
    results = store.put_many(batch)
    assert [r.applied for r in results] == [["position"]] * 3
    assert [e.id for e in store.list()] == ["e0", "e1", "e2"]


def test_put_many_accepts_a_generator_mixing_messages_and_bytes(store):
    def items():
        yield track("m", position=position(1, 1))
        yield track("b", position=position(2, 2)).SerializeToString()

    store.put_many(items())
    assert [e.id for e in store.list()] == ["b", "m"]


def test_put_many_applies_items_in_order(store):
    results = store.put_many([track("x", position=position(1, 1)), make_entity("x", position=position(2, 2))])
    assert [r.created for r in results] == [True, False]
    assert latlon(store.get("x")) == (2, 2)


def test_put_many_with_a_bad_item_fails_the_whole_batch(store):
    store.put(track("existing", position=position(1, 1)))
    before = snapshot(store)
    batch = [
        track("new1", position=position(1, 1)),
        make_entity("existing", position=position(7, 7)),
        track("bad", threat=threat(9)),  # item 2: not a ThreatLevel
        track("new2", position=position(1, 1)),
    ]
    with pytest.raises(InvalidEntityError, match="batch item 2") as exc:
        store.put_many(batch)
    assert "bad" in str(exc.value)
    assert snapshot(store) == before
    assert [e.id for e in store.list()] == ["existing"]
    assert latlon(store.get("existing")) == (1, 1)


def test_put_many_with_malformed_bytes_names_the_item(store):
    with pytest.raises(InvalidEntityError, match="batch item 1"):
        store.put_many([track("ok", position=position(1, 1)), b"\xff\x00garbage"])
    assert store.list() == [] and store.stats()["entities"] == 0 and store.seq == 0


def test_put_many_with_a_wrong_item_type_names_the_item(store):
    with pytest.raises(TypeError, match="item 1"):
        store.put_many([track("ok", position=position(1, 1)), 42])
    assert store.list() == []


def test_a_key_may_change_type_across_strategies_and_replicas_agree(pair):
    """A max-strategy key rewritten with an lww type (and back) applies, and the new
    value replaces the old one on every replica (the write saw it)."""
    a, b = pair
    a.put(track("t1", threat=threat(pb.THREAT_LEVEL_HIGH)))
    sync(a, b)
    assert a.put(make_entity("t1", threat=position(1, 1))).applied == ["threat"]
    sync(a, b)
    for replica in (a, b):
        assert replica.get("t1").components["threat"].type_url.endswith("PositionComponent")
    assert b.put(make_entity("t1", threat=threat(pb.THREAT_LEVEL_LOW))).applied == ["threat"]
    sync(a, b)
    assert threat_level(a.get("t1")) == threat_level(b.get("t1")) == pb.THREAT_LEVEL_LOW


def test_put_many_is_atomic_when_an_item_would_grow_past_the_size_limit(make_store):
    s = make_store(node_id="small", max_entity_bytes=1000)
    s.put(track("big", source=source("x" * 600)))
    before = snapshot(s)
    batch = [track("new1", position=position(1, 1)), make_entity("big", other=source("y" * 600))]
    with pytest.raises(InvalidEntityError, match="batch item 1"):
        s.put_many(batch)
    assert snapshot(s) == before


# ---- the base of a write: versions, entity hlc fields, or blind ---------------------------------


def _old_client_copy(entity: pb.Entity) -> pb.Entity:
    """What a client built before `versions` existed sends back: fields 1-8 only."""
    old = pb.Entity()
    old.CopyFrom(entity)
    old.ClearField("versions")
    return old


def test_old_client_hlc_fields_are_the_base_of_every_key(store):
    store.put(track("t1", position=position(1, 2), source=source("s0")))
    read = _old_client_copy(store.get("t1"))
    assert read.hlc_node == "node-a"
    store.put(make_entity("t1", position=position(5, 5)))  # newer than the old client's read
    assert_stale_position_kept(store, read)


def test_old_client_with_an_up_to_date_hlc_applies(store):
    store.put(track("t1", position=position(1, 2)))
    read = _old_client_copy(store.get("t1"))
    read.components["position"].CopyFrom(pack(position(3, 4)))
    assert store.update(read).applied == ["position"]
    assert latlon(store.get("t1")) == (3, 4)


def test_blind_write_always_applies(store):
    store.put(track("t1", position=position(1, 2)))
    store.put(make_entity("t1", position=position(5, 5)))
    blind = make_entity("t1", position=position(0, 0))  # no versions, no hlc fields
    result = store.update(blind)
    assert result.applied == ["position"] and result.stale == []
    assert latlon(store.get("t1")) == (0, 0)


# ---- delete ------------------------------------------------------------------------------


def test_delete_tombstones_the_entity(store):
    store.put(track("t1", position=position(1, 2)))
    store.delete("t1")
    assert store.list() == []
    stats = store.stats()
    assert stats["entities"] == 0 and stats["tombstones"] == 1
    states, _ = store.changes_since(0)
    assert [s.id for s in states] == ["t1"]
    assert states[0].HasField("deleted_version")


def test_delete_twice_raises_not_found(store):
    store.put(track("t1", position=position(1, 2)))
    store.delete("t1")
    seq = store.seq
    with pytest.raises(NotFoundError) as exc:
        store.delete("t1")
    assert exc.value.entity_id == "t1"
    assert store.seq == seq


def test_delete_of_a_never_seen_entity_raises_not_found(store):
    with pytest.raises(NotFoundError, match="ghost"):
        store.delete("ghost")


# ---- replication API ----------------------------------------------------------------------------


def test_merge_returns_whether_the_state_changed(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    (state,), _ = a.changes_since(0)
    assert b.merge(state) is True
    assert b.merge(state) is False
    assert b.merge(state.SerializeToString()) is False
    assert latlon(b.get("t1")) == (1, 2)


def test_changes_since_returns_states_and_the_next_cursor(store):
    store.put(track("t1", position=position(1, 2)))
    store.put(track("t2", position=position(1, 2)))
    states, cursor = store.changes_since(0)
    assert [s.id for s in states] == ["t1", "t2"]
    assert cursor == store.seq
    assert all(s.versions["position"].physical > 0 for s in states)
    store.put(make_entity("t1", position=position(3, 3)))
    store.delete("t2")
    later, cursor2 = store.changes_since(cursor)
    assert sorted(s.id for s in later) == ["t1", "t2"]
    deleted = {s.id: s for s in later}["t2"]
    assert deleted.HasField("deleted_version")
    assert cursor2 == store.seq > cursor
    assert store.changes_since(cursor2) == ([], cursor2)


@pytest.mark.parametrize("bad", [-1, "0", 1.5, None])
def test_changes_since_refuses_a_bad_cursor(store, bad):
    with pytest.raises((ValueError, TypeError), match="seq"):
        store.changes_since(bad)


def test_changes_since_carries_a_delete_to_a_replica(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    a.delete("t1")
    push(a, b)
    with pytest.raises(NotFoundError):
        b.get("t1")
    assert b.stats()["tombstones"] == 1


def test_a_store_that_never_replicated_forgets_deletes_at_once(store):
    store.put(track("t1", position=position(1, 1)))
    store.delete("t1")
    assert store.collect_tombstones() == 1
    assert store.stats()["tombstones"] == 0


def test_collect_tombstones_forgets_only_acknowledged_deletes(store):
    for entity_id in ("t1", "t2", "t3"):
        store.put(track(entity_id, position=position(1, 1)))
    store.changes_since(0)  # a replica reads: from now on deletes wait for acknowledgements
    store.delete("t1")
    acked = store.seq
    store.delete("t2")
    assert store.collect_tombstones(acked_seq=acked) == 1
    stats = store.stats()
    assert (stats["entities"], stats["tombstones"], stats["tombstones_collected"]) == (1, 1, 1)
    assert [s.id for s in store.changes_since(acked)[0]] == ["t2"]


def test_tombstones_are_collected_after_the_peer_expiry(make_store):
    s = make_store(node_id="node-a", peer_expiry=0.1, maintenance_interval=0.05)
    s.put(track("t1", position=position(1, 1)))
    s.changes_since(0)  # replicating, and no acknowledgement will come
    s.delete("t1")
    wait_for(lambda: s.stats()["tombstones"] == 0, what="tombstone collected")
    assert s.stats()["tombstones_collected"] == 1
    assert s.changes_since(s.seq) == ([], s.seq)


def test_a_relay_managing_collection_stops_the_forgetting_by_age(make_store):
    """With a relay in charge (it knows which peers acknowledged), the maintenance pass
    no longer forgets deletes by age; handed back, it does."""
    s = make_store(node_id="node-a", peer_expiry=0.1, maintenance_interval=0.05)
    s.put(track("t1", position=position(1, 1)))
    s.changes_since(0)
    manager = object()
    s.manage_collection(manager)
    s.delete("t1")
    time.sleep(0.4)  # several maintenance passes, well past peer_expiry
    assert s.stats()["tombstones"] == 1
    s.manage_collection(None)
    wait_for(lambda: s.stats()["tombstones"] == 0, what="forgotten by age once handed back")


# ---- TTL ----------------------------------------------------------------------------------------


def test_set_ttl_deletes_the_entity_after_the_ttl(store):
    store.put(track("t1", position=position(1, 2)))
    watcher = store.watch()
    store.set_ttl("t1", 0.2)
    assert store.get("t1").HasField("expiry_time")  # still there right after
    wait_for(lambda: store.stats()["entities"] == 0, what="entity expired")
    with pytest.raises(NotFoundError):
        store.get("t1")
    events = []
    wait_for(lambda: events.extend(watcher.drain()) or any(e.type == 3 for e in events), what="DELETED event")
    deleted = [e for e in events if e.type == 3]
    assert [e.entity_id for e in deleted] == ["t1"]
    assert store.stats()["expired"] == 1
    watcher.close()


def test_entity_written_again_after_it_expired_stays_alive(store):
    store.put(track("t1", position=position(1, 2)))
    store.set_ttl("t1", 0.1)
    wait_for(lambda: store.stats()["entities"] == 0, what="entity expired")

    result = store.put(track("t1", position=position(3, 4)))  # a newer write resurrects it
    assert result.created is True
    # Let the timer loop run past everything already due: a probe entity with a short TTL
    # expires after any timer the re-created entity may have (wrongly) inherited.
    store.put(track("probe", position=position(0, 0)))
    store.set_ttl("probe", 0.05)
    wait_for(lambda: "probe" not in {e.id for e in store.list()}, what="probe expired")
    assert latlon(store.get("t1")) == (3, 4)


def test_set_ttl_replicates_the_expiry(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    a.set_ttl("t1", 0.3)
    push(a, b)
    assert b.get("t1").HasField("expiry_time")
    wait_for(lambda: b.stats()["entities"] == 0, what="replica expired the entity")


def test_an_expiry_moved_earlier_fires_at_the_earlier_time(store):
    store.put(track("t1", position=position(1, 2)))
    store.set_ttl("t1", 3600)
    store.set_ttl("t1", 0.1)
    wait_for(lambda: store.stats()["entities"] == 0, 3.0, "the expiry moved earlier")


@pytest.fixture
def shifted_loop():
    """An event loop whose clock runs ``shift[0]`` seconds ahead of the wall clock (expiry
    times are wall-clock instants, so the shift is how far a test jumps into the future)."""
    shift = [0.0]
    loop = EventLoop(clock=lambda: time.time() + shift[0]).start()
    yield loop, shift
    loop.stop()


def test_an_expiry_moved_later_is_not_taken_early(make_store, shifted_loop):
    loop, shift = shifted_loop
    s = make_store(node_id="a", event_loop=loop)
    s.put(track("t1", position=position(1, 2)))
    s.put(track("probe", position=position(0, 0)))
    s.set_ttl("t1", 10)
    s.set_ttl("t1", 30)
    s.set_ttl("probe", 20)
    shift[0] = 25.0
    loop.wake()
    wait_for(lambda: "probe" not in {e.id for e in s.list()}, 3.0, "the probe expired")
    assert [e.id for e in s.list()] == ["t1"]  # due at 30 s, not at the 10 s it was first given
    shift[0] = 31.0
    loop.wake()
    wait_for(lambda: s.stats()["entities"] == 0, 3.0, "t1 expired at its later time")
    assert s.stats()["expired"] == 2


def test_a_burst_of_expiries_is_deleted_in_passes_by_one_timer(make_store, shifted_loop):
    loop, shift = shifted_loop
    s = make_store(node_id="a", event_loop=loop)
    n = 10_000  # more than one pass of the timer deletes
    expiry = time.time_ns() + 60 * 10**9
    batch = [track(f"t{i}", position=position(0, 0)) for i in range(n)]
    for e in batch:
        e.expiry_time.FromNanoseconds(expiry)
    s.put_many(batch)
    s.put(track("stays", position=position(0, 0)))
    assert loop.pending() <= 2  # the expiry timer and the maintenance pass, not one per entity
    shift[0] = 61.0
    loop.wake()
    wait_for(lambda: s.stats()["entities"] == 1, 10.0, "every due entity expired")
    assert [e.id for e in s.list()] == ["stays"]
    assert s.stats()["expired"] == n


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1", True, None])
def test_set_ttl_refuses_bad_values(store, bad):
    store.put(track("t1", position=position(1, 2)))
    before = snapshot(store)
    with pytest.raises(ValueError, match="ttl"):
        store.set_ttl("t1", bad)
    assert snapshot(store) == before


def test_set_ttl_of_a_missing_entity_raises_not_found(store):
    with pytest.raises(NotFoundError, match="ghost"):
        store.set_ttl("ghost", 1)


# ---- stats / strategies -----------------------------------------------------------------------


def test_stats_has_the_documented_keys(store):
    store.put(track("t1", position=position(1, 2)))
    stats = store.stats()
    assert EXPECTED_STATS_KEYS <= set(stats)
    assert stats["node_id"] == "node-a"
    assert stats["entities"] == 1 and stats["seq"] == store.seq == 1


UINT = "type.googleapis.com/google.protobuf.UInt64Value"


def _counter(value: int):
    return wrappers_pb2.UInt64Value(value=value)


def test_registered_max_strategy_merges_by_max(pair):
    a, b = pair
    for s in pair:
        s.register_strategy(UINT, "max", field=1)
    a.put(make_entity("e", counter=_counter(7)))
    b.put(make_entity("e", counter=_counter(3)))  # later: would win under lww
    sync(a, b)
    for s in pair:
        assert unpack(s.get("e"), "counter", wrappers_pb2.UInt64Value).value == 7


def test_unregistered_type_url_merges_last_writer_wins(pair):
    a, b = pair
    a.put(make_entity("e", counter=_counter(7)))
    b.put(make_entity("e", counter=_counter(3)))  # later
    sync(a, b)
    for s in pair:
        assert unpack(s.get("e"), "counter", wrappers_pb2.UInt64Value).value == 3


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"merge": "maximum", "field": 1}, "maximum"),
        ({"merge": "max"}, "field"),
        ({"merge": "lww_tiebreak", "field": 0}, "field"),
    ],
)
def test_register_strategy_refuses_bad_arguments(store, kwargs, words):
    with pytest.raises(ValueError, match=words):
        store.register_strategy(UINT, **kwargs)

