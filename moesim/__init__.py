"""moesim: a discrete-event simulator for Mixture-of-Experts system design.

The public API is small and loads lazily so that ``import moesim`` stays fast:

>>> import moesim
>>> scenario = moesim.load_scenario("scenarios/quickstart.yaml")   # doctest: +SKIP
>>> result = moesim.simulate(scenario)                              # doctest: +SKIP
>>> result.summary["step_time_s"]                                   # doctest: +SKIP
>>> moesim.compare("scenarios/a.yaml", "scenarios/b.yaml")           # doctest: +SKIP
>>> moesim.sweep("scenarios/a.yaml", {"policies.capacity.factor": [1.0, 1.5]})  # doctest: +SKIP

``compare`` and ``sweep`` return pandas DataFrames (:mod:`moesim.study.api`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "compare", "load_scenario", "simulate", "sweep", "write_run"]

if TYPE_CHECKING:
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate, write_run
    from moesim.study.api import compare, sweep

_LAZY = {
    "load_scenario": "moesim.config.loading",
    "simulate": "moesim.runner",
    "write_run": "moesim.runner",
    "compare": "moesim.study.api",
    "sweep": "moesim.study.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moesim' has no attribute {name!r}")
