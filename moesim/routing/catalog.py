"""The routing sources a scenario can name (``routing.source``), registered in
:data:`moesim.routing.sources.SOURCES`. Import this module (or look the family up through
:func:`moesim.policies.registry_for`) before reading the registry.

- ``synthetic``: a fixed-popularity generator (:class:`~moesim.routing.sources.SyntheticSource`),
  or, with ``generator: fitted``, one fitted to real routing
  (:class:`~moesim.routing.replay.FittedSource`);
- ``trace``: replay of a recorded trace (:class:`~moesim.routing.replay.TraceSource`).
"""

from __future__ import annotations

import numpy as np

from moesim.config.scenario import Routing
from moesim.models.spec import ModelSpec
from moesim.routing.replay import FittedSource, TraceSource
from moesim.routing.sources import SOURCES, RoutingSource, SyntheticSource


@SOURCES.register("synthetic")
def synthetic(cfg: Routing, model: ModelSpec, rng: np.random.Generator) -> RoutingSource:
    """The synthetic source: a fixed-popularity generator, or one fitted to real routing."""
    if cfg.generator == "fitted":
        return FittedSource(cfg, model, rng)
    return SyntheticSource(cfg, model, rng)


SOURCES.register("trace")(TraceSource)
