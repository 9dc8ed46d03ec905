"""``meshstore demo`` and the service commands, run as users run them: subprocesses.

"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from helpers import Lines

pytestmark = pytest.mark.timeout(90)

SUMMARY = re.compile(r"summary: tracks=(?P<tracks>\d+) classified=(?P<classified>\d+) pending=(?P<pending>\d+) "
                     r"approved=(?P<approved>\d+) denied=(?P<denied>\d+) timed_out=(?P<timed_out>\d+) "
                     r"fused=(?P<fused>\d+) events=(?P<events>\d+)")


def command(name: str) -> list[str]:
    return [sys.executable, "-m", "meshstore.cli", name]


def env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}


def summary_of(output: str) -> dict[str, int]:
    match = SUMMARY.search(" ".join(output.split()))
    assert match, f"no summary line in: {output[-2000:]}"
    return {k: int(v) for k, v in match.groupdict().items()}


def test_demo_runs_for_a_duration_and_prints_a_summary() -> None:
    done = subprocess.run([*command("demo"), "--duration", "5", "--no-live", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert re.search(r"store listening at 127\.0\.0\.1:\d+", done.stdout)
    s = summary_of(done.stdout)
    assert s["tracks"] == 24  # 12 targets, each an EO track and a radar plot
    assert s["classified"] == 12  # the EO tracks
    assert s["fused"] >= 10
    assert s["pending"] >= 1 and s["events"] > 100
    assert "approvals pending" in done.stdout and "fused tracks" in done.stdout


def test_demo_on_a_three_node_mesh_converges_every_view() -> None:
    done = subprocess.run([*command("demo"), "--nodes", "3", "--duration", "5", "--no-live", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert re.search(r"and 2 more nodes \(127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+\)", done.stdout)
    s = summary_of(done.stdout)
    assert s["tracks"] == 24 and s["classified"] == 12 and s["fused"] >= 10  # written on different nodes
    rows = re.findall(r"demo-(\d)[\s│]+(\d+)[\s│]+(\d+)[\s│]+(\d+)[\s│]+(\d+)[\s│]+\d+[\s│]+2/2[\s│]+\d+",
                      done.stdout)
    assert sorted(r[0] for r in rows) == ["1", "2", "3"], done.stdout[-3000:]
    assert len({r[1:] for r in rows}) == 1  # every node holds the same picture
    assert "mesh of 3 nodes: views agree" in done.stdout and "nodes converged: yes" in done.stdout


def test_demo_stops_cleanly_on_sigint() -> None:
    proc = subprocess.Popen([*command("demo"), "--no-live", "--port", "0", "--rate", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        out = Lines(proc.stdout)
        out.wait_for(r"store listening at")
        out.wait_for(r"classified=[1-9]")  # a status line: the pipeline is running
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = out.rest(1.0)
    assert code == 0, stdout + stderr
    assert "SIGINT received" in stdout
    assert summary_of(stdout)["tracks"] == 24
    assert "Traceback" not in stdout + stderr


def test_demo_falls_back_to_a_free_port_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*command("demo"), "--duration", "1", "--no-live", "--port", str(port)],
                              capture_output=True, text=True, timeout=60, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert f"port {port} is not available" in text and "ephemeral port" in text
    listening = re.search(r"store listening at 127\.0\.0\.1:(\d+)", text)
    assert listening and int(listening.group(1)) != port


def test_demo_serves_the_web_ui_and_prints_its_address() -> None:
    import json
    import urllib.request

    with socket.socket() as taken:  # the asked-for UI port is taken: any free one, said so
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ui_port = taken.getsockname()[1]
        proc = subprocess.Popen([*command("demo"), "--no-live", "--port", "0", "--http-port", str(ui_port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        try:
            out = Lines(proc.stdout)
            line = out.wait_for(r"web UI at http://127\.0\.0\.1:\d+/").string
            url = re.search(r"(http://127\.0\.0\.1:(\d+)/)", line)
            assert int(url.group(2)) != ui_port and "meshstore approve ID --store 127.0.0.1:" in line
            out.wait_for(r"classified=[1-9]")
            with urllib.request.urlopen(url.group(1) + "api/entities?type=track", timeout=10) as response:
                tracks = json.loads(response.read())["entities"]
            assert len(tracks) >= 12 and any(t["threat"] for t in tracks)
            with urllib.request.urlopen(url.group(1), timeout=10) as response:
                assert response.status == 200
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = "".join(out.lines) + out.rest(1.0)
    assert f"web UI port {ui_port} is not available" in " ".join(text.split())
    assert "Traceback" not in text + proc.stderr.read()


def test_a_service_command_waits_for_its_store_and_stops_on_sigterm() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*command("classifier"), "--store", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        err = Lines(proc.stderr)
        err.wait_for(r"store unavailable; retrying with backoff")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.rest(1.0)
    assert code == 0, stderr
    assert "signal received: stopping" in stderr and "msg=stopped" in stderr
    assert "Traceback" not in stderr
