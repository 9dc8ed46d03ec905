"""What every ``meshstore`` command shares: errors and exit codes, the options every
client command takes, the channel to a store and how its failures read, output.

Nothing here imports grpc or rich at module level: ``meshstore --help`` stays quick.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import click
import typer

__all__ = [
    "CLIENT_MAX_RECEIVE", "DEFAULT_ADDR", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NOT_FOUND", "EXIT_USAGE",
    "CliError", "DeadlineOpt", "JsonOpt", "LogJsonOpt", "LogLevelOpt", "StoreOpt", "channel", "console",
    "print_json", "rpc_errors", "setup_logs", "target",
]

# As meshstore.grpc.client.DEFAULT_ADDR; not imported from there, so that the commands
# do not load grpc for every `meshstore` invocation.
DEFAULT_ADDR = "127.0.0.1:50051"
# Client-side receive limit: ListEntities answers with every entity in one message.
CLIENT_MAX_RECEIVE = 256 * 1024 * 1024

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure reported as one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())
        self.code = code


# ---- shared options ---------------------------------------------------------------------

StoreOpt = Annotated[str, typer.Option(
    "--store", "-s", envvar="MESHSTORE_ADDR", show_envvar=True,
    help="Address of the store server, HOST:PORT.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output: one JSON object (JSON lines for watch).")]
DeadlineOpt = Annotated[float, typer.Option(
    "--deadline", min=0.1, envvar="MESHSTORE_DEADLINE", help="Seconds to wait for the store's answer.")]
LogLevelOpt = Annotated[str, typer.Option(
    "--log-level", envvar="MESHSTORE_LOG_LEVEL", show_envvar=True, help="debug, info, warning or error.")]
LogJsonOpt = Annotated[bool, typer.Option(
    "--log-json", envvar="MESHSTORE_LOG_JSON", help="Log JSON lines instead of key=value lines.")]


def setup_logs(level: str, json_lines: bool = False) -> None:
    """Structured logs on stderr (meshstore.logs); a bad level is a usage error (exit 2)."""
    from meshstore import logs

    try:
        logs.setup(level, json=json_lines)
    except ValueError as exc:
        raise click.UsageError(f"--log-level: {exc}") from None


# ---- the channel to a store -------------------------------------------------------------

def target(addr: str) -> str:
    """Validates HOST:PORT (or [IPv6]:PORT, unix:PATH) into a gRPC target."""
    text = addr.strip()
    if text.startswith(("unix:", "unix-abstract:")) and len(text.split(":", 1)[1]) > 0:
        return text
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})", text)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise CliError(f"invalid store address {addr!r}: expected HOST:PORT, e.g. {DEFAULT_ADDR} "
                       "(from --store, MESHSTORE_ADDR or the config file)", EXIT_USAGE)
    return text


@contextlib.contextmanager
def channel(addr: str) -> Iterator[Any]:
    """A synchronous grpc channel to the store at ``addr`` (closed at the end), secured
    as the command's ``--tls-*`` / ``--token`` say (meshstore.grpc.client.open_channel)."""
    from meshstore.grpc.client import open_channel

    ch = open_channel(target(addr), [
        ("grpc.max_receive_message_length", CLIENT_MAX_RECEIVE),
        ("grpc.enable_retries", 0),
    ], aio=False)
    try:
        yield ch
    finally:
        ch.close()


@contextlib.contextmanager
def rpc_errors(addr: str, what: str, deadline: float | None = None) -> Iterator[None]:
    """Turns a gRPC failure into one clear line (CliError)."""
    import grpc

    try:
        yield
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = (err.details() if callable(getattr(err, "details", None)) else None) or ""
        details = " ".join(details.split())
        C = grpc.StatusCode
        if code == C.UNAVAILABLE:
            if "shutting down" in details:
                raise CliError(f"the store at {addr} is shutting down ({details})") from None
            reason = _connect_reason(details)
            hint = ("is it a TLS store? --tls-ca, and --tls-cert/--tls-key where it needs a client certificate"
                    if re.search(r"TSI_|SSL|[Hh]andshake|Socket closed", details) else
                    "is `meshstore serve` running there?")
            raise CliError(f"cannot reach the store at {addr}{': ' + reason if reason else ''} ({hint})") from None
        if code == C.DEADLINE_EXCEEDED:
            raise CliError(f"the store at {addr} did not answer {what} within {deadline or 0:g}s") from None
        if code == C.NOT_FOUND:
            raise CliError(details or "not found", EXIT_NOT_FOUND) from None
        if code == C.INVALID_ARGUMENT:
            raise CliError(f"invalid request: {details}", EXIT_USAGE) from None
        if code == C.UNIMPLEMENTED:
            raise CliError(f"the store at {addr} does not implement {what} (an older server?)") from None
        if code in (C.UNAUTHENTICATED, C.PERMISSION_DENIED):
            raise CliError(f"the store at {addr} refused {what} ({code.name}): {details}") from None
        if code == C.CANCELLED:
            raise CliError(f"{what} was cancelled{': ' + details if details else ''}") from None
        if code in (C.FAILED_PRECONDITION, C.ALREADY_EXISTS, C.ABORTED, C.OUT_OF_RANGE) and details:
            raise CliError(details) from None
        name = code.name.lower() if code is not None else "error"
        raise CliError(f"{what} failed ({name}): {details or 'no details'}") from None


def _connect_reason(details: str) -> str:
    for pattern in (r"connect: ([^()]+?)\s*\(\d+\)", r"(DNS resolution failed[^;]*)", r"(Connection refused)"):
        m = re.search(pattern, details)
        if m:
            return m.group(1).strip()
    return details[:160]


# ---- output -----------------------------------------------------------------------------

def console(stderr: bool = False) -> Any:
    """A rich console for people (no highlighting, no soft wrap)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
