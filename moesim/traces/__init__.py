"""Routing traces: the format, capture from PyTorch, importers, statistics and generators.

Heavy modules (pyarrow, torch) load only when used; ``import moesim.traces`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Trace", "TraceMeta", "capture", "read_trace", "write_trace"]

if TYPE_CHECKING:
    from moesim.traces.format import Trace, TraceMeta, read_trace, write_trace
    from moesim.traces.recorder import capture

_LAZY = {
    "Trace": "moesim.traces.format",
    "TraceMeta": "moesim.traces.format",
    "read_trace": "moesim.traces.format",
    "write_trace": "moesim.traces.format",
    "capture": "moesim.traces.recorder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moesim.traces' has no attribute {name!r}")
