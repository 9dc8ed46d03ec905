"""Unit tests of meshstore.mesh.budget: the token bucket, priorities, the pending queue and
the configuration. A fake clock drives the bucket, so nothing here waits."""

from __future__ import annotations

import pytest

from meshstore import Store
from meshstore.mesh.budget import (
    BYPASS,
    MIN_DEFAULT_BURST,
    BudgetConfig,
    PendingQueue,
    Priority,
    TokenBucket,
    framed_size,
    priority_of,
)
from meshstore.components import make_entity
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import mesh_pb2


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- token bucket -----------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_its_rate(clock):
    bucket = TokenBucket(1000, 500, clock=clock)
    assert bucket.tokens == 500
    assert bucket.try_take(300) and bucket.try_take(200)
    assert not bucket.try_take(1)
    assert bucket.delay(100) == pytest.approx(0.1)
    clock.advance(0.1)
    assert bucket.try_take(100)
    assert not bucket.try_take(100)
    assert bucket.taken == 600


def test_bucket_never_holds_more_than_its_burst(clock):
    bucket = TokenBucket(1000, 500, clock=clock)
    clock.advance(3600)
    assert bucket.tokens == 500
    assert bucket.try_take(500) and not bucket.try_take(1)


def test_a_clock_going_back_refills_nothing_and_takes_nothing(clock):
    bucket = TokenBucket(1000, 500, clock=clock)
    assert bucket.try_take(400)
    clock.advance(-50)  # the clock jumps back
    assert bucket.tokens == 100
    clock.advance(0.1)  # from the new reading on, time counts again
    assert bucket.tokens == pytest.approx(200)
    clock.advance(-1e9)
    assert bucket.tokens == pytest.approx(200)
    assert bucket.delay(300) == pytest.approx(0.1)


def test_a_state_larger_than_the_burst_goes_once_the_bucket_is_full(clock):
    bucket = TokenBucket(100, 50, clock=clock)
    assert bucket.try_take(200)  # full bucket: allowed, leaves a debt
    assert bucket.tokens == -150
    assert not bucket.try_take(200)
    assert bucket.delay(200) == pytest.approx(2.0)  # back to full (50) from -150 at 100/s
    clock.advance(2.0)
    assert bucket.try_take(200)


def test_forced_takes_go_into_bounded_debt(clock):
    bucket = TokenBucket(100, 50, clock=clock)
    for _ in range(10):
        bucket.force_take(100)
    assert bucket.tokens == -50  # never below -burst
    assert bucket.forced == 1000 and bucket.taken == 1000
    clock.advance(0.5)
    assert bucket.tokens == 0


def test_an_unlimited_bucket_never_waits(clock):
    bucket = TokenBucket(0, clock=clock)
    assert bucket.unlimited
    assert all(bucket.try_take(10**9) for _ in range(5))
    bucket.force_take(10**9)
    assert bucket.delay(10**12) == 0.0


def test_bucket_defaults_and_validation(clock):
    assert TokenBucket(1000, clock=clock).burst == MIN_DEFAULT_BURST
    assert TokenBucket(10**6, 0, clock=clock).burst == 10**6
    for bad in (-1, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError):
            TokenBucket(bad, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TokenBucket(10, -5, clock=clock)


# ---- configuration ----------------------------------------------------------------------


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="bandwidth_bps"):
        BudgetConfig(-1, 0)
    with pytest.raises(ValueError, match="burst_bytes"):
        BudgetConfig(0, float("nan"))
    assert BudgetConfig(1e5).bucket().burst == 1e5 and not BudgetConfig(1e5).unlimited


def test_the_arguments_configure_a_relay_and_it_is_unlimited_by_default():
    from meshstore.mesh.relay import Relay

    store = Store(node_id="a")
    try:
        assert Relay(store, ["127.0.0.1:1"], bandwidth_bps=4096, burst_bytes=1024).budget == BudgetConfig(4096, 1024)
        assert Relay(store, ["127.0.0.1:1"]).budget.unlimited
    finally:
        store.close()


# ---- priorities -------------------------------------------------------------------------


@pytest.fixture
def store():
    s = Store(node_id="n")
    yield s
    s.close()


def state(store: Store, entity_id: str) -> bytes:
    return store.replica_state(entity_id)[0]


def test_priority_of_threat_levels_and_position_only(store):
    store.put(make_entity("p", position=pb.PositionComponent(lat=1)))
    assert priority_of(state(store, "p")) == Priority.POSITION_ONLY
    for level, expected in [(pb.THREAT_LEVEL_NONE, Priority.NONE), (pb.THREAT_LEVEL_LOW, Priority.LOW),
                            (pb.THREAT_LEVEL_MEDIUM, Priority.MEDIUM), (pb.THREAT_LEVEL_HIGH, Priority.HIGH)]:
        store.put(make_entity(f"t{level}", threat=pb.ThreatComponent(level=level),
                              position=pb.PositionComponent(lat=1)))
        assert priority_of(state(store, f"t{level}")) == expected
    store.put(make_entity("u", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_UNSPECIFIED)))
    assert priority_of(state(store, "u")) == Priority.POSITION_ONLY
    # Decoded messages work too.
    assert priority_of(pb.Entity.FromString(state(store, "t4"))) == Priority.HIGH


def test_priority_of_a_delete_and_of_a_resurrected_entity(store):
    store.put(make_entity("x", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH)))
    store.delete("x")
    assert priority_of(state(store, "x")) == Priority.DELETE
    # Written again after the delete, without a threat: the dead HIGH cell no longer counts.
    store.put(make_entity("x", position=pb.PositionComponent(lat=2)))
    assert priority_of(state(store, "x")) == Priority.POSITION_ONLY
    store.put(make_entity("x", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW)))
    assert priority_of(state(store, "x")) == Priority.LOW


def test_priority_of_garbage_is_none():
    assert priority_of(b"\xff\xff\xff") == Priority.NONE


def test_priority_order_and_bypass():
    assert sorted(Priority, reverse=True) == [Priority.DELETE, Priority.HIGH, Priority.MEDIUM,
                                               Priority.LOW, Priority.NONE, Priority.POSITION_ONLY]
    assert BYPASS == {Priority.DELETE, Priority.HIGH}


def test_framed_size_is_the_protobuf_size_in_a_batch():
    for n in (0, 1, 127, 128, 300, 16383, 16384, 70000):
        payload = b"x" * n
        with_state = mesh_pb2.RawBatch(states=[payload]).ByteSize()
        assert framed_size(n) == with_state


# ---- pending queue ----------------------------------------------------------------------


def test_queue_sends_by_priority_then_first_come(clock):
    q = PendingQueue()
    q.put("p1", b"a" * 10, 1, Priority.POSITION_ONLY)
    q.put("l1", b"b" * 10, 2, Priority.LOW)
    q.put("d1", b"c" * 10, 3, Priority.DELETE)
    q.put("h1", b"d" * 10, 4, Priority.HIGH)
    q.put("l2", b"e" * 10, 5, Priority.LOW)
    q.put("m1", b"f" * 10, 6, Priority.MEDIUM)
    out = q.take(TokenBucket(0, clock=clock), 100, 10**6)
    assert [p.entity_id for p in out] == ["d1", "h1", "m1", "l1", "l2", "p1"]
    assert len(q) == 0 and q.min_seq() is None


def test_queue_coalesces_to_the_latest_state_keeping_its_place(clock):
    q = PendingQueue()
    q.put("a", b"a1", 1, Priority.LOW)
    q.put("b", b"b1", 2, Priority.LOW)
    assert q.put("a", b"a2", 3, Priority.LOW)  # replaced
    assert len(q) == 2 and q.coalesced == 1
    assert q.min_seq() == 2  # a's old change no longer holds the watermark
    out = q.take(TokenBucket(0, clock=clock), 10, 10**6)
    assert [(p.entity_id, p.state) for p in out] == [("a", b"a2"), ("b", b"b1")]


def test_queue_moves_an_entity_whose_priority_changed(clock):
    q = PendingQueue()
    q.put("a", b"a1", 1, Priority.LOW)
    q.put("b", b"b1", 2, Priority.LOW)
    q.put("a", b"a-deleted", 3, Priority.DELETE)
    assert q.counts() == {"LOW": 1, "DELETE": 1}
    assert [p.entity_id for p in q.take(TokenBucket(0, clock=clock), 10, 10**6)] == ["a", "b"]


def test_queue_defers_low_priority_when_the_bucket_is_empty_and_bypasses_for_high(clock):
    bucket = TokenBucket(100, 100, clock=clock)
    q = PendingQueue()
    for i in range(5):
        q.put(f"low{i}", b"x" * 48, i + 1, Priority.LOW)  # 50 framed bytes each
    out = q.take(bucket, 100, 10**6)
    assert [p.entity_id for p in out] == ["low0", "low1"]  # the burst
    assert q.deferred == 1 and len(q) == 3
    assert q.take(bucket, 100, 10**6) == []  # nothing more until the clock moves
    q.put("hot", b"h" * 48, 9, Priority.HIGH)
    q.put("gone", b"g" * 48, 10, Priority.DELETE)
    out = q.take(bucket, 100, 10**6)
    assert [p.entity_id for p in out] == ["gone", "hot"]  # past the empty bucket
    assert q.bypassed == 2 and bucket.tokens == -100
    clock.advance(1.5)  # back to +50: one more low
    assert [p.entity_id for p in q.take(bucket, 100, 10**6)] == ["low2"]
    assert q.min_seq() == 4


def test_a_lower_priority_never_overtakes_a_deferred_higher_one(clock):
    bucket = TokenBucket(100, 60, clock=clock)
    q = PendingQueue()
    q.put("m", b"m" * 100, 1, Priority.MEDIUM)
    assert [p.entity_id for p in q.take(bucket, 10, 10**6)] == ["m"]  # full bucket: allowed
    q.put("m2", b"m" * 100, 2, Priority.MEDIUM)
    q.put("tiny", b"t", 3, Priority.POSITION_ONLY)
    assert q.take(bucket, 10, 10**6) == []  # tiny would fit, but m2 waits first


def test_queue_respects_state_and_byte_limits_but_always_sends_one(clock):
    unlimited = TokenBucket(0, clock=clock)
    q = PendingQueue()
    for i in range(10):
        q.put(f"e{i}", b"x" * 100, i + 1, Priority.NONE)
    assert len(q.take(unlimited, 3, 10**6)) == 3
    assert len(q.take(unlimited, 100, 250)) == 2  # 102 bytes framed each
    q.put("big", b"x" * 1000, 20, Priority.DELETE)
    assert [p.entity_id for p in q.take(unlimited, 100, 10)] == ["big"]  # one even if over
    assert len(q) == 5


def test_queue_memory_is_bounded_by_the_number_of_entities():
    q = PendingQueue()
    for seq in range(1, 20001):
        q.put(f"e{seq % 50}", b"s", seq, Priority(seq % 6))
    assert len(q) == 50
    assert len(q._seqs) <= 2 * 50 + 64  # the lazily cleaned seq heap is rebuilt
    assert q.min_seq() == 20001 - 50
    q.clear()
    assert len(q) == 0 and q.peek() is None and q.min_seq() is None
