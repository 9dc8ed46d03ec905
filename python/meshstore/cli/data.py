"""The data dir commands: offline tools on a node's data dir (the DIR of ``serve
--data-dir``; its state is the SQLite file ``DIR/meshstore.db``).

    meshstore backup DIR FILE               a consistent copy of DIR's database (also while a node runs on it)
    meshstore export DIR [--out FILE]       every entity as JSON lines (also while a node runs on it)
    meshstore import FILE DIR               merge an export into DIR (not while a node runs on it)

**Restore** a backup by putting FILE as ``NEWDIR/meshstore.db`` (NEWDIR empty or new) and
starting the node on NEWDIR (``meshstore serve --data-dir NEWDIR``). It keeps the node id.
A node restored from a backup always starts a new incarnation (copies are never marked
cleanly closed): the original may have issued dots after the copy, and a restored node
must never issue one of them again.

**Export** writes one JSON line per entity after a header line::

    {"meshstore_export": 1, "node_id": N, "seq": S, "entities": COUNT, "context": [[node, incarnation, counter], ...]}
    {"id": ID, "seq": SEQ, "alive": BOOL, "state": BASE64, "entity": {...} | null}

``state`` is the entity's replica state (``entity.v1.Entity`` replica encoding: siblings,
causal context, delete record), the only field ``import`` reads; ``entity`` is the user
view as JSON (``json_format.MessageToDict``, components unpacked where their type is
known; null if it cannot be rendered), for people and scripts. Only committed changes
are exported: a node running with ``--durability interval`` may hold newer ones.

**Import** checks the whole file before it writes anything (JSON, header, base64, every
state an entity with an id and a causal context, the entity count); bad input names its
line and leaves DIR untouched. Then it opens DIR as a store (refused while a node holds
it), merges every state, adopts the header's context summary only if every state merged
(so the store never claims writes it lacks), and closes DIR cleanly. A new DIR takes the
export's node id unless ``--node-id`` says otherwise.

Exit codes: 0 ok, 1 the data dir could not be read or written (or a state was
rejected), 2 bad usage or input.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Any

import typer

from meshstore.cli.common import EXIT_ERROR, EXIT_USAGE, CliError, JsonOpt, console, print_json

__all__ = ["EXPORT_VERSION", "STORAGE_KEYS", "register", "storage_summary", "storage_table"]

#: The ``meshstore_export`` value of the header this version writes and reads.
EXPORT_VERSION = 1
DB_FILE = "meshstore.db"
#: Exports of at least this many entities show a progress bar (on a terminal).
PROGRESS_FROM = 10_000


class Format(str, enum.Enum):
    jsonl = "jsonl"


DirArg = Annotated[str, typer.Argument(metavar="DIR", help="The node's data dir (as `serve --data-dir`).")]


# ---- helpers ----------------------------------------------------------------------------

def _storage_error() -> type[Exception]:
    from meshstore.errors import StorageError

    return StorageError


def _read(data_dir: str) -> tuple[dict[str, Any], bool, list[tuple[str, int, int]], list[tuple[bytes, int]]]:
    """One consistent read of a data dir (no lock: works while a node runs on it)."""
    from meshstore._core import read_data_dir

    if not os.path.isdir(data_dir):
        raise CliError(f"{data_dir} is not a meshstore data dir (no such directory)")
    try:
        return read_data_dir(data_dir)
    except _storage_error() as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read {data_dir}: {exc.strerror or exc}") from None


def _decode(state: bytes) -> Any:
    from meshstore.pb import entity_pb2

    return entity_pb2.Entity.FromString(state)


def _alive(entity: Any) -> bool:
    """As the store sees it: an entity is alive while any key (the ``@entity`` register
    included) holds a value."""
    return bool(entity.components) or "@entity" in entity.versions


def _user_view(entity: Any) -> dict[str, Any] | None:
    """The entity as readers see it (no siblings, context or delete record), as JSON."""
    from meshstore.cli.entities import entity_dict

    try:
        view = type(entity)()
        view.CopyFrom(entity)
        for field in ("siblings", "context", "deleted_version"):
            view.ClearField(field)
        out = entity_dict(view)
        if "versions" in out:  # map order varies from process to process: keep exports reproducible
            out["versions"] = dict(sorted(out["versions"].items()))
        return out
    except Exception:  # a component that cannot be rendered: the state still round-trips
        return None


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise CliError(f"{path} exists; not overwriting it")


@contextlib.contextmanager
def _new_file(path: str, suffix: str, name: str | None = None) -> Iterator[str]:
    """A staging path (``name`` in a new dir next to ``path``): what is written there
    becomes ``path`` (never overwriting one that appeared meanwhile) only if the block
    succeeds."""
    dest = os.path.abspath(path)
    _refuse_existing(path)
    parent = os.path.dirname(dest)
    try:
        tmp = tempfile.mkdtemp(prefix=".meshstore-", suffix=suffix, dir=parent)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        staged = os.path.join(tmp, name or os.path.basename(dest))
        yield staged
        try:
            os.link(staged, dest)  # fails if dest exists
        except FileExistsError:
            raise CliError(f"{path} exists; not overwriting it") from None
        except OSError:  # a file system without hard links
            _refuse_existing(path)
            os.rename(staged, dest)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- backup -----------------------------------------------------------------------------

def backup_cmd(
    data_dir: DirArg,
    file: Annotated[str, typer.Argument(metavar="FILE", help="The copy to write (must not exist).")],
    json_out: JsonOpt = False,
) -> None:
    """Copy a data dir's database to FILE, consistently, even while a node runs on it.

    Restore: put FILE as NEWDIR/meshstore.db and run `meshstore serve --data-dir NEWDIR`.
    The restored node starts a new incarnation (it never reuses a dot the original may
    have issued after the copy)."""
    from meshstore._core import backup_data_dir

    if not os.path.isfile(os.path.join(data_dir, DB_FILE)):
        raise CliError(f"{data_dir} is not a meshstore data dir (no {DB_FILE})")
    with _new_file(file, ".backup", DB_FILE) as staged:
        try:
            pages = backup_data_dir(data_dir, staged)
        except _storage_error() as exc:
            raise CliError(str(exc)) from None
        # What the copy holds, read from the copy itself (the source moves on).
        meta, _, _, states = _read(os.path.dirname(staged))
        size = os.path.getsize(staged)
    alive = sum(_alive(_decode(state)) for state, _ in states)
    summary = {"data_dir": data_dir, "file": file, "node_id": meta["node_id"], "entities": len(states),
               "alive": alive, "seq": meta["seq"], "bytes": size, "pages": pages}
    if json_out:
        print_json(summary)
        return
    print(f"backed up {data_dir} to {file}: {len(states):,} entities ({alive:,} alive), seq {meta['seq']:,}, "
          f"{size:,} bytes (node {meta['node_id']}; restored, it starts a new incarnation)")
    print(f"restore: put {file} as NEWDIR/{DB_FILE}, then `meshstore serve --data-dir NEWDIR`")


# ---- export -----------------------------------------------------------------------------

def export_cmd(
    data_dir: DirArg,
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="FILE",
                                            help="Write here (must not exist) instead of stdout.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", case_sensitive=False,
                                        help="jsonl: a header line, then one JSON object per entity.")] = Format.jsonl,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")] = False,
) -> None:
    """Export every entity of a data dir (JSON lines), even while a node runs on it.

    The first line is a header {"meshstore_export": 1, "node_id", "seq", "entities",
    "context"}; then one line per entity {"id", "seq", "alive", "state" (base64 replica
    state, what `meshstore import` reads), "entity" (the user view as JSON, or null)}."""
    meta, _, context, states = _read(data_dir)
    states = sorted(states, key=lambda s: s[1])
    header = {"meshstore_export": EXPORT_VERSION, "node_id": meta["node_id"], "seq": meta["seq"],
              "entities": len(states), "context": [[node, inc, counter] for node, inc, counter in context]}
    alive = 0
    with contextlib.ExitStack() as stack:
        if out is None:
            sink: IO[str] = sys.stdout
        else:
            staged = stack.enter_context(_new_file(out, ".export"))
            sink = stack.enter_context(open(staged, "w", encoding="utf-8"))
        progress = None
        if not quiet and len(states) >= PROGRESS_FROM and sys.stderr.isatty():
            from rich.progress import Progress

            progress = stack.enter_context(Progress(console=console(stderr=True), transient=True))
            task = progress.add_task("exporting", total=len(states))
        sink.write(json.dumps(header, ensure_ascii=False) + "\n")
        for n, (state, seq) in enumerate(states, 1):
            entity = _decode(state)
            is_alive = _alive(entity)
            alive += is_alive
            sink.write(json.dumps({"id": entity.id, "seq": seq, "alive": is_alive,
                                   "state": base64.b64encode(state).decode("ascii"),
                                   "entity": _user_view(entity)}, ensure_ascii=False) + "\n")
            if progress is not None and n % 1000 == 0:
                progress.update(task, completed=n)
        sink.flush()
    if not quiet:
        where = out if out is not None else "stdout"
        sys.stderr.write(f"exported {len(states):,} entities ({alive:,} alive, {len(states) - alive:,} deleted) "
                         f"of node {meta['node_id']} at seq {meta['seq']:,} to {where}\n")


# ---- import -----------------------------------------------------------------------------

class BadInput(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")


def _json_line(line_no: int, text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise BadInput(line_no, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadInput(line_no, f"expected {what} (a JSON object), got {type(obj).__name__}")
    return obj


def _is_int(value: Any, bits: int = 64) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**bits


def _header(text: str) -> dict[str, Any]:
    header = _json_line(1, text, "the export header")
    version = header.get("meshstore_export")
    if version is None:
        raise BadInput(1, "not a meshstore export header (no \"meshstore_export\")")
    if version != EXPORT_VERSION:
        raise BadInput(1, f"export format {version!r} is not one this meshstore reads ({EXPORT_VERSION})")
    if not isinstance(header.get("node_id"), str) or not header["node_id"]:
        raise BadInput(1, "header \"node_id\" must be a non-empty string")
    if not _is_int(header.get("seq")):
        raise BadInput(1, "header \"seq\" must be a non-negative integer")
    if "entities" in header and not _is_int(header["entities"]):
        raise BadInput(1, "header \"entities\" must be a non-negative integer")
    context = header.get("context")
    if not isinstance(context, list):
        raise BadInput(1, "header \"context\" must be a list of [node, incarnation, counter]")
    for entry in context:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                and _is_int(entry[1]) and _is_int(entry[2])):
            raise BadInput(1, f"header \"context\" entry {json.dumps(entry)} is not [node, incarnation, counter]")
    return header


def _entity_line(line_no: int, text: str) -> tuple[str, bytes]:
    from google.protobuf.message import DecodeError

    obj = _json_line(line_no, text, "an entity")
    entity_id, encoded = obj.get("id"), obj.get("state")
    if not isinstance(entity_id, str) or not entity_id:
        raise BadInput(line_no, "\"id\" must be a non-empty string")
    if not isinstance(encoded, str):
        raise BadInput(line_no, f"entity {entity_id!r}: \"state\" must be a base64 string")
    if "seq" in obj and not _is_int(obj["seq"]):
        raise BadInput(line_no, f"entity {entity_id!r}: \"seq\" must be a non-negative integer")
    try:
        state = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(line_no, f"entity {entity_id!r}: \"state\" is not valid base64 ({exc})") from None
    try:
        entity = _decode(state)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise BadInput(line_no, f"entity {entity_id!r}: \"state\" is not an entity.v1.Entity ({exc})") from None
    if not entity.id:
        raise BadInput(line_no, f"entity {entity_id!r}: \"state\" is not an entity.v1.Entity with an id")
    if entity.id != entity_id:
        raise BadInput(line_no, f"\"id\" {entity_id!r} does not match the state's id {entity.id!r}")
    if not entity.context:
        raise BadInput(line_no, f"entity {entity_id!r}: \"state\" is not a replica state (no causal context)")
    return entity_id, state


def _parse_export(stream: IO[str]) -> tuple[dict[str, Any], list[tuple[int, bytes]]]:
    """The whole file, checked: (header, [(line number, state bytes)]); BadInput on the
    first bad line."""
    header: dict[str, Any] | None = None
    states: list[tuple[int, bytes]] = []
    first_seen: dict[str, int] = {}
    line_no = 0
    try:
        for line_no, raw in enumerate(stream, 1):  # noqa: B007 - line_no used after the loop
            text = raw.strip()
            if header is None:
                if not text:
                    raise BadInput(line_no, "expected the export header, got an empty line")
                header = _header(text)
                continue
            if not text:
                continue
            entity_id, state = _entity_line(line_no, text)
            if entity_id in first_seen:
                raise BadInput(line_no, f"entity {entity_id!r} again (first at line {first_seen[entity_id]})")
            first_seen[entity_id] = line_no
            states.append((line_no, state))
    except UnicodeDecodeError as exc:
        raise BadInput(line_no + 1, f"not UTF-8 text ({exc.reason})") from None
    if header is None:
        raise BadInput(1, "empty file: expected the export header")
    expected = header.get("entities")
    if expected is not None and expected != len(states):
        raise BadInput(line_no + 1, f"the header announces {expected:,} entities, the file holds {len(states):,} "
                                    "(truncated?)")
    return header, states


def import_cmd(
    file: Annotated[str, typer.Argument(metavar="FILE", help="An export of `meshstore export` (- for stdin).")],
    data_dir: DirArg,
    node_id: Annotated[str | None, typer.Option(
        "--node-id", help="Node id of a new DIR (default: the export's). An existing DIR keeps its own.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Merge an export into a data dir (created if needed; not while a node runs on it).

    The whole file is checked first: on bad input nothing is written and the error names
    the line. Then every state is merged; the export's context summary is adopted only if
    every state merged. Prints how many states merged, were unchanged, were rejected."""
    from meshstore.cli.common import setup_logs

    setup_logs("warning")
    try:
        with contextlib.ExitStack() as stack:
            stream = sys.stdin if file == "-" else stack.enter_context(open(file, encoding="utf-8"))
            header, states = _parse_export(stream)
    except BadInput as exc:
        raise CliError(f"bad export {file}: {exc}; nothing was imported", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror or exc}") from None

    from meshstore import Store
    from meshstore._core import stored_node_id
    from meshstore.errors import MeshstoreError

    StorageError = _storage_error()
    try:
        stored = stored_node_id(data_dir) if os.path.isdir(data_dir) else None
        store = Store(path=data_dir, node_id=node_id or stored or header["node_id"], durability="interval",
                      commit_interval=0.2)
    except StorageError as exc:
        hint = " (stop the node first)" if "in use" in str(exc) else ""
        raise CliError(f"cannot import into {data_dir}: {exc}{hint}") from None
    merged = unchanged = rejected = 0
    first_rejected = ""
    adopted: bool | None = None
    try:
        for line_no, state in states:
            try:
                changed = store.merge(state)
            except StorageError:
                raise
            except MeshstoreError as exc:
                rejected += 1
                first_rejected = first_rejected or f"line {line_no}: {exc}"
                continue
            merged += changed
            unchanged += not changed
        if not rejected:
            try:
                store.adopt_context([tuple(entry) for entry in header["context"]])
                adopted = True
            except (MeshstoreError, ValueError, TypeError) as exc:
                adopted = False
                first_rejected = f"the header's context: {exc}"
        store.close()
    except StorageError as exc:
        with contextlib.suppress(Exception):
            store.close()
        raise CliError(f"import into {data_dir} failed after {merged + unchanged:,} of {len(states):,} "
                       f"states: {exc}") from None
    summary = {"file": file, "data_dir": data_dir, "node_id": store.node_id, "states": len(states),
               "merged": merged, "unchanged": unchanged, "rejected": rejected, "context_adopted": bool(adopted)}
    if json_out:
        print_json(summary)
    else:
        context = ("context adopted" if adopted else
                   "context NOT adopted (some states were rejected)" if rejected else "context NOT adopted")
        print(f"imported {file} into {data_dir} (node {store.node_id}): {merged:,} merged, {unchanged:,} unchanged, "
              f"{rejected:,} rejected; {context}")
    if rejected:
        raise CliError(f"{rejected:,} of {len(states):,} states rejected (first: {first_rejected}); "
                       "the others were imported", EXIT_ERROR)
    if adopted is False:
        raise CliError(f"the states were imported but not {first_rejected}", EXIT_ERROR)


# ---- stats ------------------------------------------------------------------------------

#: The GetStats values ``storage_table`` shows (``stats`` leaves them out of its main table).
STORAGE_KEYS = frozenset({"committed_seq", "commits", "last_commit_age_s", "commit_ms_p50", "commit_ms_p99",
                          "storage_bytes", "max_pending", "pending_changes", "loss_window_ms"})


def storage_table(values: dict[str, int | float]) -> Any:
    """A rich table of ``storage_summary``."""
    from rich.table import Table

    table = Table(title="storage", title_justify="left")
    table.add_column("STORAGE")
    table.add_column("VALUE")
    for label, text in storage_summary(values):
        table.add_row(label, text)
    return table


def storage_summary(values: dict[str, int | float]) -> list[tuple[str, str]]:
    """The storage figures of a node's GetStats values, as (label, text) rows for people
    (empty if the values hold none). Durability is read from them: no commit figures
    means in memory, a loss window means ``interval``."""
    if "commits" not in values and "storage_bytes" not in values:
        return [("durability", "memory (nothing on disk: the state is gone when the node stops)")]
    window = float(values.get("loss_window_ms", 0) or 0)
    rows = [("durability", f"interval (a crash loses at most the last {window:,.0f} ms)" if window > 0
             else "commit (a write is acknowledged once on disk)")]
    if "storage_bytes" in values:
        rows.append(("on disk", _bytes(float(values["storage_bytes"]))))
    if "commit_ms_p50" in values or "commit_ms_p99" in values:
        rows.append(("commit time", f"p50 {float(values.get('commit_ms_p50', 0)):.2f} ms, "
                                    f"p99 {float(values.get('commit_ms_p99', 0)):.2f} ms"))
    if "commits" in values:
        age = values.get("last_commit_age_s")
        last = f", last {float(age):.1f} s ago" if age is not None else ""
        rows.append(("commits", f"{int(values['commits']):,}{last}"))
    if "committed_seq" in values:
        rows.append(("committed seq", f"{int(values['committed_seq']):,} of {int(values.get('seq', 0)):,}"))
    if "pending_changes" in values:
        limit = values.get("max_pending")
        bound = f" (writes wait beyond {int(limit):,})" if limit is not None else ""
        rows.append(("pending changes", f"{int(values['pending_changes']):,}{bound}"))
    return rows


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"  # pragma: no cover


def register(app: typer.Typer) -> None:
    """Adds backup, export and import to ``app``."""
    app.command("backup")(backup_cmd)
    app.command("export")(export_cmd)
    app.command("import")(import_cmd)
