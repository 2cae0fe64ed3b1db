"""What one run produced, handed from the runner to the writers and the notebook API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from moesim.config.loading import ResolvedScenario
from moesim.metrics.collector import Collector


@dataclass
class RunResult:
    """Everything a run produced.

    Attributes:
        resolved: The scenario that ran.
        summary: The ``summary.json`` content.
        layers: The ``layers.parquet`` table.
        timeline: Chrome-trace events of the first steps.
        collector: The raw arrays.
        events_processed: SimPy events processed (for benchmarks).
        links: The ``links.parquet`` table (:mod:`moesim.metrics.links`).
    """

    resolved: ResolvedScenario
    summary: dict[str, Any]
    layers: pd.DataFrame
    timeline: list[dict[str, Any]]
    collector: Collector
    events_processed: int
    links: pd.DataFrame | None = None
