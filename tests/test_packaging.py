"""What the package promises its users beyond its behaviour: types a checker can use
(the Rust extension's stub agrees with the module, py.typed ships, a typed example
passes mypy --strict and a wrong argument type is flagged), a version, and metadata with
dependency ranges whose pinned development versions lie inside them.

The wheel itself (manylinux2014, abi3) is built and installed into a fresh virtualenv by
`make wheel-smoke` (in .ci/run), not here: its Rust build takes minutes.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

import meshstore

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(*args: str, cache: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_core_stub_matches_the_built_extension(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy.stubtest", "meshstore._core"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_is_marked_typed() -> None:
    package = pathlib.Path(meshstore.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_core.pyi").is_file()


def test_typed_example_passes_mypy_strict(mypy_cache: pathlib.Path) -> None:
    proc = mypy("examples/typed_usage.py", cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_typed_example_runs() -> None:
    proc = subprocess.run([sys.executable, "examples/typed_usage.py"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "latitude 51.5" in proc.stdout and "entities 0" in proc.stdout


def test_mypy_flags_wrong_argument_types(mypy_cache: pathlib.Path, tmp_path: pathlib.Path) -> None:
    snippet = tmp_path / "wrong.py"
    snippet.write_text("from meshstore import Store\n\n"
                       "store = Store(node_id='n')\n"
                       "store.delete(123)\n"
                       "store.watch().get(timeout='soon')\n")
    proc = mypy(str(snippet), cache=mypy_cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'wrong.py:4: error: Argument 1 to "delete" of "Store" has incompatible type "int"; expected "str"' \
        in proc.stdout
    assert 'wrong.py:5: error: Argument "timeout" to "get" of "Watcher"' in proc.stdout


def test_version_is_the_distributions() -> None:
    assert meshstore.__version__ == importlib.metadata.version("meshstore") == PYPROJECT["version"]


def test_dependencies_are_ranges_that_admit_the_pinned_versions() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions, got {line!r}"
            pins[name.lower().replace("_", "-")] = version
    requirements = [Requirement(r) for r in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["dev"]]
    for req in requirements:
        assert not any(spec.operator == "==" for spec in req.specifier), f"{req} is a pin, not a range"
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt's {req.name}=={pins[name]} is outside {req}"


def test_metadata_is_complete() -> None:
    installed = importlib.metadata.metadata("meshstore")
    for field in ("readme", "license", "license-files", "classifiers", "urls", "requires-python", "description"):
        assert PYPROJECT.get(field), f"[project] has no {field}"
    assert PYPROJECT["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    assert installed["Requires-Python"] == PYPROJECT["requires-python"]
