"""The configuration of the ``meshstore`` commands: settings, the TOML file, the
environment, and ``meshstore config show``.

A *setting* is an option that has an environment variable: every option of ``serve``,
the services and ``demo``, and ``--store`` / ``--deadline`` of the client commands (what a
client command is asked, ``--json``, ``--since``..., stays a flag). Each setting comes from,
first found:

1. its flag (``meshstore serve --port 6000``);
2. its environment variable, ``MESHSTORE_<NAME>``, shown in ``--help``;
3. the TOML file of ``meshstore --config FILE`` (or ``MESHSTORE_CONFIG``);
4. its default.

That is click's own order (command line, envvar, the context's ``default_map``, default):
the file is loaded into the ``default_map`` by the app's callback (``apply``), so every
option with an environment variable is also a file key, with no code of its own.

The file has a table per command; its keys are the long flag names without ``--``. Keys
outside any table apply to every command that has that setting; a command's table wins::

    store = "10.0.0.5:50051"        # every client command and service
    log-level = "info"

    [serve]
    port = 50051
    peer = ["10.0.0.6:50051", "10.0.0.7:50051"]

    [task-manager]
    approval-timeout = 60

An unreadable or invalid file, an unknown table or key, or a value of the wrong type or
out of range is a usage error (exit 2) naming the file, the table and the key.

The environment variables that had no ``MESHSTORE_`` prefix (``DEPRECATED_ENV``) still
work until the next release: each one set is copied to its new name (unless that is set
too) with a warning on stderr naming the new name.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tomllib
from collections.abc import Iterable, MutableMapping
from typing import Annotated, Any

import click
import typer

from meshstore.cli.common import EXIT_USAGE, CliError

__all__ = ["CONFIG_ENV", "DEPRECATED_ENV", "ConfigOpt", "adopt_deprecated_env", "apply", "load", "register",
           "settings"]

CONFIG_ENV = "MESHSTORE_CONFIG"

# Old name -> new name: each is the old name under the MESHSTORE_ prefix.
DEPRECATED_ENV = {old: f"MESHSTORE_{old}" for old in (
    "SCENARIO_COUNT", "SCENARIO_SEED", "SIM_RATE", "SPEED_MIN_KTS", "SPEED_MAX_KTS",
    "BBOX_MIN_LAT", "BBOX_MAX_LAT", "BBOX_MIN_LON", "BBOX_MAX_LON", "SIM_EDGE", "SIM_TTL",
    "EO_SENSOR_ID", "RADAR_NOISE_M", "RADAR_SENSOR_ID",
    "CLASSIFIER_LOW_KTS", "CLASSIFIER_MEDIUM_KTS", "CLASSIFIER_HIGH_KTS", "CLASSIFIER_MIN_INTERVAL",
    "APPROVAL_TIMEOUT",
    "FUSION_MAX_DISTANCE_M", "FUSION_HYSTERESIS", "FUSION_SIGMAS", "FUSION_INTERVAL",
    "DEMO_DURATION", "DEMO_PORT", "DEMO_TRACKS", "DEMO_RATE", "DEMO_SEED", "DEMO_NODES", "DEMO_HTTP_PORT",
    "MESH_BANDWIDTH_BPS", "MESH_BURST_BYTES",
)}

# Values `config show` does not print (the security options' bearer token...).
_SECRET_WORDS = ("token", "secret", "password")
# What `apply` leaves in ctx.meta for `config show`.
_META_PATH = "meshstore.config.path"
_META_DOCUMENT = "meshstore.config.document"
_META_ADOPTED = "meshstore.config.adopted"


# ---- settings ----------------------------------------------------------------------------

def _key(option: click.Option) -> str:
    """A setting's file key: its long flag name without ``--``."""
    return next(name for name in option.opts if name.startswith("--"))[2:]


def settings(command: click.Command) -> dict[str, click.Option]:
    """A command's settings by file key: its options that have an environment variable."""
    return {_key(p): p for p in command.params if isinstance(p, click.Option) and p.envvar}


def _commands(ctx: click.Context) -> dict[str, click.Command]:
    """The root group's commands that have settings, in the order ``--help`` lists them."""
    group = ctx.find_root().command
    assert isinstance(group, click.Group)
    found = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    return {name: cmd for name, cmd in found.items()
            if cmd is not None and not isinstance(cmd, click.Group) and settings(cmd)}


# ---- the file ----------------------------------------------------------------------------

def _file_error(path: str, message: str) -> CliError:
    return CliError(f"config file {path}: {message}", EXIT_USAGE)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise _file_error(path, f"no such file (from --config or {CONFIG_ENV})") from None
    except IsADirectoryError:
        raise _file_error(path, "is a directory") from None
    except OSError as exc:
        raise _file_error(path, exc.strerror or str(exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _file_error(path, f"not valid TOML: {exc}") from None


def _expected(option: click.Option) -> tuple[tuple[type, ...], str]:
    """The TOML types a setting takes, and how to say so."""
    if isinstance(option.type, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(option.type, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(option.type, click.types.FloatParamType):
        return (int, float), "a number"
    return (str,), "a string"


def _toml_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _checked(ctx: click.Context, option: click.Option, value: Any, where: str) -> Any:
    """``value`` if the setting takes it (TOML type, then the option's own range or
    choices); else a usage error saying ``where``."""
    types, wanted = _expected(option)
    if option.multiple:
        if not isinstance(value, list):
            raise CliError(f"{where}: expected an array ({wanted} each), got {_toml_name(value)}", EXIT_USAGE)
        items, wanted = value, f"an array ({wanted} each)"
    else:
        items = [value]
    for item in items:
        if not isinstance(item, types) or isinstance(item, bool) != (types == (bool,)):
            raise CliError(f"{where}: expected {wanted}, got {_toml_name(item)} {_toml(item)}", EXIT_USAGE)
    try:
        option.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise CliError(f"{where}: {exc.message}", EXIT_USAGE) from None
    return value


def load(ctx: click.Context, path: str, document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The file at ``path`` (read into ``document``) as click's default_map, ``{command:
    {parameter name: value}}``, for the commands of ``ctx``'s root group; CliError (exit 2)
    if anything in it is wrong."""
    commands = _commands(ctx)
    tables = {name: value for name, value in document.items() if isinstance(value, dict)}
    shared = {key: value for key, value in document.items() if key not in tables}
    for name in tables:
        if name not in commands:
            raise _file_error(path, f"[{name}] is not a command with settings (those are: {', '.join(commands)})")
    known = {key for cmd in commands.values() for key in settings(cmd)}
    for key in shared:
        if key not in known:
            raise _file_error(path, f"{key!r} (top level) is not a setting of any command")
    default_map: dict[str, dict[str, Any]] = {}
    for name, cmd in commands.items():
        options = settings(cmd)
        for key in tables.get(name, {}):
            if key not in options:
                raise _file_error(path, f"[{name}] {key!r} is not a setting of `meshstore {name}` "
                                        f"(its settings: {', '.join(options)})")
        values = {key: (value, f"{key!r} (top level)") for key, value in shared.items() if key in options}
        values |= {key: (value, f"[{name}] {key!r}") for key, value in tables.get(name, {}).items()}
        default_map[name] = {options[key].name: _checked(ctx, options[key], value, f"config file {path}: {where}")
                             for key, (value, where) in values.items()}
    return default_map


# ---- the environment -----------------------------------------------------------------------

def adopt_deprecated_env(commands: Iterable[click.Command],
                         environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Copies each deprecated variable that is set, and whose new name is the variable of
    a setting of ``commands``, to its new name (unless that is set too), with a warning on
    stderr. Returns ``{new name: old name}`` of the copies."""
    env = os.environ if environ is None else environ
    names = {option.envvar for command in commands for option in settings(command).values()}
    adopted = {}
    for old, new in DEPRECATED_ENV.items():
        if old not in env or new not in names:
            continue
        if new in env:
            _warn(f"the environment variable {old} is deprecated and ignored: {new} is set")
        else:
            env[new] = env[old]
            adopted[new] = old
            _warn(f"the environment variable {old} is deprecated: use {new} ({old} stops working in the next release)")
    return adopted


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


# ---- the app's callback ----------------------------------------------------------------------

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", envvar=CONFIG_ENV, show_envvar=True, metavar="FILE",
    help="TOML file of settings: a table per command ([serve], [classifier]...), keys are the long flag "
         "names; keys outside any table apply to every command that has them. A flag or environment "
         "variable overrides it. See `meshstore config show --help`.")]


def apply(ctx: click.Context, path: str | None) -> None:
    """For the app's callback: loads the config file (if any) as the default_map of the
    command about to run, and adopts the deprecated environment variables of that command."""
    document = _read(path) if path else {}
    ctx.meta[_META_PATH] = path
    ctx.meta[_META_DOCUMENT] = document
    ctx.default_map = load(ctx, path, document) if path else None
    command = _commands(ctx).get(ctx.invoked_subcommand or "")
    ctx.meta[_META_ADOPTED] = adopt_deprecated_env([command] if command is not None else [])


# ---- meshstore config show -------------------------------------------------------------------

def _toml(value: Any) -> str:
    """``value`` as a TOML value (strings in JSON's escapes, which TOML reads the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _source(ctx: click.Context, name: str, option: click.Option, source: click.core.ParameterSource | None) -> str:
    root = ctx.find_root()
    kind = click.core.ParameterSource
    if source == kind.COMMANDLINE:
        return "flag"
    if source == kind.ENVIRONMENT:
        old = root.meta.get(_META_ADOPTED, {}).get(option.envvar)
        return f"env {old} (deprecated: {option.envvar})" if old else f"env {option.envvar}"
    if source == kind.DEFAULT_MAP:
        table = root.meta.get(_META_DOCUMENT, {}).get(name, {})
        where = f"[{name}]" if _key(option) in table else "top level"
        return f"file {root.meta.get(_META_PATH)} {where}"
    return "default"


def _show(ctx: click.Context, name: str, command: click.Command, args: list[str]) -> list[str]:
    """The lines of one command's table: each setting, its effective value and source."""
    options = settings(command)
    # Only the settings are parsed (not the command's arguments or other flags): the same
    # Option objects, so the same env vars, types, ranges and default_map entry.
    try:
        parsed = click.Command(name, params=list(options.values()), add_help_option=False).make_context(
            name, list(args), parent=ctx.find_root())
    except click.NoSuchOption as exc:
        raise click.UsageError(f"{exc.option_name} is not a setting of `meshstore {name}` "
                               f"(its settings: {', '.join(options)})", ctx) from None
    rows = []
    for key, option in options.items():
        value = parsed.params[option.name]
        source = _source(ctx, name, option, parsed.get_parameter_source(option.name))
        if any(word in key for word in _SECRET_WORDS) and value:
            rows.append((f'{key} = "(hidden)"', source))
        elif value is None:
            rows.append((f"# {key} is not set", source))
        else:
            rows.append((f"{key} = {_toml(value)}", source))
    width = max(len(text) for text, _ in rows)
    return [f"[{name}]", *(f"{text:<{width}}  # {source}" for text, source in rows)]


def show_cmd(
    ctx: typer.Context,
    command: Annotated[str | None, typer.Argument(metavar="[COMMAND] [FLAGS]...", show_default=False)] = None,
) -> None:
    """Print the effective settings of COMMAND (or of every command) as TOML, given
    COMMAND's flags as you would run it, each value with its source: `flag`, `env NAME`,
    `file PATH [table]` or `default`. Precedence: flag > environment variable
    (MESHSTORE_..., see the command's --help) > the config file (`meshstore --config
    FILE`, or MESHSTORE_CONFIG) > default.

    The config file has a table per command whose keys are the long flag names without
    `--` (`[serve]` `port = 50051`, `peer = ["10.0.0.6:50051"]`); keys outside any table
    apply to every command that has that setting (`store = "10.0.0.5:50051"`). The output
    of this command is such a file. Environment variables renamed under MESHSTORE_
    (SIM_RATE -> MESHSTORE_SIM_RATE...) still work with a warning until the next release."""
    commands = _commands(ctx)
    args = list(ctx.args)
    if (command or "").startswith("-") or (args and command is None):
        raise click.UsageError("flags go after a COMMAND: `meshstore config show COMMAND [FLAGS]...`", ctx)
    if command is None:
        targets = list(commands)
    elif command in commands:
        targets = [command]
    else:
        raise click.UsageError(f"no command {command!r} with settings (those are: {', '.join(commands)})", ctx)
    root = ctx.find_root()
    lines = [f"# meshstore's effective settings (flag > env > file {root.meta.get(_META_PATH) or '(none)'} > default)"]
    root.meta[_META_ADOPTED] |= adopt_deprecated_env(commands[name] for name in targets)
    for name in targets:
        lines += ["", *_show(ctx, name, commands[name], args)]
    sys.stdout.write("\n".join(lines) + "\n")


def register(app: typer.Typer) -> None:
    """Adds ``config show`` to ``app``."""
    group = typer.Typer(name="config", help="The commands' settings: flags, MESHSTORE_ env vars, the --config file.",
                        no_args_is_help=True)
    group.command("show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(show_cmd)
    app.add_typer(group)
