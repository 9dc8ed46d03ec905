"""``meshstore`` in a shell: --version, completion, put and delete, pipes closed early,
output that is not a terminal, a mistyped command. Real subprocesses against a real
``meshstore serve`` (helpers from test_cli)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

import meshstore
from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2
from test_cli import CLI, CONSOLE_SCRIPT, TIMEOUT, Served, assert_one_line_error, cli_env, free_port, run

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("serve-shell"), "--in-memory", "--peer", f"127.0.0.1:{free_port()}")
    for i in range(3):
        entity = make_entity(f"s{i}", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=i, lon=i))
        server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=entity), timeout=TIMEOUT)
    yield server
    assert server.stop() == 0


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout == f"meshstore {meshstore.__version__}\n", result


def test_shell_completion_of_commands_and_options() -> None:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("meshstore console script not installed next to this interpreter")

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = cli_env(_MESHSTORE_COMPLETE="complete_bash", COMP_WORDS=line, COMP_CWORD=str(len(words) - 1))
        result = subprocess.run([str(CONSOLE_SCRIPT)], capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("meshstore wa") == ["watch"]
    assert sorted(complete("meshstore de")) == ["delete", "demo", "deny"]
    assert "--existing" in complete("meshstore watch --ex")
    script = run("--show-completion", "bash")
    assert script.returncode == 0 and "_MESHSTORE_COMPLETE=complete_bash" in script.stdout


def test_a_mistyped_command_suggests_once() -> None:
    line = assert_one_line_error(run("wach"), 2, "No such command 'wach'")
    assert line.count("Did you mean") == 1 and "'watch'" in line


def test_put_what_get_prints_then_delete(served: Served, tmp_path: pathlib.Path) -> None:
    entity = json.loads(run("get", "s1", "--json", addr=served.addr).stdout)
    entity["id"] = "copied"
    entity.pop("versions")
    entity["components"]["position"]["lat"] = 42.5
    source = tmp_path / "copied.json"
    source.write_text(json.dumps(entity))
    result = run("put", str(source), addr=served.addr)
    assert result.returncode == 0 and result.stdout.strip() == "put copied: applied", result
    stored = json.loads(run("get", "copied", "--json", addr=served.addr).stdout)
    assert stored["components"]["position"]["lat"] == 42.5 and stored["type"] == "ENTITY_TYPE_TRACK"

    # Edited from what get printed (its versions) and read from stdin: applied over it.
    stored["components"]["position"]["lat"] = 43.5
    again = subprocess.run([*CLI, "put", "--json"], input=json.dumps(stored), capture_output=True, text=True,
                           timeout=TIMEOUT, env=cli_env(served.addr))
    assert again.returncode == 0 and json.loads(again.stdout) == {"id": "copied", "outcome": "applied"}, again
    # The same versions again: the store has moved past them, so the key is stale.
    stale = subprocess.run([*CLI, "put"], input=json.dumps(stored), capture_output=True, text=True,
                           timeout=TIMEOUT, env=cli_env(served.addr))
    assert_one_line_error(stale, 1, "put copied: every key is stale")

    deleted = run("delete", "copied", addr=served.addr)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted copied", deleted
    assert_one_line_error(run("get", "copied", addr=served.addr), 3)
    assert_one_line_error(run("delete", "copied", addr=served.addr), 3, "copied")


def test_put_of_bad_input_is_one_line_exit_2_and_writes_nothing(served: Served, tmp_path: pathlib.Path) -> None:
    before = served.stats()["writes"]
    cases = {
        "not json": ("{", "is not an entity in JSON"),
        "not an entity": ('{"id": "x", "colour": "red"}', "is not an entity in JSON"),
        "no id": ('{"type": "ENTITY_TYPE_TRACK"}', 'the entity has no "id"'),
        "unknown component type": ('{"id": "x", "components": {"c": {"@type": "type.googleapis.com/no.Such"}}}',
                                   "is not an entity in JSON"),
    }
    for name, (text, fragment) in cases.items():
        source = tmp_path / "bad.json"
        source.write_text(text)
        assert_one_line_error(run("put", str(source), addr=served.addr), 2, fragment)
    assert_one_line_error(run("put", str(tmp_path / "missing.json"), addr=served.addr), 2, "cannot read")
    assert served.stats()["writes"] == before


def test_stats_piped_shows_the_whole_peer_table(served: Served) -> None:
    env = cli_env(served.addr)
    env.pop("COLUMNS")  # as in a plain `meshstore stats | less`: rich would assume 80 columns
    result = subprocess.run([*CLI, "stats"], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "PEER" in line)
    columns = ["PEER", "CONNECTED", "SENT_STATES", "SENT_BYTES", "ACKED_SEQ", "LAG", "PENDING", "COALESCED",
               "DEFERRED", "RETRIES", "FULL_SYNCS"]
    assert re.findall(r"[A-Z_]+", header) == columns, header
    peer_rows = [line for line in result.stdout.splitlines() if line.startswith("│ 127.0.0.1:")]
    assert len(peer_rows) == 1 and len(re.findall(r"\d[\d,]*", peer_rows[0].split("│", 2)[2])) == len(columns) - 1


def test_watch_json_into_head_exits_0(served: Served) -> None:
    # `meshstore watch --json --existing | head -1`: head exits after one line; the next
    # event watch writes finds the pipe closed. Writes keep coming until watch has seen it.
    pipeline = subprocess.Popen(["bash", "-o", "pipefail", "-c", f"{' '.join(CLI)} watch --json --existing | head -1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(served.addr))
    for i in range(200):
        if pipeline.poll() is not None:
            break
        entity = make_entity(f"w{i}", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=i, lon=i))
        served.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=entity), timeout=TIMEOUT)
        time.sleep(0.05)
    out, err = pipeline.communicate(timeout=TIMEOUT)
    assert pipeline.returncode == 0, (pipeline.returncode, err)
    assert json.loads(out)["type"] == "CREATED" and err == ""
