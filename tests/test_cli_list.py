"""``meshstore list`` columns, ``meshstore pending``, and ``meshstore serve --http-port``:
real subprocesses against a real ``meshstore serve`` (helpers from test_cli)."""

from __future__ import annotations

import json
import pathlib
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from google.protobuf import timestamp_pb2

from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2
from test_cli import TIMEOUT, Served, assert_one_line_error, cli_env, run

pytestmark = pytest.mark.timeout(90)

LONG_ID = "fused-0123456789abcdef"


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("serve-list"), "--in-memory")
    now = time.time()

    def pending(requested: float, timeout: int) -> entity_pb2.ApprovalComponent:
        return entity_pb2.ApprovalComponent(state=entity_pb2.APPROVAL_STATE_PENDING, timeout_seconds=timeout,
                                            requested_at=ts(requested))

    entities = [
        make_entity("t1", entity_pb2.ENTITY_TYPE_TRACK,
                    position=entity_pb2.PositionComponent(lat=51.123456, lon=-120.987654),
                    velocity=entity_pb2.VelocityComponent(speed=423.46, heading=90),
                    threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_MEDIUM),
                    task=entity_pb2.TaskComponent(state="investigate")),
        make_entity("t2", entity_pb2.ENTITY_TYPE_TRACK, threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_HIGH),
                    task=entity_pb2.TaskComponent(state="track"), approval=pending(now - 10, 60)),
        make_entity(LONG_ID, entity_pb2.ENTITY_TYPE_TRACK,
                    position=entity_pb2.PositionComponent(lat=-50.5, lon=0.25),
                    velocity=entity_pb2.VelocityComponent(speed=12.0),
                    threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_HIGH),
                    task=entity_pb2.TaskComponent(state="investigate"), approval=pending(now - 40, 600)),
        make_entity("t3", entity_pb2.ENTITY_TYPE_TRACK,
                    approval=entity_pb2.ApprovalComponent(state=entity_pb2.APPROVAL_STATE_TIMED_OUT)),
        make_entity("a1", entity_pb2.ENTITY_TYPE_ASSET),
    ]
    for e in entities:
        server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=e), timeout=TIMEOUT)
    yield server
    assert server.stop() == 0


def lines_of(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def row(text: str, entity_id: str) -> list[str]:
    line = next(line for line in lines_of(text) if line.split() and line.split()[0] == entity_id)
    return line.split()


def test_list_shows_position_speed_threat_task_and_approval(served: Served) -> None:
    result = run("list", addr=served.addr)
    assert result.returncode == 0, result.stderr
    header = next(line for line in lines_of(result.stdout) if line.startswith("ID"))
    assert header.split() == ["ID", "TYPE", "POSITION", "SPEED", "THREAT", "TASK", "APPROVAL"]
    assert row(result.stdout, "t1") == ["t1", "track", "51.1235,-120.9877", "423.5", "MEDIUM", "investigate", "-"]
    assert row(result.stdout, "t2") == ["t2", "track", "-", "-", "HIGH", "track", "PENDING"]
    assert row(result.stdout, "t3")[-1] == "TIMED_OUT"
    assert row(result.stdout, "a1") == ["a1", "asset", "-", "-", "-", "-", "-"]
    assert "5 entities" in result.stdout


def test_list_fits_80_columns(served: Served) -> None:
    result = run("list", env=cli_env(served.addr, COLUMNS="80"))
    assert result.returncode == 0, result.stderr
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    header = next(line for line in lines_of(result.stdout) if line.startswith("ID")).split()
    assert header[0] == "ID" and {"POSITION", "THREAT", "APPROVAL"} <= set(header), header
    assert "TYPE" not in header  # dropped first
    long_row = row(result.stdout, LONG_ID)  # ids are not cut
    assert "-50.5000,0.2500" in long_row and "HIGH" in long_row and "PENDING" in long_row
    assert "…" not in result.stdout

    narrow = run("list", env=cli_env(served.addr, COLUMNS="40"))
    assert narrow.returncode == 0 and all(len(line) <= 40 for line in narrow.stdout.splitlines()), narrow.stdout
    assert "THREAT" in narrow.stdout and "APPROVAL" in narrow.stdout


def test_list_wide_shows_every_column_whatever_the_width(served: Served) -> None:
    result = run("list", "--wide", env=cli_env(served.addr, COLUMNS="80"))
    assert result.returncode == 0, result.stderr
    header = next(line for line in lines_of(result.stdout) if line.startswith("ID")).split()
    assert header == ["ID", "TYPE", "POSITION", "SPEED", "THREAT", "TASK", "APPROVAL", "COMPONENTS", "UPDATED", "(UTC)",
                      "ORIGIN"]
    line = next(line for line in lines_of(result.stdout) if line.startswith("t1 "))
    assert "position, task, threat, velocity" in line and "cli-node" in line and "51.1235,-120.9877" in line


def test_list_json_is_unchanged(served: Served) -> None:
    listed = json.loads(run("list", "--json", "-t", "track", addr=served.addr).stdout)
    assert listed["count"] == 4
    t1 = next(e for e in listed["entities"] if e["id"] == "t1")
    assert t1["components"]["position"]["@type"] == "type.googleapis.com/entity.v1.PositionComponent"


def test_pending_lists_oldest_first_with_time_left(served: Served) -> None:
    result = run("pending", addr=served.addr)
    assert result.returncode == 0, result.stderr
    assert "2 pending approvals" in result.stdout
    ids = [line.split()[0] for line in lines_of(result.stdout) if line.split() and line.split()[0] in (LONG_ID, "t2")]
    assert ids == [LONG_ID, "t2"]  # requested 40 s ago, then 10 s ago
    assert re.search(r"\b9m\d\ds\b", " ".join(row(result.stdout, LONG_ID)))  # ~560 s left
    t2 = row(result.stdout, "t2")
    assert re.fullmatch(r"\d+s", t2[3]) and 40 <= int(t2[3][:-1]) <= 50 and t2[4:] == ["HIGH", "track"]
    assert "meshstore approve ID" in result.stdout

    as_json = json.loads(run("pending", "--json", addr=served.addr).stdout)
    assert as_json["count"] == 2 and [p["id"] for p in as_json["pending"]] == [LONG_ID, "t2"]
    first = as_json["pending"][0]
    assert set(first) == {"id", "requested_at", "deadline", "time_left_s", "threat", "task"}
    assert 540 <= first["time_left_s"] <= 560 and first["threat"] == "HIGH" and first["task"] == "investigate"

    narrow = run("pending", env=cli_env(served.addr, COLUMNS="80"))
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines()), narrow.stdout


def test_pending_with_nothing_waiting_and_errors(tmp_path: pathlib.Path) -> None:
    server = Served(tmp_path, "--in-memory")
    try:
        empty = run("pending", addr=server.addr)
        assert empty.returncode == 0 and "0 pending approvals" in empty.stdout
        assert json.loads(run("pending", "--json", addr=server.addr).stdout) == {"count": 0, "pending": []}
    finally:
        assert server.stop() == 0
    assert_one_line_error(run("pending", addr=server.addr), 1, f"cannot reach the store at {server.addr}")


# ---- serve --http-port ---------------------------------------------------------------------------


def http_address(server: Served) -> str:
    match = re.search(r"msg=listening address=\S+ node_id=\S+ http=(\S+)", server.text())
    assert match, server.text()
    return match.group(1)


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_serve_with_http_port_serves_the_ui_and_the_api(tmp_path: pathlib.Path) -> None:
    server = Served(tmp_path, "--in-memory", "--http-port", "0")
    try:
        address = http_address(server)
        assert address.startswith("127.0.0.1:") and address != server.addr
        status, page = fetch(f"http://{address}/")
        assert status == 200 and "<html" in page.lower()
        server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=make_entity("t1", entity_pb2.ENTITY_TYPE_TRACK)),
                                 timeout=TIMEOUT)
        status, body = fetch(f"http://{address}/api/entities")
        assert status == 200 and [e["id"] for e in json.loads(body)["entities"]] == ["t1"]
        status, body = fetch(f"http://{address}/api/mesh")
        assert status == 200 and json.loads(body)["node_id"] == "cli-node"
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.text()


def test_serve_takes_the_http_port_from_the_environment_and_is_off_by_default(tmp_path: pathlib.Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Served(tmp_path, "--in-memory", MESHSTORE_HTTP_PORT=str(port), MESHSTORE_HTTP_HOST="127.0.0.1")
    try:
        assert http_address(server) == f"127.0.0.1:{port}"
        assert fetch(f"http://127.0.0.1:{port}/api/pending") == (200, '{"pending":[]}')
    finally:
        assert server.stop() == 0
    off = Served(tmp_path, "--in-memory")
    try:
        assert "http=none" in off.text()
    finally:
        assert off.stop() == 0


def test_serve_on_a_taken_http_port_is_one_line_exit_1(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", "0", "--in-memory", "--http-port", str(port), env=cli_env())
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port} (http)")
    bad = run("serve", "--port", "0", "--http-port", "70000", env=cli_env())
    assert_one_line_error(bad, 2, "--http-port")


def test_help_names_the_new_options() -> None:
    serve = run("serve", "--help", env=cli_env())
    assert serve.returncode == 0 and "--http-port" in serve.stdout and "MESHSTORE_HTTP_PORT" in serve.stdout
    assert "--http-host" in serve.stdout
    listing = run("list", "--help", env=cli_env())
    assert "--wide" in listing.stdout
    pending = run("pending", "--help", env=cli_env())
    assert pending.returncode == 0 and "oldest request first" in pending.stdout
    top = run("--help", env=cli_env())
    assert "pending" in top.stdout
