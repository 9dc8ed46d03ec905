"""The data dir commands (``meshstore backup | export | import``) and ``serve
--data-dir``, as real subprocesses: on a running node's dir, on bad input, on bad dirs."""

from __future__ import annotations

import base64
import json
import pathlib
import re
import shutil
import subprocess

import pytest

from meshstore import Store
from meshstore._core import read_data_dir
from meshstore.cli.entities import entity_dict
from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2
from test_cli import CLI, NODE, TIMEOUT, Served, assert_one_line_error, cli_env, run
from test_storage import REFUSED, assert_untouched, snapshot

pytestmark = pytest.mark.timeout(90)

DB = "meshstore.db"
#: A peer no one listens on. A node that never replicated forgets a deleted entity at its
#: next maintenance pass; with a peer it keeps the delete until the peer acknowledges it,
#: so the tests see deleted entities in backups and exports deterministically.
NO_PEER = "127.0.0.1:9"


def node_on(tmp: pathlib.Path, data: pathlib.Path) -> Served:
    """``meshstore serve --data-dir data`` (durability commit, the default)."""
    return Served(tmp, "--data-dir", str(data), "--peer", NO_PEER)


def run_all(*commands: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Runs CLI commands concurrently (process start-up dominates)."""
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env if env is not None else cli_env()) for args in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT * 3)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def states_of(directory: pathlib.Path) -> dict[str, bytes]:
    _, _, _, states = read_data_dir(str(directory))
    return {entity_pb2.Entity.FromString(s).id: s for s, _ in states}


def populate(stub) -> None:
    """Entities of every kind: updated, deleted, with an unknown component type."""
    def create(entity: entity_pb2.Entity) -> None:
        stub.CreateEntity(store_pb2.CreateEntityRequest(entity=entity), timeout=TIMEOUT)

    create(make_entity("t1", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=1.5, lon=2.5)))
    stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=make_entity(
        "t1", entity_pb2.ENTITY_TYPE_TRACK, threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_HIGH))),
        timeout=TIMEOUT)
    create(make_entity("t2", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=3.0)))
    stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="t2"), timeout=TIMEOUT)
    create(make_entity("a1", entity_pb2.ENTITY_TYPE_ASSET, task_catalog=entity_pb2.TaskCatalogComponent(
        available_tasks=["survey"])))
    odd = make_entity("g1", entity_pb2.ENTITY_TYPE_GEO)
    odd.components["custom"].type_url = "type.googleapis.com/not.known.Type"
    odd.components["custom"].value = b"\x08\x01"
    create(odd)


# ---- help ---------------------------------------------------------------------------------

def test_help_of_the_data_commands() -> None:
    results = run_all(["--help"], ["backup", "--help"], ["export", "--help"], ["import", "--help"])
    top, backup, export, imp = (ok(r).stdout for r in results)
    assert all(c in top for c in ("backup", "export", "import"))
    assert "Copy a data dir's database to FILE" in backup and "NEWDIR/meshstore.db" in backup
    assert "new incarnation" in backup
    assert "Export every entity of a data dir" in export and "--format" in export and "--out" in export
    assert "Merge an export into a data dir" in imp and "nothing is written" in imp


# ---- backup -------------------------------------------------------------------------------

def test_backup_of_a_running_node_restores_with_a_new_incarnation(tmp_path: pathlib.Path) -> None:
    data, copy, stopped_copy = tmp_path / "node", tmp_path / "copy.db", tmp_path / "stopped.db"
    server = node_on(tmp_path, data)
    try:
        populate(server.stub)
        backup, human = run_all(["backup", str(data), str(copy), "--json"],
                                ["backup", str(data), str(tmp_path / "human.db")])
        again = run("backup", str(data), str(copy))
        running = read_data_dir(str(data))[0]
        committed = int(server.stats()["committed_seq"])
    finally:
        assert server.stop() == 0
    summary = json.loads(ok(backup).stdout)
    assert_one_line_error(again, 1, "copy.db exists; not overwriting it")
    # Every write was acknowledged once committed (durability commit): the copy holds them all.
    assert summary["entities"] == 4 and summary["alive"] == 3 and summary["node_id"] == NODE
    assert summary["seq"] == committed and summary["bytes"] == copy.stat().st_size
    text = ok(human).stdout
    assert "4 entities (3 alive)" in text and "restore: put" in text and "starts a new incarnation" in text

    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copyfile(copy, restored / DB)
    with Store(path=restored) as node:
        assert node.node_id == NODE and not node.storage.clean
        assert node.incarnation != running["incarnation"]  # as the help says
        assert [e.id for e in node.list()] == ["a1", "g1", "t1"]

    # Even a backup of a cleanly stopped node restores with a new incarnation: the
    # original may run on after the copy, and the two must never issue the same dots.
    stopped = json.loads(ok(run("backup", str(data), str(stopped_copy), "--json")).stdout)
    assert stopped["entities"] == 4
    restored_clean = tmp_path / "restored-clean"
    restored_clean.mkdir()
    shutil.copyfile(stopped_copy, restored_clean / DB)
    with Store(path=restored_clean) as node:
        assert not node.storage.clean and node.incarnation != read_data_dir(str(data))[0]["incarnation"]


# ---- export and import --------------------------------------------------------------------

def test_export_of_a_running_node_imports_into_identical_replica_states(tmp_path: pathlib.Path) -> None:
    data, out, fresh = tmp_path / "node", tmp_path / "export.jsonl", tmp_path / "fresh"
    server = node_on(tmp_path, data)
    try:
        populate(server.stub)
        to_file, to_stdout = run_all(["export", str(data), "--out", str(out)], ["export", str(data)])
        views = {e.id: entity_dict(e) for e in server.stub.ListEntities(store_pb2.ListEntitiesRequest(),
                                                                           timeout=TIMEOUT).entities}
        held = run("import", str(out), str(data))
        assert_one_line_error(held, 1, f"cannot import into {data}", "in use by another process", "stop the node")
        source = states_of(data)
        running_context = read_data_dir(str(data))[2]
    finally:
        assert server.stop() == 0
    assert ok(to_file).stdout == "" and "exported 4 entities (3 alive, 1 deleted)" in to_file.stderr
    lines = out.read_text().splitlines()
    assert ok(to_stdout).stdout.splitlines() == lines  # byte for byte: the export is reproducible
    header = json.loads(lines[0])
    assert header == {"meshstore_export": 1, "node_id": NODE, "seq": header["seq"], "entities": 4,
                      "context": [list(c) for c in running_context]}
    records = [json.loads(line) for line in lines[1:]]
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records) and records[-1]["seq"] <= header["seq"]
    by_id = {r["id"]: r for r in records}
    assert {i: r["alive"] for i, r in by_id.items()} == {"t1": True, "t2": False, "a1": True, "g1": True}
    for entity_id, record in by_id.items():
        assert base64.b64decode(record["state"]) == source[entity_id]
        if record["alive"]:  # the user view, exactly as `get --json` renders the node's answer
            assert record["entity"] == views[entity_id], entity_id
    assert by_id["g1"]["entity"]["components"]["custom"] == {"@type": "type.googleapis.com/not.known.Type",
                                                             "value": "CAE="}
    assert by_id["t2"]["entity"]["id"] == "t2" and "components" not in by_id["t2"]["entity"]

    first, second = (json.loads(ok(run("import", str(out), str(fresh), "--json")).stdout) for _ in range(2))
    assert first == {"file": str(out), "data_dir": str(fresh), "node_id": NODE, "states": 4, "merged": 4,
                     "unchanged": 0, "rejected": 0, "context_adopted": True}
    assert (second["merged"], second["unchanged"], second["rejected"]) == (0, 4, 0)
    assert states_of(fresh) == source  # byte for byte: siblings, dots, context, delete record
    meta, clean, context, _ = read_data_dir(str(fresh))
    assert clean and meta["node_id"] == NODE
    assert set(running_context) <= set(context)  # the header's summary was adopted
    human = ok(run("import", str(out), str(fresh)))
    assert "0 merged, 4 unchanged, 0 rejected; context adopted" in human.stdout


@pytest.fixture(scope="module")
def export_lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A valid export of three entities (one deleted), made from an in-process store."""
    base = tmp_path_factory.mktemp("export")
    with Store(path=base / "src", node_id="src") as store:
        for i in range(3):
            store.create(make_entity(f"e{i}", entity_pb2.ENTITY_TYPE_TRACK,
                                     position=entity_pb2.PositionComponent(lat=float(i))))
        store.delete("e1")
    result = ok(run("export", str(base / "src"), "-q"))
    assert result.stderr == ""
    return result.stdout.splitlines()


def _replace(lines: list[str], index: int, **fields: object) -> list[str]:
    record = json.loads(lines[index])
    record.update(fields)
    return [*lines[:index], json.dumps(record), *lines[index + 1:]]


def test_import_of_bad_input_writes_nothing_and_names_the_line(tmp_path: pathlib.Path,
                                                              export_lines: list[str]) -> None:
    lines = export_lines
    ids = [json.loads(line)["id"] for line in lines[1:]]  # in seq order: e0, e2, e1 (deleted last)
    assert len(lines) == 4 and sorted(ids) == ["e0", "e1", "e2"]
    cases = {
        "bad-json": ([*lines[:2], lines[2][:-7], lines[3]], "line 3: not valid JSON"),
        "bad-base64": (_replace(lines, 1, state="not*base64!"),
                       f"line 2: entity '{ids[0]}': \"state\" is not valid base64"),
        "not-an-entity": (_replace(lines, 3, state=base64.b64encode(b"\xff\xff\xff\xff").decode()),
                          f"line 4: entity '{ids[2]}': \"state\" is not an entity.v1.Entity"),
        "no-id": (_replace(lines, 2, state=base64.b64encode(b"\x10\x01").decode()),
                  f"line 3: entity '{ids[1]}': \"state\" is not an entity.v1.Entity with an id"),
        "plain-entity": (_replace(lines, 2, state=base64.b64encode(make_entity(
            ids[1], entity_pb2.ENTITY_TYPE_TRACK).SerializeToString()).decode()),
            f"line 3: entity '{ids[1]}': \"state\" is not a replica state (no causal context)"),
        "no-header": (lines[1:], "line 1: not a meshstore export header"),
        "truncated": (lines[:-1], "line 4: the header announces 3 entities, the file holds 2 (truncated?)"),
        "empty": ([], "line 1: empty file"),
    }
    existing = tmp_path / "existing"
    with Store(path=existing, node_id="keeper") as store:
        store.create(make_entity("kept", entity_pb2.ENTITY_TYPE_ASSET))
    before = snapshot(existing)
    commands = []
    for name, (content, _) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in content))
        commands += [["import", str(path), str(tmp_path / f"new-{name}")], ["import", str(path), str(existing)]]
    results = run_all(*commands)
    for i, (name, (_, message)) in enumerate(cases.items()):
        for result in results[2 * i:2 * i + 2]:
            line = assert_one_line_error(result, 2, message, "nothing was imported")
            assert f"{name}.jsonl" in line and result.stdout == "", (name, result.stdout)
        assert not (tmp_path / f"new-{name}").exists(), name
    assert snapshot(existing) == before


def test_data_commands_on_a_missing_or_bad_dir(tmp_path: pathlib.Path, export_lines: list[str]) -> None:
    garbage = tmp_path / "garbage"
    REFUSED["garbage"][0](garbage)
    export = tmp_path / "good.jsonl"
    export.write_text("\n".join(export_lines) + "\n")
    results = run_all(
        ["backup", str(tmp_path / "nowhere"), str(tmp_path / "b.db")],
        ["export", str(tmp_path / "nowhere")],
        ["export", str(garbage)],
        ["backup", str(garbage), str(tmp_path / "g.db")],
        ["import", str(export), str(garbage)],
        ["import", str(tmp_path / "missing.jsonl"), str(tmp_path / "dest")],
        ["export", str(garbage), "--format", "csv"],
    )
    assert_one_line_error(results[0], 1, "nowhere is not a meshstore data dir (no meshstore.db)")
    assert_one_line_error(results[1], 1, "nowhere is not a meshstore data dir")
    assert_one_line_error(results[2], 1, "meshstore.db is not an SQLite database (corrupt or foreign file)")
    assert_one_line_error(results[3], 1, "meshstore.db is not an SQLite database")
    assert_one_line_error(results[4], 1, f"cannot import into {garbage}", "not an SQLite database")
    assert_one_line_error(results[5], 1, "cannot read", "missing.jsonl", "No such file")
    assert_one_line_error(results[6], 2, "'csv' is not 'jsonl'")
    assert not (tmp_path / "b.db").exists() and not (tmp_path / "g.db").exists() and not (tmp_path / "dest").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage", "good.jsonl"]  # no staging dir left behind


# ---- serve --data-dir ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["garbage", "other-sqlite", "newer-format"])
def test_serve_refuses_a_bad_data_dir_in_one_line(tmp_path: pathlib.Path, case: str) -> None:
    make, message = REFUSED[case]
    d = tmp_path / case
    make(d)
    before = snapshot(d)
    result = subprocess.run([*CLI, "serve", "--port", "0", "--data-dir", str(d)], capture_output=True, text=True,
                            timeout=TIMEOUT, env=cli_env())
    line = assert_one_line_error(result, 1, f"{d}/meshstore.db")
    assert re.search(message, line), line
    assert_untouched(d, before)


def test_bad_durability_from_the_environment_is_exit_2() -> None:
    result = run("serve", "--port", "0", env=cli_env(MESHSTORE_DURABILITY="bogus"))
    assert_one_line_error(result, 2, "MESHSTORE_DURABILITY", "'bogus' is not one of 'commit', 'interval', 'memory'")


def _list(addr: str) -> list[dict]:
    return json.loads(ok(run("list", "--json", addr=addr)).stdout)["entities"]


def test_serve_restarted_on_its_dir_lists_the_same_entities(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "node"
    first = node_on(tmp_path, data)
    try:
        populate(first.stub)
        before = _list(first.addr)
        stats = ok(run("stats", addr=first.addr)).stdout
    finally:
        assert first.stop() == 0  # SIGTERM: a graceful stop, the data dir closed cleanly
    assert [e["id"] for e in before] == ["a1", "g1", "t1"]
    assert "storage" in stats and "commit (a write is acknowledged once on disk)" in stats
    assert "on disk" in stats and "commit time" in stats and "pending changes" in stats

    second = node_on(tmp_path, data)
    try:
        assert _list(second.addr) == before  # same entities, components, versions and dots
        assert_one_line_error(run("get", "t2", addr=second.addr), 3, "'t2' not found")
    finally:
        assert second.stop() == 0
    assert "new incarnation" not in second.text()  # a clean stop: the node resumed its incarnation
