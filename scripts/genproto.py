"""Generates meshstore.pb (Python modules and gRPC stubs) from proto/.

Usage: python scripts/genproto.py [OUT_DIR]   (default: python/meshstore/pb)

The modules land flat in OUT_DIR (entity_pb2.py, store_pb2.py, ...) and import each
other as `meshstore.pb.X`, so `from meshstore.pb import entity_pb2` works.
"""

import pathlib
import re
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for generated in sorted(pathlib.Path(tmp).rglob("*_pb2*.py*")):
            text = re.sub(r"^from (\w+)\.v1 import (\w+_pb2)",
                          r"from meshstore.pb import \2", generated.read_text(), flags=re.M)
            if generated.name.endswith("_grpc.py") and "class " not in text:
                continue  # a proto without services
            (out_dir / generated.name).write_text(text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "python/meshstore/pb")
