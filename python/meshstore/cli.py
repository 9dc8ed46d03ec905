"""The ``meshstore`` command: run a store server, and inspect or drive one over gRPC.

    meshstore serve --port 50051 [--peer HOST:PORT ...]
                                            run a store, a mesh node with peers (Ctrl-C / SIGTERM: graceful stop)
    meshstore list [-t track|asset|geo]     live entities
    meshstore get ID                        one entity, its components and versions
    meshstore watch [-t ...] [--existing] [--since SEQ] [--components k,...] [--count N] [--timeout S]
    meshstore approve ID / deny ID          decide an entity's pending approval
    meshstore stats                         the store's counters and health

Client commands dial ``--store`` (or ``MESHSTORE_ADDR``, default 127.0.0.1:50051),
print rich tables for people and ``--json`` for scripts (one JSON object; JSON lines
for ``watch``). On failure they print ONE line to stderr and exit non-zero:
1 store unreachable or refused the request, 2 bad usage or input, 3 no such entity,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import enum
import json
import math
import os
import re
import signal
import sys
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import click
import typer

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


app = typer.Typer(
    name="meshstore",
    help="meshstore: a replicated entity-component store. Run a server, or inspect and drive one over gRPC.",
    epilog="Exit codes: 0 ok, 1 store unreachable or request refused, 2 bad usage or input, "
           "3 no such entity, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Kind(str, enum.Enum):
    track = "track"
    asset = "asset"
    geo = "geo"


def _type_value(kind: Kind | None) -> int:
    from meshstore.pb import entity_pb2

    return 0 if kind is None else entity_pb2.EntityType.Value(f"ENTITY_TYPE_{kind.value.upper()}")


# ---- shared options ---------------------------------------------------------------------

StoreOpt = Annotated[str, typer.Option(
    "--store", "-s", envvar="MESHSTORE_ADDR", show_envvar=True,
    help="Address of the store server, HOST:PORT.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output: one JSON object (JSON lines for watch).")]
DeadlineOpt = Annotated[float, typer.Option(
    "--deadline", min=0.1, envvar="MESHSTORE_DEADLINE", help="Seconds to wait for the store's answer.")]


def _target(addr: str) -> str:
    """Validates HOST:PORT (or [IPv6]:PORT, unix:PATH) into a gRPC target."""
    text = addr.strip()
    if text.startswith(("unix:", "unix-abstract:")) and len(text.split(":", 1)[1]) > 0:
        return text
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})", text)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise CliError(f"invalid store address {addr!r}: expected HOST:PORT, e.g. {DEFAULT_ADDR} "
                       "(from --store or MESHSTORE_ADDR)", EXIT_USAGE)
    return text


@contextlib.contextmanager
def _channel(addr: str) -> Iterator[Any]:
    import grpc

    target = _target(addr)
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", CLIENT_MAX_RECEIVE),
        ("grpc.enable_retries", 0),
    ])
    try:
        yield channel
    finally:
        channel.close()


@contextlib.contextmanager
def _rpc_errors(addr: str, what: str, deadline: float | None = None) -> Iterator[None]:
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
            raise CliError(f"cannot reach the store at {addr}{': ' + reason if reason else ''} "
                           "(is `meshstore serve` running there?)") from None
        if code == C.DEADLINE_EXCEEDED:
            raise CliError(f"the store at {addr} did not answer {what} within {deadline or 0:g}s") from None
        if code == C.NOT_FOUND:
            raise CliError(details or "not found", EXIT_NOT_FOUND) from None
        if code == C.INVALID_ARGUMENT:
            raise CliError(f"invalid request: {details}", EXIT_USAGE) from None
        if code == C.UNIMPLEMENTED:
            raise CliError(f"the store at {addr} does not implement {what} (an older server?)") from None
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


# ---- rendering --------------------------------------------------------------------------

def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _any_dict(packed: Any) -> dict[str, Any]:
    """A component as JSON: its fields when the type is known, else type URL + base64."""
    from google.protobuf import json_format

    try:
        return json_format.MessageToDict(packed, preserving_proto_field_name=True)
    except Exception:  # unknown type URL or bytes that do not parse as it
        return {"@type": packed.type_url, "value": base64.b64encode(packed.value).decode()}


def entity_dict(entity: Any) -> dict[str, Any]:
    """``json_format.MessageToDict`` of an entity (proto field names), components
    unpacked where their type is known."""
    from google.protobuf import json_format

    shell = type(entity)()
    shell.CopyFrom(entity)
    shell.ClearField("components")
    out = json_format.MessageToDict(shell, preserving_proto_field_name=True)
    if entity.components:
        out["components"] = {key: _any_dict(entity.components[key]) for key in sorted(entity.components)}
    return out


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _type_name(value: int) -> str:
    from meshstore.pb import entity_pb2

    try:
        return entity_pb2.EntityType.Name(value).removeprefix("ENTITY_TYPE_").lower()
    except ValueError:
        return str(value)


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    dt = datetime.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=datetime.timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _version_text(v: Any) -> str:
    if not v.physical and not v.node:
        return "-"
    when = datetime.datetime.fromtimestamp(v.physical / 1e9, tz=datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    concurrent = f" (+{len(v.concurrent)} concurrent)" if v.concurrent else ""
    return f"{v.node} @{when}{'+' + str(v.logical) if v.logical else ''} #{v.counter}{concurrent}"


def _component_text(packed: Any) -> tuple[str, str]:
    d = _any_dict(packed)
    type_url = d.pop("@type", packed.type_url)
    return type_url.rsplit("/", 1)[-1].removeprefix("entity.v1."), json.dumps(d, ensure_ascii=False)


def _short_event_type(value: int) -> str:
    from meshstore.pb import store_pb2

    try:
        return store_pb2.EventType.Name(value).removeprefix("EVENT_TYPE_")
    except ValueError:
        return str(value)


# ---- client commands --------------------------------------------------------------------

@app.command("list")
def list_cmd(
    type_: Annotated[Kind | None, typer.Option("--type", "-t", case_sensitive=False,
                                                help="Only entities of this type.")] = None,
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """List the store's live entities (ordered by id)."""
    from meshstore.pb import store_pb2, store_pb2_grpc

    with _channel(store) as ch, _rpc_errors(store, "ListEntities", deadline):
        resp = store_pb2_grpc.EntityStoreServiceStub(ch).ListEntities(
            store_pb2.ListEntitiesRequest(type_filter=_type_value(type_)), timeout=deadline, wait_for_ready=False)
    if json_out:
        _print_json({"count": len(resp.entities), "entities": [entity_dict(e) for e in resp.entities]})
        return
    from rich.table import Table

    table = Table(title=f"{len(resp.entities)} entities", title_justify="left")
    for column in ("ID", "TYPE", "COMPONENTS", "UPDATED (UTC)", "ORIGIN"):
        table.add_column(column, overflow="fold")
    for e in resp.entities:
        table.add_row(e.id, _type_name(e.type), ", ".join(sorted(e.components)), _when(e.updated_at), e.origin_node)
    _console().print(table)


@app.command("get")
def get_cmd(
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="The entity's id.")],
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Show one entity: its type, times, components (decoded) and their versions."""
    from meshstore.pb import store_pb2, store_pb2_grpc

    with _channel(store) as ch, _rpc_errors(store, "GetEntity", deadline):
        entity = store_pb2_grpc.EntityStoreServiceStub(ch).GetEntity(
            store_pb2.GetEntityRequest(id=entity_id), timeout=deadline, wait_for_ready=False)
    _show_entity(entity, json_out)


def _show_entity(e: Any, json_out: bool, title: str | None = None) -> None:
    if json_out:
        _print_json(entity_dict(e))
        return
    from rich.table import Table

    head = Table(show_header=False, title=title or f"entity {e.id}", title_justify="left")
    head.add_column("field", style="bold")
    head.add_column("value", overflow="fold")
    head.add_row("id", e.id)
    head.add_row("type", _type_name(e.type))
    head.add_row("created", _when(e.created_at))
    head.add_row("updated", _when(e.updated_at))
    head.add_row("origin", e.origin_node or "-")
    if e.HasField("expiry_time"):
        head.add_row("expires", _when(e.expiry_time))
    comps = Table(title="components", title_justify="left")
    for column in ("KEY", "TYPE", "VALUE", "VERSION"):
        comps.add_column(column, overflow="fold")
    for key in sorted(e.components):
        type_name, value = _component_text(e.components[key])
        version = _version_text(e.versions[key]) if key in e.versions else "-"
        comps.add_row(key, type_name, value, version)
    console = _console()
    console.print(head)
    console.print(comps)


def _decide(action: str, entity_id: str, store: str, json_out: bool, deadline: float) -> None:
    from meshstore.pb import store_pb2, store_pb2_grpc

    with _channel(store) as ch, _rpc_errors(store, f"{action}Action", deadline):
        stub = store_pb2_grpc.EntityStoreServiceStub(ch)
        if action == "Approve":
            entity = stub.ApproveAction(store_pb2.ApproveActionRequest(entity_id=entity_id),
                                        timeout=deadline, wait_for_ready=False)
        else:
            entity = stub.DenyAction(store_pb2.DenyActionRequest(entity_id=entity_id),
                                     timeout=deadline, wait_for_ready=False)
    if json_out:
        _print_json(entity_dict(entity))
    else:
        verb = "approved" if action == "Approve" else "denied"
        _console().print(f"{verb} {entity_id}", markup=False)


@app.command("approve")
def approve_cmd(
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="The entity whose pending approval to approve.")],
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Approve the entity's pending action (its "approval" component goes PENDING -> APPROVED).
    Fails if nothing is pending."""
    _decide("Approve", entity_id, store, json_out, deadline)


@app.command("deny")
def deny_cmd(
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="The entity whose pending approval to deny.")],
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Deny the entity's pending action (its "approval" component goes PENDING -> DENIED).
    Fails if nothing is pending."""
    _decide("Deny", entity_id, store, json_out, deadline)


@app.command("watch")
def watch_cmd(
    type_: Annotated[Kind | None, typer.Option("--type", "-t", case_sensitive=False,
                                                help="Only entities of this type.")] = None,
    existing: Annotated[bool, typer.Option("--existing", help="First every live entity (as CREATED).")] = False,
    since: Annotated[int | None, typer.Option("--since", min=0, metavar="SEQ",
                                              help="Resume after this seq: every entity changed since, then live.")] = None,
    components: Annotated[str | None, typer.Option(
        "--components", "-c", metavar="KEY,...", help="Only these component keys (comma-separated).")] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after N events.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.0, metavar="S",
                                                  help="Stop after S seconds (exit 0).")] = None,
    min_interval: Annotated[float, typer.Option("--min-interval", min=0.0, metavar="S",
                                                help="At most one event per entity per S seconds.")] = 0.0,
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
) -> None:
    """Print the store's changes as they happen (Ctrl-C to stop). Each event carries
    its seq: pass the last one to --since to resume without a gap."""
    import grpc

    from meshstore.pb import store_pb2, store_pb2_grpc

    keys = [k.strip() for k in components.split(",") if k.strip()] if components else []
    if components is not None and not keys:
        raise CliError("--components needs at least one component key", EXIT_USAGE)
    request = store_pb2.WatchEntitiesRequest(
        type_filter=_type_value(type_), include_existing=existing, components=keys,
        min_interval_ms=int(round(min_interval * 1000)))
    if since is not None:
        request.since_seq = since
    console = None if json_out else _console()
    seen = 0
    with _channel(store) as ch:
        call = store_pb2_grpc.EntityStoreServiceStub(ch).WatchEntities(
            request, timeout=timeout if timeout else None, wait_for_ready=False)
        interrupted = False

        def on_sigint(signum: int, frame: Any) -> None:
            # Cancel the call rather than raise inside grpc's wait: the stream then ends
            # at once, however busy the machine, and we report the interrupt below.
            nonlocal interrupted
            interrupted = True
            call.cancel()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            with _rpc_errors(store, "WatchEntities", timeout):
                try:
                    for ev in call:
                        if ev.type == store_pb2.EVENT_TYPE_HEARTBEAT:
                            continue
                        _show_event(ev, console)
                        seen += 1
                        if count is not None and seen >= count:
                            break
                except grpc.RpcError as err:
                    if interrupted:
                        raise KeyboardInterrupt from None
                    if timeout and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        return  # --timeout elapsed: a normal end
                    raise
        finally:
            signal.signal(signal.SIGINT, previous)
            call.cancel()


def _show_event(ev: Any, console: Any) -> None:
    kind = _short_event_type(ev.type)
    if console is None:
        _print_json({"type": kind, "seq": ev.seq, "origin_node": ev.origin_node, "entity": entity_dict(ev.entity)})
        return
    parts = [f"{ev.seq:>8}", f"{kind:<8}", ev.entity.id, f"({_type_name(ev.entity.type)}, from {ev.origin_node or '-'})"]
    for key in sorted(ev.entity.components):
        parts.append(f"{key}={_component_text(ev.entity.components[key])[1]}")
    console.print(" ".join(parts), markup=False, soft_wrap=True)
    console.file.flush()


def _number(value: float) -> int | float:
    return int(value) if math.isfinite(value) and value == int(value) else value


@app.command("stats")
def stats_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Show the store's counters (entities, tombstones, seq, writes, watchers...) and health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from meshstore.pb import store_pb2, store_pb2_grpc

    with _channel(store) as ch:
        with _rpc_errors(store, "GetStats", deadline):
            resp = store_pb2_grpc.EntityStoreServiceStub(ch).GetStats(
                store_pb2.GetStatsRequest(), timeout=deadline, wait_for_ready=False)
        with _rpc_errors(store, "the health check", deadline):
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=deadline, wait_for_ready=False)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
    values = {key: _number(resp.values[key]) for key in sorted(resp.values)}
    if json_out:
        _print_json({"node_id": resp.node_id, "health": status, "values": values})
        return
    from rich.table import Table

    table = Table(title=f"store {resp.node_id} at {store}: {status}", title_justify="left")
    table.add_column("STAT")
    table.add_column("VALUE", justify="right")
    links: dict[str, dict[str, int | float]] = {}
    for key, value in values.items():
        if key.startswith("peer."):  # peer.<address>.<counter>
            address, _, counter = key.removeprefix("peer.").rpartition(".")
            links.setdefault(address, {})[counter] = value
        else:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:,.3f}")
    console = _console()
    console.print(table)
    if links:
        columns = ("connected", "sent_states", "sent_bytes", "acked_seq", "lag", "pending", "coalesced",
                   "deferred", "retries", "full_syncs")
        peers = Table(title="mesh peers (this node's relay)", title_justify="left")
        peers.add_column("PEER")
        for column in columns:
            peers.add_column(column.upper(), justify="right")
        for address, link in sorted(links.items()):
            peers.add_row(address, *(f"{link.get(c, 0):,}" for c in columns))
        console.print(peers)


# ---- serve ------------------------------------------------------------------------------

@app.command("serve")
def serve_cmd(
    port: Annotated[int, typer.Option("--port", "-p", envvar="MESHSTORE_PORT", show_envvar=True, min=0, max=65535,
                                      help="Port to listen on (0: any free port, logged at startup).")] = 50051,
    host: Annotated[str, typer.Option("--host", envvar="MESHSTORE_HOST", show_envvar=True,
                                      help="Interface to bind (0.0.0.0 or :: for every interface).")] = "127.0.0.1",
    node_id: Annotated[str | None, typer.Option("--node-id", envvar="MESHSTORE_NODE_ID", show_envvar=True,
                                                help="This store's node id (default: hostname-random).")] = None,
    peer_expiry: Annotated[float, typer.Option(
        "--peer-expiry", envvar="MESHSTORE_PEER_EXPIRY", show_envvar=True, metavar="S",
        help="Seconds of silence after which a peer no longer holds back forgetting deleted entities "
             "(it rejoins with a full exchange if it returns).")] = 86400.0,
    max_message_bytes: Annotated[int, typer.Option(
        "--max-message-bytes", envvar="MESHSTORE_MAX_MESSAGE_BYTES", show_envvar=True,
        help="Largest gRPC message accepted; bigger ones get RESOURCE_EXHAUSTED.")] = 4 * 1024 * 1024,
    max_entity_bytes: Annotated[int, typer.Option(
        "--max-entity-bytes", envvar="MESHSTORE_MAX_ENTITY_BYTES", show_envvar=True,
        help="Largest entity the store accepts (INVALID_ARGUMENT beyond).")] = 1 << 20,
    grace: Annotated[float, typer.Option("--grace", envvar="MESHSTORE_GRACE", min=0.0, metavar="S",
                                         help="Seconds in-flight calls get to finish at shutdown.")] = 5.0,
    log_level: Annotated[str, typer.Option("--log-level", envvar="MESHSTORE_LOG_LEVEL", show_envvar=True,
                                           help="debug, info, warning or error.")] = "info",
    log_json: Annotated[bool, typer.Option("--log-json", envvar="MESHSTORE_LOG_JSON",
                                           help="Log JSON lines instead of key=value lines.")] = False,
    peers: Annotated[list[str] | None, typer.Option(
        "--peer", envvar="MESHSTORE_PEERS", show_envvar=True, metavar="HOST:PORT",
        help="Another node to replicate to (repeat for each; the env var takes a space-separated list). "
             "Every node of a mesh needs its own --node-id.")] = None,
    bandwidth_bps: Annotated[float | None, typer.Option(
        "--mesh-bandwidth-bps", envvar="MESH_BANDWIDTH_BPS", show_envvar=True, min=0.0, metavar="BYTES",
        help="Bytes/s each peer link may send (0: unlimited). DELETE and HIGH-threat changes bypass it; "
             "the rest waits, coalesced to the latest state per entity, and is sent by priority.")] = None,
    burst_bytes: Annotated[float | None, typer.Option(
        "--mesh-burst-bytes", envvar="MESH_BURST_BYTES", show_envvar=True, min=0.0, metavar="BYTES",
        help="Burst of each peer link's budget (0: one second of bandwidth, at least 64 KiB).")] = None,
) -> None:
    """Run a store server (gRPC store.v1.EntityStoreService and mesh.v1.MeshService,
    health, reflection) until SIGINT or SIGTERM, then shut down gracefully (open watch
    streams are ended). With --peer it is a mesh node: it pushes its changes to every
    peer and merges theirs. Logs go to stderr; the first line says
    `listening address=HOST:PORT node_id=N`."""
    from meshstore import logs

    try:
        logs.setup(log_level, json=log_json)
    except ValueError as exc:
        raise CliError(f"--log-level: {exc}", EXIT_USAGE) from None

    from meshstore.options import StoreOptions
    from meshstore.server import serve_async
    from meshstore.store import Store

    overrides: dict[str, Any] = {"peer_expiry": peer_expiry, "max_entity_bytes": max_entity_bytes}
    if node_id is not None:
        overrides["node_id"] = node_id
    try:
        options = StoreOptions(**overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid store option: {exc}", EXIT_USAGE) from None
    if max_message_bytes < 1024:
        raise CliError(f"--max-message-bytes must be at least 1024, got {max_message_bytes}", EXIT_USAGE)

    import asyncio

    store = Store(options)
    try:
        asyncio.run(serve_async(store, host, port, max_message_bytes, grace, peers=_peer_list(peers),
                                bandwidth_bps=bandwidth_bps, burst_bytes=burst_bytes))
    except OSError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()


def _peer_list(peers: list[str] | None) -> list[str]:
    """Peer addresses, each checked to be HOST:PORT."""
    found = [p for raw in peers or [] for p in raw.replace(",", " ").split()]
    for peer in found:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"--peer must be HOST:PORT, got {peer!r}", EXIT_USAGE)
    return found


# The pipeline's commands: sensor-sim, radar-sim, classifier, task-manager, fusion, demo.
from meshstore.services.commands import register as _register_pipeline  # noqa: E402

_register_pipeline(app)


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
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_ERROR
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


if __name__ == "__main__":
    main()
