"""The ``meshstore`` command: run a store server, and inspect or drive one over gRPC.

    meshstore serve --port 50051 [--peer HOST:PORT ...] [--http-port 8080]
                                            run a store, a mesh node with peers, the web UI with --http-port
                                            (Ctrl-C / SIGTERM: graceful stop)
    meshstore list [-t track|asset|geo] [--wide]
                                            live entities: position, speed, threat, task, approval
    meshstore get ID                        one entity, its components and versions
    meshstore put [FILE]                    write an entity given as JSON (as `get --json` prints it)
    meshstore delete ID                     delete an entity
    meshstore watch [-t ...] [--existing] [--since SEQ] [--components k,...] [--count N] [--timeout S]
    meshstore approve ID / deny ID          decide an entity's pending approval
    meshstore pending                       approvals waiting, oldest first, with the time left
    meshstore stats                         the store's counters and health
    meshstore backup DIR FILE               a consistent copy of a data dir (also of a running node's)
    meshstore export DIR [--out FILE]       a data dir's entities as JSON lines (also a running node's)
    meshstore import FILE DIR               merge an export into a data dir (not a running node's)
    meshstore token hash                    the SHA-256 of a token (stdin), for an auth file
    meshstore demo                          the whole pipeline in one process
    meshstore sensor-sim | radar-sim | classifier | task-manager | fusion
                                            the pipeline's services, each against a store
    meshstore [--config FILE] config show [COMMAND] [FLAGS]
                                            the effective settings (flag > MESHSTORE_ env > FILE > default)

Client commands dial ``--store`` (or ``MESHSTORE_ADDR``, default 127.0.0.1:50051),
print rich tables for people and ``--json`` for scripts (one JSON object; JSON lines
for ``watch``). On failure they print ONE line to stderr and exit non-zero:
1 store unreachable or refused the request, 2 bad usage or input, 3 no such entity,
130 interrupted (Ctrl-C). A reader that closes the pipe early (``| head``) ends a
command with 0.

The commands live by group: ``meshstore.cli.entities`` (list, get, put, delete, watch,
approve, deny, pending), ``meshstore.cli.node`` (serve, stats), ``meshstore.cli.data`` (backup, export,
import: offline tools on a data dir, exit 1 when it cannot be read or written),
``meshstore.cli.services`` (sensor-sim, radar-sim, classifier, task-manager, fusion),
``meshstore.cli.demo`` (demo), ``meshstore.cli.config`` (the settings: the --config file,
the environment, config show);
``meshstore.cli.common`` holds what they share. This module builds the typer app and
runs it (``run``, ``main``: the ``meshstore`` console script and
``python -m meshstore.cli``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated, NoReturn

import click
import typer

from meshstore.cli import config, data, demo, entities, node, security, services
from meshstore.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, CliError
from meshstore.cli.entities import entity_dict

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NOT_FOUND", "EXIT_USAGE", "CliError", "app", "entity_dict",
           "main", "run"]

app = typer.Typer(
    name="meshstore",
    help="meshstore: a replicated entity-component store. Run a server, or inspect and drive one over gRPC.",
    epilog="Exit codes: 0 ok, 1 store unreachable or request refused, 2 bad usage or input, "
           "3 no such entity, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click itself says "Did you mean" for a mistyped command; typer's would repeat it.
    suggest_commands=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from meshstore import __version__

        typer.echo(f"meshstore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    config_file: config.ConfigOpt = None,
    tls_ca: security.TlsCaOpt = None,
    tls_cert: security.TlsCertOpt = None,
    tls_key: security.TlsKeyOpt = None,
    token: security.TokenOpt = None,
) -> None:
    # Takes the options of `meshstore` itself: --version, --config (meshstore.cli.config),
    # how every command dials a store (--tls-ca, --tls-cert, --tls-key, --token:
    # meshstore.cli.security), and typer's --install-completion / --show-completion
    # (shell completion of commands and options).
    config.apply(ctx, config_file)
    security.use_client_security(tls_ca, tls_cert, tls_key, token)


entities.register(app)  # list, get, put, delete, approve, deny, watch, pending
node.register(app)  # stats, serve
data.register(app)  # backup, export, import
services.register(app)  # sensor-sim, radar-sim, classifier, task-manager, fusion
demo.register(app)  # demo
config.register(app)  # config show
security.register(app)  # token hash


# ---- entry point ------------------------------------------------------------------------

def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


def run(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (never raises, never a traceback)."""
    try:
        rv = app(args=argv, prog_name="meshstore", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return 0
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        return _fail(exc.format_message() + hint, EXIT_USAGE)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code or EXIT_ERROR)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, click.Abort):
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader stopped early (`meshstore | head -1`): its choice, not a failure
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except SystemExit as exc:
        # typer turns a command's broken pipe (`meshstore watch --json | head -1`) into
        # exit(1), having already silenced stdout: the same early reader as above.
        if isinstance(exc.__context__, BrokenPipeError):
            return 0
        raise
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("MESHSTORE_DEBUG"):
            import traceback

            traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__}: {exc} (set MESHSTORE_DEBUG=1 for the traceback)",
                     EXIT_ERROR)


def main() -> NoReturn:
    """Console-script entry point (``meshstore``)."""
    code = run()
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    raise SystemExit(code)
