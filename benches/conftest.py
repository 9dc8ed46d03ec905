"""pytest set-up for the benchmarks in this directory.

- Collects ``bench_*.py`` (pytest's default pattern is ``test_*.py``), so ``pytest benches``
  (``make bench``) finds them; a file named on the command line is collected as usual.
- ``bench_report``: a fixture that prints a summary line and repeats every such line in a
  "meshstore bench summary" section at the end of the run (visible without ``-s`` too).

Each bench module skips itself unless ``--benchmark-only`` is given (see bench_eventloop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

_REPORT = pytest.StashKey[list[str]]()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = []


@pytest.fixture
def bench_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    lines = request.config.stash[_REPORT]

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("meshstore bench summary")
        for line in lines:
            terminalreporter.write_line(line)
