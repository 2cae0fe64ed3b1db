"""The package's compiled kernels (numba), loaded on first use.

Each ``_*_jit`` module is imported only when a run first needs one of its kernels (numba's
import and the cached machine code take about half a second), and a machine where numba is
missing or unusable gets None, the caller's numpy path. The module is named by its dotted
path, so importing this module loads none of them.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


@functools.cache
def kernel(module: str, name: str) -> Any:
    """``name`` from the compiled module ``module``, importing it on first use; None where
    numba is missing or unusable."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None
