"""The entity commands: ``meshstore list | get | put | delete | watch | approve | deny |
pending``, each
a client of the store at ``--store`` (``MESHSTORE_ADDR``).

    meshstore list [-t track|asset|geo] [--wide]
                                            live entities: position, speed, threat, task, approval
    meshstore pending                       approvals waiting for an operator, oldest first
    meshstore get ID                        one entity, its components and versions
    meshstore put [FILE]                    write an entity given as JSON (as `get --json` prints it)
    meshstore delete ID                     delete an entity
    meshstore watch [-t ...] [--existing] [--since SEQ] [--components k,...] [--count N] [--timeout S]
    meshstore approve ID / deny ID          decide an entity's pending approval
"""

# No `from __future__ import annotations` here: approve and deny are made by one factory
# whose option types are built at run time, and typer reads them as objects.

import datetime
import enum
import json
import signal
from collections.abc import Callable
from typing import Annotated, Any

import typer

from meshstore.cli.common import (
    DEFAULT_ADDR,
    EXIT_USAGE,
    CliError,
    DeadlineOpt,
    JsonOpt,
    StoreOpt,
    channel,
    console,
    print_json,
    rpc_errors,
)

__all__ = ["entity_dict", "register"]


class Kind(str, enum.Enum):
    track = "track"
    asset = "asset"
    geo = "geo"


KindOpt = Annotated[Kind | None, typer.Option("--type", "-t", case_sensitive=False, help="Only entities of this type.")]


def _type_value(kind: Kind | None) -> int:
    from meshstore.pb import entity_pb2

    return 0 if kind is None else entity_pb2.EntityType.Value(f"ENTITY_TYPE_{kind.value.upper()}")


# ---- rendering --------------------------------------------------------------------------

def entity_dict(entity: Any) -> dict[str, Any]:
    """``json_format.MessageToDict`` of an entity (proto field names), components
    unpacked where their type is known (``meshstore.http.entity_json.proto_dict``)."""
    from meshstore.http.entity_json import proto_dict

    return proto_dict(entity)


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
    from meshstore.http.entity_json import any_dict

    d = any_dict(packed)
    type_url = d.pop("@type", packed.type_url)
    return type_url.rsplit("/", 1)[-1].removeprefix("entity.v1."), json.dumps(d, ensure_ascii=False)


def _short_event_type(value: int) -> str:
    from meshstore.pb import store_pb2

    try:
        return store_pb2.EventType.Name(value).removeprefix("EVENT_TYPE_")
    except ValueError:
        return str(value)


def _show_entity(e: Any, json_out: bool, title: str | None = None) -> None:
    if json_out:
        print_json(entity_dict(e))
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
    out = console()
    out.print(head)
    out.print(comps)


def _show_event(ev: Any, out: Any) -> None:
    kind = _short_event_type(ev.type)
    if out is None:
        print_json({"type": kind, "seq": ev.seq, "origin_node": ev.origin_node, "entity": entity_dict(ev.entity)})
        return
    parts = [f"{ev.seq:>8}", f"{kind:<8}", ev.entity.id, f"({_type_name(ev.entity.type)}, from {ev.origin_node or '-'})"]
    for key in sorted(ev.entity.components):
        parts.append(f"{key}={_component_text(ev.entity.components[key])[1]}")
    out.print(" ".join(parts), markup=False, soft_wrap=True)
    out.file.flush()


# ---- commands ---------------------------------------------------------------------------

#: ``meshstore list`` columns, in order, and the order narrow terminals drop them in.
LIST_COLUMNS = ("ID", "TYPE", "POSITION", "SPEED", "THREAT", "TASK", "APPROVAL")
WIDE_COLUMNS = ("COMPONENTS", "UPDATED (UTC)", "ORIGIN")
DROP_ORDER = ("TYPE", "SPEED", "TASK", "POSITION")


def _list_cells(e: Any, wide: bool) -> dict[str, str]:
    """One ``meshstore list`` row, from the same summary view as the HTTP API."""
    from meshstore.http.entity_json import summary

    v = summary(e)
    p, vel, task, approval = v["position"], v["velocity"], v["task"], v["approval"]
    speed = vel["speed"] if vel is not None else None
    cells = {
        "ID": e.id,
        "TYPE": _type_name(e.type),
        "POSITION": f"{p['lat']:.4f},{p['lon']:.4f}" if p is not None else "-",
        "SPEED": f"{speed:.1f}" if speed is not None else "-",
        "THREAT": v["threat"] or "-",
        "TASK": (task["task"] or "-") if task is not None else "-",
        "APPROVAL": approval["state"] if approval is not None else "-",
    }
    if wide:
        cells["COMPONENTS"] = ", ".join(sorted(e.components))
        cells["UPDATED (UTC)"] = _when(e.updated_at)
        cells["ORIGIN"] = e.origin_node or "-"
    return cells


def _list_table(title: str, rows: list[dict[str, str]], columns: list[str], fold_id: bool) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0))
    for column in columns:
        right = column == "SPEED"
        if column == "ID" and fold_id:
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, no_wrap=True, justify="right" if right else "left")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    return table


def _print_list(entities: list[Any], wide: bool) -> None:
    """The table of ``meshstore list``: every column with ``--wide`` (never folded),
    else the columns that fit the terminal (dropped in ``DROP_ORDER``, ids folded last)."""
    from rich.measure import Measurement

    rows = [_list_cells(e, wide) for e in entities]
    title = f"{len(entities)} entities"
    out = console()
    unbounded = out.options.update_width(1_000_000)

    def width(table: Any) -> int:
        return Measurement.get(out, unbounded, table).maximum

    if wide:
        table = _list_table(title, rows, [*LIST_COLUMNS, *WIDE_COLUMNS], fold_id=False)
        out.width = max(out.width, width(table))
        out.print(table)
        return
    columns = list(LIST_COLUMNS)
    for drop in (None, *DROP_ORDER):
        if drop is not None:
            columns.remove(drop)
        table = _list_table(title, rows, columns, fold_id=False)
        if width(table) <= out.width:
            break
    else:
        table = _list_table(title, rows, columns, fold_id=True)
    out.print(table)


def _list_entities(store: str, type_value: int, deadline: float) -> list[Any]:
    from meshstore.pb import store_pb2, store_pb2_grpc

    with channel(store) as ch, rpc_errors(store, "ListEntities", deadline):
        resp = store_pb2_grpc.EntityStoreServiceStub(ch).ListEntities(
            store_pb2.ListEntitiesRequest(type_filter=type_value), timeout=deadline, wait_for_ready=False)
    return list(resp.entities)


def list_cmd(
    type_: KindOpt = None,
    wide: Annotated[bool, typer.Option("--wide", "-w", help="Every column (components, updated, origin too), "
                                                           "however wide the terminal.")] = False,
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """List the store's live entities (ordered by id): position (lat,lon), speed, threat,
    task and approval; columns a narrow terminal has no room for are left out (--wide
    shows them all)."""
    entities = _list_entities(store, _type_value(type_), deadline)
    if json_out:
        print_json({"count": len(entities), "entities": [entity_dict(e) for e in entities]})
        return
    _print_list(entities, wide)


def _left_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "due"
    whole = int(seconds)
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{seconds:.0f}s"


def pending_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """List the approvals waiting for an operator (PENDING), oldest request first, with
    the time each has left before it times out. Decide one with `meshstore approve ID`
    or `meshstore deny ID`."""
    import time

    from meshstore.approvals import pending
    from meshstore.http.entity_json import pending_dict

    waiting = [pending_dict(p) for p in pending(_list_entities(store, 0, deadline), time.time())]
    if json_out:
        print_json({"count": len(waiting), "pending": waiting})
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{len(waiting)} pending approvals", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("ID", "REQUESTED (UTC)", "LEFT", "THREAT", "TASK"):
        table.add_column(column, overflow="fold", justify="right" if column == "LEFT" else "left")
    for p in waiting:
        requested = p["requested_at"].replace("T", " ").removesuffix("Z") if p["requested_at"] else "-"
        table.add_row(p["id"], requested, _left_text(p["time_left_s"]), p["threat"] or "-", p["task"] or "-")
    out = console()
    out.print(table)
    if waiting:
        out.print(f"decide with `meshstore approve ID` or `meshstore deny ID` (--store {store})", markup=False)


def get_cmd(
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="The entity's id.")],
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Show one entity: its type, times, components (decoded) and their versions."""
    from meshstore.pb import store_pb2, store_pb2_grpc

    with channel(store) as ch, rpc_errors(store, "GetEntity", deadline):
        entity = store_pb2_grpc.EntityStoreServiceStub(ch).GetEntity(
            store_pb2.GetEntityRequest(id=entity_id), timeout=deadline, wait_for_ready=False)
    _show_entity(entity, json_out)


def _read_entity(source: str) -> Any:
    """The entity in the JSON text of ``source`` (a file, ``-`` for stdin), as
    ``get --json`` prints it; CliError (usage) when it is not one."""
    import pathlib
    import sys

    from google.protobuf import json_format

    from meshstore.pb import entity_pb2

    try:
        text = sys.stdin.read() if source == "-" else pathlib.Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {source}: {exc}", EXIT_USAGE) from None
    where = "stdin" if source == "-" else source
    try:
        entity = json_format.Parse(text, entity_pb2.Entity())
    except json_format.ParseError as exc:
        raise CliError(f"{where} is not an entity in JSON (as `meshstore get --json` prints it): {exc}",
                       EXIT_USAGE) from None
    if not entity.id:
        raise CliError(f"{where}: the entity has no \"id\"", EXIT_USAGE)
    return entity


def put_cmd(
    source: Annotated[str, typer.Argument(metavar="FILE", help="The entity as JSON, as `meshstore get --json` "
                                                               "prints it; - (the default) reads stdin.")] = "-",
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Write an entity (created if new, else updated key by key). Components carry their
    "@type"; "versions", when given (as `get --json` prints them), are the ones the
    change was made against: a key changed since on the store is kept (stale)."""
    from meshstore.pb import store_pb2, store_pb2_grpc

    entity = _read_entity(source)
    with channel(store) as ch, rpc_errors(store, "PublishEntities", deadline):
        summary = store_pb2_grpc.EntityStoreServiceStub(ch).PublishEntities(
            iter([store_pb2.PublishRequest(entity=entity)]), timeout=deadline, wait_for_ready=False)
    if summary.rejected:
        raise CliError(f"the store refused entity {entity.id!r}: {'; '.join(summary.errors) or 'invalid'}", EXIT_USAGE)
    if summary.stale:
        raise CliError(f"put {entity.id}: every key is stale (the store holds newer values: get it again)")
    outcome = "applied" if summary.applied else "unchanged"
    if json_out:
        print_json({"id": entity.id, "outcome": outcome})
    else:
        console().print(f"put {entity.id}: {outcome}", markup=False)


def delete_cmd(
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="The entity's id.")],
    store: StoreOpt = DEFAULT_ADDR,
    json_out: JsonOpt = False,
    deadline: DeadlineOpt = 5.0,
) -> None:
    """Delete an entity (every component; exit 3 if it does not exist)."""
    from meshstore.pb import store_pb2, store_pb2_grpc

    with channel(store) as ch, rpc_errors(store, "DeleteEntity", deadline):
        store_pb2_grpc.EntityStoreServiceStub(ch).DeleteEntity(
            store_pb2.DeleteEntityRequest(id=entity_id), timeout=deadline, wait_for_ready=False)
    if json_out:
        print_json({"id": entity_id, "deleted": True})
    else:
        console().print(f"deleted {entity_id}", markup=False)


def _decide(action: str, entity_id: str, store: str, json_out: bool, deadline: float) -> None:
    from meshstore.pb import store_pb2, store_pb2_grpc

    with channel(store) as ch, rpc_errors(store, f"{action}Action", deadline):
        stub = store_pb2_grpc.EntityStoreServiceStub(ch)
        if action == "Approve":
            entity = stub.ApproveAction(store_pb2.ApproveActionRequest(entity_id=entity_id),
                                        timeout=deadline, wait_for_ready=False)
        else:
            entity = stub.DenyAction(store_pb2.DenyActionRequest(entity_id=entity_id),
                                     timeout=deadline, wait_for_ready=False)
    if json_out:
        print_json(entity_dict(entity))
    else:
        verb = "approved" if action == "Approve" else "denied"
        console().print(f"{verb} {entity_id}", markup=False)


def _decision_cmd(action: str, verb: str, outcome: str) -> Callable[..., None]:
    """``meshstore approve`` / ``deny``: the same options, one action each."""
    EntityArg = Annotated[str, typer.Argument(metavar="ID", help=f"The entity whose pending approval to {verb}.")]

    def command(entity_id: EntityArg, store: StoreOpt = DEFAULT_ADDR, json_out: JsonOpt = False,
                deadline: DeadlineOpt = 5.0) -> None:
        _decide(action, entity_id, store, json_out, deadline)

    command.__name__ = f"{verb}_cmd"
    command.__doc__ = (f'{action} the entity\'s pending action (its "approval" component goes PENDING -> {outcome}).\n'
                       f"    Fails if nothing is pending.")
    return command


approve_cmd = _decision_cmd("Approve", "approve", "APPROVED")
deny_cmd = _decision_cmd("Deny", "deny", "DENIED")


def watch_cmd(
    type_: KindOpt = None,
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
    out = None if json_out else console()
    seen = 0
    with channel(store) as ch:
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
            with rpc_errors(store, "WatchEntities", timeout):
                try:
                    for ev in call:
                        if ev.type == store_pb2.EVENT_TYPE_HEARTBEAT:
                            continue
                        _show_event(ev, out)
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


def register(app: typer.Typer) -> None:
    """Adds list, get, put, delete, watch, approve, deny and pending to ``app``."""
    app.command("list")(list_cmd)
    app.command("pending")(pending_cmd)
    app.command("get")(get_cmd)
    app.command("put")(put_cmd)
    app.command("delete")(delete_cmd)
    app.command("approve")(approve_cmd)
    app.command("deny")(deny_cmd)
    app.command("watch")(watch_cmd)
