"""Nothing acknowledged is lost: ``meshstore serve`` killed with SIGKILL during sustained
gRPC ingest, restarted on the same data dir.

Two load threads write to a real ``serve`` subprocess: one with unary CreateEntity /
UpdateEntity / DeleteEntity calls, one with PublishEntities streams (one stream per batch,
so a batch is acknowledged exactly when its summary comes back). Every write carries a
value unique to it, in three component keys at once (position.alt, classification.label,
source.sensor_id), so a half-applied write shows as keys of different writes. Each key is
written by one thread only, one write at a time, so the writes of a key are ordered.

After a random moment the server gets SIGKILL and is restarted on its data dir; then, per
key, the state found must be a write at or after the last one that had to survive (its
value, or a later write's: acknowledged or in flight at the kill), whole.

- ``--durability commit``: every acknowledged write must survive.
- ``--durability interval --commit-interval 200``: every write acknowledged more than
  the interval + 1 s slack before the kill must survive; writes lost were acknowledged
  within that window.

Also: a second SIGTERM while a node stops gracefully still lets it commit and close
cleanly.

Knobs: ``MESHSTORE_CRASH_SEED`` (printed; a failure names it), ``MESHSTORE_CRASH_ROUNDS``
(kill/restart rounds per test, default 3), ``MESHSTORE_CRASH_LOAD_S`` (the longest load
before a kill in commit mode, default 1.2; interval mode adds 1.5 s so that some writes
are older than the window).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import random
import signal
import threading
import time
from typing import Any

import grpc
import pytest

from meshstore.components import make_entity, unpack
from meshstore.pb import entity_pb2, store_pb2, store_pb2_grpc
from test_cli import TIMEOUT, Served

pytestmark = pytest.mark.timeout(120)

SEED = int(os.environ.get("MESHSTORE_CRASH_SEED") or random.SystemRandom().randrange(2**32))
ROUNDS = int(os.environ.get("MESHSTORE_CRASH_ROUNDS", "3"))
LOAD_S = float(os.environ.get("MESHSTORE_CRASH_LOAD_S", "1.2"))
NODE = "crash-node"
#: Interval mode: writes acknowledged longer than this before the kill must survive.
INTERVAL_MS = 200
SLACK_S = 1.0
RPC_TIMEOUT = 15.0

UNARY_KEYS = 40  # per round
PUBLISH_KEYS = 200  # per round


class Serve(Served):
    """``Served`` that kills its process if it does not come up (nothing left running)."""

    def __init__(self, *args: Any, **env: str) -> None:
        try:
            super().__init__(*args, **env)
        except BaseException:
            proc = getattr(self, "proc", None)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if getattr(self, "log", None) is not None:
                self.log.close()
            raise


def seed_note(seed: int) -> str:
    return f"(rerun with MESHSTORE_CRASH_SEED={seed})"


# ---- what was written ---------------------------------------------------------------------

@dataclasses.dataclass
class Write:
    key: str
    wid: int  # the value unique to this write (0 for a delete)
    deleted: bool
    sent: float
    acked: float | None = None  # time.monotonic() once its RPC returned OK


class History:
    """Every write issued, per key in issue order (one writer per key), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.by_key: dict[str, list[Write]] = {}
        self.errors: list[tuple[float, str, str]] = []  # (when, thread, error)

    def issue(self, key: str, deleted: bool = False) -> Write:
        with self._lock:
            write = Write(key, 0 if deleted else next(self._ids), deleted, time.monotonic())
            self.by_key.setdefault(key, []).append(write)
            return write

    def failed(self, thread: str, exc: BaseException) -> None:
        what = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else repr(exc)
        with self._lock:
            self.errors.append((time.monotonic(), thread, what))

    def acked(self) -> int:
        return sum(w.acked is not None for ws in self.by_key.values() for w in ws)


def value_entity(key: str, wid: int) -> entity_pb2.Entity:
    label = f"w{wid}"
    return make_entity(key, entity_pb2.ENTITY_TYPE_TRACK,
                       position=entity_pb2.PositionComponent(lat=float(wid % 170 - 85), lon=1.0, alt=float(wid)),
                       classification=entity_pb2.ClassificationComponent(label=label, confidence=0.5),
                       source=entity_pb2.SourceComponent(sensor_id=label))


def write_of(entity: entity_pb2.Entity) -> int:
    """The write id an entity holds; AssertionError if its keys come from different writes."""
    keys = set(entity.components)
    assert keys == {"position", "classification", "source"}, f"{entity.id}: keys {sorted(keys)} (half-applied?)"
    position = unpack(entity, "position", entity_pb2.PositionComponent)
    label = unpack(entity, "classification", entity_pb2.ClassificationComponent).label
    sensor = unpack(entity, "source", entity_pb2.SourceComponent).sensor_id
    wid = int(position.alt)
    assert label == sensor == f"w{wid}" and position.lat == wid % 170 - 85 and position.alt == wid, \
        f"{entity.id}: half-applied write: position={position} label={label} sensor={sensor}"
    return wid


# ---- load ---------------------------------------------------------------------------------

class Load:
    """The two writer threads of one round, against ``addr``, until stopped or an RPC fails."""

    def __init__(self, addr: str, history: History, prefix: str, rng: random.Random) -> None:
        self.history = history
        self.prefix = prefix
        self.stop = threading.Event()
        self.channel = grpc.insecure_channel(addr)
        self.stub = store_pb2_grpc.EntityStoreServiceStub(self.channel)
        seeds = rng.randrange(2**32), rng.randrange(2**32)
        self.threads = [threading.Thread(target=self._guard, args=("unary", self._unary, seeds[0]), daemon=True),
                        threading.Thread(target=self._guard, args=("publish", self._publish, seeds[1]), daemon=True)]
        self.counts = {"unary": 0, "publish_batches": 0}

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(RPC_TIMEOUT * 3)
            assert not thread.is_alive(), f"load thread {thread.name} did not stop"
        self.channel.close()

    def _guard(self, name: str, body: Any, seed: int) -> None:
        try:
            body(random.Random(seed))
        except Exception as exc:  # noqa: BLE001 - the kill ends the load; the test checks when
            self.history.failed(name, exc)

    def _unary(self, rng: random.Random) -> None:
        live: set[str] = set()
        keys = [f"{self.prefix}-u{k}" for k in range(UNARY_KEYS)]
        stub = self.stub
        while not self.stop.is_set():
            key = rng.choice(keys)
            if key in live and rng.random() < 0.15:
                write = self.history.issue(key, deleted=True)
                stub.DeleteEntity(store_pb2.DeleteEntityRequest(id=key), timeout=RPC_TIMEOUT)
                live.discard(key)
            elif key in live:
                write = self.history.issue(key)
                stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=value_entity(key, write.wid)),
                                  timeout=RPC_TIMEOUT)
            else:
                write = self.history.issue(key)
                stub.CreateEntity(store_pb2.CreateEntityRequest(entity=value_entity(key, write.wid)),
                                  timeout=RPC_TIMEOUT)
                live.add(key)
            write.acked = time.monotonic()
            self.counts["unary"] += 1

    def _publish(self, rng: random.Random) -> None:
        keys = [f"{self.prefix}-p{k}" for k in range(PUBLISH_KEYS)]
        stub = self.stub
        while not self.stop.is_set():
            batch = [self.history.issue(key) for key in rng.sample(keys, rng.randint(5, 30))]
            entities = [value_entity(w.key, w.wid) for w in batch]
            # Several messages per stream, both forms (`entity` and batched `entities`).
            messages, i = [], 0
            while i < len(entities):
                n = rng.randint(1, 10)
                chunk = entities[i:i + n]
                messages.append(store_pb2.PublishRequest(entity=chunk[0]) if n == 1
                                else store_pb2.PublishRequest(entities=chunk))
                i += n
            summary = stub.PublishEntities(iter(messages), timeout=RPC_TIMEOUT)
            assert (summary.applied, summary.rejected, summary.stale) == (len(batch), 0, 0), summary
            now = time.monotonic()
            for write in batch:
                write.acked = now
            self.counts["publish_batches"] += 1


# ---- checks -------------------------------------------------------------------------------

def check_round(history: History, listed: dict[str, entity_pb2.Entity], prefix: str, killed_at: float,
                window: float, seed: int) -> dict[str, Any]:
    """Per key of the round: the state found is a write at or after the last write
    acknowledged ``window`` seconds before the kill (0: any acknowledged write) - that
    one or a later one - and whole; returns counts."""
    cutoff = killed_at - window if window else float("inf")
    note = seed_note(seed)
    found = {key: e for key, e in listed.items() if key.startswith(prefix + "-")}
    phantom = set(found) - set(history.by_key)
    assert not phantom, f"entities nobody wrote: {sorted(phantom)[:10]} {note}"
    lost = kept = in_flight_applied = 0
    oldest_lost = 0.0
    for key, writes in history.by_key.items():
        floor = max((i for i, w in enumerate(writes) if w.acked is not None and w.acked <= cutoff), default=-1)
        entity = found.get(key)
        if entity is None:
            matches = [i for i, w in enumerate(writes) if w.deleted]
            state = "absent"
        else:
            wid = write_of(entity)
            matches = [i for i, w in enumerate(writes) if w.wid == wid]
            assert matches, f"{key}: holds w{wid}, never written to this key {note}"
            state = f"w{wid}"
        # The latest write that explains the state (absent: also "never written", -1).
        index = max([*matches, *([-1] if entity is None else [])])
        assert index >= floor, (
            f"{key}: acknowledged write lost: found {state} (write #{index}), but write #{floor} "
            f"{writes[floor]} was acknowledged {killed_at - writes[floor].acked:.3f}s before the kill; "
            f"writes from #{max(0, index)}: {writes[max(0, index):][:8]} {note}")
        kept += 1
        dropped = [w for w in writes[index + 1:] if w.acked is not None]
        lost += len(dropped)
        oldest_lost = max([oldest_lost, *(killed_at - w.acked for w in dropped)])
        in_flight_applied += writes[index].acked is None if index >= 0 else 0
    return {"keys": kept, "lost_acked": lost, "oldest_lost_s": round(oldest_lost, 3),
            "in_flight_applied": in_flight_applied}


def listing(served: Served) -> dict[str, entity_pb2.Entity]:
    entities = served.stub.ListEntities(store_pb2.ListEntitiesRequest(), timeout=TIMEOUT).entities
    return {e.id: e for e in entities}


def picture(listed: dict[str, entity_pb2.Entity]) -> dict[str, bytes]:
    return {key: e.SerializeToString(deterministic=True) for key, e in listed.items()}


# ---- the tests ----------------------------------------------------------------------------

def crash_rounds(tmp_path: pathlib.Path, mode: str, seed: int) -> None:
    rng = random.Random(seed)
    data_dir = str(tmp_path / "data")
    args = ["--node-id", NODE, "--data-dir", data_dir, "--durability", mode]
    if mode == "interval":
        args += ["--commit-interval", str(INTERVAL_MS)]
        load_range = (SLACK_S + INTERVAL_MS / 1000 + 0.3, SLACK_S + INTERVAL_MS / 1000 + 0.3 + LOAD_S)
        window = INTERVAL_MS / 1000 + SLACK_S
    else:
        load_range = (0.2, LOAD_S)
        window = 0.0
    note = seed_note(seed)
    before: dict[str, bytes] = {}  # what earlier rounds left, as found after their restart
    served = Serve(tmp_path, *args)
    try:
        for round_ in range(ROUNDS):
            prefix = f"r{round_}"
            stats = served.stats()
            # The window a crash may lose: the interval plus a slow commit's time (p99).
            window = INTERVAL_MS + stats.get("commit_ms_p99", 0.0) if mode == "interval" else 0
            assert stats["loss_window_ms"] == pytest.approx(window, abs=0.01), stats
            incarnation = stats["incarnation"]
            history = History()
            load = Load(served.addr, history, prefix, rng)
            load.start()
            time.sleep(rng.uniform(*load_range))
            killed_at = time.monotonic()
            served.proc.send_signal(signal.SIGKILL)
            try:
                load.join()
            finally:
                assert served.stop(signal.SIGKILL) == -signal.SIGKILL
            early = [e for e in history.errors if e[0] < killed_at]
            assert not early, f"writes failed before the kill: {early} {note}"
            assert history.acked() > 0, f"no write was acknowledged in {load_range} s {note}"

            served = Serve(tmp_path, *args)
            log = served.text()
            assert "storage opened after an unclean stop; new incarnation" in log, log
            previous = f"interval:{INTERVAL_MS}ms" if mode == "interval" else "commit"
            assert f"previous_durability={previous}" in log, log
            if mode == "commit":
                assert 'may_be_lost="nothing acknowledged"' in log, log
            assert served.stats()["incarnation"] != incarnation

            listed = listing(served)
            counts = check_round(history, listed, prefix, killed_at, window, seed)
            now = picture(listed)
            changed = [k for k, v in before.items() if now.get(k) != v]
            assert not changed, f"entities of earlier rounds changed by the crash: {changed[:10]} {note}"
            before = now
            if mode == "commit":
                assert counts["lost_acked"] == 0
            started = min(w.sent for writes in history.by_key.values() for w in writes)
            print(f"{mode} round {round_}: load {killed_at - started:.2f}s {load.counts} "
                  f"acked={history.acked()} {counts}")
    finally:
        served.stop(signal.SIGKILL)


@pytest.fixture
def seed() -> int:
    print(f"MESHSTORE_CRASH_SEED={SEED} MESHSTORE_CRASH_ROUNDS={ROUNDS}")
    return SEED


def test_kill_during_ingest_loses_nothing_acknowledged(tmp_path: pathlib.Path, seed: int) -> None:
    crash_rounds(tmp_path, "commit", seed)


def test_kill_with_interval_durability_loses_at_most_the_window(tmp_path: pathlib.Path, seed: int) -> None:
    crash_rounds(tmp_path, "interval", seed)


def test_second_sigterm_during_shutdown_still_closes_cleanly(tmp_path: pathlib.Path) -> None:
    """A second SIGTERM while a gracefully stopping node commits what is left (here a
    backlog of acknowledged interval-durability writes) cuts the grace period short,
    not the final commit: the restart is clean and finds every write."""
    count = 40_000
    args = ("--node-id", NODE, "--data-dir", str(tmp_path / "data"), "--durability", "interval",
            "--commit-interval", "600000")
    served = Serve(tmp_path, *args)
    try:
        for start in range(0, count, 2000):
            summary = served.stub.PublishEntities(iter([store_pb2.PublishRequest(
                entities=[value_entity(f"k{i}", i + 1) for i in range(start, start + 2000)])]), timeout=TIMEOUT * 3)
            assert summary.applied == 2000
        assert served.stats()["pending_changes"] > 0  # acknowledged, not yet committed
        served.channel.close()
        served.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while "shutting down" not in served.text():
            assert time.monotonic() < deadline and served.proc.poll() is None, served.text()
            time.sleep(0.005)
        time.sleep(0.03)  # drained; the final commit of the backlog is under way
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(TIMEOUT * 3)
    finally:
        served.stop(signal.SIGKILL)
    restarted = Serve(tmp_path, *args)
    try:
        assert "unclean stop" not in restarted.text(), (served.text(), restarted.text())
        assert restarted.stats()["entities"] == count
    finally:
        restarted.stop()
