"""Strict JSON for everything moesim prints or writes.

JSON has no NaN or Infinity; Python's ``json`` writes them by default, and parsers in other
languages (and ``json.loads(..., parse_constant=...)`` in strict mode) reject the result. Every
``--json`` output and every written JSON file goes through :func:`dumps`: a non-finite float
becomes ``null`` (a figure that does not exist, e.g. the aux loss of a trace without logits),
numpy scalars and arrays become plain numbers and lists, and ``allow_nan=False`` makes any value
that slipped through an error instead of invalid JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and numpy values as Python ones (recursively)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(obj)``, never writing NaN or Infinity."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
