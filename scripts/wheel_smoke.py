"""Smoke test of an installed meshstore wheel (`make wheel-smoke` runs it with the
python of a fresh virtualenv that has only the wheel and its dependencies).

Checks that the package comes from that environment, not from a source tree, then uses
the API (put, get, watch) and the installed `meshstore` command (--version, serve, get).
Exits non-zero with the reason on the first failure.
"""

import pathlib
import re
import subprocess
import sys
import tempfile

import meshstore
from meshstore import Store
from meshstore.components import POSITION, make_entity, unpack
from meshstore.pb import entity_pb2 as pb

PREFIX = pathlib.Path(sys.prefix).resolve()
BIN = pathlib.Path(sys.executable).parent


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"wheel smoke: {what}")


def api() -> None:
    check(pathlib.Path(meshstore.__file__).resolve().is_relative_to(PREFIX),
          f"meshstore imported from {meshstore.__file__}, not from {PREFIX}")
    with Store(node_id="smoke") as store:
        watcher = store.watch(type_filter=pb.ENTITY_TYPE_TRACK)
        store.put(make_entity("t1", pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=1.5, lon=2.5)))
        position = unpack(store.get("t1"), POSITION, pb.PositionComponent)
        check(position is not None and position.lat == 1.5, f"get returned {position}")
        event = watcher.get(timeout=5)
        check(event is not None and event.entity_id == "t1", f"watch returned {event}")
        watcher.close()


def cli() -> None:
    version = subprocess.run([BIN / "meshstore", "--version"], capture_output=True, text=True, timeout=60)
    check(version.stdout.strip() == f"meshstore {meshstore.__version__}", f"--version said {version.stdout!r}")
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen([BIN / "meshstore", "serve", "--port", "0", "--data-dir", data],
                                  stderr=subprocess.PIPE, text=True)
        try:
            line = server.stderr.readline()
            found = re.search(r"listening address=(\S+)", line)
            check(found is not None, f"serve's first line: {line!r}")
            missing = subprocess.run([BIN / "meshstore", "get", "nope", "--store", found.group(1)],
                                     capture_output=True, text=True, timeout=60)
            check(missing.returncode == 3, f"get of a missing entity exited {missing.returncode}: {missing.stderr}")
        finally:
            server.terminate()
            server.wait(timeout=30)


api()
cli()
print(f"wheel smoke: meshstore {meshstore.__version__} from {PREFIX}: API and CLI ok")
