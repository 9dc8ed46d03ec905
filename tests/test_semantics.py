"""Merge semantics users rely on: stale writes, max strategies, deletes and resurrection,
versions from a clock far ahead, and the hybrid logical clock."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from conftest import (
    approval, approval_state, classification, latlon, make_entity, pack, position, push,
    raw_component, sync, threat, threat_level, track, unpack, version_tuple,
)
from meshstore import NotFoundError
from meshstore.pb import entity_pb2 as pb

NONE, LOW, MEDIUM, HIGH = pb.THREAT_LEVEL_NONE, pb.THREAT_LEVEL_LOW, pb.THREAT_LEVEL_MEDIUM, pb.THREAT_LEVEL_HIGH
PENDING, APPROVED, DENIED = pb.APPROVAL_STATE_PENDING, pb.APPROVAL_STATE_APPROVED, pb.APPROVAL_STATE_DENIED


# ---- the seed scenario --------------------------------------------------------------------------


def test_classifier_write_back_does_not_clobber_a_newer_sensor_position(store):
    store.put(track("track-1", position=position(10.0, 20.0)))
    read = store.get("track-1")  # the classifier reads the track

    store.put(make_entity("track-1", position=position(10.5, 20.5)))  # the sensor moves it

    read.components["classification"].CopyFrom(pack(classification("vessel", 0.8)))
    read.components["threat"].CopyFrom(pack(threat(MEDIUM)))
    result = store.update(read)  # the whole entity it read, plus its additions

    assert sorted(result.applied) == ["classification", "threat"]
    assert result.stale == ["position"]
    got = store.get("track-1")
    assert latlon(got) == (10.5, 20.5)
    assert unpack(got, "classification", pb.ClassificationComponent).label == "vessel"
    assert threat_level(got) == MEDIUM


# ---- threat: max by level, lowered only by a writer who saw the higher value ----------------


def test_concurrent_threat_levels_converge_to_the_higher(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    b.put(make_entity("t1", threat=threat(HIGH)))
    a.put(make_entity("t1", threat=threat(LOW)))  # later in time than HIGH: time must not decide
    sync(a, b)
    assert threat_level(a.get("t1")) == threat_level(b.get("t1")) == HIGH


def test_concurrent_threat_levels_from_a_shared_threat_converge_to_the_higher(pair):
    a, b = pair
    a.put(track("t1", threat=threat(MEDIUM)))
    sync(a, b)
    b.put(make_entity("t1", threat=threat(HIGH)))
    a.put(make_entity("t1", threat=threat(LOW)))  # later, concurrent with HIGH
    sync(a, b)
    assert threat_level(a.get("t1")) == threat_level(b.get("t1")) == HIGH


def test_a_longer_chain_of_lower_writes_never_hides_a_concurrent_high(pair):
    """Each of a's writes replaces only what a saw; b's concurrent HIGH survives beside
    a's last value as a sibling, and the max strategy shows HIGH on both replicas."""
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    for level in (NONE, LOW, MEDIUM, LOW):
        a.put(make_entity("t1", threat=threat(level)))
    b.put(make_entity("t1", threat=threat(HIGH)))
    sync(a, b)
    assert threat_level(a.get("t1")) == threat_level(b.get("t1")) == HIGH
    assert len(a.get("t1").versions["threat"].concurrent) == 1  # a's LOW, still a sibling


def rewrite_after_reading(writer, other, key, value_of, seen, message, expected):
    """The writer reads ``key`` (holding ``seen``), writes ``message`` over it with the
    version it read, and after an exchange both replicas hold ``expected``."""
    read = writer.get("t1")
    assert value_of(read) == seen
    read.components[key].CopyFrom(pack(message))
    assert writer.update(read).applied == [key]
    sync(writer, other)
    assert value_of(writer.get("t1")) == value_of(other.get("t1")) == expected


def test_writer_who_read_high_can_lower_the_threat(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    a.put(make_entity("t1", threat=threat(LOW)))
    b.put(make_entity("t1", threat=threat(HIGH)))
    sync(a, b)

    rewrite_after_reading(a, b, "threat", threat_level, HIGH, threat(LOW), LOW)


# ---- approval: a denial beats an approval; a new request after a decision supersedes it -----


def test_concurrent_approval_and_denial_converge_to_denied(pair):
    a, b = pair
    a.put(track("t1", approval=approval(PENDING)))
    sync(a, b)
    b.put(make_entity("t1", approval=approval(DENIED)))
    a.put(make_entity("t1", approval=approval(APPROVED)))  # later in time
    sync(a, b)
    assert approval_state(a.get("t1")) == approval_state(b.get("t1")) == DENIED


def test_new_request_after_a_decision_supersedes_it(pair):
    a, b = pair
    a.put(track("t1", approval=approval(PENDING)))
    sync(a, b)
    b.put(make_entity("t1", approval=approval(DENIED)))
    a.put(make_entity("t1", approval=approval(APPROVED)))
    sync(a, b)

    rewrite_after_reading(b, a, "approval", approval_state, DENIED, approval(PENDING), PENDING)


# ---- deletes ----------------------------------------------------------------------------------


def test_delete_beats_an_older_concurrent_update(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    b.put(make_entity("t1", position=position(3, 4)))  # older than the delete, not yet seen by a
    a.delete("t1")
    sync(a, b)
    for s in pair:
        with pytest.raises(NotFoundError):
            s.get("t1")
        assert s.list() == []


def test_newer_write_after_delete_resurrects_without_old_components(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 2), threat=threat(HIGH)))
    sync(a, b)
    b.put(make_entity("t1", position=position(3, 4)))
    a.delete("t1")
    sync(a, b)

    result = b.put(make_entity("t1", classification=classification("buoy")))
    assert result.created is True
    sync(a, b)
    for s in pair:
        got = s.get("t1")
        assert set(got.components) == {"classification"}, s.node_id
        assert set(got.versions) - {"@entity"} == {"classification"}, s.node_id
        assert unpack(got, "classification", pb.ClassificationComponent).label == "buoy"
    assert a.get("t1") == b.get("t1")


def test_resurrected_threat_is_not_shadowed_by_a_higher_one_from_before_the_delete(pair):
    a, b = pair
    a.put(track("t1", threat=threat(HIGH)))
    sync(a, b)
    a.delete("t1")
    sync(a, b)
    b.put(make_entity("t1", threat=threat(LOW)))
    sync(a, b)
    assert threat_level(a.get("t1")) == threat_level(b.get("t1")) == LOW


def test_delete_and_resurrection_reach_a_replica_that_saw_neither(make_store):
    a, b, c = (make_store(node_id=n) for n in ("a", "b", "c"))
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    a.delete("t1")
    sync(a, b)
    b.put(make_entity("t1", classification=classification("buoy")))
    push(b, c)  # c only ever sees b's state
    got = c.get("t1")
    assert set(got.components) == {"classification"}


# ---- unknown type URLs are data, not errors ------------------------------------------------------


WIDGET = "type.googleapis.com/acme.v1.Widget"


def test_unknown_type_url_is_stored_returned_and_merged_last_writer_wins(pair):
    a, b = pair
    a.put(raw_component(make_entity("w1"), "widget", WIDGET, b"\x08\x07"))
    got = a.get("w1").components["widget"]
    assert (got.type_url, got.value) == (WIDGET, b"\x08\x07")
    sync(a, b)
    a.put(raw_component(make_entity("w1"), "widget", WIDGET, b"\x08\x09"))
    b.put(raw_component(make_entity("w1"), "widget", WIDGET, b"\x08\x01"))  # later, lower
    sync(a, b)
    for s in pair:
        assert s.get("w1").components["widget"] == any_pb2.Any(type_url=WIDGET, value=b"\x08\x01")


# ---- replication is order-insensitive ----------------------------------------------------------


def test_replicas_converge_whatever_the_merge_order(make_store):
    a, b = make_store(node_id="a"), make_store(node_id="b")
    a.put(track("t1", position=position(1, 1), threat=threat(LOW)))
    b.put(track("t1", position=position(2, 2), approval=approval(APPROVED)))
    b.put(track("t2", position=position(3, 3)))
    a.put(make_entity("t1", classification=classification("x", 0.5)))
    states = a.changes_since(0)[0] + b.changes_since(0)[0]
    c, d = make_store(node_id="c"), make_store(node_id="d")
    for s in states:
        c.merge(s)
    for s in reversed(states):
        d.merge(s)
        d.merge(s)  # and idempotent
    assert c.list() == d.list()
    sync(a, b)
    assert a.list() == b.list() == c.list()


# ---- versions from a clock far ahead ----------------------------------------------------------


def _future_state(make_store, ahead: float = 5.0):
    a = make_store(node_id="a-fast")
    a._core.set_wall_offset(ahead)
    a.put(track("t1", position=position(1, 2)))
    (state,), _ = a.changes_since(0)
    return state


def test_state_from_the_future_merges_at_once_and_is_counted(make_store):
    state = _future_state(make_store)
    b = make_store(node_id="b", max_clock_offset=0.5)
    assert b.merge(state)
    assert latlon(b.get("t1")) == (1, 2)
    assert b.stats()["skewed_stamps"] == 1


def test_a_local_write_that_saw_a_future_value_replaces_it(make_store):
    a = make_store(node_id="a")
    a.put(track("t1", position=position(1, 2)))
    a._core.set_wall_offset(3600.0)
    a.put(make_entity("t1", threat=threat(HIGH)))  # stamped an hour ahead
    b = make_store(node_id="b", max_clock_offset=0.5)
    push(a, b)
    read = b.get("t1")
    read.components["threat"].CopyFrom(pack(threat(LOW)))
    assert b.update(read).applied == ["threat"]  # based on the dot it read: not stale
    push(b, a)
    assert threat_level(a.get("t1")) == threat_level(b.get("t1")) == LOW


def test_delete_from_the_future_applies_at_once_and_later_writes_outlive_it(make_store):
    a = make_store(node_id="a")
    b = make_store(node_id="b", max_clock_offset=0.5)
    a.put(track("t1", position=position(1, 2)))
    sync(a, b)
    a._core.set_wall_offset(3600.0)
    a.delete("t1")
    push(a, b)
    with pytest.raises(NotFoundError):
        b.get("t1")
    b.put(make_entity("t1", position=position(3, 4)))  # after seeing the delete: survives it
    sync(a, b)
    assert latlon(a.get("t1")) == latlon(b.get("t1")) == (3, 4)


def test_merging_a_future_state_does_not_drag_the_local_clock_forward(make_store):
    state = _future_state(make_store)
    b = make_store(node_id="b", max_clock_offset=0.5)
    b.merge(state)
    b.put(track("local", position=position(0, 0)))
    assert b.get("local").versions["position"].physical < state.versions["position"].physical


# ---- hybrid logical clock ----------------------------------------------------------------------


def test_versions_keep_increasing_when_the_wall_clock_jumps_back(store):
    seen = []
    for i in range(3):
        store.put(track("t1", position=position(i, i)))
        seen.append(version_tuple(store.get("t1"), "position")[:2])
    store._core.set_wall_offset(-10)
    for i in range(3, 8):
        store.put(track("t1", position=position(i, i)))
        seen.append(version_tuple(store.get("t1"), "position")[:2])
    assert all(x < y for x, y in zip(seen, seen[1:])), seen
    assert latlon(store.get("t1")) == (7, 7)


def test_write_after_a_clock_jump_back_still_wins_on_a_replica(pair):
    a, b = pair
    a.put(track("t1", position=position(1, 1)))
    sync(a, b)
    b.put(make_entity("t1", position=position(2, 2)))
    sync(a, b)
    a._core.set_wall_offset(-10)
    a.put(make_entity("t1", position=position(3, 3)))  # a read b's write first, so it is newer
    sync(a, b)
    assert latlon(a.get("t1")) == latlon(b.get("t1")) == (3, 3)
