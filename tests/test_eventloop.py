"""Tests for meshstore.eventloop: the one loop that owns every timer.

Real-time tests use deadlines tens of milliseconds away and poll for the
outcome with a generous timeout, so a loaded machine makes them slower, not
flaky. Nothing here asserts how fast anything is.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from meshstore.eventloop import EventLoop

POLL_TIMEOUT = 5.0


def wait_for(predicate: Callable[[], bool], timeout: float = POLL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)


class Recorder:
    """Thread-safe log of (label, time fired) appended by callbacks."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.events: list[tuple[object, float]] = []

    def cb(self, label: object) -> Callable[[], None]:
        def callback() -> None:
            with self._lock:
                self.events.append((label, self._clock()))

        return callback

    def labels(self) -> list[object]:
        with self._lock:
            return [label for label, _ in self.events]

    def saw(self, label: object) -> Callable[[], bool]:
        return lambda: label in self.labels()


def noop() -> None:
    pass


def loop_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    with EventLoop(name="test-eventloop") as ev:
        yield ev


# -- firing ----------------------------------------------------------------


def test_timer_fires_once_not_before_its_time(loop: EventLoop) -> None:
    rec = Recorder()
    when = time.time() + 0.05
    loop.schedule("ttl", when, rec.cb("ttl"))
    loop.schedule("sentinel", when + 0.05, rec.cb("sentinel"))
    wait_for(rec.saw("sentinel"))
    assert rec.labels() == ["ttl", "sentinel"]
    assert rec.events[0][1] >= when
    assert loop.pending() == 0
    assert loop.stats()["fired"] == 2


def test_callbacks_fire_in_deadline_order(loop: EventLoop) -> None:
    rec = Recorder()
    base = time.time() + 0.05
    offsets = list(range(20))
    random.Random(1).shuffle(offsets)
    for i in offsets:
        loop.schedule(i, base + i * 0.005, rec.cb(i))
    wait_for(lambda: len(rec.labels()) == 20)
    assert rec.labels() == list(range(20))


def test_due_timers_fire_in_deadline_order_even_when_all_are_late() -> None:
    # Scheduled in the past before the thread runs: all due at once, so only
    # the heap order decides.
    rec = Recorder()
    ev = EventLoop(name="test-eventloop-late")
    now = time.time()
    keys = list(range(50))
    random.Random(2).shuffle(keys)
    for k in keys:
        ev.schedule(k, now - 100 + k, rec.cb(k))
    with ev:
        wait_for(lambda: len(rec.labels()) == 50)
    assert rec.labels() == list(range(50))


def test_equal_deadlines_with_incomparable_keys(loop: EventLoop) -> None:
    # Ties must never fall through to comparing keys (an int and a tuple here).
    rec = Recorder()
    when = time.time() - 1
    loop.schedule(1, when, rec.cb(1))
    loop.schedule(("relay", "peer-a"), when, rec.cb("relay"))
    wait_for(lambda: len(rec.labels()) == 2)
    assert sorted(map(str, rec.labels())) == ["1", "relay"]


# -- replace and cancel ----------------------------------------------------


def test_schedule_same_key_replaces(loop: EventLoop) -> None:
    rec = Recorder()
    now = time.time()
    loop.schedule("k", now + 0.05, rec.cb("old"))
    loop.schedule("k", now + 0.1, rec.cb("new"))
    assert loop.pending() == 1
    assert loop.deadline("k") == now + 0.1
    loop.schedule("sentinel", now + 0.15, rec.cb("sentinel"))
    wait_for(rec.saw("sentinel"))
    assert rec.labels() == ["new", "sentinel"]
    assert loop.stats()["replaced"] == 1


def test_replaced_due_timer_never_runs_old_callback() -> None:
    # Both versions are due by the time the thread starts: only the live one runs.
    rec = Recorder()
    ev = EventLoop(name="test-eventloop-replace")
    past = time.time() - 10
    ev.schedule("k", past, rec.cb("old"))
    ev.schedule("k", past + 1, rec.cb("new"))
    ev.schedule("sentinel", past + 2, rec.cb("sentinel"))
    with ev:
        wait_for(rec.saw("sentinel"))
    assert rec.labels() == ["new", "sentinel"]


def test_reschedule_earlier_fires_at_new_time(loop: EventLoop) -> None:
    rec = Recorder()
    loop.schedule("k", time.time() + 3600, rec.cb("k"))
    loop.schedule("k", time.time() + 0.02, rec.cb("k"))
    wait_for(rec.saw("k"))
    assert loop.pending() == 0


def test_cancel(loop: EventLoop) -> None:
    rec = Recorder()
    now = time.time()
    loop.schedule("k", now + 0.05, rec.cb("k"))
    assert loop.cancel("k") is True
    assert loop.cancel("k") is False
    assert loop.cancel("never-scheduled") is False
    assert loop.deadline("k") is None
    loop.schedule("sentinel", now + 0.1, rec.cb("sentinel"))
    wait_for(rec.saw("sentinel"))
    assert rec.labels() == ["sentinel"]
    stats = loop.stats()
    assert stats["cancelled"] == 1
    assert stats["fired"] == 1


def test_deadline_and_pending(loop: EventLoop) -> None:
    far = time.time() + 3600
    assert loop.deadline("a") is None
    loop.schedule("a", far, noop)
    loop.schedule("b", far + 1, noop)
    assert loop.deadline("a") == far
    assert loop.deadline("b") == far + 1
    assert loop.pending() == 2


def test_past_deadline_fires_promptly(loop: EventLoop) -> None:
    rec = Recorder()
    loop.schedule("old", time.time() - 3600, rec.cb("old"))
    wait_for(rec.saw("old"))


def test_new_earliest_deadline_wakes_a_long_wait(loop: EventLoop) -> None:
    # The loop is waiting on a far deadline; a nearer one must not wait for it.
    rec = Recorder()
    loop.schedule("far", time.time() + 3600, rec.cb("far"))
    wait_for(lambda: loop.stats()["heap_size"] == 1)
    loop.schedule("near", time.time() + 0.02, rec.cb("near"))
    wait_for(rec.saw("near"))
    assert rec.labels() == ["near"]


# -- callbacks -------------------------------------------------------------


def test_raising_callback_is_logged_and_loop_continues(
    loop: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()

    def boom() -> None:
        raise RuntimeError("boom")

    now = time.time()
    with caplog.at_level(logging.ERROR, logger="meshstore.eventloop"):
        loop.schedule("approval-42", now + 0.02, boom)
        loop.schedule("after", now + 0.05, rec.cb("after"))
        wait_for(rec.saw("after"))
        # The error is counted after the callback returns, just before the next timer.
        wait_for(lambda: loop.stats()["callback_errors"] == 1)
    stats = loop.stats()
    assert stats["fired"] == 2
    errors = [r for r in caplog.records if r.name == "meshstore.eventloop"]
    assert len(errors) == 1
    assert "'approval-42'" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)


def test_periodic_callback_reschedules_itself(loop: EventLoop) -> None:
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(time.time())
        if len(ticks) < 5:
            loop.schedule("tick", time.time() + 0.01, tick)

    loop.schedule("tick", time.time() + 0.01, tick)
    wait_for(lambda: len(ticks) == 5)
    wait_for(lambda: loop.pending() == 0)
    assert ticks == sorted(ticks)
    assert loop.stats()["fired"] == 5


def test_callback_may_cancel_and_schedule_other_keys(loop: EventLoop) -> None:
    rec = Recorder()
    now = time.time()

    def first() -> None:
        rec.cb("first")()
        assert loop.cancel("victim") is True
        loop.schedule("spawned", time.time(), rec.cb("spawned"))

    loop.schedule("first", now + 0.02, first)
    loop.schedule("victim", now + 0.06, rec.cb("victim"))
    loop.schedule("sentinel", now + 0.1, rec.cb("sentinel"))
    wait_for(rec.saw("sentinel"))
    assert rec.labels() == ["first", "spawned", "sentinel"]
    assert loop.stats()["callback_errors"] == 0


def test_callback_may_stop_its_own_loop() -> None:
    ev = EventLoop(name="test-eventloop-selfstop").start()
    rec = Recorder()
    ev.schedule("stop", time.time(), ev.stop)
    ev.schedule("after", time.time() + 0.05, rec.cb("after"))
    wait_for(lambda: not loop_threads("test-eventloop-selfstop"))
    assert rec.labels() == []
    assert ev.pending() == 0


# -- concurrency -----------------------------------------------------------


def test_concurrent_schedule_and_cancel_overlapping_keys(loop: EventLoop) -> None:
    # Thread t schedules keys [500t, 500t + 1000) far in the future (neighbours
    # overlap by 500), then, after all have scheduled, cancels its even keys.
    far = time.time() + 3600
    n_threads, per_thread = 4, 1000
    barrier = threading.Barrier(n_threads)
    cancelled_ok = [0] * n_threads
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            keys = list(range(500 * t, 500 * t + per_thread))
            random.Random(t).shuffle(keys)
            for k in keys:
                loop.schedule(k, far + k, noop)
            barrier.wait()
            cancelled_ok[t] = sum(loop.cancel(k) for k in keys if k % 2 == 0)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(POLL_TIMEOUT)
    assert not errors
    assert not any(th.is_alive() for th in threads)

    scheduled = set(range(500 * (n_threads - 1) + per_thread))
    live = {k for k in scheduled if k % 2 == 1}
    assert loop.pending() == len(live)
    assert all(loop.deadline(k) == far + k for k in live)
    assert all(loop.deadline(k) is None for k in scheduled - live)
    # Each even key was cancelled successfully exactly once, whichever thread won.
    assert sum(cancelled_ok) == len(scheduled) - len(live)
    stats = loop.stats()
    assert stats["replaced"] == n_threads * per_thread - len(scheduled)
    assert stats["cancelled"] == sum(cancelled_ok)
    assert stats["fired"] == 0


def test_concurrent_churn_conserves_timers(loop: EventLoop) -> None:
    # Threads race schedule/cancel on shared keys with near deadlines while the
    # loop fires them. Whatever the interleaving, every timer ever created ends
    # exactly one way: fired, cancelled, replaced, or still pending.
    n_threads, ops = 4, 2000
    ran: list[tuple[int, int]] = []
    ran_lock = threading.Lock()
    schedules = [0] * n_threads
    cancel_wins = [0] * n_threads

    def make_cb(token: tuple[int, int]) -> Callable[[], None]:
        def callback() -> None:
            with ran_lock:
                ran.append(token)

        return callback

    def worker(t: int) -> None:
        rnd = random.Random(100 + t)
        for i in range(ops):
            key = rnd.randrange(200)
            if rnd.random() < 0.3:
                cancel_wins[t] += loop.cancel(key)
            else:
                loop.schedule(key, time.time() + rnd.uniform(-0.01, 0.02), make_cb((t, i)))
                schedules[t] += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(POLL_TIMEOUT * 4)
    assert not any(th.is_alive() for th in threads)
    wait_for(lambda: loop.pending() == 0)
    # The last claimed callback may still be running: wait until all are counted.
    wait_for(lambda: len(ran) == loop.stats()["fired"])

    stats = loop.stats()
    assert sum(schedules) == stats["fired"] + stats["cancelled"] + stats["replaced"]
    assert stats["cancelled"] == sum(cancel_wins)
    assert len(ran) == len(set(ran)), "a callback ran twice"
    assert stats["fired"] > 0
    assert stats["callback_errors"] == 0
    assert stats["heap_size"] == 0


# -- bounded memory under rescheduling -------------------------------------


def test_100k_timers_rescheduled_keep_heap_bounded() -> None:
    n = 100_000
    ev = EventLoop(name="test-eventloop-100k")
    with ev:
        base = time.time() + 3600
        for k in range(n):
            ev.schedule(k, base + k, noop)
        max_heap = ev.stats()["heap_size"]
        for rnd in range(1, 4):
            for k in range(n):
                ev.schedule(k, base + rnd * n + k, noop)
            max_heap = max(max_heap, ev.stats()["heap_size"])
        stats = ev.stats()
        assert ev.pending() == n
        assert stats["replaced"] == 3 * n
        # Stale entries never exceed twice the live ones.
        assert stats["heap_size"] <= 3 * n
        assert max_heap <= 3 * n
        assert ev.deadline(0) == base + 3 * n
        assert ev.deadline(n - 1) == base + 4 * n - 1


def test_cancel_churn_keeps_heap_bounded() -> None:
    # Few live timers, many schedule/cancel pairs: the heap must not keep the dead.
    ev = EventLoop(name="test-eventloop-churn")
    far = time.time() + 3600
    for k in range(10):
        ev.schedule(("live", k), far, noop)
    for i in range(10_000):
        ev.schedule(i, far + i, noop)
        assert ev.cancel(i)
        assert ev.stats()["heap_size"] <= 3 * ev.pending()
    assert ev.pending() == 10
    ev.stop()


# -- bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "callback", "error", "message"),
    [
        (math.nan, noop, ValueError, "must be finite"),
        (math.inf, noop, ValueError, "must be finite"),
        (-math.inf, noop, ValueError, "must be finite"),
        ("1700000000", noop, TypeError, "must be a real number"),
        (None, noop, TypeError, "must be a real number"),
        (True, noop, TypeError, "must be a real number"),
        (1.0, None, TypeError, "must be callable"),
        (1.0, "noop", TypeError, "must be callable"),
    ],
)
def test_bad_input_raises_and_leaves_state_unchanged(
    loop: EventLoop, when: object, callback: object, error: type[Exception], message: str
) -> None:
    rec = Recorder()
    good_when = time.time() + 3600
    loop.schedule("k", good_when, rec.cb("k"))
    before = loop.stats()
    with pytest.raises(error, match=message):
        loop.schedule("k", when, callback)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        loop.schedule("other", when, callback)  # type: ignore[arg-type]
    assert loop.stats() == before
    assert loop.deadline("k") == good_when
    assert loop.deadline("other") is None


def test_unhashable_key_raises_and_leaves_state_unchanged(loop: EventLoop) -> None:
    before = loop.stats()
    with pytest.raises(TypeError, match="unhashable"):
        loop.schedule(["not", "hashable"], time.time(), noop)  # type: ignore[arg-type]
    assert loop.stats() == before


def test_integer_when_is_accepted(loop: EventLoop) -> None:
    rec = Recorder()
    loop.schedule("k", int(time.time()) - 1, rec.cb("k"))
    wait_for(rec.saw("k"))


# -- lifecycle -------------------------------------------------------------


def test_start_is_idempotent_and_returns_self() -> None:
    ev = EventLoop(name="test-eventloop-start")
    try:
        assert ev.start() is ev
        assert ev.start() is ev
        assert len(loop_threads("test-eventloop-start")) == 1
        assert loop_threads("test-eventloop-start")[0].daemon
    finally:
        ev.stop()


def test_timers_scheduled_before_start_fire_after_start() -> None:
    rec = Recorder()
    ev = EventLoop(name="test-eventloop-prestart")
    ev.schedule("k", time.time() + 0.02, rec.cb("k"))
    with ev:
        wait_for(rec.saw("k"))


def test_stop_is_idempotent_and_drops_pending_timers() -> None:
    rec = Recorder()
    ev = EventLoop(name="test-eventloop-stop").start()
    ev.schedule("soon", time.time() + 0.05, rec.cb("soon"))
    ev.schedule("later", time.time() + 3600, rec.cb("later"))
    ev.stop()
    assert not loop_threads("test-eventloop-stop"), "stop() must join the thread"
    ev.stop()
    assert ev.pending() == 0
    assert ev.stats()["heap_size"] == 0
    # The thread is gone, so nothing can run any more: nothing ran up to now.
    assert rec.labels() == []
    assert ev.cancel("soon") is False


def test_stopped_loop_refuses_restart_and_schedule() -> None:
    ev = EventLoop(name="test-eventloop-final")
    ev.stop()  # stop before start is fine
    with pytest.raises(RuntimeError, match="stopped"):
        ev.start()
    with pytest.raises(RuntimeError, match="stopped"):
        ev.schedule("k", time.time(), noop)
    assert not loop_threads("test-eventloop-final")


def test_context_manager_starts_and_stops() -> None:
    with EventLoop(name="test-eventloop-ctx") as ev:
        assert isinstance(ev, EventLoop)
        assert len(loop_threads("test-eventloop-ctx")) == 1
    assert not loop_threads("test-eventloop-ctx")


# -- fake clock ------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_fake_clock_with_wake() -> None:
    clock = FakeClock(1000.0)
    rec = Recorder(clock)
    with EventLoop(name="test-eventloop-fake", clock=clock) as ev:
        ev.schedule("a", 1005.0, rec.cb("a"))
        ev.schedule("b", 1010.0, rec.cb("b"))
        ev.schedule("c", 1010.0, rec.cb("c"))
        clock.now = 1007.0
        ev.wake()
        wait_for(rec.saw("a"))
        assert ev.deadline("b") == 1010.0
        clock.now = 1010.0
        ev.wake()
        wait_for(lambda: len(rec.labels()) == 3)
    assert rec.events == [("a", 1007.0), ("b", 1010.0), ("c", 1010.0)]


def test_fake_clock_timer_not_fired_before_its_time() -> None:
    clock = FakeClock(0.0)
    rec = Recorder(clock)
    with EventLoop(name="test-eventloop-fake-early", clock=clock) as ev:
        ev.schedule("k", 10.0, rec.cb("k"))
        clock.now = 9.999
        ev.wake()
        ev.schedule("probe", 9.0, rec.cb("probe"))
        # The probe is due before "k": once it has run, the loop has seen 9.999.
        wait_for(rec.saw("probe"))
        assert rec.labels() == ["probe"]
        assert ev.pending() == 1


def test_clock_jump_noticed_without_wake() -> None:
    # The loop never waits more than a second, so a clock that jumps forward
    # with nobody calling wake() is still noticed.
    clock = FakeClock(0.0)
    rec = Recorder(clock)
    with EventLoop(name="test-eventloop-jump", clock=clock) as ev:
        ev.schedule("k", 3600.0, rec.cb("k"))
        # Once the loop has read the clock it holds the lock until it waits on
        # a delay of 3600 s; only the cap on a single wait can bring it back.
        wait_for(lambda: clock.reads >= 1)
        clock.now = 3600.0
        wait_for(rec.saw("k"))
