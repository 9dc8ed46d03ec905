"""python/meshstore/pb is generated from proto/: regenerating it must change nothing.

Fails when a .proto was edited without ``make proto`` (or the generated files were
edited by hand, or a generated file is missing or left over).
"""

from __future__ import annotations

import difflib
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PB_DIR = ROOT / "python" / "meshstore" / "pb"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _genproto():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) generates the code")
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "scripts" / "genproto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated_files(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())
            if p.is_file() and p.name.endswith(GENERATED)}


def test_generated_code_matches_the_protos(tmp_path: pathlib.Path) -> None:
    _genproto().generate(tmp_path)
    fresh = _generated_files(tmp_path)
    committed = _generated_files(PB_DIR)
    assert fresh, "genproto generated nothing"

    assert sorted(committed) == sorted(fresh), (
        f"python/meshstore/pb is out of date with proto/: missing {sorted(set(fresh) - set(committed))}, "
        f"left over {sorted(set(committed) - set(fresh))}; run `make proto`")
    stale = [name for name in fresh if fresh[name] != committed[name]]
    if stale:
        diff = "".join(difflib.unified_diff(committed[stale[0]].splitlines(True), fresh[stale[0]].splitlines(True),
                                            f"pb/{stale[0]} (committed)", f"pb/{stale[0]} (from proto/)", n=1))
        pytest.fail(f"python/meshstore/pb is out of date with proto/ ({', '.join(stale)}); run `make proto`\n"
                    f"{diff[:4000]}")


def test_every_proto_has_its_module() -> None:
    protos = sorted((ROOT / "proto").rglob("*.proto"))
    assert protos
    for proto in protos:
        assert (PB_DIR / f"{proto.stem}_pb2.py").is_file(), f"{proto.relative_to(ROOT)} has no generated module"
