"""Input checks shared by every boundary that takes numbers (API, options, CLI, services).

A bool is an int to Python, and NaN or infinity pass every comparison the wrong way, so
"is this a usable number" is one question, asked here.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any, *, integer: bool = False) -> bool:
    """True for an int (never a bool) or, unless ``integer``, a finite float."""
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)
