"""One configuration for every command (meshstore.cli.config): a setting comes from its
flag, else its MESHSTORE_ environment variable, else the ``--config`` TOML file, else its
default; the old unprefixed variables still work with a warning; a bad file is one clear
line and exit 2; ``meshstore config show`` tells each value's source.

Real CLI subprocesses (``python -m meshstore.cli``), and real ``meshstore serve`` nodes on
127.0.0.1 where the point is that a running command uses the value.
"""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import tomllib

import click
import pytest
import typer

from meshstore.cli import app
from meshstore.cli.config import DEPRECATED_ENV, settings
from test_cli import CLI, TIMEOUT, Served, assert_one_line_error, cli_env, run, wait_for

pytestmark = pytest.mark.timeout(90)

# The long-running commands: every option of theirs is a setting.
CONFIGURED = ["serve", "sensor-sim", "radar-sim", "classifier", "task-manager", "fusion", "demo"]


def env(**extra: str) -> dict[str, str]:
    """cli_env without the deprecated names either (a developer's shell may set them)."""
    return {k: v for k, v in cli_env(**extra).items() if k not in DEPRECATED_ENV or k in extra}


def write(tmp_path: pathlib.Path, text: str, name: str = "meshstore.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def show(*args: str, environ: dict[str, str] | None = None) -> tuple[dict[str, tuple[str, str]], str]:
    """``meshstore [args]`` ending in ``config show COMMAND ...``: {key: (value, source)} and stderr."""
    result = run(*args, env=environ if environ is not None else env())
    assert result.returncode == 0 and "Traceback" not in result.stderr, (result.stdout, result.stderr)
    rows = {}
    for line in result.stdout.splitlines():
        if m := re.fullmatch(r"([a-z-]+) = (.+?)\s+# (.+)", line):
            rows[m.group(1)] = (m.group(2), m.group(3))
        elif m := re.fullmatch(r"# ([a-z-]+) is not set\s+# (.+)", line):
            rows[m.group(1)] = ("", m.group(2))
    return rows, result.stderr


def commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


# ---- the settings ------------------------------------------------------------------------------

def test_every_option_of_the_long_running_commands_has_one_meshstore_variable() -> None:
    found = commands()
    by_env: dict[str, set[tuple[str, ...]]] = {}
    for name, command in found.items():
        for option in (p for p in command.params if isinstance(p, click.Option) and p.name != "help"):
            if name in CONFIGURED:
                assert isinstance(option.envvar, str) and option.show_envvar, (name, option.opts)
            if option.envvar:
                assert isinstance(option.envvar, str) and option.envvar.startswith("MESHSTORE_"), (name, option.opts)
                by_env.setdefault(option.envvar, set()).add(tuple(option.opts))
    # A variable shared by commands is the same flag (--store, --log-level...), never two
    # meanings (demo's --port is MESHSTORE_DEMO_PORT, not serve's MESHSTORE_PORT).
    assert {name: opts for name, opts in by_env.items() if len(opts) > 1} == {}
    # The deprecated names are gone from the options, and each new name is one of them.
    assert not set(DEPRECATED_ENV) & set(by_env)
    assert set(DEPRECATED_ENV.values()) <= set(by_env)
    assert all(settings(found[name]) for name in CONFIGURED)


def test_help_tells_of_the_config_file() -> None:
    top = run("--help", env=env())
    assert top.returncode == 0 and "--config" in top.stdout and "MESHSTORE_CONFIG" in top.stdout
    result = run("config", "show", "--help", env=env())
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for needle in ("flag > environment variable", "> the config file", "> default", "[serve]", "SIM_RATE"):
        assert needle in text, needle


# ---- precedence: flag > env > file > default ----------------------------------------------------

@pytest.mark.parametrize(("command", "key", "flag", "variable", "default"), [
    ("serve", "port", "--port", "MESHSTORE_PORT", "50051"),
    ("task-manager", "approval-timeout", "--approval-timeout", "MESHSTORE_APPROVAL_TIMEOUT", "30.0"),
    ("sensor-sim", "rate", "--rate", "MESHSTORE_SIM_RATE", "1.0"),
    ("demo", "tracks", "-n", "MESHSTORE_DEMO_TRACKS", "12"),
])
def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: pathlib.Path, command: str, key: str,
                                                            flag: str, variable: str, default: str) -> None:
    config = write(tmp_path, f"[{command}]\n{key} = 3\n")
    assert show("config", "show", command)[0][key] == (default, "default")
    rows, _ = show("--config", config, "config", "show", command)
    assert rows[key][0] in ("3", "3.0") and rows[key][1] == f"file {config} [{command}]"
    rows, _ = show("--config", config, "config", "show", command, environ=env(**{variable: "4"}))
    assert rows[key][0] in ("4", "4.0") and rows[key][1] == f"env {variable}"
    rows, _ = show("--config", config, "config", "show", command, flag, "5", environ=env(**{variable: "4"}))
    assert rows[key][0] in ("5", "5.0") and rows[key][1] == "flag"


def start_serve(tmp_path: pathlib.Path, *args: str, environ: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``meshstore ARGS`` (ending in serve ...) until it logs where it listens: (process, that line)."""
    log_path = tmp_path / f"serve-{len(list(tmp_path.iterdir()))}.log"
    log = log_path.open("w")
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=log, env=environ, text=True)
    try:
        found = wait_for(lambda: re.search(r".*msg=listening .*", log_path.read_text()) or proc.poll() is not None,
                         what="serve listening")
        assert found is not True, f"serve exited: {log_path.read_text()}"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        log.close()
    return proc, found.group(0)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0


def test_serve_runs_with_the_file_and_env_and_flags_override_it(tmp_path: pathlib.Path) -> None:
    config = write(tmp_path, 'port = 0\n[serve]\nin-memory = true\nnode-id = "from-file"\n')
    for args, extra, node_id in [
        ([], {}, "from-file"),
        ([], {"MESHSTORE_NODE_ID": "from-env"}, "from-env"),
        (["--node-id", "from-flag"], {"MESHSTORE_NODE_ID": "from-env"}, "from-flag"),
    ]:
        proc, line = start_serve(tmp_path, "--config", config, "serve", *args, environ=env(**extra))
        try:
            # port 0 and in-memory came from the file too: any free port, nothing on disk.
            assert f"node_id={node_id} " in line + " " and "address=127.0.0.1:50051 " not in line, line
        finally:
            stop(proc)


def test_a_client_command_dials_the_store_of_the_file_unless_env_or_flag_say_otherwise(
        tmp_path: pathlib.Path) -> None:
    server = Served(tmp_path, "--in-memory")
    try:
        config = write(tmp_path, f'store = "{server.addr}"\n[list]\ndeadline = 2\n')
        result = run("--config", config, "list", "--json", env=env())
        assert result.returncode == 0 and '"entities"' in result.stdout, result.stderr
        result = run("--config", config, "list", "--json", env=env(MESHSTORE_ADDR="127.0.0.1:1"))
        assert_one_line_error(result, 1, "127.0.0.1:1")
        result = run("--config", config, "list", "--json", "--store", server.addr, env=env(MESHSTORE_ADDR="127.0.0.1:1"))
        assert result.returncode == 0, result.stderr
        # MESHSTORE_CONFIG names the file as --config does.
        result = run("list", "--json", env=env(MESHSTORE_CONFIG=config))
        assert result.returncode == 0, result.stderr
    finally:
        server.stop()


# ---- deprecated names ---------------------------------------------------------------------------

def test_an_old_variable_configures_serve_with_a_warning_naming_the_new_one(tmp_path: pathlib.Path) -> None:
    proc, _ = start_serve(tmp_path, "serve", "--port", "0", "--in-memory", "--peer", "127.0.0.1:1",
                          environ=env(MESH_BANDWIDTH_BPS="4096"))
    try:
        log = next(tmp_path.glob("serve-*.log"))
        started = wait_for(lambda: re.search(r"msg=\"relay started\".*", log.read_text()), what="relay started")
        assert "bandwidth_bps=4096" in started.group(0), started.group(0)
    finally:
        stop(proc)
    text = log.read_text()
    assert ("warning: the environment variable MESH_BANDWIDTH_BPS is deprecated: use "
            "MESHSTORE_MESH_BANDWIDTH_BPS") in text


def test_old_variables_show_as_such_and_the_new_name_wins() -> None:
    rows, stderr = show("config", "show", "sensor-sim", environ=env(SIM_RATE="3", BBOX_MAX_LAT="52"))
    assert rows["rate"] == ("3.0", "env SIM_RATE (deprecated: MESHSTORE_SIM_RATE)")
    assert rows["bbox-max-lat"] == ("52.0", "env BBOX_MAX_LAT (deprecated: MESHSTORE_BBOX_MAX_LAT)")
    assert "SIM_RATE is deprecated: use MESHSTORE_SIM_RATE" in stderr and "BBOX_MAX_LAT is deprecated" in stderr
    rows, stderr = show("config", "show", "sensor-sim", environ=env(SIM_RATE="3", MESHSTORE_SIM_RATE="7"))
    assert rows["rate"] == ("7.0", "env MESHSTORE_SIM_RATE")
    assert "SIM_RATE is deprecated and ignored: MESHSTORE_SIM_RATE is set" in stderr
    # A command that has no such setting says nothing about it.
    _, stderr = show("config", "show", "classifier", environ=env(SIM_RATE="3"))
    assert "SIM_RATE" not in stderr


# ---- bad files ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "fragments"), [
    ("[serve]\nport = \n", ["not valid TOML", "line 2"]),
    ("[serv]\nport = 1\n", ["[serv] is not a command with settings"]),
    ("[serve]\nprot = 1\n", ["[serve] 'prot' is not a setting of `meshstore serve`", "port"]),
    ("colour = 1\n", ["'colour' (top level) is not a setting of any command"]),
    ('[serve]\nport = "fast"\n', ["[serve] 'port': expected an integer, got a string \"fast\""]),
    ("[serve]\nin-memory = 1\n", ["[serve] 'in-memory': expected true or false"]),
    ('[serve]\npeer = "a:1"\n', ["[serve] 'peer': expected an array"]),
    ("[serve]\nport = 70000\n", ["[serve] 'port'", "65535"]),
    ('[serve]\ndurability = "sometimes"\n', ["[serve] 'durability'", "'sometimes' is not one of"]),
    ('store = 5\n', ["'store' (top level): expected a string"]),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: pathlib.Path, text: str, fragments: list[str]) -> None:
    config = write(tmp_path, text)
    result = run("--config", config, "config", "show", "serve", env=env())
    assert_one_line_error(result, 2, f"config file {config}: ", *fragments)
    assert result.stdout == ""


def test_a_missing_file_is_one_line_and_exit_2(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nowhere.toml")
    assert_one_line_error(run("--config", missing, "serve", env=env()), 2, missing, "no such file")
    assert_one_line_error(run("list", env=env(MESHSTORE_CONFIG=missing)), 2, missing, "MESHSTORE_CONFIG")
    assert_one_line_error(run("--config", str(tmp_path), "list", env=env()), 2, str(tmp_path), "directory")


# ---- config show --------------------------------------------------------------------------------

def test_config_show_tells_every_source_and_prints_a_config_file(tmp_path: pathlib.Path) -> None:
    config = write(tmp_path, 'store = "10.0.0.5:1"\nlog-level = "debug"\n'
                             '[serve]\npeer = ["10.0.0.6:50051"]\nlog-level = "warning"\n')
    rows, _ = show("--config", config, "config", "show", "serve", "--host", "0.0.0.0",
                   environ=env(MESHSTORE_GRACE="2"))
    assert rows["host"] == ('"0.0.0.0"', "flag")
    assert rows["grace"] == ("2.0", "env MESHSTORE_GRACE")
    assert rows["peer"] == ('["10.0.0.6:50051"]', f"file {config} [serve]")
    assert rows["log-level"] == ('"warning"', f"file {config} [serve]")  # the table beats the top level
    assert rows["durability"] == ('"commit"', "default")
    assert rows["node-id"] == ("", "default")  # not set
    rows, _ = show("--config", config, "config", "show", "classifier")
    assert rows["store"] == ('"10.0.0.5:1"', f"file {config} top level")
    assert rows["log-level"] == ('"debug"', f"file {config} top level")

    # The whole output (every command) is a config file giving the same values.
    everything = run("--config", config, "config", "show", env=env(MESHSTORE_GRACE="2"))
    assert everything.returncode == 0, everything.stderr
    document = tomllib.loads(everything.stdout)
    assert set(CONFIGURED) <= set(document) and document["serve"]["grace"] == 2.0
    again = write(tmp_path, everything.stdout, "shown.toml")
    rows, _ = show("--config", again, "config", "show", "serve")
    assert rows["grace"] == ("2.0", f"file {again} [serve]") and rows["peer"][0] == '["10.0.0.6:50051"]'


def test_config_show_refuses_what_is_not_a_setting() -> None:
    assert_one_line_error(run("config", "show", "serve", "--json", env=env()), 2, "--json is not a setting")
    assert_one_line_error(run("config", "show", "frobnicate", env=env()), 2, "no command 'frobnicate'")
    assert_one_line_error(run("config", "show", "--port", "1", env=env()), 2, "flags go after a COMMAND")
    assert_one_line_error(run("config", "show", "serve", "--port", "x", env=env()), 2, "--port")
