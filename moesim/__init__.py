"""moesim: a discrete-event simulator for Mixture-of-Experts system design.

The public API is small and loads lazily so that ``import moesim`` stays fast:

>>> import moesim
>>> scenario = moesim.load_scenario("scenarios/quickstart.yaml")   # doctest: +SKIP
>>> result = moesim.simulate(scenario)                              # doctest: +SKIP
>>> result.summary["step_time_s"]                                   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_scenario", "simulate", "write_run"]

if TYPE_CHECKING:
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate, write_run

_LAZY = {
    "load_scenario": "moesim.config.loading",
    "simulate": "moesim.runner",
    "write_run": "moesim.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moesim' has no attribute {name!r}")
