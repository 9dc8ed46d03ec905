"""The README's Python API section, run: every ```python block of "## Python API" (its
subsections too) executes, in order, in one namespace, as a reader would paste them.
Then what the examples leave behind is checked: the watcher the first one breaks out of
is gone from the store.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def api_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section is not None, "README.md has no '## Python API' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.M | re.S)


def test_the_python_api_examples_run() -> None:
    examples = api_examples()
    assert len(examples) >= 2
    namespace: dict[str, object] = {"__name__": "readme"}
    try:
        for number, source in enumerate(examples, 1):
            exec(compile(source, f"README.md python block {number}", "exec"), namespace)  # noqa: S102
        store = namespace["store"]
        assert store.get("track-1").id == "track-1"
        # `for event in store.watch(...): break` closes the watcher it dropped.
        assert store.stats()["watchers"] == 0
    finally:
        for name in ("store", "other"):
            if name in namespace:
                namespace[name].close()
