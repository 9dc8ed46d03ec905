"""A store's data dir, in process: what a restart brings back (after a clean close and
after SIGKILL), which data dirs are refused (and left as they were), a read-only and a
full disk (tmpfs mounts: the tests run as root), and a backup taken during ingest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import alive, classification, position, threat, threat_level, track
from meshstore import Store
from meshstore._core import backup_data_dir, read_data_dir, stored_node_id
from meshstore.errors import NotFoundError, StorageError
from meshstore.pb import entity_pb2 as pb

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0
DB = "meshstore.db"


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)
    return result


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file of a dir: name -> sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def assert_untouched(directory: pathlib.Path, before: dict[str, str]) -> None:
    """Every file that was there is byte-identical. Files that may have been added: the
    lock file (it holds the pid of the last process that took it) and SQLite's shared
    memory index and an EMPTY write-ahead log (a WAL-mode file opened for reading)."""
    after = snapshot(directory)
    assert {name: after.get(name) for name in before} == before
    added = set(after) - set(before)
    assert added <= {"meshstore.lock", "meshstore.db-shm", "meshstore.db-wal"}, added
    if "meshstore.db-wal" in added:
        assert (directory / "meshstore.db-wal").stat().st_size == 0


def replica_states(store: Store) -> dict[str, bytes]:
    states, _ = store.replica_changes(0)
    return {pb.Entity.FromString(s).id: s for s in states}


def stored_states(directory: pathlib.Path | str) -> dict[str, tuple[bytes, int]]:
    _, _, _, states = read_data_dir(str(directory))
    return {pb.Entity.FromString(s).id: (s, seq) for s, seq in states}


# ---- restart ----------------------------------------------------------------------------

def test_clean_restart_brings_everything_back_and_resumes_the_incarnation(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    store = Store(path=data, node_id="n1")
    store.create(track("t1", position=position(1.0, 2.0), threat=threat(pb.THREAT_LEVEL_LOW)))
    store.update(track("t1", threat=threat(pb.THREAT_LEVEL_HIGH)))
    store.create(track("t2", classification=classification("boat")))
    store.delete("t2")
    store.create(track("t3", position=position(3.0, 3.0)))
    store.create(track("soon", position=position(4.0, 4.0)))
    store.create(track("later", position=position(5.0, 5.0)))
    store.set_ttl("soon", 1.0)  # both still pending at the restart: their timers must be re-armed
    store.set_ttl("later", 2.0)
    ids = ("t1", "t2", "t3", "soon", "later")
    before = {
        "states": {i: store.replica_state(i) for i in ids},
        "incarnation": store.incarnation,
        "counter": store.stats()["dot_counter"],
        "seq": store.seq,
        "context": store.context_summary(),
    }
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.create(track("late"))

    _check_resumed(data, before, ids)
    time.sleep(0.3)  # the store of the second run is gone (its timers hold it weakly)
    with Store(path=data) as third:
        wait_for(lambda: not alive(third, "t3"), 3.0, "the expiry that passed while closed")
        assert alive(third, "t1")


def _check_resumed(data: pathlib.Path, before: dict, ids: tuple[str, ...]) -> None:
    again = Store(path=data)  # node id from the data dir
    try:
        assert again.node_id == "n1" and again.storage.clean
        assert again.incarnation == before["incarnation"]
        assert again.stats()["dot_counter"] == before["counter"]
        assert again.seq == before["seq"]
        for entity_id in ids:  # versions and dots, siblings, delete record, change seq: all of it
            assert again.replica_state(entity_id) == before["states"][entity_id], entity_id
        assert again.context_summary() == before["context"]
        assert not alive(again, "t2") and alive(again, "t1") and alive(again, "soon")
        assert threat_level(again.get("t1")) == pb.THREAT_LEVEL_HIGH
        # The dot counter resumes: the next write's dot follows the last one issued.
        written = again.update(track("t3", position=position(9.0, 9.0))).entity
        assert written.versions["position"].incarnation == before["incarnation"]
        assert written.versions["position"].counter == before["counter"] + 1
        # The loaded expiries fire when due.
        wait_for(lambda: not alive(again, "soon"), 3.0, "the re-armed expiry of 'soon'")
        assert alive(again, "later")
        wait_for(lambda: not alive(again, "later"), 3.0, "the re-armed expiry of 'later'")
        again.set_ttl("t3", 0.2)  # passes while the store is closed
    finally:
        again.close()


UNCLEAN_WRITER = textwrap.dedent("""
    import base64, json, sys, time
    from meshstore import Store
    from meshstore.components import make_entity
    from meshstore.pb import entity_pb2 as pb
    store = Store(path=sys.argv[1], node_id="n1", durability=sys.argv[2])
    for i in range(50):
        store.put(make_entity(f"e{i}", pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=i)))
    store.delete("e7")
    store.sync(10)
    states, _ = store.replica_changes(0)
    print(json.dumps({"incarnation": store.incarnation,
                      "states": [base64.b64encode(s).decode() for s in states]}), flush=True)
    for i in range(50, 10**9):  # keeps writing (and committing) until killed
        store.put(make_entity(f"more{i % 20}", pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=i % 90)))
        time.sleep(0.001)
""")


@pytest.mark.parametrize("durability", ["commit", "interval"])
def test_sigkill_after_sync_restarts_with_a_new_incarnation_and_everything_synced(
        tmp_path: pathlib.Path, durability: str) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", UNCLEAN_WRITER, str(data), durability],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        synced = json.loads(line)
        time.sleep(0.2)  # let it write on past the sync
        proc.kill()
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    import base64

    expected = {pb.Entity.FromString(s).id: s for s in (base64.b64decode(b) for b in synced["states"])}
    store = Store(path=data)
    try:
        assert store.node_id == "n1" and not store.storage.clean
        assert store.incarnation != synced["incarnation"]
        now = replica_states(store)
        for entity_id, state in expected.items():
            # e0..e49 were not written after the sync: exactly as synced.
            assert now[entity_id] == state, entity_id
        assert not alive(store, "e7") and alive(store, "e8")
        # The new incarnation's dots never collide with the old one's.
        written = store.put(track("after", position=position(1.0, 1.0))).entity
        assert written.versions["position"].incarnation == store.incarnation
    finally:
        store.close()


# ---- refused data dirs ------------------------------------------------------------------

def _real_data_dir(path: pathlib.Path, n: int = 300) -> pathlib.Path:
    store = Store(path=path, node_id="n1")
    for i in range(n):
        store.put(track(f"e{i}", classification=classification("x" * 200)))
    store.close()
    return path


def _sqlite(path: pathlib.Path, *statements: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _garbage(d: pathlib.Path) -> None:
    d.mkdir()
    (d / DB).write_bytes(b"this is not a database\n" * 200)


def _truncated(d: pathlib.Path) -> None:
    _real_data_dir(d)
    db = d / DB
    assert sorted(p.name for p in d.iterdir()) == [DB, "meshstore.lock"]  # closed: no WAL left
    os.truncate(db, db.stat().st_size // 2)


def _other_sqlite(d: pathlib.Path) -> None:
    _sqlite(d / DB, "CREATE TABLE notes(text)", "INSERT INTO notes VALUES ('mine')")


def _newer(d: pathlib.Path) -> None:
    _sqlite(d / DB, "PRAGMA application_id = 0x4d534831", "PRAGMA user_version = 99", "CREATE TABLE future(x)")


def _other_files(d: pathlib.Path) -> None:
    d.mkdir()
    (d / "notes.txt").write_text("not meshstore's\n")
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff")


REFUSED = {
    "garbage": (_garbage, r"meshstore\.db is not an SQLite database \(corrupt or foreign file\)"),
    "truncated": (_truncated, r"cannot read .*meshstore\.db: database disk image is malformed"),
    "other-sqlite": (_other_sqlite, r"meshstore\.db is not a meshstore data file"),
    "newer-format": (_newer, r"meshstore\.db has data format 99, newer than this meshstore reads \(1\)"),
    "other-files": (_other_files, r"is not a meshstore data dir: it holds other files "
                                  r"\((notes\.txt, photo\.jpg|photo\.jpg, notes\.txt)\) and no meshstore\.db"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_data_dir_is_refused_and_left_as_it_was(tmp_path: pathlib.Path, case: str) -> None:
    make, message = REFUSED[case]
    d = tmp_path / case
    make(d)
    before = snapshot(d)
    with pytest.raises(StorageError, match=message) as err:
        Store(path=d)
    assert str(d) in str(err.value)
    assert_untouched(d, before)
    with pytest.raises(StorageError, match=message):
        Store(path=d, node_id="explicit")  # this path takes the lock before it reads the file
    assert_untouched(d, before)


def test_a_data_dir_of_another_node_is_refused(tmp_path: pathlib.Path) -> None:
    d = _real_data_dir(tmp_path / "n1", n=3)
    before = snapshot(d)
    with pytest.raises(StorageError, match=r"data dir .* belongs to node 'n1', not 'n2'"):
        Store(path=d, node_id="n2")
    assert_untouched(d, before)
    assert stored_node_id(str(d)) == "n1"


HOLDER = textwrap.dedent("""
    import sys, time
    from meshstore import Store
    from meshstore.components import make_entity
    from meshstore.pb import entity_pb2 as pb
    store = Store(path=sys.argv[1], node_id="holder")
    store.put(make_entity("held", pb.ENTITY_TYPE_TRACK))
    store.sync(10)
    print("ready", flush=True)
    sys.stdin.readline()
    store.put(make_entity("after", pb.ENTITY_TYPE_TRACK))
    store.close()
    print("closed", flush=True)
""")


def test_a_data_dir_in_use_by_another_process_is_refused(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        with pytest.raises(StorageError, match=rf"data dir {d} is in use by another process \(pid {proc.pid}\)"):
            Store(path=d)
        with pytest.raises(StorageError, match="in use"):
            Store(path=d, node_id="holder")
        # The holder was not disturbed: it writes on and closes cleanly.
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed", proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    with Store(path=d) as store:
        assert store.node_id == "holder" and store.storage.clean
        assert alive(store, "held") and alive(store, "after")


# ---- read-only and full disks (tmpfs) ---------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A tmpfs of ``size`` mounted at ``path``, always unmounted at the end; skips the
    test if this process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if result.returncode != 0:
        reason = result.stderr.strip()
        if "permission" in reason.lower() or "not permitted" in reason.lower() or "only root" in reason.lower():
            pytest.skip(f"cannot mount a tmpfs here: {reason}")
        raise AssertionError(f"mount failed: {reason}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=TIMEOUT)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=TIMEOUT)


def remount(path: pathlib.Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True,
                   timeout=TIMEOUT)


def test_a_read_only_data_dir_is_refused(tmp_path: pathlib.Path) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        d = _real_data_dir(mnt / "data", n=5)
        before = snapshot(d)
        remount(mnt, "ro")
        with pytest.raises(StorageError, match=rf"{d}/meshstore\.db"):
            Store(path=d)
        with pytest.raises(StorageError, match=rf"cannot create data dir {mnt}/new: Read-only file system"):
            Store(path=mnt / "new")
        assert snapshot(d) == before


def _blob(i: int) -> pb.Entity:
    return track(f"e{i}", classification=classification(f"{i:06d}" + "x" * 3000))


def test_a_full_disk_refuses_writes_then_recovers_without_losing_what_was_synced(tmp_path: pathlib.Path) -> None:
    with tmpfs(tmp_path / "mnt", "2m") as mnt:
        d = mnt / "data"
        store = Store(path=d, node_id="n1")
        acked: set[str] = set()
        written: list[str] = []
        failure: StorageError | None = None
        try:
            deadline = time.monotonic() + 20
            i = 0
            while failure is None and time.monotonic() < deadline:
                try:
                    store.put(_blob(i))
                    written.append(f"e{i}")
                    i += 1
                    if i % 10 == 0:
                        store.sync(5)
                        acked.update(written)
                except StorageError as exc:
                    failure = exc
            assert failure is not None, "the 2 MB disk never filled"
            assert acked, "nothing was synced before the disk filled"
            assert "full" in str(failure) or "failing" in str(failure), failure
            # Writes are refused now, and a refused write is not applied.
            wait_for(lambda: store.stats()["storage_error"], what="storage_error in stats")
            assert "full" in store.stats()["storage_error"]
            seq, entities = store.seq, store.stats()["entities"]
            with pytest.raises(StorageError, match="refused|failing"):
                store.put(track("refused", position=position(1.0, 1.0)))
            with pytest.raises(NotFoundError):
                store.get("refused")
            assert store.seq == seq and store.stats()["entities"] == entities
            with pytest.raises(StorageError):
                store.sync(1)

            remount(mnt, "size=64m")  # space freed: the writer's retry (every 1 s) commits again

            def write_again() -> bool:
                try:
                    store.put(track("recovered", position=position(2.0, 2.0)))
                    return True
                except StorageError:
                    return False

            wait_for(write_again, 10, "writes accepted again")
            store.sync(10)
            assert store.stats()["storage_error"] is None
        finally:
            store.close()
        with Store(path=d) as again:
            assert again.storage.clean
            for entity_id in sorted(acked) + ["recovered"]:
                assert alive(again, entity_id), entity_id
            assert not alive(again, "refused")


# ---- backpressure --------------------------------------------------------------------------

def test_a_writer_that_falls_behind_holds_writes_back_and_drops_none(tmp_path: pathlib.Path) -> None:
    """With more than ``max_pending`` uncommitted changes, a write waits for the storage
    writer (bounded backlog), and goes on once a commit catches up: nothing is dropped."""
    bound, total = 50, 120
    with Store(node_id="slow", path=tmp_path / "data", durability="interval", commit_interval=3600,
               max_pending=bound) as store:
        done: list[int] = []

        def write_all() -> None:
            for i in range(total):
                store.put(track(f"w{i}", position=position(1.0, 1.0)))
                done.append(i)

        writer = threading.Thread(target=write_all)
        writer.start()
        # The interval is an hour: the writer thread commits nothing, so the writes stop
        # one past the bound and stay there.
        wait_for(lambda: len(done) == bound + 1, what="writes up to the bound")
        time.sleep(0.5)
        assert len(done) == bound + 1 and writer.is_alive()
        assert store.stats()["pending_changes"] == bound + 1
        store.sync()  # a commit now: the held write goes on, and the rest after more commits
        while writer.is_alive():
            store.sync()
            writer.join(0.05)
        assert len(done) == total and len(store.list()) == total
        store.sync()
        assert store.stats()["pending_changes"] == 0
    assert len(stored_states(tmp_path / "data")) == total


# ---- backup during ingest ---------------------------------------------------------------

def test_a_backup_during_ingest_is_a_consistent_prefix(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    store = Store(path=data, node_id="ingest")
    history: list[tuple[int, str, bytes]] = []  # (seq, id, state after that write), in seq order
    stop = threading.Event()

    def ingest() -> None:
        i = 0
        while not stop.is_set():
            entity_id = f"e{i % 40}"
            store.put(track(entity_id, classification=classification(f"write {i}")))
            history.append((store.seq, entity_id, store.replica_state(entity_id)[0]))
            i += 1

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        wait_for(lambda: store.stats()["committed_seq"] >= 200, what="ingest under way and committing")
        backups = []
        for n in range(3):
            dest = tmp_path / f"restore{n}" / DB
            dest.parent.mkdir()
            backup_data_dir(str(data), str(dest))
            backups.append(dest.parent)
            time.sleep(0.05)
    finally:
        stop.set()
        writer.join()
    running_incarnation = store.incarnation
    store.close()

    for restored in backups:
        meta, clean, _, states = read_data_dir(str(restored))
        held = {pb.Entity.FromString(s).id: (s, seq) for s, seq in states}
        seq = meta["seq"]
        assert not clean and held and 0 < seq <= history[-1][0]
        assert max(s for _, s in held.values()) == seq  # the seq it says is the seq it holds
        expected: dict[str, tuple[bytes, int]] = {}
        for write_seq, entity_id, state in history:
            if write_seq <= seq:
                expected[entity_id] = (state, write_seq)
        assert held == expected  # every entity at its state as of that seq: a prefix, no torn write
        with Store(path=restored) as node:
            assert node.node_id == "ingest" and not node.storage.clean
            assert node.incarnation != running_incarnation  # a copy of a running node: a new incarnation
            assert replica_states(node) == {i: s for i, (s, _) in expected.items()}
        shutil.rmtree(restored)
