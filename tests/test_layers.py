"""The package's layering, checked on its source: no module imports a layer above it,
and no modules import each other in a circle.

Layers, bottom to top (python/meshstore/):

    store     store, storage, options, errors, components, validate, watcher, eventloop, logs,
              approvals, security, pb/
    grpc      grpc/   (server, client, status)      } siblings: the mesh and http
    mesh      mesh/   (relay, receiver, budget,     } may use grpc.status, the mesh
                       protocol)                    } also grpc.client; none
    http      http/   (server, api, entity_json)    } imports another
    node      node    (composes store + grpc server + mesh + http), metrics
    services  services/
    demo      demo/   (composes nodes and services)
    cli       cli/    (the command line over all of it)

A module may import its own layer and any layer below. Every import counts, wherever it
is written (module level, inside a function, under TYPE_CHECKING). A new module must be
placed in a layer here, or this test fails asking for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "meshstore"
SOURCE = Path(__file__).resolve().parent.parent / "python" / PACKAGE

#: (layer, rank, the modules it holds: a name and everything under it). Equal ranks are
#: siblings: neither imports the other unless ALLOWED says so.
LAYERS: list[tuple[str, int, tuple[str, ...]]] = [
    ("store", 0, ("meshstore", "meshstore._core", "meshstore.store", "meshstore.options", "meshstore.errors",
                  "meshstore.components", "meshstore.validate", "meshstore.watcher", "meshstore.eventloop",
                  "meshstore.logs", "meshstore.pb", "meshstore.storage", "meshstore.approvals",
                  "meshstore.security")),
    ("grpc", 1, ("meshstore.grpc",)),
    ("mesh", 1, ("meshstore.mesh",)),
    ("http", 1, ("meshstore.http",)),
    ("node", 2, ("meshstore.node", "meshstore.metrics")),
    ("services", 3, ("meshstore.services",)),
    ("demo", 4, ("meshstore.demo",)),
    ("cli", 5, ("meshstore.cli",)),
]
#: Imports across siblings that are allowed: (importing layer, imported module).
ALLOWED = {("mesh", "meshstore.grpc.status"), ("http", "meshstore.grpc.status"),
           # The relay dials its peers as every client dials a store (TLS, tokens).
           ("mesh", "meshstore.grpc.client")}
#: Names whose whole subtree is one layer ("meshstore" itself is only the package's
#: __init__: its modules are placed one by one).
_SUBTREE_EXEMPT = {"meshstore"}


# ---- the checker ------------------------------------------------------------------------


def modules_of(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module under ``root`` (a package directory) by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    path = modules.get(name)
    return path is not None and path.name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str = PACKAGE) -> list[tuple[str, int]]:
    """(imported module, line) for every import of the package's modules in ``path``.
    ``from a import b`` is a.b when that is a module, else a."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name if _is_package(name, modules) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                out.append((target, node.lineno))
    return out


def layer_of(module: str, layers: list[tuple[str, int, tuple[str, ...]]] = LAYERS) -> tuple[str, int] | None:
    """The (layer, rank) holding ``module``: the longest matching name wins."""
    best = None
    for layer, rank, names in layers:
        for prefix in names:
            if module == prefix or (prefix not in _SUBTREE_EXEMPT and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), layer, rank)
    return None if best is None else (best[1], best[2])


def check(root: Path, package: str = PACKAGE) -> tuple[list[str], list[str], list[list[str]]]:
    """(modules in no layer, layer violations, import cycles) of the package at ``root``."""
    modules = modules_of(root, package)
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    violations = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        own = layer_of(name)
        for target, line in imports_of(name, path, modules, package):
            if target in modules and target != name:
                graph[name].add(target)
            theirs = layer_of(target)
            if own is None or theirs is None or own[0] == theirs[0]:
                continue
            if theirs[1] < own[1] or (own[0], target) in ALLOWED:
                continue
            where = "beside" if theirs[1] == own[1] else "above"
            violations.append(f"{name} ({own[0]} layer) imports {target} ({theirs[0]} layer, {where} it) "
                              f"at {path.relative_to(root.parent)}:{line}")
    return unplaced, violations, cycles(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one cycle (a closed path) per strongly connected
    component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_closed_path(graph, set(c)) for c in components)


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through the component's first module: a -> b -> ... -> a."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)  # unreachable for a strongly connected component


# ---- the package --------------------------------------------------------------------------


def test_the_source_tree_is_found() -> None:
    modules = modules_of(SOURCE)
    assert {"meshstore.store", "meshstore.node", "meshstore.grpc.server", "meshstore.mesh.relay",
            "meshstore.cli"} <= set(modules), sorted(modules)


def test_every_module_is_in_a_layer() -> None:
    unplaced, _, _ = check(SOURCE)
    assert not unplaced, f"modules in no layer (place them in tests/test_layers.py LAYERS): {unplaced}"


def test_no_module_imports_a_layer_above_it() -> None:
    _, violations, _ = check(SOURCE)
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    _, _, found = check(SOURCE)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_store_layer_does_not_load_grpc_or_the_mesh() -> None:
    """``import meshstore`` (the public API) stays the store layer."""
    modules = modules_of(SOURCE)
    top = [t for t, _ in imports_of("meshstore", modules["meshstore"], modules)]
    assert all(layer_of(t) == ("store", 0) for t in top), top


# ---- the checker catches what it should ----------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            init = pkg / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        path.write_text(text)
    return pkg


def test_the_old_server_mesh_circle_is_caught(tmp_path: Path) -> None:
    # The layout before this check: server.py imported the mesh, and mesh.py imported
    # server.py back (inside a function, which counts too).
    pkg = _package(tmp_path, {
        "store.py": "",
        "server.py": "from meshstore.mesh import MeshServicer, add_mesh_service\nfrom meshstore.store import Store\n",
        "mesh.py": "from meshstore.store import Store\n\ndef _add():\n    from meshstore import server as s\n",
    })
    unplaced, _, found = check(pkg)
    assert unplaced == ["meshstore.server"]  # in no layer of the new layout
    assert found == [["meshstore.mesh", "meshstore.server", "meshstore.mesh"]]


def test_an_import_of_a_higher_or_sibling_layer_is_named(tmp_path: Path) -> None:
    pkg = _package(tmp_path, {
        "store.py": "import meshstore.node\n",
        "node.py": "from meshstore.store import Store\n",
        "grpc/server.py": "from ..mesh import receiver\nfrom meshstore.grpc import status\n",
        "grpc/status.py": "",
        "mesh/receiver.py": "from meshstore.grpc.status import status_for\n",
        "mesh/relay.py": "def f():\n    from meshstore.grpc.server import GrpcServer\n",
        "services/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from meshstore.cli import app\n",
        "cli/__init__.py": "from meshstore.demo import pipeline\nfrom meshstore.services import x\n",
        "demo/pipeline.py": "from meshstore.node import Node\n",
    })
    unplaced, violations, found = check(pkg)
    assert unplaced == []
    text = "\n".join(violations)
    assert "meshstore.store (store layer) imports meshstore.node (node layer, above it)" in text
    assert "meshstore.grpc.server (grpc layer) imports meshstore.mesh.receiver (mesh layer, beside it)" in text
    assert "meshstore.mesh.relay (mesh layer) imports meshstore.grpc.server (grpc layer, beside it)" in text
    assert "meshstore.services.x (services layer) imports meshstore.cli (cli layer, above it)" in text
    assert "grpc/server.py:1" in text and "mesh/relay.py:2" in text
    assert len(violations) == 4, violations  # mesh -> grpc.status is allowed; cli and demo look down
    assert found == [["meshstore.cli", "meshstore.services.x", "meshstore.cli"],
                     ["meshstore.node", "meshstore.store", "meshstore.node"]]


@pytest.mark.parametrize(("module", "layer"), [
    ("meshstore", "store"), ("meshstore.pb.entity_pb2", "store"), ("meshstore._core", "store"),
    ("meshstore.grpc.client", "grpc"), ("meshstore.mesh.budget", "mesh"), ("meshstore.node", "node"),
    ("meshstore.http.server", "http"), ("meshstore.approvals", "store"),
    ("meshstore.services.fusion", "services"), ("meshstore.demo.pipeline", "demo"), ("meshstore.cli.node", "cli"),
    ("meshstore.nodes", None), ("meshstore.server", None),
])
def test_layer_of(module: str, layer: str | None) -> None:
    found = layer_of(module)
    assert (found[0] if found else None) == layer
